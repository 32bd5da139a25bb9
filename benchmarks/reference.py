"""CPU reference experiment: SSFL against a random static mask (and dense FedAvg) on CIFAR-10.

Setting (configs/cifar10_cpu.toml): 100 clients, 10 per round, balanced Dirichlet alpha 0.3, the
small CNN, 100 rounds of one local epoch. Every run shares the seed, so all methods see the same
partition, initial weights and client sampling.

    python benchmarks/reference.py [--densities 1,0.5,0.2,0.1,0.05] [--seeds 0] \
        [--algorithms ssfl,random] [--runs-dir runs/reference] [--out benchmarks/results]

A run whose summary.json already exists is reused, so an interrupted sweep resumes where it
stopped. Writes reference.json and reference.md (accuracy table and bytes per round) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from ssfl.config import load_config
from ssfl.report import build_figures, load_run
from ssfl.sim import run_experiment

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_cpu.toml"


def run_one(algorithm: str, density: float, seed: int, runs_dir: Path,
            extra: list[str]) -> dict[str, Any]:
    name = f"{algorithm}-d{density:g}-s{seed}"
    folder = runs_dir / name
    summary_file = folder / "summary.json"
    if not summary_file.exists():
        overrides = [f"algorithm.name={algorithm}", f"algorithm.density={density}",
                     f"run.seed={seed}", f"run.name={json.dumps(name)}", *extra]
        config = load_config(CONFIG, overrides)
        print(f"== {name}", flush=True)
        run_experiment(config, folder)
    summary = json.loads(summary_file.read_text())
    summary["name"] = name
    return summary


def table(rows: list[dict[str, Any]], densities: list[float], algorithms: list[str]) -> str:
    def cell(alg: str, d: float) -> str:
        accs = [r["final_accuracy"] * 100 for r in rows
                if r["algorithm"] == alg and abs(r["target_density"] - d) < 1e-9]
        if not accs:
            return "—"
        if len(accs) == 1:
            return f"{accs[0]:.2f}"
        return f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} (n={len(accs)})"

    lines = ["| density | " + " | ".join(algorithms) + " | MB per client and round (down+up) "
             "| ratio to dense |",
             "|---" * (len(algorithms) + 3) + "|"]
    for d in densities:
        sample = next((r for r in rows if abs(r["target_density"] - d) < 1e-9), None)
        per_round = (sample["bytes_per_round"]["down"] + sample["bytes_per_round"]["up"]) / 1e6 \
            if sample else float("nan")
        ratio = sample["ratio_to_dense"] if sample else float("nan")
        lines.append(f"| {d:g} | " + " | ".join(cell(a, d) for a in algorithms)
                     + f" | {per_round:.3f} | {ratio:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", default="1,0.5,0.2,0.1,0.05")
    parser.add_argument("--algorithms", default="ssfl,random")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--runs-dir", default="runs/reference")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    algorithms = args.algorithms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs_dir = Path(args.runs_dir)
    rows = []
    for seed in seeds:
        for density in densities:
            # At density 1 every static-mask method is dense FedAvg: run it once.
            for algorithm in (["fedavg"] if density >= 1.0 else algorithms):
                rows.append(run_one(algorithm, density, seed, runs_dir, args.overrides))
    # The dense run appears in every column at density 1.
    dense_rows = [dict(r, algorithm=a) for r in rows if r["algorithm"] == "fedavg"
                  for a in algorithms]
    shown = [r for r in rows if r["algorithm"] != "fedavg"] + dense_rows
    text = table(shown, densities, algorithms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference.json").write_text(json.dumps(
        {"config": str(CONFIG.relative_to(HERE.parent)), "overrides": args.overrides,
         "runs": rows}, indent=1))
    totals = "\n".join(
        f"| {r['name']} | {r['final_accuracy'] * 100:.2f} | "
        f"{sum(r['one_time_bytes'].values()) / 1e6:.1f} | {r['total_bytes'] / 1e6:.1f} |"
        for r in rows)
    (out / "reference.md").write_text(
        "Final global test accuracy (%) after the configured rounds:\n\n" + text
        + "\n\nPer run: accuracy (%), one-time bytes (SSFL's score upload, the mask "
        "broadcast) and all bytes of the run, in MB:\n\n"
        "| run | accuracy | one-time MB | total MB |\n|---|---|---|---|\n"
        + totals + "\n")
    # One line per run; plots are written beside the tables.
    runs = [load_run(runs_dir / r["name"]) for r in rows]
    for filename, figure in build_figures(runs).items():
        figure.savefig(out / f"reference_{filename}", dpi=110, bbox_inches="tight")
    print(text)


if __name__ == "__main__":
    main()
