"""Robust aggregation rules on hand-computed cases."""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from algo_helpers import make_setup

from ssfl import algorithms
from ssfl.algorithms.base import Reply
from ssfl.algorithms.dispfl import neighbour_average
from ssfl.algorithms.feddst import FedDST
from ssfl.algorithms.robust import (
    after_refusals,
    aggregate_vectors,
    clip_updates,
    combine,
    combine_held,
    coordinate_median,
    fltrust,
    is_plain_mean,
    krum_scores,
    krum_select,
    repeated_rows,
    trim_count,
    trimmed_mean,
)
from ssfl.algorithms.sparsyfed import topk_magnitude_mask
from ssfl.config import ConfigError, load_config

ROWS = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -1000.0]])


def test_coordinate_median_ignores_one_outlier_per_coordinate() -> None:
    assert coordinate_median(ROWS).tolist() == [2.5, 15.0]  # mean of the two middle values
    assert coordinate_median(ROWS[:3]).tolist() == [2.0, 20.0]


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    # fraction 0.25 of 4 clients: drop one from each end -> mean of the middle two.
    assert trimmed_mean(ROWS, 0.25).tolist() == [2.5, 15.0]
    # Any positive fraction drops at least one (ceil), but a middle always stays.
    assert trimmed_mean(ROWS, 0.01).tolist() == [2.5, 15.0]
    assert [trim_count(0.1, n) for n in (1, 2, 3, 5, 10, 11, 20, 21)] == [0, 0, 1, 1, 1, 2, 2, 3]
    assert trimmed_mean(ROWS[:2], 0.4).tolist() == [1.5, 15.0]  # two values: their mean
    assert trimmed_mean(ROWS, 0.0).tolist() == pytest.approx(ROWS.double().mean(0).tolist())
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(ROWS, 0.5)


def test_krum_scores_by_hand_and_keeps_the_honest_majority() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # f = 1: each row sums its n - f - 2 = 1 nearest squared distance.
    assert krum_scores(x, 1).tolist() == [1.0, 1.0, 1.0, 64.0]
    assert krum_select(x, 1, 1) == [0]  # tie: the earliest row
    assert krum_select(x, 1, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="more than f"):
        krum_scores(x[:3], 1)


def test_clip_fixed_and_adaptive_by_hand() -> None:
    ref = torch.zeros(2)
    rows = torch.tensor([[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]])  # change norms 5, 1, 50
    fixed = clip_updates(rows, ref, norm=2.0)
    assert torch.allclose(fixed, torch.tensor([[1.2, 1.6], [0.6, 0.8], [1.2, 1.6]]))
    adaptive = clip_updates(rows, ref, adaptive=2.0)  # bound 2 x median(5, 1, 50) = 10
    assert torch.allclose(adaptive, torch.tensor([[3.0, 4.0], [0.6, 0.8], [6.0, 8.0]]))
    assert torch.equal(clip_updates(rows, ref), rows)


def test_rules_through_one_entry_point() -> None:
    weights = [1.0, 1.0, 2.0, 100.0]
    mean = aggregate_vectors(ROWS, weights, "mean")
    assert mean.dtype == torch.float32  # the outlier with 100 samples dominates the mean
    assert mean[1] < -900
    assert aggregate_vectors(ROWS, weights, "median").tolist() == [2.5, 15.0]
    assert aggregate_vectors(ROWS, weights, "trimmed_mean", trim_fraction=0.25).tolist() == \
        [2.5, 15.0]
    # Multi-Krum keeps the three honest rows and averages them by samples (1, 1, 2).
    assert aggregate_vectors(ROWS, weights, "multi_krum", byzantine=1).tolist() == \
        pytest.approx([(1 + 2 + 6) / 4, (10 + 20 + 60) / 4])
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate_vectors(ROWS, weights, "mode")


@pytest.mark.slow
def test_a_hostile_client_moves_the_mean_but_not_the_median_in_a_run() -> None:
    """Whole runs (digits, 5 clients per round): one client per round boosts its change by
    1e4 (``[attack]``). The paper's plain FedAvg's weights grow to thousands and it stays at
    chance; with the default (clipping, then multi-Krum) and with the coordinate median they
    stay bounded and the run learns."""
    from ssfl.config import ConfigError, load_config
    from ssfl.sim import run_experiment

    base = ["run.rounds=4", "run.threads=1", "run.progress=false", "federation.num_clients=5",
            "federation.clients_per_round=5", "train.local_epochs=1", "algorithm.density=0.5",
            "attack.kind=boost", "attack.boost=1e4"]
    plain = run_experiment(load_config(None, [*base, "federation.aggregator=mean"]),
                           write=False)
    assert float(plain.final_values.abs().max()) > 1000.0
    assert plain.summary["final_accuracy"] < 0.15
    default = run_experiment(load_config(None, base), write=False)
    assert float(default.final_values.abs().max()) < 10.0
    assert default.summary["final_accuracy"] > 0.5
    median = run_experiment(load_config(None, [*base, "federation.aggregator=median"]),
                            write=False)
    assert float(median.final_values.abs().max()) < 10.0
    assert median.summary["final_accuracy"] > 0.5
    # Rules that need enough replies are refused up front.
    with pytest.raises(ConfigError, match="min_replies to at least 4"):
        load_config(None, [*base, "federation.aggregator=krum"])


