"""One federated run, whatever carries the messages.

The engine holds the whole experiment logic: set-up from the config, the mask round, the
training rounds (learning rate, seeded client sampling, payloads, aggregation), evaluation under
both protocols, byte counting, checkpoints and the run folder. A ``Transport`` only moves
payloads between the server and the clients: ``ssfl.sim`` runs the clients in process, and
``ssfl.flower`` sends Flower messages. Both therefore produce the same mask and metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssfl.algorithms import TRAINING_STRATEGIES, StrategyContext
from ssfl.checkpoint import (
    FILENAME as CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from ssfl.client import LocalData, TrainSettings, evaluate_samples, model_device
from ssfl.comm import encode_values, read_header
from ssfl.config import (
    Config,
    ConfigError,
    augmentation_enabled,
    check_against_data,
    from_dict,
    to_toml,
)
from ssfl.data.datasets import ImageDataset, load_dataset
from ssfl.data.partition import class_counts, matching_test_splits, partition
from ssfl.masks import layer_densities, mask_density, mask_digest, prunable_parameter_names
from ssfl.models import build_model
from ssfl.server import MaskRound, RoundFailed, SparseFedAvgServer, find_mask
from ssfl.strategies import StaticMaskStrategy, TrainingStrategy, payload_parts

Scores = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


# ---- set-up shared by the server and every client ---------------------------------------------
@dataclass
class Experiment:
    """What every party derives from the config alone (data split and initial model are
    seeded, so nothing of it travels)."""

    config: Config
    train_set: ImageDataset
    test_set: ImageDataset | None
    parts: list[np.ndarray]
    model: torch.nn.Module
    prunable: list[str] = field(init=False)
    initial: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.prunable = prunable_parameter_names(self.model)
        # The server's copy: on the CPU whatever device the model trains on.
        self.initial = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    def client(self, cid: int) -> LocalData:
        t = self.train_set
        return LocalData(t.images, t.labels, torch.from_numpy(self.parts[cid]), t.mean, t.std)

    @property
    def prunable_shapes(self) -> dict[str, torch.Size]:
        return {n: self.initial[n].shape for n in self.prunable}


def prepare(config: Config, *, data_root: str = "", with_test: bool = True) -> Experiment:
    """Load and split the data and build the seeded model. ``data_root`` overrides
    ``data.root`` (a Flower node's own data folder)."""
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    root = data_root or config.data.root or None
    train_set = load_dataset(config.data.dataset, root, "train", download=config.data.download)
    test_set = (load_dataset(config.data.dataset, root, "test", download=config.data.download)
                if with_test else None)
    check_against_data(config, len(train_set), train_set.num_classes)
    parts = partition(
        train_set.labels.numpy(), config.federation.num_clients, config.data.partition,
        alpha=config.data.alpha, classes_per_client=config.data.classes_per_client,
        seed=config.run.seed,
    )
    return Experiment(config, train_set, test_set, list(parts), seeded_model(config, train_set))


def resolve_device(spec: str) -> torch.device:
    """The device ``run.device`` names on this machine (``auto``: its CUDA GPU if it has one)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device = {spec!r}, but PyTorch sees no CUDA GPU on this "
                              "machine (a CPU build, or no driver); use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device = {spec!r}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        # Reproducible convolutions: the same seed gives the same run on the same GPU.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device


def seeded_model(config: Config, data: ImageDataset) -> torch.nn.Module:
    """The initial model: the same weights in every process that builds it from ``config``
    (drawn on the CPU, then moved to ``run.device``)."""
    _, channels, height, _ = data.images.shape
    model = build_model(config.model.name, num_classes=data.num_classes, in_channels=channels,
                        image_size=height, width=config.model.width, seed=config.run.seed)
    return model.to(resolve_device(config.run.device))


def device_name(model: torch.nn.Module) -> str:
    """Where ``model`` trains, for the summary: ``cpu`` or ``cuda:0 (<GPU name>)``."""
    device = model_device(model)
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


def train_settings(config: Config) -> TrainSettings:
    t = config.train
    return TrainSettings(momentum=t.momentum, weight_decay=t.weight_decay,
                         local_epochs=t.local_epochs, batch_size=t.batch_size,
                         clip_grad_norm=t.clip_grad_norm, augment=augmentation_enabled(config))


def learning_rate(config: Config, round: int) -> float:
    """Learning rate of ``round`` (1-based): ``lr * decay**(round-1)`` or cosine over the run."""
    t = config.train
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (round - 1) / config.run.rounds))
    return t.lr * t.lr_decay ** (round - 1)


def sample_clients(seed: int, round: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of ``round``: seeded by (seed, round) alone, so a resumed or re-run
    experiment samples the same clients whatever happened in earlier rounds."""
    rng = np.random.default_rng([seed, round])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def make_run_dir(config: Config, run_dir: Path | None) -> Path:
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(config.run.out_dir) / f"{config.run.name}-{stamp}"
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ---- transports -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientReply:
    client_id: int
    down: bytes  # what the server sent this client this round
    payload: bytes  # what the client sent back (empty if it failed)
    num_samples: int
    train_loss: float
    error: str = ""  # why the client gave no update (crashed, timed out, disconnected)


class Transport(ABC):
    """Moves payloads between the server and the clients; holds no FL logic."""

    def check_supported(self, config: Config) -> None:
        """Raise ConfigError before any work if this transport cannot run the algorithm."""

    @abstractmethod
    def collect_scores(self, client_ids: Sequence[int]) -> Iterator[tuple[int, bytes, int]]:
        """(client id, saliency-score payload, sample count) of each listed client that
        answered, in the order asked; a client that fails is logged and left out."""

    def pooled_scores(self) -> Scores | None:
        """Scores on the pooled data of all clients, where one place holds it (simulator)."""
        return None

    @abstractmethod
    def deliver_mask(self, payload: bytes | None) -> int:
        """Send the mask bitmap (None: dense, no mask) to the clients once; bytes sent."""

    @abstractmethod
    def train(self, round: int, lr: float, client_ids: Sequence[int],
              strategy: TrainingStrategy, attempt: int = 1) -> Iterator[ClientReply]:
        """Send each client ``strategy.payload_for(client, round)``; yield one reply per client
        in the order of ``client_ids`` (the order of the server's floating-point sums), with
        ``error`` set for a client that crashed, timed out or disconnected."""

    def round_info(self) -> dict[str, Any]:
        """Extra per-round measurements (for example time in the network) for the metrics."""
        return {}

    def summary_info(self) -> dict[str, Any]:
        return {}


class _Progress:
    def __init__(self, total: int, enabled: bool, done: int = 0) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="round", dynamic_ncols=True)

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    final_values: torch.Tensor
    mask: dict[str, torch.Tensor]


