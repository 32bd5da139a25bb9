"""A lean mask round (docs/lean_mask.md): what each setting of ``[algorithm.ssfl]`` saves in the
one-time score upload and how close its mask stays to the paper's, on the CPU reference.

    python benchmarks/lean_mask.py mask     # the mask round only, every setting x densities
                                            # x seeds; results/lean_mask.{json,md}
    python benchmarks/lean_mask.py report   # the tables again from the recorded rows
    python benchmarks/lean_mask.py train --settings top1-log8 --densities 0.1 --seeds 0,1,2
                                            # full training runs (ssfl run) of chosen settings

Setting: configs/cifar10_cpu.toml (CIFAR-10, 100 clients, balanced Dirichlet 0.3, the small
CNN); data from $SSFL_DATA_DIR (or data.root). ``mask`` builds each mask exactly as ``ssfl run``
does and trains nothing: the run loop's own set-up phase (``ssfl.run.loop.set_up``: SSFL's
``run_setup`` over the simulator's transport, every payload through the codec and the byte
ledger). For each setting, density and seed it records the one-time bytes from the ledger
(``score_upload``, ``mask_broadcast``), the Jaccard overlap of the mask with the paper's
(float32 scores of every client, same density and seed) and the per-layer densities.

Settings: ``dense-<dtype>`` (every score in float32 / float16 / bfloat16 / log8),
``top<m>-<dtype>`` (each client's own top ceil(m x k) scores, k the weights kept), and
``sample<f>`` (a seeded fraction f of the clients scores, float32). ``dense-float32`` is the
reference. Options: --settings a,b (default: all)  --densities 0.1,0.05  --seeds 0,1,2
--out benchmarks/results  --cache runs/lean_mask (the reference masks, for resuming).

Rows already in results/lean_mask.json are kept (the sweep resumes where it stopped). Run it
with one thread, under nice: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/lean_mask.py mask``.

``train`` launches ``ssfl run`` processes through ``benchmarks/comparison.py``'s ``run_jobs``
(one thread each, --jobs at a time, a finished run is reused), then tabulates the final
accuracy of the runs that exist into results/lean_mask_train.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comparison import CONFIG, run_jobs  # noqa: E402  (a sibling script, not a package)

DTYPES = ["float32", "float16", "bfloat16", "log8"]
MULTIPLES = [1.0, 2.0, 4.0]
FRACTIONS = [0.1, 0.2, 0.5]
REFERENCE = "dense-float32"
DENSITIES = [0.1, 0.05]
SEEDS = [0, 1, 2]
#: the goals of issue 14: one-time traffic per client at most this fraction of a dense model...
BYTES_GOAL = 0.1
#: ...and a mask this close to the paper's
JACCARD_GOAL = 0.95
#: every run of this benchmark: one thread, no progress bar
BASE = ["run.threads=1", "run.progress=false", "algorithm.name=ssfl"]


def all_settings(dtypes: Sequence[str] = DTYPES, multiples: Sequence[float] = MULTIPLES,
                 fractions: Sequence[float] = FRACTIONS) -> dict[str, list[str]]:
    """Setting name -> its ``[algorithm.ssfl]`` overrides (the reference first)."""
    grid: dict[str, list[str]] = {}
    for dtype in dtypes:
        grid[f"dense-{dtype}"] = [f'algorithm.ssfl.score_dtype="{dtype}"']
    for m in multiples:
        for dtype in dtypes:
            grid[f"top{m:g}-{dtype}"] = [f"algorithm.ssfl.score_topk={m}",
                                         f'algorithm.ssfl.score_dtype="{dtype}"']
    for f in fractions:
        grid[f"sample{f:g}"] = [f"algorithm.ssfl.score_fraction={f}"]
    return grid


SETTINGS = all_settings()


def chosen(names: str | None) -> list[str]:
    wanted = names.split(",") if names else list(SETTINGS)
    unknown = [n for n in wanted if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    return wanted


# ---- the mask round only ---------------------------------------------------------------------


def mask_round(exp: Any, config: Any) -> tuple[Any, dict[str, Any]]:
    """The run loop's set-up phase for ``config`` on the prepared ``exp`` (same seed): the
    ``Run`` after it (its state, ledger and mask info), nothing trained."""
    from ssfl.run.loop import Run, set_up
    from ssfl.run.records import RunFolder
    from ssfl.sim import InProcessTransport

    exp = copy.copy(exp)
    exp.config = config  # the same data, split and seeded model; this setting's method
    transport = InProcessTransport(exp)
    run = Run(exp, transport, transport.algorithm, RunFolder(None, []),
              client_sizes=tuple(len(p) for p in exp.parts))
    set_up(run)
    return run, run.mask_info


def dense_model_bytes(exp: Any) -> int:
    """A dense float32 payload of the whole model: the yardstick of the summary's ratios."""
    import torch

    from ssfl.comm import encode_values

    return len(encode_values(torch.cat([t.reshape(-1) for t in exp.initial.values()])))


