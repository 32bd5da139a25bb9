"""The comparison sweep's bookkeeping (benchmarks/comparison.py) on hand-made run rows: which
runs it schedules, which it reuses, the tuned rate it picks and the goal figure it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_loader import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "comparison.py"


@pytest.fixture(scope="module")
def comparison():
    return load_benchmark("comparison")


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


def test_a_best_rate_on_the_grids_edge_widens_the_grid_by_two(comparison) -> None:
    base = [0.05, 0.1, 0.2]
    grid = comparison.tuning_grid
    # Unfinished grid: nothing to judge yet, even if a finished edge leads.
    assert grid(base, {}) == base
    assert grid(base, {0.05: 0.30, 0.2: 0.37}) == base
    # Best inside the grid: it stays.
    assert grid(base, {0.05: 0.30, 0.1: 0.41, 0.2: 0.37}) == base
    # Best at the top edge: one rate twice as large; it loses, so the grid stops there.
    assert grid(base, {0.05: 0.30, 0.1: 0.36, 0.2: 0.37}) == [0.05, 0.1, 0.2, 0.4]
    assert grid(base, {0.05: 0.30, 0.1: 0.36, 0.2: 0.37, 0.4: 0.35}) == [0.05, 0.1, 0.2, 0.4]
    # It wins again: once more, then the widening limit (2) holds.
    won = {0.05: 0.30, 0.1: 0.36, 0.2: 0.37, 0.4: 0.38, 0.8: 0.39}
    assert grid(base, won) == [0.05, 0.1, 0.2, 0.4, 0.8]
    assert grid(base, won, widenings=3) == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    # Best at the bottom edge (a tie goes to the smaller rate): half the smallest.
    assert grid(base, {0.05: 0.40, 0.1: 0.40, 0.2: 0.20}) == [0.025, 0.05, 0.1, 0.2]


def test_tuning_jobs_follow_the_finished_runs_and_skip_untuned_methods(comparison,
                                                                        tmp_path) -> None:
    def recorded(accuracy):
        jobs = [comparison.Job("sparsyfed", 0.1, "bdir0.3", 0, lr) for lr in accuracy]
        return {j.name: {"name": j.name, "algorithm": "sparsyfed", "lr": j.lr, "seed": 0,
                         "final_accuracy": acc} for j, acc in zip(jobs, accuracy.values())}

    names = lambda jobs: [j.name for j in jobs]  # noqa: E731
    assert names(comparison.tuning_jobs(["ssfl", "sparsyfed"], 0, tmp_path, {})) == [
        "sparsyfed-d0.1-bdir0.3-s0-lr0.05", "sparsyfed-d0.1-bdir0.3-s0-lr0.1",
        "sparsyfed-d0.1-bdir0.3-s0-lr0.2"]
    edge = recorded({0.05: 0.3055, 0.1: 0.3593, 0.2: 0.366})
    widened = comparison.tuning_jobs(["sparsyfed"], 0, tmp_path, edge)
    assert names(widened)[-1] == "sparsyfed-d0.1-bdir0.3-s0-lr0.4"
    # Until it runs, the table shows the chosen rate as provisional.
    rows = comparison.load_summaries(widened, tmp_path, edge)
    text = comparison.tuning_text(rows, comparison.tuned_rates(rows), widened[-1:])
    assert "| sparsyfed | 0.2 (chosen) | 36.60 |" in text
    assert "| sparsyfed | 0.4 | not run yet" in text
    # A finished widened run is read back, so the grid (and the jobs) stay put once it loses.
    lost = recorded({0.05: 0.3055, 0.1: 0.3593, 0.2: 0.366, 0.4: 0.35})
    jobs = comparison.tuning_jobs(["sparsyfed"], 0, tmp_path, lost)
    assert [j.lr for j in jobs] == [0.05, 0.1, 0.2, 0.4]
    assert comparison.tuned_rates(comparison.load_summaries(jobs, tmp_path, lost)) == {
        "sparsyfed": 0.2}


def test_each_sweep_has_its_default_methods_and_a_typo_stops_it(comparison) -> None:
    assert comparison.sweep_methods("main", None) == comparison.METHODS
    noniid = comparison.sweep_methods("noniid", None)
    assert noniid == comparison.NONIID_METHODS and "snip_oracle" not in noniid
    assert comparison.sweep_methods("noniid", "ssfl,fedavg") == ["ssfl", "fedavg"]
    with pytest.raises(SystemExit, match="unknown 'sfl'; choose from dispfl, fedavg"):
        comparison.sweep_methods("main", "ssfl,sfl")


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
    (published,) = comparison.relative_error_goal(rows, [0.1], "final_accuracy",
                                                  candidates=["random"])
    assert published["strongest_baseline"] == "random"
    assert published["relative_error_reduction"] == pytest.approx(1 - 39 / 50)


def test_paper_claims_point_by_point_by_hand(comparison) -> None:
    rows = [_row("ssfl", 0.5, 0.80), _row("ssfl", 0.5, 0.82, seed=1),
            _row("fedavg", 1.0, 0.805), _row("fedavg", 1.0, 0.815, seed=1),
            _row("dispfl", 0.5, 0.70), _row("dispfl", 0.5, 0.72, seed=1),
            _row("sparsyfed", 0.5, 0.90), _row("ssfl", 0.1, 0.99)]
    claims = {c["claim"].split(" at ")[0]: c for c in comparison.paper_claims(rows)}
    # Dense: 81.0 +- 1.41 vs 81.0 +- 0.71: within noise; DisPFL 71: holds; SparsyFed 90:
    # behind.
    dense = claims["SSFL above dense FedAvg"]
    assert dense["diff"] == pytest.approx(0.0)
    assert dense["spread"] == pytest.approx((2.0 + 0.5) ** 0.5)  # std 1.41 and 0.71
    assert dense["verdict"].startswith("within seed noise")
    assert dense["paper"] == "88.3 vs 86.0 (+2.3)"
    assert claims["SSFL above DisPFL"]["verdict"] == "holds"
    assert claims["SSFL above DisPFL"]["protocol"] == "personalised"
    assert claims["SSFL above dense FedAvg"]["protocol"] == "global"
    # DisPFL is held to SSFL on its own protocol: its clients' own models, not the consensus.
    consensus_only = [dict(r, final_accuracy=0.1) if r["algorithm"] == "dispfl" else r
                      for r in rows]
    (dispfl,) = [c for c in comparison.paper_claims(consensus_only) if "DisPFL" in c["claim"]]
    assert dispfl["diff"] == pytest.approx(10.0) and dispfl["ours"].startswith("81.00")
    # So is the error reduction: 1 - 19/29 against DisPFL's own models (not 1 - 19/90).
    no_sparsyfed = [r for r in consensus_only if r["algorithm"] != "sparsyfed"]
    error = comparison.paper_claims(no_sparsyfed)[-1]
    assert error["ours"] == f"{(1 - 19 / 29) * 100:.1f}% (against DisPFL)"
    # SparsyFed has one seed: behind, but no spread to call it reversed yet.
    assert claims["SSFL above SparsyFed"]["verdict"] == "SSFL behind on one seed (no spread yet)"
    # Error on seed 0, the one SparsyFed has: SSFL 20 %, the strongest published method
    # (SparsyFed) 10 %: 1 - 20/10 < 0; the paper's 1 - 11.7/14.9 against DisPFL.
    error = claims["SSFL's relative error reduction against the strongest published sparse "
                   "method"]
    assert error["paper"] == "21.5% (against DisPFL)"
    assert error["ours"] == "-100.0% (against SparsyFed)"
    assert error["verdict"] == "reversed (one seed so far)"
    assert "| holds |" in comparison.claims_table(comparison.paper_claims(rows))
    assert comparison.paper_claims([_row("fedavg", 1.0, 0.8)]) == []
    # Only the ResNet-18 CIFAR-10 configs are held against the paper's figures.
    configs = BENCH.parents[1] / "configs"
    assert comparison.is_paper_setting(configs / "cifar10_resnet18_cpu.toml")
    assert comparison.is_paper_setting(configs / "cifar10_resnet18_paper.toml")
    assert not comparison.is_paper_setting(comparison.CONFIG)


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


def test_a_partial_invocation_keeps_the_rows_it_does_not_cover(comparison, tmp_path: Path
                                                               ) -> None:
    ssfl, dispfl = _row("ssfl", 0.5, 0.6), _row("dispfl", 0.5, 0.5)
    ssfl["name"], dispfl["name"] = "ssfl-d0.5-bdir0.3-s0", "dispfl-d0.5-bdir0.3-s0"
    tune = _row("sparsyfed", 0.1, 0.4, lr=0.1)
    results = tmp_path / "comparison.json"
    results.write_text(json.dumps({"runs": [ssfl, dispfl], "tuning": [tune]}))
    jobs = comparison.jobs_for("main", ["ssfl"], [0.5], [], [0])
    # Running SSFL again replaces its own row only; DisPFL's row and SparsyFed's tuning stay.
    assert comparison.kept_rows(results, jobs, ["ssfl"]) == ([dispfl], [tune])
    jobs = comparison.jobs_for("main", ["sparsyfed"], [0.5], [], [0], {"sparsyfed": 0.1})
    assert comparison.kept_rows(results, jobs, ["sparsyfed"]) == ([ssfl, dispfl], [])
    assert comparison.kept_rows(tmp_path / "none.json", jobs, ["ssfl"]) == ([], [])


def test_a_widened_tuning_supersedes_the_old_rates_rows(comparison, tmp_path: Path) -> None:
    old_rate = dict(_row("sparsyfed", 0.1, 0.366, lr=0.2), name="sparsyfed-d0.1-bdir0.3-s0-lr0.2")
    old_s1 = dict(_row("sparsyfed", 0.5, 0.40, seed=1, lr=0.2),
                  name="sparsyfed-d0.5-bdir0.3-s1-lr0.2")
    ssfl = dict(_row("ssfl", 0.1, 0.41), name="ssfl-d0.1-bdir0.3-s0")
    results = tmp_path / "comparison.json"
    results.write_text(json.dumps({"runs": [old_rate, old_s1, ssfl], "tuning": []}))
    # SparsyFed now tuned to 0.4: its s0 job covers the lr-0.2 row of the same cell, and the
    # s1 row at 0.2, outside this invocation, is superseded as well; SSFL's row stays.
    jobs = comparison.jobs_for("main", ["sparsyfed"], [0.1], [], [0], {"sparsyfed": 0.4})
    assert comparison.kept_rows(results, jobs, ["sparsyfed"], {"sparsyfed": 0.4}) == ([ssfl], [])
    # An invocation without SparsyFed reads the chosen rate from the file's tuning rows.
    tune = [dict(_row("sparsyfed", 0.1, acc, lr=lr)) for lr, acc in ((0.2, 0.366), (0.4, 0.367))]
    results.write_text(json.dumps({"runs": [old_rate, old_s1, ssfl], "tuning": tune}))
    jobs = comparison.jobs_for("main", ["ssfl"], [0.1], [], [1])
    assert comparison.kept_rows(results, jobs, ["ssfl"]) == ([ssfl], tune)


def test_the_sweep_is_told_after_every_run_even_a_failed_one(comparison, tmp_path: Path
                                                            ) -> None:
    calls: list[int] = []
    jobs = comparison.jobs_for("main", ["ssfl"], [0.5, 0.1], [], [0])
    # A config that does not exist: each run fails at once, and each failure is reported.
    comparison.run_jobs(jobs, tmp_path / "runs", 2, [], None, tmp_path / "missing.toml",
                        lambda: calls.append(1))
    assert len(calls) == 2
    assert not any((tmp_path / "runs" / j.name / "summary.json").exists() for j in jobs)


def test_a_sweep_of_more_rounds_carries_on_the_shorter_runs(comparison, tmp_path: Path) -> None:
    config = BENCH.parents[1] / "configs" / "quickstart.toml"
    shorter, runs = tmp_path / "short", tmp_path / "long"
    ssfl, feddst = (comparison.Job(m, 0.5, "bdir0.3", 0) for m in ("ssfl", "feddst"))
    for job in (ssfl, feddst):
        (shorter / job.name).mkdir(parents=True)
        for name in ("checkpoint.pt", "summary.json", "metrics.jsonl"):
            (shorter / job.name / name).write_text(name)
    extra = ["run.rounds=80"]
    args = comparison.launch_args(ssfl, runs / ssfl.name, config, extra, shorter)
    assert args == ["--resume", str(runs / ssfl.name), "--rounds", "80"]
    # A copy, without the shorter run's summary (it is not finished until carried on); the
    # shorter run stays as it was.
    assert sorted(p.name for p in (runs / ssfl.name).iterdir()) == ["checkpoint.pt",
                                                                     "metrics.jsonl"]
    assert (shorter / ssfl.name / "summary.json").exists()
    # FedDST's mask updates run until half of run.rounds: it starts again.
    args = comparison.launch_args(feddst, runs / feddst.name, config, extra, shorter)
    assert args[0] == str(config) and "--resume" not in args
    assert not (runs / feddst.name).exists()
    # Killed while being carried on: it resumes from its own checkpoint, to the same rounds.
    assert comparison.launch_args(ssfl, runs / ssfl.name, config, extra, shorter) == [
        "--resume", str(runs / ssfl.name), "--rounds", "80"]
    # Without --continue-from, as before: resume a killed run, else start.
    assert comparison.launch_args(ssfl, runs / ssfl.name, config, extra) == [
        "--resume", str(runs / ssfl.name)]
    assert comparison.launch_args(ssfl, tmp_path / "new", config, extra)[0] == str(config)


def test_readme_headline_by_hand(comparison) -> None:
    rows = [_row("ssfl", 0.1, 0.60, ratio_to_dense=0.1003),
            _row("ssfl", 0.1, 0.62, seed=1, ratio_to_dense=0.1003),
            _row("prunefl", 0.1, 0.55, ratio_to_dense=0.133),
            _row("prunefl", 0.1, 0.57, seed=1, ratio_to_dense=0.135),
            _row("random", 0.1, 0.40, ratio_to_dense=0.1003),
            _row("fedavg", 1.0, 0.65, ratio_to_dense=1.0),
            _row("ssfl", 0.5, 0.64, ratio_to_dense=0.5),
            _row("snip_oracle", 0.5, 0.66, ratio_to_dense=0.5),  # not federated: not a leader
            _row("random", 0.5, 0.63, ratio_to_dense=0.5)]
    text = comparison.readme_headline(rows, densities=[0.5, 0.1])
    # Methods with a different seed count make the sentence say so; bytes are shown only
    # where they differ from SSFL's (PruneFL's mean 0.134).
    assert text.startswith("Final global accuracy at density 0.1 (mean over the 1 to 2 seeds "
                           "each method has so far): SSFL 61.0% with 0.100 of dense")
    assert "PruneFL 56.0 (0.134 of dense bytes), random mask 40.0; dense FedAvg 65.0" in text
    assert "(at 0.5: SSFL 64.0, random mask 63.0)." in text
    assert "DisPFL" not in text
    assert comparison.readme_headline(rows[2:]) == "_No SSFL run at density 0.1 yet._"


def test_readme_headline_matches_the_committed_results() -> None:
    """The README's comparison summary is what render_docs writes from comparison.json."""
    root = BENCH.parents[1]
    render_docs = load_benchmark("render_docs")
    readme = (root / "README.md").read_text()
    data = json.loads((BENCH.parent / "results" / "comparison.json").read_text())
    deep_path = BENCH.parent / "results" / "cifar10_resnet18_cpu" / "comparison.json"
    deep = json.loads(deep_path.read_text()) if deep_path.exists() else None
    assert render_docs.readme_with_headline(readme, data, deep) == readme, (
        "README's headline is stale: run python benchmarks/render_docs.py")


