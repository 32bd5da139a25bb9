"""PruneFL (Jiang et al., TNNLS 2022) at a fixed target density, after the paper and the
reproduction in the FedDST authors' ``prunefl.py``.

- Initial pruning on one client (client 0, as ``snip_single``; the authors' code draws one
  at random): starting dense from the seeded weights, it runs ``initial_rounds`` local
  rounds; after each it keeps the global top-k weights by importance (``global_topk_mask``)
  and zeroes the rest, weights (re)entering the mask starting at 0. Its upload of the
  pruned model (bitmap + values) is the one-time cost ``initial_pruning_upload``; it needs
  no download, since the initial weights come from the shared seed (as in ``prunefl.py``).
  Its dense local training costs compute, not bytes.
- Importance: PruneFL's squared gradient of every weight, active or not (the dense
  gradient), averaged over the local iterations (``train_with_importance``). Accumulated
  over one round only: with client sampling a client's earlier rounds would be stale, and a
  dense accumulator per client costs clients x parameters memory. The authors' code squares
  the clients' averaged last-minibatch gradient instead; the paper accumulates squares.
- Reconfiguration, every ``update_interval`` rounds (``round % R == 0``) up to
  ``update_until``: each client of the round uploads its dense importance vector (a
  float32 SCORES payload over all prunable weights, after its values) -- these are
  PruneFL's dense rounds. The server averages the values (FedAvg inside the old mask) and
  the importance (weighted by samples), and the new mask is the global top-k by importance
  over the whole model, k = round(density * prunable) (ties: earlier position). Grown
  weights start at exactly 0 (the server holds 0 outside the old mask).
- Fixed density is our choice: PruneFL picks the mask size adaptively, greedily adding
  weights while importance per unit of measured layer time stays above the running average
  (``prunefl_readjust``). Without per-layer timings every weight costs the same, the greedy
  order is the importance order, and fixing k lets it be compared with the other methods at
  equal density, which the comparison needs.
- Non-update rounds are sparse FedAvg inside the global mask.
- ``federation.aggregator`` and the clipping settings replace both means by a robust rule
  (``ssfl.algorithms.robust.combine``): the values, all over the one global mask, clipped
  around the current ones; the importance by the same rule without clipping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssfl.algorithms.base import Ask, ClientContext, ClientOutput, Reply, Setup
from ssfl.algorithms.common import WeightedMean
from ssfl.algorithms.dynamic_mask import DynamicGlobalMask, DynamicMaskState, initial_state
from ssfl.algorithms.robust import after_refusals, combine, is_plain_mean
from ssfl.client import local_train, train_with_importance
from ssfl.comm import PayloadError, PayloadKind, decode_values, encode_values, payload_parts
from ssfl.config import FederationSection
from ssfl.masks import flatten, full_mask, global_topk_mask, unflatten


@dataclass(frozen=True)
class PruneFLSettings:
    """``[algorithm.prunefl]``."""

    update_interval: int = 10  # R: reconfiguration in rounds R, 2R, ...
    update_until: int = 0  # ... up to this round (0: half the run)
    initial_rounds: int = 5  # local rounds of initial pruning on client 0

    def __post_init__(self) -> None:
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be at least 1, got {self.update_interval}")
        if self.update_until < 0:
            raise ValueError("update_until must be >= 0 (0: half of run.rounds)")
        if self.initial_rounds < 1:
            raise ValueError(f"initial_rounds must be at least 1, got {self.initial_rounds}")


class PruneFL(DynamicGlobalMask):
    Settings = PruneFLSettings
    robust_aggregation = True

    def __init__(self, setup: Setup, settings: PruneFLSettings) -> None:
        super().__init__(setup, settings)
        self.robust = setup.config.federation  # clipping and the aggregation rule
        self.update_until = settings.update_until or setup.config.run.rounds // 2

    def is_update_round(self, round: int) -> bool:
        return round % self.settings.update_interval == 0 and round <= self.update_until

    # ---- server -----------------------------------------------------------------------------
    def init(self) -> DynamicMaskState:
        return initial_state(self, full_mask(self.setup.prunable_shapes))

    def run_setup(self, state: DynamicMaskState, ask: Ask) -> DynamicMaskState:
        """Initial pruning on client 0; its pruned model (bitmap + values) is the start."""
        reply, = ask.query("initial_pruning", {0: b""}, label="initial_pruning_upload",
                           all_required=True)
        parts = payload_parts(reply.payload)
        if len(parts) != 2:
            raise PayloadError(f"initial pruning: expected a mask and values, got "
                               f"{len(parts)} payloads")
        mask, digest = self.codec.decode(parts[0])
        layout = self.codec.layout(mask, digest)
        values = decode_values(parts[1], expected_count=layout.num_values,
                               expected_digest=digest, expected_dtype=self.setup.value_dtype,
                               require_finite=True)
        return self.state_with(layout.dense_tensors(values), mask)

    def check(self, state: DynamicMaskState, round: int, client_id: int, payload: bytes
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        update = self.is_update_round(round)
        parts = payload_parts(payload)
        if len(parts) != (2 if update else 1):
            raise PayloadError(f"round {round}: expected {2 if update else 1} payloads, "
                               f"got {len(parts)}")
        digest = self.codec.digest(state.mask)
        values = decode_values(parts[0], expected_count=self.codec.layout(state.mask, digest)
                               .num_values, expected_digest=digest, expected_round=round,
                               expected_dtype=self.setup.value_dtype, require_finite=True)
        importance = None
        if update:
            importance = decode_values(parts[1], expected_kind=PayloadKind.SCORES,
                                       expected_count=self.setup.prunable_count,
                                       expected_digest=digest, expected_round=round,
                                       require_finite=True)
        return values, importance

    def aggregate(self, state: DynamicMaskState, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[DynamicMaskState, dict[str, Any]]:
        update = self.is_update_round(round)
        if is_plain_mean(self.robust):
            values, importance = WeightedMean(), WeightedMean()
            for r in replies:
                values.add(r.update[0], float(r.num_samples))
                if r.update[1] is not None:
                    importance.add(r.update[1], float(r.num_samples))
            new_values = values.result()
            new_importance = importance.result() if update else None
        else:
            new_values, new_importance = self.robust_combine(
                state, replies, after_refusals(self.robust, len(refused)))
        weights = self.codec.layout(state.mask).dense_tensors(new_values)
        mask = state.mask
        if update:
            mask = global_topk_mask(unflatten(new_importance, self.setup.prunable_shapes,
                                              self.setup.prunable), self.setup.density)
        held = self.holders_after(state, replies, sampled, {})
        return self.with_new_mask(state, round, mask, weights, held), {}

    def robust_combine(self, state: DynamicMaskState, replies: Sequence[Reply],
                       settings: FederationSection) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The values and the importance (None outside update rounds) under
        ``federation.aggregator``: the values (all in the global mask) clipped around the
        current ones; the importance by the same rule, unclipped (it is no change from a current
        value, so no change can be bounded)."""
        current = self.codec.layout(state.mask).gather(state.weights)
        values = combine([r.update[0] for r in replies], [r.num_samples for r in replies],
                         current, settings)
        scored = [r for r in replies if r.update[1] is not None]
        if not scored:
            return values, None
        unclipped = dataclasses.replace(settings, update_clip_norm=0.0, adaptive_clip=0.0)
        importance = combine([r.update[1] for r in scored], [r.num_samples for r in scored],
                             torch.zeros_like(scored[0].update[1]), unclipped)
        return values, importance

    # ---- client -----------------------------------------------------------------------------
    def client_setup(self, kind: str, ctx: ClientContext, received: bytes,
                     state: bytes | None) -> ClientOutput:
        if kind != "initial_pruning":
            return super().client_setup(kind, ctx, received, state)
        # Dense from the seeded weights; after each local round keep the global top-k by
        # importance, weights (re)entering the mask starting at 0. Round 1's learning rate.
        prunable, density = self.setup.prunable, self.setup.density
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.setup.initial[n])
        mask = full_mask(self.setup.prunable_shapes)
        lr = self.setup.config.train.lr
        for _ in range(self.settings.initial_rounds):
            importance, _ = train_with_importance(ctx.model, ctx.data, ctx.settings, lr,
                                                  ctx.generator, mask, prunable)
            mask = global_topk_mask(importance, density)
            with torch.no_grad():
                for n in prunable:
                    params[n].masked_fill_(~mask[n].to(params[n].device), 0.0)
        digest = self.codec.digest(mask)
        values = encode_values(self.codec.layout(mask, digest).gather_model(ctx.model),
                               digest=digest, dtype=self.setup.value_dtype)
        return ClientOutput(self.codec.encode(mask) + values, state)

    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        mask, layout, digest, state = self.receive(ctx, received, state)
        if not self.is_update_round(ctx.round):
            result = local_train(ctx.model, ctx.data, ctx.settings, ctx.lr, ctx.generator, mask)
            return ClientOutput(self.values_reply(ctx.model, layout, digest, ctx.round), state,
                                result)
        importance, result = train_with_importance(ctx.model, ctx.data, ctx.settings, ctx.lr,
                                                   ctx.generator, mask, self.setup.prunable)
        scores = encode_values(flatten(importance, self.setup.prunable), kind=PayloadKind.SCORES,
                               round=ctx.round, digest=digest, dtype="float32")
        return ClientOutput(self.values_reply(ctx.model, layout, digest, ctx.round) + scores,
                            state, result)
