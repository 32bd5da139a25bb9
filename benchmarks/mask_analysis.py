"""Mask analysis: how close the federated SSFL mask gets to the oracle mask, and where each
method puts its weights.

On the CPU reference setting (configs/cifar10_cpu.toml: CIFAR-10, 100 clients, balanced
Dirichlet 0.3, small CNN), for each seed:

- the *reference oracle*: SNIP on the pooled data of all clients, averaged over
  ``--oracle-batches`` minibatches (the best estimate of the pooled-data saliency that the
  analysis can afford; the ``snip_oracle`` method of the runs uses as many batches as the
  federated mask round, i.e. 100 x saliency_batches);
- the federated SSFL mask from the first n clients (n in ``--clients``) with b saliency batches
  each (b in ``--batches``), scores aggregated as in ``ssfl run`` (weighted by sample count);
- Jaccard overlap |A and B| / |A or B| of each against the reference oracle, at every density.
  A random mask of density d overlaps any other mask of density d by d / (2 - d) in expectation.

The per-layer density of each method's mask is read from the comparison results
(``benchmarks/results/comparison.json``: the final mask of every run) where they exist, and
computed here for the static masks and the per-client methods.

    python benchmarks/mask_analysis.py [--seeds 0,1,2] [--clients 1,2,5,10,20,50,100]
        [--batches 1,2,4,8] [--densities 0.5,0.2,0.1,0.05] [--oracle-batches 800]

Writes results/mask_analysis.{json,md} and results/mask_overlap.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssfl import algorithms
from ssfl.algorithms.base import NoSettings, Setup
from ssfl.algorithms.clientwise import client_random_mask
from ssfl.algorithms.common import WeightedMean
from ssfl.client import LocalData, client_generator, compute_scores
from ssfl.config import load_config
from ssfl.masks import (
    erk_counts,
    flatten,
    global_topk_mask,
    jaccard,
    unflatten,
)
from ssfl.run.experiment import prepare

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_cpu.toml"


def build_mask(method: str, shapes: dict[str, torch.Size], density: float, *,
               seed: int) -> dict[str, torch.Tensor]:
    """The random global mask of ``method`` (``random`` or ``random_erk``) that a run with
    this density and seed trains in, drawn by the method's own rule."""
    config = load_config(CONFIG, [f"algorithm.name={method}", f"algorithm.density={density}",
                                  f"run.seed={seed}"])
    setup = Setup(config, dict(shapes), list(shapes), {}, config.federation.num_clients)
    return algorithms.get(method)(setup, NoSettings()).random_mask(  # type: ignore[attr-defined]
        torch.Generator().manual_seed(seed))


def overlaps_for_seed(seed: int, clients: list[int], batches: list[int],
                      densities: list[float], oracle_batches: int) -> dict[str, Any]:
    config = load_config(CONFIG, [f"run.seed={seed}"])
    exp = prepare(config, with_test=False)
    names = exp.prunable
    shapes = exp.prunable_shapes
    saliency = algorithms.settings_of(config)  # the config's [algorithm.ssfl] table
    batch_size = saliency.saliency_batch_size or config.train.batch_size
    num_clients = len(exp.parts)
    t = exp.train_set
    pooled = LocalData(t.images, t.labels, torch.from_numpy(np.concatenate(exp.parts)),
                       t.mean, t.std)
    started = time.perf_counter()
    oracle_scores = compute_scores(exp.model, pooled, num_batches=oracle_batches,
                                   batch_size=batch_size,
                                   generator=client_generator(seed, 0, num_clients + 1))
    oracle = {d: global_topk_mask(oracle_scores, d) for d in densities}
    # The oracle as the snip_oracle *method* computes it (fewer batches): the noise floor.
    method_oracle_scores = compute_scores(
        exp.model, pooled, num_batches=saliency.saliency_batches * num_clients,
        batch_size=batch_size, generator=client_generator(seed, 0, num_clients))
    rows: list[dict[str, Any]] = []
    for d in densities:
        rows.append({"seed": seed, "density": d, "mask": "snip_oracle (method)",
                     "jaccard": jaccard(global_topk_mask(method_oracle_scores, d), oracle[d])})
        rows.append({"seed": seed, "density": d, "mask": "random",
                     "jaccard": jaccard(build_mask("random", shapes, d, seed=seed), oracle[d])})
        rows.append({"seed": seed, "density": d, "mask": "random_erk",
                     "jaccard": jaccard(build_mask("random_erk", shapes, d, seed=seed),
                                        oracle[d])})
    wanted = set(clients)
    for b in batches:
        mean = WeightedMean()
        for cid in range(max(clients)):
            data = exp.client(cid)
            # The same batches a client scores in `ssfl run` (its round-0 generator).
            scores = compute_scores(exp.model, data, num_batches=b, batch_size=batch_size,
                                    generator=client_generator(seed, 0, cid))
            mean.add(flatten(scores, names), float(len(data)))
            n = cid + 1
            if n in wanted:
                aggregated = unflatten(mean.result(), shapes, names)
                for d in densities:
                    rows.append({"seed": seed, "density": d, "mask": "ssfl", "clients": n,
                                 "batches": b,
                                 "jaccard": jaccard(global_topk_mask(aggregated, d), oracle[d])})
    print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"rows": rows, "names": names, "shapes": shapes, "oracle_scores": oracle_scores}


