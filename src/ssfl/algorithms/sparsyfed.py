"""SparsyFed (Guastella, Sani et al., ICLR 2025, arXiv 2504.05153).

Read top to bottom: the rules as small pure functions that tests check on hand-sized tensors
(``powerprop_forward``, ``to_powerprop``, ``topk_magnitude_mask``, ``choose_form``), then the
method (``SparsyFed``), which only moves bytes around them.

After the paper and the authors' code (``AGuastella/sparsyfed``; we read the modules
``sparsyfed_modules.py``/``sparsyfed_no_act_modules.py``, the CIFAR ``train_test.py``/
``models.py`` and the Flower strategies, and copied none of it):

- Powerprop (the method's one hyperparameter, ``[algorithm.sparsyfed] powerprop_beta``; the
  authors' CIFAR setting is 1.25): clients train ``v`` with ``w = sign(v)|v|**beta`` for every
  Conv/Linear weight (the prunable set: first convolution and classifier included, as the
  authors' ``get_parameters_to_prune``); biases and normalisation parameters are plain. The
  seeded initial weights are ``w``; ``v = to_powerprop(w)``, as the authors' ``init_weights``
  maps a standard initialisation. ``torch.nn.utils.parametrize`` does this on the shared model
  during local training only (``powerprop_parametrized``), so ``ssfl.models`` is unchanged.
- Client: load the global model, train densely (the library's local SGD, as every method;
  nothing is masked: with beta > 1 a weight at exactly zero has zero gradient, zero decay and
  zero momentum, so it stays zero), then keep the global top-k weights by magnitude,
  ``k = round(density * prunable)``, over all layers together (``topk_magnitude_mask``, as the
  authors' ``prune.global_unstructured(L1Unstructured)``, with position ties instead of
  arbitrary ones) and upload exactly those.
- Server: FedAvg weighted by sample count, pruned weights counting as zero (the authors' Flower
  ``FedAvg``). The authors average the Powerprop parameter ``v`` (their state dict holds ``v``),
  not ``w``; we follow them: payloads carry ``w`` in both directions (the real weights; each
  side maps with ``to_powerprop``/``powerprop_forward`` in float64), and the server averages
  ``to_powerprop(w_k)`` and maps the mean back. With beta = 1 this is plain FedAvg of ``w``. A
  weight kept by few clients is shrunk harder than a ``w``-mean would (``(v/10)**beta``), which
  is part of how the method pulls clients to one mask. ``federation.aggregator`` and the
  clipping settings replace this mean by a robust rule in the same space (``robust_aggregate``).
- What the server sends: the aggregate itself, whose support is the union of the round's
  client masks (density >= the target), as in the authors' code, where the server does not
  prune. Pruning it to k before sending (our first reading) would freeze the mask after round
  1: clients would get exactly k nonzeros, zeros cannot regrow under Powerprop, and every top-k
  would return the same k. With the union, the support can only shrink (zeros stay zero), and
  clients move their masks inside it -- the method's adaptivity and its small regrowth. The
  download therefore costs more than the target density; it is counted exactly (the loop's
  ``bytes_down``).
- The global model (``eval_weights``, ``global_mask``, ``final_values``): the aggregate pruned
  to the target density by the same top-k (exact density every round), i.e. the model one
  would deploy at density d. The authors evaluate the unpruned aggregate; we do not, so that
  every method's accuracy here is that of a model at the target density.
- Payloads (``form_sizes``/``choose_form``, the same rule both ways): the kept positions as a
  bitmap (1 bit per prunable weight) or as uint32 indices (4 bytes per kept weight), whichever
  is smaller (indices below a density of 1/32), then the kept values and the dense parameters;
  or all values when that is smaller still (near density 1; round 1's download of the dense
  initial model). An upload must hold exactly k positions (at most k nonzeros in the dense
  form); every byte counted is the ``len()`` of a payload.
- Not implemented: activation pruning. The authors' layers prune each layer's input to the
  layer's weight density when computing the weight gradient in the backward pass (the forward
  pass is exact), a compute saving that needs sparse kernels; on dense CPU kernels it would
  only add top-k work per layer and step. Their code also ships this variant without it
  (``SparsyFed_no_act_*`` modules), which is what this is. Also not copied: their local
  optimiser (SGD without momentum, weight decay 1e-3) and learning rate -- all methods here
  share the run's ``train`` settings.
- Clients are stateless (everything comes in the download; their state is ``None``), so the
  server state is the aggregate alone, a checkpoint is that aggregate, and a resumed run is
  bit-identical on every transport.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ssfl.algorithms.base import Algorithm, ClientContext, ClientOutput, Reply, Setup
from ssfl.algorithms.common import (
    MaskCodec,
    dense_copy,
    flat_weights,
    load_weights_,
    shapes_match,
)
from ssfl.algorithms.robust import after_refusals, combine, is_plain_mean
from ssfl.client import cpu_weights, local_train
from ssfl.comm import (
    HEADER,
    VALUE_DTYPES,
    PayloadError,
    PayloadKind,
    decode_indices,
    decode_values,
    encode_indices,
    encode_values,
    payload_parts,
    read_header,
)
from ssfl.config import FederationSection
from ssfl.masks import Mask, full_mask, global_top_k, topk_count, unflatten

# ---------------------------------------------------------------------------- rules


def powerprop_forward(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Powerpropagation: the weight ``w = v * |v|**(beta-1)``, written ``sign(v) * |v|**beta``
    (as the authors' modules do) so that its gradient ``beta * |v|**(beta-1)`` is finite and
    exactly 0 at ``v = 0``: a weight at zero stays at zero under SGD when ``beta > 1``."""
    return torch.sign(v) * v.abs().pow(beta)


