"""Dynamic-sparsity baselines: FedDST and PruneFL, behind the ``TrainingStrategy`` interface.

Both keep a global mask of a fixed density that changes during training, so unlike the static
strategies they must also move masks: a client receives the global mask bitmap (a MASK payload
before its VALUES payload, see ``payload_parts``) the first time it takes part and whenever the
global mask has changed since the mask it holds; a FedDST client that changed its own mask sends
its new bitmap with its values. Every such bitmap is a real payload and so is counted.

The mask rules are small pure functions (``cosine_fraction``, ``magnitude_mask``,
``drop_and_regrow``, ``average_over_holders``, ``prune_to_counts``) so that tests can check them
on hand-sized tensors; the strategies only move bytes around them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ssfl.checkpoint import prefixed, unprefixed
from ssfl.client import (
    LocalData,
    TrainResult,
    TrainSettings,
    iterate_batches,
    local_train,
    model_device,
)
from ssfl.comm import (
    ParameterLayout,
    PayloadError,
    PayloadKind,
    decode_bits,
    decode_values,
    encode_bits,
    encode_values,
    read_header,
)
from ssfl.masks import (
    Mask,
    WeightedMean,
    bits_to_mask,
    erk_densities,
    flatten,
    full_mask,
    global_topk_mask,
    layer_counts,
    mask_digest,
    mask_to_bits,
    topk_count,
    unflatten,
)
from ssfl.server import Rejection, RoundFailed, RoundUpdate, screen_replies
from ssfl.strategies import DenseGlobalModel, Reply, TrainingStrategy, payload_parts

# ---------------------------------------------------------------------------- mask rules


def cosine_fraction(alpha: float, round: int, end: int) -> float:
    """FedDST's readjustment fraction ``alpha/2 * (1 + cos(pi * round / end))``; 0 from ``end``
    on (the cosine reaches 0 there)."""
    if end <= 0 or round >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * round / end))


def erk_counts(shapes: Mapping[str, torch.Size], density: float) -> dict[str, int]:
    """Per-layer kept counts with ERK densities, adding up to exactly round(density * total)."""
    total = topk_count(density, sum(math.prod(s) for s in shapes.values()))
    return layer_counts(erk_densities(shapes, density), shapes, total)


def _top(primary: torch.Tensor, k: int, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Flat bool tensor marking the k largest entries of ``primary``; ties by the larger
    ``secondary``, then by the earlier position (two stable sorts)."""
    primary = primary.reshape(-1)
    order = torch.arange(primary.numel())
    if secondary is not None:
        order = torch.sort(secondary.reshape(-1), descending=True, stable=True).indices
    order = order[torch.sort(primary[order], descending=True, stable=True).indices]
    keep = torch.zeros(primary.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def magnitude_mask(weights: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> Mask:
    """Keep the ``counts[layer]`` largest-magnitude weights of each layer (ties: earlier first)."""
    return {n: _top(w.detach().abs().to(torch.float64), counts[n]).reshape(w.shape)
            for n, w in weights.items()}


def drop_and_regrow(
    weights: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    fraction: float,
    *,
    ceil: bool = False,
) -> tuple[Mask, dict[str, torch.Tensor]]:
    """FedDST's client-side mask readjustment, layer by layer.

    Drop ``k = floor(fraction * active + 1/2)`` (with ``ceil``: ``ceil(fraction * active)``, as
    DisPFL's ``fire_mask``) active weights of smallest magnitude and grow
    the ``k`` weights that were inactive *before* the drop with the largest gradient magnitude
    (``k`` is capped at the number of inactive weights, so a fully dense layer is left alone).
    Ties go to the earlier position. Returns the new mask (same count in every layer) and, per
    layer, the flat indices that were grown: their weights must start at exactly zero.
    """
    new_mask, grown = {}, {}
    for name, keep in mask.items():
        flat = keep.reshape(-1)
        active = int(flat.sum())
        wanted = math.ceil(fraction * active) if ceil else math.floor(fraction * active + 0.5)
        k = min(wanted, flat.numel() - active)
        if k <= 0:
            new_mask[name] = keep.clone()
            grown[name] = torch.zeros(0, dtype=torch.long)
            continue
        magnitude = weights[name].detach().reshape(-1).abs().to(torch.float64)
        drop_key = torch.where(flat, magnitude, torch.full_like(magnitude, math.inf))
        drop = torch.sort(drop_key, stable=True).indices[:k]
        gradient = grads[name].detach().reshape(-1).abs().to(torch.float64)
        grow_key = torch.where(flat, torch.full_like(gradient, -math.inf), gradient)
        grow = torch.sort(grow_key, descending=True, stable=True).indices[:k]
        out = flat.clone()
        out[drop] = False
        out[grow] = True
        new_mask[name] = out.reshape(keep.shape)
        grown[name] = grow
    return new_mask, grown


def average_over_holders(
    contributions: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float]],
    shapes: Mapping[str, torch.Size],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Average each weight over the contributions whose mask holds it.

    ``contributions`` yields ``(dense tensors, mask, sample weight)``; parameters without a mask
    entry (biases, norms) are held by everyone. Returns the averages (0 where nobody holds the
    weight) and, per masked parameter, the summed sample weight of its holders.
    """
    sums = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    held: dict[str, torch.Tensor] = {}
    total = 0.0
    for dense, mask, weight in contributions:
        total += weight
        for n in shapes:
            sums[n] += dense[n].to(torch.float64) * weight
            if n in mask:
                held.setdefault(n, torch.zeros(shapes[n], dtype=torch.float64))
                held[n] += mask[n].to(torch.float64) * weight
    if total <= 0:  # nothing held anywhere: the caller decides (a failed round)
        return {n: torch.zeros(s) for n, s in shapes.items()}, {}
    averages = {}
    for n in shapes:
        if n in held:
            averages[n] = torch.where(held[n] > 0, sums[n] / held[n].clamp(min=1e-300),
                                      torch.zeros_like(sums[n])).to(torch.float32)
        else:
            averages[n] = (sums[n] / total).to(torch.float32)
    return averages, held


def prune_to_counts(
    values: Mapping[str, torch.Tensor],
    holders: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
) -> Mask:
    """The server's re-pruning: per layer keep the ``counts[layer]`` held weights (holder weight
    > 0) of largest magnitude; ties by the larger holder weight, then the earlier position."""
    mask = {}
    for n, k in counts.items():
        held = holders[n] > 0
        if int(held.sum()) < k:
            raise PayloadError(f"{n}: only {int(held.sum())} weights held, need {k}")
        key = torch.where(held, values[n].abs().to(torch.float64),
                          torch.full(held.shape, -math.inf, dtype=torch.float64))
        mask[n] = _top(key, k, holders[n]).reshape(held.shape)
    return mask


def minibatch_gradient(
    model: nn.Module,
    data: LocalData,
    settings: TrainSettings,
    generator: torch.Generator,
    names: list[str],
) -> dict[str, torch.Tensor]:
    """Dense gradient of the loss on one minibatch of the client's data (``.grad`` untouched),
    as CPU tensors."""
    inputs, targets = next(iterate_batches(data, settings.batch_size, generator,
                                           augment=settings.augment, device=model_device(model)))
    params = dict(model.named_parameters())
    model.train()
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: g.detach().cpu() for n, g in zip(names, grads)}


def cpu_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named weights of ``model`` as CPU tensors (the very tensors when it is on the CPU)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu() for n in names}


@torch.no_grad()
def apply_regrowth_(model: nn.Module, new_mask: Mask, grown: Mapping[str, torch.Tensor]) -> None:
    """After a drop-and-regrow: regrown weights start at exactly zero, dropped weights leave."""
    params = dict(model.named_parameters())
    for n, keep in new_mask.items():
        params[n].view(-1)[grown[n].to(params[n].device)] = 0.0
        params[n].masked_fill_(~keep.to(params[n].device), 0.0)


def train_with_importance(
    model: nn.Module,
    data: LocalData,
    settings: TrainSettings,
    lr: float,
    generator: torch.Generator,
    mask: Mapping[str, torch.Tensor],
    names: list[str],
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """``local_train`` that also returns PruneFL's importance: the squared dense gradient of
    every weight in ``names`` (masked-out ones included), averaged over the local iterations.

    Gradient hooks see each minibatch's gradient before ``local_train`` masks it, so this costs
    no extra backward pass.
    """
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}

    def hook(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            sums[name].add_(grad.detach().to(torch.float64).square())
        return accumulate

    handles = [params[n].register_hook(hook(n)) for n in names]
    try:
        result = local_train(model, data, settings, lr, generator, mask)
    finally:
        for h in handles:
            h.remove()
    steps = max(result.steps, 1)
    return {n: (s / steps).to(device="cpu", dtype=torch.float32) for n, s in sums.items()}, result


# ---------------------------------------------------------------------------- strategies


class DynamicMaskStrategy(DenseGlobalModel, TrainingStrategy):
    """Shared state of the dynamic-mask strategies: a dense global model, the global mask, and
    which mask each client holds (server side: its digest; client side: its bitmap).

    A client is sent the global bitmap ahead of the values whenever the mask it holds is not
    the global one (first participation, or the global mask changed), so mask changes are paid
    for when they reach a client. Nothing is paid before round 1 for the mask.
    """

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: list[str],
        mask: Mask,
        *,
        value_dtype: str = "float32",
    ) -> None:
        self.shapes = {n: t.shape for n, t in initial.items()}
        self.prunable = list(prunable)
        self.prunable_shapes = {n: self.shapes[n] for n in self.prunable}
        self.prunable_count = sum(math.prod(s) for s in self.prunable_shapes.values())
        self.value_dtype = value_dtype
        self.weights = {n: t.detach().clone().to(torch.float32) for n, t in initial.items()}
        self.setup_bytes: dict[str, int] = {}
        #: rounds after which the global mask differed from the one before
        self.mask_changes: list[int] = []
        self._client_digest: dict[int, bytes] = {}  # server's record: mask each client holds
        self._client_bits: dict[int, bytes] = {}  # client state: the bitmap it holds
        self._decoded: dict[bytes, tuple[Mask, ParameterLayout]] = {}
        self._cached: tuple[int, bytes] | None = None
        self._set_mask(mask)

    # -- global state ---------------------------------------------------------------------
    def _set_mask(self, mask: Mask) -> None:
        self.mask = {n: mask[n].clone() for n in self.prunable}
        self.digest = mask_digest(self.mask, self.prunable)
        self.layout = ParameterLayout(self.shapes, self.mask)
        for n in self.prunable:  # the global model lives inside the mask
            self.weights[n] = torch.where(self.mask[n], self.weights[n],
                                          torch.zeros_like(self.weights[n]))
        self._decoded = {self.digest: (self.mask, self.layout)}
        self._cached = None

    def mask_payload(self, mask: Mask, round: int = 0) -> bytes:
        return encode_bits(mask_to_bits(mask, self.prunable), self.prunable_count, round=round,
                           digest=mask_digest(mask, self.prunable))

    def _decode_mask(self, part: bytes) -> tuple[Mask, bytes]:
        bits = decode_bits(part, expected_count=self.prunable_count)
        mask = bits_to_mask(bits, self.prunable_shapes, self.prunable)
        digest = mask_digest(mask, self.prunable)
        if read_header(part).digest != digest:
            raise PayloadError("mask payload's digest does not match its bitmap")
        return mask, digest

    def _mask_and_layout(self, bits: bytes) -> tuple[Mask, ParameterLayout, bytes]:
        mask = bits_to_mask(bits, self.prunable_shapes, self.prunable)
        digest = mask_digest(mask, self.prunable)
        if digest not in self._decoded:  # a cache of decoded masks, not extra state
            self._decoded[digest] = (mask, ParameterLayout(self.shapes, mask))
        mask, layout = self._decoded[digest]
        return mask, layout, digest

    # -- server -> client -----------------------------------------------------------------
    def payload_for(self, client_id: int, round: int) -> bytes:
        if self._cached is None or self._cached[0] != round:
            values = encode_values(self.layout.gather(self.weights), round=round,
                                   digest=self.digest, dtype=self.value_dtype)
            self._cached = (round, values)
        if self._client_digest.get(client_id) != self.digest:
            self._client_digest[client_id] = self.digest
            return self.mask_payload(self.mask, round) + self._cached[1]
        return self._cached[1]

    def receive(
        self, model: nn.Module, client_id: int, payload: bytes, round: int
    ) -> tuple[Mask, ParameterLayout, bytes]:
        """Client side: take a new mask if one came, load the values into ``model``."""
        parts = payload_parts(payload)
        if len(parts) == 2:
            self._client_bits[client_id] = decode_bits(parts[0],
                                                       expected_count=self.prunable_count)
            self._decode_mask(parts[0])  # checks the digest
        elif len(parts) != 1:
            raise PayloadError(f"expected 1 or 2 payloads, got {len(parts)}")
        if client_id not in self._client_bits:
            raise PayloadError(f"client {client_id} holds no mask and none was sent")
        mask, layout, digest = self._mask_and_layout(self._client_bits[client_id])
        values = decode_values(parts[-1], expected_count=layout.num_values,
                               expected_digest=digest, expected_round=round)
        layout.scatter_model_(values, model)
        return mask, layout, digest

    def values_reply(self, model: nn.Module, layout: ParameterLayout, digest: bytes,
                     round: int) -> bytes:
        return encode_values(layout.gather_model(model), round=round, digest=digest,
                             dtype=self.value_dtype)

    # -- evaluation and checks ------------------------------------------------------------
    def global_mask(self) -> Mask:
        return self.mask

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"mask_changes": self.mask_changes,
                "client_digest": {str(c): d.hex() for c, d in self._client_digest.items()}}
        bits = {str(c): torch.frombuffer(bytearray(b), dtype=torch.uint8)
                for c, b in self._client_bits.items()}
        return meta, {**prefixed("weights", self.weights), **prefixed("mask", self.mask),
                      **prefixed("client_bits", bits)}

    def load_state_dict(self, meta: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
        self._set_mask(unprefixed("mask", dict(tensors)))
        self._restore_weights(tensors)
        self.mask_changes = [int(r) for r in meta["mask_changes"]]
        self._client_digest = {int(c): bytes.fromhex(d)
                               for c, d in meta["client_digest"].items()}
        self._client_bits = {int(c): bytes(t.numpy().tobytes())
                             for c, t in unprefixed("client_bits", dict(tensors)).items()}

    def _finish(self, round: int, mask: Mask, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        old = self.digest
        self._set_mask(mask)
        if self.digest != old:
            self.mask_changes.append(round)


class FedDSTStrategy(DynamicMaskStrategy):
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
      (the authors' ``topk`` breaks ties arbitrarily).
    - Non-update rounds are sparse FedAvg inside the global mask.
    """

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: list[str],
        density: float,
        *,
        prune_fraction: float,
        update_interval: int,
        update_until: int,
        value_dtype: str = "float32",
    ) -> None:
        shapes = {n: initial[n].shape for n in prunable}
        self.density = density
        self.counts = erk_counts(shapes, density)
        self.prune_fraction = prune_fraction
        self.update_interval = update_interval
        self.update_until = update_until
        mask = magnitude_mask({n: initial[n] for n in prunable}, self.counts)
        super().__init__(initial, prunable, mask, value_dtype=value_dtype)

    def readjust_fraction(self, round: int) -> float:
        """alpha_r in an update round, else 0 (clients and server both derive it)."""
        if round % self.update_interval != 0:
            return 0.0
        return cosine_fraction(self.prune_fraction, round, self.update_until)

    def client_update(self, model, payload, data, settings, *, client_id, round, lr, generator):
        mask, layout, digest = self.receive(model, client_id, payload, round)
        result = local_train(model, data, settings, lr, generator, mask)
        fraction = self.readjust_fraction(round)
        if fraction <= 0:
            return self.values_reply(model, layout, digest, round), result
        grads = minibatch_gradient(model, data, settings, generator, self.prunable)
        new_mask, grown = drop_and_regrow(cpu_weights(model, self.prunable), mask, grads,
                                          fraction)
        apply_regrowth_(model, new_mask, grown)
        self._client_bits[client_id] = mask_to_bits(new_mask, self.prunable)
        _, new_layout, new_digest = self._mask_and_layout(self._client_bits[client_id])
        reply = self.mask_payload(new_mask, round) + self.values_reply(model, new_layout,
                                                                         new_digest, round)
        return reply, result

    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate:
        counter = {"clients": 0, "samples": 0, "bytes": 0}
        rejected: list[Rejection] = []

        def check(client_id: int, payload: bytes, num_samples: int):
            parts = payload_parts(payload)
            if len(parts) == 2:
                mask, digest = self._decode_mask(parts[0])
                bad = {n: int(mask[n].sum()) for n in self.prunable
                       if int(mask[n].sum()) != self.counts[n]}
                if bad:
                    raise PayloadError(f"client {client_id}'s mask has wrong layer counts "
                                       f"{bad}")
                layout = ParameterLayout(self.shapes, mask)
            elif len(parts) == 1:
                mask, digest, layout = self.mask, self.digest, self.layout
            else:
                raise PayloadError(f"expected 1 or 2 payloads, got {len(parts)}")
            values = decode_values(parts[-1], expected_count=layout.num_values,
                                   expected_digest=digest, expected_round=round,
                                   expected_dtype=self.value_dtype, require_finite=True)
            return layout.dense_tensors(values), mask, digest, len(parts), len(payload)

        def contributions():
            for client_id, checked, num_samples in screen_replies(round, replies, check,
                                                                  rejected):
                dense, mask, digest, parts, size = checked
                if parts == 2:  # the server now knows which mask this client holds
                    self._client_digest[client_id] = digest
                counter["clients"] += 1
                counter["samples"] += num_samples
                counter["bytes"] += size
                yield dense, mask, float(num_samples)

        averages, holders = average_over_holders(contributions(), self.shapes)
        if counter["clients"] == 0:
            raise RoundFailed(round, 0, 1, rejected)
        mask = prune_to_counts(averages, holders, self.counts)
        self._finish(round, mask, averages)
        return RoundUpdate(num_clients=counter["clients"], num_samples=counter["samples"],
                           bytes_up=counter["bytes"], rejected=tuple(rejected))


