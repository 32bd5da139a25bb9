"""The SSFL ServerApp: the simulator's experiment, with Flower moving the payloads.

The experiment is :func:`ssfl.engine.run`, the simulator's own; Flower only carries the
payloads (``FlowerTransport``), so the two produce the same mask and per-round metrics:

1. load the data set and partition it (seeded); build the seeded model;
2. mask round: every client scores the initial weights on its data (``query.scores``); the
   server averages the scores in client-id order and keeps the global top-k; each node receives
   the mask bitmap once (``query.mask``);
3. per round: learning rate, seeded client sample, one broadcast payload of the active values
   (``train``), aggregation of the replies in sampled-client order, evaluation on the test set.

It writes the same run folder as the simulator (``config.toml``, ``partition.json``,
``mask.json``, ``metrics.jsonl``, ``summary.json``) with the real payload byte counts, plus per
round what the processes measured: each client's compute seconds, the server's aggregation
seconds, and the time spent in Flower's send-and-receive.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ssfl.config import Config, ConfigError
from ssfl.engine import ClientReply, Transport, prepare, run
from ssfl.flower.protocol import (
    CONFIG,
    METRICS,
    MSG_HELLO,
    MSG_MASK,
    MSG_SCORES,
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
from ssfl.strategies import TrainingStrategy

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
            return float(m[key]) if key in m else None

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
                metrics = reply.content[METRICS]
                pid, num = int(metrics["partition-id"]), int(metrics["num-partitions"])
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


# Global-mask algorithms whose mask round the Flower app runs (``ssfl.server.find_mask``).
# Not here: snip_oracle (needs every client's data in one place, only the simulator has it) and
# the algorithms with their own training rounds (``ssfl.algorithms.TRAINING_STRATEGIES``:
# per-client masks, dynamic masks), which need messages this app does not have yet.
FLOWER_ALGORITHMS = ("ssfl", "fedavg", "random", "random_erk", "snip_single")


def check_supported(config: Config) -> None:
    if config.algorithm.name not in FLOWER_ALGORITHMS:
        raise ConfigError(
            f"algorithm.name = {config.algorithm.name!r} does not run on Flower yet; "
            f"choose one of {list(FLOWER_ALGORITHMS)} (or use the simulator, `ssfl run`)"
        )


def _payload_and_metrics(reply: Message) -> tuple[bytes, Any]:
    return payload_bytes(reply.content[PAYLOAD]), reply.content[METRICS]


class FlowerTransport(Transport):
    """Carries the engine's payloads as Flower messages: ``query.scores`` for the mask round,
    ``query.mask`` once per node, ``train`` per sampled client and round. It also records what
    the processes measured: each client's compute seconds and the time in send-and-receive."""

    def __init__(self, grid: Grid, config: Config, settings: FlowerSettings) -> None:
        self.grid, self.settings = grid, settings
        started = time.perf_counter()
        self.mapping = assign_clients(grid, config.federation.num_clients, settings)
        self.nodes = sorted(set(self.mapping.values()))
        self.node_wait_seconds = time.perf_counter() - started
        self.score_compute: dict[int, float] = {}
        self.message_bytes: dict[str, int] = {}
        self._round: dict[str, Any] = {}

    def check_supported(self, config: Config) -> None:
        check_supported(config)

    def collect_scores(self, client_ids: Sequence[int]) -> Iterator[tuple[int, bytes, int]]:
        asks = [
            Message(RecordDict({CONFIG: ConfigRecord({"client-id": cid})}), self.mapping[cid],
                    MSG_SCORES, group_id="mask")
            for cid in client_ids
        ]
        # Replies come back in the order asked (client-id order), as the engine sums them; the
        # mask is built from the clients that answered.
        for cid, reply in zip(client_ids, _exchange_tolerant(self.grid, asks, self.settings,
                                                             "scores")):
            if isinstance(reply, str):
                logger.warning("mask round: client %d failed: %s", cid, reply)
                continue
            payload, metrics = _payload_and_metrics(reply)
            self.score_compute[cid] = float(metrics["compute-seconds"])
            yield cid, payload, int(metrics["num-samples"])

    def deliver_mask(self, payload: bytes | None) -> int:
        deliveries = []
        for node in self.nodes:
            content = RecordDict({CONFIG: ConfigRecord({"dense": payload is None})})
            if payload is not None:
                content[PAYLOAD] = payload_record(payload)
            deliveries.append(Message(content, node, MSG_MASK, group_id="mask"))
        _exchange(self.grid, deliveries, self.settings, "mask")
        # Once per node (one node per client in a pinned deployment, as the simulator counts).
        return 0 if payload is None else len(payload) * len(self.nodes)

    def train(self, round: int, lr: float, client_ids: Sequence[int],
              strategy: TrainingStrategy, attempt: int = 1) -> Iterator[ClientReply]:
        downs = {cid: strategy.payload_for(cid, round) for cid in client_ids}
        out = [
            Message(RecordDict({
                CONFIG: ConfigRecord({"client-id": cid, "round": round, "lr": lr}),
                PAYLOAD: payload_record(downs[cid]),
            }), self.mapping[cid], MSG_TRAIN, group_id=str(round))
            for cid in client_ids
        ]
        times = ExchangeTimes()
        with Stopwatch() as exchange:
            replies = _exchange_tolerant(self.grid, out, self.settings, f"round {round}",
                                         times)
        arrived = [r for r in replies if not isinstance(r, str)]
        if not self.message_bytes and arrived:
            self.message_bytes = {"down": message_wire_bytes(out[0]),
                                  "up": message_wire_bytes(arrived[0])}
        unpacked = [r if isinstance(r, str) else _payload_and_metrics(r) for r in replies]
        del replies, arrived, out
        ok = [u for u in unpacked if not isinstance(u, str)]
        self._round = {
            "client_compute_seconds": [float(m["compute-seconds"]) for _, m in ok],
            "client_setup_seconds": [float(m["setup-seconds"]) for _, m in ok],
            "client_worker_seconds": [float(m["worker-seconds"]) if "worker-seconds" in m
                                      else None for _, m in ok],
            "exchange_seconds": exchange.seconds,
            **round_timeline(times, [None if isinstance(u, str) else u[1] for u in unpacked]),
        }
        for cid, got in zip(client_ids, unpacked):
            if isinstance(got, str):
                yield ClientReply(cid, downs[cid], b"", 0, float("nan"), error=got)
            else:
                payload, metrics = got
                yield ClientReply(cid, downs[cid], payload, int(metrics["num-samples"]),
                                  float(metrics["train-loss"]))

    def round_info(self) -> dict[str, Any]:
        return self._round

    def summary_info(self) -> dict[str, Any]:
        return {
            # Flower only: how the run was carried.
            "engine": "flower",
            "nodes": len(self.nodes),
            "node_wait_seconds": self.node_wait_seconds,
            "score_compute_seconds": [self.score_compute[c] for c in sorted(self.score_compute)],
            # One train message and one reply as Flower serialises them, vs. the payload bytes.
            "message_bytes_per_round": self.message_bytes,
        }


def run_on_grid(
    grid: Grid, config: Config, settings: FlowerSettings, run_dir: Path | None = None,
    *, write: bool = True,
) -> dict[str, Any]:
    """Run one experiment over Flower; returns ``{"run_dir", "summary", "metrics", "mask",
    "values"}``."""
    check_supported(config)
    if settings.resume and run_dir is None:
        raise ConfigError("flower.resume needs flower.run-dir: the run folder to continue")
    exp = prepare(config)
    if settings.server_threads > 0:
        torch.set_num_threads(settings.server_threads)
    transport = FlowerTransport(grid, config, settings)
    result = run(exp, transport, run_dir, write=write, progress=False, resume=settings.resume,
                 on_round=_print_round)
    return {"run_dir": result.run_dir, "summary": result.summary, "metrics": result.metrics,
            "mask": result.mask, "values": result.final_values}


def _print_round(row: dict[str, Any]) -> None:
    print(f"ssfl round {row['round']}: train loss {row['train_loss']:.4f}"
          + (f", accuracy {row['accuracy']:.4f}" if row["accuracy"] is not None else "")
          + f", {row['seconds']:.2f} s", flush=True)
