"""What a SuperNode does for the SSFL ClientApp: saliency scores, the mask, masked training.

This is the node's side of :mod:`ssfl.flower.client_app`, free of Flower types: each handler
takes the message's parameters and payload bytes, the run and node configs and the node's
``state`` (plain values that the ClientApp keeps in ``context.state`` between messages) and
returns the reply's metrics and payload. It runs either inside the ClientApp process or in the
node's persistent worker (:mod:`ssfl.flower.worker`), which keeps torch, the data and the model
loaded between messages.

A SuperNode is either pinned to one client (node config ``partition-id=<cid>
num-partitions=<federation.num-clients>``: the usual deployment, one data owner per node) or, if
its node config has no ``partition-id``, serves whatever client ids the server asks for (handy
for running 20 simulated clients on 3 local SuperNodes). Either way the client id travels in the
message, and a pinned node refuses any other id.

The first message that needs a client's data loads and partitions the whole data set as the
server does, then writes that client's samples to a node-local cache file (node config
``cache-dir``, default ``$SSFL_CACHE_DIR/flower`` or ``~/.cache/ssfl/flower``;
``cache-dir="off"`` disables it); later processes read only that file. ``state`` remembers which
client's data the node holds, so that the mask message (which carries no client id) can build
the model from it too.

All learning is done by :mod:`ssfl.client`; this module only moves bytes between the messages
and those functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssfl import algorithms
from ssfl.algorithms.base import TRAIN, Algorithm, ClientContext, Setup
from ssfl.client import LocalData, client_generator
from ssfl.config import Config, check_device
from ssfl.data.datasets import ImageDataset, default_cache_dir, source_files
from ssfl.flower.protocol import (
    STATE_DATA,
    Stopwatch,
    client_state_key,
    config_from_run_config,
    node_partition,
)
from ssfl.masks import prunable_parameter_names
from ssfl.run.experiment import prepare, seeded_model, train_settings

#: a node's state between messages: STATE_* keys to bytes or small dicts
State = dict[str, Any]
#: a reply: its metrics and its payload (None: metrics only)
Reply = tuple[dict[str, float | int], bytes | None]

# Bump when the content or the meaning of a cached partition changes.
_CACHE_VERSION = 1



class _Process:
    """What this process builds once and reuses for every message it handles (a node's worker
    and the simulation engine's processes handle many; without the worker, the deployment
    engine starts a ClientApp process per message)."""

    key: Any = None
    config: Config
    data_root: str = ""
    cache_dir: Path | None = None
    data: dict[int, LocalData]
    # Any split of the data set (the whole train set, or one client's cached part): the model's
    # input shape and class count come from it.
    shape_source: ImageDataset | None = None
    model: torch.nn.Module | None = None
    initial: dict[str, torch.Tensor] | None = None  # the model's seeded weights, on the CPU
    algorithm: Algorithm[Any] | None = None
    setup_seconds: float = 0.0  # data loading and model building for the current message
    cache_hit: int = -1  # the current message's data: 1 from the cache, 0 loaded, -1 none


_PROC = _Process()


def _cache_dir(node_config: Mapping[str, Any]) -> Path | None:
    value = str(node_config.get("cache-dir", ""))
    if value.lower() in ("off", "none", "false", "0"):
        return None
    return Path(value).expanduser() if value else default_cache_dir() / "flower"


def _setup(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> _Process:
    """The process's config (rebuilt when the run config or node config changes); resets the
    per-message counters."""
    data_root = str(node_config.get("data-root", ""))
    cache_dir = _cache_dir(node_config)
    # A node's own device (say cuda:1 for the second SuperNode of a two-GPU host) wins over
    # the run's run.device.
    device = str(node_config.get("device", ""))
    key = (tuple(sorted(run_config.items())), data_root, str(cache_dir), device)
    _PROC.setup_seconds = 0.0  # what this message spent on set-up (0 when reused)
    _PROC.cache_hit = -1
    if _PROC.key != key:
        with Stopwatch() as watch:
            config, _ = config_from_run_config(run_config)
            if device:
                check_device("node config device", device)
                config.run.device = device
            if config.run.threads > 0:
                torch.set_num_threads(config.run.threads)
            _PROC.config, _PROC.data_root, _PROC.cache_dir = config, data_root, cache_dir
            _PROC.data, _PROC.shape_source, _PROC.model = {}, None, None
            _PROC.initial, _PROC.algorithm = None, None
            _PROC.key = key
        _PROC.setup_seconds = watch.seconds
    return _PROC


# ---- the client's data: loaded once per node, then read from a node-local cache ---------------


def _source_fingerprint(config: Config, data_root: str) -> list[Any]:
    """What identifies the data set's content without reading it: the files' sizes and
    modification times (digits: scikit-learn's version, whose copy it is)."""
    name = config.data.dataset
    if name == "digits":
        from importlib.metadata import version

        return ["scikit-learn", version("scikit-learn")]
    files = source_files(name, data_root or config.data.root or None, "train")
    out: list[Any] = []
    for path in files:
        st = path.stat()
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _code_fingerprint() -> str:
    """The code that loads and splits the data: a change to it invalidates every cache."""
    from importlib import import_module

    digest = hashlib.blake2b(digest_size=8)
    for name in ("ssfl.data.datasets", "ssfl.data.files", "ssfl.data.partition",
                 "ssfl.run.experiment"):
        digest.update(Path(str(import_module(name).__file__)).read_bytes())
    return digest.hexdigest()


def partition_cache_file(config: Config, data_root: str, cid: int, cache_dir: Path) -> Path:
    """Where client ``cid``'s samples are cached: the name hashes everything the split depends
    on (data section, seed, number of clients, the data files, the loading code)."""
    ident = {
        "version": _CACHE_VERSION,
        "data": config.to_dict()["data"],
        "data_root": data_root,
        "num_clients": config.federation.num_clients,
        "seed": config.run.seed,
        "client": cid,
        "source": _source_fingerprint(config, data_root),
        "code": _code_fingerprint(),
    }
    digest = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=16)
    return cache_dir / f"{config.data.dataset}-client{cid}-{digest.hexdigest()}.npz"


