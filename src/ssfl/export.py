"""Trained models out of a run: ``model.safetensors`` in every run folder, ``load_model``, and a
compact sparse file (``ssfl export``).

Every run writes its final global model to ``RUN_DIR/model.safetensors`` (safetensors: tensors
and string metadata, nothing executable): the state dict with the mask applied, the mask as
``mask.<parameter>`` bool tensors, and in the metadata the resolved config and what rebuilding
the network needs (classes, channels, image size). For personalised methods (DisPFL) it is the
consensus model the global accuracy evaluates; the clients' own models stay with the clients.

``ssfl export RUN`` writes the same model sparse: per prunable weight only its kept values
(``values.<name>``) and the mask packed 8 to a byte (``bits.<name>``), dense tensors as they
are. ``load_model`` reads either file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssfl.config import Config, ConfigError, apply_overrides, from_dict, to_toml

#: the name of the model file in a run folder
MODEL_FILE = "model.safetensors"
#: the format tags in the files' metadata
DENSE_FORMAT = "ssfl-model/1"
SPARSE_FORMAT = "ssfl-sparse-model/1"


class ModelFileError(ValueError):
    """A model file that is missing, unreadable or not one ``ssfl`` wrote."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelFileError("reading and writing models needs the safetensors package: "
                             "pip install safetensors") from None
    return safetensors.torch


def model_metadata(config: Config, *, num_classes: int, in_channels: int, image_size: int,
                   fmt: str = DENSE_FORMAT) -> dict[str, str]:
    return {"format": fmt, "config": to_toml(config), "num_classes": str(num_classes),
            "in_channels": str(in_channels), "image_size": str(image_size)}


