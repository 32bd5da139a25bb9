"""Split a labelled data set among federated clients.

All schemes return one sorted ``int64`` index array per client; arrays are disjoint and
the result is a pure function of ``(labels, num_clients, scheme, parameters, seed)``
(one ``np.random.default_rng(seed)`` drives everything).

Schemes (``PARTITIONS``):

``balanced_dirichlet``
    The SSFL paper's partition.  Followed: the SSFL authors' ``partition_data_dirichlet``
    (``riohib/SSFL``, ``data_preprocessing/partition_utils.py``; the same algorithm as
    ``_partition_cifar10_dirichlet`` in ``new_data_part.py`` and as used by
    ``cifar10_partitioner.py``, itself after the FedDyn code).  Every client gets the same
    number of samples; client ``k`` has class priors ``p_k ~ Dir(alpha * 1_C)``; the
    client "slots" are visited in a random order and each slot draws a class from its
    client's prior renormalised over the classes that still have samples left, then takes
    one remaining sample of that class.  Differences from the authors' code, both
    deliberate: every client gets exactly ``N // K`` samples and the ``N mod K`` leftover
    samples are unused (the authors give the first ``N mod K`` clients one extra sample),
    and the slot loop is vectorised (see :func:`_balanced_dirichlet`), which draws from
    the same distribution but not the same random stream as a per-sample loop.
``dirichlet``
    Classic label-skew partition (Hsu et al., 2019): for every class, its samples are
    split among all clients with proportions ``q ~ Dir(alpha * 1_K)``; client sizes vary.
    Redrawn until every client holds at least ``min_samples`` samples.
``pathological``
    McMahan et al. (2017) sorted shards: sort samples by label, cut them into
    ``num_clients * classes_per_client`` shards, give every client
    ``classes_per_client`` shards at random.  Shards are cut *within* classes (the
    number of shards per class is proportional to the class size), so a client holds at
    most ``classes_per_client`` classes even when class sizes are not multiples of the
    shard size; for equal, divisible class sizes (CIFAR-10, 100 clients, 2 classes each)
    this is exactly McMahan's split.  If there are fewer shards than classes, some
    classes get no shard and are left out.
``iid``
    Random permutation cut into ``num_clients`` nearly equal parts (sizes differ by at
    most one; all samples used).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PARTITIONS", "class_counts", "matching_test_splits", "partition"]

PARTITIONS: tuple[str, ...] = ("balanced_dirichlet", "dirichlet", "pathological", "iid")

# Slots drawn per vectorised step of the balanced Dirichlet fill; small enough that the
# work thrown away when a class runs out stays cheap, large enough to amortise numpy calls.
_FILL_CHUNK = 4096
_MAX_DIRICHLET_TRIES = 1000


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.3,
    classes_per_client: int = 2,
    seed: int = 0,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Split sample indices ``0..N-1`` among ``num_clients`` clients.

    Args:
        labels: integer class labels ``[N]`` (any non-negative ints; missing classes ok).
        num_clients: number of clients ``K`` (1 ≤ K ≤ N).
        scheme: one of :data:`PARTITIONS`.
        alpha: Dirichlet concentration (> 0; small = skewed) for the Dirichlet schemes.
        classes_per_client: classes per client for ``pathological`` (1 ≤ c ≤ #classes).
        seed: seed of the ``np.random.default_rng`` that drives the split.
        min_samples: smallest client size accepted by ``dirichlet``.

    Returns:
        ``K`` sorted, disjoint ``int64`` index arrays.
    """
    y = _check_labels(labels)
    n = y.shape[0]
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) exceeds the number of samples ({n}); "
                         f"every client needs at least one sample")
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of "
                         f"{', '.join(PARTITIONS)}")
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "pathological":
        num_classes = np.unique(y).size
        if not 1 <= classes_per_client <= num_classes:
            raise ValueError(f"classes_per_client must be in [1, {num_classes}] (the number "
                             f"of classes present), got {classes_per_client}")
        if num_clients * classes_per_client > n:
            raise ValueError(f"num_clients * classes_per_client = "
                             f"{num_clients * classes_per_client} shards exceed the "
                             f"{n} samples; use fewer clients or classes per client")
        parts = _pathological(y, num_clients, int(classes_per_client), rng)
    else:
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if scheme == "balanced_dirichlet":
            parts = _balanced_dirichlet(y, num_clients, float(alpha), rng)
        else:
            if min_samples < 0 or min_samples * num_clients > n:
                raise ValueError(f"min_samples ({min_samples}) * num_clients ({num_clients}) "
                                 f"must be between 0 and the number of samples ({n})")
            parts = _dirichlet(y, num_clients, float(alpha), int(min_samples), rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``[num_clients, num_classes]`` int64 table of how many samples of each class a client has."""
    y = np.asarray(labels).astype(np.int64, copy=False)
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, idx in enumerate(parts):
        labels = y[np.asarray(idx, dtype=np.int64)]
        out[k] = np.bincount(labels, minlength=num_classes)[:num_classes]
    return out


# --------------------------------------------------------------------------- helpers


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integers")
    y = y.astype(np.int64)
    if y.size == 0:
        raise ValueError("labels is empty: nothing to partition")
    if y.min() < 0:
        raise ValueError("labels must be non-negative")
    return y


def _shuffled_class_pools(y: np.ndarray, classes: np.ndarray,
                          rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(np.flatnonzero(y == c)) for c in classes]


def _balanced_dirichlet(y: np.ndarray, k: int, alpha: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Equal-size clients with Dirichlet class priors (the SSFL authors' scheme).

    Vectorised fill: a chunk of slots draws classes at once from the priors restricted
    to the classes still available.  Draws are accepted up to the first slot that would
    take a sample from a class with none left; that class is marked exhausted and the
    fill restarts at that slot with fresh draws.  Because each slot's draw only depends
    on which classes are available at its turn, this samples exactly the sequential
    process (renormalise over non-exhausted classes and redraw), with at most
    ``#classes`` restarts.
    """
    classes = np.unique(y)
    c = classes.size
    per_client = y.shape[0] // k
    priors = rng.dirichlet(np.full(c, alpha), size=k)  # [K, C]
    pools = _shuffled_class_pools(y, classes, rng)
    remaining = np.array([p.size for p in pools], dtype=np.int64)

    slots = rng.permutation(np.repeat(np.arange(k), per_client))  # random fill order
    slot_class = np.empty(slots.size, dtype=np.int64)
    pos = 0
    while pos < slots.size:
        avail = remaining > 0
        p = priors * avail  # [K, C]
        row_sum = p.sum(axis=1, keepdims=True)
        # A client whose prior mass sits only on exhausted classes (possible for tiny
        # alpha, where Dirichlet draws underflow to 0) falls back to uniform.
        p = np.where(row_sum > 0, p / np.where(row_sum > 0, row_sum, 1.0), avail / avail.sum())
        cdf = np.cumsum(p, axis=1)
        cdf[:, -1] = np.inf  # guard against round-off leaving u above the last bound
        chunk = slots[pos:pos + _FILL_CHUNK]
        u = rng.random(chunk.size)
        # Per-slot inverse-CDF draw: first class whose cumulative prior exceeds u.
        drawn = (u[:, None] >= cdf[chunk]).sum(axis=1)
        drawn = np.minimum(drawn, c - 1)
        bad = ~avail[drawn]  # only reachable through round-off at zero-width intervals
        if bad.any():
            drawn[bad] = np.flatnonzero(avail)[-1]
        # Rank of each draw among earlier draws of the same class in this chunk.
        order = np.argsort(drawn, kind="stable")
        sorted_cls = drawn[order]
        starts = np.searchsorted(sorted_cls, sorted_cls, side="left")
        rank = np.empty_like(drawn)
        rank[order] = np.arange(drawn.size) - starts
        overflow = np.flatnonzero(rank >= remaining[drawn])
        accept = drawn.size if overflow.size == 0 else int(overflow[0])
        acc = drawn[:accept]
        slot_class[pos:pos + accept] = acc
        used = np.bincount(acc, minlength=c)
        remaining -= used
        pos += accept

    # Hand out pool members in slot order (the authors pop from shuffled pools).
    owner = np.full(y.shape[0], -1, dtype=np.int64)
    order = np.argsort(slot_class, kind="stable")  # slots grouped by class, in slot order
    bounds = np.searchsorted(slot_class[order], np.arange(c + 1))
    for j in range(c):
        sel = order[bounds[j]:bounds[j + 1]]
        owner[pools[j][:sel.size]] = slots[sel]
    return _group_by_owner(owner, k)


def _group_by_owner(owner: np.ndarray, k: int) -> list[np.ndarray]:
    """Index arrays per client from a per-sample owner table (-1 = unused sample)."""
    idx = np.flatnonzero(owner >= 0)
    by_owner = idx[np.argsort(owner[idx], kind="stable")]
    return np.split(by_owner, np.cumsum(np.bincount(owner[idx], minlength=k))[:-1])


def _dirichlet(y: np.ndarray, k: int, alpha: float, min_samples: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Hsu et al. label skew: each class split among clients by ``Dir(alpha)`` proportions."""
    classes = np.unique(y)
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(y == cls))
            q = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(q)[:-1] * idx.size).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
                sizes[client] += piece.size
        if sizes.min() >= min_samples:
            return [np.concatenate(p) for p in parts]
    raise ValueError(
        f"dirichlet partition: no draw in {_MAX_DIRICHLET_TRIES} tries gave every one of "
        f"{k} clients at least {min_samples} samples (alpha={alpha}, N={y.size}); increase "
        f"alpha, lower min_samples or use fewer clients")


def _pathological(y: np.ndarray, k: int, c: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan sorted shards, cut within classes; see the module docstring."""
    classes = np.unique(y)
    pools = _shuffled_class_pools(y, classes, rng)
    sizes = np.array([p.size for p in pools], dtype=np.int64)
    n_shards = k * c
    shards_per_class = _largest_remainder(sizes, n_shards)
    shards: list[np.ndarray] = []
    for pool, m in zip(pools, shards_per_class):
        if m:
            shards.extend(np.array_split(pool, int(m)))
    assert len(shards) == n_shards
    perm = rng.permutation(n_shards)
    return [np.concatenate([shards[s] for s in perm[i * c:(i + 1) * c]]) for i in range(k)]


def _largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer shard counts ∝ ``sizes`` summing to ``total``, each ≤ its size.

    When ``total ≥ #classes`` every class gets at least one shard, so no data is dropped.
    """
    n = sizes.sum()
    exact = sizes * total / n
    alloc = np.floor(exact).astype(np.int64)
    rest = total - alloc.sum()
    alloc[np.argsort(-(exact - alloc), kind="stable")[:rest]] += 1
    if total >= sizes.size:
        for j in np.flatnonzero(alloc == 0):
            # Take from the class with most shards per sample (least harm), keeping ≥ 1.
            ratio = np.where(alloc >= 2, alloc / sizes, -1.0)
            donor = int(np.argmax(ratio))
            alloc[donor] -= 1
            alloc[j] += 1
    alloc = np.minimum(alloc, sizes)
    # Rounding can push a class above its size only when total is close to n; give the
    # excess to classes with room so the total stays exact.
    deficit = total - alloc.sum()
    while deficit > 0:
        room = np.flatnonzero(alloc < sizes)
        alloc[room[:deficit]] += 1
        deficit = total - alloc.sum()
    return alloc


def matching_test_splits(
    test_labels: np.ndarray,
    train_counts: np.ndarray,
    *,
    per_client: int,
    seed: int = 0,
) -> list[np.ndarray]:
    """A test split per client that follows that client's training class distribution.

    This is the personalised evaluation protocol of the SSFL and DisPFL code: a client is
    tested on the classes it trains on, in the same proportions. Client ``k`` gets
    ``per_client`` test indices whose class counts are ``per_client * train_counts[k] /
    sum(train_counts[k])`` (largest-remainder rounding), drawn without replacement inside the
    client from the global test set; different clients may share test images, as the test set
    is far smaller than the union of the clients' needs. A class with fewer test images than
    needed contributes all it has.
    """
    y = _check_labels(test_labels)
    counts = np.asarray(train_counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] <= int(y.max(initial=0)):
        raise ValueError(f"train_counts must be [clients, classes], got shape {counts.shape}")
    if per_client < 1:
        raise ValueError(f"per_client must be at least 1, got {per_client}")
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(y == c) for c in range(counts.shape[1])]
    splits = []
    for row in counts:
        if row.sum() == 0:
            splits.append(np.empty(0, dtype=np.int64))
            continue
        exact = row * per_client / row.sum()
        wanted = np.floor(exact).astype(np.int64)
        # Largest remainders get the leftover samples; classes the client lacks get none.
        wanted[np.argsort(-(exact - wanted), kind="stable")[: per_client - wanted.sum()]] += 1
        chosen = [rng.choice(pools[c], size=min(int(n), len(pools[c])), replace=False)
                  for c, n in enumerate(wanted) if n > 0]
        splits.append(np.sort(np.concatenate(chosen)).astype(np.int64))
    return splits
