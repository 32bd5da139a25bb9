"""The SSFL ServerApp: the simulator's experiment, with Flower moving the payloads.

The sequence is exactly :func:`ssfl.sim.run_experiment`'s (same seeds, same order of floating-
point sums), so the two produce the same mask and the same per-round metrics:

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

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ssfl.client import evaluate
from ssfl.comm import encode_values
from ssfl.config import Config, ConfigError, to_toml
from ssfl.data.partition import class_counts
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
from ssfl.flower.setup import build_model, load_federation, set_threads
from ssfl.masks import layer_densities, mask_density, prunable_parameter_names
from ssfl.server import SparseFedAvgServer, find_mask
from ssfl.sim import learning_rate, make_run_dir, sample_clients

app = ServerApp()


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
    """Send ``messages`` and return their replies in the same order.

    Pushes, then pulls every ``poll-interval-seconds`` (``Grid.send_and_receive`` sleeps 3 s
    between pulls, a fixed cost on every round that this loop avoids)."""
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages) or any(not i for i in ids):
        raise FlowerRunError(f"{what}: the SuperLink did not accept every message")
    pending = set(ids)
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + settings.round_timeout_seconds
    while pending:
        for reply in grid.pull_messages(sorted(pending)):
            key = reply.metadata.reply_to_message_id
            if key in pending:
                pending.discard(key)
                replies[key] = reply
        if not pending:
            break
        if time.monotonic() > deadline:
            raise FlowerRunError(
                f"{what}: {len(replies)} of {len(messages)} replies within "
                f"{settings.round_timeout_seconds:.0f} s"
            )
        time.sleep(settings.poll_interval_seconds)
    ordered = [replies[i] for i in ids]
    for message, reply in zip(messages, ordered):
        if reply.has_error():
            e = reply.error
            raise FlowerRunError(
                f"{what}: node {message.metadata.dst_node_id} replied with error {e.code}: "
                f"{e.reason}"
            )
    return ordered


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


def run_on_grid(
    grid: Grid, config: Config, settings: FlowerSettings, run_dir: Path | None = None,
    *, write: bool = True,
) -> dict[str, Any]:
    """Run one experiment over Flower; returns ``{"run_dir", "summary", "metrics", "mask",
    "values"}``."""
    check_supported(config)
    set_threads(config)
    seed = config.run.seed
    fed = load_federation(config)
    train_set, test_set = fed.train_set, fed.test_set
    assert test_set is not None
    sizes = [len(p) for p in fed.parts]

    folder = make_run_dir(config, run_dir) if write else None
    if folder is not None:
        (folder / "config.toml").write_text(to_toml(config))
        counts = class_counts(train_set.labels.numpy(), fed.parts, train_set.num_classes)
        (folder / "partition.json").write_text(
            json.dumps({"class_counts": counts.tolist(), "sizes": sizes})
        )

    model = build_model(config, train_set)
    prunable = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    prunable_shapes = {n: params[n].shape for n in prunable}
    initial = {n: p.detach().clone() for n, p in params.items()}

    nodes_started = time.perf_counter()
    mapping = assign_clients(grid, config.federation.num_clients, settings)
    nodes = sorted(set(mapping.values()))
    node_wait_seconds = time.perf_counter() - nodes_started

    # ---- mask round ----------------------------------------------------------------------
    mask_started = time.perf_counter()
    algo = config.algorithm
    score_compute: dict[int, float] = {}

    def collect_scores(client_ids: Sequence[int]) -> Iterator[tuple[bytes, int]]:
        asks = [
            Message(RecordDict({CONFIG: ConfigRecord({"client-id": cid})}), mapping[cid],
                    MSG_SCORES, group_id="mask")
            for cid in client_ids
        ]
        # Replies come back in the order asked (client-id order), as the simulator sums them.
        for reply in _exchange(grid, asks, settings, "scores"):
            payload, metrics = _payload_and_metrics(reply)
            score_compute[int(metrics["client-id"])] = float(metrics["compute-seconds"])
            yield payload, int(metrics["num-samples"])

    found = find_mask(
        algo.name, prunable_shapes, algo.density, num_clients=config.federation.num_clients,
        seed=seed, score_aggregation=algo.score_aggregation, collect_scores=collect_scores,
    )
    one_time: dict[str, int] = (
        {"score_upload": found.score_upload_bytes} if found.score_upload_bytes else {}
    )
    mask = found.mask
    server = SparseFedAvgServer(initial, prunable, mask, value_dtype=config.comm.value_dtype)
    dense = mask_density(mask) >= 1.0
    mask_payload = server.mask_payload()
    deliveries = []
    for node in nodes:
        content = RecordDict({CONFIG: ConfigRecord({"dense": dense})})
        if not dense:
            content[PAYLOAD] = payload_record(mask_payload)
        deliveries.append(Message(content, node, MSG_MASK, group_id="mask"))
    _exchange(grid, deliveries, settings, "mask")
    if not dense:
        # Once per node (one node per client in a pinned deployment, as the simulator counts).
        one_time["mask_broadcast"] = len(mask_payload) * len(nodes)
    mask_seconds = time.perf_counter() - mask_started
    mask_info = {
        "density": mask_density(mask),
        "kept": int(sum(int(m.sum()) for m in mask.values())),
        "prunable": int(sum(m.numel() for m in mask.values())),
        "per_layer": layer_densities(mask),
        "digest": server.digest.hex(),
        "scored_clients": found.scored_clients,
        "seconds": mask_seconds,
        "score_compute_seconds": [score_compute[c] for c in found.scored_clients],
        "nodes": len(nodes),
    }
    if folder is not None:
        (folder / "mask.json").write_text(json.dumps(mask_info, indent=1))

    dense_payload_bytes = len(
        encode_values(torch_cat(initial.values()), dtype=config.comm.value_dtype)
    )

    # ---- training rounds -----------------------------------------------------------------
    metrics: list[dict[str, Any]] = []
    cumulative = sum(one_time.values())
    message_bytes: dict[str, int] = {}
    metrics_file = (folder / "metrics.jsonl").open("w") if folder is not None else None
    started = time.perf_counter()
    try:
        for rnd in range(1, config.run.rounds + 1):
            round_started = time.perf_counter()
            lr = learning_rate(config, rnd)
            chosen = sample_clients(
                seed, rnd, config.federation.num_clients, config.federation.clients_per_round
            )
            down = server.broadcast(rnd)
            out = [
                Message(
                    RecordDict({
                        CONFIG: ConfigRecord({"client-id": cid, "round": rnd, "lr": lr}),
                        PAYLOAD: payload_record(down),
                    }),
                    mapping[cid], MSG_TRAIN, group_id=str(rnd),
                )
                for cid in chosen
            ]
            with Stopwatch() as exchange:
                replies = _exchange(grid, out, settings, f"round {rnd}")
            if not message_bytes:
                message_bytes = {"down": message_wire_bytes(out[0]),
                                 "up": message_wire_bytes(replies[0])}
            unpacked = [_payload_and_metrics(r) for r in replies]
            del replies, out
            with Stopwatch() as aggregation:
                # In sampled-client order, as the simulator, so the float sums match.
                update = server.aggregate(rnd, ((p, int(m["num-samples"])) for p, m in unpacked))
            train_seconds = time.perf_counter() - round_started
            bytes_down = len(down) * len(chosen)
            cumulative += bytes_down + update.bytes_up
            losses = [(float(m["train-loss"]), int(m["num-samples"])) for _, m in unpacked]
            row: dict[str, Any] = {
                "round": rnd,
                "accuracy": None,
                "test_loss": None,
                "train_loss": sum(l * n for l, n in losses) / sum(n for _, n in losses),
                "bytes_down": bytes_down,
                "bytes_up": update.bytes_up,
                "bytes_cumulative": cumulative,
                "seconds": train_seconds,
                "lr": lr,
                "clients": chosen,
                "client_compute_seconds": [float(m["compute-seconds"]) for _, m in unpacked],
                "client_setup_seconds": [float(m["setup-seconds"]) for _, m in unpacked],
                "aggregation_seconds": aggregation.seconds,
                "exchange_seconds": exchange.seconds,
            }
            del unpacked
            if rnd % config.run.eval_every == 0 or rnd == config.run.rounds:
                eval_started = time.perf_counter()
                server.layout.scatter_model_(server.values, model)
                acc, loss = evaluate(
                    model, test_set.images, test_set.labels, test_set.mean, test_set.std
                )
                row.update(accuracy=acc, test_loss=loss,
                           eval_seconds=time.perf_counter() - eval_started)
            metrics.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            print(f"ssfl round {rnd}: train loss {row['train_loss']:.4f}"
                  + (f", accuracy {row['accuracy']:.4f}" if row["accuracy"] is not None else "")
                  + f", {train_seconds:.2f} s", flush=True)
    finally:
        if metrics_file is not None:
            metrics_file.close()

    wall = time.perf_counter() - started
    accuracies = [m["accuracy"] for m in metrics if m["accuracy"] is not None]
    per_round_down = len(down)
    per_round_up = update.bytes_up // max(update.num_clients, 1)
    samples = sum(sizes[c] * config.train.local_epochs for m in metrics for c in m["clients"])
    seconds = sum(m["seconds"] for m in metrics)
    summary: dict[str, Any] = {
        "algorithm": algo.name,
        "density": mask_info["density"],
        "target_density": algo.density,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "rounds": config.run.rounds,
        "seed": seed,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "one_time_bytes": one_time,
        "bytes_per_round": {"down": per_round_down, "up": per_round_up},
        "dense_bytes_per_round": {"down": dense_payload_bytes, "up": dense_payload_bytes},
        "ratio_to_dense": (per_round_down + per_round_up) / (2 * dense_payload_bytes),
        "total_bytes": cumulative,
        "num_values": server.layout.num_values,
        "num_parameters": sum(t.numel() for t in initial.values()),
        "wall_seconds": wall,
        "mask_seconds": mask_seconds,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        # Flower only: how the run was carried.
        "engine": "flower",
        "nodes": len(nodes),
        "node_wait_seconds": node_wait_seconds,
        # One train message and one reply as Flower serialises them, vs. the payload bytes.
        "message_bytes_per_round": message_bytes,
    }
    if folder is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"run_dir": folder, "summary": summary, "metrics": metrics, "mask": mask,
            "values": server.values.clone()}


def torch_cat(tensors: Iterable[Any]) -> Any:
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])
