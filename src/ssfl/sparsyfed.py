"""SparsyFed (Guastella, Sani et al., ICLR 2025, arXiv 2504.05153) behind ``TrainingStrategy``.

The rules are small pure functions (``powerprop_forward``, ``to_powerprop``,
``topk_magnitude_mask``, ``choose_form``) so that tests can check them on hand-sized tensors;
``SparsyFedStrategy`` only moves bytes around them. See the class docstring for what follows the
paper and the authors' code, and what was chosen here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ssfl.checkpoint import prefixed, unprefixed
from ssfl.client import local_train
from ssfl.comm import (
    HEADER,
    VALUE_DTYPES,
    ParameterLayout,
    PayloadError,
    PayloadKind,
    decode_bits,
    decode_indices,
    decode_values,
    encode_bits,
    encode_indices,
    encode_values,
    read_header,
)
from ssfl.masks import (
    Mask,
    bits_to_mask,
    full_mask,
    mask_digest,
    mask_to_bits,
    topk_count,
)
from ssfl.server import Rejection, RoundFailed, RoundUpdate, screen_replies
from ssfl.strategies import Reply, TrainingStrategy, payload_parts

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
    layer); ties go to the earlier tensor, then the earlier flat position (a stable sort), so
    exactly ``k`` are kept and every machine keeps the same ones."""
    names = list(weights)
    flat = torch.cat([weights[n].detach().reshape(-1).abs().to(torch.float32) for n in names])
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot keep {k} of {flat.numel()} weights")
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    mask, offset = {}, 0
    for n in names:
        size = weights[n].numel()
        mask[n] = keep[offset : offset + size].reshape(weights[n].shape)
        offset += size
    return mask


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


# ---------------------------------------------------------------------------- strategy


