"""Client failures: a crashed client is dropped and logged, the round goes on with the rest if
enough replied, and is retried (never silently skipped) otherwise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ssfl.algorithms.base import RoundFailed
from ssfl.config import load_config
from ssfl.sim import run_experiment

BASE = ["run.rounds=6", "run.progress=false", "federation.num_clients=8",
        "federation.clients_per_round=4", "train.local_epochs=1", "model.width=0.5",
        "run.checkpoint_every=1"]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_crashed_clients_are_dropped_logged_and_the_rest_aggregated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(None, [*BASE, "federation.failure_rate=0.3"])
    with caplog.at_level(logging.WARNING):
        result = run_experiment(config, tmp_path / "run")
    rows = _rows(tmp_path / "run")
    failed = [f for r in rows for f in r.get("failed", [])]
    # The figure in docs/reliability.md: 10 of the 24 sampled client-rounds crash (seeded).
    assert len(failed) == 10 and sum(len(r["clients"]) for r in rows) == 24
    assert all(f["reason"] == "injected crash" for f in failed)
    assert any("dropped: injected crash" in m for m in caplog.messages)
    # Bytes: every sampled client was sent the payload; only survivors sent one back.
    per_client = result.summary["bytes_per_round"]
    for row in rows:
        lost = sum(1 for f in row.get("failed", []) if f["attempt"] == row.get("attempts", 1))
        assert row["bytes_up"] % (row["bytes_down"] // (4 * row.get("attempts", 1))) == 0
        assert row["bytes_up"] <= row["bytes_down"]
        assert lost <= 4
    mask = json.loads((tmp_path / "run" / "mask.json").read_text())
    crashed_in_mask_round = set(range(8)) - set(mask["scored_clients"])
    assert mask["scored_clients"] == sorted(mask["scored_clients"])
    assert crashed_in_mask_round or len(mask["scored_clients"]) == 8
    assert per_client["down"] > 0
    # The same config and seed give the same failures and metrics.
    again = run_experiment(config, write=False)
    assert [r.get("failed") for r in again.metrics] == [r.get("failed") for r in rows]
    assert [r["accuracy"] for r in again.metrics] == [r["accuracy"] for r in rows]


@pytest.mark.slow
def test_too_few_replies_retry_the_round_then_stop_with_the_checkpoint_intact(
    tmp_path: Path,
) -> None:
    # Every client must reply: with a 40% crash rate some rounds need several attempts.
    config = load_config(None, [*BASE, "federation.failure_rate=0.4",
                                "federation.min_replies=4", "federation.max_round_attempts=20"])
    run_experiment(config, tmp_path / "retried")
    rows = _rows(tmp_path / "retried")
    assert len(rows) == 6 and any(r.get("attempts", 1) > 1 for r in rows)
    # The figure in docs/reliability.md: 73 client failures over 43 attempts, no round skipped.
    assert [r.get("attempts", 1) for r in rows] == [4, 4, 5, 15, 2, 13]
    assert sum(len(r.get("failed", [])) for r in rows) == 73
    for row in rows:
        attempts = row.get("attempts", 1)
        assert not [f for f in row.get("failed", []) if f["attempt"] == attempts]

    # With one attempt allowed, this seed's round 6 loses two clients: the run stops there.
    stingy = load_config(None, [*BASE, "federation.failure_rate=0.1",
                                "federation.min_replies=4", "federation.max_round_attempts=1"])
    with pytest.raises(RoundFailed, match="round 6: 2 valid replies, at least 4 required"):
        run_experiment(stingy, tmp_path / "stopped")
    done = _rows(tmp_path / "stopped")
    assert len(done) == 5
    from ssfl.checkpoint import load_checkpoint
    meta, _ = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert meta["round"] == len(done)


def test_a_client_that_raises_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssfl.algorithms.ssfl import FixedMaskFedAvg

    real = FixedMaskFedAvg.client_step

    def flaky(self, ctx, received, state):
        if ctx.client_id == 3:
            raise MemoryError("out of memory on the device")
        return real(self, ctx, received, state)

    monkeypatch.setattr(FixedMaskFedAvg, "client_step", flaky)
    result = run_experiment(load_config(None, [*BASE, "federation.clients_per_round=8"]),
                            write=False)
    for row in result.metrics:
        assert row["failed"] == [{"client": 3, "attempt": 1,
                                  "reason": "client raised MemoryError: out of memory on the "
                                            "device"}]
