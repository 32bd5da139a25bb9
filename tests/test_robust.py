"""Robust aggregation rules on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from ssfl.algorithms.robust import (
    aggregate_vectors,
    clip_updates,
    coordinate_median,
    krum_scores,
    krum_select,
    trim_count,
    trimmed_mean,
)

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
    """Whole runs (digits, 5 clients per round): client 0 scales its update by 1e4 every
    round. Plain FedAvg's model blows up until every honest update is NaN and the run stops;
    with the coordinate median the run completes and learns."""
    from ssfl.algorithms.base import RoundFailed
    from ssfl.algorithms.ssfl import FixedMaskFedAvg
    from ssfl.config import ConfigError, load_config
    from ssfl.sim import run_experiment

    real = FixedMaskFedAvg.client_step

    def hostile(self, ctx, received, state):  # type: ignore[no-untyped-def]
        out = real(self, ctx, received, state)
        if ctx.client_id != 0:
            return out
        from ssfl.algorithms.base import ClientOutput
        from ssfl.comm import decode_values, encode_values, read_header

        header = read_header(out.reply)
        values = decode_values(out.reply) * 1e4
        return ClientOutput(encode_values(values, round=header.round, digest=header.digest),
                            out.state, out.result)

    base = ["run.rounds=4", "run.threads=1", "run.progress=false", "federation.num_clients=5",
            "federation.clients_per_round=5", "train.local_epochs=1", "algorithm.density=0.5"]
    FixedMaskFedAvg.client_step = hostile  # type: ignore[method-assign]
    try:
        with pytest.raises(RoundFailed, match="NaN or infinite"):
            run_experiment(load_config(None, base), write=False)
        median = run_experiment(load_config(None, [*base, "federation.aggregator=median"]),
                                write=False)
    finally:
        FixedMaskFedAvg.client_step = real  # type: ignore[method-assign]
    assert float(median.final_values.abs().max()) < 10.0
    assert median.summary["final_accuracy"] > 0.5
    # Rules that need enough replies are refused up front, and only where they apply.
    with pytest.raises(ConfigError, match="min_replies to at least 4"):
        load_config(None, [*base, "federation.aggregator=krum"])
    with pytest.raises(ConfigError, match="global-mask methods"):
        load_config(None, [*base, "algorithm.name=feddst", "federation.aggregator=median"])
