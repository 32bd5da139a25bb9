"""Sparsity masks: which weights are prunable, saliency scores, global top-k and random masks.

A mask is a plain ``dict[str, BoolTensor]`` keyed by parameter name (the weights of every Conv2d
and Linear layer). Unlike ``torch.nn.utils.prune`` it does not re-parametrise the model, so state
dicts keep their keys and can be exchanged between server and clients unchanged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Mask = dict[str, torch.Tensor]
Scores = dict[str, torch.Tensor]


def prunable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the weights of all Conv2d and Linear layers, in ``named_parameters`` order.

    The first convolution and the final classifier are included, as in the SSFL code. Biases and
    normalisation parameters are never pruned: they are a tiny share of the model and pruning them
    changes what a layer can represent rather than how many connections it has.
    """
    prunable = {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    return [name for name, _ in model.named_parameters() if name in prunable]


def saliency_scores(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str] | None = None,
) -> Scores:
    """SNIP saliency ``|dL/dw * w|`` of each prunable weight, averaged over the given minibatches.

    The model is put in eval mode (as the SSFL code does for scoring) and restored afterwards; its
    weights and gradients are left untouched.
    """
    names = list(names) if names is not None else prunable_parameter_names(model)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"model has no parameters named {missing}")
    weights = [params[n] for n in names]
    totals = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was_training = model.training
    model.eval()
    count = 0
    try:
        for inputs, targets in batches:
            loss = F.cross_entropy(model(inputs), targets)
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                for total, grad, weight in zip(totals, grads, weights):
                    total.add_((grad * weight).abs_())
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("saliency_scores needs at least one minibatch")
    return {n: t.div_(count).cpu() for n, t in zip(names, totals)}


class WeightedMean:
    """Running weighted mean of equally-shaped tensors (or dicts of tensors).

    Keeps one running sum instead of every client's contribution, so server memory does not grow
    with the number of clients (as fedjax's FedAvg does).
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._total_weight = 0.0
        self.count = 0

    def add(self, value: torch.Tensor, weight: float = 1.0) -> None:
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weights must be positive and finite, got {weight}")
        value = value.to(torch.float64)
        if self._sum is None:
            self._sum = value * weight
        else:
            if value.shape != self._sum.shape:
                raise ValueError(f"shape {tuple(value.shape)} != {tuple(self._sum.shape)}")
            self._sum.add_(value, alpha=weight)
        self._total_weight += weight
        self.count += 1

    def result(self) -> torch.Tensor:
        if self._sum is None:
            raise ValueError("WeightedMean has no values")
        # Sum in float64 so that the mean of identical updates is exactly that update.
        return (self._sum / self._total_weight).to(torch.float32)


def flatten(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(
    flat: torch.Tensor, shapes: Mapping[str, torch.Size], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        size = math.prod(shapes[name])
        out[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    if offset != flat.numel():
        raise ValueError(f"expected {offset} values, got {flat.numel()}")
    return out


def topk_count(density: float, total: int) -> int:
    """k = round(density * total), the number of weights kept for a target density."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = round(density * total)
    if k < 1:
        raise ValueError(f"density {density} keeps no weight out of {total}")
    return k


def global_topk_mask(scores: Mapping[str, torch.Tensor], density: float) -> Mask:
    """Keep the k highest-scoring weights over all layers together (global, not per layer).

    Ties are broken by position (earlier layer, then earlier flat index, wins) through a stable
    sort, so the mask has exactly k ones and is the same on every machine.
    """
    names = list(scores)
    shapes = {n: scores[n].shape for n in names}
    flat = flatten({n: scores[n].to(torch.float32) for n in names}, names)
    if not torch.isfinite(flat).all():
        raise ValueError("saliency scores contain NaN or infinite values")
    k = topk_count(density, flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return unflatten(keep, shapes, names)


def random_global_mask(
    shapes: Mapping[str, torch.Size], density: float, generator: torch.Generator
) -> Mask:
    """Exactly k weights chosen uniformly at random over all layers (the random-mask baseline)."""
    names = list(shapes)
    total = sum(math.prod(shapes[n]) for n in names)
    k = topk_count(density, total)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=generator)[:k]] = True
    return unflatten(keep, shapes, names)


