"""Privacy against utility on the CPU reference setting (docs/privacy.md): dense FedAvg and SSFL
at density 0.1 under client-level DP ([privacy], server-side clipping) across noise multipliers.

    python benchmarks/privacy.py sweep            # fedavg and ssfl x noise none,0,0.3,0.5,1.0
    python benchmarks/privacy.py sweep --rounds 2 --runs-dir /tmp/privacy-smoke \\
        --out /tmp/privacy-smoke    # a smoke check: every job, 2 rounds
    python benchmarks/privacy.py report           # the table from the finished runs only
    python benchmarks/privacy.py budget           # no training: the clients a useful epsilon
                                                  # needs, from the accountant (docs/privacy.md)

Setting: configs/cifar10_cpu.toml (CIFAR-10, 100 clients, 10 per round, so a sampling rate of
0.1; the small CNN; 60 rounds of one local epoch; data in $SSFL_DATA_DIR or data.root). Noise
"none" is the run without [privacy] (weighted FedAvg, the reference); 0 clips and averages
unweighted without noise (no guarantee: epsilon infinite); the others add noise of std
sigma * clip / 10 to every value. --clip is privacy.clip_norm (1.0: about the median norm of a
client's change in the first rounds, measured at 0.9 to 1.5 for both methods).

Options: --methods fedavg,ssfl  --noise none,0,0.3,0.5,1.0  --clip 1.0  --seeds 0  --jobs 2
--runs-dir runs/privacy  --out benchmarks/results  --rounds N (run names carry it)
--config FILE.

Each run is an ``ssfl run`` process with one thread (``comparison.run_jobs``); a run whose
summary.json exists, or whose row is in --out's privacy.json, is reused, so an interrupted
sweep goes on where it stopped. Results: privacy.json (every run) and privacy.md (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from comparison import CONFIG, run_jobs  # noqa: E402  (a sibling script, not a package)

METHODS = {"fedavg": 1.0, "ssfl": 0.1}  # method -> density
NOISE = ["none", "0", "0.3", "0.5", "1.0"]
CLIP = 1.0
#: the robust-aggregation keys [privacy] refuses, pinned off whatever the defaults become
PLAIN = ["federation.aggregator=mean", "federation.update_clip_norm=0",
         "federation.adaptive_clip=0"]


@dataclass(frozen=True)
class Job:
    method: str
    noise: str  # "none": no [privacy]; else the noise multiplier
    clip: float
    seed: int
    rounds: int | None = None  # None: the config's

    @property
    def density(self) -> float:
        return METHODS.get(self.method, 0.1)

    @property
    def name(self) -> str:
        rounds = "" if self.rounds is None else f"-r{self.rounds}"
        dp = "nodp" if self.noise == "none" else f"z{float(self.noise):g}-c{self.clip:g}"
        return f"{self.method}-d{self.density:g}-{dp}-s{self.seed}{rounds}"

    def overrides(self) -> list[str]:
        out = [f"algorithm.name={self.method}", f"algorithm.density={self.density}",
               f"run.seed={self.seed}", f'run.name="{self.name}"', *PLAIN]
        if self.noise != "none":
            out += ["privacy.mode=server", f"privacy.noise_multiplier={float(self.noise)}",
                    f"privacy.clip_norm={self.clip}"]
        if self.rounds is not None:
            out.append(f"run.rounds={self.rounds}")
        return out


def jobs_for(methods: Sequence[str], noise: Sequence[str], clip: float, seeds: Sequence[int],
             rounds: int | None) -> list[Job]:
    """The first seed across every noise level first, then the other seeds."""
    return [Job(m, z, clip, s, rounds) for s in seeds for z in noise for m in methods]


def load_rows(jobs: Sequence[Job], runs_dir: Path,
              recorded: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for job in jobs:
        path = runs_dir / job.name / "summary.json"
        if path.exists():
            s = json.loads(path.read_text())
            rows.append({"name": job.name, "method": job.method, "noise": job.noise,
                         "clip": job.clip, "seed": job.seed, "rounds": s["rounds"],
                         "density": s["density"], "num_values": s["num_values"],
                         "final_accuracy": s["final_accuracy"],
                         "epsilon": s.get("epsilon"),
                         "delta": s.get("privacy", {}).get("delta"),
                         "noise_std": s.get("privacy", {}).get("noise_std"),
                         "ratio_to_dense": s["ratio_to_dense"]})
        elif job.name in recorded:
            rows.append(dict(recorded[job.name]))
    return rows


def recorded_rows(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "privacy.json"
    if not path.exists():
        return {}
    return {r["name"]: r for r in json.loads(path.read_text()).get("runs", [])}


def table(rows: Sequence[dict[str, Any]], methods: Sequence[str], noise: Sequence[str]) -> str:
    lines = ["| noise multiplier | epsilon (delta 1e-5) | noise std per value | "
             + " | ".join(f"{m} (d={METHODS.get(m, 0.1):g}) accuracy (%)" for m in methods)
             + " |", "|---" * (3 + len(methods)) + "|"]
    for z in noise:
        chosen = [r for r in rows if r["noise"] == z]
        if not chosen:
            continue
        eps = chosen[0]["epsilon"]
        eps_text = ("no DP" if z == "none" else "∞ (no noise)" if eps is None
                    else f"{eps:.2f}")
        std = chosen[0]["noise_std"]
        cells = []
        for m in methods:
            acc = [r["final_accuracy"] * 100 for r in chosen
                   if r["method"] == m and r["final_accuracy"] is not None]
            cells.append("—" if not acc else f"{acc[0]:.2f} (n=1)" if len(acc) == 1
                         else f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f}")
        lines.append(f"| {'none ([privacy] off)' if z == 'none' else z} | {eps_text} | "
                     f"{'—' if std is None else f'{std:.3g}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], out: Path, methods: Sequence[str],
                  noise: Sequence[str], rounds: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if rounds is None else f"_r{rounds}"
    (out / f"privacy{suffix}.json").write_text(json.dumps({"runs": rows}, indent=1))
    text = (f"# Privacy against accuracy (configs/cifar10_cpu.toml"
            f"{'' if rounds is None else f', {rounds} rounds'})\n\n"
            "Server-side clipping to privacy.clip_norm, unweighted mean over the 10 sampled "
            "clients, Gaussian noise; epsilon from the RDP accountant (Poisson sampling, "
            "q = 0.1) over the rounds. SSFL's mask round is not part of the account "
            "(docs/privacy.md).\n\n" + table(rows, methods, noise) + "\n")
    (out / f"privacy{suffix}.md").write_text(text)
    print(text)


# ---- the budget: what a useful epsilon costs in clients (no training) ------------------------
def model_sizes(config_path: Path, density: float) -> tuple[int, int]:
    """Values per payload of SSFL at ``density`` and of dense FedAvg, for the config's model
    (built without data: CIFAR's 3x32x32 inputs and 10 classes)."""
    from ssfl.config import load_config
    from ssfl.masks import prunable_parameter_names, topk_count
    from ssfl.models import build_model

    config = load_config(config_path)
    model = build_model(config.model.name, num_classes=10, in_channels=3, image_size=32,
                        width=config.model.width, seed=0)
    params = dict(model.named_parameters())
    prunable = set(prunable_parameter_names(model))
    total = sum(p.numel() for p in params.values())
    pruned = sum(params[n].numel() for n in prunable)
    return total - pruned + topk_count(density, pruned), total


def budget(config_path: Path, rounds: int, target: float, delta: float,
           signal: float) -> str:
    """For each sampling rate q: the noise multiplier sigma that keeps epsilon <= ``target``
    after ``rounds`` (RDP, Poisson sampling), then the clients per round m for which the noise
    on the mean, of L2 norm sigma * C * sqrt(values) / m, is at most f times the mean update's
    norm ``signal * C``, for f = 1 and 0.1, and the population m / q that takes."""
    from ssfl import privacy

    sparse, dense = model_sizes(config_path, 0.1)
    lines = [f"Values per payload: SSFL at density 0.1: {sparse:,}; dense FedAvg: {dense:,}.",
             f"epsilon <= {target:g} at delta {delta:g} after {rounds} rounds (RDP, Poisson "
             f"sampling); the mean of the clipped changes assumed of norm {signal:g} x "
             f"clip_norm.", "",
             "| sampling rate q | noise multiplier | clients per round m for noise norm <= "
             "signal (SSFL / dense) | ... <= 0.1 x signal (SSFL / dense) | population m / q "
             "for 0.1 x signal (SSFL / dense) |", "|---|---|---|---|---|"]
    for q in (0.1, 0.01, 0.001):
        # epsilon depends on q alone here (Poisson sampling): any population with m / N = q
        population = 1_000_000
        sigma = privacy.noise_multiplier_for(target, rounds, num_clients=population,
                                             clients_per_round=round(q * population),
                                             delta=delta)
        need = {(f, name): math.ceil(sigma * math.sqrt(size) / (f * signal))
                for f in (1.0, 0.1) for name, size in (("ssfl", sparse), ("dense", dense))}
        lines.append(f"| {q:g} | {sigma:.3f} | {need[1.0, 'ssfl']:,} / {need[1.0, 'dense']:,} "
                     f"| {need[0.1, 'ssfl']:,} / {need[0.1, 'dense']:,} | "
                     f"{math.ceil(need[0.1, 'ssfl'] / q):,} / "
                     f"{math.ceil(need[0.1, 'dense'] / q):,} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["sweep", "report", "budget"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--noise", default=",".join(NOISE))
    parser.add_argument("--clip", type=float, default=CLIP)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--config", type=Path, default=CONFIG)
    # budget
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--budget-rounds", type=int, default=60)
    parser.add_argument("--signal", type=float, default=0.45,
                        help="the mean clipped change's norm as a multiple of clip_norm "
                             "(measured 0.39 to 0.50 in rounds 1-3 of the CPU reference)")
    args = parser.parse_args(argv)
    if args.command == "budget":
        print(budget(args.config, args.budget_rounds, args.target_epsilon, args.delta,
                     args.signal))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    noise = [z for z in args.noise.split(",") if z]
    for z in noise:
        if z != "none":
            float(z)  # a typo stops the sweep before any run
    jobs = jobs_for(methods, noise, args.clip, [int(s) for s in args.seeds.split(",")],
                    args.rounds)
    recorded = recorded_rows(args.out) if args.rounds is None else {}
    if args.command == "sweep":
        run_jobs(jobs, args.runs_dir, args.jobs, [], recorded, args.config)
    rows = load_rows(jobs, args.runs_dir, recorded)
    if rows:
        write_results(rows, args.out, methods, noise, args.rounds)
    else:
        print("no finished runs yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
