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
    assert got["summary"] == want["summary"]
    assert got["metrics"] == want["metrics"]
