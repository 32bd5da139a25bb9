"""Dead units: how many filters of each Conv/Linear layer a mask leaves with no weight at all,
on the deep CPU reference (configs/cifar10_resnet18_cpu.toml: CIFAR-10, 100 clients, balanced
Dirichlet 0.3, ResNet-18 with GroupNorm at a quarter width).

    python benchmarks/mask_units.py [--densities 0.1,0.5] [--seeds 0,1,2]

Why: at density 0.1 random ERK ends above SSFL on that setting, and SSFL's scores placed in
ERK's own per-layer shares (``algorithm.ssfl.layer_budget = "erk"``) end lower still, so the
layer shares alone do not explain it. A filter with no kept weight outputs nothing but its
normalisation's shift: a mask that empties filters makes the layer narrower than its share
of weights says, where a random mask of the same share spreads its weights over every filter
(``ssfl.masks.dead_units``).

Each mask is built exactly as ``ssfl run`` builds it (``lean_mask.mask_round``: the run loop's
set-up phase, nothing trained): SSFL (the paper's global top-k), SSFL within ERK's per-layer
shares, SNIP on one client, random ERK, and SSFL with no unit cut off
(``algorithm.ssfl.min_per_unit = 1``: the check that its floor leaves no filter dead and no
input channel unused). Rows already in results/mask_units.json are kept (the
measurement resumes). Writes results/mask_units.{json,md}. Run it with one thread, under nice.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lean_mask import _mean_std, mask_round  # noqa: E402

CONFIG = HERE.parent / "configs" / "cifar10_resnet18_cpu.toml"
#: each mask's method and settings (the key is the label of its rows)
MASKS = {
    "ssfl": ["algorithm.name=ssfl"],
    "ssfl_erk": ["algorithm.name=ssfl", 'algorithm.ssfl.layer_budget="erk"'],
    "snip_single": ["algorithm.name=snip_single"],
    "random_erk": ["algorithm.name=random_erk"],
    "ssfl_floor": ["algorithm.name=ssfl", "algorithm.ssfl.min_per_unit=1"],
}
LABELS = {"ssfl": "SSFL (global top-k, the paper)",
          "ssfl_erk": "SSFL's scores in ERK's shares (layer_budget = erk)",
          "snip_single": "SNIP on one client", "random_erk": "random ERK",
          "ssfl_floor": "SSFL with no unit cut off (min_per_unit = 1)"}
BASE = ["run.threads=1", "run.progress=false"]


def unit_row(mask: Mapping[str, Any]) -> dict[str, Any]:
    """The dead filters and unused input channels of ``mask``: in all, and per layer as
    (kept fraction, dead output units, output units, unused inputs, inputs)."""
    from ssfl.masks import dead_units

    units = dead_units(mask)
    return {"dead_out": sum(u[0] for u in units.values()),
            "out": sum(u[1] for u in units.values()),
            "unused_in": sum(u[2] for u in units.values()),
            "inputs": sum(u[3] for u in units.values()),
            "per_layer": {n: [float(mask[n].float().mean()), *u] for n, u in units.items()}}


def measure(densities: Sequence[float], seeds: Sequence[int], config_path: Path,
            rows: list[dict[str, Any]], save: Any) -> list[dict[str, Any]]:
    from ssfl.config import load_config
    from ssfl.run.experiment import prepare

    done = {(r["method"], r["density"], r["seed"]) for r in rows}
    for seed in seeds:
        if all((m, d, seed) in done for m in MASKS for d in densities):
            continue
        exp = prepare(load_config(config_path, [*BASE, f"run.seed={seed}"]), with_test=False)
        for density in densities:
            for method, settings in MASKS.items():
                if (method, density, seed) in done:
                    continue
                started = time.perf_counter()
                config = load_config(config_path, [*BASE, f"run.seed={seed}",
                                                   f"algorithm.density={density}", *settings])
                run, _ = mask_round(exp, config)
                row = {"method": method, "density": density, "seed": seed,
                       **unit_row(run.algorithm.global_mask(run.state)),
                       "seconds": time.perf_counter() - started}
                rows.append(row)
                save(rows)
                print(f"seed {seed} d={density:g} {method}: {row['dead_out']} of {row['out']} "
                      f"filters dead, {row['unused_in']} of {row['inputs']} input channels "
                      f"unused ({row['seconds']:.0f} s)", flush=True)
    return rows


def _percent(rows: Sequence[Mapping[str, Any]], part: str, whole: str) -> str:
    return _mean_std([100 * r[part] / r[whole] for r in rows], digits=1)


def worst_layer(rows: Sequence[Mapping[str, Any]]) -> str:
    """The layer with the largest share of dead filters on the first seed, or '—'."""
    first = min(rows, key=lambda r: r["seed"])
    name, layer = max(first["per_layer"].items(), key=lambda kv: kv[1][1] / kv[1][2])
    return "—" if layer[1] == 0 else f"`{name}` {layer[1]} of {layer[2]}"


def report(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["# Dead units of each mask on the deep CPU reference", "",
             "Command: `python benchmarks/mask_units.py` (configs/cifar10_resnet18_cpu.toml; "
             "each mask as `ssfl run` builds it, nothing trained). A dead filter keeps no "
             "weight at all; an unused input channel feeds no kept weight of the layer. Mean ± "
             "standard deviation over seeds, % of all filters (input channels) of the "
             "Conv/Linear layers.", ""]
    densities = sorted({r["density"] for r in rows}, reverse=True)
    lines += ["| density | mask | seeds | dead filters (%) | unused input channels (%) | "
              "most dead filters (first seed) |", "|---|---|---|---|---|---|"]
    for d in densities:
        for method in MASKS:
            chosen = [r for r in rows if r["method"] == method and r["density"] == d]
            if chosen:
                seeds = ", ".join(str(r["seed"]) for r in sorted(chosen, key=lambda r: r["seed"]))
                lines.append(f"| {d:g} | {LABELS[method]} | {seeds} | "
                             f"{_percent(chosen, 'dead_out', 'out')} | "
                             f"{_percent(chosen, 'unused_in', 'inputs')} | "
                             f"{worst_layer(chosen)} |")
    if rows:
        d = min(densities)
        seed = min(r["seed"] for r in rows)
        first = {r["method"]: r for r in rows if r["density"] == d and r["seed"] == seed}
        methods = [m for m in MASKS if m in first]
        lines += ["", f"Per layer at density {d:g}, seed {seed}: fraction kept, dead filters "
                  "of all filters:", "",
                  "| layer | " + " | ".join(LABELS[m] for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for name in first[methods[0]]["per_layer"]:
            cells = []
            for m in methods:
                kept, dead, out, _, _ = first[m]["per_layer"][name]
                cells.append(f"{kept:.3f}, {dead} of {out}")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", default="0.1,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not args.config.is_file():
        raise SystemExit(f"--config {args.config}: no such file")
    path = args.out / "mask_units.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []

    def save(rows: list[dict[str, Any]]) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config": str(args.config.name), "rows": rows}, indent=1))
        (args.out / "mask_units.md").write_text(report(rows))

    rows = measure([float(d) for d in args.densities.split(",")],
                   [int(s) for s in args.seeds.split(",")], args.config, rows, save)
    save(rows)
    print(report(rows))


if __name__ == "__main__":
    main()
