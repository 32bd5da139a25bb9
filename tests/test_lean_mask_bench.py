"""The lean-mask training table (benchmarks/lean_mask.py train) on hand-made run summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def lean_mask():
    return load_benchmark("lean_mask")


def _summary(folder: Path, accuracy: float, one_time: dict, total: int) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(
        {"final_accuracy": accuracy, "one_time_bytes": one_time, "total_bytes": total}))


def _recorded(algorithm: str, seed: int, accuracy: float, total: int) -> dict:
    return {"algorithm": algorithm, "target_density": 0.05, "seed": seed, "split": "bdir0.3",
            "lr": None, "final_accuracy": accuracy, "total_bytes": total,
            "one_time_bytes": {"score_upload": 400, "mask_broadcast": 100}}


def test_lean_runs_are_paired_with_recorded_paper_runs_on_their_own_seed(lean_mask, tmp_path):
    job = lean_mask.LeanJob
    _summary(tmp_path / job("top2-log8", 0.05, 0).name, 0.40,
             {"score_upload": 30, "mask_broadcast": 100}, 1_100)
    _summary(tmp_path / job("top2-log8", 0.05, 1).name, 0.44,
             {"score_upload": 30, "mask_broadcast": 100}, 1_100)
    # seed 0 of paper SSFL was run again here; seed 1 exists only as a recorded run
    _summary(tmp_path / job("dense-float32", 0.05, 0).name, 0.41,
             {"score_upload": 400, "mask_broadcast": 100}, 2_600)
    recorded = {("ssfl", 0.05, 0): _recorded("ssfl", 0, 0.41, 2_600),
                ("ssfl", 0.05, 1): _recorded("ssfl", 1, 0.46, 2_600),
                ("random", 0.05, 0): _recorded("random", 0, 0.10, 1_000),
                ("random", 0.05, 1): _recorded("random", 1, 0.10, 1_000)}
    rows = lean_mask.train_rows(tmp_path, recorded, [0.05], [0, 1])
    by = {(r["setting"], r["seed"]): r for r in rows}
    assert set(by) == {("top2-log8", 0), ("top2-log8", 1), ("dense-float32", 0),
                       ("dense-float32", 1)}
    assert by[("dense-float32", 0)]["recorded_final_accuracy"] == 0.41
    assert by[("dense-float32", 1)]["source"] == "comparison.json"
    assert by[("dense-float32", 1)]["one_time_bytes"] == 500  # the ledger's parts summed
    assert by[("top2-log8", 0)]["one_time_bytes"] == 130
    table = lean_mask.train_table(rows)
    lean = next(line for line in table if line.startswith("| top2-log8 "))
    cells = [c.strip() for c in lean.strip("|").split("|")]
    # accuracy 40 and 44 (mean 42); paper 41 and 46; differences -1 and -2; bytes 1.1x random
    assert cells[2] == "42.00 ± 2.83"
    assert cells[3] == "43.50 ± 3.54"
    assert cells[4] == "-1.50 ± 0.71"
    assert cells[5] == "1.10x"
    assert cells[6] == "2"
    paper = next(line for line in table if line.startswith("| dense-float32 "))
    assert "2.60x" in paper


def test_recorded_runs_of_another_setting_are_not_used(lean_mask, tmp_path):
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps({"config": "configs/quickstart.toml", "overrides": [],
                                "runs": [_recorded("ssfl", 0, 0.5, 1)]}))
    assert lean_mask.recorded_runs(path, Path("configs/cifar10_cpu.toml")) == {}
    path.write_text(json.dumps({"config": "configs/cifar10_cpu.toml", "overrides": ["x=1"],
                                "runs": [_recorded("ssfl", 0, 0.5, 1)]}))
    assert lean_mask.recorded_runs(path, Path("configs/cifar10_cpu.toml")) == {}
    path.write_text(json.dumps({"config": "configs/cifar10_cpu.toml", "overrides": [],
                                "runs": [_recorded("ssfl", 0, 0.5, 1)]}))
    assert set(lean_mask.recorded_runs(path, Path("configs/cifar10_cpu.toml"))) == {
        ("ssfl", 0.05, 0)}
    assert lean_mask.recorded_runs(tmp_path / "missing.json", Path("x.toml")) == {}