def _mask_stats(mask: dict[str, torch.Tensor], prunable: list[str]) -> dict[str, Any]:
    return {
        "density": mask_density(mask),
        "kept": int(sum(int(m.sum()) for m in mask.values())),
        "prunable": int(sum(m.numel() for m in mask.values())),
        "per_layer": layer_densities(mask),
        "digest": mask_digest(mask, prunable).hex(),
    }


def personal_accuracy(strategy: TrainingStrategy, model: torch.nn.Module, test_set: ImageDataset,
                      client_tests: Sequence[torch.Tensor]) -> float:
    """Mean over clients of each client's own model's accuracy on that client's test split
    (personalised strategies); only the split's samples are evaluated."""
    total = 0.0
    for cid, idx in enumerate(client_tests):
        strategy.load_personal_(model, cid)
        correct, _ = evaluate_samples(model, test_set.images[idx], test_set.labels[idx],
                                      test_set.mean, test_set.std)
        total += int(correct.sum()) / max(1, idx.numel())
    return total / len(client_tests)


# ---- the run ----------------------------------------------------------------------------------
def run(
    exp: Experiment,
    transport: Transport,
    run_dir: Path | None = None,
    *,
    write: bool = True,
    resume: bool = False,
    progress: bool | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``exp`` to the end (or, with ``resume``, on from the checkpoint in ``run_dir``)."""
    config = exp.config
    transport.check_supported(config)
    device = device_name(exp.model)  # where this process trains: recorded, compared on resume
    checkpoint = None
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run folder")
        checkpoint = load_checkpoint(Path(run_dir) / CHECKPOINT)
        # Parsed, so that a key added to ssfl after the checkpoint was written counts as its
        # default rather than as a difference.
        if from_dict(tomllib.loads(checkpoint[0]["config"])) != config:
            raise CheckpointError(f"the config differs from the one {run_dir} was started with")
        before = checkpoint[0].get("device")
        if before is not None and before != device:
            logger.warning("%s was checkpointed on %s and resumes on %s: the rest of the run "
                           "will differ in the last bits from an uninterrupted one", run_dir,
                           before, device)
    seed, algo = config.run.seed, config.algorithm
    if exp.test_set is None:
        raise ValueError("the server needs the test set")
    test_set = exp.test_set
    train_counts = class_counts(exp.train_set.labels.numpy(), exp.parts,
                                exp.train_set.num_classes)
    client_tests = [torch.from_numpy(idx) for idx in matching_test_splits(
        test_set.labels.numpy(), train_counts,
        per_client=max(1, len(test_set) // len(exp.parts)), seed=seed)]
    folder = make_run_dir(config, run_dir) if write else None
    if folder is not None and checkpoint is None:
        (folder / "config.toml").write_text(to_toml(config))
        (folder / "partition.json").write_text(json.dumps({
            "class_counts": train_counts.tolist(), "sizes": [len(p) for p in exp.parts],
            "test_class_counts": class_counts(
                test_set.labels.numpy(), [t.numpy() for t in client_tests],
                exp.train_set.num_classes).tolist(),
        }))
    model = exp.model

    # ---- mask round ---------------------------------------------------------------------------
    mask_started = time.perf_counter()
    strategy: TrainingStrategy
    scored: list[int] = []
    one_time: dict[str, int] = {}
    if algo.name in TRAINING_STRATEGIES:
        strategy = TRAINING_STRATEGIES[algo.name](StrategyContext(
            config, model, exp.initial, exp.prunable,
            [exp.client(c) for c in range(len(exp.parts))]))
    else:
        if checkpoint is not None:  # resuming: the mask round is done and its mask saved
            found = MaskRound(unprefixed("mask", unprefixed("strategy", checkpoint[1])), 0, [])
        else:
            found = find_mask(
                algo.name, exp.prunable_shapes, algo.density, num_clients=len(exp.parts),
                seed=seed, score_aggregation=algo.score_aggregation,
                collect_scores=transport.collect_scores, pooled_scores=transport.pooled_scores,
            )
        server = SparseFedAvgServer(exp.initial, exp.prunable, found.mask,
                                    value_dtype=config.comm.value_dtype,
                                    update_clip_norm=config.federation.update_clip_norm)
        strategy = StaticMaskStrategy(server, min_replies=config.federation.min_replies)
        scored = found.scored_clients
        if found.score_upload_bytes:
            one_time["score_upload"] = found.score_upload_bytes
        sparse = mask_density(found.mask) < 1.0
        sent = transport.deliver_mask(server.mask_payload() if sparse else None)
        if sent and checkpoint is None:  # a resumed run paid for its mask before
            one_time["mask_broadcast"] = sent
    one_time.update(strategy.setup_bytes)
    mask = strategy.global_mask()
    mask_seconds = time.perf_counter() - mask_started
    mask_info = {**_mask_stats(mask, exp.prunable), "scored_clients": scored,
                 "seconds": mask_seconds}
    if checkpoint is not None:
        meta, tensors = checkpoint
        strategy.load_state_dict(meta["strategy"], unprefixed("strategy", tensors))
        one_time, mask_info = meta["one_time"], meta["mask_info"]
    if folder is not None:
        (folder / "mask.json").write_text(json.dumps(mask_info, indent=1))

    # A dense payload of the same model, encoded for real, is the yardstick for the ratio.
    dense_payload_bytes = len(encode_values(
        torch.cat([t.reshape(-1) for t in exp.initial.values()]), dtype=config.comm.value_dtype))

    # ---- training rounds ----------------------------------------------------------------------
    metrics: list[dict[str, Any]] = []
    cumulative = sum(one_time.values())
    first_round, earlier_seconds = 1, 0.0
    if checkpoint is not None:
        meta = checkpoint[0]
        metrics, cumulative = meta["metrics"], meta["cumulative"]
        first_round, earlier_seconds = meta["round"] + 1, meta["wall_seconds"]
    metrics_file = (folder / "metrics.jsonl").open("w") if folder is not None else None
    if metrics_file is not None:
        # Rows after the checkpoint (from a crashed process) are dropped and computed again.
        metrics_file.writelines(json.dumps(row) + "\n" for row in metrics)
        metrics_file.flush()
    bar = _Progress(config.run.rounds, config.run.progress if progress is None else progress,
                    done=first_round - 1)
    started = time.perf_counter() - earlier_seconds
    last_accuracy = next((m["accuracy"] for m in reversed(metrics)
                          if m["accuracy"] is not None), None)
    values_per_payload = 0
    try:
        for rnd in range(first_round, config.run.rounds + 1):
            round_started = time.perf_counter()
            lr = learning_rate(config, rnd)
            chosen = sample_clients(seed, rnd, config.federation.num_clients,
                                    config.federation.clients_per_round)
            bytes_down = bytes_up = 0
            aggregation_seconds = 0.0
            failed: list[dict[str, Any]] = []
            need = config.federation.min_replies

            def replies(attempt: int) -> Iterator[tuple[int, bytes, int]]:
                # Lazily, as the server consumes them: in process, one client trains at a time.
                nonlocal bytes_down, bytes_up, values_per_payload, aggregation_seconds
                answered = 0
                for reply in transport.train(rnd, lr, chosen, strategy, attempt):
                    bytes_down += len(reply.down)
                    if reply.error:
                        logger.warning("round %d attempt %d: client %d dropped: %s", rnd,
                                       attempt, reply.client_id, reply.error)
                        failed.append({"client": reply.client_id, "attempt": attempt,
                                       "reason": reply.error})
                        continue
                    answered += 1
                    bytes_up += len(reply.payload)  # every byte received counts, valid or not
                    # The values are the last part (a mask bitmap may come first).
                    values_per_payload = read_header(payload_parts(reply.down)[-1]).count
                    losses.append((reply.train_loss, reply.num_samples))
                    yielded = time.perf_counter()
                    yield reply.client_id, reply.payload, reply.num_samples
                    aggregation_seconds += time.perf_counter() - yielded
                if answered < need:
                    # Raised inside the strategy's loop, before it changes any state.
                    raise RoundFailed(rnd, answered, need, [])

            for attempt in range(1, config.federation.max_round_attempts + 1):
                losses: list[tuple[float, int]] = []
                try:
                    update = strategy.aggregate(rnd, replies(attempt))
                    break
                except RoundFailed as exc:
                    logger.warning("%s; attempt %d of %d", exc, attempt,
                                   config.federation.max_round_attempts)
                    if attempt == config.federation.max_round_attempts:
                        failure = RoundFailed(rnd, exc.valid, exc.required, exc.rejected)
                        failure.run_dir = folder
                        raise failure from exc
            train_seconds = time.perf_counter() - round_started
            cumulative += bytes_down + bytes_up
            row: dict[str, Any] = {
                "round": rnd,
                "accuracy": None,
                "test_loss": None,
                "train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses),
                "bytes_down": bytes_down,
                "bytes_up": bytes_up,
                "bytes_cumulative": cumulative,
                "seconds": train_seconds,
                "lr": lr,
                "clients": chosen,
                "aggregation_seconds": aggregation_seconds,
                **transport.round_info(),
            }
            if failed:
                row["failed"] = failed
                row["attempts"] = attempt
            if update.rejected:
                row["rejected"] = [{"client": r.client_id, "reason": r.reason}
                                   for r in update.rejected]
            eval_every = config.run.eval_every  # 0: never (benchmarks that time the rounds)
            if eval_every > 0 and (rnd % eval_every == 0 or rnd == config.run.rounds):
                eval_started = time.perf_counter()
                strategy.load_global_(model)
                correct, sample_losses = evaluate_samples(
                    model, test_set.images, test_set.labels, test_set.mean, test_set.std)
                last_accuracy = int(correct.sum()) / correct.numel()  # exact, not float32
                if strategy.personalised:
                    personal = personal_accuracy(strategy, model, test_set, client_tests)
                else:
                    # The global model's correctness on each client's own test split.
                    personal = sum(int(correct[idx].sum()) / max(1, idx.numel())
                                   for idx in client_tests) / len(client_tests)
                row.update(
                    accuracy=last_accuracy,
                    test_loss=float(sample_losses.mean()),
                    # Mean over clients of the accuracy on the client's own test split.
                    personal_accuracy=personal,
                    eval_seconds=time.perf_counter() - eval_started,
                )
            metrics.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            every = config.run.checkpoint_every
            if folder is not None and every > 0 and (rnd % every == 0
                                                     or rnd == config.run.rounds):
                strategy_meta, strategy_tensors = strategy.state_dict()
                save_checkpoint(folder / CHECKPOINT, {
                    "round": rnd, "config": to_toml(config), "metrics": metrics,
                    "cumulative": cumulative, "one_time": one_time, "mask_info": mask_info,
                    "wall_seconds": time.perf_counter() - started, "strategy": strategy_meta,
                    "device": device,
                }, prefixed("strategy", strategy_tensors))
            if on_round is not None:
                on_round(row)
            bar.update(acc=f"{last_accuracy:.3f}" if last_accuracy is not None else "-",
                       loss=f"{row['train_loss']:.3f}")
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    wall = time.perf_counter() - started
    # Dynamic methods change the global mask during training: report the final one too.
    mask = strategy.global_mask()
    mask_info["final"] = _mask_stats(mask, exp.prunable)
    if strategy.per_client_masks:
        # The global mask is the union of the clients' masks; what a client trains in is its own.
        mask_info["final"]["union_of_client_masks"] = True
        mask_info["final"]["client_density"] = sum(
            mask_density(strategy.client_mask(c)) for c in range(len(exp.parts))) / len(exp.parts)
    if folder is not None:
        (folder / "mask.json").write_text(json.dumps(mask_info, indent=1))
    accuracies = [m["accuracy"] for m in metrics if m["accuracy"] is not None]
    # Per client and round, averaged over the run: equal in every round for a static mask,
    # varying for methods whose masks travel when they change.
    client_rounds = sum(len(m["clients"]) for m in metrics)
    per_round_down = round(sum(m["bytes_down"] for m in metrics) / client_rounds)
    per_round_up = round(sum(m["bytes_up"] for m in metrics) / client_rounds)
    samples = sum(len(exp.parts[c]) * config.train.local_epochs
                  for m in metrics for c in m["clients"])
    seconds = sum(m["seconds"] for m in metrics)
    summary: dict[str, Any] = {
        "algorithm": algo.name,
        "density": mask_info["final"].get("client_density", mask_info["final"]["density"]),
        "target_density": algo.density,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "rounds": config.run.rounds,
        "seed": seed,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        # The personalised protocol (each client on its own test split) beside the global one.
        "final_personal_accuracy": next(
            (m["personal_accuracy"] for m in reversed(metrics) if m["accuracy"] is not None),
            None),
        "one_time_bytes": one_time,
        # Per client and round: one download and one upload.
        "bytes_per_round": {"down": per_round_down, "up": per_round_up},
        "dense_bytes_per_round": {"down": dense_payload_bytes, "up": dense_payload_bytes},
        "ratio_to_dense": (per_round_down + per_round_up) / (2 * dense_payload_bytes),
        "total_bytes": cumulative,
        "num_values": values_per_payload,
        "num_parameters": sum(t.numel() for t in exp.initial.values()),
        "wall_seconds": wall,
        "mask_seconds": mask_seconds,
        "device": device,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        **transport.summary_info(),
    }
    if folder is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return RunResult(folder, summary, metrics, strategy.global_values().clone(), mask)
