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
- ``fltrust``: the server's own change on a small clean sample it holds (``trusted``) sets the
  direction and the step (Cao et al., NDSS 2021): each client's change is scaled to that
  change's norm and weighted by its cosine with it, negative cosines counting 0, unweighted by
  sample count. The only rule here with side information: a reversed change points away from
  the server's own, however far honest changes spread (simulator only; ``combine``).
- ``auto`` (the default): multi-Krum where the round has more than the ``f + 2`` replies
  Krum needs, else the weighted mean; a reply refused at screening counts as one of the ``f``
  (``after_refusals``); exact copies of one update sent under several names count once
  (``repeated_rows``). The config's "auto" also clips every change first (to
  twice the round's median change norm, ``federation.adaptive_clip``), so whatever multi-Krum
  lets through, and every reply of a round too small for it, moves the model a bounded step.

Before any rule, ``clip_updates`` can bound each client's change ``values - reference``: to a
fixed L2 norm, or adaptively to a multiple of the round's median change norm.

``combine`` applies them to aligned replies (the global-mask methods, PruneFL's values and
importance, SparsyFed's dense vectors in Powerprop space). ``combine_held`` is the same for
replies that hold only some coordinates each (per-client masks: ``random_clientwise``, FedDST,
DisPFL's neighbour averaging): clipping bounds each client's change on what it holds, and every
rule runs per coordinate over that coordinate's holders (Krum scores whole vectors, a
coordinate a client does not hold counting as no change); ``combine_over_holders`` is its
drop-in for ``average_over_holders``. ``is_plain_mean`` tells the defaults, which every method
keeps on its own, older code path, so their results do not change.
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ssfl.algorithms.base import SetupFailed
from ssfl.algorithms.common import WeightedMean, average_over_holders

AGGREGATORS = ("auto", "mean", "median", "trimmed_mean", "krum", "multi_krum", "fltrust")


def clip_updates(values: torch.Tensor, reference: torch.Tensor, *, norm: float = 0.0,
                 adaptive: float = 0.0, clipped: list[int] | None = None) -> torch.Tensor:
    """Rows of ``values`` whose change from ``reference`` is longer than the bound, scaled back
    onto it. ``norm`` > 0: a fixed bound; ``adaptive`` > 0: ``adaptive`` times the median
    change norm of the round (both: the smaller bound). 0 and 0: unchanged. ``clipped``, if
    given, gets the indices of the rows that were scaled."""
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
    over = norms > bound
    if clipped is not None:
        clipped.extend(int(i) for i in torch.nonzero(over).flatten())
    scale = torch.where(over, bound / norms.clamp(min=1e-300), torch.ones_like(norms))
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


def krum_select(values: torch.Tensor, byzantine: int, keep: int,
                scores: torch.Tensor | None = None) -> list[int]:
    """The ``keep`` rows of lowest Krum score (``scores``, or computed), in row order (ties:
    the earlier row)."""
    scores = krum_scores(values, byzantine) if scores is None else scores
    order = torch.sort(scores, stable=True).indices[:keep]
    return sorted(int(i) for i in order)


def fltrust(values: torch.Tensor, reference: torch.Tensor, trusted: torch.Tensor,
            trust: list[float] | None = None) -> torch.Tensor:
    """FLTrust's step (Cao et al., NDSS 2021): with ``g0 = trusted - reference`` (the server's
    change on its clean sample) and ``gi`` each row's change, the new vector is
    ``reference + sum_i t_i * (|g0| / |gi|) * gi / sum_i t_i``, ``t_i = max(0, cos(gi, g0))``.
    Every row moves the model by at most ``|g0|``, and a row pointing away from ``g0`` not at
    all. No row with positive trust (or ``g0 = 0``): ``reference`` unchanged. ``trust``, if
    given, gets each row's ``t_i``. Float64, rows summed in order."""
    ref = reference.to(torch.float64)
    g0 = trusted.to(torch.float64) - ref
    g0_norm = float(g0.norm())
    changes = values.to(torch.float64) - ref
    norms = changes.norm(dim=1)
    cosines = (changes @ g0) / (norms * g0_norm).clamp(min=1e-300)
    weights = cosines.clamp(min=0.0)
    weights[norms == 0] = 0.0  # a client that did not move carries no direction
    if trust is not None:
        trust.extend(round(float(w), 6) for w in weights)
    total = float(weights.sum())
    if total <= 0 or g0_norm == 0:
        return ref.clone()
    step = torch.zeros_like(ref)
    for i in range(values.shape[0]):
        if weights[i] > 0:
            step += changes[i] * (float(weights[i]) * g0_norm / float(norms[i]))
    return ref + step / total


def resolved_rule(rule: str, replies: int, byzantine: int) -> str:
    """The rule that combines a round of ``replies`` valid updates: ``auto`` is multi-Krum
    where it has a hostile update to look for (``byzantine`` > 0) and can score them (more
    than ``byzantine + 2``), else the mean."""
    if rule != "auto":
        return rule
    return "multi_krum" if 0 < byzantine and replies > byzantine + 2 else "mean"


def after_refusals(settings: Any, refused: int) -> Any:
    """``settings`` (``[federation]``) for a round in which screening refused ``refused``
    replies: under ``auto``, ``byzantine`` counts the hostile replies per round it tolerates,
    and a refused reply was one of them, so multi-Krum leaves that many fewer out of the valid
    ones (a client caught lying about its sample count does not also cost an honest update).
    The explicit Krum rules keep their ``byzantine`` as configured."""
    if settings.aggregator != "auto" or refused <= 0:
        return settings
    tolerated = copy.copy(settings)
    tolerated.byzantine = max(0, settings.byzantine - refused)
    return tolerated


def aggregate_vectors(values: torch.Tensor, weights: Sequence[float], rule: str, *,
                      trim_fraction: float = 0.1, byzantine: int = 1,
                      left_out: list[int] | None = None,
                      krum_ratios: list[float | None] | None = None) -> torch.Tensor:
    """The new global vector (float32) from the round's update rows by ``rule``. ``left_out``,
    if given, gets the rows a Krum rule did not select; ``krum_ratios`` their Krum scores over
    the round's median score (how far each stood out: an honest round's farthest update sets
    the scale that a hostile one must exceed to be told apart)."""
    rule = resolved_rule(rule, values.shape[0], byzantine)
    if rule == "mean":
        out = weighted_mean(values, weights)
    elif rule == "median":
        out = coordinate_median(values)
    elif rule == "trimmed_mean":
        out = trimmed_mean(values, trim_fraction)
    elif rule in ("krum", "multi_krum"):
        keep = 1 if rule == "krum" else values.shape[0] - byzantine
        scores = krum_scores(values, byzantine)
        rows = krum_select(values, byzantine, max(1, keep), scores)
        out_rows = [i for i in range(values.shape[0]) if i not in rows]
        if left_out is not None:
            left_out.extend(out_rows)
        if krum_ratios is not None:
            median = float(scores.median())
            # None: every score 0 (identical rows), where no row stands out
            krum_ratios.extend(round(float(scores[i]) / median, 4) if median > 0 else None
                               for i in out_rows)
        out = weighted_mean(values[rows], [weights[i] for i in rows])
    else:
        raise ValueError(f"unknown aggregator {rule!r}; choose one of {list(AGGREGATORS)}")
    return out.to(torch.float32)


def repeated_rows(rows: torch.Tensor, held: torch.Tensor | None = None) -> list[int]:
    """The rows that repeat an earlier row exactly (values and, if given, held coordinates):
    honest clients, with their own data and their own random batches, never send the same
    update twice, so all but the first copy are one hostile update sent under several names
    (colluding clients replaying one stale model). Under ``auto`` the copies count once: a
    group of identical updates would otherwise be each other's nearest neighbours, the most
    typical updates to Krum."""
    seen: set[bytes] = set()
    repeats = []
    for i in range(rows.shape[0]):
        # A digest of each row's buffer, not a copy of its bytes: rows can be whole models.
        digest = hashlib.blake2b(rows[i].contiguous().numpy().data, digest_size=16)
        if held is not None:
            digest.update(held[i].contiguous().numpy().data)
        key = digest.digest()
        if key in seen:
            repeats.append(i)
        seen.add(key)
    return repeats


def combine(updates: Sequence[torch.Tensor], samples: Sequence[int], reference: torch.Tensor,
            settings: Any, clipped: list[int] | None = None,
            left_out: list[int] | None = None,
            krum_ratios: list[float | None] | None = None,
            repeats: list[int] | None = None, trusted: torch.Tensor | None = None,
            trust: list[float] | None = None) -> torch.Tensor:
    """The round's aligned update vectors combined as ``settings`` (the config's
    ``[federation]``: ``update_clip_norm``, ``adaptive_clip``, ``aggregator``,
    ``trim_fraction``, ``byzantine``) says; the new global vector. ``clipped`` and
    ``left_out``, if given, get the positions (in ``updates``) of the updates that clipping
    scaled back and of those a Krum rule left out; ``krum_ratios`` how far each of those
    stood out (``aggregate_vectors``); ``repeats`` the exact copies of an earlier update that
    ``auto`` counted once (``repeated_rows``). ``trusted``: the server's own update on its clean
    sample, which ``fltrust`` needs (``trust`` gets each reply's weight; a reply of weight 0 is
    also in ``left_out``).

    Plain FedAvg (``mean`` without adaptive clipping) keeps its running float64 sum over the
    replies in order, so its results are those of every run before robust rules existed."""
    if settings.aggregator == "mean" and settings.adaptive_clip <= 0:
        mean = WeightedMean()
        for i, (values, n) in enumerate(zip(updates, samples)):
            if settings.update_clip_norm > 0:
                delta = values - reference
                norm = float(delta.norm())
                if norm > settings.update_clip_norm:
                    values = reference + delta * (settings.update_clip_norm / norm)
                    if clipped is not None:
                        clipped.append(i)
            mean.add(values, float(n))
        return mean.result()
    stacked = torch.stack(list(updates))
    weights = [float(n) for n in samples]
    kept = list(range(len(weights)))
    if settings.aggregator == "auto":
        copies = repeated_rows(stacked)
        if copies:
            if repeats is not None:
                repeats.extend(copies)
            kept = [i for i in kept if i not in copies]
            stacked, weights = stacked[kept], [weights[i] for i in kept]
    # Clipped with the copies gone: the median change norm is over distinct updates.
    local_clipped: list[int] = []
    rows = clip_updates(stacked, reference, norm=settings.update_clip_norm,
                        adaptive=settings.adaptive_clip, clipped=local_clipped)
    local_left_out: list[int] = []
    if settings.aggregator == "fltrust":
        if trusted is None:
            raise ValueError("fltrust needs the server's own update on its clean sample")
        weights_out: list[float] = []
        out = fltrust(rows, reference, trusted, weights_out).to(torch.float32)
        local_left_out = [i for i, w in enumerate(weights_out) if w <= 0]
        if trust is not None:
            trust.extend(weights_out)
    else:
        out = aggregate_vectors(rows, weights, settings.aggregator,
                                trim_fraction=settings.trim_fraction,
                                byzantine=settings.byzantine, left_out=local_left_out,
                                krum_ratios=krum_ratios)
    if clipped is not None:
        clipped.extend(kept[i] for i in local_clipped)
    if left_out is not None:
        left_out.extend(kept[i] for i in local_left_out)
    return out


def is_plain_mean(settings: Any) -> bool:
    """The defaults: FedAvg without clipping, which every method keeps on its own code path
    (so its results stay those of every run before robust rules existed)."""
    return (settings.aggregator == "mean" and settings.update_clip_norm <= 0
            and settings.adaptive_clip <= 0)


def combine_held(rows: torch.Tensor, held: torch.Tensor | None, samples: Sequence[float],
                 reference: torch.Tensor, settings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine`` for replies that each hold only some coordinates (per-client masks).

    ``rows`` ``[clients, P]``: each client's dense vector; ``held`` ``[clients, P]`` bool:
    the coordinates its mask holds (None: all); ``reference`` ``[P]``: the current vector.
    Returns the new vector (float32) and, per coordinate, the summed sample weight of the
    clients that went into it (float64; 0: nobody), as ``average_over_holders`` weighs holders.

    - Clipping bounds each client's change on the coordinates it holds (``clip_updates``:
      ``update_clip_norm`` and/or ``adaptive_clip`` times the round's median change norm).
    - ``mean``: per coordinate, weighted by samples over its holders.
    - ``median`` / ``trimmed_mean``: per coordinate over its holders only, unweighted
      (``trim_count(trim_fraction, holders)`` from each end).
    - ``krum`` / ``multi_krum``: clients are scored on their vectors with the coordinates they
      do not hold at the reference (no change there); the holders-weighted mean is then taken
      over the selected clients only (the returned weights count only those).
    - ``auto``: exact copies of an earlier reply counted once (``repeated_rows``), then
      ``multi_krum`` with more than ``byzantine + 2`` clients, else ``mean``.

    A coordinate with no holder keeps its reference value (callers may override). Float64
    arithmetic, deterministic (clients in row order)."""
    n, size = rows.shape
    weights = torch.tensor([float(s) for s in samples], dtype=torch.float64)
    ref = reference.to(torch.float64).reshape(-1)
    if held is None:
        held = torch.ones((n, size), dtype=torch.bool)
    # A coordinate a client does not hold counts as no change, for clipping and Krum alike.
    x = torch.where(held, rows.to(torch.float64), ref)
    if settings.aggregator == "auto":
        copies = repeated_rows(x, held)  # counted once (``repeated_rows``)
        if copies:
            distinct = [i for i in range(n) if i not in copies]
            x, held, weights, n = x[distinct], held[distinct], weights[distinct], len(distinct)
    x = clip_updates(x, ref, norm=settings.update_clip_norm, adaptive=settings.adaptive_clip)
    rule = resolved_rule(settings.aggregator, n, settings.byzantine)
    if rule in ("krum", "multi_krum"):
        keep = 1 if rule == "krum" else n - settings.byzantine
        selected = torch.zeros(n, dtype=torch.bool)
        selected[krum_select(x, settings.byzantine, max(1, keep))] = True
        held = held & selected[:, None]
        rule = "mean"
    counts = held.sum(0)
    holder_weight = torch.zeros(size, dtype=torch.float64)
    for i in range(n):  # row by row, in client order, as average_over_holders sums
        holder_weight += held[i].to(torch.float64) * weights[i]
    if rule == "mean":
        sums = torch.zeros(size, dtype=torch.float64)
        for i in range(n):
            sums += torch.where(held[i], x[i], 0.0) * weights[i]
        out = sums / holder_weight.clamp(min=1e-300)
    elif rule in ("median", "trimmed_mean"):
        # Each column sorted with its holders first (non-held entries at +inf, last); the
        # holders' order statistics are then picked by each column's holder count.
        ordered = torch.where(held, x, math.inf).sort(dim=0).values
        if rule == "median":
            low = ((counts - 1) // 2).clamp(min=0)
            high = counts // 2
            out = (ordered.gather(0, low[None]) + ordered.gather(0, high[None]))[0] / 2
        else:
            trim_count(settings.trim_fraction, 1)  # refuses a fraction out of range
            ceil = torch.ceil(settings.trim_fraction * counts.to(torch.float64) - 1e-9).long()
            trim = torch.minimum(ceil, (counts - 1) // 2).clamp(min=0)
            rank = torch.arange(n)[:, None]
            kept = (rank >= trim) & (rank < counts - trim)
            out = (torch.where(kept, ordered, 0.0).sum(0)
                   / (counts - 2 * trim).clamp(min=1).to(torch.float64))
    else:
        raise ValueError(f"unknown aggregator {rule!r}; choose one of {list(AGGREGATORS)}")
    return torch.where(counts > 0, out, ref).to(torch.float32), holder_weight


def holders_average(
    contributions: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float]],
    shapes: Mapping[str, torch.Size], reference: Mapping[str, torch.Tensor], settings: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each weight over the clients whose mask holds it: FedAvg's weighted mean
    (``average_over_holders``, the old code path, for the default settings) or the rule of
    ``federation.aggregator`` (``combine_over_holders``)."""
    if is_plain_mean(settings):
        return average_over_holders(contributions, shapes)
    return combine_over_holders(contributions, shapes, reference, settings)


def combine_over_holders(
    contributions: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float]],
    shapes: Mapping[str, torch.Size], reference: Mapping[str, torch.Tensor], settings: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``average_over_holders`` under the rule of ``settings`` (``combine_held``): the same
    ``(dense tensors, mask, weight)`` contributions in, the same ``(averages, holder weight
    per masked parameter)`` out; parameters without a mask entry are held by everyone. Unlike
    ``average_over_holders``, a weight nobody holds keeps its ``reference`` value, not 0."""
    names = list(shapes)
    rows, held, samples, masked = [], [], [], set()
    for dense, mask, weight in contributions:
        rows.append(torch.cat([dense[n].reshape(-1).to(torch.float64) for n in names]))
        held.append(torch.cat([mask[n].reshape(-1).to(torch.bool) if n in mask
                               else torch.ones(math.prod(shapes[n]), dtype=torch.bool)
                               for n in names]))
        samples.append(weight)
        masked.update(n for n in names if n in mask)
    flat_reference = torch.cat([reference[n].reshape(-1) for n in names])
    if not rows:  # nothing held anywhere: the caller decides (a failed round)
        return {n: reference[n].to(torch.float32).clone() for n in names}, {}
    values, weight = combine_held(torch.stack(rows), torch.stack(held), samples, flat_reference,
                                  settings)
    averages, holders, start = {}, {}, 0
    for n in names:
        size = math.prod(shapes[n])
        averages[n] = values[start:start + size].reshape(shapes[n])
        if n in masked:
            holders[n] = weight[start:start + size].reshape(shapes[n])
        start += size
    return averages, holders


# ---- the mask round: robust means of saliency scores ----------------------------------------

#: how the server combines the clients' saliency scores before the global top-k
SCORE_RULES = ("clipped", "mean", "normalised", "trimmed_mean", "median")
#: ``clipped``: no client's scores may sum to more than this multiple of the median client's
#: sum. Honest clients' sums on the CPU reference lie within 0.6 to 1.6 times the median
#: (docs/reliability.md), so honest masks are the paper's bit for bit.
SCORE_CLIP = 2.0


def score_total(flat: torch.Tensor) -> float:
    """One client's total say in the mask: the sum of its scores (float64)."""
    return float(flat.to(torch.float64).sum())


def score_bound(totals: Sequence[float]) -> float:
    """The most a client's scores may sum to under ``clipped``: ``SCORE_CLIP`` times the
    median client's sum."""
    return SCORE_CLIP * statistics.median(totals)


def combine_scores(scores: Iterable[tuple[torch.Tensor, float]], count: int, *,
                   rule: str = "mean", trim_fraction: float = 0.1,
                   totals: Sequence[float] = ()) -> torch.Tensor:
    """One flat score vector from the clients' ``(scores, weight)`` pairs, as ``rule`` says:

    - ``mean``: the weighted mean (the paper); one client's huge scores dominate it;
    - ``clipped`` (the default): the weighted mean after scaling down every client whose
      scores sum to more than ``SCORE_CLIP`` times the median of ``totals`` (every client's
      ``score_total``, which the caller computes in a first pass): the paper's mean until a
      client's total stands out, and then that client counts as at most twice a typical one;
    - ``normalised``: each client's scores divided by their sum first, then the weighted mean:
      every client has the same total say, so one client can move the scores of a layer by at
      most its share of the clients;
    - ``trimmed_mean`` / ``median``: per weight, over the clients, unweighted (as the update
      rules); these hold every client's scores at once, in float32.

    ``SetupFailed`` when no scores came."""
    if rule not in SCORE_RULES:
        raise ValueError(f"score rule must be one of {SCORE_RULES}, got {rule!r}")
    if rule in ("mean", "normalised", "clipped"):
        bound = score_bound(totals) if rule == "clipped" and totals else None
        mean = WeightedMean()
        for flat, weight in scores:
            if rule == "normalised":
                total = score_total(flat)
                flat = flat.to(torch.float64) / total if total > 0 else torch.zeros_like(flat)
            elif bound is not None:
                total = score_total(flat)
                if total > bound:  # scaled only then: below it, the paper's mean bit for bit
                    flat = flat.to(torch.float64) * (bound / total)
            mean.add(flat, weight)
        if mean.count == 0:
            raise SetupFailed("no client sent valid saliency scores: no mask can be built")
        return mean.result()
    rows = [flat.to(torch.float32) for flat, _ in scores]
    if not rows:
        raise SetupFailed("no client sent valid saliency scores: no mask can be built")
    stacked = torch.stack(rows)
    out = torch.empty(count, dtype=torch.float32)
    chunk = 1 << 20  # coordinates at a time: the float64 copy stays small
    for start in range(0, count, chunk):
        part = stacked[:, start:start + chunk]
        out[start:start + chunk] = (coordinate_median(part) if rule == "median"
                                    else trimmed_mean(part, trim_fraction)).to(torch.float32)
    return out
