"""Robust aggregation of aligned update vectors: rules that bound what one client can do to
the global model.

SSFL's shared mask makes every client's reply a vector over the same coordinates, so the
coordinate-wise rules of the robust-FL literature apply to the value vectors directly, at the
density's cost. Every rule takes the round's replies as rows of one matrix ``values``
``[clients, coordinates]``, their sample counts and the current global vector, and returns the
new global vector; all arithmetic is float64 and deterministic (ties by client order).

- ``mean``: FedAvg, weighted by sample count (the paper's rule; no protection).
- ``median``: coordinate-wise median (Yin et al., ICML 2018), unweighted; with an even count
  the mean of the two middle values.
- ``trimmed_mean``: per coordinate, drop the ``trim`` largest and smallest values
  (``trim = ceil(fraction * clients)``, so any positive fraction drops at least one from each
  end, but never so many that nothing is left), average the rest unweighted (Yin et al.).
- ``krum`` / ``multi_krum``: score each update by the summed squared distance to its
  ``n - f - 2`` nearest other updates, keep the best one (Krum) or the best ``m = n - f``
  (multi-Krum) and average those weighted by sample count (Blanchard et al., NeurIPS 2017).

Before any rule, ``clip_updates`` can bound each client's change ``values - reference``: to a
fixed L2 norm, or adaptively to a multiple of the round's median change norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ssfl.algorithms.common import WeightedMean

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")


def clip_updates(values: torch.Tensor, reference: torch.Tensor, *, norm: float = 0.0,
                 adaptive: float = 0.0) -> torch.Tensor:
    """Rows of ``values`` whose change from ``reference`` is longer than the bound, scaled back
    onto it. ``norm`` > 0: a fixed bound; ``adaptive`` > 0: ``adaptive`` times the median
    change norm of the round (both: the smaller bound). 0 and 0: unchanged."""
    if norm <= 0 and adaptive <= 0:
        return values
    delta = values.to(torch.float64) - reference.to(torch.float64)
    norms = delta.norm(dim=1)
    bounds = []
    if norm > 0:
        bounds.append(norm)
    if adaptive > 0:
        bounds.append(adaptive * float(norms.median()))
    bound = min(bounds)
    scale = torch.where(norms > bound, bound / norms.clamp(min=1e-300), torch.ones_like(norms))
    return (reference.to(torch.float64) + delta * scale[:, None]).to(values.dtype)


def weighted_mean(values: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=torch.float64)
    return (values.to(torch.float64) * w[:, None]).sum(0) / w.sum()


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    sorted_values = values.to(torch.float64).sort(dim=0).values
    n = sorted_values.shape[0]
    if n % 2:
        return sorted_values[n // 2]
    return (sorted_values[n // 2 - 1] + sorted_values[n // 2]) / 2


def trim_count(fraction: float, n: int) -> int:
    """How many values a trimmed mean drops from each end of ``n``: ``ceil(fraction * n)``,
    at most ``(n - 1) // 2`` (a round with few valid replies still has a middle; with one or
    two replies the trimmed mean is their plain mean)."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    return min(math.ceil(fraction * n - 1e-9), (n - 1) // 2)


def trimmed_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    n = values.shape[0]
    trim = trim_count(fraction, n)
    kept = values.to(torch.float64).sort(dim=0).values[trim:n - trim]
    return kept.mean(0)


def krum_scores(values: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each row's summed squared distance to its ``n - f - 2`` nearest other rows."""
    n = values.shape[0]
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs more than f + 2 = {byzantine + 2} updates, got {n}")
    x = values.to(torch.float64)
    distances = torch.cdist(x, x).square()
    distances.fill_diagonal_(math.inf)
    return distances.sort(dim=1).values[:, :neighbours].sum(1)


def krum_select(values: torch.Tensor, byzantine: int, keep: int) -> list[int]:
    """The ``keep`` rows of lowest Krum score, in row order (ties: the earlier row)."""
    scores = krum_scores(values, byzantine)
    order = torch.sort(scores, stable=True).indices[:keep]
    return sorted(int(i) for i in order)


def aggregate_vectors(values: torch.Tensor, weights: Sequence[float], rule: str, *,
                      trim_fraction: float = 0.1, byzantine: int = 1) -> torch.Tensor:
    """The new global vector (float32) from the round's update rows by ``rule``."""
    if rule == "mean":
        out = weighted_mean(values, weights)
    elif rule == "median":
        out = coordinate_median(values)
    elif rule == "trimmed_mean":
        out = trimmed_mean(values, trim_fraction)
    elif rule in ("krum", "multi_krum"):
        keep = 1 if rule == "krum" else values.shape[0] - byzantine
        rows = krum_select(values, byzantine, max(1, keep))
        out = weighted_mean(values[rows], [weights[i] for i in rows])
    else:
        raise ValueError(f"unknown aggregator {rule!r}; choose one of {list(AGGREGATORS)}")
    return out.to(torch.float32)


def combine(updates: Sequence[torch.Tensor], samples: Sequence[int], reference: torch.Tensor,
            settings: Any) -> torch.Tensor:
    """The round's aligned update vectors combined as ``settings`` (the config's
    ``[federation]``: ``update_clip_norm``, ``adaptive_clip``, ``aggregator``,
    ``trim_fraction``, ``byzantine``) says; the new global vector.

    Plain FedAvg (``mean`` without adaptive clipping) keeps its running float64 sum over the
    replies in order, so its results are those of every run before robust rules existed."""
    if settings.aggregator == "mean" and settings.adaptive_clip <= 0:
        mean = WeightedMean()
        for values, n in zip(updates, samples):
            if settings.update_clip_norm > 0:
                delta = values - reference
                norm = float(delta.norm())
                if norm > settings.update_clip_norm:
                    values = reference + delta * (settings.update_clip_norm / norm)
            mean.add(values, float(n))
        return mean.result()
    rows = clip_updates(torch.stack(list(updates)), reference, norm=settings.update_clip_norm,
                        adaptive=settings.adaptive_clip)
    return aggregate_vectors(rows, [float(n) for n in samples], settings.aggregator,
                             trim_fraction=settings.trim_fraction, byzantine=settings.byzantine)
