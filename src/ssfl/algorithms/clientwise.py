"""Per-client random masks (the "random clientwise" ablation of the SSFL paper): each client
trains in its own random global mask of the target density, fixed for the run.

The server keeps a dense global model. A client receives, once before round 1, its own mask as
a bitmap (kept as its state), then each round the values inside it; it returns the values
inside it. The server averages each weight over the round's clients whose mask holds it,
weighted by sample count (``average_over_holders``), and leaves weights that no such client
holds unchanged. ``federation.aggregator`` and the clipping settings replace that mean by a
robust rule over each weight's holders (``ssfl.algorithms.robust.combine_over_holders``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssfl.algorithms.base import Algorithm, Ask, ClientContext, ClientOutput, Reply, Setup
from ssfl.algorithms.common import (
    MaskCodec,
    dense_copy,
    flat_weights,
    shapes_match,
)
from ssfl.algorithms.robust import after_refusals, holders_average
from ssfl.client import train_round
from ssfl.comm import decode_values, encode_values
from ssfl.masks import Mask, random_global_mask


def client_random_mask(shapes: Mapping[str, torch.Size], density: float, seed: int,
                       client_id: int) -> Mask:
    """Client ``client_id``'s random global mask, derived from (seed, client)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + client_id) % 2**63)
    return random_global_mask(shapes, density, generator)


@dataclass(frozen=True)
class DenseModelState:
    """A dense global model (zero where no weight is active)."""

    weights: dict[str, torch.Tensor]


class ClientwiseRandomMasks(Algorithm[DenseModelState]):
    per_client_masks = True
    robust_aggregation = True

    def __init__(self, setup: Setup, settings: Any) -> None:
        super().__init__(setup, settings)
        self.codec = MaskCodec(setup.shapes, setup.prunable)
        self.robust = setup.config.federation  # clipping and the aggregation rule
        self._union: Mask | None = None

    def mask_of(self, client_id: int) -> Mask:
        return client_random_mask(self.setup.prunable_shapes, self.setup.density,
                                  self.setup.seed, client_id)

    # ---- server -----------------------------------------------------------------------------
    def init(self) -> DenseModelState:
        return DenseModelState(dense_copy(self.setup.initial))

    def run_setup(self, state: DenseModelState, ask: Ask) -> DenseModelState:
        self.send_masks(ask, "mask_broadcast")
        return state

    def resync(self, state: DenseModelState, ask: Ask) -> DenseModelState:
        self.send_masks(ask, "resync_mask")
        return state

    def send_masks(self, ask: Ask, label: str) -> None:
        ask.deliver("mask", {c: self.codec.encode(self.mask_of(c))
                             for c in range(self.setup.num_clients)}, label=label)

    def configure(self, state: DenseModelState, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        out = {}
        for c in clients:
            mask = self.mask_of(c)
            out[c] = encode_values(self.codec.layout(mask).gather(state.weights), round=round,
                                   digest=self.codec.digest(mask), dtype=self.setup.value_dtype)
        return out

    def check(self, state: DenseModelState, round: int, client_id: int,
              payload: bytes) -> tuple[dict[str, torch.Tensor], Mask]:
        mask = self.mask_of(client_id)
        digest = self.codec.digest(mask)
        layout = self.codec.layout(mask, digest)
        values = decode_values(payload, expected_count=layout.num_values, expected_digest=digest,
                               expected_round=round, expected_dtype=self.setup.value_dtype,
                               require_finite=True)
        return layout.dense_tensors(values), mask

    def aggregate(self, state: DenseModelState, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[DenseModelState, dict[str, Any]]:
        contributions = ((r.update[0], r.update[1], float(r.num_samples)) for r in replies)
        averages, held = holders_average(contributions, self.setup.shapes, state.weights,
                                         after_refusals(self.robust, len(refused)))
        weights = {n: torch.where(held[n] > 0, averages[n], w) if n in held else averages[n]
                   for n, w in state.weights.items()}
        return DenseModelState(weights), {}

    def eval_weights(self, state: DenseModelState,
                     client: int | None = None) -> dict[str, torch.Tensor]:
        return state.weights

    def global_mask(self, state: DenseModelState) -> Mask:
        if self._union is None:  # the union of every client's mask (derived, not state)
            union = {n: torch.zeros(s, dtype=torch.bool)
                     for n, s in self.setup.prunable_shapes.items()}
            for c in range(self.setup.num_clients):
                for n, m in self.mask_of(c).items():
                    union[n] |= m
            self._union = union
        return self._union

    def client_mask(self, state: DenseModelState, client: int) -> Mask:
        return self.mask_of(client)

    def final_values(self, state: DenseModelState) -> torch.Tensor:
        return flat_weights(state.weights, list(self.setup.shapes))

    def state_dict(self, state: DenseModelState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {f"weights.{n}": w for n, w in state.weights.items()}

    def load_state(self, meta: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> DenseModelState:
        weights = {n: tensors[f"weights.{n}"].clone() for n in self.setup.shapes
                   if f"weights.{n}" in tensors}
        if not shapes_match(weights, self.setup.shapes):
            raise ValueError("the checkpoint's weights do not fit this model")
        return DenseModelState(weights)

    # ---- client -----------------------------------------------------------------------------
    def client_setup(self, kind: str, ctx: ClientContext, received: bytes,
                     state: bytes | None) -> ClientOutput:
        if kind == "mask":  # its own mask, kept for the run
            self.codec.decode(received)
            return ClientOutput(b"", received)
        return super().client_setup(kind, ctx, received, state)

    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        if state is None:
            raise ValueError("this client holds no mask: the mask message never reached it")
        mask, digest = self.codec.decode(state)
        reply, result = train_round(ctx.model, self.codec.layout(mask, digest), mask, digest,
                                    received, ctx.data, ctx.settings, round=ctx.round, lr=ctx.lr,
                                    generator=ctx.generator, value_dtype=self.setup.value_dtype,
                                    timings=ctx.timings)
        return ClientOutput(reply, state, result)
