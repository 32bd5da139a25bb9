"""What every party derives from the config alone: the data split, the seeded model, the
learning rate and the clients of each round (nothing of it travels)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssfl.algorithms.base import Setup
from ssfl.client import LocalData, TrainSettings, model_device
from ssfl.config import Config, ConfigError, augmentation_enabled, check_against_data
from ssfl.data.datasets import ImageDataset, load_dataset
from ssfl.data.partition import partition
from ssfl.masks import prunable_parameter_names
from ssfl.models import build_model


@dataclass
class Experiment:
    """What every party derives from the config alone (data split and initial model are
    seeded, so nothing of it travels)."""

    config: Config
    train_set: ImageDataset
    test_set: ImageDataset | None
    parts: list[np.ndarray]
    model: torch.nn.Module
    prunable: list[str] = field(init=False)
    initial: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.prunable = prunable_parameter_names(self.model)
        # The server's copy: on the CPU whatever device the model trains on.
        self.initial = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    def client(self, cid: int) -> LocalData:
        t = self.train_set
        return LocalData(t.images, t.labels, torch.from_numpy(self.parts[cid]), t.mean, t.std)

    @property
    def prunable_shapes(self) -> dict[str, torch.Size]:
        return {n: self.initial[n].shape for n in self.prunable}


def prepare(config: Config, *, data_root: str = "", with_test: bool = True) -> Experiment:
    """Load and split the data and build the seeded model. ``data_root`` overrides
    ``data.root`` (a Flower node's own data folder)."""
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    root = data_root or config.data.root or None
    train_set = load_dataset(config.data.dataset, root, "train", download=config.data.download)
    test_set = (load_dataset(config.data.dataset, root, "test", download=config.data.download)
                if with_test else None)
    check_against_data(config, len(train_set), train_set.num_classes)
    parts = partition(
        train_set.labels.numpy(), config.federation.num_clients, config.data.partition,
        alpha=config.data.alpha, classes_per_client=config.data.classes_per_client,
        seed=config.run.seed,
    )
    exp = Experiment(config, train_set, test_set, list(parts), seeded_model(config, train_set))
    check_density_keeps_a_weight(config, exp)
    return exp


def check_density_keeps_a_weight(config: Config, exp: Experiment) -> None:
    """Refuse, before any client works, a density whose top-k keeps no weight of this model
    (k = round(density * prunable), as ``ssfl.masks.topk_count``)."""
    total = sum(math.prod(exp.initial[n].shape) for n in exp.prunable)
    if round(config.algorithm.density * total) < 1:
        raise ConfigError(
            f"algorithm.density = {config.algorithm.density} keeps no weight: "
            f"{config.model.name} (width {config.model.width}) has {total} prunable weights; "
            f"use a density of at least {1 / total:.3g}")


def resolve_device(spec: str) -> torch.device:
    """The device ``run.device`` names on this machine (``auto``: its CUDA GPU if it has one)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device = {spec!r}, but PyTorch sees no CUDA GPU on this "
                              "machine (a CPU build, or no driver); use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device = {spec!r}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        # Reproducible convolutions: the same seed gives the same run on the same GPU.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


def seeded_model(config: Config, data: ImageDataset) -> torch.nn.Module:
    """The initial model: the same weights in every process that builds it from ``config``
    (drawn on the CPU, then moved to ``run.device``)."""
    _, channels, height, _ = data.images.shape
    model = build_model(config.model.name, num_classes=data.num_classes, in_channels=channels,
                        image_size=height, width=config.model.width, seed=config.run.seed)
    return model.to(resolve_device(config.run.device))


def device_name(model: torch.nn.Module) -> str:
    """Where ``model`` trains, for the summary: ``cpu`` or ``cuda:0 (<GPU name>)``."""
    device = model_device(model)
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


def train_settings(config: Config) -> TrainSettings:
    t = config.train
    return TrainSettings(momentum=t.momentum, weight_decay=t.weight_decay,
                         local_epochs=t.local_epochs, batch_size=t.batch_size,
                         clip_grad_norm=t.clip_grad_norm, augment=augmentation_enabled(config),
                         local_lr_schedule=t.local_lr_schedule,
                         local_restart_epochs=t.local_restart_epochs,
                         local_lr_min=t.local_lr_min)


def learning_rate(config: Config, round: int) -> float:
    """Learning rate of ``round`` (1-based): ``lr * decay**(round-1)`` or cosine over the run."""
    t = config.train
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (round - 1) / config.run.rounds))
    return t.lr * t.lr_decay ** (round - 1)


def sample_clients(seed: int, round: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of ``round``: seeded by (seed, round) alone, so a resumed or re-run
    experiment samples the same clients whatever happened in earlier rounds."""
    rng = np.random.default_rng([seed, round])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def make_run_dir(config: Config, run_dir: Path | None) -> Path:
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(config.run.out_dir) / f"{config.run.name}-{stamp}"
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir




def make_setup(exp: Experiment) -> Setup:
    """The algorithms' view of the experiment."""
    return Setup(config=exp.config, shapes={n: t.shape for n, t in exp.initial.items()},
                 prunable=list(exp.prunable), initial=exp.initial,
                 num_clients=len(exp.parts), client_sizes=tuple(len(p) for p in exp.parts))
