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


def top_k(key: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """The one top-k rule of the library: a flat bool tensor marking the ``k`` largest entries
    of ``key``; ties go to the larger ``tiebreak`` (if given), then to the earlier position.

    Two stable sorts make it exact and the same on every machine (``torch.topk`` breaks ties
    arbitrarily). Every mask rule (global SNIP top-k, magnitude pruning, FedDST's server
    re-pruning, drop-and-regrow) selects through this function."""
    key = key.reshape(-1)
    if not 0 <= k <= key.numel():
        raise ValueError(f"cannot keep {k} of {key.numel()} entries")
    if tiebreak is None:
        order = torch.sort(key, descending=True, stable=True).indices
    else:
        order = torch.sort(tiebreak.reshape(-1), descending=True, stable=True).indices
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
    keep = torch.zeros(key.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def global_top_k(keys: Mapping[str, torch.Tensor], k: int) -> Mask:
    """``top_k`` over all tensors together (global, not per layer): ties go to the earlier
    tensor, then the earlier position."""
    names = list(keys)
    keep = top_k(flatten(keys, names), k)
    return unflatten(keep, {n: keys[n].shape for n in names}, names)


def _finite_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores as float32 (the precision every mask rule ranks in), refused if any is NaN
    or infinite: such a score would sort above or below every real one."""
    scores32 = {n: s.to(torch.float32) for n, s in scores.items()}
    if not all(bool(torch.isfinite(s).all()) for s in scores32.values()):
        raise ValueError("saliency scores contain NaN or infinite values")
    return scores32


def unit_floor(scores: Mapping[str, torch.Tensor], per_unit: int) -> Mask:
    """The weights a mask must keep so that no unit of a layer is cut off: each output unit's
    ``per_unit`` highest-scoring weights (a Conv filter's, a Linear row's) and each input
    channel's ``per_unit`` highest-scoring weights (over every filter and kernel position that
    reads it); ties go to the earlier position. Tensors of one dimension have no units and get
    no floor."""
    floor = {}
    for name, score in scores.items():
        if score.dim() < 2:
            floor[name] = torch.zeros(score.shape, dtype=torch.bool)
            continue
        keep = torch.zeros(score.shape, dtype=torch.bool)
        for side in (0, 1):  # output units, then input channels
            flipped = score.transpose(0, side)
            units = flipped.reshape(score.shape[side], -1)
            if per_unit > units.shape[1]:
                raise ValueError(f"{name}: cannot keep {per_unit} weights per unit, a unit has "
                                 f"{units.shape[1]}")
            best = torch.sort(units, dim=1, descending=True, stable=True).indices[:, :per_unit]
            chosen = torch.zeros(units.shape, dtype=torch.bool).scatter_(1, best, True)
            keep |= chosen.reshape(flipped.shape).transpose(0, side)
        floor[name] = keep
    return floor


def _floored(scores: Mapping[str, torch.Tensor], per_unit: int
             ) -> tuple[dict[str, torch.Tensor], Mask]:
    """The scores with each unit's ``per_unit`` best raised to +inf, so any top-k that has room
    for them keeps them and fills the rest by score as before, and the floor itself."""
    floor = unit_floor(scores, per_unit)
    return ({n: torch.where(floor[n], torch.tensor(math.inf), s) for n, s in scores.items()},
            floor)


def global_topk_mask(scores: Mapping[str, torch.Tensor], density: float,
                     per_unit: int = 0) -> Mask:
    """Keep the k = round(density * total) highest-scoring weights over all layers together,
    so the mask has exactly k ones and is the same on every machine.

    ``per_unit`` > 0 (not the paper's rule, which may cut a filter or an input channel off)
    keeps ``unit_floor``'s weights first and the rest of the k by score over all layers."""
    scores32 = _finite_scores(scores)
    k = topk_count(density, sum(s.numel() for s in scores32.values()))
    if per_unit:
        scores32, floor = _floored(scores32, per_unit)
        if (needed := sum(int(f.sum()) for f in floor.values())) > k:
            raise ValueError(f"keeping {per_unit} weights per unit takes {needed} weights, more "
                             f"than the {k} that density {density} keeps")
    return global_top_k(scores32, k)


def layerwise_top_k(keys: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> Mask:
    """``top_k`` within each layer: the ``counts[layer]`` largest entries of each tensor (ties:
    earlier position first), so the layer budget is set outside and only the choice inside a
    layer follows the keys."""
    return {n: top_k(key, counts[n]).reshape(key.shape) for n, key in keys.items()}


def dead_units(mask: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int, int, int]]:
    """Per Conv/Linear weight of shape (out, in, ...): (output units with no kept weight, output
    units, input channels with no kept weight, input channels). A filter with no weight left
    outputs nothing but its normalisation's shift, so a mask that empties filters narrows the
    layer beyond its share of weights; a random mask of the same share almost never does."""
    out = {}
    for name, keep in mask.items():
        if keep.dim() < 2:
            continue
        per_pair = keep.reshape(keep.shape[0], keep.shape[1], -1).any(dim=2)
        out[name] = (int((~per_pair.any(dim=1)).sum()), keep.shape[0],
                     int((~per_pair.any(dim=0)).sum()), keep.shape[1])
    return out


def magnitude_mask(weights: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> Mask:
    """Keep the ``counts[layer]`` largest-magnitude weights of each layer (ties: earlier first)."""
    return layerwise_top_k({n: w.detach().abs().to(torch.float64) for n, w in weights.items()},
                           counts)


def erk_topk_mask(scores: Mapping[str, torch.Tensor], density: float,
                  per_unit: int = 0) -> Mask:
    """Each layer keeps its Erdos-Renyi-Kernel share of the k = round(density * total) weights
    (``erk_counts``, as the random ERK baseline), and within the layer its highest-scoring
    weights. Not the paper's rule (one top-k over all layers, ``global_topk_mask``): it keeps
    the scores' choice of weights but not their choice of how much each layer keeps.
    ``per_unit`` > 0: within its share, each layer keeps ``unit_floor``'s weights first (as in
    ``global_topk_mask``)."""
    scores32 = _finite_scores(scores)
    counts = erk_counts({n: s.shape for n, s in scores32.items()}, density)
    if per_unit:
        scores32, floor = _floored(scores32, per_unit)
        for name, f in floor.items():
            if int(f.sum()) > counts[name]:
                raise ValueError(f"{name}: keeping {per_unit} weights per unit takes "
                                 f"{int(f.sum())} weights, more than its ERK share of "
                                 f"{counts[name]} at density {density}")
    return layerwise_top_k(scores32, counts)


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


def erk_counts(shapes: Mapping[str, torch.Size], density: float) -> dict[str, int]:
    """Per-layer kept counts with ERK densities, adding up to exactly round(density * total)."""
    total = topk_count(density, sum(math.prod(s) for s in shapes.values()))
    return layer_counts(erk_densities(shapes, density), shapes, total)


def cosine_fraction(alpha: float, round: int, end: int) -> float:
    """The cosine-decayed readjustment fraction ``alpha/2 * (1 + cos(pi * round / end))`` of
    FedDST (and DisPFL's anneal); 0 from ``end`` on (the cosine reaches 0 there)."""
    if end <= 0 or round >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * round / end))


def drop_and_regrow(
    weights: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    fraction: float,
    *,
    ceil: bool = False,
) -> tuple[Mask, dict[str, torch.Tensor]]:
    """FedDST's (and DisPFL's) client-side mask readjustment, layer by layer.

    Drop ``k = floor(fraction * active + 1/2)`` (with ``ceil``: ``ceil(fraction * active)``, as
    DisPFL's ``fire_mask``) active weights of smallest magnitude and grow the ``k`` weights that
    were inactive *before* the drop with the largest gradient magnitude (``k`` is capped at the
    number of inactive weights, so a fully dense layer is left alone). Ties go to the earlier
    position. Returns the new mask (same count in every layer) and, per layer, the flat indices
    that were grown (ascending): their weights must start at exactly zero.
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
        # The k smallest active magnitudes are the k largest of their negation.
        drop = top_k(torch.where(flat, -magnitude, torch.full_like(magnitude, -math.inf)), k)
        gradient = grads[name].detach().reshape(-1).abs().to(torch.float64)
        grow = top_k(torch.where(flat, torch.full_like(gradient, -math.inf), gradient), k)
        new_mask[name] = ((flat & ~drop) | grow).reshape(keep.shape)
        grown[name] = grow.nonzero().squeeze(1)
    return new_mask, grown


def prune_to_counts(
    values: Mapping[str, torch.Tensor],
    holders: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
) -> Mask:
    """FedDST's server re-pruning: per layer keep the ``counts[layer]`` held weights (holder
    weight > 0) of largest magnitude; ties by the larger holder weight, then the earlier
    position. Raises ``ValueError`` when a layer holds fewer weights than its count."""
    mask = {}
    for n, k in counts.items():
        held = holders[n] > 0
        if int(held.sum()) < k:
            raise ValueError(f"{n}: only {int(held.sum())} weights held, need {k}")
        key = torch.where(held, values[n].abs().to(torch.float64),
                          torch.full(held.shape, -math.inf, dtype=torch.float64))
        mask[n] = top_k(key, k, holders[n]).reshape(held.shape)
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
