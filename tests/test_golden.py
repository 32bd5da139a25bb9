"""Results must not move: short runs of every method against the results recorded by
``tests/golden/record.py`` before the algorithm interface was redesigned (metrics, bytes, mask
digests and final weights, bit for bit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import record  # noqa: E402

GOLDEN = json.loads(record.FILE.read_text())


@pytest.mark.parametrize("name", sorted(record.CASES))
def test_run_is_bit_identical_to_the_recorded_one(name: str) -> None:
    got = record.record_case(name)
    want = GOLDEN[name]
    assert got["values_sha256"] == want["values_sha256"], "final weights moved"
    # Every recorded figure is compared; figures added since (a new metric) are not results
    # that moved, so only the recorded keys are looked at (and all of them must be there).
    assert {k: got["summary"].get(k) for k in want["summary"]} == want["summary"]
    assert len(got["metrics"]) == len(want["metrics"])
    for row, recorded in zip(got["metrics"], want["metrics"]):
        assert {k: row.get(k, "missing") for k in recorded} == recorded
