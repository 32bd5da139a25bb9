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
#: this kind of CPU's own record of the same runs, if one was made (see record.py)
MACHINE = json.loads(record.machine_file().read_text()) if record.machine_file().exists() \
    else None


def exact(got: dict, want: dict) -> None:
    assert got["values_sha256"] == want["values_sha256"], "final weights moved"
    # Every recorded figure is compared; figures added since (a new metric) are not results
    # that moved, so only the recorded keys are looked at (and all of them must be there).
    assert {k: got["summary"].get(k) for k in want["summary"]} == want["summary"]
    assert len(got["metrics"]) == len(want["metrics"])
    for row, recorded in zip(got["metrics"], want["metrics"]):
        assert {k: row.get(k, "missing") for k in recorded} == recorded


def close(got: dict, want: dict) -> None:
    """Equal up to another CPU's rounding: counts, bytes and names exactly; losses to a
    relative 1e-4; accuracies to 0.01 (a few test images whose prediction sits on a tie)."""

    def same(key: str, a, b) -> bool:
        if isinstance(b, float) and isinstance(a, float):
            return a == pytest.approx(b, rel=1e-4, abs=0.01 if "accuracy" in key else 1e-6)
        if isinstance(b, dict) and isinstance(a, dict):
            return a.keys() == b.keys() and all(same(k, a[k], b[k]) for k in b)
        return a == b

    moved = [k for k in want["summary"] if not same(k, got["summary"].get(k), want["summary"][k])]
    assert not moved, f"summary moved beyond rounding: {moved}"
    assert len(got["metrics"]) == len(want["metrics"])
    for row, recorded in zip(got["metrics"], want["metrics"]):
        moved = [k for k in recorded if not same(k, row.get(k, "missing"), recorded[k])]
        assert not moved, f"round {recorded.get('round')} moved beyond rounding: {moved}"


@pytest.mark.parametrize("name", sorted(record.CASES))
def test_run_is_bit_identical_to_the_recorded_one(name: str) -> None:
    got = record.record_case(name)
    if MACHINE is not None:
        # A kind of CPU with its own record: bit for bit against it.
        exact(got, MACHINE[name])
        return
    try:
        exact(got, GOLDEN[name])
    except AssertionError:
        # Another kind of CPU (another vendor or instruction set) rounds differently from the
        # reference's; without a record of its own the run must agree up to rounding.
        close(got, GOLDEN[name])


def test_close_tells_rounding_from_a_moved_result() -> None:
    want = {"summary": {"final_accuracy": 0.5, "bytes_per_round": {"down": 10, "up": 10}},
            "metrics": [{"round": 1, "train_loss": 2.0, "accuracy": 0.5}]}
    rounded = {"summary": {"final_accuracy": 0.503, "bytes_per_round": {"down": 10, "up": 10}},
               "metrics": [{"round": 1, "train_loss": 2.00001, "accuracy": 0.497}]}
    close(rounded, want)
    moved_loss = json.loads(json.dumps(rounded))
    moved_loss["metrics"][0]["train_loss"] = 2.01
    with pytest.raises(AssertionError, match="round 1 moved beyond rounding: .'train_loss'"):
        close(moved_loss, want)
    moved_bytes = json.loads(json.dumps(rounded))
    moved_bytes["summary"]["bytes_per_round"]["up"] = 11
    with pytest.raises(AssertionError, match="bytes_per_round"):
        close(moved_bytes, want)
