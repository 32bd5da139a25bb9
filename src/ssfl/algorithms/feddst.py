"""FedDST (Bibikar et al., AAAI 2022), following the paper and the authors' ``dst.py``.

- Initial mask: the seeded initial weights pruned by magnitude, layer by layer, to ERK
  counts (``layer_prune`` in the authors' ``models.py``). The counts come from this
  project's ``erk_densities`` (RigL's ERK: densities scaled, saturated layers kept dense)
  with largest-remainder rounding, so they add up to exactly round(density * prunable); the
  authors' ``_weights_by_layer`` scales sparsities instead and counts biases, a quirk we do
  not copy. The per-layer counts then stay fixed for the whole run.
- Mask-update rounds: every ``update_interval`` rounds (``round % R == 0``) while
  ``round < update_until``. The authors' code readjusts at 0-based rounds 1, R+1, ...; we
  let the first readjustment come after R rounds of training, as RigL's update period does.
- Fraction: ``alpha_r = alpha/2 * (1 + cos(pi * round / update_until))`` as in the paper.
  (``dst.py`` multiplies ``_decay(...)``, which already contains alpha, by alpha again; we
  follow the paper's formula.) ``update_until`` defaults to half the run, like the
  authors' ``rate_decay_end``.
- Client, in an update round: after local training (the authors readjust in the last local
  epoch, after its steps), take the dense gradient on one fresh minibatch of its data, drop
  ``floor(alpha_r * active + 1/2)`` smallest-magnitude active weights per layer (at most
  the layer's inactive count) and grow as many
  weights that were inactive before the drop, by largest gradient magnitude
  (``drop_and_regrow``). Excluding the just-dropped weights from regrowth (the authors'
  ``topk`` over all weights may pick them, or even active ones) makes every readjustment a
  swap of exactly k connections per layer. Grown weights are set to exactly 0, as in
  ``layer_grow``; the optimiser is new every round, so their momentum starts at 0. The
  client uploads its new bitmap and its values inside it.
- Server: each weight is averaged over the clients whose mask holds it, weighted by sample
  count (``aggregated_masks`` in ``dst.py``); weights nobody holds leave the mask. The
  union of client masks has at least the target count in every layer; the server keeps the
  ``counts[layer]`` largest-magnitude averaged weights per layer, with ERK counts, as
  ``layer_prune`` does in ``dst.py``. Regrown weights arrive at 0, so they survive only
  where ties decide; ties go to the weight held by more samples, then the earlier position
  (the authors' ``topk`` breaks ties arbitrarily). ``federation.aggregator`` and the clipping
  settings replace the mean by a robust rule over each weight's holders
  (``ssfl.algorithms.robust.combine_over_holders``; Krum: the holders among the selected
  clients), before the same re-pruning.
- Non-update rounds are sparse FedAvg inside the global mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssfl.algorithms.base import ClientContext, ClientOutput, Reply, Setup
from ssfl.algorithms.dynamic_mask import DynamicGlobalMask, DynamicMaskState, initial_state
from ssfl.algorithms.robust import after_refusals, holders_average
from ssfl.client import apply_regrowth_, cpu_weights, local_train, minibatch_gradient
from ssfl.comm import PayloadError, decode_values, payload_parts
from ssfl.masks import (
    cosine_fraction,
    drop_and_regrow,
    erk_counts,
    magnitude_mask,
    prune_to_counts,
)


@dataclass(frozen=True)
class FedDSTSettings:
    """``[algorithm.feddst]``."""

    update_interval: int = 10  # R: mask updates in rounds R, 2R, ...
    update_until: int = 0  # ... while round < this (0: half the run)
    prune_fraction: float = 0.3  # alpha in [0, 1]; 0 keeps the initial ERK mask fixed

    def __post_init__(self) -> None:
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be at least 1, got {self.update_interval}")
        if self.update_until < 0:
            raise ValueError("update_until must be >= 0 (0: half of run.rounds)")
        if not 0.0 <= self.prune_fraction <= 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1], got {self.prune_fraction}")


class FedDST(DynamicGlobalMask):
    Settings = FedDSTSettings
    robust_aggregation = True

    def __init__(self, setup: Setup, settings: FedDSTSettings) -> None:
        super().__init__(setup, settings)
        self.robust = setup.config.federation  # clipping and the aggregation rule
        self.counts = erk_counts(setup.prunable_shapes, setup.density)
        self.update_until = settings.update_until or setup.config.run.rounds // 2

    def readjust_fraction(self, round: int) -> float:
        """alpha_r in an update round, else 0 (clients and server both derive it)."""
        if round % self.settings.update_interval != 0:
            return 0.0
        return cosine_fraction(self.settings.prune_fraction, round, self.update_until)

    # ---- server -----------------------------------------------------------------------------
    def init(self) -> DynamicMaskState:
        initial = self.setup.initial
        return initial_state(self, magnitude_mask({n: initial[n] for n in self.setup.prunable},
                                                  self.counts))

    def check(self, state: DynamicMaskState, round: int, client_id: int, payload: bytes
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bytes | None]:
        """Dense values, the mask they lie in, and the client's new digest if it sent one."""
        parts = payload_parts(payload)
        if len(parts) == 2:
            mask, digest = self.codec.decode(parts[0])
            bad = {n: int(mask[n].sum()) for n in self.setup.prunable
                   if int(mask[n].sum()) != self.counts[n]}
            if bad:
                raise PayloadError(f"client {client_id}'s mask has wrong layer counts {bad}")
            new: bytes | None = digest
        elif len(parts) == 1:
            mask, digest, new = state.mask, self.codec.digest(state.mask), None
        else:
            raise PayloadError(f"expected 1 or 2 payloads, got {len(parts)}")
        layout = self.codec.layout(mask, digest)
        values = decode_values(parts[-1], expected_count=layout.num_values,
                               expected_digest=digest, expected_round=round,
                               expected_dtype=self.setup.value_dtype, require_finite=True)
        return layout.dense_tensors(values), mask, new

    def aggregate(self, state: DynamicMaskState, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[DynamicMaskState, dict[str, Any]]:
        contributions = ((r.update[0], r.update[1], float(r.num_samples)) for r in replies)
        averages, holders = holders_average(contributions, self.setup.shapes, state.weights,
                                            after_refusals(self.robust, len(refused)))
        mask = prune_to_counts(averages, holders, self.counts)
        uploaded = {r.client_id: r.update[2] for r in replies if r.update[2] is not None}
        held = self.holders_after(state, replies, sampled, uploaded)
        return self.with_new_mask(state, round, mask, averages, held), {}

    # ---- client -----------------------------------------------------------------------------
    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        mask, layout, digest, state = self.receive(ctx, received, state)
        result = local_train(ctx.model, ctx.data, ctx.settings, ctx.lr, ctx.generator, mask)
        fraction = self.readjust_fraction(ctx.round)
        if fraction <= 0:
            return ClientOutput(self.values_reply(ctx.model, layout, digest, ctx.round), state,
                                result)
        prunable = self.setup.prunable
        grads = minibatch_gradient(ctx.model, ctx.data, ctx.settings, ctx.generator, prunable)
        new_mask, grown = drop_and_regrow(cpu_weights(ctx.model, prunable), mask, grads,
                                          fraction)
        apply_regrowth_(ctx.model, new_mask, grown)
        bitmap = self.codec.encode(new_mask, ctx.round)
        new_digest = self.codec.digest(new_mask)
        values = self.values_reply(ctx.model, self.codec.layout(new_mask, new_digest),
                                   new_digest, ctx.round)
        return ClientOutput(bitmap + values, bitmap, result)
