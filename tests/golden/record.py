"""Record (or check) the golden results: short runs of every method whose metrics, bytes and
final weights must not move when the code is refactored.

    python tests/golden/record.py            # write tests/golden/runs.json from this code
    python tests/golden/record.py --machine  # write tests/golden/machines/<this CPU>.json
    python -m pytest tests/test_golden.py    # compare this code's runs with the files

Float results are bit-identical only on one kind of CPU: another vendor or instruction set
picks other kernels, and the last bits of a loss move from the first step on. runs.json is the
reference (recorded before the algorithm interface was redesigned); a file in machines/ holds the
same runs, from the same code, on another kind of CPU (``fingerprint``), so that a machine of that
kind is held to its own results bit for bit. On a kind of CPU with no file, runs are held to the
reference up to rounding (tests/test_golden.py).

Each run is tiny (digits, a few rounds, 8 clients) so that the whole set takes seconds. What is
compared: every metric that is not a time, the summary's non-time fields, the mask digest and a
SHA-256 of the final values (as float32 bytes).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FILE = HERE / "runs.json"
MACHINES = HERE / "machines"

#: legacy flat keys (they still load: see ssfl.config) so that this file records and checks the
#: same settings before and after the per-method tables existed
COMMON = ["data.dataset=digits", "run.rounds=4", "federation.num_clients=8",
          "federation.clients_per_round=3", "run.threads=1", "run.progress=false",
          "run.checkpoint_every=0", "train.local_epochs=1",
          # the paper's FedAvg, which every golden run was recorded with (the default clips
          # and runs multi-Krum since robust aggregation became the default). The score rule
          # keeps its default ("clipped"): with no client's scores standing out it is the
          # paper's mean bit for bit, which these runs check.
          "federation.aggregator=mean", "federation.adaptive_clip=0"]

CASES: dict[str, list[str]] = {
    "ssfl": ["algorithm.name=ssfl", "algorithm.density=0.3"],
    "ssfl_uniform_2batches": ["algorithm.name=ssfl", "algorithm.density=0.2",
                              "algorithm.score_aggregation=uniform",
                              "algorithm.saliency_batches=2"],
    "ssfl_float16_clip": ["algorithm.name=ssfl", "algorithm.density=0.3",
                          "comm.value_dtype=float16", "federation.update_clip_norm=0.5"],
    "ssfl_failures": ["algorithm.name=ssfl", "algorithm.density=0.3",
                      "federation.failure_rate=0.3", "federation.max_round_attempts=5"],
    "fedavg": ["algorithm.name=fedavg", "algorithm.density=1.0"],
    "random": ["algorithm.name=random", "algorithm.density=0.3"],
    "random_erk": ["algorithm.name=random_erk", "algorithm.density=0.3"],
    "snip_oracle": ["algorithm.name=snip_oracle", "algorithm.density=0.3"],
    "snip_single": ["algorithm.name=snip_single", "algorithm.density=0.3"],
    "random_clientwise": ["algorithm.name=random_clientwise", "algorithm.density=0.3"],
    "feddst": ["algorithm.name=feddst", "algorithm.density=0.3",
               "algorithm.update_interval=2", "algorithm.update_until=4"],
    "prunefl": ["algorithm.name=prunefl", "algorithm.density=0.3",
                "algorithm.update_interval=2", "algorithm.update_until=4",
                "algorithm.prunefl_initial_rounds=2"],
    "sparsyfed": ["algorithm.name=sparsyfed", "algorithm.density=0.3"],
    "sparsyfed_low": ["algorithm.name=sparsyfed", "algorithm.density=0.02"],
    "dispfl": ["algorithm.name=dispfl", "algorithm.density=0.3", "algorithm.neighbors=3"],
}

TIME_KEYS = {"seconds", "aggregation_seconds", "eval_seconds", "wall_seconds", "mask_seconds",
             "samples_per_second"}


def strip_times(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIME_KEYS}


def record_case(name: str, overrides: list[str] | None = None) -> dict[str, Any]:
    import numpy as np

    from ssfl.config import load_config
    from ssfl.sim import run_experiment

    config = load_config(None, [*COMMON, *(overrides if overrides is not None else CASES[name])])
    result = run_experiment(config, write=False, progress=False)
    values = result.final_values.detach().to("cpu").float().contiguous().numpy()
    summary = strip_times(result.summary)
    return {
        "metrics": [strip_times(m) for m in result.metrics],
        "summary": summary,
        "values_sha256": hashlib.sha256(values.astype(np.float32).tobytes()).hexdigest(),
        "num_values": int(values.size),
    }


def fingerprint() -> str:
    """This kind of CPU, as far as float results go: the vendor, the architecture and the
    instruction set PyTorch dispatches to (e.g. ``AuthenticAMD-x86_64-AVX512``)."""
    import platform

    import torch

    vendor = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            vendor = next((line.split(":", 1)[1].strip() for line in info
                           if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"{vendor}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def machine_file() -> Path:
    return MACHINES / f"{fingerprint()}.json"


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    path = machine_file() if "--machine" in argv else FILE
    out = {name: record_case(name) for name in CASES}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({len(out)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
