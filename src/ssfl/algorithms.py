"""Registry of algorithms whose training rounds are not plain FedAvg in one global mask.

Global-mask algorithms (SSFL, dense FedAvg, random, ERK, SNIP variants) share the mask round in
``ssfl.server.find_mask`` and ``StaticMaskStrategy``. An algorithm listed here instead builds
its own ``TrainingStrategy`` from a ``StrategyContext``; the simulator looks it up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ssfl.client import LocalData, TrainSettings, client_generator
from ssfl.config import Config, augmentation_enabled
from ssfl.dispfl import DisPFLStrategy
from ssfl.dynamic import FedDSTStrategy, PruneFLStrategy
from ssfl.sparsyfed import SparsyFedStrategy
from ssfl.strategies import ClientMaskStrategy, TrainingStrategy


@dataclass(frozen=True)
class StrategyContext:
    """Everything a strategy may need at set-up; ``model`` holds the seeded initial weights."""

    config: Config
    model: nn.Module
    initial: dict[str, torch.Tensor]
    prunable: list[str]
    clients: list[LocalData]


def _random_clientwise(ctx: StrategyContext) -> TrainingStrategy:
    return ClientMaskStrategy(ctx.initial, ctx.prunable, ctx.config.algorithm.density,
                              len(ctx.clients), seed=ctx.config.run.seed,
                              value_dtype=ctx.config.comm.value_dtype)


def _update_until(config: Config) -> int:
    """Last round of mask updates of the dynamic methods; 0 in the config: half the run."""
    return config.algorithm.update_until or config.run.rounds // 2


def _feddst(ctx: StrategyContext) -> TrainingStrategy:
    a = ctx.config.algorithm
    return FedDSTStrategy(ctx.initial, ctx.prunable, a.density, prune_fraction=a.prune_fraction,
                          update_interval=a.update_interval,
                          update_until=_update_until(ctx.config),
                          value_dtype=ctx.config.comm.value_dtype)


def _prunefl(ctx: StrategyContext) -> TrainingStrategy:
    c = ctx.config
    settings = TrainSettings(
        momentum=c.train.momentum, weight_decay=c.train.weight_decay,
        local_epochs=c.train.local_epochs, batch_size=c.train.batch_size,
        clip_grad_norm=c.train.clip_grad_norm, augment=augmentation_enabled(c),
    )
    # Initial pruning runs on client 0 before round 1, at round 1's learning rate (train.lr under
    # both schedules), with that client's round-0 RNG stream.
    return PruneFLStrategy(ctx.initial, ctx.prunable, c.algorithm.density, model=ctx.model,
                           initial_client=ctx.clients[0], settings=settings, lr=c.train.lr,
                           generator=client_generator(c.run.seed, 0, 0),
                           initial_rounds=c.algorithm.prunefl_initial_rounds,
                           update_interval=c.algorithm.update_interval,
                           update_until=_update_until(c), value_dtype=c.comm.value_dtype)


def _dispfl(ctx: StrategyContext) -> TrainingStrategy:
    c = ctx.config
    return DisPFLStrategy(ctx.initial, ctx.prunable, c.algorithm.density, len(ctx.clients),
                          seed=c.run.seed, rounds=c.run.rounds, neighbors=c.algorithm.neighbors,
                          anneal=c.algorithm.dispfl_anneal, value_dtype=c.comm.value_dtype,
                          min_replies=c.federation.min_replies)


def _sparsyfed(ctx: StrategyContext) -> TrainingStrategy:
    c = ctx.config
    return SparsyFedStrategy(ctx.initial, ctx.prunable, c.algorithm.density,
                             beta=c.algorithm.powerprop_beta, value_dtype=c.comm.value_dtype,
                             min_replies=c.federation.min_replies)


TRAINING_STRATEGIES: dict[str, Callable[[StrategyContext], TrainingStrategy]] = {
    "random_clientwise": _random_clientwise,
    "feddst": _feddst,
    "prunefl": _prunefl,
    "sparsyfed": _sparsyfed,
    "dispfl": _dispfl,
}