def save_part(path: Path, data: ImageDataset, indices: np.ndarray) -> None:
    """One client's samples (in partition order) and the data set's constants; atomic (several
    ClientApp processes of a node may write the same file at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    meta = {"name": data.name, "num_classes": data.num_classes,
            "class_names": list(data.class_names), "mean": list(data.mean),
            "std": list(data.std),
            # The strides of the data set's tensor: where a dimension has size 1 (digits'
            # channel) they are ambiguous, and torch picks its convolution kernels (so the
            # order of the float sums) from them; the cached part must train bit-identically.
            "stride": list(data.images.stride())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, images=data.images[idx].numpy(), labels=data.labels[idx].numpy(),
                 indices=idx.numpy(), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    os.replace(tmp, path)


def load_part(path: Path) -> ImageDataset | None:
    """A cached client part as an ImageDataset (its own samples only), or None if there is
    none or it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
            meta = json.loads(z["meta"].tobytes().decode())
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        stride = tuple(int(x) for x in meta.get("stride", tensor.stride()))
        if tensor.stride() != stride:
            tensor = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype).copy_(tensor)
        return ImageDataset(
            name=str(meta["name"]), images=tensor,
            labels=torch.from_numpy(labels), num_classes=int(meta["num_classes"]),
            class_names=tuple(meta["class_names"]), mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError,
            zipfile.BadZipFile):
        return None  # unreadable: load the data set again (and rewrite the file)


def _client_data(proc: _Process, cid: int, state: State) -> LocalData:
    """Client ``cid``'s data: from this process, else the node's cache, else the whole data
    set loaded and split as the server does (then cached)."""
    if cid in proc.data:
        return proc.data[cid]
    with Stopwatch() as watch:
        config = proc.config
        path = (partition_cache_file(config, proc.data_root, cid, proc.cache_dir)
                if proc.cache_dir is not None else None)
        part = load_part(path) if path is not None and path.is_file() else None
        if part is not None:
            proc.cache_hit = 1
            data = LocalData(part.images, part.labels, torch.arange(len(part)), part.mean,
                             part.std)
            if proc.shape_source is None:
                proc.shape_source = part
        else:
            proc.cache_hit = 0
            exp = prepare(config, data_root=proc.data_root, with_test=False)
            if path is not None:
                try:
                    save_part(path, exp.train_set, exp.parts[cid])
                except OSError:  # a read-only or full disk: run without the cache
                    pass
            # Every client of the node is now in memory (a pooled node in the simulation
            # engine serves several from one process).
            proc.data.update({c: exp.client(c) for c in range(len(exp.parts))})
            proc.shape_source = exp.train_set
            if proc.model is None:
                _set_model(proc, exp.model)
            data = exp.client(cid)
        proc.data[cid] = data
        state[STATE_DATA] = {"client-id": cid}
    proc.setup_seconds += watch.seconds
    return data


