"""Checkpoints and resume: a run killed with SIGKILL and resumed ends bit-identical to an
uninterrupted run; checkpoints are atomic and never unpickle arbitrary objects."""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from same_run import assert_same_run, metric_rows

from ssfl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seal
from ssfl.cli import main
from ssfl.config import load_config
from ssfl.run import checkpoints, experiment, loop
from ssfl.run.checkpoints import code_version, verify
from ssfl.run.experiment import prepare
from ssfl.sim import run_experiment

RUN = ["run.rounds=8", "run.progress=false", "run.checkpoint_every=1", "run.eval_every=2",
       "federation.num_clients=6", "federation.clients_per_round=3", "train.local_epochs=3",
       "model.width=0.5", "run.threads=1"]


@pytest.mark.slow
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
    assert_same_run(killed, reference.run_dir, 8)


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
    save_checkpoint(folder / "checkpoint.pt", seal(meta, tensors), tensors)  # as then written
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


# ---- hostile and broken checkpoints: a clear CheckpointError for every defect ---------------
TINY = ["run.rounds=3", "run.progress=false", "run.checkpoint_every=1", "run.eval_every=2",
        "federation.num_clients=4", "federation.clients_per_round=2", "train.local_epochs=1",
        "model.width=0.25", "run.threads=1"]


class _Stop(Exception):
    pass


