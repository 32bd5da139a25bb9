"""The saliency-augmentation benchmark's bookkeeping (benchmarks/saliency_augment.py): the
augmented runs it has on file count as done on a fresh checkout, and its table pairs each with
the unaugmented run of the same density and seed."""

from __future__ import annotations

import json
import sys

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def saliency_augment():
    return load_benchmark("saliency_augment")


def test_recorded_augmented_runs_are_not_rerun_and_stay_on_file(saliency_augment, tmp_path,
                                                                monkeypatch, capsys) -> None:
    out = tmp_path / "results"
    out.mkdir()
    recorded = [{"name": "ssfl-d0.5-bdir0.3-s0", "density": 0.5, "seed": 0, "train": 0.52,
                 "off": 0.50},
                {"name": "ssfl-d0.5-bdir0.3-s1", "density": 0.5, "seed": 1, "train": 0.47,
                 "off": 0.48}]
    (out / "saliency_augment.json").write_text(json.dumps({"masks": [], "train": recorded}))
    runs = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["saliency_augment.py", "train", "--densities", "0.5",
                                      "--seeds", "0,1", "--runs-dir", str(runs),
                                      "--out", str(out)])
    saliency_augment.main()
    # No run was started (no run folder), and both rows are still on file.
    assert not runs.exists() or not any(runs.iterdir())
    data = json.loads((out / "saliency_augment.json").read_text())
    assert sorted(r["name"] for r in data["train"]) == [r["name"] for r in recorded]
    # The table: off 50 and 48 (49.0 +- 1.4), train 52 and 47, differences 2 and -1 (0.5 +- 2.1).
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| 0.5 |"))
    assert row == "| 0.5 | 49.0 ± 1.4 | 49.5 ± 3.5 | 0.5 ± 2.1 | 2 |"


def test_saliency_verdict_reads_the_paired_runs_by_hand() -> None:
    render_docs = load_benchmark("render_docs")
    rows = [{"density": 0.5, "seed": s, "train": t, "off": o}
            for s, t, o in [(0, 0.450, 0.452), (1, 0.460, 0.458)]]
    rows += [{"density": 0.05, "seed": s, "train": t, "off": o}
             for s, t, o in [(0, 0.400, 0.410), (1, 0.395, 0.403)]]
    text = render_docs.saliency_verdict(rows)
    # 0.5: -0.2 and +0.2 (mean 0, spread 0.28): both ways, not clear; 0.05: -1.0 and -0.8.
    assert "moves SSFL's final accuracy both ways" in text
    assert "+0.0 ± 0.3 points at 0.5, -0.9 ± 0.1 points at 0.05" in text
    assert "larger than its seed-to-seed spread at 0.05." in text
    assert "config keeps" in text and "therefore" not in text
    lower = render_docs.saliency_verdict(rows[2:])
    assert "lowers SSFL's final accuracy at every density" in lower
    assert "config therefore keeps" in lower
