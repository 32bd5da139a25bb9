"""Client partitioning: hand-checkable cases, invariants, determinism and skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ssfl.data import PARTITIONS, class_counts, partition


def _assert_valid(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"
        assert p.size == 0 or (p[0] >= 0 and p[-1] < n)
    flat = np.concatenate(parts)
    assert np.unique(flat).size == flat.size, "clients must be disjoint"


def test_iid_tiny_by_hand() -> None:
    labels = np.repeat(np.arange(3), 4)  # 12 samples
    parts = partition(labels, 3, "iid", seed=0)
    assert [p.size for p in parts] == [4, 4, 4]
    _assert_valid(parts, 12, 3)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(12))


def test_iid_uneven_sizes_differ_by_at_most_one() -> None:
    parts = partition(np.zeros(10, dtype=int), 3, "iid")
    assert sorted(p.size for p in parts) == [3, 3, 4]


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_every_scheme_valid_and_deterministic(scheme: str) -> None:
    labels = np.random.default_rng(5).integers(0, 10, size=2000)
    a = partition(labels, 20, scheme, seed=3)
    b = partition(labels, 20, scheme, seed=3)
    c = partition(labels, 20, scheme, seed=4)
    _assert_valid(a, 2000, 20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(p.size >= 1 for p in a)


def test_balanced_dirichlet_exact_sizes() -> None:
    labels = np.repeat(np.arange(10), 1003)  # N = 10030, K = 7 -> 1432 each, 6 unused
    parts = partition(labels, 7, "balanced_dirichlet", alpha=0.1, seed=0)
    _assert_valid(parts, labels.size, 7)
    assert [p.size for p in parts] == [labels.size // 7] * 7
    counts = class_counts(labels, parts, 10)
    assert counts.shape == (7, 10) and counts.dtype == np.int64
    assert np.all(counts.sum(axis=0) <= 1003)


def test_balanced_dirichlet_when_classes_run_out() -> None:
    """Tiny alpha concentrates clients on few classes, forcing many exhaustions."""
    labels = np.repeat(np.arange(5), [3, 50, 7, 200, 40])
    for seed in range(20):
        parts = partition(labels, 6, "balanced_dirichlet", alpha=0.01, seed=seed)
        _assert_valid(parts, labels.size, 6)
        assert [p.size for p in parts] == [50] * 6


def test_balanced_dirichlet_cifar_scale_is_fast() -> None:
    import time

    labels = np.repeat(np.arange(10), 5000)
    t0 = time.perf_counter()
    parts = partition(labels, 100, "balanced_dirichlet", alpha=0.3, seed=0)
    assert time.perf_counter() - t0 < 2.0
    assert {p.size for p in parts} == {500}


def _mean_max_class_fraction(labels: np.ndarray, scheme: str, alpha: float) -> float:
    parts = partition(labels, 20, scheme, alpha=alpha, seed=0)
    counts = class_counts(labels, parts, 10)
    return float((counts.max(axis=1) / counts.sum(axis=1)).mean())


@pytest.mark.parametrize("scheme", ["balanced_dirichlet", "dirichlet"])
def test_lower_alpha_is_more_skewed(scheme: str) -> None:
    labels = np.repeat(np.arange(10), 400)
    skewed = _mean_max_class_fraction(labels, scheme, 0.1)
    uniform = _mean_max_class_fraction(labels, scheme, 100.0)
    assert skewed > uniform + 0.3
    assert uniform < 0.25  # near 1/10 for nearly uniform priors


def test_dirichlet_min_samples() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "dirichlet", alpha=0.5, min_samples=20, seed=1)
    _assert_valid(parts, 1000, 10)
    assert min(p.size for p in parts) >= 20
    assert sum(p.size for p in parts) == 1000  # classic Dirichlet uses every sample


def test_pathological_at_most_c_classes() -> None:
    labels = np.repeat(np.arange(10), 500)
    parts = partition(labels, 100, "pathological", classes_per_client=2, seed=0)
    _assert_valid(parts, labels.size, 100)
    counts = class_counts(labels, parts, 10)
    assert (counts > 0).sum(axis=1).max() <= 2
    assert {p.size for p in parts} == {50}  # McMahan: 200 shards of 25
    assert counts.sum() == labels.size


def test_pathological_uneven_classes() -> None:
    labels = np.random.default_rng(0).integers(0, 7, size=997)
    for c in (1, 3, 7):
        parts = partition(labels, 13, "pathological", classes_per_client=c, seed=2)
        _assert_valid(parts, labels.size, 13)
        assert (class_counts(labels, parts, 7) > 0).sum(axis=1).max() <= c
        assert sum(p.size for p in parts) == labels.size


@settings(max_examples=40, deadline=None, database=None)  # no .hypothesis/ in the repo
@given(
    n=st.integers(1, 300),
    num_classes=st.integers(1, 12),
    k=st.integers(1, 30),
    scheme=st.sampled_from(PARTITIONS),
    seed=st.integers(0, 2**16),
)
def test_invariants_property(n: int, num_classes: int, k: int, scheme: str, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    k = min(k, n)
    try:
        parts = partition(labels, k, scheme, alpha=0.5, classes_per_client=1, seed=seed,
                          min_samples=0)
    except ValueError as exc:  # only the documented, explained failure is allowed
        assert scheme == "pathological" and "shards exceed" in str(exc)
        return
    _assert_valid(parts, n, k)
    if scheme == "balanced_dirichlet":
        assert all(p.size == n // k for p in parts)
    if scheme == "iid" or (scheme == "pathological" and k >= np.unique(labels).size):
        assert sum(p.size for p in parts) == n  # pathological drops classes only if
        # there are fewer shards (k * 1) than classes


def test_class_counts_by_hand() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    assert class_counts(labels, parts, 4).tolist() == [[1, 0, 1, 0], [1, 1, 2, 0]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0, "scheme": "iid"}, "num_clients"),
        ({"num_clients": 11, "scheme": "iid"}, "exceeds the number of samples"),
        ({"num_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_clients": 2, "scheme": "balanced_dirichlet", "alpha": -1.0}, "alpha"),
        ({"num_clients": 2, "scheme": "pathological", "classes_per_client": 0}, r"\[1, 2\]"),
        ({"num_clients": 2, "scheme": "pathological", "classes_per_client": 3}, r"\[1, 2\]"),
        ({"num_clients": 2, "scheme": "shards"}, "balanced_dirichlet, dirichlet"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    labels = np.array([0, 1] * 5)
    with pytest.raises(ValueError, match=match):
        partition(labels, **kwargs)


def test_matching_test_splits_follow_each_clients_classes_by_hand() -> None:
    from ssfl.data.partition import matching_test_splits

    test_labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    train_counts = np.array([[30, 10, 0], [0, 0, 5], [1, 1, 1]])
    splits = matching_test_splits(test_labels, train_counts, per_client=8, seed=0)
    got = [np.bincount(test_labels[s], minlength=3).tolist() for s in splits]
    assert got[0] == [6, 2, 0]  # 8 * 3/4 and 8 * 1/4
    assert got[1] == [0, 0, 8]
    assert sorted(got[2]) == [2, 3, 3] and sum(got[2]) == 8
    assert all(len(np.unique(s)) == len(s) for s in splits)  # no repeats within a client
    again = matching_test_splits(test_labels, train_counts, per_client=8, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(splits, again))