def test_goal_per_split_uses_only_that_split(comparison) -> None:
    rows = [_row("ssfl", 0.2, 0.50), _row("prunefl", 0.2, 0.40),
            dict(_row("ssfl", 0.2, 0.30), split="path2"),
            dict(_row("prunefl", 0.2, 0.44), split="path2")]
    (goal,) = comparison.relative_error_goal(rows, [0.2], "final_accuracy", "path2")
    assert (goal["split"], goal["strongest_baseline"]) == ("path2", "prunefl")
    assert goal["relative_error_reduction"] == pytest.approx(1 - 70 / 56)
    assert goal["dense_relative_error_reduction"] is None  # no dense run on that split
    table = comparison.goal_table([goal], by="split")
    assert "| pathological (2 classes per client) | global | 30.00 | prunefl | 44.00 | -25.0% |" \
        in table


def test_another_config_gets_its_own_folders(comparison) -> None:
    assert comparison.default_dirs(comparison.CONFIG) == (Path("runs/comparison"),
                                                          BENCH.parent / "results")
    paper = BENCH.parents[1] / "configs" / "cifar10_resnet18_paper.toml"
    assert paper.is_file()
    assert comparison.default_dirs(paper) == (
        Path("runs/comparison-cifar10_resnet18_paper"),
        BENCH.parent / "results" / "cifar10_resnet18_paper")