def per_layer_table(seed: int, densities: list[float], results: Path,
                    shapes: dict[str, torch.Size], static: dict[str, dict]) -> tuple[str, dict]:
    """Per-layer density of each method's (final) mask at each density."""
    methods = ["ssfl", "snip_oracle", "snip_single", "random", "random_erk", "random_clientwise",
               "feddst", "prunefl", "dispfl", "sparsyfed"]
    recorded = {}
    if results.exists():
        recorded = {(r["algorithm"], r["target_density"]): r["per_layer"]
                    for r in json.loads(results.read_text())["runs"]
                    if r["seed"] == seed and r.get("per_layer")}
    data: dict[str, dict[str, dict[str, float]]] = {}
    for d in densities:
        for m in methods:
            # Per-client methods: what a client trains in, not the union the runs record.
            if (m, d) in static:
                data.setdefault(f"{d:g}", {})[m] = static[(m, d)]
            elif (m, d) in recorded:
                data.setdefault(f"{d:g}", {})[m] = recorded[(m, d)]
    lines = []
    for d, by_method in data.items():
        present = [m for m in methods if m in by_method]
        lines += [f"\nDensity {d} (seed {seed}); per-layer fraction of weights kept:\n",
                  "| layer | weights | " + " | ".join(present) + " |",
                  "|---|---" + "|---" * len(present) + "|"]
        for layer, shape in shapes.items():
            size = int(torch.Size(shape).numel())
            lines.append(f"| {layer} | {size:,} | " + " | ".join(
                f"{by_method[m][layer]:.3f}" for m in present) + " |")
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", default="1,2,5,10,20,50,100")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--densities", default="0.5,0.2,0.1,0.05")
    parser.add_argument("--oracle-batches", type=int, default=800)
    parser.add_argument("--results", default=str(HERE / "results" / "comparison.json"),
                        help="the comparison results whose final masks are tabulated")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for seed in seeds:
        result = overlaps_for_seed(seed, clients, batches, densities, args.oracle_batches)
        rows += result["rows"]
        first = first or result

    def cell(**match: Any) -> str:
        values = [r["jaccard"] for r in rows
                  if all(r.get(k) == v for k, v in match.items())]
        if not values:
            return "—"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    text = [f"Jaccard overlap with the reference oracle mask (SNIP on the pooled data, "
            f"{args.oracle_batches} minibatches), mean ± std over seeds {args.seeds}.\n"]
    for d in densities:
        text += [f"\nDensity {d:g}: federated SSFL mask from the first n clients, b saliency "
                 "batches each (`ssfl run` uses all 100 clients and b = 1):\n",
                 "| clients n | " + " | ".join(f"b={b}" for b in batches) + " |",
                 "|---" * (len(batches) + 1) + "|"]
        for n in clients:
            text.append(f"| {n} | " + " | ".join(
                cell(mask="ssfl", density=d, clients=n, batches=b) for b in batches) + " |")
        text.append(f"\nFor scale at density {d:g}: the `snip_oracle` method's own mask "
                    f"{cell(mask='snip_oracle (method)', density=d)}, a random global mask "
                    f"{cell(mask='random', density=d)} (expected d/(2-d) = {d / (2 - d):.3f}), "
                    f"random ERK {cell(mask='random_erk', density=d)}.")

    assert first is not None
    shapes = first["shapes"]
    static = {}
    for d in densities:
        static[("snip_oracle", d)] = {
            n: float(m.float().mean())
            for n, m in global_topk_mask(first["oracle_scores"], d).items()}
        for m in ("random", "random_erk"):
            static[(m, d)] = {n: float(v.float().mean())
                              for n, v in build_mask(m, shapes, d, seed=seeds[0]).items()}
        # Each DisPFL client keeps exact ERK layer counts; a random_clientwise client a random
        # global mask (client 0's shown).
        counts = erk_counts(shapes, d)
        static[("dispfl", d)] = {n: counts[n] / shapes[n].numel() for n in shapes}
        static[("random_clientwise", d)] = {
            n: float(v.float().mean())
            for n, v in client_random_mask(shapes, d, seeds[0], 0).items()}
    layers_text, layers = per_layer_table(seeds[0], densities, Path(args.results), shapes,
                                          static)
    text.append("\n## Per-layer density of each method's mask\n\nThe final masks recorded "
                "by the comparison runs (`benchmarks/results/comparison.json`; dynamic methods: "
                "after their last mask update) where they exist; computed here for the static "
                "masks (`snip_oracle` from the reference oracle scores) and for the per-client "
                "methods (a client's own mask: DisPFL's exact ERK counts, client 0's random "
                "mask for random_clientwise).\n" + layers_text)
    (out / "mask_analysis.md").write_text("\n".join(text) + "\n")
    (out / "mask_analysis.json").write_text(json.dumps(
        {"config": str(CONFIG.relative_to(HERE.parent)), "oracle_batches": args.oracle_batches,
         "overlap": rows, "per_layer": layers}, indent=1))
    plot_overlap(rows, clients, batches, densities, out / "mask_overlap.png")
    print("\n".join(text))


def plot_overlap(rows, clients, batches, densities, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(densities), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(densities), sharey=True, squeeze=False)[0]
    for ax, d in zip(axes, densities):
        for b in batches:
            means = []
            for n in clients:
                vals = [r["jaccard"] for r in rows if r["mask"] == "ssfl"
                        and r["density"] == d and r["clients"] == n and r["batches"] == b]
                means.append(statistics.mean(vals))
            ax.plot(clients, means, marker="o", label=f"SSFL, b={b}")
        random = [r["jaccard"] for r in rows if r["mask"] == "random" and r["density"] == d]
        ax.axhline(statistics.mean(random), color="grey", ls=":", label="random mask")
        ax.set_xscale("log")
        ax.set_title(f"density {d:g}")
        ax.set_xlabel("clients whose scores are aggregated")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Jaccard overlap with the oracle mask")
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