def measure(args: argparse.Namespace) -> None:
    import numpy as np

    from ssfl.config import load_config
    from ssfl.masks import bits_to_mask, jaccard, mask_to_bits
    from ssfl.run.experiment import prepare

    names = chosen(args.settings)
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    densities = [float(d) for d in args.densities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    path = args.out / "lean_mask.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["setting"], r["density"], r["seed"]) for r in rows}
    args.cache.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        todo = [(d, n) for d in densities for n in names if (n, d, seed) not in done]
        if not todo:
            continue
        config = load_config(args.config, [*BASE, f"run.seed={seed}"])
        exp = prepare(config, with_test=False)
        dense = dense_model_bytes(exp)
        num_clients = len(exp.parts)
        for density in densities:
            if all((n, density, seed) in done for n in names):
                continue
            cached = args.cache / f"reference-d{density:g}-s{seed}.npy"
            reference = None
            if cached.exists():
                reference = bits_to_mask(np.load(cached).tobytes(), exp.prunable_shapes,
                                         exp.prunable)
            for name in [REFERENCE, *[n for n in names if n != REFERENCE]]:
                if (name, density, seed) in done and (name != REFERENCE or reference is not None):
                    continue
                started = time.perf_counter()
                config = load_config(args.config, [*BASE, f"run.seed={seed}",
                                                   f"algorithm.density={density}",
                                                   *SETTINGS[name]])
                run, info = mask_round(exp, config)
                mask = run.algorithm.global_mask(run.state)
                if name == REFERENCE:
                    reference = mask
                    np.save(cached, np.frombuffer(mask_to_bits(mask, exp.prunable),
                                                  dtype=np.uint8))
                    if (name, density, seed) in done:
                        continue
                assert reference is not None
                one_time = run.ledger.one_time()
                upload = one_time.get("score_upload", 0)
                broadcast = one_time.get("mask_broadcast", 0)
                scorers = len(run.algorithm.scoring_clients())
                row = {
                    "setting": name, "density": density, "seed": seed,
                    "overrides": SETTINGS[name],
                    "scorers": scorers, "scored": len(info["scored_clients"]),
                    "score_upload": upload, "mask_broadcast": broadcast,
                    "upload_per_scorer": upload / max(1, scorers),
                    "upload_per_client": upload / num_clients,
                    "one_time_per_client": (upload + broadcast) / num_clients,
                    "dense_model_bytes": dense,
                    "jaccard": jaccard(mask, reference),
                    "kept": info["kept"], "prunable": info["prunable"],
                    "per_layer": info["per_layer"],
                    "seconds": time.perf_counter() - started,
                }
                rows.append(row)
                done.add((name, density, seed))
                write_json(path, rows)
                ref = next(r for r in rows if (r["setting"], r["density"], r["seed"])
                           == (REFERENCE, density, seed))
                print(f"seed {seed} d={density:g} {name:>15}: upload/client "
                      f"{row['upload_per_client'] / 1e6:7.3f} MB = "
                      f"{row['upload_per_client'] / ref['upload_per_client']:.3f} x float32 "
                      f"dense, one-time {row['one_time_per_client'] / dense:.3f} x dense model, "
                      f"Jaccard {row['jaccard']:.4f} ({row['seconds']:.0f} s)", flush=True)
        del exp
    report(rows, args.out)


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"reference": REFERENCE, "config": "configs/cifar10_cpu.toml",
                               "goals": {"one_time_per_client_vs_dense_model": BYTES_GOAL,
                                         "jaccard": JACCARD_GOAL},
                               "rows": rows}, indent=1))
    tmp.replace(path)


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per (setting, density): byte ratios and Jaccard over the seeds."""
    out = []
    keys = sorted({(r["setting"], r["density"]) for r in rows},
                  key=lambda k: (-k[1], list(SETTINGS).index(k[0]) if k[0] in SETTINGS else 99))
    for setting, density in keys:
        group = [r for r in rows if r["setting"] == setting and r["density"] == density]
        refs = {r["seed"]: r for r in rows
                if r["setting"] == REFERENCE and r["density"] == density}
        upload_ratio = [r["upload_per_client"] / refs[r["seed"]]["upload_per_client"]
                        for r in group if r["seed"] in refs]
        one_time = [r["one_time_per_client"] / r["dense_model_bytes"] for r in group]
        deviation = [max(abs(v - refs[r["seed"]]["per_layer"][n])
                         for n, v in r["per_layer"].items()) for r in group if r["seed"] in refs]
        jac = [r["jaccard"] for r in group]
        out.append({
            "setting": setting, "density": density, "seeds": sorted(r["seed"] for r in group),
            "scorers": group[0]["scorers"],
            "upload_per_client_mb": statistics.mean(r["upload_per_client"] for r in group) / 1e6,
            "upload_vs_float32_dense": statistics.mean(upload_ratio) if upload_ratio else None,
            "one_time_vs_dense_model": statistics.mean(one_time),
            "jaccard_mean": statistics.mean(jac), "jaccard_min": min(jac),
            "jaccard": _mean_std(jac),
            "max_layer_density_change": max(deviation) if deviation else None,
            "meets_goals": statistics.mean(one_time) <= BYTES_GOAL and min(jac) >= JACCARD_GOAL,
        })
    return out


def report(rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    summary = summarise(rows)
    path = out / "lean_mask.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["summary"] = summary
    path.write_text(json.dumps(data, indent=1))
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "Lean mask round on the CPU reference (configs/cifar10_cpu.toml: CIFAR-10, 100 "
        "clients, the small CNN), the mask round only (nothing trained), seeds "
        f"{','.join(map(str, seeds))}. Bytes are the byte ledger's one-time `score_upload` "
        "and `mask_broadcast` (real payloads), per client (averaged over all 100 clients); "
        "\"one-time / dense model\" is (upload + mask) per client over one dense float32 "
        "payload of the whole model. Jaccard: overlap with the paper's mask (float32 scores of "
        "every client, same density and seed), mean ± std over seeds (min in the goal test). "
        "\"layer Δ\": the largest change of a layer's density against the paper's mask. "
        f"Goal: one-time ≤ {BYTES_GOAL} of a dense model and Jaccard ≥ {JACCARD_GOAL}.\n"]
    for density in sorted({s["density"] for s in summary}, reverse=True):
        lines += [f"\nDensity {density:g}:\n",
                  "| setting | scorers | upload / client (MB) | × float32 dense | "
                  "one-time / dense model | Jaccard | layer Δ | seeds | goals |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in summary:
            if s["density"] != density:
                continue
            ratio = s["upload_vs_float32_dense"]
            delta = s["max_layer_density_change"]
            lines.append(
                f"| {s['setting']} | {s['scorers']} | {s['upload_per_client_mb']:.3f} | "
                f"{'—' if ratio is None else f'{ratio:.3f}'} | "
                f"{s['one_time_vs_dense_model']:.3f} | {s['jaccard']} | "
                f"{'—' if delta is None else f'{delta:.3f}'} | {len(s['seeds'])} | "
                f"{'yes' if s['meets_goals'] else 'no'} |")
    samples = [s for s in summary if s["setting"].startswith("sample")
               or s["setting"] == REFERENCE]
    if samples:
        lines += ["\nJaccard against the number of clients that score (float32 scores; 100: the "
                  "paper's mask itself):\n", "| density | " + " | ".join(
                      f"{n} clients" for n in sorted({s['scorers'] for s in samples})) + " |",
                  "|---" * (1 + len({s['scorers'] for s in samples})) + "|"]
        for density in sorted({s["density"] for s in samples}, reverse=True):
            by = {s["scorers"]: s["jaccard"] for s in samples if s["density"] == density}
            lines.append(f"| {density:g} | " + " | ".join(
                by.get(n, "—") for n in sorted({s['scorers'] for s in samples})) + " |")
    layer_rows = [r for r in rows if r["seed"] == seeds[0]] if seeds else []
    if layer_rows:
        shown = [n for n in (REFERENCE, "dense-log8", "top1-log8", "top2-log8", "top1-float32",
                             "sample0.1") if any(r["setting"] == n for r in layer_rows)]
        for density in sorted({r["density"] for r in layer_rows}, reverse=True):
            by = {r["setting"]: r for r in layer_rows if r["density"] == density}
            present = [n for n in shown if n in by]
            if not present:
                continue
            layers = list(by[present[0]]["per_layer"])
            lines += [f"\nPer-layer density at {density:g} (seed {seeds[0]}):\n",
                      "| layer | " + " | ".join(present) + " |",
                      "|---" * (1 + len(present)) + "|"]
            for layer in layers:
                lines.append(f"| {layer} | " + " | ".join(
                    f"{by[n]['per_layer'][layer]:.4f}" for n in present) + " |")
    (out / "lean_mask.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---- full training runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class LeanJob:
    """One ``ssfl run`` of SSFL with a lean-mask setting (for ``comparison.run_jobs``)."""

    setting: str
    density: float
    seed: int

    @property
    def name(self) -> str:
        return f"ssfl-{self.setting}-d{self.density:g}-s{self.seed}"

    def overrides(self) -> list[str]:
        return ["algorithm.name=ssfl", f"algorithm.density={self.density}",
                f"run.seed={self.seed}", f'run.name="{self.name}"', *SETTINGS[self.setting]]


def recorded_runs(comparison: Path, config: Path) -> dict[tuple[str, float, int], dict]:
    """The comparison's recorded runs on the same config without overrides, by (algorithm,
    target density, seed): paper SSFL there is ``dense-float32`` here (the same ``ssfl run``),
    and the random mask is the byte baseline of the goal. Empty when the file is missing or
    was made on another setting."""
    if not comparison.exists():
        return {}
    recorded = json.loads(comparison.read_text())
    if Path(recorded["config"]).name != Path(config).name or recorded.get("overrides"):
        return {}
    return {(r["algorithm"], r["target_density"], r["seed"]): r for r in recorded["runs"]
            if r["split"] == "bdir0.3" and r.get("lr") is None}


def train_rows(runs_dir: Path, recorded: Mapping[tuple[str, float, int], Mapping[str, Any]],
               densities: Sequence[float], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every finished lean-mask run under ``runs_dir``, and the recorded paper-SSFL runs as
    ``dense-float32`` where no run of that setting exists (``source`` says which)."""
    rows = []
    for setting in SETTINGS:
        for density in densities:
            for seed in seeds:
                path = runs_dir / LeanJob(setting, density, seed).name / "summary.json"
                paper = recorded.get(("ssfl", density, seed)) if setting == REFERENCE else None
                row = {"setting": setting, "density": density, "seed": seed}
                if path.exists():
                    summary = json.loads(path.read_text())
                    row.update(source=str(path.parent.name),
                               final_accuracy=summary["final_accuracy"],
                               one_time_bytes=sum(summary["one_time_bytes"].values()),
                               total_bytes=summary["total_bytes"])
                    if paper:  # the same command as the recorded run: does it reproduce?
                        row["recorded_final_accuracy"] = paper["final_accuracy"]
                elif paper:
                    row.update(source="comparison.json", final_accuracy=paper["final_accuracy"],
                               one_time_bytes=sum(paper["one_time_bytes"].values()),
                               total_bytes=paper["total_bytes"])
                else:
                    continue
                random = recorded.get(("random", density, seed))
                row["random_mask_total_bytes"] = random["total_bytes"] if random else None
                rows.append(row)
    return rows