def test_time_left_is_mean_run_time_times_runs_over_workers(comparison) -> None:
    assert comparison.time_left([], 5, 2) == ""
    assert comparison.time_left([300.0], 0, 2) == ""
    assert comparison.time_left([240.0, 360.0], 4, 2) == ", about 10 min left"
    assert comparison.time_left([300.0], 80, 2) == ", about 3.3 h left"


def test_curves_noise_and_leading_spread_by_hand(comparison) -> None:
    rows = [_row("ssfl", 0.1, 0.42, curve=[[50, 0.45], [60, 0.42]]),
            _row("ssfl", 0.1, 0.44, seed=1, curve=[[50, 0.43], [60, 0.44]]),
            _row("prunefl", 0.1, 0.41, curve=[[60, 0.41]]),
            _row("random", 0.1, 0.20), _row("fedavg", 1.0, 0.50)]
    assert comparison.mean_curve(rows[:2]) == [(50, pytest.approx(44.0)),
                                               (60, pytest.approx(43.0))]
    # |42 - 45| and |44 - 43|: runs with fewer than two evaluations do not count.
    assert comparison.last_step_noise(rows) == pytest.approx(2.0)
    # Best 43 (SSFL's mean), third best 20 (random); dense FedAvg is left out.
    assert comparison.leading_spread(rows, [0.1]) == pytest.approx(23.0)
    assert comparison.leading_spread(rows, [0.1], n=4) is None


def test_late_gain_is_the_climb_over_the_last_fifth_by_hand(comparison) -> None:
    # 100 rounds: the last evaluation at or before round 80 is round 75 (two seeds: 50, 54),
    # the last is round 100 (51, 55): a gain of 1.0 point, not settled; round 80 exactly
    # would count.
    rows = [_row("fedavg", 1.0, 0.51, curve=[[25, 0.3], [50, 0.45], [75, 0.50], [100, 0.51]]),
            _row("fedavg", 1.0, 0.55, seed=1, curve=[[75, 0.54], [100, 0.55]])]
    assert comparison.late_gain(rows) == pytest.approx(1.0)
    assert comparison.late_gain([_row("ssfl", 0.1, 0.4, curve=[[80, 0.42], [90, 0.41],
                                                                [100, 0.40]])]) == \
        pytest.approx(-2.0)
    assert comparison.late_gain([_row("ssfl", 0.1, 0.4, curve=[[100, 0.40]])]) is None
    assert comparison.late_gain([_row("ssfl", 0.1, 0.4, curve=[[90, 0.3], [100, 0.4]])]) is None
    table = comparison.settling_table(rows, [0.1])
    # The trend from round 75 to 100 through two points is the same climb: 1.0.
    assert table.splitlines()[2:] == ["| fedavg | 1 | +1.00 | +1.00 | no |"]


