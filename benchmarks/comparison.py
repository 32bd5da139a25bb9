"""The method comparison on the CPU reference setting: every method, densities, seeds, splits.

Setting (configs/cifar10_cpu.toml): CIFAR-10, 100 clients, 10 per round, the small CNN, 60 rounds
of one local epoch. Runs that share a seed share the partition, the initial weights and the
client sampling, so methods differ only in what they do.

    python benchmarks/comparison.py main     # methods x densities 0.5/0.2/0.1/0.05 x seeds
    python benchmarks/comparison.py noniid   # density 0.2 x Dirichlet 0.1/0.3/0.5/1 + 2-class
                                             # (FedAvg, SSFL, random mask, published methods)

Options: --algorithms a,b  --seeds 0,1,2  --densities ...  --splits ...  --jobs 2
--runs-dir runs/comparison  --out benchmarks/results  --report-only  --config FILE.

The same comparison at the paper's scale, on a GPU machine (each run trains on the GPU,
`run.device = "auto"`; results go to benchmarks/results/cifar10_resnet18_paper/):

    python benchmarks/comparison.py main --config configs/cifar10_resnet18_paper.toml --jobs 1

Each run is its own `ssfl run` process (one thread each; on a 2-core machine two such processes
finish more runs per hour than one with two threads). A run whose summary.json exists is reused,
so an interrupted sweep resumes where it stopped, and the two sweeps share the runs they have in
common (balanced Dirichlet 0.3 at density 0.2). Runs already recorded in the results files of
--out count as done too, so a sweep spread over several machines or checkouts goes on where the
committed results stop. Tables (mean and standard deviation over seeds,
both evaluation protocols, bytes), plots and a JSON of every run are written to --out after
every finished run, so a sweep that is stopped keeps every run it finished; an invocation for a
few methods or seeds adds its rows to those files and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ssfl.plotstyle import dataset_label, integer_ticks, log_ticks, method_style, model_label

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_cpu.toml"

METHODS = ["fedavg", "ssfl", "snip_oracle", "snip_single", "random", "random_erk",
           "random_clientwise", "feddst", "prunefl", "dispfl", "sparsyfed"]
#: the non-IID sweep's methods: SSFL against dense FedAvg, the random-mask floor and the
#: published methods; the mask ablations (oracle, single client, ERK, per-client) are the main
#: sweep's question, not the split's.
NONIID_METHODS = ["fedavg", "ssfl", "random", "feddst", "prunefl", "dispfl", "sparsyfed"]
DENSITIES = [0.5, 0.2, 0.1, 0.05]
#: the non-IID sweep's one density
NONIID_DENSITY = 0.2
SPLITS = ["bdir0.1", "bdir0.3", "bdir0.5", "bdir1", "path2"]
#: the reference split (the paper's): balanced Dirichlet alpha 0.3
REFERENCE_SPLIT = "bdir0.3"
#: not a federated method: the same saliency on the pooled data of all clients
ORACLE = "snip_oracle"
#: Methods whose learning rate is tuned rather than shared: SparsyFed trains the Powerprop
#: parameters v (w = v|v|^(beta-1)), whose gradients are scaled by beta|v|^(beta-1) < 1 for the
#: small weights of a fresh model, so the shared train.lr is not the same step for it. The
#: tuning runs (seed 0, density 0.1, these rates) pick the rate used in both sweeps; every other
#: method trains the same parameters with the same optimiser, so they share the config's rate.
TUNED = {"sparsyfed": [0.05, 0.1, 0.2]}
TUNING_DENSITY = 0.1
#: A chosen rate on the grid's edge says only that the best may lie beyond it, so while the
#: best finished rate is the grid's largest (smallest), the grid grows by a rate twice as large
#: (half as large), at most this many times per method (``tuning_grid``).
TUNING_WIDENINGS = 2
#: each sweep's results file in --out
RESULT_FILES = {"main": "comparison.json", "noniid": "noniid.json"}
#: the published sparse FL methods among the baselines (the rest are the SSFL paper's ablations:
#: random masks and SNIP on one client)
PUBLISHED = ["feddst", "prunefl", "dispfl", "sparsyfed"]
#: methods with per-client models, whose "global" figure is a consensus model (see their docs)
PERSONALISED = {"dispfl"}


@dataclass(frozen=True)
class Job:
    algorithm: str
    density: float
    split: str
    seed: int
    lr: float | None = None  # None: the config's train.lr

    @property
    def name(self) -> str:
        lr = "" if self.lr is None else f"-lr{self.lr:g}"
        return f"{self.algorithm}-d{self.density:g}-{self.split}-s{self.seed}{lr}"

    def overrides(self) -> list[str]:
        lr = [] if self.lr is None else [f"train.lr={self.lr}"]
        return [f"algorithm.name={self.algorithm}", f"algorithm.density={self.density}",
                f"run.seed={self.seed}", f'run.name="{self.name}"', *split_overrides(self.split),
                *lr]


def split_overrides(split: str) -> list[str]:
    """``bdirA``: balanced Dirichlet alpha A (the authors' split); ``pathK``: K classes each."""
    if split.startswith("bdir"):
        return ["data.partition=balanced_dirichlet", f"data.alpha={float(split[4:])}"]
    if split.startswith("path"):
        return ["data.partition=pathological", f"data.classes_per_client={int(split[4:])}"]
    raise SystemExit(f"unknown split {split!r}: use bdir<alpha> or path<classes per client>")


def split_label(split: str) -> str:
    if split.startswith("bdir"):
        return f"Dirichlet {float(split[4:]):g}"
    return f"pathological ({int(split[4:])} classes per client)"


def sweep_methods(sweep: str, requested: str | None) -> list[str]:
    """The methods a sweep runs: ``requested`` (comma-separated), else the sweep's default.
    An unknown name stops the sweep before any run starts."""
    from ssfl import algorithms

    methods = requested.split(",") if requested else (
        METHODS if sweep == "main" else NONIID_METHODS)
    unknown = [m for m in methods if m not in algorithms.names()]
    if unknown:
        raise SystemExit(f"--algorithms: unknown {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(algorithms.names())}")
    return methods


def jobs_for(sweep: str, algorithms: Sequence[str], densities: Sequence[float],
             splits: Sequence[str], seeds: Sequence[int],
             lrs: Mapping[str, float] | None = None) -> list[Job]:
    """Every method at the first seed first, then the low densities (where the goal is) at the
    other seeds, then the rest: a partly finished sweep is as useful as it can be."""
    jobs: list[Job] = []
    for seed in seeds:
        for split in (splits if sweep == "noniid" else [REFERENCE_SPLIT]):
            for density in (densities if sweep == "main" else [NONIID_DENSITY]):
                for algorithm in algorithms:
                    # Dense FedAvg has no density: one run per seed and split, shown as d=1.
                    d = 1.0 if algorithm == "fedavg" else density
                    job = Job(algorithm, d, split, seed, (lrs or {}).get(algorithm))
                    if job not in jobs:
                        jobs.append(job)
    first = seeds[0] if seeds else 0
    return sorted(jobs, key=lambda j: (j.seed != first, j.density > 0.1, j.seed))


def launch_args(job: Job, folder: Path, config: Path, extra: Sequence[str],
                continue_from: Path | None = None) -> list[str]:
    """The ``ssfl run`` arguments that make ``job`` in ``folder``: resume a folder a killed
    run left; else, with ``continue_from``, carry on that folder's finished run of the same
    job to this sweep's rounds (a copy in ``folder``: the shorter run stays as it was), where
    its method allows it (``ssfl.config.rounds_dependence``); else a fresh run."""
    fresh = [str(config), *job.overrides(), *extra, "--out", str(folder), "--overwrite"]
    if continue_from is None:
        return ["--resume", str(folder)] if (folder / "checkpoint.pt").exists() else fresh
    from ssfl.config import load_config, rounds_dependence

    planned = load_config(config, [*job.overrides(), *extra])
    more = ["--rounds", str(planned.run.rounds)]
    if (folder / "checkpoint.pt").exists():
        return ["--resume", str(folder), *more]
    shorter = continue_from / job.name
    if not (shorter / "checkpoint.pt").exists() or rounds_dependence(planned):
        return fresh
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(shorter, folder)
    # Not finished until carried on: a summary would make the sweep count it as done.
    (folder / "summary.json").unlink(missing_ok=True)
    return ["--resume", str(folder), *more]


def run_jobs(jobs: Sequence[Job], runs_dir: Path, workers: int, extra: Sequence[str],
             recorded: Mapping[str, Any] | None = None, config: Path = CONFIG,
             on_finish: Callable[[], None] | None = None,
             continue_from: Path | None = None) -> None:
    """Run the unfinished jobs, ``workers`` processes at a time, each pinned to one thread.
    A job is finished when its run folder has a summary or ``recorded`` holds its row.
    ``on_finish`` is called after each run ends (a sweep writes its results files there, so
    the runs that finished are on file however the sweep itself ends). ``continue_from``: a
    runs folder of the same sweep with fewer rounds, whose runs are carried on instead of
    started again (``launch_args``)."""
    todo = [j for j in jobs if not (runs_dir / j.name / "summary.json").exists()
            and j.name not in (recorded or {})]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done; running {len(todo)} "
          f"with {workers} worker(s)", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running: list[tuple[Job, subprocess.Popen, float]] = []
    failed: list[str] = []
    durations: list[float] = []
    while todo or running:
        while todo and len(running) < workers:
            job = todo.pop(0)
            folder = runs_dir / job.name
            folder.parent.mkdir(parents=True, exist_ok=True)
            args = launch_args(job, folder, config, extra, continue_from)
            log = (runs_dir / f"{job.name}.log").open("a")
            proc = subprocess.Popen([sys.executable, "-m", "ssfl.cli", "run", *args,
                                     "--no-progress"], stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
            running.append((job, proc, time.time()))
        time.sleep(2)
        for item in list(running):
            job, proc, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            if proc.returncode != 0:
                failed.append(job.name)
            durations.append(time.time() - started)
            print(f"{job.name}: {status} in {durations[-1]:.0f} s; {len(todo)} queued"
                  f"{time_left(durations, len(todo) + len(running), workers)}", flush=True)
            if on_finish is not None:
                on_finish()
    if failed:
        print(f"{len(failed)} run(s) failed, see their .log in {runs_dir}: {failed}")


def time_left(durations: Sequence[float], remaining: int, workers: int) -> str:
    """A rough estimate of the sweep's remaining time, from the runs finished so far."""
    if not durations or remaining <= 0:
        return ""
    minutes = statistics.mean(durations) * remaining / max(1, workers) / 60
    return (f", about {minutes:.0f} min left" if minutes < 90
            else f", about {minutes / 60:.1f} h left")


def tuned_rates(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per tuned method, the rate of the best final global accuracy (ties: the smaller rate)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        lr, acc = r["lr"], r["final_accuracy"]
        old = best.get(r["algorithm"])
        if old is None or acc > old[1] or (acc == old[1] and lr < old[0]):
            best[r["algorithm"]] = (lr, acc)
    return {a: lr for a, (lr, _) in best.items()}


def tuning_grid(base: Sequence[float], accuracy: Mapping[float, float],
                widenings: int = TUNING_WIDENINGS) -> list[float]:
    """The rates to try for a tuned method: ``base``, widened by a factor 2 past whichever edge
    holds the best result. ``accuracy``: the final accuracy of each finished rate. The grid
    grows only once every rate in it has finished, so the edge is judged on the whole grid;
    ties go to the smaller rate, as in ``tuned_rates``."""
    grid = sorted(base)
    for _ in range(widenings):
        if any(lr not in accuracy for lr in grid):
            break
        best = max(grid, key=lambda lr: (accuracy[lr], -lr))
        if best == grid[-1]:
            grid.append(grid[-1] * 2)
        elif best == grid[0]:
            grid.insert(0, grid[0] / 2)
        else:
            break
    return grid


def tuning_jobs(algorithms: Iterable[str], seed: int, runs_dir: Path,
                recorded: Mapping[str, dict[str, Any]] | None = None) -> list[Job]:
    """The tuning runs of the tuned methods among ``algorithms``, on the grid that the runs
    finished so far call for (``tuning_grid``)."""
    jobs = []
    for method in algorithms:
        if method not in TUNED:
            continue
        base = sorted(TUNED[method])
        reach = [base[-1] * 2 ** k for k in range(1, TUNING_WIDENINGS + 1)] + \
                [base[0] / 2 ** k for k in range(1, TUNING_WIDENINGS + 1)]
        job = partial(Job, method, TUNING_DENSITY, REFERENCE_SPLIT, seed)
        accuracy = {r["lr"]: r["final_accuracy"]
                    for r in load_summaries(map(job, base + reach), runs_dir, recorded)}
        jobs += [job(lr) for lr in tuning_grid(base, accuracy)]
    return jobs


def load_summaries(jobs: Iterable[Job], runs_dir: Path,
                   recorded: Mapping[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The finished runs among ``jobs``: from their run folders, else from ``recorded`` (the
    rows of an earlier results file, so a sweep continues on a fresh checkout)."""
    rows = []
    for job in jobs:
        path = runs_dir / job.name / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            mask_info = json.loads((runs_dir / job.name / "mask.json").read_text())
            metrics = [json.loads(line) for line in
                       (runs_dir / job.name / "metrics.jsonl").read_text().splitlines()]
            rows.append({"name": job.name, "split": job.split, "lr": job.lr, **summary,
                         "per_layer": mask_info.get("final", mask_info)["per_layer"],
                         "curve": [[m["round"], m["accuracy"]] for m in metrics
                                   if m["accuracy"] is not None],
                         "local_curve": [[m["round"], m["local_accuracy"]] for m in metrics
                                         if m.get("local_accuracy") is not None]})
        elif recorded and job.name in recorded:
            rows.append(dict(recorded[job.name]))
    return rows


def kept_rows(results: Path, jobs: Iterable[Job], algorithms: Iterable[str],
              tuned: Mapping[str, float] | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of a sweep's results file that this invocation does not cover, as (runs,
    tuning runs): an invocation for a few methods or seeds adds to the file instead of
    replacing what earlier invocations recorded there. A job covers the row of its method,
    density, split and seed whatever the row's rate, and a tuned method's row at another
    rate than the one chosen now (``tuned``, else the file's own tuning) is superseded: a
    widened tuning grid must not leave the old rate's runs in the tables beside the new."""
    if not results.exists():
        return [], []
    data = json.loads(results.read_text())
    methods = set(algorithms)
    cells = {(j.algorithm, j.density, j.split, j.seed) for j in jobs}
    tuning = [r for r in data.get("tuning", []) if r["algorithm"] not in methods]
    rates = {**tuned_rates(tuning), **(tuned or {})}

    def kept(r: dict[str, Any]) -> bool:
        if (r["algorithm"], r["target_density"], r["split"], r["seed"]) in cells:
            return False
        return r["algorithm"] not in rates or r.get("lr") == rates[r["algorithm"]]

    return [r for r in data.get("runs", []) if kept(r)], tuning


def recorded_runs(out: Path) -> dict[str, dict[str, Any]]:
    """Rows of the results files already in ``out``, by run name."""
    rows: dict[str, dict[str, Any]] = {}
    for name in RESULT_FILES.values():
        path = out / name
        if path.exists():
            data = json.loads(path.read_text())
            for r in data.get("runs", []) + data.get("tuning", []):
                rows[r["name"]] = r
    return rows


# ------------------------------------------------------------------------------------ tables


def _cells(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] * 100 for r in rows if r.get(key) is not None]


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _select(rows, algorithm, density=None, split=None):
    return [r for r in rows if r["algorithm"] == algorithm
            and (density is None or abs(r["target_density"] - density) < 1e-9)
            and (split is None or r["split"] == split)]


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["algorithm"] for r in rows}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def accuracy_table(rows, columns: Sequence[Any], column_key: str, key: str,
                   labels: Sequence[str]) -> str:
    lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in _methods(rows):
        cells = []
        for c in columns:
            chosen = [r for r in _select(rows, method) if
                      (r[column_key] == c if column_key == "split"
                       else abs(r["target_density"] - c) < 1e-9 or method == "fedavg")]
            cells.append(mean_std(_cells(chosen, key)))
        note = " (consensus model)" if method in PERSONALISED and key == "final_accuracy" else ""
        lines.append(f"| {method}{note} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_densities(method: str, densities: Sequence[float]) -> Sequence[float]:
    """The densities ``method`` has runs at: dense FedAvg only at 1."""
    return [1.0] if method == "fedavg" else densities


def bytes_table(rows, densities: Sequence[float]) -> str:
    lines = ["| method | density | MB per client-round (down + up) | ratio to dense | "
             "one-time MB | total MB of the run |", "|---|---|---|---|---|---|"]
    for method in _methods(rows):
        for d in method_densities(method, densities):
            chosen = _select(rows, method, d, REFERENCE_SPLIT)
            if not chosen:
                continue
            r = chosen[0]  # bytes do not depend on the seed for static masks; mean for others
            per_round = statistics.mean(
                (x["bytes_per_round"]["down"] + x["bytes_per_round"]["up"]) / 1e6 for x in chosen)
            ratio = statistics.mean(x["ratio_to_dense"] for x in chosen)
            one_time = statistics.mean(sum(x["one_time_bytes"].values()) / 1e6 for x in chosen)
            total = statistics.mean(x["total_bytes"] / 1e6 for x in chosen)
            lines.append(f"| {method} | {r['target_density']:g} | {per_round:.3f} | "
                         f"{ratio:.4f} | {one_time:.1f} | {total:.1f} |")
    return "\n".join(lines)


def best_other(rows, density: float, split: str, key: str,
               candidates: Sequence[str] | None = None) -> tuple[str, list[float]] | None:
    """The federated method other than SSFL with the best mean ``key`` at ``density`` (among
    ``candidates`` if given; dense FedAvg and the oracle never count) and its cells; None if
    no such run exists."""
    cells = {m: _cells(_select(rows, m, density, split), key) for m in _methods(rows)
             if m not in ("ssfl", "fedavg", ORACLE) and (candidates is None or m in candidates)}
    cells = {m: v for m, v in cells.items() if v}
    if not cells:
        return None
    best = max(cells, key=lambda m: statistics.mean(cells[m]))
    return best, cells[best]


def relative_error_goal(rows, densities: Sequence[float], key: str,
                        split: str = REFERENCE_SPLIT,
                        candidates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """SSFL's relative error reduction against the strongest federated sparse baseline (among
    ``candidates`` if given, else every method but SSFL, dense FedAvg and the oracle)."""
    out = []
    for d in densities:
        ssfl = _cells(_select(rows, "ssfl", d, split), key)
        strongest = best_other(rows, d, split, key, candidates)
        if not ssfl or strongest is None:
            continue
        best, best_cells = strongest
        err_ssfl = 100 - statistics.mean(ssfl)
        err_best = 100 - statistics.mean(best_cells)
        dense = _cells(_select(rows, "fedavg", 1.0, split), key)
        out.append({"density": d, "split": split, "protocol": key,
                    "ssfl": statistics.mean(ssfl),
                    "strongest_baseline": best, "baseline": statistics.mean(best_cells),
                    "relative_error_reduction": 1 - err_ssfl / err_best,
                    # What dense FedAvg itself would reduce: the room a sparse method has.
                    "dense_relative_error_reduction":
                        1 - (100 - statistics.mean(dense)) / err_best if dense else None,
                    "seeds": (len(ssfl), len(best_cells))})
    return out


#: How the tables name each evaluation protocol (the key of its final figure in a run row).
PROTOCOL_LABELS = {"final_accuracy": "global", "final_personal_accuracy": "personalised",
                   "final_local_accuracy": "authors' (local models)"}


def goal_table(goals: list[dict[str, Any]], by: str = "density") -> str:
    """One row per goal entry; the first column is its density or (``by="split"``) its split.
    Without entries (no SSFL run beside a sparse baseline yet) a line that says so."""
    if not goals:
        return "_No SSFL run beside a sparse baseline yet._"
    lines = [f"| {by} | protocol | SSFL (%) | strongest sparse baseline | its accuracy (%) | "
             "relative error reduction | dense FedAvg's reduction (the ceiling) | "
             "seeds (SSFL, baseline) |", "|---|---|---|---|---|---|---|---|"]
    for g in goals:
        protocol = PROTOCOL_LABELS[g["protocol"]]
        ceiling = g.get("dense_relative_error_reduction")
        first = f"{g['density']:g}" if by == "density" else split_label(g["split"])
        lines.append(f"| {first} | {protocol} | {g['ssfl']:.2f} | "
                     f"{g['strongest_baseline']}"
                     + (" (consensus model)" if g["strongest_baseline"] in PERSONALISED
                        and protocol == "global" else "")
                     + f" | {g['baseline']:.2f} | "
                     f"{g['relative_error_reduction'] * 100:.1f}% | "
                     + ("—" if ceiling is None else f"{ceiling * 100:.1f}%")
                     + f" | {g['seeds'][0]}, {g['seeds'][1]} |")
    return "\n".join(lines)


#: The SSFL paper's CIFAR-10 figures (ResNet-18 with GroupNorm, 100 clients, 10 per round,
#: balanced Dirichlet 0.3, density 0.5; accuracy in %): what the deep reference is held against.
PAPER_DENSITY = 0.5
PAPER_ACCURACY = {"ssfl": 88.3, "fedavg": 86.0, "dispfl": 85.1, "sparsyfed": 80.9}


def verdict(diff: float, spread: float, seeds: int = 2) -> str:
    """How a measured lead (SSFL minus the other, points) reads against the seeds' spread
    (the two standard deviations combined); ``seeds``, the fewer seeds of the two sides, under
    2 says there is no spread to read it against yet."""
    if seeds < 2:
        return f"SSFL {'ahead' if diff > 0 else 'behind'} on one seed (no spread yet)"
    if abs(diff) <= spread:
        return f"within seed noise ({diff:+.2f} ± {spread:.2f})"
    return "holds" if diff > 0 else "reversed"


#: The protocols each paper claim is held to, as (label, final figure, curve): the paper's figures
#: come from the authors' code, which scores each client's last local model on its own test
#: split; the global model on the central test set is the other reading. A personalised method
#: (DisPFL: each client keeps its own model) has no global model, so its second reading is its
#: clients' own models on their classes against SSFL's global model on the same splits.
CLAIM_PROTOCOLS = {
    "global": ("final_accuracy", "curve"),
    "personalised": ("final_personal_accuracy", None),
    "authors'": ("final_local_accuracy", "local_curve"),
}


def claim_protocols(method: str) -> list[str]:
    return ["personalised" if method in PERSONALISED else "global", "authors'"]


def on_shared_seeds(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Both sides' runs on the seeds both have, and a note naming those seeds when either side
    has others: a claim compares like with like (a seed fixes the partition, the initial
    weights and the client sampling), so one side's extra seed does not move the lead before
    the other side has run it too."""
    shared = {r["seed"] for r in ours} & {r["seed"] for r in theirs}
    ours_paired = [r for r in ours if r["seed"] in shared]
    theirs_paired = [r for r in theirs if r["seed"] in shared]
    if len(ours_paired) == len(ours) and len(theirs_paired) == len(theirs):
        return ours_paired, theirs_paired, ""
    which = "the one" if len(shared) == 1 else "those"
    return ours_paired, theirs_paired, f"; {seeds_phrase(shared)}, {which} both have"


def seeds_phrase(seeds: Iterable[int]) -> str:
    """'seed 0' or 'seeds 0, 1': how the tables name a set of seeds."""
    seeds = sorted(seeds)
    return f"seed{'s' if len(seeds) > 1 else ''} " + ", ".join(map(str, seeds))


def paper_claims(rows, split: str = REFERENCE_SPLIT) -> list[dict[str, Any]]:
    """The paper's claims at its density, point by point, against the runs in ``rows``: SSFL
    against dense FedAvg and each published method it reports, then SSFL's relative error
    reduction against the strongest of them; each on the protocols of ``claim_protocols``, and
    each pair of methods on the seeds both have. One entry per claim and protocol whose runs
    exist."""
    d = PAPER_DENSITY

    def sd(values: Sequence[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def runs(method: str) -> list[dict[str, Any]]:
        return _select(rows, method, 1.0 if method == "fedavg" else d, split)

    ssfl_runs = runs("ssfl")
    if not _cells(ssfl_runs, "final_accuracy"):
        return []

    paired = {m: on_shared_seeds(ssfl_runs, runs(m)) for m in PAPER_ACCURACY if m != "ssfl"}
    claims = []
    for other in paired:
        ssfl_paired, other_paired, seeds_note = paired[other]
        for protocol in claim_protocols(other):
            key, curve = CLAIM_PROTOCOLS[protocol]
            ours, theirs = _cells(ssfl_paired, key), _cells(other_paired, key)
            if not theirs or not ours:
                continue
            diff = statistics.mean(ours) - statistics.mean(theirs)
            spread = math.hypot(sd(ours), sd(theirs))
            claims.append({
                "claim": f"SSFL above {LABELS[other]}"
                         + (" at density 0.5" if other == "fedavg" else ""),
                "protocol": protocol,
                "paper": f"{PAPER_ACCURACY['ssfl']:.1f} vs {PAPER_ACCURACY[other]:.1f} "
                         f"({PAPER_ACCURACY['ssfl'] - PAPER_ACCURACY[other]:+.1f})",
                "ours": f"{mean_std(ours)} vs {mean_std(theirs)} ({diff:+.2f}{seeds_note})",
                "verdict": verdict(diff, spread, min(len(ours), len(theirs))), "diff": diff,
                "spread": spread,
                "ahead": evaluations_ahead(ssfl_paired, other_paired, curve) if curve else None})
    published = [m for m in PAPER_ACCURACY if m not in ("ssfl", "fedavg")]
    best = max(published, key=PAPER_ACCURACY.__getitem__)
    paper = 1 - (100 - PAPER_ACCURACY["ssfl"]) / (100 - PAPER_ACCURACY[best])
    for protocol in ("global", "authors'"):
        # Each published method on its own reading of the protocol (as in its claim above:
        # DisPFL's own models where the global one is asked for), SSFL on the same one.
        errors = {}
        for m in published:
            name = claim_protocols(m)[0] if protocol == "global" else protocol
            key = CLAIM_PROTOCOLS[name][0]
            ssfl_paired, other_paired, _ = paired[m]
            ours_m, theirs_m = _cells(ssfl_paired, key), _cells(other_paired, key)
            if ours_m and theirs_m:
                errors[m] = (100 - statistics.mean(ours_m), 100 - statistics.mean(theirs_m),
                             min(len(ours_m), len(theirs_m)))
        if not errors:
            continue
        strongest = min(errors, key=lambda m: errors[m][1])
        ours = 1 - errors[strongest][0] / errors[strongest][1]
        claims.append({
            "claim": "SSFL's relative error reduction against the strongest published sparse "
                     "method",
            "protocol": "global (DisPFL: personalised)" if protocol == "global" else protocol,
            "paper": f"{paper * 100:.1f}% (against {LABELS[best]})",
            "ours": f"{ours * 100:.1f}% (against {LABELS[strongest]})",
            "verdict": ("holds" if ours >= paper else (
                "smaller: SSFL leads by less" if ours > 0 else "reversed"))
            + ("" if errors[strongest][2] > 1 else " (one seed so far)"),
            "diff": ours - paper, "spread": 0.0, "ahead": None})
    return claims


def is_paper_setting(config: Path) -> bool:
    """The paper's comparison: CIFAR-10 with a ResNet-18 (at any width)."""
    with open(config, "rb") as f:
        table = tomllib.load(f)
    return (table.get("data", {}).get("dataset") == "cifar10"
            and table.get("model", {}).get("name") == "resnet18")


def third_seed_cells(rows, densities: Sequence[float],
                     split: str = REFERENCE_SPLIT) -> list[dict[str, Any]]:
    """Where the seeds so far do not settle the question (issue 16 asks for a third seed
    there): per density, SSFL against the best other federated method (dense FedAvg and the
    oracle left out), when their gap is under two of their combined standard deviations, or
    either has fewer than two seeds. Each entry names the two methods, the gap, the seeds so
    far (``spread`` None where a method has one seed: no spread to hold the gap against yet)
    and the options that run next: the seeds one of them lacks, else the next seed for both."""
    out = []
    for d in densities:
        ssfl = _cells(_select(rows, "ssfl", d, split), "final_accuracy")
        strongest = best_other(rows, d, split, "final_accuracy")
        if not ssfl or strongest is None:
            continue
        best, best_cells = strongest
        gap = statistics.mean(ssfl) - statistics.mean(best_cells)
        few = min(len(ssfl), len(best_cells)) < 2
        spread = None if few else math.hypot(statistics.stdev(ssfl), statistics.stdev(best_cells))
        if spread is None or abs(gap) < 2 * spread:
            have = {m: {r["seed"] for r in _select(rows, m, d, split)} for m in ("ssfl", best)}
            seeds = sorted(have["ssfl"] | have[best])
            lacking = [m for m in ("ssfl", best) if have[m] != set(seeds)]
            if lacking:  # the same seeds for both first: a comparison pairs them
                missing = sorted(set(seeds) - set.intersection(*(have[m] for m in lacking)))
                command = (f"--algorithms {','.join(lacking)} --densities {d:g} --seeds "
                           + ",".join(map(str, missing)))
            else:
                command = f"--algorithms ssfl,{best} --densities {d:g} --seeds {seeds[-1] + 1}"
            out.append({"density": d, "best_other": best, "gap": gap, "spread": spread,
                        "seeds": seeds, "seeds_each": {m: sorted(have[m]) for m in have},
                        "command": command})
    return out


def _third_seed_basis(cell: Mapping[str, Any]) -> str:
    """What a third-seed entry's gap stands on: the spread it is held against, or, while a
    method has one seed, which seeds each has (no spread to hold it against yet)."""
    if cell["spread"] is not None:
        return f"spread {cell['spread']:.2f}, seeds {', '.join(map(str, cell['seeds']))}"
    return "; ".join(f"{LABELS.get(m, m)} {seeds_phrase(seeds)}"
                     for m, seeds in cell["seeds_each"].items()) + ": too few seeds for a spread"


#: methods whose mask changes during training: their mask.json's last mask is shown
EVOLVING_MASKS = {"feddst", "prunefl", "dispfl", "sparsyfed"}


def first_per_layer(rows, method: str, density: float,
                    split: str | None = REFERENCE_SPLIT) -> dict[str, float] | None:
    """``method``'s density per layer at ``density`` on its first seed that recorded one."""
    first = min((r for r in _select(rows, method, density, split) if r.get("per_layer")),
                key=lambda r: r["seed"], default=None)
    return first["per_layer"] if first else None


def mask_layer_table(rows, density: float, split: str = REFERENCE_SPLIT) -> str:
    """Each sparse method's density per layer at ``density`` on its first seed (the final mask
    for the methods whose mask evolves): where a mask puts its weights, the first thing to look
    at when one mask trains worse than another. Empty without two such methods."""
    methods = [m for m in _methods(rows) if m != "fedavg"
               and any(r.get("per_layer") for r in _select(rows, m, density, split))]
    if len(methods) < 2:
        return ""
    first = {m: first_per_layer(rows, m, density, split) for m in methods}
    layers = list(first[methods[0]])
    def header(m: str) -> str:
        # A personalised method has one mask per client; its run records their union.
        if m in PERSONALISED:
            return f"{m} (final, union of its clients' masks)"
        return m + (" (final)" if m in EVOLVING_MASKS else "")

    lines = ["| layer | " + " | ".join(map(header, methods)) + " |",
             "|---|" + "---|" * len(methods)]
    lines += [f"| {layer} | " + " | ".join(f"{first[m].get(layer, float('nan')):.3f}"
                                          for m in methods) + " |" for layer in layers]
    return "\n".join(lines)


def evaluations_ahead(ours, theirs, curve: str = "curve") -> tuple[int, int] | None:
    """At how many evaluations SSFL's accuracy (``curve``: the global one, or ``local_curve``
    for the authors' protocol) is above the other method's, pairing runs of the same seed
    (same partition, initial weights and client sampling) round by round: (ahead,
    evaluations compared); None without a shared seed and round."""
    theirs_by_seed = {r["seed"]: dict(map(tuple, r.get(curve) or [])) for r in theirs}
    pairs = [(acc, theirs_by_seed[r["seed"]][rnd]) for r in ours if r["seed"] in theirs_by_seed
             for rnd, acc in (r.get(curve) or []) if rnd in theirs_by_seed[r["seed"]]]
    return (sum(a > b for a, b in pairs), len(pairs)) if pairs else None


def claims_table(claims: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| the paper's claim (CIFAR-10, ResNet-18, density 0.5) | protocol | paper (%) | "
             "ours (%, mean ± std over seeds) | SSFL ahead at (evaluations, paired by seed) | "
             "verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c.get('protocol', 'global')} | {c['paper']} | {c['ours']} | "
              + (f"{c['ahead'][0]} of {c['ahead'][1]}" if c.get("ahead") else "—")
              + f" | {c['verdict']} |" for c in claims]
    return "\n".join(lines)


#: How the README names each method in its headline sentence.
LABELS = {"ssfl": "SSFL", "fedavg": "dense FedAvg",
          "snip_oracle": "the oracle mask (not federated)",
          "snip_single": "SNIP on one client", "random": "random mask", "random_erk": "random ERK",
          "random_clientwise": "per-client random masks", "feddst": "FedDST",
          "prunefl": "PruneFL", "dispfl": "DisPFL", "sparsyfed": "SparsyFed"}


def readme_headline(rows, densities: Sequence[float] = DENSITIES, focus: float = 0.1) -> str:
    """The README's summary of the main sweep, from the run rows: every method's final global
    accuracy at ``focus`` (with its bytes per round where they differ from SSFL's), the leaders
    at the other densities, and DisPFL's personalised figure."""
    def acc(method: str, d: float, key: str = "final_accuracy") -> tuple[float, int] | None:
        cells = _cells(_select(rows, method, d, REFERENCE_SPLIT), key)
        return (statistics.mean(cells), len(cells)) if cells else None

    def ratio(method: str, d: float) -> float:
        return statistics.mean(r["ratio_to_dense"]
                               for r in _select(rows, method, d, REFERENCE_SPLIT))

    ssfl = acc("ssfl", focus)
    if ssfl is None:
        return f"_No SSFL run at density {focus:g} yet._"
    cells = [acc(m, 1.0 if m == "fedavg" else focus) for m in _methods(rows)]
    seeds = sorted({c[1] for c in cells if c})
    seed_text = (f"mean over {seeds[0]} seed{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1
                 else f"mean over the {seeds[0]} to {seeds[-1]} seeds each method has so far")
    others = sorted((m for m in _methods(rows) if m not in ("ssfl", "fedavg", "dispfl")
                     and acc(m, focus)), key=lambda m: -acc(m, focus)[0])
    parts = []
    for m in others:
        text = f"{LABELS.get(m, m)} {acc(m, focus)[0]:.1f}"
        if abs(ratio(m, focus) - ratio("ssfl", focus)) > 0.005:
            text += f" ({ratio(m, focus):.3f} of dense bytes)"
        parts.append(text)
    sentence = (f"Final global accuracy at density {focus:g} ({seed_text}): SSFL "
                f"{ssfl[0]:.1f}% with {ratio('ssfl', focus):.3f} of dense FedAvg's bytes per "
                "round; " + ", ".join(parts))
    dense = acc("fedavg", 1.0)
    if dense:
        sentence += f"; dense FedAvg {dense[0]:.1f}"
    leaders = []
    for d in densities:
        if d == focus or acc("ssfl", d) is None:
            continue
        best = sorted((m for m in others if m != ORACLE and acc(m, d)),
                      key=lambda m: -acc(m, d)[0])[:2]
        leaders.append(f"at {d:g}: SSFL {acc('ssfl', d)[0]:.1f}, " + ", ".join(
            f"{LABELS.get(m, m)} {acc(m, d)[0]:.1f}" for m in best))
    if leaders:
        sentence += " (" + "; ".join(leaders) + ")"
    sentence += "."
    personal = acc("dispfl", focus, "final_personal_accuracy")
    if personal:
        sentence += (f" On each client's own test split DisPFL's personalised models reach "
                     f"{personal[0]:.1f}% at {focus:g} (at {ratio('dispfl', focus):.2f} of dense "
                     "bytes: ten neighbour models per round).")
    return sentence


# ------------------------------------------------------------------------------------- plots


def _figure(width: float = 9.0, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig, ax, path: Path, *, xlabel: str, title: str, subtitle: str = "",
            ncol: int = 1, grid_axis: str = "both", legend_below: bool = False,
            ylabel: str = "final global test accuracy (%)") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.suptitle(title)
    if subtitle:
        ax.set_title(subtitle, fontsize="medium", color="0.25")
    if legend_below:  # bars reach the bottom of the axes: no room inside
        fig.legend(fontsize=8, ncols=ncol, loc="outside lower center", frameon=False)
    else:  # beside the axes: it never hides a curve
        ax.legend(fontsize=8, ncols=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    ax.grid(alpha=0.3, axis=grid_axis)
    fig.savefig(path, dpi=110)


def method_label(method: str) -> str:
    """A method's legend entry: its name in `ssfl.plotstyle`, with what sets it apart."""
    label = method_style(method).label
    if method == "fedavg":
        return f"{label} (dense)"
    return f"{label} (not federated)" if method == ORACLE else label


def setting_title(config: Path = CONFIG, extra: Sequence[str] = ()) -> str:
    """The data set and model of the sweep's config, for figure titles: "CIFAR-10, small CNN,
    100 clients (10 per round), CPU reference"."""
    from ssfl.config import load_config

    try:
        loaded = load_config(config, extra)
    except Exception:  # a title is no reason to stop a report
        return config.stem
    text = (f"{dataset_label(loaded.data.dataset)}, {model_label(loaded.model.name)}, "
            f"{loaded.federation.num_clients} clients ({loaded.federation.clients_per_round} per "
            f"round), {loaded.run.rounds} rounds")
    return text + (", CPU reference" if config.resolve() == CONFIG.resolve() else
                   f" ({config.stem})")


def plot_accuracy_vs_density(rows, densities, path: Path,
                             setting: str = "CIFAR-10 CPU reference") -> None:
    fig, ax = _figure()
    for method in _methods(rows):
        style = method_style(method)
        if method == "fedavg":
            accs = _cells(_select(rows, "fedavg", 1.0, REFERENCE_SPLIT), "final_accuracy")
            if accs:
                ax.axhline(statistics.mean(accs), color=style.color, ls=style.linestyle, lw=1.2,
                           label=method_label(method))
            continue
        xs, ys, es = [], [], []
        for d in densities:
            accs = _cells(_select(rows, method, d, REFERENCE_SPLIT), "final_accuracy")
            if accs:
                xs.append(d)
                ys.append(statistics.mean(accs))
                es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, color=style.color, marker=style.marker, markersize=6,
                        ls=style.linestyle, lw=1.5, capsize=3, label=method_label(method))
    ax.set_xscale("log")
    log_ticks(ax.xaxis, min(densities), max(densities), ticks=list(densities))
    _finish(fig, ax, path, xlabel="density (fraction of Conv/Linear weights kept, log scale)",
            title="Final global accuracy against density (mean ± std over seeds)",
            subtitle=setting)


def plot_accuracy_vs_bytes(rows, densities, path: Path,
                           setting: str = "CIFAR-10 CPU reference") -> None:
    fig, ax = _figure()
    xs_all: list[float] = []
    for method in _methods(rows):
        style = method_style(method)
        xs, ys, es = [], [], []
        for d in method_densities(method, densities):
            chosen = _select(rows, method, d, REFERENCE_SPLIT)
            if chosen:
                accs = _cells(chosen, "final_accuracy")
                xs.append(statistics.mean(r["total_bytes"] / 1e6 for r in chosen))
                ys.append(statistics.mean(accs))
                es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, color=style.color, marker=style.marker, markersize=6,
                        ls=style.linestyle if len(xs) > 1 else "", lw=1.5, capsize=3,
                        label=method_label(method))
            xs_all += xs
    ax.set_xscale("log")
    if xs_all:
        log_ticks(ax.xaxis, min(xs_all), max(xs_all))
    _finish(fig, ax, path,
            xlabel="all bytes of the run, down + up incl. one-time costs (MB, log scale)",
            title="Final global accuracy against communication (one point per density; "
                  "mean ± std over seeds)", subtitle=setting)


def curve_stats(rows, curve: str = "curve") -> list[tuple[int, float, float]]:
    """Accuracy (%) at each evaluated round (``curve``: the global one, or ``local_curve``, the
    authors' protocol): mean and standard deviation (0 for one run) over the rows that have
    that curve."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        for rnd, acc in r.get(curve) or []:
            by_round.setdefault(rnd, []).append(acc * 100)
    return [(rnd, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for rnd, v in sorted(by_round.items())]


def mean_curve(rows) -> list[tuple[int, float]]:
    """Global accuracy (%) at each evaluated round, mean over the rows that have a curve."""
    return [(rnd, mean) for rnd, mean, _ in curve_stats(rows)]


def last_step_noise(rows) -> float | None:
    """Mean absolute change of a run's global accuracy (points) between its last two
    evaluations: how much the final figure moves with the last rounds' client sample."""
    steps = [abs(r["curve"][-1][1] - r["curve"][-2][1]) * 100 for r in rows
             if len(r.get("curve") or []) >= 2]
    return statistics.mean(steps) if steps else None


def late_gain(rows) -> float | None:
    """How much the mean curve still climbs over the last fifth of the run (points): the mean
    accuracy at the last evaluation minus that at the last evaluation at or before 80% of the
    last round. Under 1 point counts as settled (issue 16's test for dense FedAvg); None
    without an evaluation at or before that round."""
    stretch = last_fifth(rows)
    return stretch[-1][1] - stretch[0][1] if stretch else None


def last_fifth(rows) -> list[tuple[int, float]] | None:
    """The mean curve from its last evaluation at or before 80% of the last round to the end,
    the stretch ``late_gain`` and ``late_trend`` read; None without two evaluations or one at
    or before that round."""
    curve = mean_curve(rows)
    if len(curve) < 2:
        return None
    starts = [i for i, (rnd, _) in enumerate(curve) if rnd <= 0.8 * curve[-1][0]]
    return curve[starts[-1]:] if starts else None


def late_trend(rows) -> float | None:
    """The climb over the last fifth read from every evaluation in it, not just its two ends:
    the least-squares slope of the mean curve from the last evaluation at or before 80% of the
    last round to the last one, times the rounds between them (points). A curve that moves a
    point or two between evaluations makes ``late_gain`` depend on which two it lands on; the
    trend does not. None with fewer than two evaluations in that stretch."""
    stretch = last_fifth(rows)
    if stretch is None:
        return None
    x_mean = statistics.mean(r for r, _ in stretch)
    y_mean = statistics.mean(a for _, a in stretch)
    slope = (sum((r - x_mean) * (a - y_mean) for r, a in stretch)
             / sum((r - x_mean) ** 2 for r, _ in stretch))
    return slope * (stretch[-1][0] - stretch[0][0])


def settling_table(rows, densities: Sequence[float]) -> str:
    """Per method and density, the late gain of the mean curve (global accuracy) and its
    least-squares trend over the same stretch."""
    lines = ["| method | density | gain over the last fifth (points) | least-squares trend over "
             "the last fifth (points) | settled (gain < 1 point) |", "|---|---|---|---|---|"]
    for m in _methods(rows):
        for d in method_densities(m, densities):
            chosen = _select(rows, m, d, REFERENCE_SPLIT)
            gain, trend = late_gain(chosen), late_trend(chosen)
            if gain is not None:
                lines.append(f"| {m} | {d:g} | {gain:+.2f} | {trend:+.2f} | "
                             f"{'yes' if gain < 1 else 'no'} |")
    return "\n".join(lines)


def leading_spread(rows, densities: Sequence[float], n: int = 3) -> float | None:
    """The largest, over densities, gap (points) between the best and the n-th best method's
    mean final global accuracy (dense FedAvg left out)."""
    gaps = []
    for d in densities:
        means = sorted((statistics.mean(c) for m in _methods(rows) if m != "fedavg"
                        for c in [_cells(_select(rows, m, d, REFERENCE_SPLIT),
                                         "final_accuracy")] if c), reverse=True)
        if len(means) >= n:
            gaps.append(means[0] - means[n - 1])
    return max(gaps) if gaps else None


def seed_spread(rows, densities: Sequence[float]) -> dict[str, float]:
    """Per method, the seed-to-seed standard deviation of the final global accuracy (points),
    averaged over the densities where it has at least two seeds."""
    out = {}
    for m in _methods(rows):
        cells = [_cells(_select(rows, m, d, REFERENCE_SPLIT), "final_accuracy")
                 for d in method_densities(m, densities)]
        stds = [statistics.stdev(c) for c in cells if len(c) >= 2]
        if stds:
            out[m] = statistics.mean(stds)
    return out


def spread_table(spread: Mapping[str, float], rows, densities: Sequence[float]) -> str:
    lines = ["| method | std over seeds (points) | densities with 2+ seeds |", "|---|---|---|"]
    for m, v in sorted(spread.items(), key=lambda kv: kv[1]):
        ds = [f"{d:g}" for d in method_densities(m, densities)
              if len(_select(rows, m, d, REFERENCE_SPLIT)) >= 2]
        lines.append(f"| {m} | {v:.2f} | {', '.join(ds)} |")
    return "\n".join(lines)


#: The curves the accuracy-against-rounds plot can draw: (row key, y label, title's protocol).
ROUND_CURVES = {
    "global": ("curve", "global test accuracy (%)", "Global accuracy"),
    "authors'": ("local_curve", "accuracy of each client's last local model on its own split "
                 "(%)", "Accuracy on the authors' protocol"),
}


def plot_accuracy_vs_round(rows, density: float, path: Path,
                           setting: str = "CIFAR-10 CPU reference",
                           protocol: str = "global") -> None:
    key, ylabel, name = ROUND_CURVES[protocol]
    fig, ax = _figure()
    for method in _methods(rows):
        style = method_style(method)
        d = 1.0 if method == "fedavg" else density
        chosen = _select(rows, method, d, REFERENCE_SPLIT)
        curve = curve_stats(chosen, key)
        if curve:
            rounds = [c[0] for c in curve]
            means = [c[1] for c in curve]
            ax.plot(rounds, means, color=style.color, marker=style.marker, markersize=5,
                    ls=style.linestyle, lw=1.5, label=method_label(method))
            if len(chosen) > 1:
                ax.fill_between(rounds, [m - c[2] for m, c in zip(means, curve)],
                                [m + c[2] for m, c in zip(means, curve)], color=style.color,
                                alpha=0.15, linewidth=0)
    integer_ticks(ax.xaxis)
    _finish(fig, ax, path, xlabel="round", ylabel=ylabel,
            title=f"{name} during training at density {density:g} "
                  "(mean ± std over seeds)", subtitle=setting)


def plot_noniid(rows, splits, path: Path, setting: str = "CIFAR-10 CPU reference") -> None:
    fig, ax = _figure(height=5.2)
    methods = _methods(rows)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        means, errs = [], []
        for s in splits:
            accs = _cells(_select(rows, method, None, s), "final_accuracy")
            means.append(statistics.mean(accs) if accs else math.nan)
            errs.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        ax.bar([j + i * width for j in range(len(splits))], means, width, yerr=errs,
               capsize=2, color=method_style(method).color, edgecolor="0.15", linewidth=0.4,
               error_kw={"elinewidth": 0.8}, label=method_label(method))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))],
                  [split_label(s).replace(" (", "\n(") for s in splits], fontsize=8)
    _finish(fig, ax, path, xlabel="split", ncol=len(methods), grid_axis="y", legend_below=True,
            title=f"Non-IID sweep at density {NONIID_DENSITY:g} (dense FedAvg at density 1; "
                  "mean ± std over seeds)", subtitle=setting)


# -------------------------------------------------------------------------------------- main


def tuning_text(tuning_rows, tuned: Mapping[str, float],
                pending: Sequence[Job] = ()) -> str:
    """The tuning table; ``pending``: rates the grid calls for that have not run yet (a best
    rate so far on the grid's edge), listed so the chosen rate reads as provisional."""
    if not tuning_rows:
        return ""
    lines = [f"\nLearning rate of the tuned methods (seed {tuning_rows[0]['seed']}, density "
             f"{TUNING_DENSITY:g}, final global accuracy %; the best rate is used above, every "
             "other method uses the config's train.lr; a best rate on the grid's edge widens "
             f"the grid by a factor 2, at most {TUNING_WIDENINGS} times):\n",
             "| method | lr | accuracy |", "|---|---|---|"]
    for r in tuning_rows:
        mark = " (chosen)" if tuned.get(r["algorithm"]) == r["lr"] else ""
        lines.append(f"| {r['algorithm']} | {r['lr']:g}{mark} | "
                     f"{r['final_accuracy'] * 100:.2f} |")
    lines += [f"| {j.algorithm} | {j.lr:g} | not run yet (the best rate so far is on the "
              "grid's edge) |" for j in pending]
    return "\n".join(lines) + "\n"


def report(sweep: str, rows, densities, splits, out: Path, extra: Sequence[str],
           tuning_rows=(), tuned: Mapping[str, float] | None = None,
           config: Path = CONFIG, pending_tuning: Sequence[Job] = ()) -> str:
    out.mkdir(parents=True, exist_ok=True)
    keep = ("name", "algorithm", "split", "seed", "lr", "target_density", "density",
            "final_accuracy", "final_personal_accuracy", "final_local_accuracy",
            "best_accuracy", "bytes_per_round", "ratio_to_dense", "one_time_bytes",
            "total_bytes", "wall_seconds", "rounds", "per_layer", "curve", "local_curve")
    shown = config.resolve()
    shown = shown.relative_to(HERE.parent) if shown.is_relative_to(HERE.parent) else shown
    data: dict[str, Any] = {"config": str(shown), "overrides": extra,
                            "runs": [{k: r.get(k) for k in keep} for r in rows],
                            "tuning": [{k: r.get(k) for k in keep} for r in tuning_rows],
                            "tuned_lr": dict(tuned or {})}
    dlabels = [f"d={d:g}" for d in densities]
    if sweep == "main":
        has_local = any(r.get("final_local_accuracy") is not None for r in rows)
        goals = (relative_error_goal(rows, densities, "final_accuracy")
                 + relative_error_goal(rows, densities, "final_personal_accuracy")
                 + relative_error_goal(rows, densities, "final_local_accuracy"))
        data["goal"] = goals
        data["seed_spread"] = seed_spread(rows, densities)
        data["goal_published"] = relative_error_goal(rows, densities, "final_accuracy",
                                                     candidates=PUBLISHED)
        text = (
            "Final **global** accuracy (%), central test set, mean ± std over seeds "
            "(dense FedAvg has no density; its figure is repeated in every column):\n\n"
            + accuracy_table(rows, densities, "density", "final_accuracy", dlabels)
            + "\n\nFinal **personalised** accuracy (%): the global model (DisPFL: each "
            "client's own model) on a test split that follows each client's training class "
            "distribution (`personal_accuracy`), mean over the 100 clients, then mean ± std "
            "over seeds:\n\n"
            + accuracy_table(rows, densities, "density", "final_personal_accuracy", dlabels)
            + ("\n\nFinal accuracy on the **authors' protocol** (%): each client's last local "
               "model, right after its local training, on that client's own test split "
               "(`local_accuracy`), mean over the clients trained so far, then mean ± std over "
               "seeds; the protocol of the paper's figures:\n\n"
               + accuracy_table(rows, densities, "density", "final_local_accuracy", dlabels)
               if has_local else "")
            + "\n\nCommunication, counted from the serialised payloads (mean over seeds):\n\n"
            + bytes_table(rows, densities)
            + "\n\nSSFL against the strongest federated sparse baseline at each density "
            "(relative error reduction = 1 - error(SSFL) / error(baseline); the oracle mask is "
            "not federated and is left out):\n\n" + goal_table(goals) + "\n"
            + "\nThe same against the published sparse FL methods alone ("
            + ", ".join(PUBLISHED) + "; the others are the SSFL paper's ablations), global "
            "protocol:\n\n"
            + goal_table(data["goal_published"]) + "\n"
            + ("\nHow much a method's final global accuracy varies from seed to seed (seeds "
               "change the partition, the initial weights and the client sampling; standard "
               "deviation, mean over the densities with two or more seeds; from so few seeds, a "
               "rough estimate):\n\n"
               + spread_table(data["seed_spread"], rows, densities) + "\n"
               if data["seed_spread"] else "")
            + "\nHas each curve settled? The mean global accuracy at the last evaluation "
            "minus that at the last evaluation at or before 80% of the rounds (issue 16 asks "
            "dense FedAvg for under 1 point), and the same climb read as the least-squares "
            "trend through every evaluation of that stretch (steadier where the curve moves "
            "between evaluations):\n\n" + settling_table(rows, densities) + "\n"
            + tuning_text(tuning_rows, tuned or {}, pending_tuning))
        third = third_seed_cells(rows, densities)
        data["third_seed"] = third
        if third:
            text += ("\nWhere the seeds so far do not settle SSFL against the best other method "
                     "(a gap under two combined standard deviations): the next seed is the "
                     "same command with these options:\n\n" + "\n".join(
                         f"- density {t['density']:g}: SSFL {t['gap']:+.2f} points against "
                         f"{LABELS.get(t['best_other'], t['best_other'])} "
                         f"({_third_seed_basis(t)}): `{t['command']}`" for t in third) + "\n")
        claims = paper_claims(rows) if is_paper_setting(config) else []
        if claims:
            data["paper_claims"] = claims
            text += ("\nThe paper's claims, point by point (its figures: 500 rounds of the "
                     "full-width ResNet-18; ours: this config; a lead within the seeds' combined "
                     "standard deviation reads as noise):\n\n" + claims_table(claims) + "\n")
            for d in densities:
                layers = mask_layer_table(rows, d)
                if layers:
                    text += (f"\nWhere each mask puts its weights at density {d:g}: the "
                             "fraction kept per layer (first seed), input to output:\n\n"
                             + layers + "\n")
            plot_accuracy_vs_round(rows, PAPER_DENSITY,
                                   out / f"comparison_accuracy_vs_round_d{PAPER_DENSITY:g}.png",
                                   setting_title(config, extra))
            if has_local:
                plot_accuracy_vs_round(
                    rows, PAPER_DENSITY,
                    out / f"comparison_accuracy_vs_round_d{PAPER_DENSITY:g}_authors.png",
                    setting_title(config, extra), protocol="authors'")
        setting = setting_title(config, extra)
        plot_accuracy_vs_density(rows, densities, out / "comparison_accuracy_vs_density.png",
                                 setting)
        plot_accuracy_vs_bytes(rows, densities, out / "comparison_accuracy_vs_bytes.png",
                               setting)
        plot_accuracy_vs_round(rows, TUNING_DENSITY, out / "comparison_accuracy_vs_round.png",
                               setting)
        data["last_step_noise"] = last_step_noise(rows)
        data["late_gain"] = {f"{m}@{d:g}": g for m in _methods(rows)
                             for d in method_densities(m, densities)
                             for g in [late_gain(_select(rows, m, d, REFERENCE_SPLIT))]
                             if g is not None}
        data["leading_spread"] = leading_spread(rows, densities)
    else:
        labels = [split_label(s) for s in splits]
        text = (
            "Final **global** accuracy (%) at density 0.2 (dense FedAvg at 1), mean ± std "
            "over seeds:\n\n"
            + accuracy_table(rows, splits, "split", "final_accuracy", labels)
            + "\n\nFinal **personalised** accuracy (%):\n\n"
            + accuracy_table(rows, splits, "split", "final_personal_accuracy", labels)
            + "\n\nSSFL against the strongest federated sparse baseline on each split "
            "(global protocol; relative error reduction as in the main table):\n\n"
            + goal_table([g for s in splits
                          for g in relative_error_goal(rows, [NONIID_DENSITY], "final_accuracy",
                                                       s)], by="split") + "\n")
        plot_noniid(rows, splits, out / "noniid_accuracy.png", setting_title(config, extra))
    (out / RESULT_FILES[sweep]).write_text(
        json.dumps(data, indent=1))
    (out / f"{'comparison' if sweep == 'main' else 'noniid'}.md").write_text(text)
    return text


def default_dirs(config: Path) -> tuple[Path, Path]:
    """Run folders and results folder of a sweep from ``config``: the committed ones for the
    CPU reference, folders of the config's own name for any other (so a paper-scale sweep never
    mixes its runs or tables with the CPU reference's)."""
    if config.resolve() == CONFIG.resolve():
        return Path("runs/comparison"), HERE / "results"
    return Path(f"runs/comparison-{config.stem}"), HERE / "results" / config.stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", choices=["main", "noniid"])
    parser.add_argument("--algorithms", default=None,
                        help="default: every method (main), NONIID_METHODS (noniid)")
    parser.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--config", default=str(CONFIG),
                        help="the setting every run starts from (default: the CPU reference); "
                        "another config gets its own --runs-dir and --out by default")
    parser.add_argument("--runs-dir", default=None, help="default: runs/comparison, or "
                        "runs/comparison-<config name> for another --config")
    parser.add_argument("--out", default=None, help="default: benchmarks/results, or "
                        "benchmarks/results/<config name> for another --config")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the finished runs; run nothing")
    parser.add_argument("--continue-from", default=None, metavar="RUNS_DIR",
                        help="a runs folder of the same sweep with fewer rounds (e.g. with "
                        "run.rounds=160 here): its finished runs are copied and carried on to "
                        "this sweep's rounds instead of started again, where the method "
                        "allows it (ssfl run --resume --rounds)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_intermixed_args()
    config = Path(args.config)
    if not config.is_file():
        raise SystemExit(f"--config {config}: no such file")
    default_runs, default_out = default_dirs(config)
    args.runs_dir = args.runs_dir or str(default_runs)
    args.out = args.out or str(default_out)
    algorithms = sweep_methods(args.sweep, args.algorithms)
    densities = [float(d) for d in args.densities.split(",")]
    splits = args.splits.split(",")
    for split in splits:
        split_overrides(split)  # fail early on a typo
    seeds = [int(s) for s in args.seeds.split(",")]
    runs_dir = Path(args.runs_dir)
    continue_from = Path(args.continue_from) if args.continue_from else None
    if continue_from is not None and not continue_from.is_dir():
        raise SystemExit(f"--continue-from {continue_from}: no such folder")
    recorded = recorded_runs(Path(args.out))

    def write_report() -> str:
        """The results files from every run finished so far; rows that an earlier invocation
        recorded for methods or seeds outside this one stay in them."""
        tuning = tuning_jobs(algorithms, seeds[0], runs_dir, recorded)
        tuning_rows = load_summaries(tuning, runs_dir, recorded)
        tuned = tuned_rates(tuning_rows)
        jobs = jobs_for(args.sweep, algorithms, densities, splits, seeds, tuned)
        other_runs, other_tuning = kept_rows(Path(args.out) / RESULT_FILES[args.sweep], jobs,
                                             algorithms, tuned)
        finished = {r["name"] for r in tuning_rows}
        return report(args.sweep, load_summaries(jobs, runs_dir, recorded) + other_runs,
                      densities, splits, Path(args.out), args.overrides,
                      tuning_rows + other_tuning, {**tuned_rates(other_tuning), **tuned}, config,
                      [j for j in tuning if j.name not in finished])

    attempted: set[str] = set()
    while not args.report_only:
        # A finished tuning grid may call for a wider one (tuning_grid); each tuning run is
        # tried once per invocation, so a failed one does not loop.
        tuning = [j for j in tuning_jobs(algorithms, seeds[0], runs_dir, recorded)
                  if j.name not in attempted]
        if not tuning:
            break
        attempted |= {j.name for j in tuning}
        # Untuned runs fill the workers that the tuning runs leave idle.
        filler = [j for j in jobs_for(args.sweep, algorithms, densities, splits, seeds)
                  if j.algorithm not in TUNED][: (-len(tuning)) % args.jobs]
        run_jobs(tuning + filler, runs_dir, args.jobs, args.overrides, recorded, config,
                 write_report, continue_from)
    if not args.report_only:
        tuning = tuning_jobs(algorithms, seeds[0], runs_dir, recorded)
        tuned = tuned_rates(load_summaries(tuning, runs_dir, recorded))
        jobs = jobs_for(args.sweep, algorithms, densities, splits, seeds, tuned)
        run_jobs(jobs, runs_dir, args.jobs, args.overrides, recorded, config, write_report,
                 continue_from)
    print(write_report())

if __name__ == "__main__":
    main()