def to_powerprop(w: torch.Tensor, beta: float) -> torch.Tensor:
    """The inverse of ``powerprop_forward``: ``v = sign(w) * |w|**(1/beta)``."""
    return torch.sign(w) * w.abs().pow(1.0 / beta)


class Powerprop(nn.Module):
    """``powerprop_forward`` as a ``torch.nn.utils.parametrize`` parametrization; registering
    it turns a module's weight ``w`` into the trained parameter ``v = to_powerprop(w)``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return powerprop_forward(v, self.beta)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return to_powerprop(w, self.beta)


@contextmanager
def powerprop_parametrized(model: nn.Module, names: Sequence[str], beta: float) -> Iterator[None]:
    """Train ``model`` in Powerprop space inside the block: each named weight ``w`` becomes the
    parameter ``v`` (its module computes ``w`` from ``v`` on every forward pass). On leaving,
    also after an error, the weights are plain parameters again, holding ``powerprop_forward(v)``,
    under their usual names. ``beta == 1`` is the identity: nothing is registered."""
    registered: list[tuple[nn.Module, str, list[str]]] = []
    try:
        if beta != 1.0:
            for name in names:
                owner, _, attr = name.rpartition(".")
                module = model.get_submodule(owner)
                order = list(module._parameters)
                parametrize.register_parametrization(module, attr, Powerprop(beta))
                registered.append((module, attr, order))
        yield
    finally:
        for module, attr, order in reversed(registered):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            # Removal re-registers the weight after the bias; restore the original order, so
            # that named_parameters (and every layout built from it) is unchanged.
            params = dict(module._parameters)
            module._parameters.clear()
            module._parameters.update((k, params[k]) for k in order)


def topk_magnitude_mask(weights: Mapping[str, torch.Tensor], k: int) -> Mask:
    """Keep the ``k`` weights of largest magnitude over all tensors together (global, not per
    layer); ties go to the earlier tensor, then the earlier flat position (``global_top_k``: a
    stable sort), so exactly ``k`` are kept and every machine keeps the same ones."""
    return global_top_k({n: w.detach().abs().to(torch.float32) for n, w in weights.items()}, k)


FORMS = ("dense", "bitmap", "indices")


def form_sizes(total: int, kept: int, other: int, itemsize: int) -> dict[str, int]:
    """Exact bytes of the three ways to send a model whose ``total`` prunable weights hold
    ``kept`` nonzeros, plus ``other`` dense values (biases, norms): all values; a bitmap and the
    kept values; uint32 indices and the kept values."""
    return {
        "dense": HEADER.size + itemsize * (total + other),
        "bitmap": HEADER.size + (total + 7) // 8 + HEADER.size + itemsize * (kept + other),
        "indices": HEADER.size + 4 * kept + HEADER.size + itemsize * (kept + other),
    }


def choose_form(total: int, kept: int, other: int, itemsize: int) -> str:
    """The smallest form (``form_sizes``); on a tie the earlier of ``FORMS``. Deterministic, so
    the choice depends only on the counts."""
    sizes = form_sizes(total, kept, other, itemsize)
    return min(FORMS, key=lambda f: (sizes[f], FORMS.index(f)))


# ---------------------------------------------------------------------------- method


@dataclass(frozen=True)
class SparsyFedSettings:
    """``[algorithm.sparsyfed]``."""

    # the Powerprop exponent beta (w = v * |v|**(beta-1)), the method's one hyperparameter
    # (authors' CIFAR setting 1.25); 1 trains plain weights (top-k pruning only)
    powerprop_beta: float = 1.25

    def __post_init__(self) -> None:
        if not (self.powerprop_beta >= 1.0 and math.isfinite(self.powerprop_beta)):
            raise ValueError(f"powerprop_beta must be a finite number >= 1 (SparsyFed's "
                             f"Powerprop exponent; 1: no re-parameterisation), got "
                             f"{self.powerprop_beta}")


@dataclass(frozen=True)
class AggregateState:
    """The server's aggregate in ``w``-space (dense, float32); prunable weights are 0 outside
    its support, the union of the last round's client masks."""

    weights: dict[str, torch.Tensor]