def test_late_trend_reads_every_evaluation_of_the_last_fifth_by_hand(comparison) -> None:
    def trend(curve):
        return comparison.late_trend([_row("fedavg", 1.0, 0.4, curve=curve)])

    # Rounds 80, 90, 100 (the fifth of 100 rounds starts at 80) at 40, 44, 41 %: round
    # deviations -10, 0, 10 against accuracy deviations -5/3, 7/3, -2/3: a slope of
    # (50/3 - 20/3) / 200 = 0.05 points a round, +1.0 over the 20 rounds.
    assert trend([[60, 0.3], [80, 0.40], [90, 0.44], [100, 0.41]]) == pytest.approx(1.0)
    assert trend([[80, 0.44], [90, 0.38], [100, 0.44]]) == pytest.approx(0.0)
    # A lucky last evaluation: the end points read +3.0, the fit through all four less.
    lucky = [[70, 0.40], [80, 0.40], [90, 0.41], [95, 0.39], [100, 0.43]]
    assert comparison.late_gain([_row("fedavg", 1.0, 0.4, curve=lucky)]) == pytest.approx(3.0)
    # Deviations from (91.25, 40.75): sum of products 21.25, of squares 218.75.
    assert trend(lucky) == pytest.approx(21.25 / 218.75 * 20)
    assert trend([[100, 0.4]]) is None


def test_seed_spread_by_hand(comparison) -> None:
    rows = [_row("ssfl", 0.1, 0.40), _row("ssfl", 0.1, 0.42, seed=1),
            _row("ssfl", 0.05, 0.30), _row("ssfl", 0.05, 0.36, seed=1),
            _row("prunefl", 0.1, 0.50),  # one seed: no spread
            _row("fedavg", 1.0, 0.60), _row("fedavg", 1.0, 0.70, seed=1)]
    spread = comparison.seed_spread(rows, [0.1, 0.05])
    # stdev(40, 42) = sqrt(2), stdev(30, 36) = sqrt(18); dense FedAvg at density 1.
    assert spread["ssfl"] == pytest.approx((2 ** 0.5 + 18 ** 0.5) / 2)
    assert spread["fedavg"] == pytest.approx(50 ** 0.5)
    assert "prunefl" not in spread
    table = comparison.spread_table(spread, rows, [0.1, 0.05])
    assert table.splitlines()[2:] == ["| ssfl | 2.83 | 0.1, 0.05 |", "| fedavg | 7.07 | 1 |"]


def test_third_seed_cells_by_hand(comparison) -> None:
    rows = [_row("ssfl", 0.5, 0.80), _row("ssfl", 0.5, 0.82, seed=1),
            _row("feddst", 0.5, 0.79), _row("feddst", 0.5, 0.81, seed=1),
            _row("fedavg", 1.0, 0.95), _row("snip_oracle", 0.5, 0.99),  # never the rival
            _row("ssfl", 0.1, 0.70), _row("ssfl", 0.1, 0.71, seed=1),
            _row("prunefl", 0.1, 0.50), _row("prunefl", 0.1, 0.51, seed=1),
            _row("ssfl", 0.05, 0.6), _row("random", 0.05, 0.5)]
    cells = {c["density"]: c for c in comparison.third_seed_cells(rows, [0.5, 0.1, 0.05])}
    # 0.5: gap 1 point, spread hypot(1.41, 1.41) = 2: under 2 x 2. 0.1: gap 20 points, settled.
    # 0.05: one seed each: cannot tell yet.
    assert set(cells) == {0.5, 0.05}
    assert cells[0.5]["best_other"] == "feddst"
    assert cells[0.5]["gap"] == pytest.approx(1.0)
    assert cells[0.5]["spread"] == pytest.approx(2.0)
    assert cells[0.5]["command"] == "--algorithms ssfl,feddst --densities 0.5 --seeds 2"
    assert cells[0.05]["spread"] is None and cells[0.05]["seeds"] == [0]
    assert cells[0.05]["command"].endswith("--seeds 1")
    assert comparison._third_seed_basis(cells[0.05]) == \
        "SSFL seed 0; random mask seed 0: too few seeds for a spread"
    assert comparison._third_seed_basis(cells[0.5]) == "spread 2.00, seeds 0, 1"
    # A rival with fewer seeds than SSFL catches up first: its missing seed, not a third one.
    (cell,) = comparison.third_seed_cells(rows[:3], [0.5])
    assert cell["command"] == "--algorithms feddst --densities 0.5 --seeds 1"
    (cell,) = comparison.third_seed_cells([rows[0], *rows[2:4]], [0.5])
    assert cell["command"] == "--algorithms ssfl --densities 0.5 --seeds 1"


def test_mask_layer_table_by_hand(comparison) -> None:
    layers = {"conv1.weight": 1.0, "fc.weight": 0.25}
    rows = [_row("ssfl", 0.5, 0.8, seed=1, per_layer={"conv1.weight": 0.0, "fc.weight": 0.0}),
            _row("ssfl", 0.5, 0.8, per_layer=layers),
            _row("feddst", 0.5, 0.7, per_layer={"conv1.weight": 0.5, "fc.weight": 0.5}),
            _row("fedavg", 1.0, 0.9, per_layer={"conv1.weight": 1.0, "fc.weight": 1.0})]
    # The first seed's mask; dense FedAvg is no mask; FedDST's mask evolves: its last one.
    assert comparison.mask_layer_table(rows, 0.5).splitlines() == [
        "| layer | ssfl | feddst (final) |", "|---|---|---|",
        "| conv1.weight | 1.000 | 0.500 |", "| fc.weight | 0.250 | 0.500 |"]
    assert comparison.mask_layer_table(rows[:2], 0.5) == ""  # one method: nothing to compare
    # DisPFL's run records the union of its clients' masks, not a mask any client trains.
    dispfl = _row("dispfl", 0.5, 0.7, per_layer={"conv1.weight": 1.0, "fc.weight": 0.9})
    assert comparison.mask_layer_table([*rows, dispfl], 0.5).splitlines()[0] == (
        "| layer | ssfl | feddst (final) | dispfl (final, union of its clients' masks) |")


