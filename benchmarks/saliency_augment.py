"""What scoring augmented batches (the authors' choice, ``saliency_augment = "train"``) changes
against unaugmented ones (``"off"``) on the CPU reference: the mask, then the accuracy.

    python benchmarks/saliency_augment.py mask    # the mask round only: Jaccard of the two
                                                  # masks and their per-layer densities,
                                                  # densities 0.5/0.2/0.1/0.05 x seeds 0,1,2
    python benchmarks/saliency_augment.py train   # SSFL at those densities and seeds with the
                                                  # authors' augmentation (ssfl run processes)
    python benchmarks/saliency_augment.py report  # the tables again from what exists

Setting: configs/cifar10_cpu.toml (CIFAR-10, 100 clients, balanced Dirichlet 0.3, the small CNN;
it pins ``saliency_augment = "off"``, the setting its recorded tables were measured with). The
``mask`` step builds both masks exactly as ``ssfl run`` does (``lean_mask.mask_round``: the run
loop's set-up phase, nothing trained). ``train`` runs the headline subset with
``algorithm.ssfl.saliency_augment="train"`` into --runs-dir (a finished run is reused, a killed
one resumes, one recorded in saliency_augment.json is skipped; the file is rewritten after
every run) and compares each run's final accuracy with the unaugmented run of the same
density and seed in benchmarks/results/comparison.json.

Writes results/saliency_augment.{json,md}. Run it with one thread, under nice.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comparison import CONFIG, REFERENCE_SPLIT, Job, load_summaries, recorded_runs, run_jobs  # noqa: E402,I001
from lean_mask import _mean_std, mask_round  # noqa: E402

DENSITIES = [0.5, 0.2, 0.1, 0.05]
SEEDS = [0, 1, 2]
AUGMENTED = ['algorithm.ssfl.saliency_augment="train"']
PLAIN = ['algorithm.ssfl.saliency_augment="off"']
BASE = ["run.threads=1", "run.progress=false", "algorithm.name=ssfl"]


def measure_masks(densities: Sequence[float], seeds: Sequence[int], config_path: Path,
                  rows: list[dict[str, Any]], save: Any) -> list[dict[str, Any]]:
    from ssfl.config import load_config
    from ssfl.masks import jaccard
    from ssfl.run.experiment import prepare

    done = {(r["density"], r["seed"]) for r in rows}
    for seed in seeds:
        if all((d, seed) in done for d in densities):
            continue
        exp = prepare(load_config(config_path, [*BASE, f"run.seed={seed}"]), with_test=False)
        for density in densities:
            if (density, seed) in done:
                continue
            started = time.perf_counter()
            masks, infos = {}, {}
            for name, setting in (("off", PLAIN), ("train", AUGMENTED)):
                config = load_config(config_path, [*BASE, f"run.seed={seed}",
                                                   f"algorithm.density={density}", *setting])
                run, infos[name] = mask_round(exp, config)
                masks[name] = run.algorithm.global_mask(run.state)
            row = {"density": density, "seed": seed,
                   "jaccard": jaccard(masks["off"], masks["train"]),
                   "per_layer_off": infos["off"]["per_layer"],
                   "per_layer_train": infos["train"]["per_layer"],
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            save(rows)
            print(f"seed {seed} d={density:g}: Jaccard(off, train) {row['jaccard']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    return rows


def jobs(densities: Sequence[float], seeds: Sequence[int]) -> list[Job]:
    return [Job("ssfl", d, REFERENCE_SPLIT, s) for s in seeds for d in densities]


def report(data: dict[str, Any], out: Path) -> str:
    lines = ["# Saliency on augmented batches (the authors') against unaugmented ones", "",
             "CPU reference (configs/cifar10_cpu.toml). Command: "
             "`python benchmarks/saliency_augment.py mask` (then `train`).", "",
             "### The mask", "",
             "| density | Jaccard(off, train), mean ± std over seeds | seeds | per-layer density "
             "off → train (seed 0) |", "|---|---|---|---|"]
    masks = data.get("masks", [])
    for d in sorted({r["density"] for r in masks}, reverse=True):
        rows = [r for r in masks if r["density"] == d]
        first = min(rows, key=lambda r: r["seed"])
        layers = ", ".join(f"{name} {first['per_layer_off'][name]:.3f}→"
                           f"{first['per_layer_train'][name]:.3f}"
                           for name in first["per_layer_off"])
        lines.append(f"| {d:g} | {_mean_std([r['jaccard'] for r in rows])} | "
                     f"{len(rows)} | {layers} |")
    trained = data.get("train", [])
    if trained:
        lines += ["", "### Final accuracy (SSFL, 60 rounds)", "",
                  "| density | off (recorded) % | train % | train − off, points | seeds |",
                  "|---|---|---|---|---|"]
        for d in sorted({r["density"] for r in trained}, reverse=True):
            pairs = [r for r in trained if r["density"] == d and r["off"] is not None]
            lines.append(
                f"| {d:g} | {_mean_std([r['off'] * 100 for r in pairs], 1)} | "
                f"{_mean_std([r['train'] * 100 for r in pairs], 1)} | "
                f"{_mean_std([(r['train'] - r['off']) * 100 for r in pairs], 1)} | "
                f"{len(pairs)} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "saliency_augment.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["mask", "train", "report"])
    parser.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/saliency_augment"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    path = args.out / "saliency_augment.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(rows: list[dict[str, Any]]) -> None:
        data["masks"] = rows
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")

    if args.step == "mask":
        measure_masks(densities, seeds, args.config, data.get("masks", []), save)
    if args.step == "train":
        todo = jobs(densities, seeds)
        off = recorded_runs(args.out)  # the unaugmented runs, by the same names
        done = {r["name"]: r for r in data.get("train", []) if "name" in r}

        def save_train() -> None:
            """Every augmented run finished so far, with its unaugmented twin: a fresh
            checkout skips the runs recorded here."""
            rows = {r["name"]: r for r in load_summaries(todo, args.runs_dir)}
            data["train"] = [*(r for n, r in done.items() if n not in rows), *(
                {"name": n, "density": r["target_density"], "seed": r["seed"],
                 "train": r["final_accuracy"], "off": off.get(n, {}).get("final_accuracy")}
                for n, r in rows.items())]
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")

        run_jobs(todo, args.runs_dir, args.jobs, AUGMENTED, done, args.config, save_train)
        save_train()
    print(report(data, args.out))


if __name__ == "__main__":
    main()
