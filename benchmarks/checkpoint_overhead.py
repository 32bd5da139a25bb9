"""Cost of checkpointing: one checkpoint save against one training round it protects.

Two models: the small CNN of the CPU reference (CIFAR-10, 10 clients of 500 samples per round)
and ResNet-18 (the paper's model, whose checkpoint is 45 MB). For each, the time of one
simulated round and of one ``save_checkpoint`` of the server state are measured in this
process (median of repeats), and the overhead per round is printed as a ratio for a checkpoint
every round and every 10 rounds (the default).

    python benchmarks/checkpoint_overhead.py [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssfl.algorithms.base import ClientContext, NoSettings, Reply, Setup
from ssfl.algorithms.ssfl import FixedMaskFedAvg, FixedMaskState
from ssfl.checkpoint import prefixed, save_checkpoint
from ssfl.client import LocalData, TrainSettings, client_generator
from ssfl.config import load_config
from ssfl.data import load_dataset, partition
from ssfl.masks import global_topk_mask, prunable_parameter_names
from ssfl.models import build_model

HERE = Path(__file__).resolve().parent


def measure(model_name: str, data_root: str | None, repeats: int, clients_per_round: int,
            samples_per_client: int) -> dict[str, float]:
    train = load_dataset("cifar10", data_root, "train")
    parts = partition(train.labels.numpy(), 100, "iid", seed=0)
    clients = [LocalData(train.images, train.labels,
                         torch.from_numpy(p[:samples_per_client]), train.mean, train.std)
               for p in parts[:clients_per_round]]
    model = build_model(model_name, num_classes=10, in_channels=3, image_size=32, seed=0)
    names = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    initial = {n: p.detach().clone() for n, p in params.items()}
    mask = global_topk_mask({n: params[n].detach().abs() for n in names}, 0.5)
    setup = Setup(load_config(None, ["algorithm.density=0.5"]),
                  {n: t.shape for n, t in initial.items()}, names, initial, len(clients))
    algorithm = FixedMaskFedAvg(setup, NoSettings())
    state = algorithm.with_mask(mask)
    held = algorithm.codec.encode(mask)  # what each client keeps from the mask round
    settings = TrainSettings(local_epochs=1, batch_size=32)
    sampled = list(range(len(clients)))

    def one_round(state: FixedMaskState, rnd: int) -> FixedMaskState:
        payloads = algorithm.configure(state, rnd, sampled, 1)
        replies = []
        for cid, data in enumerate(clients):
            ctx = ClientContext(client_id=cid, round=rnd, lr=0.01, model=model, data=data,
                                settings=settings, generator=client_generator(0, rnd, cid),
                                setup=setup)
            out = algorithm.client_step(ctx, payloads[cid], held)
            assert out.result is not None
            replies.append(Reply(cid, out.result.num_samples,
                                 algorithm.check(state, rnd, cid, out.reply)))
        return algorithm.aggregate(state, rnd, replies, sampled)[0]

    round_times, save_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        for rnd in range(1, repeats + 2):
            t = time.perf_counter()
            state = one_round(state, rnd)
            elapsed = time.perf_counter() - t
            meta, tensors = algorithm.state_dict(state)
            t = time.perf_counter()
            save_checkpoint(path, {"round": rnd, "algorithm": meta, "metrics": []},
                            prefixed("algorithm", tensors))
            saved = time.perf_counter() - t
            if rnd > 1:  # the first round warms up
                round_times.append(elapsed)
                save_times.append(saved)
        size = path.stat().st_size
    round_s, save_s = statistics.median(round_times), statistics.median(save_times)
    return {"model": model_name, "clients_per_round": clients_per_round,
            "samples_per_client": samples_per_client, "round_seconds": round_s,
            "checkpoint_seconds": save_s, "checkpoint_bytes": size,
            "overhead_every_round": save_s / round_s,
            "overhead_every_10_rounds": save_s / (10 * round_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "checkpoint_overhead.json"))
    args = parser.parse_args()
    rows = [measure("small_cnn", args.data_root, args.repeats, 10, 500),
            # ResNet-18 rounds are long on a CPU: a short round (2 clients of 64 samples)
            # gives an upper bound on the relative overhead.
            measure("resnet18", args.data_root, max(2, args.repeats // 2), 2, 64)]
    for r in rows:
        print(f"{r['model']:9s}: round {r['round_seconds']:.2f} s, checkpoint "
              f"{r['checkpoint_seconds'] * 1000:.0f} ms ({r['checkpoint_bytes'] / 1e6:.1f} MB); "
              f"overhead {r['overhead_every_round']:.4f} per round when saved every round, "
              f"{r['overhead_every_10_rounds']:.4f} every 10 rounds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "checkpoint save time relative to a round",
                               "torch": torch.__version__, "results": rows}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
