"""The comparison sweep's bookkeeping (benchmarks/comparison.py) on hand-made run rows: which
runs it schedules, which it reuses, the tuned rate it picks and the goal figure it reports."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "comparison.py"


@pytest.fixture(scope="module")
def comparison():
    spec = importlib.util.spec_from_file_location("comparison", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["comparison"] = module
    spec.loader.exec_module(module)
    return module


def _row(algorithm: str, density: float, acc: float, seed: int = 0, **extra) -> dict:
    return {"name": f"{algorithm}-d{density:g}-s{seed}", "algorithm": algorithm,
            "target_density": density, "split": "bdir0.3", "seed": seed, "final_accuracy": acc,
            "final_personal_accuracy": acc, **extra}


def test_jobs_put_every_method_at_the_first_seed_first_and_run_dense_once(comparison) -> None:
    jobs = comparison.jobs_for("main", ["fedavg", "ssfl"], [0.5, 0.1], [], [0, 1])
    names = [j.name for j in jobs]
    assert names == ["ssfl-d0.1-bdir0.3-s0", "fedavg-d1-bdir0.3-s0", "ssfl-d0.5-bdir0.3-s0",
                     "ssfl-d0.1-bdir0.3-s1", "fedavg-d1-bdir0.3-s1", "ssfl-d0.5-bdir0.3-s1"]
    noniid = comparison.jobs_for("noniid", ["ssfl"], [0.5], ["bdir0.1", "path2"], [0])
    assert [j.overrides()[-2:] for j in noniid] == [
        ["data.partition=balanced_dirichlet", "data.alpha=0.1"],
        ["data.partition=pathological", "data.classes_per_client=2"]]
    assert all(j.density == 0.2 for j in noniid)


def test_a_tuned_rate_is_part_of_the_run_and_its_name(comparison) -> None:
    (job,) = comparison.jobs_for("main", ["sparsyfed"], [0.1], [], [0], {"sparsyfed": 0.1})
    assert job.name == "sparsyfed-d0.1-bdir0.3-s0-lr0.1"
    assert "train.lr=0.1" in job.overrides()


def test_tuned_rate_is_the_best_accuracy_and_ties_go_to_the_smaller_rate(comparison) -> None:
    rows = [_row("sparsyfed", 0.1, 0.40, lr=0.05), _row("sparsyfed", 0.1, 0.41, lr=0.1),
            _row("sparsyfed", 0.1, 0.41, lr=0.2)]
    assert comparison.tuned_rates(rows) == {"sparsyfed": 0.1}


def test_unknown_split_is_refused(comparison) -> None:
    with pytest.raises(SystemExit, match="unknown split"):
        comparison.split_overrides("iid")


def test_relative_error_goal_by_hand(comparison) -> None:
    rows = [_row("ssfl", 0.1, 0.60), _row("ssfl", 0.1, 0.62, seed=1),
            _row("random", 0.1, 0.50), _row("feddst", 0.1, 0.55),
            _row("snip_oracle", 0.1, 0.70),  # not federated: never the baseline
            _row("fedavg", 1.0, 0.65)]
    (goal,) = comparison.relative_error_goal(rows, [0.1], "final_accuracy")
    # SSFL error 39 %, strongest federated baseline (feddst) 45 %: 1 - 39/45; dense 35 %.
    assert goal["strongest_baseline"] == "feddst"
    assert goal["relative_error_reduction"] == pytest.approx(1 - 39 / 45)
    assert goal["dense_relative_error_reduction"] == pytest.approx(1 - 35 / 45)
    assert goal["seeds"] == (2, 1)


def test_recorded_rows_count_as_done_and_are_reported(comparison, tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    recorded = _row("ssfl", 0.1, 0.6)
    recorded["name"] = "ssfl-d0.1-bdir0.3-s0"
    (out / "comparison.json").write_text(json.dumps({"runs": [recorded], "tuning": []}))
    rows = comparison.recorded_runs(out)
    jobs = comparison.jobs_for("main", ["ssfl"], [0.1], [], [0])
    # Nothing to run (no process is started), and the row comes back from the file.
    comparison.run_jobs(jobs, tmp_path / "runs", 1, [], rows)
    assert comparison.load_summaries(jobs, tmp_path / "runs", rows) == [recorded]