def test_claims_compare_two_methods_on_the_seeds_both_have(comparison) -> None:
    rows = [_row("ssfl", 0.5, 0.80), _row("ssfl", 0.5, 0.76, seed=1),
            _row("sparsyfed", 0.5, 0.79), _row("sparsyfed", 0.5, 0.60, seed=2)]
    (claim, error) = [c for c in comparison.paper_claims(rows)
                      if c["protocol"].startswith("global")]
    # Seed 0 only: 80 against 79 (+1), not SSFL's mean of two seeds (78) against SparsyFed's
    # mean of two others (69.5); the evaluations paired on seed 0 alone.
    assert claim["diff"] == pytest.approx(1.0)
    assert claim["ours"] == "80.00 (n=1) vs 79.00 (n=1) (+1.00; seed 0, the one both have)"
    assert claim["verdict"] == "SSFL ahead on one seed (no spread yet)"
    # The error reduction pairs the same seeds, and one shared seed reads as one seed.
    assert error["ours"] == f"{(1 - 20 / 21) * 100:.1f}% (against SparsyFed)"
    assert error["verdict"].endswith("(one seed so far)")
    # Nothing shared: no claim yet.
    assert comparison.paper_claims([rows[0], rows[3]]) == []
    ours, theirs, note = comparison.on_shared_seeds(rows[:2], rows[:2])
    assert (ours, theirs, note) == (rows[:2], rows[:2], "")


def test_deep_headline_states_each_claim_and_its_verdict(comparison) -> None:
    render_docs = load_benchmark("render_docs")
    rows = [dict(_row("ssfl", 0.5, 0.80), rounds=80), dict(_row("fedavg", 1.0, 0.70), rounds=80),
            dict(_row("ssfl", 0.5, 0.82, seed=1), rounds=80)]
    deep = {"runs": rows, "paper_claims": comparison.paper_claims(rows)}
    text = render_docs.deep_headline(deep)
    assert "80 rounds, 3 of 30 runs, seeds 0, 1" in text
    # A run on a seed beyond the plan's two is counted apart, not towards the planned 30.
    extra = dict(_row("ssfl", 0.5, 0.81, seed=2), rounds=80)
    assert (render_docs.deep_progress({"runs": [*rows, extra]})
            == "3 of 30 runs, seeds 0, 1, and 1 run on seed 2")
    assert "what was tried" not in text  # SSFL ahead: nothing to explain
    # Dense FedAvg has one seed: SSFL is held to it on that seed, with no spread to read the
    # lead against yet.
    assert ("SSFL above dense FedAvg at density 0.5 (the paper's 88.3 vs 86.0 (+2.3)): ours on "
            "the global protocol 80.00 (n=1) vs 70.00 (n=1) (+10.00; seed 0, the one both have): "
            "SSFL ahead on one seed (no spread yet)") in text
    rows.append(dict(_row("fedavg", 1.0, 0.72, seed=1), rounds=80))
    (claim,) = comparison.paper_claims(rows)
    # 81 +- 1.41 against 71 +- 1.41: a 10-point lead, far beyond hypot(1.41, 1.41) = 2.
    assert claim["verdict"] == "holds" and claim["spread"] == pytest.approx(2.0)
    readme = "a\n" + render_docs.HEADLINE_START + "\nold\n" + render_docs.HEADLINE_END + "\nb"
    data = {"runs": rows}
    assert render_docs.deep_headline(deep)[:40] in render_docs.readme_with_headline(
        readme, data, deep).replace("\n", " ")
    assert "deep" not in render_docs.readme_with_headline(readme, data, None)
    behind = [dict(r, final_accuracy=0.60) if r["algorithm"] == "ssfl" else r for r in rows]
    deep = {"runs": behind, "paper_claims": comparison.paper_claims(behind)}
    assert render_docs.deep_headline(deep).endswith(
        "Why SSFL does not lead dense FedAvg here, and what was tried: [docs/benchmarks.md]"
        "(docs/benchmarks.md#the-deep-cpu-reference-resnet-18).")


def test_paper_run_time_is_worked_out_from_the_config(tmp_path: Path) -> None:
    render_docs = load_benchmark("render_docs")
    config = tmp_path / "paper.toml"
    config.write_text("[run]\nrounds = 100\n[federation]\nnum_clients = 50\n"
                      "clients_per_round = 5\n[train]\nlocal_epochs = 2\n")
    # 100 rounds x 5 clients x 2 epochs x 1000 images = 1 M images; at 1000/s 0.3 h.
    text = render_docs.paper_run_time(config, samples_per_second=1000.0)
    assert "1 M images" in text and "1000 images)" in text and "about 0.3 h" in text


def test_calibration_note_by_hand() -> None:
    render_docs = load_benchmark("render_docs")
    curve = [[8, 0.10], [16, 0.30], [24, 0.33], [32, 0.31], [40, 0.35]]
    data = {"runs": [{"algorithm": "fedavg", "curve": curve},
                     {"algorithm": "ssfl", "final_accuracy": 0.3}]}
    note = render_docs.calibration_note(data)
    # The last fifth starts after round 32 (80% of 40): 31% -> 35%, a 4-point gain; the last
    # four evaluations move by at most 4 points (the early 20-point climb is not counted).
    assert note.startswith("40 rounds with 0.97 gained 4.0 (31.0% at round 32, 35.0% at 40, "
                           "moving by up to 4.0 points")
    assert "SSFL's beside it 30.0%" in note
    assert render_docs.calibration_note(None) == ""