class SparsyFedStrategy(TrainingStrategy):
    """SparsyFed, after the paper and the authors' code (``AGuastella/sparsyfed``; we read the
    modules ``sparsyfed_modules.py``/``sparsyfed_no_act_modules.py``, the CIFAR
    ``train_test.py``/``models.py`` and the Flower strategies, and copied none of it).

    - Powerprop (the method's one hyperparameter, ``algorithm.powerprop_beta``; the authors'
      CIFAR setting is 1.25): clients train ``v`` with ``w = sign(v)|v|**beta`` for every
      Conv/Linear weight (the prunable set: first convolution and classifier included, as the
      authors' ``get_parameters_to_prune``); biases and normalisation parameters are plain. The
      seeded initial weights are ``w``; ``v = to_powerprop(w)``, as the authors' ``init_weights``
      maps a standard initialisation. ``torch.nn.utils.parametrize`` does this on the shared
      model during local training only, so ``ssfl.models`` is unchanged.
    - Client: load the global model, train densely (the library's local SGD, as every method;
      nothing is masked: with beta > 1 a weight at exactly zero has zero gradient, zero decay
      and zero momentum, so it stays zero), then keep the global top-k weights by magnitude,
      ``k = round(density * prunable)``, over all layers together (``topk_magnitude_mask``, as
      the authors' ``prune.global_unstructured(L1Unstructured)``, with position ties instead
      of arbitrary ones) and upload exactly those.
    - Server: FedAvg weighted by sample count, pruned weights counting as zero (the authors'
      Flower ``FedAvg``). The authors average the Powerprop parameter ``v`` (their state dict
      holds ``v``), not ``w``; we follow them: payloads carry ``w`` in both directions (the real
      weights; each side maps with ``to_powerprop``/``powerprop_forward`` in float64), and the
      server averages ``to_powerprop(w_k)`` and maps the mean back. With beta = 1 this is plain
      FedAvg of ``w``. A weight kept by few clients is shrunk harder than a ``w``-mean would
      (``(v/10)**beta``), which is part of how the method pulls clients to one mask.
    - What the server sends: the aggregate itself, whose support is the union of the round's
      client masks (density >= the target), as in the authors' code, where the server does not
      prune. Pruning it to k before sending (our first reading) would freeze the mask after
      round 1: clients would get exactly k nonzeros, zeros cannot regrow under Powerprop, and
      every top-k would return the same k. With the union, the support can only shrink
      (zeros stay zero), and clients move their masks inside it -- the method's adaptivity and
      its small regrowth. The download therefore costs more than the target density; it is
      counted exactly (``bytes_down``).
    - The global model (evaluation, ``global_mask``, ``global_values``): the aggregate pruned
      to the target density by the same top-k (exact density every round), i.e. the model one
      would deploy at density d. The authors evaluate the unpruned aggregate; we do not, so
      that every method's accuracy here is that of a model at the target density.
    - Payloads (``form_sizes``/``choose_form``, the same rule both ways): the kept positions as
      a bitmap (1 bit per prunable weight) or as uint32 indices (4 bytes per kept weight),
      whichever is smaller (indices below a density of 1/32), then the kept values and the
      dense parameters; or all values when that is smaller still (near density 1; round 1's
      download of the dense initial model). An upload must hold exactly k positions (at most k
      nonzeros in the dense form); every byte counted is the ``len()`` of a payload.
    - Not implemented: activation pruning. The authors' layers prune each layer's input to the
      layer's weight density when computing the weight gradient in the backward pass (the
      forward pass is exact), a compute saving that needs sparse kernels; on dense CPU kernels
      it would only add top-k work per layer and step. Their code also ships this variant
      without it (``SparsyFed_no_act_*`` modules), which is what this is. Also not copied:
      their local optimiser (SGD without momentum, weight decay 1e-3) and learning rate -- all
      methods here share the run's ``train`` settings.
    - Clients are stateless (everything comes in the download), so a checkpoint is the
      aggregate alone and a resumed run is bit-identical.
    """

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: Sequence[str],
        density: float,
        *,
        beta: float = 1.25,
        value_dtype: str = "float32",
        min_replies: int = 1,
    ) -> None:
        if not (beta >= 1.0 and math.isfinite(beta)):
            raise ValueError(f"powerprop beta must be >= 1, got {beta}")
        self.shapes = {n: t.shape for n, t in initial.items()}
        self.names = list(self.shapes)
        self.prunable = list(prunable)
        self.prunable_shapes = {n: self.shapes[n] for n in self.prunable}
        self.total = sum(math.prod(s) for s in self.prunable_shapes.values())
        self.other = sum(math.prod(s) for n, s in self.shapes.items() if n not in self.prunable)
        self.k = topk_count(density, self.total)
        self.beta = beta
        self.value_dtype = value_dtype
        self.itemsize = VALUE_DTYPES[value_dtype][1].itemsize
        self.min_replies = min_replies
        self.setup_bytes: dict[str, int] = {}
        #: the server's aggregate (w-space, float32); prunable weights are 0 outside its support
        self.weights = {n: t.detach().clone().to(torch.float32) for n, t in initial.items()}
        full = full_mask(self.prunable_shapes)
        self._dense = (full, ParameterLayout(self.shapes, full),
                       mask_digest(full, self.prunable))
        self._layouts: dict[bytes, ParameterLayout] = {}  # decoded-mask cache, not state
        self._cached: tuple[int, bytes] | None = None
        self._pruned: dict[str, torch.Tensor] | None = None
        self._pruned_mask: Mask | None = None

    # -- payloads (both directions) -------------------------------------------------------
    def _layout(self, mask: Mask, digest: bytes) -> ParameterLayout:
        if digest == self._dense[2]:
            return self._dense[1]
        layout = self._layouts.pop(digest, None) or ParameterLayout(self.shapes, mask)
        self._layouts[digest] = layout  # most recent last; keep a few
        while len(self._layouts) > 4:
            self._layouts.pop(next(iter(self._layouts)))
        return layout

    def encode(self, tensors: Mapping[str, torch.Tensor], support: Mask, round: int) -> bytes:
        """``tensors`` with prunable weights only on ``support``, in the smallest form."""
        kept = sum(int(m.sum()) for m in support.values())
        form = choose_form(self.total, kept, self.other, self.itemsize)
        if form == "dense":
            _, layout, digest = self._dense
            return encode_values(layout.gather(tensors), round=round, digest=digest,
                                 dtype=self.value_dtype)
        digest = mask_digest(support, self.prunable)
        if form == "bitmap":
            positions = encode_bits(mask_to_bits(support, self.prunable), self.total,
                                    round=round, digest=digest)
        else:
            flat = torch.cat([support[n].reshape(-1) for n in self.prunable])
            positions = encode_indices(flat.nonzero().squeeze(1), round=round, digest=digest)
        values = self._layout(support, digest).gather(tensors)
        return positions + encode_values(values, round=round, digest=digest,
                                         dtype=self.value_dtype)

    def decode(self, payload: bytes, round: int, *, kept: int | None = None,
               require_finite: bool = False) -> tuple[dict[str, torch.Tensor], Mask]:
        """Dense tensors and the support of a payload made by ``encode``; with ``kept``, the
        support must hold exactly that many positions (at most that many nonzeros when the
        payload is dense). Raises ``PayloadError`` for anything malformed."""
        parts = payload_parts(payload)
        if len(parts) == 1:
            support, layout, digest = self._dense
        elif len(parts) == 2:
            header = read_header(parts[0])
            if header.round != round:
                raise PayloadError(f"positions are for round {header.round}, expected {round}")
            if header.kind == PayloadKind.MASK:
                bits = decode_bits(parts[0], expected_count=self.total)
                support = bits_to_mask(bits, self.prunable_shapes, self.prunable)
                count = sum(int(m.sum()) for m in support.values())
                if kept is not None and count != kept:
                    raise PayloadError(f"bitmap keeps {count} weights, expected {kept}")
            elif header.kind == PayloadKind.INDICES:
                indices = decode_indices(parts[0], bound=self.total,
                                         expected_count=header.count if kept is None else kept)
                flat = torch.zeros(self.total, dtype=torch.bool)
                flat[indices] = True
                support, offset = {}, 0
                for n in self.prunable:
                    size = math.prod(self.prunable_shapes[n])
                    support[n] = flat[offset : offset + size].reshape(self.prunable_shapes[n])
                    offset += size
            else:
                raise PayloadError(f"expected a MASK or INDICES payload, got {header.kind.name}")
            digest = mask_digest(support, self.prunable)
            if header.digest != digest:
                raise PayloadError("positions payload's digest does not match its positions")
            layout = self._layout(support, digest)
        else:
            raise PayloadError(f"expected 1 or 2 payloads, got {len(parts)}")
        values = decode_values(parts[-1], expected_count=layout.num_values,
                               expected_digest=digest, expected_round=round,
                               expected_dtype=self.value_dtype, require_finite=require_finite)
        tensors = layout.dense_tensors(values)
        if len(parts) == 1 and kept is not None:
            count = sum(int((tensors[n] != 0).sum()) for n in self.prunable)
            if count > kept:
                raise PayloadError(f"dense payload has {count} nonzero weights, at most {kept} "
                                   f"allowed")
        return tensors, support

    # -- server -> client -----------------------------------------------------------------
    def payload_for(self, client_id: int, round: int) -> bytes:
        if self._cached is None or self._cached[0] != round:
            support = {n: self.weights[n] != 0 for n in self.prunable}
            self._cached = (round, self.encode(self.weights, support, round))
        return self._cached[1]

    # -- client ---------------------------------------------------------------------------
    def client_update(self, model, payload, data, settings, *, client_id, round, lr, generator):
        tensors, _ = self.decode(payload, round)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(tensors[n])
        with powerprop_parametrized(model, self.prunable, self.beta):
            result = local_train(model, data, settings, lr, generator)
        params = dict(model.named_parameters())
        keep = topk_magnitude_mask({n: params[n].detach().cpu() for n in self.prunable}, self.k)
        with torch.no_grad():
            for n in self.prunable:
                params[n].masked_fill_(~keep[n].to(params[n].device), 0.0)
        # The upload is encoded from CPU tensors (the parameters themselves on a CPU run).
        return self.encode({n: p.detach().cpu() for n, p in params.items()}, keep, round), result

    # -- aggregation ----------------------------------------------------------------------
    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate:
        sums = {n: torch.zeros(s, dtype=torch.float64) for n, s in self.shapes.items()}
        clients = samples = nbytes = 0
        rejected: list[Rejection] = []

        def check(client_id: int, payload: bytes, num_samples: int):
            tensors, _ = self.decode(payload, round, kept=self.k, require_finite=True)
            return tensors, len(payload)

        for _, checked, num_samples in screen_replies(round, replies, check, rejected):
            tensors, size = checked
            for n in self.names:
                value = tensors[n].to(torch.float64)
                if n in self.prunable_shapes:
                    value = to_powerprop(value, self.beta)
                sums[n] += value * num_samples
            clients, samples, nbytes = clients + 1, samples + num_samples, nbytes + size
        if clients < self.min_replies:
            raise RoundFailed(round, clients, self.min_replies, rejected)
        weights = {}
        for n in self.names:
            mean = sums[n] / samples
            if n in self.prunable_shapes:
                mean = powerprop_forward(mean, self.beta)
            weights[n] = mean.to(torch.float32)
        self._set_weights(weights)
        return RoundUpdate(num_clients=clients, num_samples=samples, bytes_up=nbytes,
                           rejected=tuple(rejected))

    def _set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self._cached = self._pruned = self._pruned_mask = None

    # -- the global model at the target density ---------------------------------------------
    def global_mask(self) -> Mask:
        if self._pruned_mask is None:
            self._pruned_mask = topk_magnitude_mask(
                {n: self.weights[n] for n in self.prunable}, self.k)
        return self._pruned_mask

    def pruned_weights(self) -> dict[str, torch.Tensor]:
        """The aggregate pruned to the target density: the model evaluated and reported."""
        if self._pruned is None:
            mask = self.global_mask()
            self._pruned = {n: torch.where(mask[n], w, torch.zeros_like(w)) if n in mask else w
                            for n, w in self.weights.items()}
        return self._pruned

    def load_global_(self, model: nn.Module) -> None:
        pruned = self.pruned_weights()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(pruned[n])

    def global_values(self) -> torch.Tensor:
        pruned = self.pruned_weights()
        return torch.cat([pruned[n].reshape(-1) for n in self.names])

    def support_density(self) -> float:
        """Density of the aggregate that clients receive (>= the target)."""
        return sum(int((self.weights[n] != 0).sum()) for n in self.prunable) / self.total

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"beta": self.beta, "k": self.k}, prefixed("weights", self.weights)

    def load_state_dict(self, meta: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
        if meta.get("beta") != self.beta or meta.get("k") != self.k:
            raise ValueError("the checkpoint was saved with another beta or density")
        weights = unprefixed("weights", dict(tensors))
        if {n: w.shape for n, w in weights.items()} != self.shapes:
            raise ValueError("the checkpoint's weights do not fit this model")
        self._set_weights({n: weights[n].clone() for n in self.names})
