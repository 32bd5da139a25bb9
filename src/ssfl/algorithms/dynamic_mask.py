"""The shared frame of FedDST and PruneFL: a global mask of fixed density that changes during
training, over a dense global model (zero outside the mask).

Unlike a fixed mask, a changing one must travel: a client receives the global mask bitmap (a
MASK payload before its VALUES payload, see ``ssfl.comm.payload_parts``) whenever the server
does not know it to hold that mask (its first round, a changed global mask, a retry, or after a
failed or rejected reply); the client keeps the last bitmap it got or made as its state. Every
such bitmap is a real payload and so is counted. Nothing is paid before round 1 for the mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ssfl.algorithms.base import Algorithm, Ask, ClientContext, Reply, Setup
from ssfl.algorithms.common import MaskCodec, dense_copy, flat_weights, shapes_match
from ssfl.comm import ParameterLayout, PayloadError, decode_values, encode_values, payload_parts
from ssfl.masks import Mask


@dataclass(frozen=True)
class DynamicMaskState:
    """Dense global model inside ``mask``; which mask each client holds, as far as the server
    knows (client id -> digest); the rounds after which the global mask changed."""

    weights: dict[str, torch.Tensor]
    mask: Mask
    held: dict[int, bytes] = field(default_factory=dict)
    mask_changes: tuple[int, ...] = ()


class DynamicGlobalMask(Algorithm[DynamicMaskState]):
    """Server and client plumbing for a changing global mask; subclasses decide the mask."""

    def __init__(self, setup: Setup, settings: Any) -> None:
        super().__init__(setup, settings)
        self.codec = MaskCodec(setup.shapes, setup.prunable)

    @classmethod
    def rounds_dependence(cls, config: Any, settings: Any) -> str | None:
        # Both methods update the mask while round <= update_until, 0 meaning half the run.
        if settings.update_until:
            return None
        return ("its mask updates run until half of run.rounds "
                f"(algorithm.{cls.name}.update_until = 0; set it to a round number to fix it)")

    # ---- server -----------------------------------------------------------------------------
    def state_with(self, weights: Mapping[str, torch.Tensor], mask: Mask,
                   held: Mapping[int, bytes] | None = None,
                   changes: tuple[int, ...] = ()) -> DynamicMaskState:
        """A state whose weights are zero outside ``mask`` (the model lives in the mask)."""
        inside = {n: torch.where(mask[n], w, torch.zeros_like(w)) if n in mask else w
                  for n, w in weights.items()}
        return DynamicMaskState(inside, {n: mask[n].clone() for n in self.setup.prunable},
                                dict(held or {}), changes)

    def with_new_mask(self, state: DynamicMaskState, round: int, mask: Mask,
                      weights: Mapping[str, torch.Tensor],
                      held: Mapping[int, bytes]) -> DynamicMaskState:
        changed = self.codec.digest(mask) != self.codec.digest(state.mask)
        return self.state_with(weights, mask, held,
                               state.mask_changes + ((round,) if changed else ()))

    def resync(self, state: DynamicMaskState, ask: Ask) -> DynamicMaskState:
        return replace(state, held={})  # clients lost their masks: send them again

    def configure(self, state: DynamicMaskState, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        digest = self.codec.digest(state.mask)
        values = encode_values(self.codec.layout(state.mask, digest).gather(state.weights),
                               round=round, digest=digest, dtype=self.setup.value_dtype)
        bitmap = self.codec.encode(state.mask, round)
        # A retry cannot know what a client kept from the failed attempt: send the mask again.
        return {c: values if attempt == 1 and state.held.get(c) == digest else bitmap + values
                for c in clients}

    def holders_after(self, state: DynamicMaskState, replies: Sequence[Reply],
                      sampled: Sequence[int], uploaded: Mapping[int, bytes]) -> dict[int, bytes]:
        """What each client holds after the round: the global mask it was sent, or the mask it
        uploaded; a sampled client whose reply failed or was rejected is unknown."""
        held = {c: d for c, d in state.held.items() if c not in set(sampled)}
        digest = self.codec.digest(state.mask)
        for r in replies:
            held[r.client_id] = uploaded.get(r.client_id, digest)
        return held

    def eval_weights(self, state: DynamicMaskState,
                     client: int | None = None) -> dict[str, torch.Tensor]:
        return state.weights

    def global_mask(self, state: DynamicMaskState) -> Mask:
        return state.mask

    def final_values(self, state: DynamicMaskState) -> torch.Tensor:
        return flat_weights(state.weights, list(self.setup.shapes))

    def state_dict(self, state: DynamicMaskState
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"mask_changes": list(state.mask_changes),
                "held": {str(c): d.hex() for c, d in state.held.items()}}
        return meta, {**{f"weights.{n}": w for n, w in state.weights.items()},
                      **{f"mask.{n}": m for n, m in state.mask.items()}}

    def load_state(self, meta: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> DynamicMaskState:
        weights = {n: tensors[f"weights.{n}"].clone() for n in self.setup.shapes
                   if f"weights.{n}" in tensors}
        mask = {n: tensors[f"mask.{n}"] for n in self.setup.prunable if f"mask.{n}" in tensors}
        if not shapes_match(weights, self.setup.shapes) or not shapes_match(
                mask, self.setup.prunable_shapes):
            raise ValueError("the checkpoint's weights or mask do not fit this model")
        return self.state_with(weights, mask,
                               {int(c): bytes.fromhex(d) for c, d in meta["held"].items()},
                               tuple(int(r) for r in meta["mask_changes"]))

    # ---- client -----------------------------------------------------------------------------
    def receive(self, ctx: ClientContext, received: bytes, state: bytes | None
                ) -> tuple[Mask, ParameterLayout, bytes, bytes]:
        """Take a new mask if one came, load the values into the model; returns the mask, its
        layout and digest and the client's state (the MASK payload it holds)."""
        parts = payload_parts(received)
        if len(parts) == 2:
            state = parts[0]
        elif len(parts) != 1:
            raise PayloadError(f"expected 1 or 2 payloads, got {len(parts)}")
        if state is None:
            raise PayloadError(f"client {ctx.client_id} holds no mask and none was sent")
        mask, digest = self.codec.decode(state)
        layout = self.codec.layout(mask, digest)
        values = decode_values(parts[-1], expected_count=layout.num_values,
                               expected_digest=digest, expected_round=ctx.round)
        layout.scatter_model_(values, ctx.model)
        return mask, layout, digest, state

    def values_reply(self, model: nn.Module, layout: ParameterLayout, digest: bytes,
                     round: int) -> bytes:
        return encode_values(layout.gather_model(model), round=round, digest=digest,
                             dtype=self.setup.value_dtype)


def initial_state(algorithm: DynamicGlobalMask, mask: Mask) -> DynamicMaskState:
    """The seeded initial weights inside ``mask``."""
    return algorithm.state_with(dense_copy(algorithm.setup.initial), mask)