def test_paper_claims_on_the_authors_protocol_beside_the_global_one(comparison) -> None:
    # Each client's last local model on its own split (the authors' protocol) can read the
    # other way round from the global model: here SSFL is behind dense FedAvg globally (60 vs
    # 62) but ahead on local models (75 vs 70), and DisPFL's own models (50) trail SSFL's (75).
    rows = [_row("ssfl", 0.5, 0.60, final_local_accuracy=0.75,
                 curve=[[8, 0.5], [16, 0.6]], local_curve=[[8, 0.7], [16, 0.75]]),
            _row("fedavg", 1.0, 0.62, final_local_accuracy=0.70,
                 curve=[[8, 0.55], [16, 0.62]], local_curve=[[8, 0.72], [16, 0.70]]),
            _row("dispfl", 0.5, 0.20, final_personal_accuracy=0.65, final_local_accuracy=0.50)]
    claims = {(c["claim"], c["protocol"]): c for c in comparison.paper_claims(rows)}
    dense = "SSFL above dense FedAvg at density 0.5"
    assert claims[dense, "global"]["diff"] == pytest.approx(-2.0)
    assert claims[dense, "global"]["ahead"] == (0, 2)
    assert claims[dense, "authors'"]["diff"] == pytest.approx(5.0)
    # Round 8: 70 < 72; round 16: 75 > 70.
    assert claims[dense, "authors'"]["ahead"] == (1, 2)
    assert claims["SSFL above DisPFL", "personalised"]["diff"] == pytest.approx(60 - 65)
    assert claims["SSFL above DisPFL", "authors'"]["diff"] == pytest.approx(75 - 50)
    error = "SSFL's relative error reduction against the strongest published sparse method"
    # Global reading: DisPFL's own models (35 % error) against SSFL's global model (40 %);
    # authors': 25 % against 50 %.
    assert claims[error, "global (DisPFL: personalised)"]["ours"] == (
        f"{(1 - 40 / 35) * 100:.1f}% (against DisPFL)")
    assert claims[error, "authors'"]["ours"] == "50.0% (against DisPFL)"
    assert claims[error, "authors'"]["verdict"] == "holds (one seed so far)"
    table = comparison.claims_table(list(claims.values()))
    assert "| SSFL above DisPFL | authors' | 88.3 vs 85.1 (+3.2) | 75.00 (n=1) vs 50.00" in table
    # Runs from before the authors' protocol existed give no such rows.
    older = [{k: v for k, v in r.items() if k != "final_local_accuracy"} for r in rows]
    assert {c["protocol"] for c in comparison.paper_claims(older)} == {
        "global", "personalised", "global (DisPFL: personalised)"}


def test_evaluations_ahead_pairs_runs_by_seed_and_round(comparison) -> None:
    ours = [dict(_row("ssfl", 0.5, 0.5), curve=[[8, 0.2], [16, 0.4]]),
            dict(_row("ssfl", 0.5, 0.5, seed=1), curve=[[8, 0.1], [16, 0.3]]),
            dict(_row("ssfl", 0.5, 0.5, seed=2), curve=[[8, 0.9]])]  # no partner: left out
    theirs = [dict(_row("fedavg", 1.0, 0.5), curve=[[8, 0.3], [16, 0.3]]),
              dict(_row("fedavg", 1.0, 0.5, seed=1), curve=[[8, 0.0], [16, 0.3]])]
    # Seed 0: behind at 8, ahead at 16; seed 1: ahead at 8, a tie at 16 (not ahead).
    assert comparison.evaluations_ahead(ours, theirs) == (2, 4)
    assert comparison.evaluations_ahead(ours[2:], theirs) is None


def test_goal_table_without_a_pair_says_so(comparison) -> None:
    assert comparison.goal_table([]) == "_No SSFL run beside a sparse baseline yet._"


def test_protocol_note_puts_the_three_personalised_figures_side_by_side() -> None:
    render_docs = load_benchmark("render_docs")
    rows = [_row("ssfl", 0.5, 0.43, final_personal_accuracy=0.432, final_local_accuracy=0.66),
            _row("ssfl", 0.5, 0.45, seed=1, final_personal_accuracy=0.452,
                 final_local_accuracy=0.68),
            _row("dispfl", 0.5, 0.18, final_personal_accuracy=0.49, final_local_accuracy=0.49)]
    note = render_docs.protocol_note({"runs": rows})
    # Means over seeds: SSFL global 44.20 and local 67.00, DisPFL 49.00: 18 points ahead.
    assert "DisPFL's own models reach 49.00%, SSFL's one global model 44.20%" in note
    assert "(the authors' protocol, which the paper's figures use) 67.00%" in note
    assert note.rstrip().endswith("SSFL is 18.00 points ahead.")
    behind = [dict(r, final_local_accuracy=0.40) if r["algorithm"] == "ssfl" else r
              for r in rows]
    assert render_docs.protocol_note({"runs": behind}).rstrip().endswith("9.00 points behind.")
    # Runs from before local models were scored: nothing to say.
    assert render_docs.protocol_note({"runs": rows[2:]}) == ""