# ---------------------------------------------------------------------------- held coordinates


def _rule(aggregator: str = "mean", *, clip: float = 0.0, adaptive: float = 0.0,
          trim: float = 0.25, byzantine: int = 1) -> SimpleNamespace:
    """The ``[federation]`` fields the robust rules read."""
    return SimpleNamespace(aggregator=aggregator, update_clip_norm=clip, adaptive_clip=adaptive,
                           trim_fraction=trim, byzantine=byzantine)


X = -999.0  # a value at a coordinate its client does not hold: must never count
# Coordinates held by 1 (c0), 2 (c0, c1), 3 (c1, c2, c3: c3 hostile), 4 and 0 clients.
HELD_ROWS = torch.tensor([[5.0, 1.0, X, 1.0, X],
                          [X, 3.0, 2.0, 2.0, X],
                          [X, X, 4.0, 3.0, X],
                          [X, X, 1e30, 100.0, X]])
HELD = HELD_ROWS != X
SAMPLES = [1, 1, 2, 4]
REFERENCE = torch.tensor([0.0, 0.0, 0.0, 0.0, 7.0])


def test_combine_held_rules_by_hand() -> None:
    def run(rule: str) -> tuple[list[float], list[float]]:
        values, weight = combine_held(HELD_ROWS, HELD, SAMPLES, REFERENCE, _rule(rule))
        assert values.dtype == torch.float32 and weight.dtype == torch.float64
        return values.tolist(), weight.tolist()

    mean, weight = run("mean")
    assert weight == [1.0, 2.0, 7.0, 8.0, 0.0]  # summed samples of each coordinate's holders
    assert mean[:2] == [5.0, 2.0] and mean[2] > 1e29  # the mean takes the hostile 1e30
    assert mean[3:] == [409 / 8, 7.0]  # (1 + 2 + 6 + 400) / 8; nobody holds the last: reference
    # Median over each coordinate's holders: 1 -> that value, 2 -> their mean, 3 -> the middle
    # (the 1e30 is gone), 4 -> the mean of the two middle values.
    assert run("median") == ([5.0, 2.0, 4.0, 2.5, 7.0], weight)
    # Trimmed mean, fraction 0.25: trim_count(0.25, holders) = 0, 0, 1, 1 from each end.
    assert run("trimmed_mean") == ([5.0, 2.0, 4.0, 2.5, 7.0], weight)
    # Krum (f = 1) scores the vectors with unheld coordinates at the reference:
    # c0 = [5, 1, 0, 1, 7], c1 = [0, 3, 2, 2, 7], c2 = [0, 0, 4, 3, 7]; d(c0,c1) = 34,
    # d(c0,c2) = 46, d(c1,c2) = 14: scores 34, 14, 14, huge -> Krum keeps c1 (tie: the earlier).
    assert run("krum") == ([0.0, 3.0, 2.0, 2.0, 7.0], [0.0, 1.0, 1.0, 1.0, 0.0])
    # Multi-Krum keeps c0, c1, c2 and averages each coordinate over its holders among them.
    values, weight = run("multi_krum")
    assert values == pytest.approx([5.0, 2.0, 10 / 3, 9 / 4, 7.0])
    assert weight == [1.0, 2.0, 3.0, 4.0, 0.0]


def test_combine_held_clips_each_change_on_what_its_client_holds() -> None:
    rows = torch.tensor([[3.0, 100.0], [0.6, 0.8]])
    held = torch.tensor([[True, False], [True, True]])  # c0's 100 is not held: no change
    values, _ = combine_held(rows, held, [1, 1], torch.zeros(2), _rule(clip=1.0))
    assert values.tolist() == pytest.approx([(1.0 + 0.6) / 2, 0.8])  # c0's change 3 -> 1
    # Adaptive: bound 2 x median(1, 5, 50) = 10; only the change of norm 50 is scaled.
    rows = torch.tensor([[1.0], [5.0], [50.0]])
    values, _ = combine_held(rows, None, [1, 1, 1], torch.zeros(1), _rule(adaptive=2.0))
    assert values.tolist() == pytest.approx([(1 + 5 + 10) / 3])


