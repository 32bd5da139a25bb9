"""The SSFL ServerApp: the simulator's experiment, with Flower moving the payloads.

The experiment is :func:`ssfl.run.loop.run`, the simulator's own, for any method; Flower only
carries the payloads (``FlowerTransport``), so the two produce the same mask and per-round
metrics:

1. load the data set and partition it (seeded); build the seeded model and the method;
2. the method's set-up phase (SSFL's mask round: every client scores the initial weights on its
   data, the server keeps the global top-k and sends each client the bitmap once), each of its
   messages a ``query.setup`` to the client's node;
3. per round: learning rate, seeded client sample, the method's payload for each client
   (``train``), screening and aggregation in sampled-client order, evaluation on the test set.

It writes the same run folder as the simulator (``config.toml``, ``partition.json``,
``mask.json``, ``metrics.jsonl``, ``summary.json``) with the real payload byte counts, plus per
round what the processes measured: each client's compute seconds, the server's aggregation
seconds, and the time spent in Flower's send-and-receive.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ssfl import algorithms
from ssfl.algorithms.base import TRAIN, Algorithm
from ssfl.config import Config, ConfigError
from ssfl.flower import secagg
from ssfl.flower.protocol import (
    CONFIG,
    METRICS,
    MSG_HELLO,
    MSG_SETUP,
    MSG_TRAIN,
    PAYLOAD,
    FlowerSettings,
    Stopwatch,
    config_from_run_config,
    message_wire_bytes,
    payload_bytes,
    payload_record,
    resolve_run_dir,
)
from ssfl.run.experiment import prepare
from ssfl.run.loop import ClientReply, SecureReplies, Transport, run

app = ServerApp()
logger = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, settings = config_from_run_config(context.run_config)
    config.run.progress = False
    run_dir = resolve_run_dir(settings)
    result = run_on_grid(grid, config, settings, run_dir)
    print(f"ssfl: run folder {result['run_dir']}", flush=True)


class FlowerRunError(RuntimeError):
    """A node replied with an error, or replies did not come in time."""


def _exchange(
    grid: Grid, messages: Sequence[Message], settings: FlowerSettings, what: str
) -> list[Message]:
    """Send ``messages`` and return their replies in the same order; any failure is an error."""
    replies = _exchange_tolerant(grid, messages, settings, what)
    for reply in replies:
        if isinstance(reply, str):
            raise FlowerRunError(f"{what}: {reply}")
    return replies  # type: ignore[return-value]


@dataclass
class ExchangeTimes:
    """Wall-clock time stamps (``time.time()``) of one exchange: when the push started and
    ended, and when each reply was pulled (in the order of the messages; NaN: no reply)."""

    push_started: float = math.nan
    push_ended: float = math.nan
    pulled: list[float] = field(default_factory=list)


def _exchange_tolerant(
    grid: Grid, messages: Sequence[Message], settings: FlowerSettings, what: str,
    times: ExchangeTimes | None = None,
) -> list[Message | str]:
    """Send ``messages``; per message, its reply, or why there is none (an error reply, or no
    reply within ``round-timeout-seconds``: a crashed, slow or disconnected node).

    Pushes, then pulls every ``poll-interval-seconds`` (``Grid.send_and_receive`` sleeps 3 s
    between pulls, a fixed cost on every round that this loop avoids). ``times``, if given,
    receives the time stamps of the push and of each reply's arrival."""
    if not messages:
        return []
    times = times if times is not None else ExchangeTimes()
    times.push_started = time.time()
    ids = list(grid.push_messages(messages))
    times.push_ended = time.time()
    if len(ids) != len(messages) or any(not i for i in ids):
        raise FlowerRunError(f"{what}: the SuperLink did not accept every message")
    pending = set(ids)
    replies: dict[str, Message] = {}
    arrived: dict[str, float] = {}
    deadline = time.monotonic() + settings.round_timeout_seconds
    while pending and time.monotonic() <= deadline:
        pulled = grid.pull_messages(sorted(pending))
        now = time.time()
        for reply in pulled:
            key = reply.metadata.reply_to_message_id
            if key in pending:
                pending.discard(key)
                replies[key] = reply
                arrived[key] = now
        if pending:
            time.sleep(settings.poll_interval_seconds)
    times.pulled = [arrived.get(mid, math.nan) for mid in ids]
    out: list[Message | str] = []
    for message, mid in zip(messages, ids):
        node = message.metadata.dst_node_id
        reply = replies.get(mid)
        if reply is None:
            out.append(f"node {node} sent no reply within {settings.round_timeout_seconds:.0f} s")
        elif reply.has_error():
            out.append(f"node {node} replied with error {reply.error.code}: {reply.error.reason}")
        else:
            out.append(reply)
    return out