class PruneFLStrategy(DynamicMaskStrategy):
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
    """

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: list[str],
        density: float,
        *,
        model: nn.Module,
        initial_client: LocalData,
        settings: TrainSettings,
        lr: float,
        generator: torch.Generator,
        initial_rounds: int,
        update_interval: int,
        update_until: int,
        value_dtype: str = "float32",
    ) -> None:
        self.density = density
        self.update_interval = update_interval
        self.update_until = update_until
        shapes = {n: initial[n].shape for n in prunable}
        mask = full_mask(shapes)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(initial[n])
        self.initial_masks: list[Mask] = []
        for _ in range(initial_rounds):
            importance, _ = train_with_importance(model, initial_client, settings, lr, generator,
                                                  mask, prunable)
            mask = global_topk_mask(importance, density)
            with torch.no_grad():
                for n in prunable:
                    params[n].masked_fill_(~mask[n].to(params[n].device), 0.0)
            self.initial_masks.append(mask)
        pruned = {n: p.detach().cpu().clone() for n, p in params.items()}
        super().__init__(pruned, prunable, mask, value_dtype=value_dtype)
        upload = self.mask_payload(self.mask) + encode_values(
            self.layout.gather(self.weights), digest=self.digest, dtype=value_dtype)
        self.setup_bytes = {"initial_pruning_upload": len(upload)}

    def is_update_round(self, round: int) -> bool:
        return round % self.update_interval == 0 and round <= self.update_until

    def client_update(self, model, payload, data, settings, *, client_id, round, lr, generator):
        mask, layout, digest = self.receive(model, client_id, payload, round)
        if not self.is_update_round(round):
            result = local_train(model, data, settings, lr, generator, mask)
            return self.values_reply(model, layout, digest, round), result
        importance, result = train_with_importance(model, data, settings, lr, generator, mask,
                                                   self.prunable)
        scores = encode_values(flatten(importance, self.prunable), kind=PayloadKind.SCORES,
                               round=round, digest=digest, dtype="float32")
        return self.values_reply(model, layout, digest, round) + scores, result

    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate:
        update = self.is_update_round(round)
        values, importance = WeightedMean(), WeightedMean()
        samples = nbytes = 0
        rejected: list[Rejection] = []

        def check(client_id: int, payload: bytes, num_samples: int):
            parts = payload_parts(payload)
            if len(parts) != (2 if update else 1):
                raise PayloadError(f"round {round}: expected {2 if update else 1} payloads, "
                                   f"got {len(parts)}")
            vals = decode_values(parts[0], expected_count=self.layout.num_values,
                                 expected_digest=self.digest, expected_round=round,
                                 expected_dtype=self.value_dtype, require_finite=True)
            imp = None
            if update:
                imp = decode_values(parts[1], expected_kind=PayloadKind.SCORES,
                                    expected_count=self.prunable_count,
                                    expected_digest=self.digest, expected_round=round,
                                    require_finite=True)
            return vals, imp, len(payload)

        for _, checked, num_samples in screen_replies(round, replies, check, rejected):
            vals, imp, size = checked
            values.add(vals, float(num_samples))
            if imp is not None:
                importance.add(imp, float(num_samples))
            samples += num_samples
            nbytes += size
        if values.count == 0:
            raise RoundFailed(round, 0, 1, rejected)
        weights = self.layout.dense_tensors(values.result())
        mask = self.mask
        if update:
            mask = global_topk_mask(unflatten(importance.result(), self.prunable_shapes,
                                              self.prunable), self.density)
        self._finish(round, mask, weights)
        return RoundUpdate(num_clients=values.count, num_samples=samples, bytes_up=nbytes,
                           rejected=tuple(rejected))