def _model(proc: _Process, node_config: Mapping[str, Any], state: State) -> torch.nn.Module:
    """The process's model (built once, seeded; its weights are replaced by each payload)."""
    if proc.model is None:
        if proc.shape_source is None:
            # Any client's data gives the shapes: the node's own client, else the last one it
            # loaded in this run (state), else client 0 (loads and caches it).
            pinned, _ = node_partition(node_config)
            known = state.get(STATE_DATA)
            cid = pinned if pinned >= 0 else int(known["client-id"]) if known else 0
            _client_data(proc, cid, state)
        if proc.model is None:
            with Stopwatch() as watch:
                assert proc.shape_source is not None
                _set_model(proc, seeded_model(proc.config, proc.shape_source))
            proc.setup_seconds += watch.seconds
    assert proc.model is not None
    return proc.model


def _set_model(proc: _Process, model: torch.nn.Module) -> None:
    """The process's model buffer, and its seeded weights before any training."""
    proc.model = model
    proc.initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


# ---- messages ------------------------------------------------------------------------------


def _client_id(config: Mapping[str, Any], node_config: Mapping[str, Any],
               proc: _Process) -> int:
    cid = int(config["client-id"])
    if not 0 <= cid < proc.config.federation.num_clients:
        raise ValueError(f"client id {cid} out of range")
    pinned, _ = node_partition(node_config)
    if pinned >= 0 and pinned != cid:
        raise ValueError(f"this SuperNode holds partition {pinned}, not client {cid}")
    return cid


def _setup_metrics(proc: _Process) -> dict[str, float | int]:
    return {"setup-seconds": proc.setup_seconds, "cache-hit": proc.cache_hit}


def _algorithm(proc: _Process, node_config: Mapping[str, Any], state: State) -> Algorithm[Any]:
    """The run's method, built once per process from the run config (as the server builds
    it), with the seeded initial weights of the process's model."""
    if proc.algorithm is None:
        model = _model(proc, node_config, state)
        assert proc.initial is not None
        cfg = proc.config
        setup = Setup(config=cfg, shapes={n: p.shape for n, p in model.named_parameters()},
                      prunable=prunable_parameter_names(model), initial=proc.initial,
                      num_clients=cfg.federation.num_clients)
        proc.algorithm = algorithms.build(cfg, setup)
    return proc.algorithm


def client_message(kind: str, config: Mapping[str, Any], payload: bytes | None,
                   run_config: Mapping[str, Any], node_config: Mapping[str, Any],
                   state: State) -> Reply:
    """Any message of the run's method (``train`` or a set-up ``kind``): the client's state
    comes from and goes back to ``state`` (``client_state_key``); all learning is the
    method's ``Algorithm.handle``, the same code the simulator runs."""
    proc = _setup(run_config, node_config)
    cid = _client_id(config, node_config, proc)
    cfg = proc.config
    data = _client_data(proc, cid, state)
    algorithm = _algorithm(proc, node_config, state)
    rnd, lr = int(config.get("round", 0)), float(config.get("lr", 0.0))
    ctx = ClientContext(client_id=cid, round=rnd, lr=lr, model=_model(proc, node_config, state),
                        data=data, settings=train_settings(cfg),
                        generator=client_generator(cfg.run.seed, rnd, cid),
                        setup=algorithm.setup)
    key = client_state_key(cid)
    with Stopwatch() as watch:
        out = algorithm.handle(kind, ctx, payload or b"", state.get(key))
    if out.state is None:
        state.pop(key, None)
    else:
        state[key] = out.state
    result = out.result
    metrics: dict[str, float | int] = {
        "client-id": cid,
        "num-samples": result.num_samples if result is not None else len(data),
        "train-loss": result.mean_loss if result is not None else float("nan"),
        "steps": result.steps if result is not None else 0,
        "compute-seconds": watch.seconds,
        **{f"{step}-seconds": ctx.timings.get(step, 0.0) for step in ("decode", "train",
                                                                      "encode")},
        **_setup_metrics(proc),
    }
    return metrics, out.reply


def handle(kind: str, config: Mapping[str, Any], payload: bytes | None,
           run_config: Mapping[str, Any], node_config: Mapping[str, Any],
           state: State) -> Reply:
    """Run the message of ``kind`` (``setup`` carries the method's own kind in its config);
    it may update ``state`` in place."""
    if kind == "setup":
        return client_message(str(config["kind"]), config, payload, run_config, node_config,
                              state)
    if kind == TRAIN:
        return client_message(TRAIN, config, payload, run_config, node_config, state)
    raise ValueError(f"unknown message kind {kind!r}; expected 'setup' or 'train'")
