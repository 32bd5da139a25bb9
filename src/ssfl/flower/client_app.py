"""The SSFL ClientApp: moves each message between Flower records and the node's handler.

Every method runs through two messages, ``query.setup`` (the method's set-up messages, such
as SSFL's scores and mask) and ``train``; :mod:`ssfl.flower.node` hands both to the method's
own client code (``Algorithm.handle``), the code the simulator runs. It runs in this process,
or, with node config ``worker=true``, in the node's persistent worker
(:mod:`ssfl.flower.worker`): Flower 1.42's deployment engine starts a new ClientApp process
for every message, and the worker spares each of them importing torch and building the data
and the model. This module imports no torch (checked by a test), so that with the worker a
message costs Flower's process start and a local socket round trip.

The node's state between messages (each client's state, as the method returned it, and the
client whose data it holds) lives in ``context.state``, so a node behaves the same with or
without the worker.

Every reply carries time stamps (wall clock) and durations that the server turns into the
per-round breakdown of ``metrics.jsonl`` (``ssfl.flower.server_app``).
"""

from __future__ import annotations

import time

# Wall clock when this module started to import: the process's start-up splits into Flower's
# part (process start to here: Python, flwr, FAB) and ours (this module's imports and, without
# the worker, the handlers' torch).
_IMPORT_STARTED = time.time()

import sys  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import (  # noqa: E402
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402

from ssfl.flower import secagg, worker  # noqa: E402
from ssfl.flower.protocol import (  # noqa: E402
    CLIENT_STATE_PREFIX,
    CONFIG,
    METRICS,
    PAYLOAD,
    STATE_DATA,
    node_partition,
    payload_bytes,
    payload_record,
    process_start_time,
)

_PROCESS_STARTED = process_start_time()

app = ClientApp()


class _Process:
    messages: int = 0  # messages this process handled before the current one


_PROC = _Process()
_IMPORT_SECONDS = time.time() - _IMPORT_STARTED


def _state_of(context: Context) -> dict[str, Any]:
    """The node's state as plain values: the clients' states (bytes) and the data record."""
    state: dict[str, Any] = {}
    for key in list(context.state.keys()):
        if key.startswith(CLIENT_STATE_PREFIX):
            state[key] = payload_bytes(context.state[key])
        elif key == STATE_DATA:
            state[key] = dict(context.state[key])
    return state


def _store_state(context: Context, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    for key in old.keys() - new.keys():  # a client whose state the method cleared
        del context.state[key]
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if isinstance(value, bytes):
            context.state[key] = payload_record(value)
        else:
            context.state[key] = ConfigRecord(dict(value))


def _run_locally(kind: str, config: Mapping[str, Any], payload: bytes | None,
                 context: Context, state: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """The handler in this process. Its first use imports the handlers (torch): that time is
    added to the reply's ``setup-seconds`` (the handler's set-up), so that ``import-seconds``
    stays this module's import, part of the process's start-up."""
    imported = 0.0
    if "ssfl.flower.node" not in sys.modules:
        started = time.perf_counter()
        import ssfl.flower.node  # noqa: F401

        imported = time.perf_counter() - started
    from ssfl.flower import node

    metrics, reply = node.handle(kind, config, payload, context.run_config, context.node_config,
                                 state)
    metrics["setup-seconds"] = metrics.get("setup-seconds", 0.0) + imported
    return metrics, reply


def _handle(kind: str, message: Message, context: Context) -> Message:
    config = dict(message.content[CONFIG]) if CONFIG in message.content else {}
    payload = payload_bytes(message.content[PAYLOAD]) if PAYLOAD in message.content else None
    metrics, reply = _process(kind, config, payload, context)
    return _reply(message, reply, **metrics)


def _process(kind: str, config: Mapping[str, Any], payload: bytes | None,
             context: Context) -> tuple[dict[str, Any], bytes | None]:
    """One message's parameters and payload through the node's handler (here or in the
    node's worker); the reply's metrics (time stamps included) and payload."""
    handler_started, started = time.time(), time.perf_counter()
    state = _state_of(context)
    old = dict(state)
    extra: dict[str, float | int] = {}
    if worker.enabled(context.node_config):
        path = worker.socket_path(context.node_id, context.node_config)
        metrics, reply, changed, extra = worker.call(
            path, kind, config, payload, context.run_config, context.node_config, state,
            idle=worker.idle_seconds(context.node_config))
        state = {k: v for k, v in {**state, **changed}.items() if v is not None}
    else:
        metrics, reply = _run_locally(kind, config, payload, context, state)
    _store_state(context, old, state)
    first = _PROC.messages == 0
    _PROC.messages += 1
    timing = {
        # The process's time stamps for the server's breakdown (wall clock, seconds since the
        # epoch; -1 where unknown): process start, this module's import, the handler's span.
        "process-started": _PROCESS_STARTED if _PROCESS_STARTED is not None else -1.0,
        "import-started": _IMPORT_STARTED,
        "import-seconds": _IMPORT_SECONDS,
        "handler-started": handler_started,
        "handler-seconds": time.perf_counter() - started,
        "first-message": int(first),  # 0: a reused process (simulation engine)
    }
    return {**metrics, **extra, **timing}, reply


def _reply(message: Message, payload: bytes | None = None, **metrics: float | int) -> Message:
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    if payload is not None:
        content[PAYLOAD] = payload_record(payload)
    return Message(content, reply_to=message)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server which client this node is pinned to (-1: any)."""
    pid, num = node_partition(context.node_config)
    return _reply(message, **{"partition-id": pid, "num-partitions": num})


@app.query("setup")
def setup(message: Message, context: Context) -> Message:
    """A set-up message of the run's method (its ``kind`` is in the message's config)."""
    return _handle("setup", message, context)


@app.train(mods=[secagg.client_mod(lambda *args: _process(*args))])
def train(message: Message, context: Context) -> Message:
    """One round of the run's method on this client (with ``flower.secure-aggregation``, the
    rounds are SecAgg+'s four stages: ``ssfl.flower.secagg``)."""
    return _handle("train", message, context)
