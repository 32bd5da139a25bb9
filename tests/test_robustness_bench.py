"""The robustness sweep's report (benchmarks/robustness.py) on hand-made run rows."""

from __future__ import annotations

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def robustness():
    return load_benchmark("robustness")


def _row(rule: str, attack: str, setting: str, seed: int, acc: float) -> dict:
    return {"rule": rule, "attack": attack, "setting": setting, "seed": seed,
            "settled_accuracy": acc, "completed": True}


def test_each_seed_is_paired_with_its_own_honest_run(robustness) -> None:
    clean = [_row("plain", "none", "5x0", s, a) for s, a in ((0, 0.30), (1, 0.26), (2, 0.28))]
    attacked = [_row("plain", "sign_flip", "5x1", 0, 0.25), _row("plain", "sign_flip", "5x1", 1,
                                                                 0.25),
                _row("plain", "zeros", "5x1", 0, 0.10)]  # one seed only: no row
    table = robustness.seeds_table(clean, attacked)
    lines = table.splitlines()
    assert len(lines) == 3
    # seed 0: 25 - 30 = -5; seed 1: 25 - 26 = -1; mean -3, std 2.8
    assert "| plain | sign_flip | 5x1 | s0: -5.0, s1: -1.0 | -3.0 +- 2.8 |" == lines[2]
    assert robustness.seeds_table(clean, attacked[2:]) == ""


def test_attack_changes_and_their_figure(robustness, tmp_path) -> None:
    rows = [_row("plain", "none", "5x0", 0, 0.30), _row("plain", "zeros", "5x1", 0, 0.10),
            _row("default", "none", "5x0", 0, 0.28), _row("default", "zeros", "5x1", 0, 0.29)]
    changes = robustness.attack_changes(rows, ["plain", "default"], "5x1", ["zeros", "huge"])
    assert changes[0] == pytest.approx([-20.0, 1.0])
    assert changes[1] == [None, None]  # not run: blank, not zero
    path = tmp_path / "attacks.png"
    robustness.attack_figure(rows, ["plain", "default"], ["zeros", "huge"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
