"""The SSFL ClientApp: saliency scores, the mask (kept in ``context.state``), masked training.

A SuperNode is either pinned to one client (node config ``partition-id=<cid>
num-partitions=<federation.num-clients>``: the usual deployment, one data owner per node) or, if
its node config has no ``partition-id``, serves whatever client ids the server asks for (handy
for running 20 simulated clients on 3 local SuperNodes). Either way the client id travels in the
message, and a pinned node refuses any other id.

All learning is done by :mod:`ssfl.client`; this module only moves bytes between Flower records
and those functions.
"""

from __future__ import annotations

import hashlib
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ssfl.client import client_generator, compute_scores, encode_scores, train_round
from ssfl.comm import ParameterLayout, decode_bits, read_header
from ssfl.config import Config
from ssfl.flower.protocol import (
    CONFIG,
    METRICS,
    PAYLOAD,
    Stopwatch,
    config_from_run_config,
    payload_bytes,
    payload_record,
)
from ssfl.engine import Experiment, prepare, seeded_model, train_settings
from ssfl.masks import Mask, bits_to_mask, full_mask, mask_digest, prunable_parameter_names

# Keys of what a node keeps in ``context.state`` between messages of one run.
STATE_MASK = "ssfl-mask"  # ArrayRecord: the mask payload as received (bitmap + header)
STATE_MASK_INFO = "ssfl-mask-info"  # ConfigRecord: dense flag and digest

app = ClientApp()


class _Process:
    """What one ClientApp process builds once and reuses for every message it handles (the
    simulation engine reuses processes; the deployment engine may start one per message)."""

    key: Any = None
    config: Config
    federation: Experiment
    setup_seconds: float = 0.0  # data loading and model building for the current message
    layout: tuple[bytes, ParameterLayout, Mask] | None = None


_PROC = _Process()


def _setup(context: Context) -> _Process:
    data_root = str(context.node_config.get("data-root", ""))
    key = (tuple(sorted(context.run_config.items())), data_root)
    _PROC.setup_seconds = 0.0  # what this message spent on set-up (0 when reused)
    if _PROC.key != key:
        with Stopwatch() as watch:
            config, _ = config_from_run_config(context.run_config)
            _PROC.config = config
            _PROC.federation = prepare(config, data_root=data_root, with_test=False)
            _PROC.layout = None
            _PROC.key = key
        _PROC.setup_seconds = watch.seconds
    return _PROC


def _node_partition(context: Context) -> tuple[int, int]:
    pid = context.node_config.get("partition-id")
    num = context.node_config.get("num-partitions")
    return (int(pid) if pid is not None else -1, int(num) if num is not None else -1)


def _client_id(message: Message, context: Context, proc: _Process) -> int:
    cid = int(message.content[CONFIG]["client-id"])
    if not 0 <= cid < proc.config.federation.num_clients:
        raise ValueError(f"client id {cid} out of range")
    pinned, _ = _node_partition(context)
    if pinned >= 0 and pinned != cid:
        raise ValueError(f"this SuperNode holds partition {pinned}, not client {cid}")
    return cid


def _reply(message: Message, payload: bytes | None = None, **metrics: float | int) -> Message:
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    if payload is not None:
        content[PAYLOAD] = payload_record(payload)
    return Message(content, reply_to=message)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server which client this node is pinned to (-1: any)."""
    pid, num = _node_partition(context)
    return _reply(message, **{"partition-id": pid, "num-partitions": num})


@app.query("scores")
def scores(message: Message, context: Context) -> Message:
    """SNIP saliency of the seeded initial model on this client's data."""
    proc = _setup(context)
    cid = _client_id(message, context, proc)
    config = proc.config
    algo = config.algorithm
    data = proc.federation.client(cid)
    with Stopwatch() as watch:
        # A fresh seeded model: the process's model may already have been trained.
        model = seeded_model(config, proc.federation.train_set)
        s = compute_scores(
            model, data, num_batches=algo.saliency_batches,
            batch_size=algo.saliency_batch_size or config.train.batch_size,
            generator=client_generator(config.run.seed, 0, cid),
        )
        payload = encode_scores(s)
    return _reply(
        message, payload, **{"client-id": cid, "num-samples": len(data),
                             "compute-seconds": watch.seconds,
                             "setup-seconds": proc.setup_seconds}
    )


@app.query("mask")
def receive_mask(message: Message, context: Context) -> Message:
    """Keep the mask bitmap for the rest of the run; later rounds carry only values."""
    proc = _setup(context)
    model = proc.federation.model
    prunable = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    dense = bool(message.content[CONFIG]["dense"])
    if dense:
        mask = full_mask({n: params[n].shape for n in prunable})
    else:
        payload = payload_bytes(message.content[PAYLOAD])
        count = sum(params[n].numel() for n in prunable)
        bits = decode_bits(payload, expected_count=count)
        if hashlib.blake2b(bits, digest_size=8).digest() != read_header(payload).digest:
            raise ValueError("mask bitmap does not match the digest in its header")
        context.state[STATE_MASK] = payload_record(payload)
        mask = bits_to_mask(bits, {n: params[n].shape for n in prunable}, prunable)
    digest = mask_digest(mask, prunable)
    context.state[STATE_MASK_INFO] = ConfigRecord({"dense": dense, "digest": digest.hex()})
    return _reply(message, **{"kept": int(sum(int(m.sum()) for m in mask.values()))})


def _mask_and_layout(context: Context, proc: _Process) -> tuple[bytes, ParameterLayout, Mask]:
    if STATE_MASK_INFO not in context.state:
        raise RuntimeError("no mask on this node: the server must send query.mask first")
    info = context.state[STATE_MASK_INFO]
    digest = bytes.fromhex(str(info["digest"]))
    if proc.layout is not None and proc.layout[0] == digest:
        return proc.layout
    model = proc.federation.model
    prunable = prunable_parameter_names(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in prunable}
    if bool(info["dense"]):
        mask = full_mask(shapes)
    else:
        bits = read_bits(context.state[STATE_MASK], sum(s.numel() for s in shapes.values()))
        mask = bits_to_mask(bits, shapes, prunable)
    if mask_digest(mask, prunable) != digest:
        raise RuntimeError("the mask kept in context.state does not match its digest")
    proc.layout = (digest, ParameterLayout.for_model(model, mask), mask)
    return proc.layout


def read_bits(record: ArrayRecord, count: int) -> bytes:
    return decode_bits(payload_bytes(record), expected_count=count)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round: load the active values, train inside the mask, send the active values back."""
    proc = _setup(context)
    cid = _client_id(message, context, proc)
    config = proc.config
    digest, layout, mask = _mask_and_layout(context, proc)
    params = message.content[CONFIG]
    rnd, lr = int(params["round"]), float(params["lr"])
    payload = payload_bytes(message.content[PAYLOAD])
    data = proc.federation.client(cid)
    with Stopwatch() as watch:
        reply, result = train_round(
            proc.federation.model, layout, mask, digest, payload, data, train_settings(config),
            round=rnd, lr=lr, generator=client_generator(config.run.seed, rnd, cid),
            value_dtype=config.comm.value_dtype,
        )
    return _reply(
        message, reply, **{"client-id": cid, "num-samples": result.num_samples,
                           "train-loss": result.mean_loss, "steps": result.steps,
                           "compute-seconds": watch.seconds,
                           "setup-seconds": proc.setup_seconds}
    )
