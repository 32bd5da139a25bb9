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

from ssfl.client import LocalData
from ssfl.config import Config
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


TRAINING_STRATEGIES: dict[str, Callable[[StrategyContext], TrainingStrategy]] = {
    "random_clientwise": _random_clientwise,
}
