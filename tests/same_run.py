"""One check for the tests that claim two run folders hold the same run bit for bit (a resumed
run against an uninterrupted one, a run carried on to more rounds against a longer one)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ssfl.checkpoint import load_checkpoint


def metric_rows(folder: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` without their timings (the only figures that may differ)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def assert_same_run(folder: Path, reference: Path, rounds: int) -> None:
    """Every round's metrics, the last checkpoint's round and tensors, and the summary's final
    accuracy and bytes of ``folder`` equal those of ``reference``."""
    assert metric_rows(folder) == metric_rows(reference)
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    ref_meta, ref_tensors = load_checkpoint(reference / "checkpoint.pt")
    assert meta["round"] == ref_meta["round"] == rounds
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    summary = json.loads((folder / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    for key in ("rounds", "final_accuracy", "total_bytes"):
        assert summary[key] == expected[key], key
