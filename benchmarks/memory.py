"""Peak resident memory of CIFAR-10 simulator runs with 10, 100 and 500 clients.

Each run is its own process (``ssfl run`` on configs/cifar10_cpu.toml for a few rounds), so its
peak RSS is read cleanly from the operating system (``ru_maxrss`` of the finished child).

    python benchmarks/memory.py [--rounds 3] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_cpu.toml"


def peak_rss_mb(num_clients: int, rounds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script = (
            "import resource, sys\n"
            "from ssfl.cli import main\n"
            "code = main(sys.argv[1:])\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(code)\n"
        )
        args = ["run", str(CONFIG), "--out", str(Path(tmp) / "run"), "--no-progress",
                f"run.rounds={rounds}", f"run.eval_every={rounds}",
                f"federation.num_clients={num_clients}", "federation.clients_per_round=10"]
        out = subprocess.run([sys.executable, "-c", script, *args], check=True,
                             capture_output=True, text=True, env=os.environ.copy())
        kb = next(int(line.split()[1]) for line in out.stdout.splitlines()
                  if line.startswith("MAXRSS_KB"))
        return kb / 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "memory.json"))
    args = parser.parse_args()
    rows = []
    for clients in (10, 100, 500):
        mb = peak_rss_mb(clients, args.rounds)
        rows.append({"num_clients": clients, "peak_rss_mb": mb})
        print(f"{clients:4d} clients: peak RSS {mb:7.1f} MB", flush=True)
    base = rows[0]["peak_rss_mb"]
    for row in rows:
        row["ratio_to_10_clients"] = row["peak_rss_mb"] / base
    print("ratio 100/10 clients: %.3f, 500/10: %.3f"
          % (rows[1]["ratio_to_10_clients"], rows[2]["ratio_to_10_clients"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "peak RSS of ssfl run, CIFAR-10, small_cnn, SSFL "
                               "density 0.1", "rounds": args.rounds, "results": rows,
                               "self_rusage_kb":
                                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},
                              indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
