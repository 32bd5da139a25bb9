"""Data, partition, model and training settings, built exactly as the simulator builds them.

Server and clients each call these with the same ``Config``, so both sides hold the same
partition (seeded) and the same seeded initial model without sending either over the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssfl.client import LocalData, TrainSettings
from ssfl.config import Config, augmentation_enabled, check_against_data
from ssfl.data.datasets import ImageDataset, load_dataset
from ssfl.data.partition import partition


@dataclass(frozen=True)
class Federation:
    train_set: ImageDataset
    test_set: ImageDataset | None
    parts: list[np.ndarray]

    def client(self, cid: int) -> LocalData:
        ts = self.train_set
        return LocalData(ts.images, ts.labels, torch.from_numpy(self.parts[cid]), ts.mean, ts.std)


def load_federation(config: Config, data_root: str = "", *, with_test: bool = True) -> Federation:
    """Load the data set and split it into ``federation.num_clients`` parts (as ``sim`` does).

    ``data_root`` overrides ``data.root`` (a SuperNode's own data folder, from its node config).
    """
    root = data_root or config.data.root or None
    train_set = load_dataset(config.data.dataset, root, "train", download=config.data.download)
    test_set = (
        load_dataset(config.data.dataset, root, "test", download=config.data.download)
        if with_test
        else None
    )
    check_against_data(config, len(train_set), train_set.num_classes)
    parts = partition(
        train_set.labels.numpy(),
        config.federation.num_clients,
        config.data.partition,
        alpha=config.data.alpha,
        classes_per_client=config.data.classes_per_client,
        seed=config.run.seed,
    )
    return Federation(train_set, test_set, list(parts))


def build_model(config: Config, train_set: ImageDataset) -> torch.nn.Module:
    """The seeded initial model (every process builds the same one)."""
    from ssfl.sim import _build

    return _build(config, train_set)


def train_settings(config: Config) -> TrainSettings:
    # Mirrors the TrainSettings that ssfl.sim.run_experiment builds.
    return TrainSettings(
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        local_epochs=config.train.local_epochs,
        batch_size=config.train.batch_size,
        clip_grad_norm=config.train.clip_grad_norm,
        augment=augmentation_enabled(config),
    )


def set_threads(config: Config) -> None:
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