def test_combine_held_without_masks_is_combine() -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(6, 9, generator=g)
    rows[2] *= 1e4
    reference, samples = torch.randn(9, generator=g), [3, 1, 4, 1, 5, 9]
    for rule in ("mean", "median", "trimmed_mean", "krum", "multi_krum"):
        for clip, adaptive in ((0.0, 0.0), (2.0, 0.0), (0.0, 1.5)):
            settings = _rule(rule, clip=clip, adaptive=adaptive, trim=0.2)
            values, weight = combine_held(rows, None, samples, reference, settings)
            torch.testing.assert_close(values, combine(list(rows), samples, reference, settings))
            if clip == adaptive == 0:
                torch.testing.assert_close(values, aggregate_vectors(
                    rows, [float(n) for n in samples], rule, trim_fraction=0.2))
    # A huge row held on one coordinate with other holders there is outvoted by the median.
    held = torch.ones(6, 9, dtype=torch.bool)
    held[5, 1:] = False
    rows[5, 0] = 1e30
    values, _ = combine_held(rows, held, samples, reference, _rule("median"))
    assert values[0].abs() < 1e3


# ---------------------------------------------------------------------------- the methods

HOSTILE = 1e6


def _method(name: str, *overrides: str, density: float = 0.5) -> Any:
    """``name`` on a hand-sized model (a 6x5 weight and a bias), 4 clients."""
    initial = {"w": torch.linspace(-1, 1, 30).reshape(6, 5), "b": torch.zeros(5)}
    setup = make_setup(initial, ["w"], density, 4, ["federation.clients_per_round=4",
                                                    *overrides], name=name)
    return algorithms.get(name)(setup, algorithms.settings_of(setup.config))