def _stop_after(rnd: int):
    def on_round(row: dict) -> None:
        if row["round"] == rnd:
            raise _Stop

    return on_round


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny digits run to its end, and the same run stopped after its checkpoint of round 2
    (both read-only here: tests copy them)."""
    base = tmp_path_factory.mktemp("tiny")
    config = load_config(None, TINY)
    run_experiment(config, base / "ref")
    with pytest.raises(_Stop):
        run_experiment(config, base / "stopped", on_round=_stop_after(2))
    return {"ref": base / "ref", "stopped": base / "stopped"}


def _copy(tiny_runs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_runs[name], folder)
    return folder


def _resume(folder: Path, *, force: bool = False):
    config = load_config(None, TINY)
    if "force" in inspect.signature(run_experiment).parameters:
        return run_experiment(config, folder, resume=True, force=force)
    # Until the loop passes ``--force`` on (``run(..., force=)``), restore gets it directly.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "restore", functools.partial(checkpoints.restore, force=force))
        return run_experiment(config, folder, resume=True)


def _summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    return {k: v for k, v in summary.items() if "second" not in k}  # all but the times


def test_a_flipped_tensor_bit_or_edited_metadata_is_refused_as_corrupt(
        tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_runs, "stopped", tmp_path)
    path = folder / "checkpoint.pt"
    meta, tensors = load_checkpoint(path)
    flipped = {**tensors, "algorithm.values": tensors["algorithm.values"].clone()}
    flipped["algorithm.values"].view(torch.int32)[7] ^= 1 << 4
    save_checkpoint(path, meta, flipped)  # re-saved as is: the checksum is the old one
    with pytest.raises(CheckpointError, match="corrupt: a tensor or the metadata changed"):
        _resume(folder)
    save_checkpoint(path, {**meta, "wall_seconds": 0.5}, tensors)
    with pytest.raises(CheckpointError, match="corrupt: a tensor or the metadata changed"):
        _resume(folder)
    save_checkpoint(path, meta, tensors)  # as it was: resumes
    _resume(folder)
    assert _summary(folder) == _summary(tiny_runs["ref"])


def _without(key: str):
    def edit(meta: dict, tensors: dict) -> None:
        del meta[key]

    return edit


def _set(key: str, value):
    def edit(meta: dict, tensors: dict) -> None:
        meta[key] = value

    return edit


def _edit_row(key: str, value):
    def edit(meta: dict, tensors: dict) -> None:
        meta["metrics"][1][key] = value

    return edit


def _drop_from_row(key: str):
    def edit(meta: dict, tensors: dict) -> None:
        del meta["metrics"][1][key]

    return edit


def _truncate(meta: dict, tensors: dict) -> None:
    tensors["algorithm.values"] = tensors["algorithm.values"][:-5].clone()


def _drop_client_state(meta: dict, tensors: dict) -> None:
    del tensors[f"clients.{meta['clients'][0]}"]


def _float_client_state(meta: dict, tensors: dict) -> None:
    tensors[f"clients.{meta['clients'][0]}"] = torch.zeros(3)


def _extra_tensor(meta: dict, tensors: dict) -> None:
    tensors["payload.evil"] = torch.zeros(3)


def _drop_row(meta: dict, tensors: dict) -> None:
    meta["metrics"].pop()


def _bad_ledger_row(meta: dict, tensors: dict) -> None:
    meta["ledger"][0] = meta["ledger"][0][:4]


def _negative_ledger_bytes(meta: dict, tensors: dict) -> None:
    meta["ledger"][0][4] = -100


def _algorithm_key(meta: dict, tensors: dict) -> None:
    meta["algorithm"].clear()


DEFECTS = {
    "no metrics": (_without("metrics"), "lacks metrics"),
    "no ledger": (_without("ledger"), "lacks ledger"),
    "no code version": (_without("code"), "lacks code"),
    "no data fingerprint": (_without("data"), "lacks data"),
    "no values per payload": (_without("values_per_payload"), "lacks values_per_payload"),
    "no checksum": (_without("checksum"), "lacks checksum"),
    "round 999": (_set("round", 999), "round 999 is not a whole number from 0 to run.rounds"),
    "round -5": (_set("round", -5), "round -5 is not"),
    "round as text": (_set("round", "2"), "round '2' is not"),
    "round as bool": (_set("round", True), "round True is not"),
    "metrics not a list": (_set("metrics", {"1": {}}), "metrics is a dict, not a list"),
    "a metrics row missing": (_drop_row, "1 metrics rows for 2 rounds"),
    "a metrics row of another round": (_edit_row("round", 5), "row 2 is not the row of round 2"),
    "a metrics row without clients": (_edit_row("clients", "all"), "clients is not a list"),
    "a metrics row without accuracy": (_drop_from_row("accuracy"), "row 2 has no accuracy"),
    "a client beyond the federation": (_edit_row("clients", [0, 99]), "client ids"),
    "bytes as text": (_edit_row("bytes_down", "many"), "bytes_down is not a byte count"),
    "ledger not a list": (_set("ledger", {"setup": 5}), "the ledger is a dict, not a list"),
    "a ledger row too short": (_bad_ledger_row, "ledger entry"),
    "negative ledger bytes": (_negative_ledger_bytes, "ledger entry"),
    "mask_info not a table": (_set("mask_info", [1, 2]), "mask_info is not a table"),
    "negative wall time": (_set("wall_seconds", -1.0), "wall_seconds -1.0 is not a time"),
    "wall time as text": (_set("wall_seconds", "long"), "wall_seconds 'long'"),
    "algorithm state not a table": (_set("algorithm", [3]), "algorithm's state is not a table"),
    "algorithm state lacks a key": (_algorithm_key, "server state does not fit this run"),
    "wrong-length values": (_truncate, "server state does not fit this run"),
    "clients not a list": (_set("clients", "0,1"), "clients is not a list of distinct"),
    "a client state missing": (_drop_client_state, "client states stored are not the clients"),
    "a client state not bytes": (_float_client_state, "is not a byte string"),
    "an unknown tensor": (_extra_tensor, "unknown tensors payload.evil"),
    "values per payload negative": (_set("values_per_payload", -1), "values_per_payload -1"),
    "an earlier layout": (_set("layout", 2), "written by an earlier version of ssfl"),
    "config not text": (_set("config", 5), "config is not TOML text"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_every_structural_defect_is_a_checkpoint_error(
        tiny_runs: dict[str, Path], tmp_path: Path, defect: str) -> None:
    """Each defect re-sealed (a valid checksum), so it reaches the structural checks."""
    edit, message = DEFECTS[defect]
    folder = _copy(tiny_runs, "stopped", tmp_path)
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    edit(meta, tensors)
    # "no checksum": removed after sealing (a checkpoint with none is not checked on loading)
    save_checkpoint(folder / "checkpoint.pt",
                    meta if defect == "no checksum" else seal(meta, tensors), tensors)
    if defect == "config not text":  # read by the loop before restore: see ``verify`` below
        with pytest.raises(CheckpointError, match=message):
            verify(meta, tensors, prepare(load_config(None, TINY)))
        return
    with pytest.raises(CheckpointError, match=message):
        _resume(folder)
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2  # nothing played


def test_a_missing_config_is_a_checkpoint_error(tiny_runs: dict[str, Path]) -> None:
    meta, tensors = load_checkpoint(tiny_runs["stopped"] / "checkpoint.pt")
    exp = prepare(load_config(None, TINY))
    del meta["config"]
    with pytest.raises(CheckpointError, match="lacks config"):
        verify(meta, tensors, exp)
    meta["config"] = "[run\nrounds = "
    with pytest.raises(CheckpointError, match="config does not read"):
        verify(meta, tensors, exp)
    meta["config"] = "[nosuchsection]\nx = 1\n"
    with pytest.raises(CheckpointError, match="config does not read"):
        verify(meta, tensors, exp)
    with pytest.raises(CheckpointError, match="metadata is not a table"):
        verify([meta], tensors, exp)


def test_the_cli_reports_a_defect_without_a_traceback(
        tiny_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _copy(tiny_runs, "stopped", tmp_path)
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    meta["round"] = 999
    save_checkpoint(folder / "checkpoint.pt", seal(meta, tensors), tensors)
    assert main(["run", "--resume", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "round 999" in err and "Traceback" not in err


def test_a_checkpoint_of_other_code_is_refused_unless_forced(
        tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_runs, "stopped", tmp_path)
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    now = code_version()
    assert meta["code"] == now and now["version"]
    edits = [{"version": "0.0.1", "commit": None}]
    if now["commit"] is not None:  # where ssfl runs from a git checkout
        edits.append({**now, "commit": "0123456789ab" + "0" * 28})
    for code in edits:
        save_checkpoint(folder / "checkpoint.pt", seal({**meta, "code": code}, tensors), tensors)
        with pytest.raises(CheckpointError) as err:
            _resume(folder)
        message = str(err.value)
        assert message.startswith(f"the checkpoint was written by ssfl {code['version']} (")
        assert f"this is {now['version']} (" in message
        assert "resuming would mix versions; pass --force to resume anyway" in message
    if now["commit"] is not None:
        assert "(0123456789ab)" in message and f"({now['commit'][:12]})" in message
    _resume(folder, force=True)  # ssfl run --resume DIR --force
    assert _summary(folder) == _summary(tiny_runs["ref"])


def test_other_data_or_partition_is_refused_even_when_forced(
        tiny_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _copy(tiny_runs, "stopped", tmp_path)
    real = experiment.partition

    def swapped(*args, **kwargs):  # the same sizes and data, two clients' samples swapped
        parts = list(real(*args, **kwargs))
        parts[0], parts[1] = parts[1], parts[0]
        return parts

    monkeypatch.setattr(experiment, "partition", swapped)
    with pytest.raises(CheckpointError, match="data or its partition differs.*cannot be "
                                              "overridden"):
        _resume(folder, force=True)
    monkeypatch.setattr(experiment, "partition", real)
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    meta["data"]["digest"] = "0" * 32
    save_checkpoint(folder / "checkpoint.pt", seal(meta, tensors), tensors)
    with pytest.raises(CheckpointError, match=r"then: dataset digits, train 1438, test 359, "
                                              r"clients 4; now: dataset digits"):
        _resume(folder, force=True)


def test_stale_temporaries_are_removed_at_the_next_save_and_on_resume(
        tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    stale = [tmp_path / ".checkpoint.pt.k1ll3d.tmp", tmp_path / ".checkpoint.pt.x_9.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt.k1ll3d.tmp").write_bytes(b"not ours")
    save_checkpoint(path, {"round": 1}, {"w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.k1ll3d.tmp",
                                                          "checkpoint.pt"]

    folder = _copy(tiny_runs, "ref", tmp_path)  # resumed after its last round: no save
    (folder / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    _resume(folder)
    assert not list(folder.glob(".checkpoint.pt.*.tmp"))


def test_a_resume_after_the_last_round_writes_the_same_summary(
        tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_runs, "ref", tmp_path)
    (folder / "summary.json").unlink()
    result = _resume(folder)
    assert result.summary["num_values"] > 0
    assert _summary(folder) == _summary(tiny_runs["ref"])
    assert metric_rows(folder) == metric_rows(tiny_runs["ref"])


def test_a_resume_mid_run_ends_as_the_uninterrupted_run(tiny_runs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    folder = _copy(tiny_runs, "stopped", tmp_path)
    _resume(folder)
    assert metric_rows(folder) == metric_rows(tiny_runs["ref"])
    assert _summary(folder) == _summary(tiny_runs["ref"])
    meta, _ = load_checkpoint(folder / "checkpoint.pt")
    ref, _ = load_checkpoint(tiny_runs["ref"] / "checkpoint.pt")
    assert meta["checksum"] != ref["checksum"]  # the times differ; everything else is equal
    assert {k: v for k, v in meta.items() if k not in ("checksum", "wall_seconds", "metrics",
                                                      "mask_info")} == \
        {k: v for k, v in ref.items() if k not in ("checksum", "wall_seconds", "metrics",
                                                  "mask_info")}


# ---- fuzzed checkpoints: a CheckpointError or a correct resume, never a traceback -------------

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


def _edit_at(meta: Any, path: list[int], value: Any) -> None:
    """Replace the value reached by walking ``path`` (indices into keys or items) with
    ``value``, or drop it when ``value`` is the marker ``...``."""
    node, parent, key = meta, None, None
    for step in path:
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
        elif isinstance(node, list) and node:
            key = step % len(node)
        else:
            break
        parent, node = node, node[key]
    if parent is None:
        return
    if value is ...:
        del parent[key]
    else:
        parent[key] = value


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.lists(st.integers(0, 50), min_size=1, max_size=4),
       value=st.one_of(st.just(...), _JSON))
def test_fuzzed_checkpoint_metadata_is_refused_or_resumes(
        tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, path: list[int],
        value: Any) -> None:
    """150 random edits anywhere in the metadata (a value replaced by random JSON, or
    removed), re-sealed so they pass the checksum: each resume either raises CheckpointError
    or trains exactly as the uninterrupted run (the figure in docs/reliability.md). An edit
    of recorded history that is still well-formed (a past accuracy, a timing) cannot be told
    from the truth without a key, so the summary may differ; the model may not."""
    folder = _copy(tiny_runs, "stopped", tmp_path_factory.mktemp("fuzz"))
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    _edit_at(meta, path, value)
    save_checkpoint(folder / "checkpoint.pt", seal(meta, tensors), tensors)
    try:
        _resume(folder)
    except CheckpointError:
        return
    final = load_checkpoint(folder / "checkpoint.pt")[1]
    reference = load_checkpoint(tiny_runs["ref"] / "checkpoint.pt")[1]
    assert torch.equal(final["algorithm.values"], reference["algorithm.values"])


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      min_size=1, max_size=3), cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzzed_checkpoint_bytes_are_refused_or_unchanged(
        tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
        flips: list[tuple[float, int]], cut: float | None) -> None:
    """150 checkpoint files with random bits flipped (and some truncated): loading and
    verifying either raises CheckpointError or yields exactly the original checkpoint."""
    original = (tiny_runs["stopped"] / "checkpoint.pt").read_bytes()
    data = bytearray(original)
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    if cut is not None:
        data = data[:int(cut * len(data))]
    path = tmp_path_factory.mktemp("bytes") / "checkpoint.pt"
    path.write_bytes(bytes(data))
    try:
        meta, tensors = load_checkpoint(path)
        verify(meta, tensors, prepare(load_config(None, TINY)))
    except CheckpointError:
        return
    ref_meta, ref_tensors = load_checkpoint(tiny_runs["stopped"] / "checkpoint.pt")
    assert meta == ref_meta and tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
