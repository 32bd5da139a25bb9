"""Experiment loggers through the per-round hook: TensorBoard event files and an offline
Weights & Biases run hold every round's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssfl.config import ConfigError, load_config
from ssfl.loggers import scalars
from ssfl.sim import run_experiment

RUN = ["run.rounds=2", "run.threads=1", "run.progress=false", "federation.num_clients=6",
       "federation.clients_per_round=3", "train.local_epochs=1", "run.checkpoint_every=0"]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_scalars_keep_the_numbers_only() -> None:
    row = {"round": 3, "accuracy": 0.5, "test_loss": None, "clients": [1, 2], "lr": 0.01,
           "bytes_up": 10, "flag": True, "nan": float("nan")}
    assert scalars(row) == {"accuracy": 0.5, "lr": 0.01, "bytes_up": 10.0}


def test_unknown_or_missing_loggers_are_refused_before_any_work() -> None:
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        load_config(None, [*RUN, 'run.loggers="tensorbord"'])


def test_tensorboard_gets_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / "run"
    run_experiment(load_config(None, [*RUN, 'run.loggers="tensorboard"']), folder)
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("accuracy")]
    rows = _rows(folder)
    assert accuracy == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert [e.value for e in events.Scalars("bytes_up")] == [r["bytes_up"] for r in rows]


def test_wandb_offline_run_holds_the_figures(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default
    folder = tmp_path / "run"
    run_experiment(load_config(None, [*RUN, 'run.loggers="wandb"']), folder)
    [data] = list((folder / "wandb").glob("offline-run-*/*.wandb"))
    blob = data.read_bytes()
    # The run file holds each round's figures (JSON-encoded values in its records).
    for row in _rows(folder):
        assert json.dumps(row["accuracy"]).encode() in blob
        assert all(key.encode() in blob for key in scalars(row))