def _dense(mask: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """A reply's dense tensors: ``value`` inside the mask (and on the bias), 0 outside."""
    w = torch.where(mask["w"], value, 0.0)
    return {"w": w, "b": torch.full((5,), value)}


ROBUST = ("federation.aggregator=median", "federation.adaptive_clip=2")


@pytest.mark.parametrize("overrides", [(), ("federation.aggregator=median",), ROBUST])
def test_random_clientwise_robust_rules_bound_a_hostile_client(overrides: tuple[str]) -> None:
    alg = _method("random_clientwise", *overrides)
    state = alg.init()
    masks = [alg.mask_of(c) for c in range(4)]
    replies = [Reply(c, 10, (_dense(masks[c], HOSTILE if c == 0 else 1.0), masks[c]))
               for c in range(4)]
    new, _ = alg.aggregate(state, 1, replies, range(4))
    holders = sum(m["w"].int() for m in masks)
    crowded = masks[0]["w"] & (holders >= 3)  # the hostile client and at least 2 honest ones
    if not overrides:  # the mean follows the hostile client everywhere it holds a weight
        assert bool((new.weights["w"][crowded] > 1e5).all())
        return
    assert torch.equal(new.weights["w"][crowded], torch.ones(int(crowded.sum())))
    assert new.weights["b"].tolist() == [1.0] * 5
    if "federation.adaptive_clip=2" in overrides:  # the clipped change is bounded everywhere
        assert float(new.weights["w"].abs().max()) < 1e3
    nobody = holders == 0  # weights no client held keep their value
    assert torch.equal(new.weights["w"][nobody], state.weights["w"][nobody])


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_feddst_robust_rules_bound_a_hostile_client(rule: str) -> None:
    alg = _method("feddst", f"federation.aggregator={rule}", "federation.trim_fraction=0.25")
    state = alg.init()
    # Every client keeps the global mask; three honest ones send 1.0, the hostile one 1e6.
    replies = []
    for c in range(4):
        dense = _dense(state.mask, HOSTILE if c == 0 else 1.0)
        replies.append(Reply(c, 10, (dense, state.mask, None)))
    new, _ = alg.aggregate(state, 1, replies, range(4))
    assert torch.equal(new.mask["w"], state.mask["w"])  # every client held the same mask
    kept = new.weights["w"][new.mask["w"]]
    if rule == "mean":
        assert bool((kept > 1e5).all())
    else:
        assert torch.equal(kept, torch.ones_like(kept))


def test_prunefl_robust_rules_bound_hostile_values_and_importance() -> None:
    def run(rule: str) -> tuple[torch.Tensor, torch.Tensor]:
        alg = _method("prunefl", f"federation.aggregator={rule}", "run.rounds=20")
        state = alg.init()
        count = alg.codec.layout(state.mask).num_values
        honest = torch.linspace(1, 0, 30)  # importance: the first weights matter
        hostile = torch.linspace(0, HOSTILE, 30)  # ... pushing the last ones in
        replies = [Reply(c, 10, (torch.full((count,), HOSTILE if c == 0 else 1.0),
                                 hostile if c == 0 else honest)) for c in range(4)]
        new, _ = alg.aggregate(state, 10, replies, range(4))  # an update round
        return new.weights["b"], new.mask["w"].reshape(-1)

    biases, mask = run("mean")
    assert bool((biases > 1e5).all()) and bool(mask[-1])
    biases, mask = run("median")
    assert biases.tolist() == [1.0] * 5
    assert mask.tolist() == [True] * 15 + [False] * 15  # the honest top half by importance


def test_sparsyfed_robust_rules_bound_a_hostile_client() -> None:
    def run(*overrides: str) -> dict[str, torch.Tensor]:
        alg = _method("sparsyfed", *overrides)
        state = alg.init()
        keep = topk_magnitude_mask({"w": state.weights["w"]}, alg.k)
        replies = [Reply(c, 10, _dense(keep, HOSTILE if c == 0 else 0.5)) for c in range(4)]
        return alg.aggregate(state, 1, replies, range(4))[0].weights

    assert float(run()["w"].max()) > 1e4
    for overrides in (("federation.aggregator=median",),
                      ("federation.aggregator=trimmed_mean", "federation.trim_fraction=0.25")):
        weights = run(*overrides)
        assert weights["b"].tolist() == [0.5] * 5
        # Powerprop space and back: the honest 0.5 comes back (to float32 rounding), the
        # weights nobody kept stay exactly 0.
        assert weights["w"].max().item() == pytest.approx(0.5, rel=1e-6)
        assert int((weights["w"] != 0).sum()) == 15


def test_dispfl_neighbour_average_robust_rules_bound_a_hostile_neighbour() -> None:
    full = {"w": torch.ones(2, 3, dtype=torch.bool)}
    half = {"w": torch.tensor([[True, True, True], [False, False, False]])}
    shapes = {"w": torch.Size([2, 3]), "b": torch.Size([3])}
    own = _dense_small(full, 1.0)
    models = [(own, full), (_dense_small(half, HOSTILE), half), (_dense_small(full, 2.0), full),
              (_dense_small(full, 3.0), full)]
    plain = neighbour_average(full, models, shapes)
    assert float(plain["w"][0].min()) > 1e5 and plain["w"][1].tolist() == [2.0] * 3
    median = neighbour_average(full, models, shapes, _rule("median"), own)
    # Row 0: holders 1, 1e6, 2, 3 -> 2.5; row 1: holders 1, 2, 3 -> 2.
    assert median["w"].tolist() == [[2.5] * 3, [2.0] * 3]
    assert median["b"].tolist() == [2.5] * 3
    clipped = neighbour_average(full, models, shapes, _rule(clip=1.0), own)
    assert float(clipped["w"].max()) < 3.0  # the hostile change is cut to norm 1 around own
    # The default settings take the plain average's own code path: the same bits.
    defaults = neighbour_average(full, models, shapes, _rule(), own)
    assert all(torch.equal(defaults[n], plain[n]) for n in shapes)


def _dense_small(mask: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.where(mask["w"], value, 0.0), "b": torch.full((3,), value)}


def test_dispfl_refuses_krum_over_too_few_neighbours() -> None:
    base = ["algorithm.name=dispfl", "federation.num_clients=10",
            "federation.clients_per_round=5", "federation.min_replies=4",
            "federation.aggregator=krum"]
    load_config(None, [*base, "algorithm.dispfl.neighbors=3"])  # 4 models > f + 2 = 3
    with pytest.raises(ConfigError, match="neighbors to at least 3"):
        load_config(None, [*base, "algorithm.dispfl.neighbors=2"])


@pytest.mark.parametrize("name", ["random_clientwise", "feddst", "prunefl", "sparsyfed"])
def test_the_papers_settings_keep_the_old_code_path(name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With the paper's FedAvg (adaptive_clip 0, as _method sets) no robust combiner is
    called (test_golden checks the bits)."""
    module = importlib.import_module(f"ssfl.algorithms.{name.replace('random_', '')}")
    for combiner in ("combine", "combine_over_holders"):
        if hasattr(module, combiner):
            monkeypatch.setattr(module, combiner, _refuse)
    alg = _method(name)
    state = alg.init()
    if name == "random_clientwise":
        masks = [alg.mask_of(c) for c in range(2)]
        updates: list[object] = [(_dense(m, 1.0), m) for m in masks]
    elif name == "feddst":
        updates = [(_dense(state.mask, 1.0), state.mask, None)] * 2
    elif name == "prunefl":
        updates = [(torch.ones(alg.codec.layout(state.mask).num_values), None)] * 2
    else:
        updates = [_dense({"w": state.weights["w"] != 0}, 1.0)] * 2
    alg.aggregate(state, 1, [Reply(c, 5, u) for c, u in enumerate(updates)], [0, 1])


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the default settings must not reach a robust combiner")


def test_a_method_without_robust_aggregation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FedDST, "robust_aggregation", False)
    for setting in ("federation.aggregator=median", "federation.update_clip_norm=1",
                    "federation.adaptive_clip=2"):
        with pytest.raises(ConfigError, match="'feddst' does not declare robust aggregation"):
            load_config(None, ["algorithm.name=feddst", setting])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random_clientwise", "feddst", "prunefl", "sparsyfed",
                                  "dispfl"])
def test_every_method_runs_with_a_robust_rule(name: str) -> None:
    """A short whole run of each method with the median and adaptive clipping: it completes
    with finite weights."""
    from ssfl.sim import run_experiment

    config = load_config(None, [
        f"algorithm.name={name}", "run.rounds=2", "run.threads=1", "run.progress=false",
        "federation.num_clients=4", "federation.clients_per_round=4", "train.local_epochs=1",
        "algorithm.density=0.5", "model.width=0.5", "data.dataset=digits",
        "federation.aggregator=median", "federation.adaptive_clip=3",
        "algorithm.feddst.update_interval=1", "algorithm.prunefl.update_interval=1",
        "algorithm.prunefl.initial_rounds=1", "algorithm.dispfl.neighbors=2"])
    result = run_experiment(config, write=False)
    assert bool(torch.isfinite(result.final_values).all())


# ------------------------------------------------------ the default: "auto" (clip, multi-Krum)


def test_auto_is_clipped_multi_krum_where_the_server_combines_updates_in_the_clear() -> None:
    from ssfl.config import AUTO, AUTO_ADAPTIVE_CLIP, FederationSection

    defaults = FederationSection()  # unresolved: what a bare Config holds
    assert (defaults.aggregator, defaults.adaptive_clip, defaults.byzantine) == ("auto", AUTO, 1)
    assert AUTO_ADAPTIVE_CLIP == 2.0
    for method in ("ssfl", "fedavg", "feddst", "prunefl", "sparsyfed", "dispfl",
                   "random_clientwise"):
        density = 1.0 if method == "fedavg" else 0.5
        config = load_config(None, [f"algorithm.name={method}", f"algorithm.density={density}"])
        assert (config.federation.aggregator, config.federation.adaptive_clip) == ("auto", 2.0)
    # The paper's FedAvg is one setting away: any explicit rule turns the automatic clip off.
    mean = load_config(None, ["federation.aggregator=mean"]).federation
    assert (mean.aggregator, mean.adaptive_clip) == ("mean", 0.0)
    assert is_plain_mean(mean)
    median = load_config(None, ["federation.aggregator=median"]).federation
    assert median.adaptive_clip == 0.0
    # An explicit number is kept, 0 included.
    assert load_config(None, ["federation.adaptive_clip=3"]).federation.adaptive_clip == 3.0
    assert load_config(None, ["federation.adaptive_clip=0"]).federation.adaptive_clip == 0.0


def test_auto_is_the_plain_mean_where_each_change_is_bounded_otherwise_or_unseen() -> None:
    # Differential privacy clips to its own fixed norm and needs the mean's fixed sensitivity;
    # under secure aggregation the server sees only the sum.
    for fed in (load_config(None, ["privacy.mode=server"]).federation,
                load_config(None, [], secure_aggregation=True).federation):
        assert (fed.aggregator, fed.adaptive_clip) == ("mean", 0.0)
        assert is_plain_mean(fed)
    # An explicit clip or rule with either is still refused by name.
    with pytest.raises(ConfigError, match="adaptive_clip"):
        load_config(None, ["privacy.mode=server", "federation.adaptive_clip=2"])
    with pytest.raises(ConfigError, match="aggregator"):
        load_config(None, ["privacy.mode=server", "federation.aggregator=multi_krum",
                           "federation.min_replies=4"])


def test_auto_is_the_plain_mean_for_a_method_without_robust_aggregation() -> None:
    from ssfl.algorithms.base import Algorithm
    from ssfl.config import Config, resolve_robust_defaults

    config = Config()
    assert not Algorithm.robust_aggregation
    resolve_robust_defaults(config, Algorithm.robust_aggregation)
    assert (config.federation.aggregator, config.federation.adaptive_clip) == ("mean", 0.0)
    config = Config()
    resolve_robust_defaults(config, True)
    assert (config.federation.aggregator, config.federation.adaptive_clip) == ("auto", 2.0)


def test_auto_leaves_out_the_outlier_and_falls_back_to_the_mean_in_small_rounds() -> None:
    # Four changes near (1, 1) and one at (10, -10): multi-Krum (f = 1) keeps the four, and
    # the automatic clip (2 x the median norm, sqrt 2) had already shortened the fifth.
    ref = torch.zeros(2)
    near = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.2]), torch.tensor([1.2, 1.0]),
            torch.tensor([0.8, 1.0])]
    updates = [*near, torch.tensor([10.0, -10.0])]
    clipped: list[int] = []
    left_out: list[int] = []
    ratios: list[float | None] = []
    out = combine(updates, [1, 1, 1, 1, 1], ref, _rule("auto", adaptive=2.0), clipped, left_out,
                  ratios)
    assert (clipped, left_out) == ([4], [4])
    assert torch.allclose(out, torch.stack(near).mean(0))
    # How far the one left out stood out: its Krum score over the round's median score, on
    # the clipped rows (the hostile change clipped to twice the median norm, |(1, 1.2)|).
    bound = 2 * float(near[1].norm())
    rows = torch.stack([*near, torch.tensor([1.0, -1.0]) * bound / 2 ** 0.5])
    assert torch.allclose(rows, clip_updates(torch.stack(updates), ref, adaptive=2.0))
    scores = krum_scores(rows, 1)
    assert ratios == pytest.approx([float(scores[4] / scores.median())], rel=1e-3)
    assert ratios[0] > 50  # far beyond the near points' spread
    # Three replies are too few for Krum with f = 1 (it needs more than 3): the clipped
    # (weighted) mean, nothing left out.
    left_out = []
    small = combine([near[0], near[1], updates[4]], [1, 1, 2], ref, _rule("auto", adaptive=2.0),
                    None, left_out)
    bound = 2 * float(near[1].norm())  # the median change norm of the three is near[1]'s
    hostile = updates[4] * (bound / float(updates[4].norm()))
    assert left_out == []
    assert torch.allclose(small, (near[0] + near[1] + 2 * hostile) / 4)
    # Per-client masks: the same rule over held coordinates.
    held_out, _ = combine_held(torch.stack(updates), None, [1] * 5, ref, _rule("auto"))
    assert torch.allclose(held_out, torch.stack(near).mean(0))


def test_an_unresolved_auto_clips_nothing() -> None:
    # A Config that never went through validation holds -1 and "auto": nothing is clipped,
    # and two replies are too few for Krum, so this is the plain mean.
    from ssfl.config import FederationSection

    fed = FederationSection()
    ref = torch.zeros(3)
    updates = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([100.0, 100.0, 100.0])]
    out = combine(updates, [1, 1], ref, fed)
    assert torch.allclose(out, torch.full((3,), 50.5))


def test_a_negative_clip_other_than_auto_is_refused() -> None:
    with pytest.raises(ConfigError, match="adaptive_clip"):
        load_config(None, ["federation.adaptive_clip=-2"])


def test_a_round_reports_which_clients_clipping_scaled_back() -> None:
    # Changes of norm 1, 1, 1 and 10 from the reference: twice the median (1) bounds the
    # fourth; the fixed bound 0.5 every one.
    ref = torch.zeros(2)
    updates = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0]),
               torch.tensor([0.0, 10.0])]
    clipped: list[int] = []
    out = combine(updates, [1, 1, 1, 1], ref, _rule(adaptive=2.0), clipped)
    assert clipped == [3]
    assert torch.allclose(out, torch.tensor([0.0, 3.0 / 4]))
    fixed: list[int] = []
    combine(updates, [1, 1, 1, 1], ref, _rule(clip=0.5), fixed)
    assert fixed == [0, 1, 2, 3]


#: a two-round run of five clients, all asked each round, the first of them hostile
ONE_HOSTILE_OF_FIVE = ["run.rounds=2", "run.threads=1", "run.progress=false",
                       "federation.num_clients=5", "federation.clients_per_round=5",
                       "train.local_epochs=1", "algorithm.density=0.5",
                       "attack.hostile_per_round=1", "run.eval_every=0"]


def test_the_diagnostics_name_the_clipped_and_left_out_clients_in_a_run() -> None:
    from ssfl.sim import run_experiment

    base = [*ONE_HOSTILE_OF_FIVE, "attack.kind=boost"]
    result = run_experiment(load_config(None, base), write=False)
    for row in result.metrics:
        # The hostile client is the first one asked (the round's sample is sorted): the
        # default clipped its change and multi-Krum left it out.
        assert row["clients"][0] in row["diagnostics"]["clipped"], row
        assert row["diagnostics"]["left_out"] == [row["clients"][0]], row
        assert row["diagnostics"]["krum_ratio"][0] > 1.0, row
    plain = run_experiment(load_config(None, [*base, "federation.aggregator=mean"]),
                           write=False)
    assert all("diagnostics" not in row for row in plain.metrics)


def test_a_refused_reply_counts_as_one_of_the_hostile_clients_auto_tolerates() -> None:
    # Four valid changes, one far out; f = 1. Nothing refused: multi-Krum leaves the far one
    # out. One reply refused at screening: that was the hostile one the default tolerates, so
    # the four are averaged (the far one clipped to twice the median norm, not left out).
    ref = torch.zeros(2)
    updates = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.1]), torch.tensor([1.0, -0.1]),
               torch.tensor([0.0, 3.0])]
    left_out: list[int] = []
    combine(updates, [1] * 4, ref, after_refusals(_rule("auto", adaptive=2.0), 0), None,
            left_out)
    assert left_out == [3]
    tolerated = after_refusals(_rule("auto", adaptive=2.0), 1)
    assert tolerated.byzantine == 0
    left_out = []
    out = combine(updates, [1] * 4, ref, tolerated, None, left_out)
    assert left_out == []
    bound = 2 * float(updates[1].norm())  # twice the median change norm
    assert torch.allclose(out, torch.tensor([0.75, bound / 4]))  # ((3, 0) + (0, bound)) / 4
    # More refusals than f never go below 0; explicit Krum rules keep their configured f.
    assert after_refusals(_rule("auto"), 3).byzantine == 0
    assert after_refusals(_rule("multi_krum"), 1).byzantine == 1
    assert _rule("auto").byzantine == 1  # the settings themselves are not changed


def test_a_client_refused_for_its_sample_claim_costs_no_honest_update_in_a_run() -> None:
    from ssfl.sim import run_experiment

    base = [*ONE_HOSTILE_OF_FIVE, "attack.kind=inflate_samples"]
    result = run_experiment(load_config(None, base), write=False)
    for row in result.metrics:
        # The first client asked claims 10^9 samples: refused; the other four all count.
        assert [x["client"] for x in row["rejected"]] == [row["clients"][0]], row
        assert "left_out" not in row.get("diagnostics", {}), row


def test_auto_counts_copies_of_one_update_once() -> None:
    # Three honest changes, as far from each other as high-dimensional ones are (squared
    # distance 2), and two clients sending the same stale change (squared distance 2.44 to
    # each honest one). Krum (f = 1) scores each by its 2 nearest others: the twins 0 + 2.44,
    # the honest ones 2 + 2; so multi-Krum alone keeps both twins and leaves an honest change
    # out. "auto" counts the copy once (repeats: [4]); the stale change is then the
    # farthest (2.44 against 2 with 1 neighbour) and is left out.
    ref = torch.zeros(4)
    near = [torch.eye(4)[i] for i in range(3)]
    stale = torch.tensor([0.0, 0.0, 0.0, 1.2])
    updates = [*near, stale, stale.clone()]
    assert repeated_rows(torch.stack(updates)) == [4]
    left_out: list[int] = []
    combine(updates, [1] * 5, ref, _rule("multi_krum"), None, left_out)
    assert left_out == [2]  # the last honest one (ties kept in client order); the twins in
    left_out, repeats, clipped = [], [], []
    out = combine(updates, [1] * 5, ref, _rule("auto", adaptive=2.0), clipped, left_out, None,
                  repeats)
    assert (repeats, left_out, clipped) == ([4], [3], [])
    assert torch.allclose(out, torch.stack(near).mean(0))
    # Per-client masks: the same, and a copy must match on what it holds too.
    held_out, weight = combine_held(torch.stack(updates), None, [1] * 5, ref, _rule("auto"))
    assert torch.allclose(held_out, torch.stack(near).mean(0))
    assert torch.equal(weight, torch.full((4,), 3.0, dtype=torch.float64))
    held = torch.ones(5, 4, dtype=torch.bool)
    held[4, 0] = False  # the same values, but the copy holds only one coordinate
    assert repeated_rows(torch.stack(updates), held) == []
    # Without copies "auto" is unchanged, bit for bit.
    assert torch.equal(combine(updates[:4], [1] * 4, ref, _rule("auto", adaptive=2.0)),
                       combine(updates[:4], [1] * 4, ref, _rule("auto", adaptive=2.0), None,
                               None, None, []))


# ------------------------------------------------ fltrust: the server's own clean-sample change


def test_fltrust_by_hand() -> None:
    # The server's change g0 = (1, 0), |g0| = 1. Client changes: (3, 4) has cosine 0.6 and is
    # scaled to length 1: (0.6, 0.8); (-1, 0) points away (cosine -1: trust 0); (0, 2) is
    # orthogonal (trust 0). The new vector: reference + 0.6 * (0.6, 0.8) / 0.6.
    ref = torch.tensor([10.0, 20.0])
    rows = ref + torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, 2.0]])
    trust: list[float] = []
    out = fltrust(rows, ref, ref + torch.tensor([1.0, 0.0]), trust)
    assert trust == [0.6, 0.0, 0.0]
    assert torch.allclose(out, torch.tensor([10.6, 20.8], dtype=torch.float64))
    # Two trusted clients: each scaled to |g0| = 2, weighted by its cosine (1 and 0.8).
    rows = ref + torch.tensor([[5.0, 0.0], [0.4, 0.3]])
    out = fltrust(rows, ref, ref + torch.tensor([2.0, 0.0]))
    expected = (1.0 * torch.tensor([2.0, 0.0]) + 0.8 * torch.tensor([1.6, 1.2])) / 1.8
    assert torch.allclose(out, (ref + expected).double())


def test_fltrust_with_no_trusted_change_keeps_the_model() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0])
    away = ref - torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.equal(fltrust(away, ref, ref + torch.tensor([1.0, 1.0, 0.0])), ref.double())
    # The server did not move (g0 = 0): nothing sets a direction.
    assert torch.equal(fltrust(ref + away, ref, ref.clone()), ref.double())
    # A client that did not move carries no direction, and no division by its zero norm.
    trust: list[float] = []
    out = fltrust(torch.stack([ref, ref + 1]), ref, ref + 1, trust)
    assert trust[0] == 0.0 and bool(torch.isfinite(out).all())


def test_fltrust_bounds_any_client_by_the_servers_step_and_drops_a_reversed_change() -> None:
    """Whatever a client sends, it moves the model by at most |g0|, and the reverse of a
    change the server trusts gets no weight."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(50, generator=gen)
    g0 = torch.randn(50, generator=gen)
    honest = g0 + 0.5 * torch.randn(4, 50, generator=gen)
    hostile = torch.stack([-honest[0] * 1e6, -honest[1]])
    trust: list[float] = []
    out = fltrust(ref + torch.cat([honest, hostile]), ref, ref + g0, trust)
    assert trust[4:] == [0.0, 0.0] and min(trust[:4]) > 0
    assert float((out - ref.double()).norm()) <= float(g0.norm()) * (1 + 1e-9)
    honest_only = fltrust(ref + honest, ref, ref + g0)
    assert torch.allclose(out, honest_only)


def test_combine_runs_fltrust_and_needs_the_servers_update() -> None:
    ref = torch.zeros(2)
    updates = [torch.tensor([3.0, 4.0]), torch.tensor([-1.0, 0.0])]
    left_out: list[int] = []
    trust: list[float] = []
    out = combine(updates, [10, 1], ref, _rule("fltrust"), None, left_out,
                  trusted=torch.tensor([1.0, 0.0]), trust=trust)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([0.6, 0.8]))  # sample counts do not weigh
    assert (left_out, trust) == ([1], [0.6, 0.0])
    with pytest.raises(ValueError, match="server's own update"):
        combine(updates, [1, 1], ref, _rule("fltrust"))


def test_fltrust_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="'feddst' is not one"):
        load_config(None, ["algorithm.name=feddst", "federation.aggregator=fltrust"])
    with pytest.raises(ConfigError, match="federation.root_samples must be in"):
        load_config(None, ["federation.aggregator=fltrust", "federation.root_samples=-1"])
    from ssfl.flower.server_app import check_supported

    config = load_config(None, ["federation.aggregator=fltrust"])
    with pytest.raises(ConfigError, match="only the simulator has"):
        check_supported(config)
    # Any transport whose clients do not run in this process holds no sample: refused before
    # the set-up phase.
    from ssfl.run.loop import run
    from ssfl.sim import InProcessTransport, prepare

    class Remote(InProcessTransport):
        in_process = False

    exp = prepare(config)
    with pytest.raises(ConfigError, match="only the simulator has"):
        run(exp, Remote(exp), None, write=False)


