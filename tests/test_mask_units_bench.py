"""The dead-units benchmark's pure parts (benchmarks/mask_units.py): what it counts for a mask
and how its table reads, on masks checked by eye; its recorded rows are not measured again."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def mask_units():
    return load_benchmark("mask_units")


def _row(method: str, density: float, seed: int, dead: int, unused: int) -> dict:
    return {"method": method, "density": density, "seed": seed, "dead_out": dead, "out": 20,
            "unused_in": unused, "inputs": 10,
            "per_layer": {"a": [0.5, 0, 4, 0, 2], "b": [0.1, dead, 16, unused, 8]}}


def test_unit_row_counts_dead_filters_and_unused_inputs_by_eye(mask_units) -> None:
    # Filter 1 of "a" keeps nothing; input 2 of "a" feeds nothing; "b" is full.
    a = torch.tensor([[True, True, False], [False, False, False]])
    row = mask_units.unit_row({"a": a, "b": torch.ones(2, 2, 3, dtype=torch.bool)})
    assert (row["dead_out"], row["out"], row["unused_in"], row["inputs"]) == (1, 4, 1, 5)
    assert row["per_layer"]["a"] == [pytest.approx(2 / 6), 1, 2, 1, 3]
    assert row["per_layer"]["b"] == [1.0, 0, 2, 0, 2]


def test_report_reads_the_rows_as_percentages_over_seeds(mask_units) -> None:
    rows = [_row("ssfl", 0.1, 0, 2, 3), _row("ssfl", 0.1, 1, 4, 1),
            _row("random_erk", 0.1, 0, 0, 0)]
    text = mask_units.report(rows)
    # SSFL: 10% and 20% of 20 filters dead (mean 15.0, std 7.1); inputs 30% and 10%.
    assert "| 0.1 | SSFL (global top-k, the paper) | 0, 1 | 15.0 ± 7.1 | 20.0 ± 14.1 | " \
           "`b` 2 of 16 |" in text
    assert "| 0.1 | random ERK | 0 | 0.0 (n=1) | 0.0 (n=1) | — |" in text
    assert "| `b` | 0.100, 2 of 16 | 0.100, 0 of 16 |" in text


def test_recorded_rows_are_not_measured_again(mask_units, tmp_path, monkeypatch) -> None:
    rows = [_row(m, 0.1, 0, 0, 0) for m in mask_units.MASKS]
    (tmp_path / "mask_units.json").write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(sys, "argv", ["mask_units.py", "--densities", "0.1", "--seeds", "0",
                                      "--out", str(tmp_path)])
    mask_units.main()  # would need the data set to measure anything
    assert json.loads((tmp_path / "mask_units.json").read_text())["rows"] == rows
    assert "random ERK" in (tmp_path / "mask_units.md").read_text()