def erk_densities(shapes: Mapping[str, torch.Size], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel layer densities (Evci et al., RigL), as FedDST and the SSFL
    ablations use: a layer's density is proportional to ``sum(shape) / prod(shape)``, scaled so
    that the whole model has ``density``; layers that would exceed 1 are kept dense and the
    scale is solved again for the rest.
    """
    topk_count(density, sum(math.prod(s) for s in shapes.values()))  # validates density
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        denom = sum(raw[n] * sizes[n] for n in shapes if n not in dense)
        scale = budget / denom
        saturated = {n for n in shapes if n not in dense and scale * raw[n] > 1.0}
        if not saturated:
            return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
        dense |= saturated


def layer_counts(
    densities: Mapping[str, float], shapes: Mapping[str, torch.Size], total: int
) -> dict[str, int]:
    """Per-layer kept counts that follow ``densities`` and add up to exactly ``total``
    (largest-remainder rounding; ties go to the earlier layer)."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    wanted = {n: min(densities[n], 1.0) * sizes[n] for n in shapes}
    counts = {n: min(int(math.floor(w)), sizes[n]) for n, w in wanted.items()}
    remainders = sorted(shapes, key=lambda n: (-(wanted[n] - counts[n]), list(shapes).index(n)))
    short = total - sum(counts.values())
    for name in remainders * 2:  # a second pass only if rounding left room in full layers
        if short <= 0:
            break
        if counts[name] < sizes[name]:
            counts[name] += 1
            short -= 1
    if short != 0:
        raise ValueError(f"cannot place {total} weights in layers of sizes {sizes}")
    return counts


def random_layerwise_mask(
    shapes: Mapping[str, torch.Size],
    densities: Mapping[str, float],
    total: int,
    generator: torch.Generator,
) -> Mask:
    """A random mask with the given per-layer densities and exactly ``total`` weights kept."""
    counts = layer_counts(densities, shapes, total)
    mask = {}
    for name, shape in shapes.items():
        keep = torch.zeros(math.prod(shape), dtype=torch.bool)
        keep[torch.randperm(keep.numel(), generator=generator)[: counts[name]]] = True
        mask[name] = keep.reshape(shape)
    return mask


def full_mask(shapes: Mapping[str, torch.Size]) -> Mask:
    return {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}


def mask_density(mask: Mapping[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return kept / total


def jaccard(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Overlap of two masks over the same layers: |a and b| / |a or b| (1 for two empty masks)."""
    if a.keys() != b.keys() or any(a[n].shape != b[n].shape for n in a):
        raise ValueError("masks cover different layers or shapes")
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    either = sum(int((a[n] | b[n]).sum()) for n in a)
    return both / either if either else 1.0


def layer_densities(mask: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(m.float().mean()) for n, m in mask.items()}


def mask_to_bits(mask: Mapping[str, torch.Tensor], names: Sequence[str]) -> bytes:
    """The mask as a bitmap, one bit per prunable weight, in ``names`` order (numpy bit order)."""
    flat = torch.cat([mask[n].reshape(-1) for n in names]).numpy()
    return np.packbits(flat).tobytes()


def bits_to_mask(
    bits: bytes, shapes: Mapping[str, torch.Size], names: Sequence[str]
) -> Mask:
    total = sum(math.prod(shapes[n]) for n in names)
    if len(bits) != (total + 7) // 8:
        raise ValueError(f"mask bitmap has {len(bits)} bytes, expected {(total + 7) // 8}")
    flat = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=total).astype(bool)
    return unflatten(torch.from_numpy(flat), shapes, names)


def mask_digest(mask: Mapping[str, torch.Tensor], names: Sequence[str]) -> bytes:
    """An 8-byte fingerprint of the mask, carried in every payload so that a client and the
    server can tell when they disagree on which weights are active."""
    return hashlib.blake2b(mask_to_bits(mask, names), digest_size=8).digest()


@torch.no_grad()
def apply_mask_(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked-out weights of ``model`` in place."""
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        params[name].mul_(keep.to(params[name].device))