def round_timeline(times: ExchangeTimes, metrics: Sequence[Any | None]) -> dict[str, Any]:
    """Where a round's time went, from the server's and the ClientApps' time stamps (seconds;
    lists per replying client, in the order of the messages; ``metrics`` None: no reply).

    * ``push_seconds``: ``grid.push_messages`` (the payloads uploaded to the SuperLink);
    * ``client_deliver_seconds``: push start to the ClientApp process's start: the SuperLink
      holds the message until the SuperNode pulls (an idle SuperNode pulls every 3 s), the
      SuperNode pulls the payload and creates a task, the SuperExec picks it up (polling every
      ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``) and starts ``flwr-clientapp``;
    * ``client_startup_seconds``: process start to handler entry: Python, ``flwr``, pulling the
      task's message, context and FAB from the SuperNode, installing the FAB, importing the app
      (``client_import_seconds``: the ClientApp module's own imports, no torch);
    * ``client_handler_seconds``: the handler; of it ``client_setup_seconds`` (config, data,
      model; in a fresh process without the node's worker also the handlers' first import,
      torch), ``client_decode_seconds``, ``client_train_seconds``, ``client_encode_seconds``;
      with the worker (node config ``worker=true``) ``client_worker_seconds`` is the socket
      round trip to it, which holds set-up, decode, train and encode;
    * ``client_return_seconds``: handler exit to the reply's arrival at the ServerApp: the reply
      pushed to the SuperNode, the SuperNode's wait for it (it looks every 0.5 s), its push to
      the SuperLink, the ServerApp's next pull (every ``flower.poll-interval-seconds``);
    * ``client_reply_seconds``: push start to the reply's arrival (the sum of the above);
      ``first_reply_seconds``/``last_reply_seconds``: its minimum and maximum.

    The stamps of different processes are compared, so on several hosts this needs their
    clocks in sync (NTP: milliseconds). ``None`` where a value is unknown: the process start on
    a system without ``/proc``, or deliver/start-up/import in a process that had handled a
    message before (the simulation engine reuses processes)."""
    keys = ("client_reply_seconds", "client_deliver_seconds", "client_startup_seconds",
            "client_import_seconds", "client_handler_seconds", "client_decode_seconds",
            "client_train_seconds", "client_encode_seconds", "client_return_seconds")
    out: dict[str, list[float | None]] = {k: [] for k in keys}
    for pulled, m in zip(times.pulled, metrics):
        if m is None:
            continue

        def get(key: str) -> float | None:
            return _float(m, key)

        started, entered, handler = get("process-started"), get("handler-started"), \
            get("handler-seconds")
        fresh = get("first-message") == 1 and started is not None and started > 0
        out["client_reply_seconds"].append(pulled - times.push_started)
        out["client_deliver_seconds"].append(started - times.push_started if fresh else None)
        out["client_startup_seconds"].append(
            entered - started if fresh and entered is not None else None)
        out["client_import_seconds"].append(get("import-seconds") if fresh else None)
        out["client_handler_seconds"].append(handler)
        for step in ("decode", "train", "encode"):
            out[f"client_{step}_seconds"].append(get(f"{step}-seconds"))
        out["client_return_seconds"].append(
            pulled - entered - handler if entered is not None and handler is not None else None)
    replies = [r for r in out["client_reply_seconds"] if r is not None]
    return {
        "push_seconds": times.push_ended - times.push_started,
        "first_reply_seconds": min(replies) if replies else None,
        "last_reply_seconds": max(replies) if replies else None,
        **out,
    }