def test_layer_budget_note_reads_the_gap_the_squeezed_layers_and_the_probe_by_hand() -> None:
    render_docs = load_benchmark("render_docs")
    ssfl_layers = {"a": 0.5, "b": 0.02, "c": 0.1}
    erk_layers = {"a": 0.4, "b": 0.08, "c": 0.12}
    rows = [_row("ssfl", 0.1, 0.40, per_layer=ssfl_layers), _row("ssfl", 0.1, 0.42, seed=1),
            _row("random_erk", 0.1, 0.41, per_layer=erk_layers),
            _row("random_erk", 0.1, 0.44, seed=1)]
    note = render_docs.layer_budget_note({"runs": rows}, None, squeezed=2)
    # Means: ERK 42.50, SSFL 41.00; per seed +1.00, +2.00. Smallest SSFL/ERK ratios: b (0.25),
    # then c (0.83); a (1.25) is not squeezed.
    assert "(seeds 0, 1: random ERK 42.50%, SSFL 41.00%, +1.50 points; per seed +1.00, " \
           "+2.00)" in note
    assert "`b` 0.020 against 0.080, `c` 0.100 against 0.120;" in note and "`a`" not in note
    assert "not yet run" in note
    # The probe on seed 0 only: compared on seed 0 (SSFL 40.00, ERK 41.00).
    probe = {"runs": [_row("ssfl", 0.1, 0.415)]}
    note = render_docs.layer_budget_note({"runs": rows}, probe)
    assert "seed 0 (not run on seed 1): 41.50%, against SSFL's 40.00% and random ERK's " \
           "41.00% on the same seeds, so the layer shares account for the whole gap" in note
    probe = {"runs": [_row("ssfl", 0.1, 0.405), _row("ssfl", 0.1, 0.43, seed=1)]}
    assert "account for part of the gap" in render_docs.layer_budget_note({"runs": rows}, probe)
    # Probe 41.75 between SSFL 41.00 and ERK 42.50: ERK's random choice still 0.75 ahead.
    assert "within ERK's shares, choosing by score instead of at random still costs 0.75" \
        in render_docs.layer_budget_note({"runs": rows}, probe)
    probe = {"runs": [_row("ssfl", 0.1, 0.39), _row("ssfl", 0.1, 0.41, seed=1)]}
    note = render_docs.layer_budget_note({"runs": rows}, probe)
    # Probe 40.00: 2.50 below ERK, and SSFL's own shares win back 1.00 of them.
    assert "do not account for the gap: within ERK's shares, choosing by score instead of at " \
           "random costs 2.50 points, and SSFL's own shares (the first layers nearly dense) " \
           "win back 1.00 of them." in note
    # The dead-units rows, once measured: percentages of all filters, means over seeds.
    def unit_row(method: str, density: float, seed: int, dead: int, unused: int) -> dict:
        return {"method": method, "density": density, "seed": seed, "dead_out": dead,
                "out": 200, "unused_in": unused, "inputs": 100}

    units = {"rows": [unit_row("ssfl", 0.1, 0, 10, 20), unit_row("ssfl", 0.1, 1, 30, 30),
                      unit_row("random_erk", 0.1, 0, 0, 0), unit_row("ssfl", 0.5, 0, 1, 3)]}
    note = render_docs.layer_budget_note({"runs": rows}, probe, units)
    assert "At density 0.1 (seeds 0, 1; `python benchmarks/mask_units.py`" in note
    assert "the filters left with no weight at all are 10.0% in SSFL's masks, 0.0% in random " \
           "ERK's, and the input channels that feed no kept weight 25.0% in SSFL's masks, 0.0% " \
           "in random ERK's (density 0.5: 0.5% and 3.0% in SSFL's);" in note
    assert "mask_units" not in render_docs.layer_budget_note({"runs": rows}, probe, None)
    # SSFL ahead of ERK, or ERK not run: nothing to explain.
    ahead = [dict(r, final_accuracy=0.30) if r["algorithm"] == "random_erk" else r for r in rows]
    assert render_docs.layer_budget_note({"runs": ahead}, None) == ""
    assert render_docs.layer_budget_note({"runs": rows[:2]}, None) == ""
    # Paired on the seeds both have: ERK's seed 1 alone does not count before SSFL has it.
    note = render_docs.layer_budget_note({"runs": rows[:1] + rows[2:]}, None)
    assert "(random ERK 41.00%, SSFL 40.00%, +1.00 points; seed 0, the one both have)" in note


def test_filter_floor_note_reads_the_probe_against_ssfl_and_erk_by_hand() -> None:
    render_docs = load_benchmark("render_docs")
    rows = [_row("ssfl", 0.1, 0.40), _row("ssfl", 0.1, 0.42, seed=1),
            _row("random_erk", 0.1, 0.41), _row("random_erk", 0.1, 0.44, seed=1)]
    assert render_docs.filter_floor_note(rows, None).endswith(
        "algorithm.ssfl.min_per_unit=1`); not yet run.")
    # Seed 0 only: probe 40.50 against SSFL 40.00 and ERK 41.00 on that seed.
    note = render_docs.filter_floor_note(rows, {"runs": [_row("ssfl", 0.1, 0.405)]})
    assert ("seed 0 (not run on seed 1): 40.50%, against SSFL's 40.00% and random ERK's "
            "41.00% on the same seeds (change against SSFL per seed: +0.50; SSFL's own "
            "seed-to-seed spread here is 1.41), so reconnecting them wins back 0.50 "
            "of the 1.00 points.") in note
    both = {"runs": [_row("ssfl", 0.1, 0.43), _row("ssfl", 0.1, 0.44, seed=1)]}
    assert "closes the whole gap" in render_docs.filter_floor_note(rows, both)
    below = {"runs": [_row("ssfl", 0.1, 0.39), _row("ssfl", 0.1, 0.42, seed=1)]}
    note = render_docs.filter_floor_note(rows, below)
    assert "seeds 0, 1: 40.50%" in note and "per seed: -1.00, +0.00;" in note
    assert "wins nothing back (-0.50 points)" in note
    # In the layer-budget note it follows the dead-units measurement, and only once there is
    # one (the floor is the test of what that measurement found).
    units = {"rows": [{"method": "ssfl", "density": 0.1, "seed": 0, "dead_out": 10,
                       "out": 200, "unused_in": 5, "inputs": 100}]}
    note = render_docs.layer_budget_note({"runs": rows}, None, units, floor=below)
    assert note.endswith("what costs SSFL.\n") and "mask_units" in note
    assert "min_per_unit" not in render_docs.layer_budget_note({"runs": rows}, None, None,
                                                                   floor=below)


def test_continued_note_reads_the_carried_on_runs_by_hand() -> None:
    render_docs = load_benchmark("render_docs")

    def run(method: str, seed: int, at120: float, at160: float) -> dict:
        return {"algorithm": method, "seed": seed,
                "curve": [[112, at120 - 0.01], [120, at120], [160, at160]]}

    data = {"runs": [run("fedavg", 0, 0.42, 0.44), run("ssfl", 0, 0.43, 0.44),
                     run("fedavg", 1, 0.44, 0.46), run("ssfl", 1, 0.45, 0.47),
                     run("ssfl", 2, 0.99, 0.99)]}  # no dense partner: left out
    note = render_docs.continued_note(data)
    # Means over seeds 0 and 1: dense 43 -> 45, SSFL 44 -> 45.5; lead +1.0, then +0.5.
    assert "seeds 0, 1, mean over them" in note
    assert ("dense FedAvg 43.00% at round 120, 45.00% at 160 (+2.00); SSFL 44.00% at round "
            "120, 45.50% at 160 (+1.50)") in note
    assert note.endswith("+1.00 points at round 120, +0.50 at 160.")
    # The last fifth of 160 rounds starts at round 128: the last evaluation at or before it is
    # 120 (43 %), the end 45 %: +2.00, and the fit through 120 and 160 says the same.
    assert "dense FedAvg gained +2.00 points (least-squares trend +2.00)" in note
    one = {"runs": [r for r in data["runs"] if r["seed"] == 0]}
    assert "seed 0;" in render_docs.continued_note(one)
    assert render_docs.continued_note(None) == ""
    # Runs not carried past round 120 yet: nothing to say.
    short = {"runs": [dict(r, curve=r["curve"][:2]) for r in data["runs"]]}
    assert render_docs.continued_note(short) == ""


