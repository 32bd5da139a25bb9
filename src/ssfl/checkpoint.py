"""Atomic, pickle-free checkpoints of a run's server state.

A checkpoint is one ``torch.save`` file holding only tensors and a JSON string, read back with
``torch.load(..., weights_only=True)`` so that loading never runs code from the file. It is
written to a temporary file in the same folder, flushed to disk, then renamed over the old one:
a crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or from another format."""


def save_checkpoint(path: str | os.PathLike[str], meta: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    payload = {"format": torch.tensor(FORMAT), "meta": json.dumps(meta),
               "tensors": {k: t.detach().contiguous() for k, t in tensors.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run saved none (set "
                              f"run.checkpoint_every > 0) or the folder is not a run folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"])
        tensors = payload["tensors"]
        version = int(payload["format"])
    except Exception as exc:  # any failure to read means the file is unusable
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            f"delete it to restart the run from scratch"
        ) from None
    if version != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {version}, expected {FORMAT}")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in tensors.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a table of tensors")
    return meta, tensors


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