def save_model(path: Path, model: nn.Module, mask: dict[str, torch.Tensor],
               metadata: dict[str, str]) -> Path:
    """The model's state dict (on the CPU) and its mask, atomically (a temporary file renamed)."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    tensors.update({f"mask.{n}": m.detach().cpu().to(torch.bool).contiguous()
                    for n, m in mask.items()})
    tmp = path.with_name(path.name + ".tmp")
    _safetensors().save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"no model at {path}: a run writes {MODEL_FILE} into its folder "
                             f"when it ends (runs from before ssfl wrote models have none)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except ModelFileError:
        raise
    except Exception as exc:  # truncated, corrupt or another format altogether
        raise ModelFileError(f"{path} is not a readable safetensors file "
                             f"({type(exc).__name__}: {exc})") from None
    if metadata.get("format") not in (DENSE_FORMAT, SPARSE_FORMAT):
        raise ModelFileError(f"{path} is not a model file written by ssfl (format "
                             f"{metadata.get('format')!r})")
    return tensors, metadata


def read_model(path: str | Path) -> tuple[nn.Module, dict[str, torch.Tensor], Config]:
    """The network, its mask and the run's config from a run folder, ``model.safetensors`` or
    a sparse export."""
    return _read(path)[:3]  # type: ignore[return-value]


def _read(path: str | Path) -> tuple[nn.Module, dict[str, torch.Tensor], Config, dict[str, str]]:
    """``read_model`` and the file's metadata, from one read of the file."""
    from ssfl.models import build_model

    tensors, meta = _open(Path(path))
    try:
        import tomllib

        config = from_dict(tomllib.loads(meta["config"]))
        shape = {k: int(meta[k]) for k in ("num_classes", "in_channels", "image_size")}
    except (KeyError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"{path}: its metadata does not describe a model ({exc})") from None
    model = build_model(config.model.name, width=config.model.width, seed=config.run.seed,
                        **shape)
    if meta["format"] == SPARSE_FORMAT:
        tensors = densify(tensors, model)
    mask = {k[len("mask."):]: v for k, v in tensors.items() if k.startswith("mask.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("mask.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: the tensors do not fit {config.model.name}: {exc}") \
            from None
    return model.eval(), mask, config, meta


def load_model(path: str | Path) -> nn.Module:
    """A ready ``nn.Module`` (in eval mode, on the CPU) with the trained weights of a run:
    ``path`` is a run folder, its ``model.safetensors`` or an ``ssfl export`` file."""
    return read_model(path)[0]


def sparse_tensors(model: nn.Module, mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per masked parameter its kept values (row-major order) and its mask packed 8 per byte;
    every other tensor as it is."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in mask:
            keep = mask[name].to(torch.bool)
            out[f"values.{name}"] = tensor[keep].contiguous()
            out[f"bits.{name}"] = torch.from_numpy(np.packbits(keep.reshape(-1).numpy()))
        else:
            out[name] = tensor.contiguous()
    return out


def densify(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The dense state dict (and ``mask.<name>``) of a sparse export, checked against the
    network's shapes."""
    out: dict[str, torch.Tensor] = {}
    for name, reference in model.state_dict().items():
        if f"bits.{name}" in tensors:
            count = reference.numel()
            bits = tensors[f"bits.{name}"].numpy()
            if bits.dtype != np.uint8 or bits.size != math.ceil(count / 8):
                raise ModelFileError(f"bits.{name} does not fit a {tuple(reference.shape)} "
                                     f"tensor")
            keep = torch.from_numpy(np.unpackbits(bits)[:count].astype(bool)).reshape(
                reference.shape)
            values = tensors[f"values.{name}"]
            if values.numel() != int(keep.sum()):
                raise ModelFileError(f"values.{name} holds {values.numel()} values for "
                                     f"{int(keep.sum())} kept weights")
            dense = torch.zeros_like(reference, dtype=values.dtype)
            dense[keep] = values
            out[name], out[f"mask.{name}"] = dense, keep
        elif name in tensors:
            out[name] = tensors[name]
    return out


def export_sparse(run: str | Path, out: str | Path | None = None) -> tuple[Path, int, int]:
    """Write a run's model as a sparse file; return its path, its size and the dense file's."""
    source = Path(run)
    dense_path = source / MODEL_FILE if source.is_dir() else source
    model, mask, _, meta = _read(dense_path)
    target = Path(out) if out else dense_path.with_name("model.sparse.safetensors")
    metadata = {**meta, "format": SPARSE_FORMAT}
    tmp = target.with_name(target.name + ".tmp")
    _safetensors().save_file(sparse_tensors(model, mask), str(tmp), metadata=metadata)
    tmp.replace(target)
    return target, target.stat().st_size, dense_path.stat().st_size


def evaluate_run(run: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Accuracy and loss of a run's model on the test split of its data set, or of the data
    ``overrides`` name (``data.root=...``, ``data.dataset=...`` with the same classes)."""
    from ssfl.client import evaluate_samples
    from ssfl.data.datasets import load_dataset

    model, mask, config = read_model(run)
    if overrides:
        config = apply_overrides(config, list(overrides))
    test = load_dataset(config.data.dataset, config.data.root or None, "test",
                        download=config.data.download)
    if test.num_classes != model_classes(model):
        raise ConfigError(f"{config.data.dataset} has {test.num_classes} classes; the model "
                          f"predicts {model_classes(model)}")
    try:
        correct, losses = evaluate_samples(model, test.images, test.labels, test.mean, test.std)
    except RuntimeError as exc:  # images of another size or channel count
        raise ConfigError(f"the {config.data.dataset} images {tuple(test.images.shape[1:])} "
                          f"do not fit the model: {str(exc).splitlines()[0]}") from None
    kept = sum(int(m.sum()) for m in mask.values())
    return {"accuracy": int(correct.sum()) / correct.numel(), "test_loss": float(losses.mean()),
            "samples": int(correct.numel()), "dataset": config.data.dataset,
            "density": kept / max(1, sum(m.numel() for m in mask.values()))}


def model_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)