def test_fltrust_in_a_run_trusts_the_honest_and_not_the_reversed_change() -> None:
    """A whole run (digits, 1 hostile client of 5 reversing its change): the server trains
    on a sample the size of a client's (0: the default) every round, and the hostile reply,
    the first asked, gets the least trust in every round, none in most. Same seed, same run."""
    from ssfl.sim import InProcessTransport, prepare, run_experiment

    base = [*ONE_HOSTILE_OF_FIVE, "attack.kind=sign_flip", "federation.aggregator=fltrust",
            "run.rounds=4"]
    config = load_config(None, base)
    result = run_experiment(config, write=False)
    zero = 0
    for row in result.metrics:
        trust = row["diagnostics"]["trust"]
        assert len(trust) == 5 and all(0.0 <= t <= 1.0 for t in trust), row
        assert trust[0] == min(trust) and max(trust[1:]) > 0, row
        zero += trust[0] == 0.0
        assert (row["clients"][0] in row["diagnostics"].get("left_out", [])) == (trust[0] == 0)
    assert zero >= 3
    again = run_experiment(load_config(None, base), write=False)
    assert torch.equal(result.final_values, again.final_values)
    # The clean sample: a client's size by default, or as configured.
    transport = InProcessTransport(prepare(config))
    state = transport.algorithm.init()
    payload = transport.algorithm.configure(state, 1, [99], 1)[99]
    sizes = [len(transport.exp.client(c)) for c in range(5)]
    assert transport.trusted_update(transport.algorithm, 1, 0.1, payload, None)[1] == \
        sum(sizes) // 5