def assign_clients(grid: Grid, num_clients: int, settings: FlowerSettings) -> dict[int, int]:
    """Map every client id to a node: nodes with a ``partition-id`` hold that client; the others
    (if any) serve the remaining ids in turn. Waits for nodes up to ``node-wait-seconds``."""
    deadline = time.monotonic() + settings.node_wait_seconds
    known: dict[int, int] = {}  # node id -> partition id (-1: any)
    problem = "no SuperNode connected"
    while True:
        node_ids = sorted(grid.get_node_ids())
        new = [n for n in node_ids if n not in known]
        if new and len(node_ids) >= settings.min_nodes:
            hello = [
                Message(RecordDict({CONFIG: ConfigRecord({})}), n, MSG_HELLO, group_id="hello")
                for n in new
            ]
            for message, reply in zip(hello, _exchange(grid, hello, settings, "hello")):
                pid, num = _hello_partition(message.metadata.dst_node_id, reply)
                if pid >= 0 and (num != num_clients or pid >= num_clients):
                    raise FlowerRunError(
                        f"node {message.metadata.dst_node_id} has partition-id={pid} "
                        f"num-partitions={num}, but federation.num-clients is {num_clients}"
                    )
                known[message.metadata.dst_node_id] = pid
        if len(known) >= settings.min_nodes:
            mapping, problem = _map_clients(known, num_clients)
            if mapping is not None:
                return mapping
        else:
            problem = f"{len(known)} of at least {settings.min_nodes} SuperNodes connected"
        if time.monotonic() > deadline:
            raise FlowerRunError(f"gave up waiting for SuperNodes: {problem}")
        time.sleep(1.0)


def _hello_partition(node: int, reply: Message) -> tuple[int, int]:
    """The ``partition-id`` and ``num-partitions`` of a node's hello reply; a reply without
    them, or with values that are not integers, is a :class:`FlowerRunError` naming the node."""
    try:
        metrics = reply.content[METRICS] if METRICS in reply.content else None
        values = {k: metrics[k] if metrics is not None and k in metrics else None
                  for k in ("partition-id", "num-partitions")}
    except Exception as exc:  # noqa: BLE001 - any unreadable content is the node's fault
        raise FlowerRunError(f"node {node}: unreadable hello reply: "
                             f"{type(exc).__name__}: {exc}") from exc
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlowerRunError(
                f"node {node}: hello reply has no integer {key!r} (got {_short(value)})")
    return values["partition-id"], values["num-partitions"]


def _map_clients(known: dict[int, int], num_clients: int) -> tuple[dict[int, int] | None, str]:
    pinned: dict[int, int] = {}
    for node, pid in sorted(known.items()):
        if pid >= 0:
            if pid in pinned:
                raise FlowerRunError(f"nodes {pinned[pid]} and {node} both hold partition {pid}")
            pinned[pid] = node
    pool = sorted(node for node, pid in known.items() if pid < 0)
    if pool:
        return {c: pinned.get(c, pool[c % len(pool)]) for c in range(num_clients)}, ""
    missing = [c for c in range(num_clients) if c not in pinned]
    if missing:
        return None, f"no SuperNode holds partition(s) {missing[:10]}"
    return pinned, ""


def check_supported(config: Config, settings: FlowerSettings | None = None) -> None:
    """Refuse, before any process or message, a method that cannot run on Flower (or not
    with the Flower settings asked for: secure aggregation)."""
    refuse_unsupported(algorithms.get(config.algorithm.name))
    if config.federation.aggregator == "fltrust":
        raise ConfigError(
            "federation.aggregator = 'fltrust' trains on a clean sample held by the server, "
            "which only the simulator has: run it with `ssfl run`, or choose another rule")
    if settings is not None:
        secagg.check_secure_aggregation(config, settings)


def refuse_unsupported(cls: type[Algorithm[Any]]) -> None:
    """A method that needs the pooled data of every client in one place (``snip_oracle``)
    cannot run where each client's data stays on its node."""
    if cls.needs_pooled_data:
        raise ConfigError(
            f"algorithm.name = {cls.name!r} needs the pooled data of every client in one "
            "place, which only the simulator has: run it with `ssfl run`")


