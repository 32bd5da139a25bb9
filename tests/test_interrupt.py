"""Ctrl-C: the round in progress is abandoned, a checkpoint of the last completed round is
written, the CLI says how to resume and exits 130; the resumed run ends as an uninterrupted one.
``--out`` onto an existing run is refused without ``--overwrite``; a folder without a checkpoint
gets the true reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssfl.checkpoint import CheckpointError
from ssfl.cli import main
from ssfl.config import load_config
from ssfl.export import read_model
from ssfl.run import loop
from ssfl.run.loop import RunInterrupted
from ssfl.sim import run_experiment

RUN = ["run.rounds=4", "run.threads=1", "run.progress=false", "run.checkpoint_every=0",
       "run.eval_every=2", "federation.num_clients=6", "federation.clients_per_round=3",
       "train.local_epochs=1"]


def _rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ref") / "run"
    run_experiment(load_config(None, RUN), folder)
    return folder


@pytest.mark.parametrize("algorithm", ["ssfl", "dispfl"])
def test_ctrl_c_mid_round_checkpoints_the_last_completed_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Ctrl-C lands in round 3 after the server aggregated it (during its evaluation), with
    checkpoints off: the checkpoint is round 2's, and the resumed run ends bit-identical."""
    overrides = [*RUN, f"algorithm.name={algorithm}", "run.eval_every=1"]
    ref = tmp_path_factory.mktemp("r") / "run"
    run_experiment(load_config(None, overrides), ref)
    real = loop.evaluate

    def interrupt_in_round_3(r):  # type: ignore[no-untyped-def]
        if len(r.metrics) == 2:
            raise KeyboardInterrupt
        return real(r)

    folder = tmp_path / "run"
    monkeypatch.setattr(loop, "evaluate", interrupt_in_round_3)
    with pytest.raises(RunInterrupted) as stop:
        run_experiment(load_config(None, overrides), folder)
    monkeypatch.setattr(loop, "evaluate", real)
    assert stop.value.round == 2 and stop.value.checkpoint == folder / "checkpoint.pt"
    run_experiment(load_config(None, overrides), folder, resume=True)
    assert _rows(folder) == _rows(ref)
    (a, mask_a, _), (b, mask_b, _) = read_model(folder), read_model(ref)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert all(torch.equal(mask_a[n], mask_b[n]) for n in mask_b)


def test_without_a_folder_an_interrupt_saves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(row: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(RunInterrupted) as caught:
        run_experiment(load_config(None, RUN), write=False, on_round=stop)
    assert caught.value.round == 1 and caught.value.checkpoint is None


@pytest.mark.slow
def test_sigint_to_ssfl_run_exits_130_with_a_resume_line(tmp_path: Path,
                                                         reference: Path) -> None:
    folder = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ssfl.cli", "run", *RUN, "--out",
                             str(folder)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300 * float(os.environ.get("SSFL_TEST_TIME_SCALE", "1"))
    metrics = folder / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # the run ended before the signal landed: nothing to check
        pytest.skip("the run finished before SIGINT arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"continue with: ssfl run --resume {folder}" in err
    assert main(["run", "--resume", str(folder)]) == 0
    assert _rows(folder) == _rows(reference)


def test_out_onto_an_existing_run_needs_overwrite(reference: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(reference, folder)
    (folder / "notes.txt").write_text("mine")
    assert main(["run", *RUN, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert main(["run", *RUN, "run.rounds=1", "--out", str(folder), "--overwrite"]) == 0
    assert len(_rows(folder)) == 1 and (folder / "notes.txt").read_text() == "mine"
    assert main(["run", *RUN, "--overwrite"]) == 2
    assert "--overwrite goes with --out" in capsys.readouterr().err


def test_resume_without_a_checkpoint_tells_the_truth(reference: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(reference, folder)  # checkpoint_every = 0: none written
    with pytest.raises(CheckpointError, match="run.checkpoint_every = 0 writes none"):
        run_experiment(load_config(folder / "config.toml"), folder, resume=True)
    config = load_config(None, [*RUN, "run.checkpoint_every=10"])
    (folder / "config.toml").write_text(
        (folder / "config.toml").read_text().replace("checkpoint_every = 0",
                                                     "checkpoint_every = 10"))
    with pytest.raises(CheckpointError, match=r"stopped after 4 round\(s\), before its first "
                       r"checkpoint \(written every 10 rounds, and on Ctrl-C\)"):
        run_experiment(config, folder, resume=True)
