"""In-process simulator: every client of a federation, one after another, in one process.

Clients share one reused model object (memory does not grow with the number of clients) and one
uint8 image tensor (clients are index sets into it). Every message still goes through the same
payload encoding as a real deployment, and every byte count is the length of a real payload.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssfl.client import (
    LocalData,
    TrainSettings,
    client_generator,
    compute_scores,
    encode_scores,
    evaluate_samples,
)
from ssfl.comm import encode_values, read_header
from ssfl.config import Config, augmentation_enabled, check_against_data, to_toml
from ssfl.data.datasets import ImageDataset, load_dataset
from ssfl.data.partition import class_counts, matching_test_splits, partition
from ssfl.masks import layer_densities, mask_density, mask_digest, prunable_parameter_names
from ssfl.models import build_model
from ssfl.checkpoint import (
    FILENAME as CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from ssfl.server import MaskRound, SparseFedAvgServer, find_mask
from ssfl.algorithms import TRAINING_STRATEGIES, StrategyContext
from ssfl.strategies import StaticMaskStrategy, TrainingStrategy


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    final_values: torch.Tensor
    mask: dict[str, torch.Tensor]


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


def run_experiment(
    config: Config,
    run_dir: Path | None = None,
    *,
    write: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run one federated experiment as ``config`` says and (if ``write``) save it to a folder.

    With ``resume``, ``run_dir`` is a run folder with a checkpoint: the run continues after the
    checkpoint's round and ends exactly as an uninterrupted run would (all randomness is drawn
    from (seed, round, client), so no RNG state needs saving).
    """
    checkpoint = None
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run folder")
        checkpoint = load_checkpoint(Path(run_dir) / CHECKPOINT)
        if checkpoint[0]["config"] != to_toml(config):
            raise CheckpointError(f"the config differs from the one {run_dir} was started with")
    if config.run.threads > 0:
        torch.set_num_threads(config.run.threads)
    seed = config.run.seed
    root = config.data.root or None
    train_set = load_dataset(config.data.dataset, root, "train", download=config.data.download)
    test_set = load_dataset(config.data.dataset, root, "test", download=config.data.download)
    check_against_data(config, len(train_set), train_set.num_classes)

    parts = partition(
        train_set.labels.numpy(),
        config.federation.num_clients,
        config.data.partition,
        alpha=config.data.alpha,
        classes_per_client=config.data.classes_per_client,
        seed=seed,
    )
    clients = [
        LocalData(train_set.images, train_set.labels, torch.from_numpy(p), train_set.mean,
                  train_set.std)
        for p in parts
    ]
    train_counts = class_counts(train_set.labels.numpy(), parts, train_set.num_classes)
    client_tests = [
        torch.from_numpy(idx) for idx in matching_test_splits(
            test_set.labels.numpy(), train_counts,
            per_client=max(1, len(test_set) // len(parts)), seed=seed,
        )
    ]
    folder = make_run_dir(config, run_dir) if write else None
    if folder is not None and checkpoint is None:
        (folder / "config.toml").write_text(to_toml(config))
        (folder / "partition.json").write_text(json.dumps({
            "class_counts": train_counts.tolist(), "sizes": [len(p) for p in parts],
            "test_class_counts": class_counts(
                test_set.labels.numpy(), [t.numpy() for t in client_tests],
                train_set.num_classes).tolist(),
        }))

    model = _build(config, train_set)
    prunable = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    prunable_shapes = {n: params[n].shape for n in prunable}
    initial = {n: p.detach().clone() for n, p in params.items()}

    # ---- mask round ----------------------------------------------------------------------
    mask_started = time.perf_counter()
    algo = config.algorithm
    score_batch_size = algo.saliency_batch_size or config.train.batch_size

    def collect_scores(client_ids: Sequence[int]) -> Iterator[tuple[bytes, int]]:
        for cid in client_ids:
            scores = compute_scores(
                model, clients[cid], num_batches=algo.saliency_batches,
                batch_size=score_batch_size, generator=client_generator(seed, 0, cid),
            )
            yield encode_scores(scores), len(clients[cid])

    def pooled_scores() -> dict[str, torch.Tensor]:
        # The oracle sees as many samples as the federated mask round, drawn from all data.
        pooled = LocalData(train_set.images, train_set.labels,
                           torch.from_numpy(np.concatenate(parts)), train_set.mean, train_set.std)
        return compute_scores(
            model, pooled, num_batches=algo.saliency_batches * len(clients),
            batch_size=score_batch_size, generator=client_generator(seed, 0, len(clients)),
        )

    strategy: TrainingStrategy
    saved_mask = (unprefixed("mask", unprefixed("strategy", checkpoint[1]))
                  if checkpoint is not None else None)
    if algo.name in TRAINING_STRATEGIES:
        strategy = TRAINING_STRATEGIES[algo.name](
            StrategyContext(config, model, initial, prunable, clients)
        )
        scored: list[int] = []
        one_time: dict[str, int] = {}
    else:
        if saved_mask is not None:  # resuming: the mask round is done, its mask saved
            found = MaskRound(saved_mask, 0, [])
        else:
            found = find_mask(
                algo.name, prunable_shapes, algo.density, num_clients=len(clients), seed=seed,
                score_aggregation=algo.score_aggregation, collect_scores=collect_scores,
                pooled_scores=pooled_scores,
            )
        server = SparseFedAvgServer(initial, prunable, found.mask,
                                    value_dtype=config.comm.value_dtype,
                                    update_clip_norm=config.federation.update_clip_norm)
        strategy = StaticMaskStrategy(server, len(clients))
        scored = found.scored_clients
        one_time = {"score_upload": found.score_upload_bytes} if found.score_upload_bytes else {}
    one_time.update(strategy.setup_bytes)
    mask = strategy.global_mask()
    mask_seconds = time.perf_counter() - mask_started
    mask_info = {**_mask_stats(mask, prunable), "scored_clients": scored,
                 "seconds": mask_seconds}
    if checkpoint is not None:
        meta, tensors = checkpoint
        strategy.load_state_dict(meta["strategy"], unprefixed("strategy", tensors))
        one_time, mask_info = meta["one_time"], meta["mask_info"]
    if folder is not None:
        (folder / "mask.json").write_text(json.dumps(mask_info, indent=1))

    # A dense payload of the same model, encoded for real, is the yardstick for the ratio.
    dense_payload_bytes = len(
        encode_values(torch.cat([t.reshape(-1) for t in initial.values()]),
                      dtype=config.comm.value_dtype)
    )
    settings = TrainSettings(
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        local_epochs=config.train.local_epochs,
        batch_size=config.train.batch_size,
        clip_grad_norm=config.train.clip_grad_norm,
        augment=augmentation_enabled(config),
    )

    # ---- training rounds -----------------------------------------------------------------
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
            chosen = sample_clients(
                seed, rnd, config.federation.num_clients, config.federation.clients_per_round
            )
            losses: list[tuple[float, int]] = []
            bytes_down = 0

            def replies() -> Iterator[tuple[int, bytes, int]]:
                # Clients train lazily as the server consumes replies: one model, one reply
                # in memory at a time.
                nonlocal bytes_down, values_per_payload
                for cid in chosen:
                    down = strategy.payload_for(cid, rnd)
                    bytes_down += len(down)
                    values_per_payload = read_header(down).count
                    reply, result = strategy.client_update(
                        model, down, clients[cid], settings, client_id=cid, round=rnd, lr=lr,
                        generator=client_generator(seed, rnd, cid),
                    )
                    losses.append((result.mean_loss, result.num_samples))
                    yield cid, reply, result.num_samples

            update = strategy.aggregate(rnd, replies())
            train_seconds = time.perf_counter() - round_started
            cumulative += bytes_down + update.bytes_up
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
            }
            if update.rejected:
                row["rejected"] = [{"client": r.client_id, "reason": r.reason}
                                   for r in update.rejected]
            if rnd % config.run.eval_every == 0 or rnd == config.run.rounds:
                eval_started = time.perf_counter()
                strategy.load_global_(model)
                correct, losses_per_sample = evaluate_samples(
                    model, test_set.images, test_set.labels, test_set.mean, test_set.std
                )
                acc = float(correct.float().mean())
                row.update(
                    accuracy=acc,
                    test_loss=float(losses_per_sample.mean()),
                    # Mean over clients of the accuracy on the client's own test split.
                    personal_accuracy=float(torch.stack(
                        [correct[idx].float().mean() for idx in client_tests]).mean()),
                    eval_seconds=time.perf_counter() - eval_started,
                )
                last_accuracy = acc
            metrics.append(row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            every = config.run.checkpoint_every
            if folder is not None and every > 0 and (rnd % every == 0 or
                                                     rnd == config.run.rounds):
                strategy_meta, strategy_tensors = strategy.state_dict()
                save_checkpoint(folder / CHECKPOINT, {
                    "round": rnd, "config": to_toml(config), "metrics": metrics,
                    "cumulative": cumulative, "one_time": one_time, "mask_info": mask_info,
                    "wall_seconds": time.perf_counter() - started, "strategy": strategy_meta,
                }, prefixed("strategy", strategy_tensors))
            if on_round is not None:
                on_round(row)
            bar.update(
                acc=f"{last_accuracy:.3f}" if last_accuracy is not None else "-",
                loss=f"{row['train_loss']:.3f}",
            )
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    wall = time.perf_counter() - started
    # Dynamic methods change the global mask during training: report the final one too.
    mask = strategy.global_mask()
    mask_info["final"] = _mask_stats(mask, prunable)
    if folder is not None:
        (folder / "mask.json").write_text(json.dumps(mask_info, indent=1))
    accuracies = [m["accuracy"] for m in metrics if m["accuracy"] is not None]
    # Per client and round, averaged over the run: equal in every round for a static mask,
    # varying for methods whose masks travel when they change.
    client_rounds = sum(len(m["clients"]) for m in metrics)
    per_round_down = round(sum(m["bytes_down"] for m in metrics) / client_rounds)
    per_round_up = round(sum(m["bytes_up"] for m in metrics) / client_rounds)
    summary: dict[str, Any] = {
        "algorithm": algo.name,
        "density": mask_info["final"]["density"],
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
        "num_parameters": sum(t.numel() for t in initial.values()),
        "wall_seconds": wall,
        "mask_seconds": mask_seconds,
        "samples_per_second": _throughput(metrics, clients, config),
    }
    if folder is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return RunResult(folder, summary, metrics, strategy.global_values().clone(), mask)


def _mask_stats(mask: dict[str, torch.Tensor], prunable: list[str]) -> dict[str, Any]:
    return {
        "density": mask_density(mask),
        "kept": int(sum(int(m.sum()) for m in mask.values())),
        "prunable": int(sum(m.numel() for m in mask.values())),
        "per_layer": layer_densities(mask),
        "digest": mask_digest(mask, prunable).hex(),
    }


def _build(config: Config, data: ImageDataset) -> torch.nn.Module:
    _, channels, height, _ = data.images.shape
    return build_model(
        config.model.name,
        num_classes=data.num_classes,
        in_channels=channels,
        image_size=height,
        width=config.model.width,
        seed=config.run.seed,
    )


def _throughput(metrics: list[dict[str, Any]], clients: list[LocalData], config: Config) -> float:
    samples = sum(
        len(clients[c]) * config.train.local_epochs for m in metrics for c in m["clients"]
    )
    seconds = sum(m["seconds"] for m in metrics)
    return samples / seconds if seconds > 0 else 0.0