#: The numbers a reply must carry (per message kind); a missing one is logged, then treated as
#: unknown (``num-samples``: the loop rejects the reply; ``train-loss``: NaN; seconds: skipped).
_REQUIRED = {TRAIN: ("num-samples", "train-loss", "compute-seconds", "setup-seconds")}
_REQUIRED_SETUP = ("num-samples", "compute-seconds")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _float(metrics: Mapping[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float; None where it is missing or not a number."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass
class Unpacked:
    """What was read from one reply: its payload (None: missing or not a 1-D uint8 array, with
    ``payload_problem`` saying why) and its metrics, every value but ``num-samples`` (passed on
    as the node sent it, for the loop to screen) a number."""

    payload: bytes | None
    metrics: dict[str, Any]
    payload_problem: str = ""


def unpack_reply(reply: Message, node: int, kind: str = TRAIN) -> Unpacked | str:
    """Read one reply without trusting it: never an exception, whatever the node sent. Each
    malformed field is logged once with the node id; a reply whose content cannot be read at
    all gives the reason as a string."""
    try:
        content = reply.content
        record = content[METRICS] if METRICS in content else {}
        raw = {str(k): record[k] for k in record}
        has_payload = PAYLOAD in content
        payload_record_ = content[PAYLOAD] if has_payload else None
    except Exception as exc:  # noqa: BLE001 - whatever arrived, the round goes on
        return f"node {node}: unreadable reply: {type(exc).__name__}: {_short(str(exc), 200)}"
    metrics: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "num-samples" or (not isinstance(value, bool)
                                    and isinstance(value, (int, float))):
            metrics[key] = value
        else:
            logger.warning("node %s: reply metric %r is not a number: %s", node, key,
                           _short(value))
    for key in _REQUIRED.get(kind, _REQUIRED_SETUP):
        if key not in raw:
            logger.warning("node %s: reply has no %r", node, key)
    payload, problem = None, ""
    if not has_payload:
        problem = "reply has no payload"
    else:
        try:
            payload = payload_bytes(payload_record_)
        except Exception as exc:  # noqa: BLE001 - a wrong record, array, dtype or shape
            problem = f"unreadable payload: {type(exc).__name__}: {_short(str(exc), 200)}"
    if problem:
        logger.warning("node %s: %s", node, problem)
    return Unpacked(payload, metrics, problem)


def client_timings(metrics: list[Any], exchange_seconds: float) -> dict[str, Any]:
    """The round's per-client times the nodes reported (a missing or non-numeric one is left
    out), and the exchange's own wall time."""
    return {
        "client_compute_seconds": [s for m in metrics
                                   if (s := _float(m, "compute-seconds")) is not None],
        "client_setup_seconds": [s for m in metrics
                                 if (s := _float(m, "setup-seconds")) is not None],
        "client_worker_seconds": [_float(m, "worker-seconds") for m in metrics],
        "exchange_seconds": exchange_seconds,
    }


class FlowerTransport(Transport):
    """Carries the loop's payloads as Flower messages (``query.setup`` for a method's set-up
    messages, ``train`` per sampled client and round), each to the node that holds the client.
    It also records what the processes measured: each client's compute seconds and where a
    round's time went."""

    def __init__(self, grid: Grid, config: Config, settings: FlowerSettings,
                 max_weight: float = 0.0) -> None:
        self.grid, self.settings = grid, settings
        started = time.perf_counter()
        self.mapping = assign_clients(grid, config.federation.num_clients, settings)
        self.nodes = sorted(set(self.mapping.values()))
        self.node_wait_seconds = time.perf_counter() - started
        self.setup_compute: dict[str, dict[int, float]] = {}
        self.message_bytes: dict[str, int] = {}
        self._round: dict[str, Any] = {}
        # Secure aggregation (ssfl.flower.secagg): training rounds are SecAgg+ rounds.
        self.secure_aggregation = settings.secure_aggregation
        if self.secure_aggregation:
            secagg.check_sampled_nodes(config, self.mapping)
        # SecAgg+ weighs each client by num-samples / max-weight (<= 1 for every client).
        self.max_weight = settings.secagg_max_weight or max_weight or 1000.0
        #: what the server received in each SecAgg+ stage (tests look at it)
        self.observe: Any = None
        self.secagg_bytes: dict[str, dict[str, int]] = {}

    def check_supported(self, algorithm: type[Algorithm[Any]]) -> None:
        refuse_unsupported(algorithm)

    def _messages(self, kind: str, round: int, lr: float,
                  payloads: Mapping[int, bytes]) -> list[Message]:
        message_type = MSG_TRAIN if kind == TRAIN else MSG_SETUP
        group = str(round) if kind == TRAIN else f"setup-{kind}"
        return [
            Message(RecordDict({
                CONFIG: ConfigRecord({"client-id": cid, "round": round, "lr": lr, "kind": kind}),
                PAYLOAD: payload_record(down),
            }), self.mapping[cid], message_type, group_id=group)
            for cid, down in payloads.items()
        ]

    def exchange(self, kind: str, round: int, lr: float, payloads: Mapping[int, bytes],
                 attempt: int = 1, *, ack: bool = False) -> list[ClientReply]:
        out = self._messages(kind, round, lr, payloads)
        times = ExchangeTimes()
        what = f"round {round}" if kind == TRAIN else kind
        with Stopwatch() as exchange:
            replies = _exchange_tolerant(self.grid, out, self.settings, what, times)
        arrived = [r for r in replies if not isinstance(r, str)]
        if kind == TRAIN and not self.message_bytes and arrived:
            self.message_bytes = {"down": message_wire_bytes(out[0]),
                                  "up": message_wire_bytes(arrived[0])}
        nodes = [m.metadata.dst_node_id for m in out]
        unpacked = [r if isinstance(r, str) else unpack_reply(r, node, kind)
                    for r, node in zip(replies, nodes)]
        del replies, arrived, out
        ok = [u.metrics for u in unpacked if not isinstance(u, str)]
        if kind == TRAIN:
            self._round = {
                **client_timings(ok, exchange.seconds),
                **round_timeline(times, [None if isinstance(u, str) else u.metrics
                                         for u in unpacked]),
            }
        result = []
        for (cid, down), got, node in zip(payloads.items(), unpacked, nodes):
            if isinstance(got, str):
                result.append(ClientReply(cid, down, b"", 0, float("nan"), error=got))
                continue
            if got.payload is None:
                # The loop's byte ledger counts every answered reply's payload with len(), so a
                # reply without readable payload bytes is recorded as failed, with the reason.
                result.append(ClientReply(cid, down, b"", 0, float("nan"),
                                          error=f"node {node}: {got.payload_problem}"))
                continue
            metrics = got.metrics
            if kind != TRAIN and (seconds := _float(metrics, "compute-seconds")) is not None:
                self.setup_compute.setdefault(kind, {})[cid] = seconds
            loss = _float(metrics, "train-loss")
            result.append(ClientReply(cid, down, got.payload, metrics.get("num-samples"),
                                      float("nan") if loss is None else loss))
        return result

    def exchange_mean(self, round: int, lr: float, payloads: Mapping[int, bytes],
                      attempt: int = 1) -> SecureReplies:
        """A training round as SecAgg+'s four stages (``ssfl.flower.secagg``): the weighted
        mean of the values of the clients in the sum, and what each client uploaded."""
        node_of = {cid: self.mapping[cid] for cid in payloads}
        client_of = {node: cid for cid, node in node_of.items()}
        messages = {node_of[cid]: ({"client-id": cid, "round": round, "lr": lr, "kind": TRAIN},
                                   down) for cid, down in payloads.items()}
        with Stopwatch() as exchange:
            got = secagg.secure_round(self.grid, round, messages, self.settings,
                                      self.max_weight, wire=not self.secagg_bytes,
                                      observe=self.observe)
        if not self.secagg_bytes and got.stages:
            # One round's messages as Flower serialises them, per stage (the first round).
            self.secagg_bytes = {st.stage: {"down": st.wire_down or 0, "up": st.wire_up or 0}
                                 for st in got.stages}
        summed = set(got.summed)
        collect = got.stage(secagg.Stage.COLLECT_MASKED_VECTORS)
        replies = []
        for cid, down in payloads.items():
            node = node_of[cid]
            metrics = got.metrics.get(node, {})
            if node in summed:
                loss = _float(metrics, "train-loss")
                replies.append(ClientReply(cid, down, bytes(got.masked_bytes.get(node, 0)),
                                           got.weights.get(node, metrics.get("num-samples")),
                                           float("nan") if loss is None else loss))
            else:
                why = (f"node {node} " + ("sent its masked vector but " if node in got.metrics
                                           else "") + "is not in the sum"
                       + (f" ({got.problem})" if got.problem else ""))
                replies.append(ClientReply(cid, down, b"", 0, float("nan"), error=why))
        ok = [got.metrics[n] for n in (collect.nodes if collect else []) if n in got.metrics]
        times = ExchangeTimes()
        if collect is not None:
            times = ExchangeTimes(collect.push_started, collect.push_ended, collect.pulled)
        self._round = {
            **client_timings(ok, exchange.seconds),
            # The collect stage's time line (the one with training), as in a plain round.
            **round_timeline(times, [got.metrics.get(n) for n in
                                     (collect.nodes if collect else [])]),
            "secagg_stage_seconds": {st.stage: st.seconds for st in got.stages},
            "secagg_clients": [client_of[n] for n in sorted(summed, key=client_of.get)],
            "secagg_clipped": int(sum(_float(m, "secagg-clipped") or 0 for m in ok)),
        }
        mean = None if got.mean is None else torch.from_numpy(got.mean).to(torch.float32)
        return SecureReplies(replies, mean, tuple(client_of[n] for n in got.summed),
                             protocol_down=sum(st.protocol_down for st in got.stages),
                             protocol_up=sum(st.protocol_up for st in got.stages),
                             problem=got.problem)

    def round_info(self) -> dict[str, Any]:
        return self._round

    def summary_info(self) -> dict[str, Any]:
        return {
            # Flower only: how the run was carried.
            "engine": "flower",
            "nodes": len(self.nodes),
            "node_wait_seconds": self.node_wait_seconds,
            "setup_compute_seconds": {kind: [seconds[c] for c in sorted(seconds)]
                                      for kind, seconds in self.setup_compute.items()},
            # One train message and one reply as Flower serialises them, vs. the payload bytes.
            "message_bytes_per_round": self.message_bytes,
            **({"secure_aggregation": True,
                # One round's SecAgg+ messages as Flower serialises them, per stage, all nodes.
                "secagg_message_bytes_per_round": self.secagg_bytes,
                "secagg_max_weight": self.max_weight} if self.secure_aggregation else {}),
        }


def run_on_grid(
    grid: Grid, config: Config, settings: FlowerSettings, run_dir: Path | None = None,
    *, write: bool = True,
) -> dict[str, Any]:
    """Run one experiment over Flower; returns ``{"run_dir", "summary", "metrics", "mask",
    "values"}``."""
    check_supported(config, settings)
    if settings.resume and run_dir is None:
        raise ConfigError("flower.resume needs flower.run-dir: the run folder to continue")
    exp = prepare(config)
    if settings.server_threads > 0:
        torch.set_num_threads(settings.server_threads)
    transport = FlowerTransport(grid, config, settings,
                                max_weight=max(len(p) for p in exp.parts))
    result = run(exp, transport, run_dir, write=write, progress=False, resume=settings.resume,
                 on_round=_print_round)
    return {"run_dir": result.run_dir, "summary": result.summary, "metrics": result.metrics,
            "mask": result.mask, "values": result.final_values}


def _print_round(row: dict[str, Any]) -> None:
    print(f"ssfl round {row['round']}: train loss {row['train_loss']:.4f}"
          + (f", accuracy {row['accuracy']:.4f}" if row["accuracy"] is not None else "")
          + f", {row['seconds']:.2f} s", flush=True)
