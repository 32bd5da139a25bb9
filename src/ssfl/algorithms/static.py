"""The static-mask baselines of the SSFL paper's comparison: sparse FedAvg in a mask fixed
before round 1 (``ssfl.algorithms.ssfl.FixedMaskFedAvg``), found another way than SSFL's.

- ``fedavg``: dense FedAvg (density 1, no set-up);
- ``random``: exactly k weights chosen uniformly at random over all layers (seeded);
- ``random_erk``: a random mask with ERK layer densities (Evci et al.), exactly k in all;
- ``snip_single``: SNIP scores of one client (client 0) alone, global top-k;
- ``snip_oracle``: SNIP on the pooled data of all clients, as many samples as SSFL's mask round
  (not federated: an upper bound for mask quality, simulator only).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ssfl.algorithms.base import Ask, SetupReply
from ssfl.algorithms.ssfl import FixedMaskFedAvg, FixedMaskState, SaliencyMask
from ssfl.masks import (
    erk_densities,
    random_global_mask,
    random_layerwise_mask,
    topk_count,
)


class DenseFedAvg(FixedMaskFedAvg):
    """Dense FedAvg (McMahan et al.): every weight, every round."""

    @classmethod
    def check_config(cls, config: Any, settings: Any) -> None:
        from ssfl.config import ConfigError

        if config.algorithm.density != 1.0:
            raise ConfigError("algorithm.name = 'fedavg' is dense FedAvg: set "
                              "algorithm.density = 1.0, or choose 'ssfl' or 'random' for a "
                              "sparse run")


class RandomMask(FixedMaskFedAvg):
    """FedAvg inside a random global mask of the target density, seeded by ``run.seed``."""

    def random_mask(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return random_global_mask(self.setup.prunable_shapes, self.setup.density, generator)

    def run_setup(self, state: FixedMaskState, ask: Ask) -> FixedMaskState:
        if self.setup.density >= 1.0:
            return state
        state = self.with_mask(self.random_mask(torch.Generator().manual_seed(self.setup.seed)))
        self.deliver_mask(state, ask, label="mask_broadcast")
        return state


class RandomERKMask(RandomMask):
    """FedAvg inside a random mask whose layer densities follow ERK (exactly k kept)."""

    def random_mask(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        shapes = self.setup.prunable_shapes
        total = topk_count(self.setup.density, sum(math.prod(s) for s in shapes.values()))
        return random_layerwise_mask(shapes, erk_densities(shapes, self.setup.density), total,
                                     generator)


class SNIPSingle(SaliencyMask):
    """SNIP on one client's data (client 0), global top-k: what one data owner would find.
    Its one client's scores may travel lean (``score_dtype``, ``score_topk``)."""

    @classmethod
    def check_config(cls, config: Any, settings: Any) -> None:
        from ssfl.config import ConfigError

        super().check_config(config, settings)
        if settings.samples_clients:
            raise ConfigError("snip_single scores on client 0 alone: score_fraction and "
                              "score_count apply to ssfl only")

    def run_setup(self, state: FixedMaskState, ask: Ask) -> FixedMaskState:
        if self.setup.density >= 1.0:
            return state
        replies = ask.query("scores", {0: b""}, label="score_upload")
        mask, scored = self.scores_to_mask(replies, self.settings.score_aggregation)
        state = self.with_mask(mask, scored=scored)
        self.deliver_mask(state, ask, label="mask_broadcast")
        return state


class SNIPOracle(SaliencyMask):
    """SNIP on the pooled data of every client (not federated): a mask-quality upper bound."""

    needs_pooled_data = True

    @classmethod
    def check_config(cls, config: Any, settings: Any) -> None:
        from ssfl.config import ConfigError

        super().check_config(config, settings)
        if settings.is_lean:
            raise ConfigError("snip_oracle's pooled scores never travel: score_dtype, "
                              "score_topk, score_fraction and score_count apply to ssfl and "
                              "snip_single only")

    def run_setup(self, state: FixedMaskState, ask: Ask) -> FixedMaskState:
        if self.setup.density >= 1.0:
            return state
        # Computed where the data lies, so nothing travels (no score bytes).
        pooled = SetupReply(self.setup.num_clients, ask.pooled("pooled_scores"), 1)
        state = self.with_mask(self.scores_to_mask([pooled], "uniform")[0])
        self.deliver_mask(state, ask, label="mask_broadcast")
        return state
