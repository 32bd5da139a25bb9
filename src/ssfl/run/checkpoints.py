"""A run's checkpoint: the server state of its method, the clients' states where the transport
keeps them, the metrics so far, the byte ledger; ``ssfl run --resume`` continues from it and
ends exactly as an uninterrupted run (all randomness is drawn from (seed, round, client)).

Besides the state, a checkpoint records the code that wrote it (the ssfl version, and the git
commit where ssfl runs from a git checkout), a fingerprint of the data and its partition, and
a checksum over its metadata and tensors. A resume refuses a checkpoint that is corrupt,
malformed, of other data or of another partition; one written by other code only with
``force`` (``ssfl run --resume RUN_DIR --force``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import subprocess
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import ssfl
from ssfl.algorithms.common import bytes_tensor, tensor_bytes
from ssfl.checkpoint import (
    CHECKSUM,
    FILENAME,
    CheckpointError,
    prefixed,
    remove_stale_temporaries,
    save_checkpoint,
    seal,
    unprefixed,
)
from ssfl.config import ConfigError, from_dict, rounds_dependence, to_toml
from ssfl.data.partition import class_counts
from ssfl.run.experiment import device_name
from ssfl.run.ledger import DOWN, RESYNC, ROUND, SETUP, UP, Ledger

if TYPE_CHECKING:
    from ssfl.run.experiment import Experiment
    from ssfl.run.loop import Run

#: the layout of a run checkpoint's metadata (2: the algorithm interface and the ledger;
#: 3: code version, data fingerprint, checksum, values per payload)
LAYOUT = 3

#: what every checkpoint of this layout holds
KEYS = ("layout", "round", "config", "metrics", "ledger", "mask_info", "wall_seconds",
        "algorithm", "clients", "device", "code", "data", "values_per_payload", CHECKSUM)


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """The ssfl version, and the git commit of the checkout ssfl runs from (None where it is
    installed as a package, or git is missing or slow)."""
    try:
        version = importlib.metadata.version("ssfl")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "commit": _git_commit(Path(ssfl.__file__).parent)}


def _git_commit(folder: Path) -> str | None:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                  text=True, timeout=2, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # Only where the package itself is tracked (not a site-packages inside some repository).
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None
    return git("rev-parse", "HEAD") or None


def describe_code(code: Any) -> str:
    if not isinstance(code, dict):
        return "an unknown version"
    commit = code.get("commit")
    return f"{code.get('version')} ({commit[:12] if isinstance(commit, str) else 'no commit'})"


def data_fingerprint(exp: Experiment) -> dict[str, Any]:
    """The data set and its partition: name, sizes and shapes, every label, and each client's
    samples and class counts (a blake2b digest, with the figures a message can name)."""
    train, test = exp.train_set, exp.test_set
    labels = train.labels.numpy()
    h = hashlib.blake2b(digest_size=16, person=b"ssfl-data")
    figures = {"dataset": train.name, "train": len(labels),
               "test": None if test is None else int(test.labels.numel()),
               "clients": len(exp.parts)}
    h.update(json.dumps([figures, list(train.images.shape), train.num_classes,
                         None if test is None else list(test.images.shape)]).encode())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(class_counts(labels, exp.parts, train.num_classes),
                                  dtype="<i8").tobytes())
    for part in exp.parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
    return {**figures, "digest": h.hexdigest()}


def save(r: Run, rnd: int) -> None:
    assert r.folder.path is not None
    meta, tensors = r.algorithm.state_dict(r.state)
    clients = {str(c): bytes_tensor(s) for c, s in r.transport.client_states().items()}
    tensors = {**prefixed("algorithm", tensors), **prefixed("clients", clients)}
    save_checkpoint(r.folder.path / FILENAME, seal({
        "layout": LAYOUT, "round": rnd, "config": to_toml(r.config), "metrics": r.metrics,
        "ledger": r.ledger.to_json(), "mask_info": r.mask_info,
        "wall_seconds": time.perf_counter() - r.started, "algorithm": meta,
        "clients": sorted(clients), "device": device_name(r.exp.model),
        "code": code_version(), "data": data_fingerprint(r.exp),
        "values_per_payload": r.values_per_payload,
        "local_accuracy": {str(cid): acc for cid, acc in sorted(r.local_accuracy.items())},
    }, tensors), tensors)


def verify(meta: Any, tensors: dict[str, torch.Tensor], exp: Experiment, *,
           force: bool = False) -> None:
    """Refuse (``CheckpointError``) a checkpoint this run cannot continue from: another layout,
    other code (unless ``force``), other data or partition (never), another config, or any
    structural defect. The checksum itself is checked by ``load_checkpoint``."""
    if not isinstance(meta, dict):
        raise CheckpointError("the checkpoint's metadata is not a table")
    if meta.get("layout") != LAYOUT:
        raise CheckpointError("the checkpoint was written by an earlier version of ssfl, "
                              "whose server state this version cannot read; start the run "
                              "again (or resume it with the ssfl version that started it)")
    missing = [k for k in KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"the checkpoint is malformed: it lacks {', '.join(missing)}")
    if not isinstance(meta[CHECKSUM], str):
        raise CheckpointError("the checkpoint is malformed: its checksum is not a string")
    now = code_version()
    if not _same_code(meta["code"], now) and not force:
        raise CheckpointError(
            f"the checkpoint was written by ssfl {describe_code(meta['code'])}; this is "
            f"{describe_code(now)}; resuming would mix versions; pass --force to resume anyway")
    data = data_fingerprint(exp)
    if not isinstance(meta["data"], dict) or meta["data"].get("digest") != data["digest"]:
        before = meta["data"] if isinstance(meta["data"], dict) else {}
        raise CheckpointError(
            f"the data or its partition differs from the one the checkpoint was written with "
            f"(then: {_figures(before)}; now: {_figures(data)}): the rest of the run would "
            f"train on other samples; this cannot be overridden, start the run again")
    check_config(meta["config"], exp)
    check_structure(meta, tensors, exp)


def _same_code(before: Any, now: dict[str, str | None]) -> bool:
    """The same version, and the same commit where both were written from a git checkout."""
    if not isinstance(before, dict) or before.get("version") != now["version"]:
        return False
    return before.get("commit") is None or now["commit"] is None \
        or before.get("commit") == now["commit"]


def _figures(data: dict[str, Any]) -> str:
    return ", ".join(f"{k} {data.get(k)}" for k in ("dataset", "train", "test", "clients"))


def check_config(text: Any, exp: Experiment) -> None:
    if not isinstance(text, str):
        raise CheckpointError("the checkpoint is malformed: its config is not TOML text")
    try:
        # Parsed, so that a key added after the checkpoint was written counts as its default.
        config = from_dict(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint is malformed: its config does not read "
                              f"({exc})") from None
    if config == exp.config:
        return
    before, now = config.run.rounds, exp.config.run.rounds
    same_but_rounds = dataclasses.replace(config, run=dataclasses.replace(config.run,
                                                                          rounds=now))
    if same_but_rounds != exp.config:
        raise CheckpointError("the config differs from the one the checkpoint was written "
                              "with")
    # Only run.rounds differs: a run continued past its planned end (with_more_rounds), which
    # is the longer run only where nothing read run.rounds in the rounds already played.
    if now < before:
        raise CheckpointError(f"the checkpoint's run has run.rounds = {before}; a run is "
                              f"continued, never shortened to {now}")
    reasons = rounds_dependence(config)
    if reasons:
        raise CheckpointError(f"the run cannot be continued from {before} to {now} rounds: "
                              + "; ".join(reasons))


def _malformed(what: str) -> CheckpointError:
    return CheckpointError(f"the checkpoint is malformed: {what}")


def _is_int(x: Any, low: int = 0, high: float = math.inf) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def _is_number(x: Any, low: float = -math.inf) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x >= low)


def check_structure(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    exp: Experiment) -> None:
    """Every value the resume reads has the type and range it must have."""
    config = exp.config
    rounds, num_clients = config.run.rounds, config.federation.num_clients
    rnd = meta["round"]
    if not _is_int(rnd, 0, rounds):
        raise _malformed(f"round {rnd!r} is not a whole number from 0 to run.rounds = {rounds}")
    metrics = meta["metrics"]
    if not isinstance(metrics, list):
        raise _malformed(f"metrics is a {type(metrics).__name__}, not a list")
    if len(metrics) != rnd:
        raise _malformed(f"{len(metrics)} metrics rows for {rnd} rounds")
    for i, row in enumerate(metrics, 1):
        _check_row(row, i, num_clients)
    _check_ledger(meta["ledger"])
    _check_bytes_agree(metrics, meta["ledger"])
    mask_info = meta["mask_info"]
    if not isinstance(mask_info, dict) or not _is_number(mask_info.get("seconds", 0.0), 0):
        raise _malformed("mask_info is not a table (with its seconds)")
    if not _is_number(meta["wall_seconds"], 0):
        raise _malformed(f"wall_seconds {meta['wall_seconds']!r} is not a time")
    if not isinstance(meta["algorithm"], dict):
        raise _malformed("the algorithm's state is not a table")
    if not (meta["device"] is None or isinstance(meta["device"], str)):
        raise _malformed("device is not a string")
    local = meta.get("local_accuracy", {})
    if not isinstance(local, dict) or not all(
            isinstance(c, str) and c.isdecimal() and int(c) < num_clients
            and _is_number(a, 0) and a <= 1 for c, a in local.items()):
        raise _malformed("local_accuracy is not a table of client ids and accuracies")
    if not _is_int(meta["values_per_payload"]):
        raise _malformed(f"values_per_payload {meta['values_per_payload']!r} is not a count")
    clients = meta["clients"]
    if (not isinstance(clients, list) or len(set(map(str, clients))) != len(clients)
            or not all(isinstance(c, str) and c.isdecimal() and int(c) < num_clients
                       for c in clients)):
        raise _malformed(f"clients is not a list of distinct client ids below {num_clients}")
    stored = {k for k in tensors if k.startswith("clients.")}
    if stored != {f"clients.{c}" for c in clients}:
        raise _malformed("the client states stored are not the clients listed")
    for name in stored:
        t = tensors[name]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise _malformed(f"client state {name} is not a byte string")
    other = sorted(k for k in tensors if not k.startswith(("clients.", "algorithm.")))
    if other:
        raise _malformed(f"unknown tensors {', '.join(other[:5])}")


def _check_row(row: Any, i: int, num_clients: int) -> None:
    if not isinstance(row, dict) or not _is_int(row.get("round"), i, i):
        raise _malformed(f"metrics row {i} is not the row of round {i}")
    clients = row.get("clients")
    if (not isinstance(clients, list) or not clients
            or not all(_is_int(c, 0, num_clients - 1) for c in clients)):
        raise _malformed(f"metrics row {i}: clients is not a list of client ids")
    for key in ("bytes_down", "bytes_up"):
        if not _is_int(row.get(key)):
            raise _malformed(f"metrics row {i}: {key} is not a byte count")
    if not _is_number(row.get("seconds"), 0):
        raise _malformed(f"metrics row {i}: seconds is not a time")
    if not isinstance(row.get("train_loss"), (int, float)) or isinstance(row["train_loss"], bool):
        raise _malformed(f"metrics row {i}: train_loss is not a number")
    if "accuracy" not in row:
        raise _malformed(f"metrics row {i} has no accuracy (null where not evaluated)")
    if row.get("accuracy") is not None and not (_is_number(row["accuracy"], 0)
                                                and _is_number(row.get("personal_accuracy"), 0)):
        raise _malformed(f"metrics row {i}: accuracy is not a number")


def _check_bytes_agree(metrics: list[dict[str, Any]], rows: list[list[Any]]) -> None:
    """The byte figures are written twice, per round in the metrics and per payload in the
    ledger: they must agree (a ledger that lost or gained an entry would report wrong totals
    for the rest of the run)."""
    ledger = Ledger.from_json(rows)
    for row in metrics:
        if (row["bytes_down"], row["bytes_up"]) != ledger.round_bytes(row["round"]):
            raise _malformed(f"metrics row {row['round']}: its bytes disagree with the byte "
                             f"ledger")
    if metrics and metrics[-1].get("bytes_cumulative") != ledger.total():
        raise _malformed("the byte ledger's total disagrees with the last metrics row")


def _check_ledger(rows: Any) -> None:
    if not isinstance(rows, list):
        raise _malformed(f"the ledger is a {type(rows).__name__}, not a list")
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5 and row[0] in (SETUP, ROUND, RESYNC)
                and _is_int(row[1]) and isinstance(row[2], str) and row[3] in (DOWN, UP)
                and _is_int(row[4])):
            raise _malformed(f"ledger entry {row!r} is not [phase, round, label, direction, "
                             f"bytes]")


def restore(r: Run, checkpoint: tuple[dict[str, Any], dict[str, torch.Tensor]], *,
            force: bool = False) -> None:
    """Continue ``r`` from a checkpoint (server state, client states, metrics, ledger), after
    ``verify`` (``force``: even one written by other code)."""
    meta, tensors = checkpoint
    verify(meta, tensors, r.exp, force=force)
    if r.folder.path is not None:
        remove_stale_temporaries(r.folder.path / FILENAME)
    try:
        r.state = r.algorithm.load_state(meta["algorithm"], unprefixed("algorithm", tensors))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's server state does not fit this run: "
                              f"{type(exc).__name__}: {exc}") from None
    clients = unprefixed("clients", tensors)
    r.transport.load_client_states({int(c): tensor_bytes(clients[c]) for c in meta["clients"]})
    r.metrics = list(meta["metrics"])
    r.ledger = Ledger.from_json(meta["ledger"])
    r.mask_info = dict(meta["mask_info"])
    r.values_per_payload = int(meta["values_per_payload"])
    # absent in checkpoints written before the authors' protocol was measured
    r.local_accuracy = {int(cid): float(acc)
                        for cid, acc in meta.get("local_accuracy", {}).items()}
    r.first_round = int(meta["round"]) + 1
    r.started = time.perf_counter() - float(meta["wall_seconds"])