def test_continued_note_says_why_the_sweep_keeps_its_rounds_only_when_the_lead_held() -> None:
    render_docs = load_benchmark("render_docs")

    def run(method: str, seed: int, at120: float, at160: float) -> dict:
        return {"algorithm": method, "seed": seed, "wall_seconds": 3360.0,
                "curve": [[120, at120], [160, at160]]}

    data = {"runs": [run("fedavg", 0, 0.42, 0.44), run("ssfl", 0, 0.43, 0.44)]}
    # The lead went from +1.00 to +0.00 points: a change of -1.00, inside a spread of 1.5.
    note = render_docs.continued_note(data, spread=1.5)
    assert note.endswith("The sweep stays at 120 rounds: at 160 a run takes about 56 minutes, "
                         "over the issue's 45, and the extra rounds moved SSFL's lead by -1.00 "
                         "points, less than the seeds' spread (1.50).")
    # A change beyond the spread, or no spread to read it against: no such sentence.
    assert "stays" not in render_docs.continued_note(data, spread=0.5)
    assert "stays" not in render_docs.continued_note(data)


def _deep_data(verdict: str = "within seed noise (-1.00 ± 1.50)") -> dict:
    runs = [_row("fedavg", 1.0, 0.42), _row("fedavg", 1.0, 0.44, seed=1),
            _row("ssfl", 0.5, 0.41, per_layer={"a": 1.0, "b": 0.5}),
            _row("ssfl", 0.5, 0.43, seed=1, per_layer={"a": 0.0, "b": 0.0}),
            _row("snip_single", 0.5, 0.425, per_layer={"a": 0.9, "b": 0.6}),
            _row("ssfl", 0.1, 0.10),  # another density: left out
            _row("dispfl", 0.5, 0.20)]  # personalised: no global mask to compare
    for r in runs:
        r["rounds"] = 120
    claim = {"claim": "SSFL above dense FedAvg at density 0.5", "protocol": "global",
             "diff": -1.0, "spread": 1.5, "verdict": verdict}
    return {"runs": runs, "paper_claims": [claim]}


def test_why_note_reads_the_masks_rounds_and_probes_by_hand() -> None:
    render_docs = load_benchmark("render_docs")
    data = _deep_data()
    note = render_docs.why_note(data, None)
    assert "ours -1.00 ± 1.50 points, the paper's +2.3" in note
    # Dense 43.00, SSFL 42.00, SNIP on one client 42.50: the farthest is 1.00 points away,
    # inside the spread of 1.5.
    assert ("ends within 1.00 points of dense FedAvg's 43.00% (SSFL 42.00%, SNIP on one "
            "client 42.50%), closer than the seeds' spread") in note
    # Seed 0's masks per layer: |1.0 - 0.9| and |0.5 - 0.6|, 0.100 on average.
    assert "differ by 0.100 per layer on average" in note
    assert "The learning rate. Not yet measured" in note
    assert "A hypothesis so far" in note and "model.width=0.125" in note
    assert "Carried on" not in note

    def run(method: str, seed: int, at120: float, at160: float) -> dict:
        return {"algorithm": method, "seed": seed, "curve": [[120, at120], [160, at160]]}

    continued = {"runs": [run("fedavg", 0, 0.42, 0.43), run("ssfl", 0, 0.41, 0.425)]}
    probe = {"runs": [_row("fedavg", 1.0, 0.40), _row("ssfl", 0.5, 0.41),
                      _row("ssfl", 0.5, 0.99, seed=1)]}  # no dense partner: left out
    note = render_docs.why_note(data, continued, lr_probe=probe, width_probe=probe)
    assert ("Carried on from 120 to 160 rounds, SSFL's lead over dense FedAvg went from -1.00 "
            "to -0.50 points: longer training does not open the paper's gap here.") in note
    # The reference's seed 0: dense 42, SSFL 41, a lead of -1.00; the probe's +1.00: +2.00.
    assert ("seed 0 (not run on seed 1): dense FedAvg 40.00% (reference 42.00%), SSFL 41.00% "
            "(reference 41.00%), SSFL's lead +1.00 points against -1.00 in the reference on the "
            "same seeds (change per seed: +2.00): the smaller rate raises SSFL's lead on the "
            "one seed so far, so the authors' rate may suit the dense model more than the "
            "sparse one; the mean change, +2.00, is beyond the seeds' spread of the lead "
            "(1.50).") in note
    assert note.count("seed 0 (not run on seed 1): dense FedAvg 40.00%") == 2
    assert "hypothesis so far" not in note
    assert "does not fall with the width on every seed, against the hypothesis" in note
    narrower = {"runs": [_row("fedavg", 1.0, 0.40), _row("ssfl", 0.5, 0.37)]}
    note = render_docs.why_note(data, None, width_probe=narrower)
    assert "the smaller rate" not in note
    assert ("the smaller rate lowers SSFL's lead on the one seed so far, so the authors' rate "
            "is not what holds SSFL back") in render_docs.why_note(data, None, lr_probe=narrower)
    both = {"runs": narrower["runs"] + [_row("fedavg", 1.0, 0.44, seed=1),
                                        _row("ssfl", 0.5, 0.40, seed=1)]}
    # Seed 1: reference lead -1.00, the probe's -4.00; seed 0: -1.00 and -3.00.
    assert ("(change per seed: -2.00, -3.00): the smaller rate lowers SSFL's lead on every "
            "seed") in render_docs.why_note(data, None, lr_probe=both)
    assert ("lead -3.00 points against -1.00 in the reference on the same seeds (change per "
            "seed: -2.00): the lead falls with the width on every seed, as the hypothesis "
            "predicts; the mean change, -2.00, is beyond") in note
    assert "The learning rate. Not yet measured" in note
    # SSFL leading beyond the noise, or no dense run: nothing to explain.
    ahead = _deep_data("holds")
    ahead["paper_claims"][0]["diff"] = 3.0
    assert render_docs.why_note(ahead, None) == ""
    ahead["paper_claims"][0]["verdict"] = "within seed noise (+1.00 ± 1.50)"
    assert render_docs.why_note(ahead, None).startswith(
        "\nWhy SSFL's lead over dense FedAvg stays within seed noise here")
    assert render_docs.why_note({"runs": data["runs"], "paper_claims": []}, None) == ""


def test_resnet18_weight_counts_in_the_docs_are_the_library_s() -> None:
    from ssfl.masks import prunable_parameter_names
    from ssfl.models import build_model

    render_docs = load_benchmark("render_docs")
    for width, count in render_docs.RESNET18_WEIGHTS.items():
        model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32,
                            width=width, seed=0)
        params = dict(model.named_parameters())
        assert sum(params[n].numel() for n in prunable_parameter_names(model)) == count
