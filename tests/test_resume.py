"""Checkpoints and resume: a run killed with SIGKILL and resumed ends bit-identical to an
uninterrupted run; checkpoints are atomic and never unpickle arbitrary objects."""

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

from ssfl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssfl.cli import main
from ssfl.config import load_config
from ssfl.sim import run_experiment

RUN = ["run.rounds=8", "run.progress=false", "run.checkpoint_every=1", "run.eval_every=2",
       "federation.num_clients=6", "federation.clients_per_round=3", "train.local_epochs=3",
       "model.width=0.5", "run.threads=1"]


def _rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.mark.parametrize("algorithm", ["ssfl", "feddst"])
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path, algorithm: str) -> None:
    overrides = [*RUN, f"algorithm.name={algorithm}", "algorithm.update_interval=2"]
    reference = run_experiment(load_config(None, overrides), tmp_path / "ref")

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssfl.cli", "run", "--out", str(killed),
                             *overrides], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert 3 <= done < 8, "the process was not killed mid-run"

    assert main(["run", "--resume", str(killed), "--no-progress"]) == 0
    assert _rows(killed) == _rows(reference.run_dir)
    meta, tensors = load_checkpoint(killed / "checkpoint.pt")
    ref_meta, ref_tensors = load_checkpoint(reference.run_dir / "checkpoint.pt")
    assert meta["round"] == ref_meta["round"] == 8
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["final_accuracy"] == reference.summary["final_accuracy"]
    assert summary["total_bytes"] == reference.summary["total_bytes"]


def test_resume_refuses_a_changed_config_and_extra_arguments(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "run"
    run_experiment(load_config(None, [*RUN, "run.rounds=2"]), folder)
    (folder / "config.toml").write_text((folder / "config.toml").read_text().replace(
        "lr = 0.05", "lr = 0.07"))
    assert main(["run", "--resume", str(folder)]) == 2
    assert "config differs" in capsys.readouterr().err
    assert main(["run", "--resume", str(folder), "train.lr=0.1"]) == 2
    assert "--resume takes only the run folder" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default(tmp_path: Path) -> None:
    """A key added to ssfl later (here run.device) is missing from an older checkpoint's config:
    it counts as its default, not as a changed config."""
    folder = tmp_path / "run"
    reference = run_experiment(load_config(None, [*RUN, "run.rounds=2"]), folder)
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    assert 'device = "auto"\n' in meta["config"]
    meta["config"] = meta["config"].replace('device = "auto"\n', "")
    save_checkpoint(folder / "checkpoint.pt", meta, tensors)
    (folder / "config.toml").write_text(meta["config"])
    assert main(["run", "--resume", str(folder), "--no-progress"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_accuracy"] == reference.summary["final_accuracy"]


def test_a_crash_while_saving_leaves_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1}, {"w": torch.ones(3)})

    def exploding_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"round": 2}, {"w": torch.zeros(3)})
    meta, tensors = load_checkpoint(path)
    assert meta == {"round": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_truncated_corrupt_and_hostile_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1}, {"w": torch.ones(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format": torch.tensor(1), "meta": "{}", "tensors": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
