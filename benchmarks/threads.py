"""How many torch threads a run should use: wall and CPU time per setting, quiet and busy.

    python benchmarks/threads.py                 # -> results/threads.json and threads.md
    python benchmarks/threads.py --quick         # fewer rounds (a smoke check)

For each workload (the quickstart, the small CNN on CIFAR-10, ResNet-18 on CIFAR-10) and each
``run.threads`` (1, 2, 0 = PyTorch's default), one ``ssfl run`` process runs a few rounds; its
wall time and the CPU time it used (user + system, of the process and its children) are
recorded. "busy" repeats each with as many CPU-bound burner processes as the machine has cores
running beside it, as on a shared CI machine. The figures are ratios against ``threads=1`` in
the same condition. CIFAR-10 comes from ``$SSFL_DATA_DIR``; without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = [1, 2, 0]


def workloads(quick: bool) -> dict[str, list[str]]:
    rounds = 2 if quick else 5
    cifar = [str(ROOT / "configs" / "cifar10_cpu.toml"), f"run.rounds={rounds}",
             "run.eval_every=0", "federation.clients_per_round=5"]
    return {
        "quickstart (digits, 50 rounds)": ["run.rounds=10"] if quick else [],
        "small CNN, CIFAR-10": cifar,
        "ResNet-18 (width 0.25), CIFAR-10": [*cifar, "model.name=resnet18", "model.width=0.25",
                                              "run.rounds=2" if not quick else "run.rounds=1"],
    }


def burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x = (x * 1103515245 + 12345) % 2**31


def measure(words: list[str], threads: int, out: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ssfl.cli", "run", *words,
                           f"run.threads={threads}", "--no-progress", "--out", str(out),
                           "--overwrite"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"ssfl run failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_seconds": wall, "cpu_seconds": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/threads"))
    args = parser.parse_args()
    have_cifar = bool(os.environ.get("SSFL_DATA_DIR"))
    rows: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    for condition in ("quiet", "busy"):
        for name, words in workloads(args.quick).items():
            if "CIFAR" in name and not have_cifar:
                print(f"skipping {name}: set SSFL_DATA_DIR")
                continue
            for threads in THREADS:
                burners = []
                if condition == "busy":
                    stop_at = time.time() + 3600
                    burners = [multiprocessing.Process(target=burn, args=(stop_at,))
                               for _ in range(cores)]
                    for b in burners:
                        b.start()
                try:
                    figures = measure(words, threads, args.runs_dir / f"{len(rows)}")
                finally:
                    for b in burners:
                        b.terminate()
                        b.join()
                rows.append({"condition": condition, "workload": name, "threads": threads,
                             **figures})
                print(f"{condition:5} {name:34} threads={threads}: wall "
                      f"{figures['wall_seconds']:.1f} s, CPU {figures['cpu_seconds']:.1f} s",
                      flush=True)
    lines = ["| condition | workload | threads | wall s | CPU s | wall / threads=1 | "
             "CPU / threads=1 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["condition"] == r["condition"]
                    and b["workload"] == r["workload"] and b["threads"] == 1)
        lines.append(f"| {r['condition']} | {r['workload']} | {r['threads'] or 'default'} | "
                     f"{r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['wall_seconds'] / base['wall_seconds']:.2f} | "
                     f"{r['cpu_seconds'] / base['cpu_seconds']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(
        {"cores": cores, "quick": args.quick, "runs": rows}, indent=1) + "\n")
    (args.out / "threads.md").write_text(
        f"# Torch threads per run ({cores} cores)\n\nWritten by `python benchmarks/threads.py"
        f"{' --quick' if args.quick else ''}`.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
