"""Simulator overhead: training throughput inside a federated round vs a plain PyTorch loop.

Both sides train the same model from the same weights on the same batches (the client's batches,
materialised once up front for the plain loop, so it pays nothing for data handling). The
simulator side is a whole client round as the simulator runs it: decode the server payload,
scatter it into the model, build and augment the batches, masked SGD, gather and encode the reply.
The two are interleaved repeatedly (alternating which goes first); the headline is the median
over repeats of the paired ratio plain time / simulator time.

    python benchmarks/throughput.py [--data-root DIR] [--repeats 7] [--out FILE]

Writes JSON (default benchmarks/results/throughput.json) and prints samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ssfl.client import LocalData, TrainSettings, client_generator, iterate_batches, train_round
from ssfl.comm import ParameterLayout, encode_values
from ssfl.data import load_dataset, partition
from ssfl.masks import full_mask, global_topk_mask, mask_digest, prunable_parameter_names
from ssfl.models import build_model

SETTINGS = TrainSettings(momentum=0.9, weight_decay=5e-4, local_epochs=1, batch_size=32,
                         clip_grad_norm=10.0, augment=True)
LR = 0.05


def plain_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """What a researcher would write: SGD over ready-made batches, nothing else."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=SETTINGS.momentum,
                                weight_decay=SETTINGS.weight_decay)
    model.train()
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SETTINGS.clip_grad_norm)
        optimizer.step()


def measure(data_root: str | None, repeats: int, density: float) -> dict[str, float]:
    train = load_dataset("cifar10", data_root, "train")
    parts = partition(train.labels.numpy(), 100, "balanced_dirichlet", alpha=0.3, seed=0)
    client = LocalData(train.images, train.labels, torch.from_numpy(parts[0]), train.mean,
                       train.std)
    model = build_model("small_cnn", num_classes=10, in_channels=3, image_size=32, seed=0)
    names = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    shapes = {n: params[n].shape for n in names}
    mask = (full_mask(shapes) if density >= 1.0
            else global_topk_mask({n: params[n].detach().abs() for n in names}, density))
    layout = ParameterLayout.for_model(model, mask)
    digest = mask_digest(mask, names)
    start_values = layout.gather_model(model)
    down = encode_values(start_values, round=1, digest=digest)
    batches = list(iterate_batches(client, SETTINGS.batch_size, client_generator(0, 1, 0),
                                   augment=True))
    samples = len(client) * SETTINGS.local_epochs

    sim_times, plain_times = [], []
    for i in range(repeats + 1):  # the first pass of each warms up and is dropped
        for side in ("sim", "plain") if i % 2 == 0 else ("plain", "sim"):
            layout.scatter_model_(start_values, model)
            t = time.perf_counter()
            if side == "sim":
                train_round(model, layout, mask, digest, down, client, SETTINGS, round=1, lr=LR,
                            generator=client_generator(0, 1, 0))
            else:
                plain_loop(model, batches)
            elapsed = time.perf_counter() - t
            if i > 0:
                (sim_times if side == "sim" else plain_times).append(elapsed)
    sim = samples / statistics.median(sim_times)
    plain = samples / statistics.median(plain_times)
    # Each repeat runs both sides back to back, so the ratio within a pair is free of the
    # machine's slow drift (frequency, other load); the median over pairs is the headline.
    paired = statistics.median(p / s for s, p in zip(sim_times, plain_times))
    return {"density": density, "samples_per_round": samples, "simulator_samples_per_s": sim,
            "plain_samples_per_s": plain, "ratio_of_medians": sim / plain, "ratio": paired}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="folder with cifar-10-batches-bin/ "
                        "(default: $SSFL_DATA_DIR)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "throughput.json"))
    args = parser.parse_args()
    rows = [measure(args.data_root, args.repeats, d) for d in (1.0, 0.1)]
    for r in rows:
        print(f"density {r['density']:<4}: simulator {r['simulator_samples_per_s']:7.0f} "
              f"samples/s, plain loop {r['plain_samples_per_s']:7.0f} samples/s, "
              f"ratio {r['ratio']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "simulator throughput vs plain PyTorch loop (small_cnn, CIFAR-10, "
                     "one client of 500 samples, batch 32)",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "results": rows,
    }, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