def train_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Final accuracy per (setting, density) against paper SSFL on the same seeds, and the
    whole run's bytes (one-time included) over the random mask's (goal: at most 1.2x)."""
    lines = ["| setting | density | final accuracy (%) | paper SSFL, same seeds (%) | "
             "difference (points) | whole run / random mask's bytes | seeds |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["setting"], r["density"]) for r in rows},
                  key=lambda k: (-k[1], list(SETTINGS).index(k[0])))
    for setting, density in keys:
        group = [r for r in rows if r["setting"] == setting and r["density"] == density]
        refs = {r["seed"]: r for r in rows
                if r["setting"] == REFERENCE and r["density"] == density}
        acc = [r["final_accuracy"] * 100 for r in group]
        paired = [r for r in group if r["seed"] in refs]
        ref = [refs[r["seed"]]["final_accuracy"] * 100 for r in paired]
        diff = [r["final_accuracy"] * 100 - refs[r["seed"]]["final_accuracy"] * 100
                for r in paired]
        ratio = [r["total_bytes"] / r["random_mask_total_bytes"] for r in group
                 if r["random_mask_total_bytes"]]
        lines.append(
            f"| {setting} | {density:g} | {_mean_std(acc, 2)} | "
            f"{_mean_std(ref, 2) if setting != REFERENCE else '—'} | "
            f"{_mean_std(diff, 2) if setting != REFERENCE else '—'} | "
            f"{statistics.mean(ratio):.2f}x | {len(group)} |" if ratio else
            f"| {setting} | {density:g} | {_mean_std(acc, 2)} | — | — | — | {len(group)} |")
    return lines


def train(args: argparse.Namespace) -> None:
    densities = [float(d) for d in args.densities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        names = chosen(args.settings or f"{REFERENCE},top1-log8")
        jobs = [LeanJob(n, d, s) for s in seeds for d in densities for n in names]
        run_jobs(jobs, args.runs_dir, args.jobs, [], None, args.config)
    # The table covers every finished run (all densities and seeds of the defaults), so that
    # runs launched by separate commands end up in one table.
    rows = train_rows(args.runs_dir, recorded_runs(args.comparison, args.config),
                      sorted(set(DENSITIES) | set(densities), reverse=True),
                      sorted(set(SEEDS) | set(seeds)))
    if not rows:
        print("no finished runs yet")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lean_mask_train.json").write_text(json.dumps({"runs": rows}, indent=1))
    lines = ["Full runs of SSFL with a lean mask round on the CPU reference "
             "(configs/cifar10_cpu.toml, 60 rounds). Paper SSFL (`dense-float32`) rows are "
             "runs of their own where they exist, else the comparison's recorded runs "
             "(benchmarks/results/comparison.json, the same command). Bytes: the run's ledger "
             "with the one-time mask round, over the random mask's run (comparison.json) "
             "on the same seed. Mean ± std over seeds.", "", *train_table(rows)]
    rerun = [r for r in rows if "recorded_final_accuracy" in r]
    if rerun:
        lines += ["", "Paper SSFL run again against its recorded run (the same command):", ""]
        lines += [f"- density {r['density']:g}, seed {r['seed']}: {r['final_accuracy']:.4f} "
                  f"(recorded {r['recorded_final_accuracy']:.4f})" for r in rerun]
    (args.out / "lean_mask_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["mask", "report", "train"])
    parser.add_argument("--settings", default=None)
    parser.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cache", type=Path, default=Path("runs/lean_mask"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--jobs", type=int, default=2, help="train: runs at a time")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/lean_mask"))
    parser.add_argument("--comparison", type=Path, default=HERE / "results" / "comparison.json",
                        help="train: the recorded comparison (paper SSFL and random-mask runs)")
    parser.add_argument("--report-only", action="store_true",
                        help="train: tabulate the finished runs, start none")
    args = parser.parse_args()
    if args.command == "mask":
        measure(args)
    elif args.command == "report":
        path = args.out / "lean_mask.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the mask sweep first")
        report(json.loads(path.read_text())["rows"], args.out)
    else:
        train(args)


if __name__ == "__main__":
    main()