class SparsyFed(Algorithm[AggregateState]):
    """SparsyFed: Powerprop local training, each client uploads its global top-k weights, the
    server averages them in Powerprop space; see the module docstring."""

    Settings = SparsyFedSettings
    robust_aggregation = True

    def __init__(self, setup: Setup, settings: SparsyFedSettings) -> None:
        super().__init__(setup, settings)
        self.beta = settings.powerprop_beta
        self.robust = setup.config.federation  # clipping and the aggregation rule
        self.codec = MaskCodec(setup.shapes, setup.prunable)
        self.total = setup.prunable_count
        self.other = sum(math.prod(s) for n, s in setup.shapes.items()
                         if n not in setup.prunable_shapes)
        self.k = topk_count(setup.density, self.total)
        self.itemsize = VALUE_DTYPES[setup.value_dtype][1].itemsize
        self.dense = full_mask(setup.prunable_shapes)
        self.dense_digest = self.codec.digest(self.dense)
        #: (state, its pruned mask, its pruned weights): a cache of ``pruned``, never state
        self._pruned: tuple[AggregateState, Mask, dict[str, torch.Tensor]] | None = None

    # ---- payloads (both directions) ---------------------------------------------------------
    def encode(self, tensors: Mapping[str, torch.Tensor], support: Mask, round: int) -> bytes:
        """``tensors`` with prunable weights only on ``support``, in the smallest form."""
        kept = sum(int(m.sum()) for m in support.values())
        form = choose_form(self.total, kept, self.other, self.itemsize)
        if form == "dense":
            return encode_values(self.codec.layout(self.dense, self.dense_digest).gather(tensors),
                                 round=round, digest=self.dense_digest,
                                 dtype=self.setup.value_dtype)
        digest = self.codec.digest(support)
        if form == "bitmap":
            positions = self.codec.encode(support, round)
        else:
            flat = torch.cat([support[n].reshape(-1) for n in self.setup.prunable])
            positions = encode_indices(flat.nonzero().squeeze(1), round=round, digest=digest)
        values = self.codec.layout(support, digest).gather(tensors)
        return positions + encode_values(values, round=round, digest=digest,
                                         dtype=self.setup.value_dtype)

    def decode(self, payload: bytes, round: int, *, kept: int | None = None,
               require_finite: bool = False) -> tuple[dict[str, torch.Tensor], Mask]:
        """Dense tensors and the support of a payload made by ``encode``; with ``kept``, the
        support must hold exactly that many positions (at most that many nonzeros when the
        payload is dense). Raises ``PayloadError`` for anything malformed."""
        parts = payload_parts(payload)
        if len(parts) == 1:
            support, digest = self.dense, self.dense_digest
        elif len(parts) == 2:
            support, digest = self.decode_positions(parts[0], round, kept)
        else:
            raise PayloadError(f"expected 1 or 2 payloads, got {len(parts)}")
        layout = self.codec.layout(support, digest)
        values = decode_values(parts[-1], expected_count=layout.num_values,
                               expected_digest=digest, expected_round=round,
                               expected_dtype=self.setup.value_dtype,
                               require_finite=require_finite)
        tensors = layout.dense_tensors(values)
        if len(parts) == 1 and kept is not None:
            count = sum(int((tensors[n] != 0).sum()) for n in self.setup.prunable)
            if count > kept:
                raise PayloadError(f"dense payload has {count} nonzero weights, at most {kept} "
                                   f"allowed")
        return tensors, support

    def decode_positions(self, payload: bytes, round: int,
                         kept: int | None) -> tuple[Mask, bytes]:
        """The support (and its digest) of a MASK or INDICES payload of ``round``."""
        header = read_header(payload)
        if header.round != round:
            raise PayloadError(f"positions are for round {header.round}, expected {round}")
        if header.kind == PayloadKind.MASK:
            support, digest = self.codec.decode(payload)
            count = sum(int(m.sum()) for m in support.values())
            if kept is not None and count != kept:
                raise PayloadError(f"bitmap keeps {count} weights, expected {kept}")
            return support, digest
        if header.kind != PayloadKind.INDICES:
            raise PayloadError(f"expected a MASK or INDICES payload, got {header.kind.name}")
        indices = decode_indices(payload, bound=self.total,
                                 expected_count=header.count if kept is None else kept)
        flat = torch.zeros(self.total, dtype=torch.bool)
        flat[indices] = True
        support = unflatten(flat, self.setup.prunable_shapes, self.setup.prunable)
        digest = self.codec.digest(support)
        if header.digest != digest:
            raise PayloadError("positions payload's digest does not match its positions")
        return support, digest

    # ---- server -----------------------------------------------------------------------------
    def init(self) -> AggregateState:
        return AggregateState(dense_copy(self.setup.initial))

    def configure(self, state: AggregateState, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        # Every client gets the same payload: the aggregate on its own support.
        support = {n: state.weights[n] != 0 for n in self.setup.prunable}
        payload = self.encode(state.weights, support, round)
        return {c: payload for c in clients}

    def check(self, state: AggregateState, round: int, client_id: int,
              payload: bytes) -> dict[str, torch.Tensor]:
        """The client's dense model: exactly k kept positions, this round, finite values."""
        return self.decode(payload, round, kept=self.k, require_finite=True)[0]

    def aggregate(self, state: AggregateState, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[AggregateState, dict[str, Any]]:
        """FedAvg of ``to_powerprop(w)`` weighted by sample count, mapped back to ``w``.

        The float64 sums start at zero and add each reply in turn (not ``WeightedMean``, whose
        first term is not added to zero), so results are the same bits as before the port.
        ``federation.aggregator`` and the clipping settings: ``robust_aggregate``."""
        if not is_plain_mean(self.robust):
            return self.robust_aggregate(
                state, replies, after_refusals(self.robust, len(refused))), {}
        shapes, prunable = self.setup.shapes, self.setup.prunable_shapes
        sums = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        samples = 0
        for reply in replies:
            for n in shapes:
                value = reply.update[n].to(torch.float64)
                if n in prunable:
                    value = to_powerprop(value, self.beta)
                sums[n] += value * reply.num_samples
            samples += reply.num_samples
        weights = {}
        for n in shapes:
            mean = sums[n] / samples
            if n in prunable:
                mean = powerprop_forward(mean, self.beta)
            weights[n] = mean.to(torch.float32)
        return AggregateState(weights), {}

    def robust_aggregate(self, state: AggregateState, replies: Sequence[Reply],
                         settings: FederationSection) -> AggregateState:
        """The rule of ``federation.aggregator`` (``ssfl.algorithms.robust.combine``) where
        SparsyFed averages, in Powerprop space: each reply's dense ``to_powerprop(w)`` (pruned
        weights as 0, as in the mean), clipped around ``to_powerprop`` of the current aggregate,
        combined, and mapped back to ``w``."""
        names, prunable = list(self.setup.shapes), self.setup.prunable_shapes

        def powerprop_space(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([(to_powerprop(weights[n].to(torch.float64), self.beta)
                               if n in prunable else weights[n].to(torch.float64)).reshape(-1)
                              for n in names])

        combined = combine([powerprop_space(r.update) for r in replies],
                           [r.num_samples for r in replies], powerprop_space(state.weights),
                           settings).to(torch.float64)
        weights, start = {}, 0
        for n in names:
            size = math.prod(self.setup.shapes[n])
            v = combined[start:start + size].reshape(self.setup.shapes[n])
            weights[n] = (powerprop_forward(v, self.beta) if n in prunable else v
                          ).to(torch.float32)
            start += size
        return AggregateState(weights)

    # ---- the global model at the target density --------------------------------------------
    def pruned(self, state: AggregateState) -> tuple[Mask, dict[str, torch.Tensor]]:
        """The aggregate pruned to the target density by the clients' top-k: the model that is
        evaluated and reported, and its mask."""
        if self._pruned is None or self._pruned[0] is not state:
            mask = topk_magnitude_mask({n: state.weights[n] for n in self.setup.prunable},
                                       self.k)
            weights = {n: torch.where(mask[n], w, torch.zeros_like(w)) if n in mask else w
                       for n, w in state.weights.items()}
            self._pruned = (state, mask, weights)
        return self._pruned[1], self._pruned[2]

    def support_density(self, state: AggregateState) -> float:
        """Density of the aggregate that clients receive (>= the target)."""
        return sum(int((state.weights[n] != 0).sum()) for n in self.setup.prunable) / self.total

    def eval_weights(self, state: AggregateState,
                     client: int | None = None) -> dict[str, torch.Tensor]:
        return self.pruned(state)[1]

    def global_mask(self, state: AggregateState) -> Mask:
        return self.pruned(state)[0]

    def final_values(self, state: AggregateState) -> torch.Tensor:
        return flat_weights(self.pruned(state)[1], list(self.setup.shapes))

    def state_dict(self, state: AggregateState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"beta": self.beta, "k": self.k}, {f"weights.{n}": w
                                                  for n, w in state.weights.items()}

    def load_state(self, meta: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> AggregateState:
        if meta.get("beta") != self.beta or meta.get("k") != self.k:
            raise ValueError("the checkpoint was saved with another beta or density")
        weights = {n: tensors[f"weights.{n}"].clone() for n in self.setup.shapes
                   if f"weights.{n}" in tensors}
        if not shapes_match(weights, self.setup.shapes):
            raise ValueError("the checkpoint's weights do not fit this model")
        return AggregateState(weights)

    # ---- client -----------------------------------------------------------------------------
    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        """Train densely in Powerprop space from the aggregate, upload the global top-k."""
        tensors, _ = self.decode(received, ctx.round)
        load_weights_(ctx.model, tensors)
        prunable = self.setup.prunable
        with powerprop_parametrized(ctx.model, prunable, self.beta):
            result = local_train(ctx.model, ctx.data, ctx.settings, ctx.lr, ctx.generator)
        keep = topk_magnitude_mask(cpu_weights(ctx.model, prunable), self.k)
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for n in prunable:
                params[n].masked_fill_(~keep[n].to(params[n].device), 0.0)
        # The upload is encoded from CPU tensors (the parameters themselves on a CPU run).
        reply = self.encode(cpu_weights(ctx.model, self.setup.shapes), keep, ctx.round)
        return ClientOutput(reply, None, result)
