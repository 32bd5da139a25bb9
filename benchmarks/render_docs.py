"""Write docs/benchmarks.md from the result files in benchmarks/results/.

Every figure in the page is read from a results file that a benchmark script wrote, so the page
never drifts from what the commands produce:

    python benchmarks/throughput.py     # -> results/throughput.json
    python benchmarks/memory.py         # -> results/memory.json
    python benchmarks/threads.py        # -> results/threads.{json,md}
    python benchmarks/comparison.py main    # -> results/comparison.{json,md} (+ plots)
    python benchmarks/comparison.py noniid  # -> results/noniid.{json,md} (+ plot)
    python benchmarks/mask_analysis.py      # -> results/mask_analysis.{json,md} (+ plot)
    python benchmarks/saliency_augment.py mask  # -> results/saliency_augment.{json,md}
    python benchmarks/checkpoint_overhead.py  # -> results/checkpoint_overhead.json
    python benchmarks/render_docs.py    # -> docs/benchmarks.md and the README's headline
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import (  # noqa: E402  (a sibling script, not a package)
    LABELS,
    PAPER_ACCURACY,
    PERSONALISED,
    _cells,
    _select,
    first_per_layer,
    late_gain,
    late_trend,
    on_shared_seeds,
    readme_headline,
    seeds_phrase,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
README = HERE.parent / "README.md"
#: The README's comparison summary lives between these lines and is rewritten from the results.
HEADLINE_START = "<!-- comparison headline: written by benchmarks/render_docs.py -->"
HEADLINE_END = "<!-- end of comparison headline -->"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def throughput_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/throughput.py`._\n"
    lines = [
        f"{data['benchmark']}; torch {data['torch']}, {data['threads']} threads, median of "
        f"{data['repeats']} interleaved repeats.\n",
        "| mask density | simulator (samples/s) | plain PyTorch loop (samples/s) | "
        "ratio (median of paired repeats) | ratio of medians |",
        "|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['density']:g} | {r['simulator_samples_per_s']:.0f} | "
                     f"{r['plain_samples_per_s']:.0f} | {r['ratio']:.3f} | "
                     f"{r.get('ratio_of_medians', r['ratio']):.3f} |")
    return "\n".join(lines) + "\n"


def memory_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/memory.py`._\n"
    lines = [f"{data['benchmark']}, {data['rounds']} rounds, 10 clients per round.\n",
             "| clients | peak RSS (MB) | ratio to 10 clients |", "|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['num_clients']} | {r['peak_rss_mb']:.0f} | "
                     f"{r['ratio_to_10_clients']:.3f} |")
    return "\n".join(lines) + "\n"


GOAL_NOTE = (
    "\n"
    "On the goal (SSFL with at least 20% lower relative error than the strongest sparse "
    "baseline at density 0.1 and below): the last column of the goal table is the reduction "
    "dense FedAvg itself achieves over that baseline, the most any sparse method could show. In"
    " this CPU setting (a small CNN whose 1 M-weight `fc1` holds 98% of the prunable weights, "
    "60 rounds, about 45% accuracy) the strong baselines lose little to dense FedAvg, so the "
    "room is a few percent and a 20% reduction cannot be measured here whatever the method "
    "does. The paper's 20% comes from ResNet-18 after about 1000 rounds, where errors are small"
    " and the gaps between methods large; `configs/cifar10_resnet18_paper.toml` is that "
    "setting, for a GPU. The second goal table leaves out the SSFL paper's own ablations "
    "(random masks, SNIP on one client) and compares with the published methods alone; the "
    "ceiling is the same argument there. Under the personalised protocol the ceiling can be "
    "negative: DisPFL's per-client models, fitted to each client's own classes, beat every "
    "global model on test splits that follow those classes, dense FedAvg included; SSFL, like "
    "the paper's SSFL, trains one global model, so there it is compared with a different kind "
    "of method.\n"
    "\n"
    "Why `random_clientwise` falls to about chance (10%; at density 0.1 with seed 0 it predicts"
    " one class for every image) at density 0.1 and below: each client trains its own random "
    "fraction d of the weights, but the model the server holds, and which is evaluated, is the "
    "union of the 100 clients' masks, nearly dense (1 - (1 - d)^100 of the weights: 99.997% at "
    "d = 0.1). Each unit then sums over about 1/d times as many inputs as any client ever "
    "trained it with, weights that were never trained together. The SSFL paper's ablation uses "
    "this method to show that the clients must share one mask; it is not a viable method at low"
    " density.\n")


def _one_time_note(runs: list[dict[str, Any]]) -> str:
    ssfl = [r for r in runs if r["algorithm"] == "ssfl" and r["target_density"] == 0.1]
    if not ssfl:
        return ""
    r = ssfl[0]
    share = sum(r["one_time_bytes"].values()) / r["total_bytes"]
    return (f"\nSSFL's one-time cost is one dense float32 score upload per client plus the mask "
            f"bitmap ({sum(r['one_time_bytes'].values()) / 1e6:.0f} MB for 100 clients). In "
            f"these {r['rounds']}-round runs it is {share:.0%} of everything SSFL sends at "
            "density 0.1; over the paper's 1000 rounds it would be a few percent. Per round, "
            "the ratio to dense is the density plus the dense biases; SparsyFed's is higher "
            "because its download is the union of the clients' masks and its uploads carry "
            "positions; DisPFL's download carries ten neighbours' models.\n")


def comparison_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/comparison.py main`._\n"
    runs = data["runs"]
    walls = sorted(r["wall_seconds"] for r in runs)
    seeds = sorted({r["seed"] for r in runs})
    return (f"Config `{data['config']}`"
            + (f" with overrides `{' '.join(data['overrides'])}`" if data["overrides"] else "")
            + f"; {len(runs)} runs so far, seeds {', '.join(map(str, seeds))}; a run's median "
            f"wall time was {walls[len(walls) // 2] / 60:.1f} min (one thread, two runs at a "
            "time on 2 cores, often beside other jobs).\n\n"
            + (RESULTS / "comparison.md").read_text() + _one_time_note(runs) + GOAL_NOTE
            + _noise_note(data) + _spread_note(data)
            + "\n![accuracy against density](../benchmarks/results/"
            "comparison_accuracy_vs_density.png)\n"
            "![accuracy against bytes](../benchmarks/results/comparison_accuracy_vs_bytes.png)\n"
            "![accuracy during training](../benchmarks/results/"
            "comparison_accuracy_vs_round.png)\n")


#: issue 16's deep CPU reference: the methods and densities the paper's claims are about
DEEP_CONFIG = "configs/cifar10_resnet18_cpu.toml"
DEEP_METHODS = ["fedavg", "ssfl", "snip_single", "random_erk", "feddst", "sparsyfed", "prunefl",
                "dispfl"]
DEEP_DENSITIES = [0.5, 0.1]
DEEP_SEEDS = [0, 1]
DEEP_COMMAND = (f"python benchmarks/comparison.py main --config {DEEP_CONFIG} "
                f"--algorithms {','.join(DEEP_METHODS)} --densities "
                f"{','.join(f'{d:g}' for d in DEEP_DENSITIES)} --seeds "
                f"{','.join(map(str, DEEP_SEEDS))} --jobs 2")
#: the runs that command makes: dense FedAvg once per seed, every other method per density
DEEP_RUNS = len(DEEP_SEEDS) * (1 + (len(DEEP_METHODS) - 1) * len(DEEP_DENSITIES))


def deep_progress(deep: dict[str, Any]) -> str:
    """How much of the deep sweep its results hold, e.g. "7 of 30 runs, seed 0", and the runs
    on further seeds (those the docs' "do not settle" list asks for), e.g. "30 of 30 runs,
    seeds 0, 1, and 5 runs on seed 2"."""
    ours = [r for r in deep["runs"] if r["algorithm"] in DEEP_METHODS
            and (r["algorithm"] == "fedavg" or r["target_density"] in DEEP_DENSITIES)]
    planned = [r for r in ours if r["seed"] in DEEP_SEEDS]
    further = [r for r in ours if r["seed"] not in DEEP_SEEDS]
    text = f"{len(planned)} of {DEEP_RUNS} runs, {seeds_phrase({r['seed'] for r in planned})}"
    if further:
        text += (f", and {len(further)} run{'s' if len(further) > 1 else ''} on "
                 f"{seeds_phrase({r['seed'] for r in further})}")
    return text


#: CIFAR-10's training images, which the paper's split shares out among the clients
CIFAR10_TRAIN = 50_000


def paper_run_time(config: Path = HERE.parent / "configs" / "cifar10_resnet18_paper.toml",
                   samples_per_second: float = 5_000.0) -> str:
    """What one paper-scale run costs, from its config: the training images it passes through
    (rounds x clients per round x local epochs x a client's share) over a GPU's rate, which
    ``scripts/gpu_check.sh`` measures (its speed.txt); ``samples_per_second`` is the example
    rate the sentence works out, not a measurement."""
    with open(config, "rb") as f:
        c = tomllib.load(f)
    images = (c["run"]["rounds"] * c["federation"]["clients_per_round"]
              * c["train"]["local_epochs"] * CIFAR10_TRAIN // c["federation"]["num_clients"])
    hours = images / samples_per_second / 3600
    return (f"Expected time per run: it trains on {images / 1e6:g} M images ({c['run']['rounds']} "
            f"rounds x {c['federation']['clients_per_round']} clients x "
            f"{c['train']['local_epochs']} local epochs x "
            f"{CIFAR10_TRAIN // c['federation']['num_clients']} images), so at "
            f"{samples_per_second:,.0f} images/s (`scripts/gpu_check.sh` measures a GPU's "
            f"ResNet-18 rate into its `speed.txt`) about {hours:.1f} h plus the evaluations; "
            "a sweep takes that times its runs (`--algorithms`, `--densities` and `--seeds` "
            "choose them; `--jobs` runs several on one GPU at once).")


def calibration_note(data: dict[str, Any] | None) -> str:
    """What the 80-round calibration runs (dense FedAvg and SSFL at 0.5, seed 0, decay 0.97)
    showed, from their results file."""
    if data is None:
        return ""
    rows = {r["algorithm"]: r for r in data["runs"]}
    dense = dict(rows["fedavg"]["curve"])
    last = max(dense)
    fifth = max(r for r in dense if r <= 0.8 * last)
    ssfl = f", and SSFL's beside it {rows['ssfl']['final_accuracy'] * 100:.1f}%" \
        if "ssfl" in rows else ""
    return (f"{last} rounds with 0.97 gained {(dense[last] - dense[fifth]) * 100:.1f} "
            f"({dense[fifth] * 100:.1f}% at round {fifth}, {dense[last] * 100:.1f}% at {last}, "
            f"moving by up to {max_step(dense) * 100:.1f} points between its last evaluations; "
            f"that run{ssfl}: `benchmarks/results/{CALIBRATION}/`, from the "
            "command below with `--algorithms fedavg,ssfl --densities 0.5 --seeds 0 "
            f"run.rounds={last} train.lr_decay=0.97 --out benchmarks/results/{CALIBRATION}`)")


def max_step(curve: dict[int, float], last: int = 4) -> float:
    """The largest change between consecutive evaluations among a curve's ``last`` ones."""
    values = [curve[r] for r in sorted(curve)][-last:]
    return max(abs(b - a) for a, b in zip(values, values[1:]))


#: the deep reference's calibration runs (80 rounds, decay 0.97)
CALIBRATION = "cifar10_resnet18_cpu_80rounds"
#: the deep reference's dense FedAvg and SSFL runs carried on from 120 to 160 rounds
CONTINUED = "cifar10_resnet18_cpu_160rounds"
CONTINUED_COMMAND = (f"python benchmarks/comparison.py main --config {DEEP_CONFIG} --algorithms "
                     "fedavg,ssfl --densities 0.5 --seeds 0,1 --runs-dir "
                     "runs/comparison-cifar10_resnet18_cpu-160 --continue-from "
                     "runs/comparison-cifar10_resnet18_cpu --out "
                     f"benchmarks/results/{CONTINUED} run.rounds=160")


def carried_on(data: dict[str, Any] | None, at: int):
    """The carried-on dense FedAvg and SSFL runs of ``data`` past round ``at``: (their rows,
    ``mean(method, round)``, the accuracy % over the seeds where both methods reached ``at``,
    those seeds, the last round all of them reached); None before any went past ``at``."""
    if data is None:
        return None
    runs = [r for r in data["runs"] if r["algorithm"] in ("fedavg", "ssfl")]
    by = {(r["algorithm"], r["seed"]): dict(map(tuple, r["curve"])) for r in runs}
    seeds = sorted({s for m, s in by if ("fedavg", s) in by and ("ssfl", s) in by
                    and at in by["fedavg", s] and at in by["ssfl", s]})
    if not seeds:
        return None
    end = min(max(by[m, s]) for m in ("fedavg", "ssfl") for s in seeds)
    if end <= at:
        return None

    def mean(method: str, rnd: int) -> float:
        return sum(by[method, s][rnd] for s in seeds) / len(seeds) * 100

    return runs, mean, seeds, end


def continued_note(data: dict[str, Any] | None, at: int = 120,
                   spread: float | None = None) -> str:
    """What carrying the deep reference's dense FedAvg and SSFL runs on past round ``at``
    showed, from their results file: each method's mean accuracy at ``at`` and at the end,
    and SSFL's lead over dense FedAvg at both, paired by seed. ``spread`` (the seeds' combined
    standard deviation of that lead at ``at``) adds why the sweep keeps ``at`` rounds, when the
    extra rounds moved the lead by less."""
    carried = carried_on(data, at)
    if carried is None:
        return ""
    runs, mean, seeds, end = carried
    parts = [f"{LABELS[m]} {mean(m, at):.2f}% at round {at}, {mean(m, end):.2f}% at {end} "
             f"({mean(m, end) - mean(m, at):+.2f})" for m in ("fedavg", "ssfl")]
    lead = [mean("ssfl", r) - mean("fedavg", r) for r in (at, end)]
    dense = [r for r in runs if r["algorithm"] == "fedavg" and r["seed"] in seeds]
    which = (f"seeds {', '.join(map(str, seeds))}, mean over them" if len(seeds) > 1
             else f"seed {seeds[0]}")
    return (f"Carried on to {end} rounds (the {at}-round runs continued bit for bit, {which}; "
            f"`{CONTINUED_COMMAND}`, results in `benchmarks/results/{CONTINUED}/`): "
            + "; ".join(parts) + f". Over the last fifth of those {end} rounds dense FedAvg "
            f"gained {late_gain(dense):+.2f} points (least-squares trend "
            f"{late_trend(dense):+.2f}). SSFL's lead over dense FedAvg: {lead[0]:+.2f} points "
            f"at round {at}, {lead[1]:+.2f} at {end}."
            + (f" The sweep stays at {at} rounds: at {end} a run takes about "
               f"{min(r['wall_seconds'] for r in runs) / 60:.0f} minutes, over the issue's "
               f"45, and the extra rounds moved SSFL's lead by {lead[1] - lead[0]:+.2f} points, "
               f"less than the seeds' spread ({spread:.2f})."
               if spread is not None and abs(lead[1] - lead[0]) < spread else ""))



def dense_claim(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The deep reference's "SSFL above dense FedAvg" claim on the global protocol, if run."""
    return next((c for c in (data or {}).get("paper_claims", [])
                 if c["claim"].startswith("SSFL above dense FedAvg") and c["protocol"] == "global"),
                None)


def _probe_command(name: str, overrides: str, algorithms: str = "fedavg,ssfl",
                   density: float = 0.5) -> str:
    return (f"python benchmarks/comparison.py main --config {DEEP_CONFIG} --algorithms "
            f"{algorithms} --densities {density:g} --seeds 0,1 --runs-dir runs/comparison-{name} "
            f"--out benchmarks/results/{name} {overrides}")


#: the deep reference's probes of SSFL against dense FedAvg: half the authors' learning rate,
#: and half the network's width (a cheap test of whether the network's size decides the lead)
LR_PROBE = "cifar10_resnet18_cpu_lr0.05"
LR_PROBE_COMMAND = _probe_command(LR_PROBE, "train.lr=0.05")
WIDTH_PROBE = "cifar10_resnet18_cpu_width0.125"
WIDTH_PROBE_COMMAND = _probe_command(WIDTH_PROBE, "model.width=0.125")
#: Conv/Linear weights of the CIFAR ResNet-18 (10 classes) at the deep reference's width 0.25
#: and at the paper's full width: ``ssfl.masks.prunable_parameter_names`` over
#: ``ssfl.models.build_model("resnet18", width=w, ...)``, checked by the tests
RESNET18_WEIGHTS = {0.25: 699_056, 1.0: 11_164_352}


def _mean_accuracy(rows: list[dict[str, Any]], method: str, density: float,
                   key: str = "final_accuracy") -> float | None:
    """``method``'s mean ``key`` (%) over its runs at ``density`` (dense FedAvg: any)."""
    values = _cells(_select(rows, method, None if method == "fedavg" else density), key)
    return statistics.mean(values) if values else None


def _leads(rows: list[dict[str, Any]], density: float) -> dict[int, tuple[float, float]]:
    """Per seed with both runs: (dense FedAvg's, SSFL's) final global accuracy, %."""
    acc = {(r["algorithm"], r["seed"]): r["final_accuracy"] * 100
           for r in _select(rows, "fedavg") + _select(rows, "ssfl", density)}
    return {s: (acc["fedavg", s], acc["ssfl", s]) for m, s in sorted(acc)
            if m == "ssfl" and ("fedavg", s) in acc}


def probe_result(probe: dict[str, Any] | None, reference: list[dict[str, Any]],
                 density: float = 0.5) -> tuple[str, list[float]] | None:
    """A probe's dense FedAvg and SSFL figures and SSFL's lead over the seeds it shares with
    the reference runs, against the reference's lead on those seeds, and the change of the
    lead per seed (probe minus reference); None until a seed has all four runs."""
    if not probe:
        return None
    ours, ref = _leads(probe["runs"], density), _leads(reference, density)
    seeds = [s for s in ours if s in ref]
    if not seeds:
        return None
    mean = statistics.mean
    dense, ssfl = mean([ours[s][0] for s in seeds]), mean([ours[s][1] for s in seeds])
    ref_dense, ref_ssfl = mean([ref[s][0] for s in seeds]), mean([ref[s][1] for s in seeds])
    before = mean([ref[s][1] - ref[s][0] for s in seeds])
    changes = [(ours[s][1] - ours[s][0]) - (ref[s][1] - ref[s][0]) for s in seeds]
    missing = [s for s in ref if s not in ours]
    pending = f" (not run on {seeds_phrase(missing)})" if missing else ""
    return (f"{seeds_phrase(seeds)}{pending}: "
            f"dense FedAvg {dense:.2f}% (reference {ref_dense:.2f}%), SSFL {ssfl:.2f}% (reference "
            f"{ref_ssfl:.2f}%), SSFL's lead {ssfl - dense:+.2f} points against "
            f"{before:+.2f} in the reference on the same seeds (change per seed: "
            + ", ".join(f"{c:+.2f}" for c in changes) + ")", changes)


def _on_each(changes: list[float]) -> str:
    return "on every seed" if len(changes) > 1 else "on the one seed so far"


def _against_spread(changes: list[float], spread: float) -> str:
    shift = statistics.mean(changes)
    return (f"the mean change, {shift:+.2f}, is "
            + ("within" if abs(shift) <= spread else "beyond")
            + f" the seeds' spread of the lead ({spread:.2f})")


def needs_why(claim: dict[str, Any] | None) -> bool:
    """Whether the dense claim asks why SSFL does not lead: it is behind, or ahead within the
    seeds' noise (ahead on one seed, or beyond the noise, has nothing to explain yet)."""
    return claim is not None and (claim["diff"] <= 0 or "noise" in claim["verdict"])


def why_title(claim: dict[str, Any]) -> str:
    return ("Why SSFL does not lead dense FedAvg here" if claim["diff"] <= 0
            else "Why SSFL's lead over dense FedAvg stays within seed noise here")


def why_note(data: dict[str, Any], continued: dict[str, Any] | None,
             lr_probe: dict[str, Any] | None = None, width_probe: dict[str, Any] | None = None,
             density: float = 0.5) -> str:
    """Why SSFL does not lead dense FedAvg on the deep reference, and what was tried (issue 16
    asks for both before concluding): the masks (how far each global-mask method at
    ``density`` lands from dense FedAvg, and whether SSFL's per-layer profile is
    SNIP-on-one-client's), the rounds (the carried-on runs), the learning rate and the
    network's size (the probes, once run). Empty while SSFL leads beyond the seeds' noise."""
    claim = dense_claim(data)
    if not needs_why(claim):
        return ""
    paper_lead = PAPER_ACCURACY["ssfl"] - PAPER_ACCURACY["fedavg"]
    runs = data["runs"]
    dense = _mean_accuracy(runs, "fedavg", density)
    methods = [m for m in dict.fromkeys(r["algorithm"] for r in runs)
               if m != "fedavg" and m not in PERSONALISED]
    masks = {m: a for m in methods if (a := _mean_accuracy(runs, m, density)) is not None}
    items = []
    if dense is not None and len(masks) > 1:
        gap = max(abs(a - dense) for a in masks.values())
        items.append(
            f"- The mask. Every method that trains one global model on a mask of density "
            f"{density:g} ends within {gap:.2f} points of dense FedAvg's {dense:.2f}% ("
            + ", ".join(f"{LABELS.get(m, m)} {a:.2f}%" for m, a in masks.items())
            + (f"), closer than the seeds' spread of SSFL's lead ({claim['spread']:.2f}): at "
               "this width and density, which half of the weights a method keeps barely moves "
               "the result, so a better mask has little to win."
               if gap < claim["spread"] else
               f"; the seeds' spread of SSFL's lead is {claim['spread']:.2f})."))
        a, b = (first_per_layer(runs, m, density) for m in ("ssfl", "snip_single"))
        if a and b:
            diff = sum(abs(a[k] - b[k]) for k in a) / len(a)
            items[-1] += (" SSFL's mask keeps the first layers almost dense and prunes the last "
                          "stage hardest (per-layer table above), as SNIP on one client's data "
                          f"does: the two differ by {diff:.3f} per layer on average.")
    at = runs[0]["rounds"]
    carried = carried_on(continued, at)
    if carried:
        _, mean, _, end = carried
        lead = [mean("ssfl", r) - mean("fedavg", r) for r in (at, end)]
        items.append(f"- The rounds. Carried on from {at} to {end} rounds, SSFL's lead over "
                     f"dense FedAvg went from {lead[0]:+.2f} to {lead[1]:+.2f} points: "
                     + ("longer training does not open the paper's gap here."
                        if lead[1] < paper_lead else "the paper's gap opens with longer "
                        "training."))
    lr = probe_result(lr_probe, runs, density)
    items.append("- The learning rate. "
                 + (f"At half the authors' rate (0.05; `{LR_PROBE_COMMAND}`), {lr[0]}: "
                    + (f"the smaller rate lowers SSFL's lead {_on_each(lr[1])}, so the "
                       "authors' rate is not what holds SSFL back"
                       if all(c < 0 for c in lr[1]) else
                       f"the smaller rate raises SSFL's lead {_on_each(lr[1])}, so the "
                       "authors' rate may suit the dense model more than the sparse one"
                       if all(c > 0 for c in lr[1]) else
                       "the smaller rate moves the lead one way on some seeds, the other way "
                       "on others")
                    + "; " + _against_spread(lr[1], claim["spread"]) + "." if lr else
                    f"Not yet measured: the probe at half the authors' rate is "
                    f"`{LR_PROBE_COMMAND}` (four runs)."))
    small, full = RESNET18_WEIGHTS[0.25], RESNET18_WEIGHTS[1.0]
    width = probe_result(width_probe, runs, density)
    if width:
        falls = all(c < 0 for c in width[1])
        test = (f"At half our width (0.125; `{WIDTH_PROBE_COMMAND}`), {width[0]}: the lead "
                + ("falls with the width on every seed, as the hypothesis predicts"
                   if falls else "does not fall with the width on every seed, against the "
                   "hypothesis")
                + "; " + _against_spread(width[1], claim["spread"]) + ". ")
    else:
        test = ("A hypothesis so far: the cheap test is half our width, where the lead should "
                f"fall if size decides (`{WIDTH_PROBE_COMMAND}`, four shorter runs). ")
    items.append(
        f"- The network's size. Width 0.25 has {small / 1e6:.2f} M Conv/Linear weights, the "
        f"paper's full width {full / 1e6:.2f} M ({full / small:.0f} times more). Halving a "
        "network that size may drop weights it does not need, and the paper's lead over dense "
        "may come from there; halving a quarter-width network removes capacity it uses. "
        + test + "The paper-scale config on a GPU (top of this page) is the full test.")
    return ("\n" + why_title(claim) + ", and what was tried (density "
            f"{density:g}; ours {claim['diff']:+.2f} ± {claim['spread']:.2f} points, the "
            f"paper's {paper_lead:+.1f}):\n\n" + "\n".join(items) + "\n")


#: the deep reference's probe of SSFL's layer budget at low density: SSFL's scores choose the
#: weights within each layer, the random ERK baseline's per-layer shares set how many
LAYER_PROBE = "cifar10_resnet18_cpu_ssfl_erk"
LAYER_PROBE_COMMAND = _probe_command(LAYER_PROBE, "algorithm.ssfl.layer_budget=erk", "ssfl",
                                     0.1)


def layer_budget_note(data: dict[str, Any], probe: dict[str, Any] | None,
                      units: dict[str, Any] | None = None, density: float = 0.1,
                      squeezed: int = 3, floor: dict[str, Any] | None = None) -> str:
    """Why random ERK can end above SSFL at low density, and what the layer-budget probe, the
    dead-units measurement and the filter-floor probe (``floor``) say: empty while SSFL is
    ahead of random ERK at ``density`` on the seeds both have. The ``squeezed`` layers are
    those SSFL keeps least of relative to ERK (first seed's masks)."""
    runs = data["runs"]
    ssfl, erk, shared = on_shared_seeds(_select(runs, "ssfl", density),
                                        _select(runs, "random_erk", density))
    by_seed = {(r["algorithm"], r["seed"]): r["final_accuracy"] * 100 for r in ssfl + erk}
    seeds = sorted({r["seed"] for r in ssfl})

    def mean(method: str, over: list[int] = seeds) -> float:
        return statistics.mean(by_seed[method, s] for s in over)

    if not ssfl or not erk or mean("random_erk") <= mean("ssfl"):
        return ""
    gap = mean("random_erk") - mean("ssfl")
    per_seed = [by_seed["random_erk", s] - by_seed["ssfl", s] for s in seeds]
    text = (f"\nWhy random ERK ends above SSFL at density {density:g} ("
            + ("" if shared else f"{seeds_phrase(seeds)}: ")
            + f"random ERK {mean('random_erk'):.2f}%, SSFL {mean('ssfl'):.2f}%, "
            f"{gap:+.2f} points"
            + ("; per seed " + ", ".join(f"{g:+.2f}" for g in per_seed) if len(seeds) > 1
               else "")
            + f"{shared}): both masks keep the same number of weights, but they share it among the "
            "layers differently. Random ERK gives each layer a fixed Erdos-Renyi-Kernel share "
            "and picks its weights at random; SSFL's one top-k over all layers lets the scores "
            "decide both which weights and how many per layer.")
    a, b = first_per_layer(runs, "ssfl", density), first_per_layer(runs, "random_erk", density)
    if a and b:
        ratio = sorted((a[n] / b[n], n) for n in a if b.get(n))
        text += (" SSFL's mask squeezes some middle and late convolutions well below ERK's "
                 "share (first seed, fraction kept, SSFL against ERK: "
                 + ", ".join(f"`{n}` {a[n]:.3f} against {b[n]:.3f}"
                             for _, n in ratio[:squeezed])
                 + f"; every layer in the table at density {density:g} above): the "
                 "bottleneck that pruning by saliency at initialisation is prone to "
                 "at high sparsity (at its worst a whole layer pruned away, the layer collapse "
                 "of Tanaka et al., 2020), where ERK's shares follow only each layer's shape "
                 "(Evci et al., 2020).")
    result = None
    if probe:
        mine = {r["seed"]: r for r in _select(probe["runs"], "ssfl", density)}
        both = [s for s in seeds if s in mine]
        if both:
            p = statistics.mean(mine[s]["final_accuracy"] * 100 for s in both)
            o, e = mean("ssfl", both), mean("random_erk", both)
            missing = [s for s in seeds if s not in mine]
            verdict = ("the layer shares account for the whole gap: the scores choose weights "
                       "within a layer as well as chance does or better, and what costs SSFL "
                       "here is how its global top-k shares the weights among layers"
                       if p >= e else
                       f"the layer shares account for part of the gap; within ERK's shares, "
                       f"choosing by score instead of at random still costs {e - p:.2f} points"
                       if p > o else
                       f"the layer shares do not account for the gap: within ERK's shares, "
                       f"choosing by score instead of at random costs {e - p:.2f} points, and "
                       f"SSFL's own shares (the first layers nearly dense) win back "
                       f"{o - p:.2f} of them")
            result = (f"SSFL's scores within ERK's per-layer shares (`algorithm.ssfl."
                      f"layer_budget=erk`, a diagnostic, not the paper's method; "
                      f"`{LAYER_PROBE_COMMAND}`), {seeds_phrase(both)}"
                      + (f" (not run on {seeds_phrase(missing)})" if missing else "")
                      + f": {p:.2f}%, against SSFL's {o:.2f}% and random ERK's {e:.2f}% on "
                      f"the same seeds, so {verdict}.")
    text += (" " + result if result else
             f" The test is SSFL's scores within ERK's shares: `{LAYER_PROBE_COMMAND}` "
             "(`algorithm.ssfl.layer_budget=erk`, a diagnostic, not the paper's method; not "
             "yet run).")
    dead = dead_units_note(units, density)
    return text + dead + (filter_floor_note(runs, floor, density) if dead else "") + "\n"


#: the deep reference's probe of the units SSFL's mask cuts off at low density: the same
#: scores and global top-k, with every filter's and every input channel's best weight first
FLOOR_PROBE = "cifar10_resnet18_cpu_ssfl_floor"
FLOOR_PROBE_COMMAND = _probe_command(FLOOR_PROBE, "algorithm.ssfl.min_per_unit=1", "ssfl",
                                     0.1)


def filter_floor_note(runs: list[dict[str, Any]], probe: dict[str, Any] | None,
                      density: float = 0.1) -> str:
    """Whether keeping every unit connected closes SSFL's gap to random ERK at ``density``: the
    floor probe (SSFL with ``min_per_unit = 1``) against SSFL and random ERK on the seeds all
    three have, with the change against SSFL per seed and SSFL's own seed-to-seed spread."""
    def final_by_seed(rows: list[dict[str, Any]], method: str) -> dict[int, float]:
        return {r["seed"]: r["final_accuracy"] * 100 for r in _select(rows, method, density)}

    ssfl, erk = final_by_seed(runs, "ssfl"), final_by_seed(runs, "random_erk")
    mine = final_by_seed(probe["runs"], "ssfl") if probe else {}
    seeds = sorted(s for s in mine if s in ssfl and s in erk)
    what = ("SSFL with no unit cut off (`algorithm.ssfl.min_per_unit=1`: each filter's and "
            "each input channel's best-scoring weight first, the rest of the k by SSFL's "
            "global top-k, so at most one weight moves per unit cut off; a "
            f"diagnostic, not the paper's method; `{FLOOR_PROBE_COMMAND}`)")
    if not seeds:
        return (f" Whether the units cut off are what costs SSFL is tested by {what}; not yet "
                "run.")
    mean = statistics.mean
    p, o, e = (mean(m[s] for s in seeds) for m in (mine, ssfl, erk))
    missing = sorted(s for s in ssfl if s in erk and s not in mine)
    spread = (f"; SSFL's own seed-to-seed spread here is {statistics.stdev(ssfl.values()):.2f}"
              if len(ssfl) > 1 else "")
    verdict = ("reconnecting them closes the whole gap: the units SSFL's mask cuts off are what "
               "cost it here" if p >= e else
               f"reconnecting them wins back {p - o:.2f} of the {e - o:.2f} points"
               if p > o else
               f"reconnecting them wins nothing back ({p - o:+.2f} points): one weight does not "
               "restore what a cut-off unit lost, or the units cut off are not what costs SSFL")
    return (f" Does reconnecting the units cut off close the gap? {what}, {seeds_phrase(seeds)}"
            + (f" (not run on {seeds_phrase(missing)})" if missing else "")
            + f": {p:.2f}%, against SSFL's {o:.2f}% and random ERK's {e:.2f}% on the same "
            "seeds (change against SSFL per seed: "
            + ", ".join(f"{mine[s] - ssfl[s]:+.2f}" for s in seeds) + f"{spread}), so {verdict}.")


def dead_units_note(units: dict[str, Any] | None, density: float) -> str:
    """What the dead-units measurement (benchmarks/mask_units.py) says at ``density``, and at
    the other densities measured: "" until it has rows at ``density``."""
    rows = (units or {}).get("rows", [])

    def percent(method: str, d: float, part: str = "dead_out", whole: str = "out"
                ) -> float | None:
        chosen = [100 * r[part] / r[whole] for r in rows
                  if r["method"] == method and r["density"] == d]
        return statistics.mean(chosen) if chosen else None

    if percent("ssfl", density) is None:
        return ""
    seeds = sorted({r["seed"] for r in rows if r["density"] == density})
    others = sorted({r["density"] for r in rows} - {density}, reverse=True)
    names = {"ssfl": "SSFL's masks", "ssfl_erk": "SSFL's scores within ERK's shares",
             "snip_single": "SNIP on one client's", "random_erk": "random ERK's"}

    def figures(part: str, whole: str) -> str:
        return ", ".join(f"{v:.1f}% in {names[m]}" for m in names
                         if (v := percent(m, density, part, whole)) is not None)

    at_others = [f"density {d:g}: {percent('ssfl', d):.1f}% and "
                 f"{percent('ssfl', d, 'unused_in', 'inputs'):.1f}% in SSFL's" for d in others
                 if percent("ssfl", d) is not None]
    return (" How the scores' choice within a layer differs from chance: a saliency mask cuts "
            "whole units off, which no random mask of the same shares measured here does. At "
            f"density {density:g} ({seeds_phrase(seeds)}; `python benchmarks/mask_units.py`, "
            "`benchmarks/results/mask_units.md`), the filters left with no weight at all are "
            + figures("dead_out", "out") + ", and the input channels that feed no kept weight "
            + figures("unused_in", "inputs")
            + (" (" + "; ".join(at_others) + ")" if at_others else "")
            + "; a dead filter outputs only its GroupNorm's shift and an unused input channel's "
            "signal goes nowhere in that layer, so the layers where they sit (the last two "
            "stages, per layer in that file) are narrower than their share of weights says. "
            "Random ERK's weights are fewer per filter but reach every filter and every input "
            "channel.")


def deep_section(data: dict[str, Any] | None) -> str:
    """The deep CPU reference: its tables once runs exist, else what it is and how to run it."""
    claim = dense_claim(data)
    continued_data = _load(f"{CONTINUED}/comparison.json")
    continued = continued_note(continued_data, spread=claim["spread"] if claim else None)
    intro = (f"`{DEEP_CONFIG}`: the paper's CIFAR-10 setting (100 clients, 10 per round, "
             "balanced Dirichlet 0.3) with ResNet-18 (GroupNorm) at a quarter of its width and "
             "the authors' local recipe, scaled down in two places so that the paper's "
             "comparison can be rerun on a CPU: one local epoch instead of five, and 120 rounds "
             "with the learning rate decayed by 0.965 a round instead of the authors' 0.998 "
             "over 1000. About 20 s a round and 42 minutes a run on one quiet core. The decay "
             "and the rounds were chosen, within about 45 minutes a run, for dense FedAvg's "
             "curve to settle: "
             "on seed 0, 80 rounds with the authors' 0.998 still gained 5.8 points over the "
             "last fifth, and " + calibration_note(_load(f"{CALIBRATION}/comparison.json"))
             + "; the settling table below holds the measurement for this config "
             "(`run.rounds=R train.lr_decay=D` reruns the others). "
             + (continued + " " if continued else "")
             + f"Every run: `{DEEP_COMMAND}` (runs in `runs/comparison-cifar10_resnet18_cpu/`, "
             "tables in `benchmarks/results/cifar10_resnet18_cpu/`; resumable).\n\n")
    if data is None:
        return intro + (f"_Not yet measured:_ the sweep is running ({DEEP_RUNS} runs of about "
                        "40 minutes each); its tables, the paper's claims point by point and "
                        "the verdicts land here as it finishes.\n")
    plots = "../benchmarks/results/cifar10_resnet18_cpu/comparison_accuracy_vs"
    return intro + (f"**So far: {deep_progress(data)}** (the results files are rewritten as "
                    "each run finishes; empty cells are runs still to come).\n\n"
                    + (RESULTS / "cifar10_resnet18_cpu" / "comparison.md").read_text()
                    + protocol_note(data)
                    + why_note(data, continued_data, _load(f"{LR_PROBE}/comparison.json"),
                               _load(f"{WIDTH_PROBE}/comparison.json"))
                    + layer_budget_note(data, _load(f"{LAYER_PROBE}/comparison.json"),
                                        _load("mask_units.json"),
                                        floor=_load(f"{FLOOR_PROBE}/comparison.json"))
                    + f"\n![accuracy during training at density 0.5]({plots}_round_d0.5.png)\n"
                    + (f"![accuracy on the authors' protocol during training at density 0.5]"
                       f"({plots}_round_d0.5_authors.png)\n"
                       if (RESULTS / "cifar10_resnet18_cpu"
                           / "comparison_accuracy_vs_round_d0.5_authors.png").exists() else "")
                    + f"![accuracy during training at density 0.1]({plots}_round.png)\n"
                    f"![accuracy against bytes]({plots}_bytes.png)\n")


def protocol_note(data: dict[str, Any], density: float = 0.5) -> str:
    """Why the DisPFL claim reads one way on the personalised protocol and the other on the
    authors': the three figures side by side, from the deep reference's run rows (means over
    the seeds each method has); empty until SSFL and DisPFL both have a run with local
    models scored."""
    runs = data["runs"]
    dispfl = _mean_accuracy(runs, "dispfl", density, "final_personal_accuracy")
    ssfl_global = _mean_accuracy(runs, "ssfl", density, "final_personal_accuracy")
    ssfl_local = _mean_accuracy(runs, "ssfl", density, "final_local_accuracy")
    if None in (dispfl, ssfl_global, ssfl_local):
        return ""
    return (f"\nThe two readings of the DisPFL claim at density {density:g} differ because "
            "personalisation, not the sparse network, decides them. On each client's own test "
            f"split DisPFL's own models reach {dispfl:.2f}%, SSFL's one global model "
            f"{ssfl_global:.2f}%, and SSFL's clients' models after one local epoch on top of "
            f"that global model (the authors' protocol, which the paper's figures use) "
            f"{ssfl_local:.2f}%. A client's test split follows its own few classes, so a model "
            "fitted to them wins there; DisPFL's models are fitted to their clients but each "
            "learns from its neighbours only when its client is sampled (about one round in "
            "ten; the authors train every client every round, see docs/dispfl.md), while every "
            "SSFL client starts each round from a model that all clients trained. Held to the "
            "same protocol, each method with its own clients' models, SSFL is "
            + (f"{ssfl_local - dispfl:.2f} points ahead" if ssfl_local > dispfl
               else f"{dispfl - ssfl_local:.2f} points behind") + ".\n")


def _spread_note(data: dict[str, Any]) -> str:
    spread = data.get("seed_spread") or {}
    single = [m for m in ("snip_single", "prunefl") if m in spread]
    if "ssfl" not in spread or not single:
        return ""
    steadier = all(spread["ssfl"] < spread[m] for m in single)
    return ("\nSeed to seed, SSFL's final accuracy varies "
            + ("less than" if steadier else "about as much as")
            + " that of the methods whose mask comes from one client's data (SNIP on one "
            "client; PruneFL, whose initial pruning runs on one client): "
            + ", ".join(f"{m} {spread[m]:.2f}" for m in ["ssfl", *single])
            + " points (table above). Averaging every client's scores is what the federated "
            "mask buys even where its mean accuracy does not stand out.\n")


def _noise_note(data: dict[str, Any]) -> str:
    noise, spread = data.get("last_step_noise"), data.get("leading_spread")
    if noise is None or spread is None:
        return ""
    compared = "more than" if noise > spread else "against"
    return (f"\nHow far a final figure can be trusted: between a run's last two evaluations "
            f"(rounds 50 and 60) its global accuracy moves by {noise:.1f} points on average "
            f"(mean absolute change over all runs), {compared} the gap between the best and "
            f"the third-best method at any density ({spread:.1f} points at most). The "
            "curves (last plot) are still rising at round 60 and move with the clients each "
            "round happens to sample, so differences of a point "
            "or less between methods need the seeds' standard deviations above before they "
            "are read as a ranking.\n")


def noniid_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/comparison.py noniid`._\n"
    seeds = sorted({r["seed"] for r in data["runs"]})
    per_cell = Counter((r["algorithm"], r["split"]) for r in data["runs"]).values()
    fewest, most = min(per_cell), max(per_cell)
    cell_text = f"{fewest}" if fewest == most else f"{fewest} to {most}"
    return (f"Config `{data['config']}`, density 0.2, seeds {', '.join(map(str, seeds))} "
            f"({cell_text} per method and split).\n\n"
            + (RESULTS / "noniid.md").read_text()
            + "\n![non-IID sweep](../benchmarks/results/noniid_accuracy.png)\n"
            "\nReading the sweep: the more skewed the split, the lower the global models, up to "
            "differences within a run's noise (DisPFL's consensus model follows no order), "
            "and the order of the federated sparse methods changes from split to split, "
            "within a few points of each other. On the pathological split (each client holds "
            "two classes) no global model gets far in 60 rounds of one local epoch, dense "
            "FedAvg included; DisPFL's personal models, each judged on its own two classes, "
            "are the one method that profits from the skew, and their consensus model is a "
            "by-product, not a trained global model.\n")


def mask_analysis_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/mask_analysis.py`._\n"
    return ((RESULTS / "mask_analysis.md").read_text()
            + "\n![mask overlap](../benchmarks/results/mask_overlap.png)\n"
            + "\nReading the overlap tables: the federated mask gets closer to the oracle as "
            "clients are added, fast up to about 20 clients, and more saliency batches per "
            "client help most when few clients score. It levels off below the overlap of the "
            "`snip_oracle` method's own, noisier mask, even with as many scored samples as the "
            "reference (100 clients x 8 batches of 32 = 800 pooled batches): SNIP takes "
            "|dL/dw * w| per minibatch before averaging, and a client's minibatch holds only "
            "the few classes that client has, so the federated mean of absolute values is a "
            "different statistic from the pooled one, not a noisier estimate of it. That "
            "bias, not the number of samples, is what the non-IID split costs the mask. "
            "The per-layer tables show where each method spends its budget: the saliency "
            "masks (SSFL, oracle, single client) and SparsyFed's magnitude masks keep most "
            "of `conv1` and, down to density 0.1, most of `conv2` and the classifier, and "
            "prune the 1 M-weight `fc1`; a random global mask prunes every layer alike (which "
            "is why it collapses at low density); ERK (random_erk, FedDST's start, DisPFL) "
            "gives small layers a higher density by construction (`conv1` and `fc2` whole "
            "down to density 0.1).\n")


def checkpoint_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/checkpoint_overhead.py`._\n"
    lines = ["| model | round (s) | checkpoint save (ms) | checkpoint size (MB) | overhead, "
             "saved every round | overhead, saved every 10 rounds |", "|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['model']} ({r['clients_per_round']} clients x "
                     f"{r['samples_per_client']} samples) | {r['round_seconds']:.2f} | "
                     f"{r['checkpoint_seconds'] * 1000:.0f} | {r['checkpoint_bytes'] / 1e6:.1f} | "
                     f"{r['overhead_every_round']:.4f} | {r['overhead_every_10_rounds']:.4f} |")
    return "\n".join(lines) + "\n"


def comm_time_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/comm_time.py` (as root)._\n"
    def f(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    sparse = data.get("sparse_algorithm", "ssfl")
    lines = [f"`{data['command']}` (qdisc {data['qdisc']}; sparse runs: `{sparse}`; config "
             f"`{' '.join(data['config'])}`). Per training round, means over the rounds: "
             "communication = round time - slowest client's compute - aggregation; *fixed* = "
             "the communication time of the unshaped run (same namespace and veth, no rate "
             "limit: Flower's message delivery, ClientApp process start and polling); *excess* "
             "= communication - fixed, the part the bandwidth adds. Ratios are sparse / dense "
             "at the same link.\n",
             "| link | density | round (s) | communication (s) | fixed (s) | excess (s) | "
             "wire MB per round | time ratio | excess time ratio | wire byte ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for link, by_density in data["summary"].items():
        for density, r in sorted(by_density.items(), key=lambda kv: -float(kv[0])):
            lines.append(
                f"| {link} | {float(density):g} | {f(r['seconds'], '.1f')} | "
                f"{f(r['comm_seconds'], '.1f')} | {f(r.get('fixed_comm_seconds'), '.1f')} | "
                f"{f(r.get('excess_comm_seconds'), '.1f')} | "
                f"{f(r['wire_bytes'] and r['wire_bytes'] / 1e6, '.2f')} | "
                f"{f(r['time_ratio'], '.3f')} | {f(r.get('excess_time_ratio'), '.3f')} | "
                f"{f(r['wire_byte_ratio'], '.3f')} |")
    return "\n".join(lines) + "\n"


def comm_time_verdict(data: dict[str, Any] | None) -> str:
    """How far the time ratio is from the byte ratio at 20 Mbit/s and below (the bar: 15%)."""
    if data is None:
        return ""
    lines = ["\nTime ratio against wire byte ratio at 20 Mbit/s and below (bar: within 15%):\n",
             "| link | density | time ratio / byte ratio - 1 | excess time ratio / byte ratio - 1 "
             "| within 15% |", "|---|---|---|---|---|"]
    fixed: list[float] = []
    slow_excess: list[float] = []  # |excess time ratio / byte ratio - 1| at 5 Mbit/s and below
    for link, by_density in data["summary"].items():
        if not link.endswith("mbit") or float(link[:-4]) > 20:
            if link == "unshaped":
                fixed = [r["comm_seconds"] for r in by_density.values()]
            continue
        for density, r in sorted(by_density.items(), key=lambda kv: -float(kv[0])):
            if float(density) >= 1.0 or not r.get("wire_byte_ratio"):
                continue
            raw = r["time_ratio"] / r["wire_byte_ratio"] - 1
            excess = (r["excess_time_ratio"] / r["wire_byte_ratio"] - 1
                      if r.get("excess_time_ratio") is not None else None)
            if excess is not None and float(link[:-4]) <= 5:
                slow_excess.append(abs(excess))
            lines.append(f"| {link} | {float(density):g} | {raw:+.1%} | "
                         + ("—" if excess is None else f"{excess:+.1%}")
                         + f" | {'yes' if abs(raw) <= 0.15 else 'no'} |")
    note = ""
    speedups = [f"{link[:-4]} Mbit/s: {d['1.0']['comm_seconds'] / d['0.1']['comm_seconds']:.1f}x"
                for link, d in data["summary"].items()
                if link.endswith("mbit") and "1.0" in d and "0.1" in d]
    if speedups:
        note += ("\nThe paper measured 2.3 times less aggregation communication time at 90% "
                 "sparsity than dense across five cloud regions; here, at density 0.1, "
                 "communication is " + ", ".join(speedups) + " shorter than dense.\n")
    if fixed:
        ours = ("our import of torch and the data and model set-up in that process"
                if "--no-worker" in data.get("command", "") else
                "our part of it is gone: the SuperNode's worker keeps torch, data and model "
                "loaded")
        note += (f"\nThe unshaped rounds still spend {min(fixed):.1f} to {max(fixed):.1f} s in "
                "communication: Flower 1.42's fixed cost per message (the idle SuperNode pulls "
                "every 3 s, every message starts a new ClientApp process: Python, `import "
                f"flwr`, the task and the FAB; {ours}; then the reply waits for the "
                "SuperNode's 0.5 s poll) plus, for the larger payloads, serialising them on a "
                "2-core machine. Where the transfer is short (a sparse model on a fast link) "
                "that fixed cost, not the bytes, sets the round time, so the time ratio stays "
                "above the byte ratio. The excess over the unshaped run follows the bytes where "
                "the transfer is long"
                + (f" (at 5 Mbit/s within {max(slow_excess):.0%} of the byte ratio)"
                   if slow_excess else "")
                + "; where it is a fraction of a second (20 Mbit/s at low density) it is lost "
                "in the fixed cost's variation from round to round. "
                "[docs/flower.md](flower.md#where-a-rounds-time-goes) breaks the fixed cost down "
                "and says which part is ours.\n")
    return "\n".join(lines) + "\n" + note


def worker_comparison(new: dict[str, Any] | None, old: dict[str, Any] | None) -> str:
    """The same benchmark with and without the SuperNode's worker, side by side."""
    if new is None or old is None:
        return ""
    lines = ["\n### With and without the SuperNode's worker\n",
             f"Without: `{old['command']}` ({old.get('note', '')}). With: the table above. "
             "Per training round, means over the rounds; *ratio gap* = time ratio / wire byte "
             "ratio - 1 (the bar: within 15% at 20 Mbit/s and below).\n",
             "| link | density | communication without (s) | with (s) | ratio gap without | "
             "with |", "|---|---|---|---|---|---|"]
    for link, by_density in new["summary"].items():
        before = old["summary"].get(link, {})
        for density, r in sorted(by_density.items(), key=lambda kv: -float(kv[0])):
            o = before.get(density)
            if o is None:
                continue

            def gap(x: dict[str, Any]) -> str:
                if float(density) >= 1.0 or not x.get("wire_byte_ratio"):
                    return "—"
                return f"{x['time_ratio'] / x['wire_byte_ratio'] - 1:+.1%}"

            lines.append(f"| {link} | {float(density):g} | {o['comm_seconds']:.1f} | "
                         f"{r['comm_seconds']:.1f} | {gap(o)} | {gap(r)} |")
    return "\n".join(lines) + "\n"


def readme_with_headline(readme: str, data: dict[str, Any],
                         deep: dict[str, Any] | None = None) -> str:
    """``readme`` with the block between the headline markers replaced by the summary of the
    main sweep's runs in ``data`` (a comparison.json) and, where ``deep`` (the deep CPU
    reference's comparison.json) holds the paper's claims, their verdicts."""
    start, end = readme.find(HEADLINE_START), readme.find(HEADLINE_END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md lacks the lines {HEADLINE_START!r} ... {HEADLINE_END!r} "
                         "around the comparison headline; put them back where it belongs")
    body = textwrap.fill(readme_headline(data["runs"]), width=100)
    if deep and deep.get("paper_claims"):
        body += "\n\n" + textwrap.fill(deep_headline(deep), width=100)
    return readme[:start] + HEADLINE_START + "\n" + body + "\n" + readme[end:]


def deep_headline(deep: dict[str, Any]) -> str:
    """The README's sentence on the deep CPU reference: each of the paper's claims with the
    paper's figure, then our figure and verdict on each protocol it is held to."""
    rounds = max(r["rounds"] for r in deep["runs"])
    dense = dense_claim(deep)
    by_claim: dict[str, list[dict[str, Any]]] = {}
    for c in deep["paper_claims"]:
        by_claim.setdefault(c["claim"], []).append(c)

    def reading(c: dict[str, Any]) -> str:
        ahead = (f", ahead at {c['ahead'][0]} of {c['ahead'][1]} evaluations paired by seed"
                 if c.get("ahead") else "")
        return f"{c.get('protocol', 'global')} protocol {c['ours']}: {c['verdict']}{ahead}"

    return ("On the deep CPU reference (ResNet-18 with GroupNorm at a quarter width, "
            f"{rounds} rounds, {deep_progress(deep)}; `{DEEP_COMMAND}`), the "
            "paper's claims at density 0.5: "
            + "; ".join(f"{claim} (the paper's {cs[0]['paper']}): ours on the "
                        + ", on the ".join(reading(c) for c in cs)
                        for claim, cs in by_claim.items()) + "."
            + (f" {why_title(dense)}, and what was tried: "
               "[docs/benchmarks.md](docs/benchmarks.md#the-deep-cpu-reference-resnet-18)."
               if needs_why(dense) else ""))


def threads_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/threads.py`._\n"
    table = (RESULTS / "threads.md").read_text().split("\n", 4)[4]
    rows = data["runs"]

    def ratio(condition: str, workload: str, threads: int, key: str) -> float:
        one = next(r for r in rows if (r["condition"], r["workload"], r["threads"])
                   == (condition, workload, 1))
        other = next(r for r in rows if (r["condition"], r["workload"], r["threads"])
                     == (condition, workload, threads))
        return other[key] / one[key]

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    quiet = [ratio("quiet", w, 0, "wall_seconds") for w in workloads]
    busy = [ratio("busy", w, 0, "wall_seconds") for w in workloads]
    return (table + f"\nOn the quiet machine PyTorch's default ({data['cores']} threads here) "
            f"changes the wall time by a factor of {min(quiet):.2f} to {max(quiet):.2f} "
            f"against one thread and always costs more CPU time; beside {data['cores']} "
            f"busy processes, as on a shared CI machine or in a sweep of parallel runs, it is "
            f"{min(busy):.1f} to {max(busy):.1f} times slower. So `run.threads` defaults to 1; "
            "on a machine of its own, a larger model gains from `run.threads=0`.\n")


def saliency_verdict(trained: list[dict[str, Any]]) -> str:
    """What the augmented score batches did to SSFL's final accuracy, from the paired runs
    (``train`` and ``off`` of the same density and seed): the direction at each density and
    where the mean change exceeds the seed-to-seed spread of the paired changes."""
    by_density: dict[float, list[float]] = {}
    for r in trained:
        by_density.setdefault(r["density"], []).append((r["train"] - r["off"]) * 100)
    stats = {d: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
             for d, v in sorted(by_density.items(), reverse=True)}
    lower = [d for d, (m, _, _) in stats.items() if m < 0]
    every = "SSFL's final accuracy at every density measured"
    direction = (f"lowers {every}" if len(lower) == len(stats) else f"raises {every}"
                 if not lower else "moves SSFL's final accuracy both ways")
    clear = [f"{d:g}" for d, (m, sd, n) in stats.items() if n > 1 and abs(m) > sd]
    return (f"Scoring augmented batches {direction} here ("
            + ", ".join(f"{m:+.1f} ± {sd:.1f} points at {d:g}" for d, (m, sd, _) in stats.items())
            + ", paired by seed)"
            + (f"; the change is larger than its seed-to-seed spread at {', '.join(clear)}"
               if clear else "; no change is larger than its seed-to-seed spread")
            + ". The CPU reference config " + ("therefore " if len(lower) == len(stats) else "")
            + "keeps `saliency_augment = \"off\"`, the "
            "setting every table on this page was measured with; the library's default and the "
            "paper-scale configs follow the authors, whose figures were measured with augmented "
            "batches.\n")


def saliency_augment_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/saliency_augment.py mask`._\n"
    table = (RESULTS / "saliency_augment.md").read_text().split("\n", 4)[4]
    trained = data.get("train", [])
    verdict = (saliency_verdict(trained) if trained else
               "The accuracy of the augmented masks has not been measured yet (`python "
               "benchmarks/saliency_augment.py train`: SSFL at the four densities, 3 seeds, "
               "about 8 minutes a run here). Until it has, the CPU reference config keeps "
               "`saliency_augment = \"off\"`, the setting every table on this page was "
               "measured with, while the library's default follows the authors.\n")
    return (table + "\nThe authors score the first batch of their shuffled training loader, "
            "which crops and flips; this project scored the images as they are until "
            "`saliency_augment` existed. For scale at density 0.5: the unaugmented SSFL mask "
            "overlaps the pooled-data oracle by 0.92 and a random mask by 0.33 (the mask "
            "analysis above). The per-layer budget hardly moves; which weights inside each "
            "layer are kept does.\n\n" + verdict)


def main() -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(
        "# Benchmarks\n\n"
        "Generated by `python benchmarks/render_docs.py` from `benchmarks/results/`; each "
        "section names the command that produced its figures. Machine: 2 CPU cores, no GPU.\n\n"
        "## Method comparison on the CPU reference setting\n\n"
        "`python benchmarks/comparison.py main` (CIFAR-10, 100 clients, 10 per round, balanced "
        "Dirichlet alpha 0.3, small CNN, 60 rounds). Runs with the same seed share the "
        "partition, the initial weights and the client sampling. Every table says which "
        "evaluation protocol it uses: *global* is the central test set (for DisPFL, which has "
        "no global model, the consensus model: each weight averaged over the clients that hold "
        "it); *personalised* is each client's model on a test split that follows its own "
        "class distribution.\n\n"
        "The same sweep at the paper's scale (ResNet-18 with GroupNorm, 5 local epochs, 1000 "
        "rounds) is one command on a GPU machine: `python benchmarks/comparison.py main "
        "--config configs/cifar10_resnet18_paper.toml --jobs 1` (every run trains on the GPU, "
        "`run.device = \"auto\"`; runs in `runs/comparison-cifar10_resnet18_paper/`, tables in "
        "`benchmarks/results/cifar10_resnet18_paper/`). It has not run: no GPU has been lent "
        "to this project so far. " + paper_run_time() + "\n\n"
        + comparison_section(_load("comparison.json"))
        + "\n## The deep CPU reference (ResNet-18)\n\n"
        + deep_section(_load("cifar10_resnet18_cpu/comparison.json"))
        + "\n## Non-IID sweep\n\n`python benchmarks/comparison.py noniid`: the same setting "
        "at density 0.2 over balanced Dirichlet splits (alpha 0.1 to 1; smaller is more "
        "skewed) and the pathological split (2 classes per client), for dense FedAvg, SSFL, "
        "the random mask and the published methods (the mask ablations are the main sweep's "
        "question).\n\n"
        + noniid_section(_load("noniid.json"))
        + "\n## Mask analysis\n\n`python benchmarks/mask_analysis.py`.\n\n"
        + mask_analysis_section(_load("mask_analysis.json"))
        + "\n## Saliency on augmented batches\n\n`python benchmarks/saliency_augment.py "
        "mask`: the SSFL mask from cropped and flipped score batches (the authors' choice, "
        "`algorithm.ssfl.saliency_augment = \"train\"`, the default) against the same "
        "clients' unaugmented batches (`\"off\"`), at the four densities, seeds 0, 1, 2.\n\n"
        + saliency_augment_section(_load("saliency_augment.json"))
        + "\n## Simulator overhead\n\n`python benchmarks/throughput.py`: samples/s of a whole "
        "simulated client round (payload decode, scatter, batch assembly and augmentation, "
        "masked SGD, gather, encode) against a plain PyTorch loop over the same, "
        "ready-made batches.\n\n"
        + throughput_section(_load("throughput.json"))
        + "\n## Threads per run\n\n`python benchmarks/threads.py`: one `ssfl run` process "
        "per workload and `run.threads` (1, 2, 0 = PyTorch's default), its wall time and the "
        "CPU time it used, on the quiet machine and beside as many CPU-bound processes as it "
        "has cores (busy). Ratios are against one thread in the same condition.\n\n"
        + threads_section(_load("threads.json"))
        + "\n## Memory\n\n`python benchmarks/memory.py`: peak resident memory of whole "
        "`ssfl run` processes; clients are index sets into one uint8 tensor and share one "
        "model, so memory does not grow with the number of clients.\n\n"
        + memory_section(_load("memory.json"))
        + "\n## Checkpoint overhead\n\n`python benchmarks/checkpoint_overhead.py`: time to "
        "save one checkpoint of the server state, as a fraction of the round it protects "
        "(median of repeats, same process).\n\n"
        + checkpoint_section(_load("checkpoint_overhead.json"))
        + "\n## Communication time on a shaped Flower deployment\n\n"
        "`python benchmarks/comm_time.py` (root): SuperNodes in their own network namespace "
        "behind a rate-limited veth pair; bytes from the interface counters. The ResNet-18 "
        "preset's sparse runs use `snip_single`: its training rounds carry exactly SSFL's bytes "
        "(the same density, values only); SSFL's one-time mask round would ask each of the "
        "preset's 1000 clients for a dense score upload, which is not part of a round.\n\n"
        + comm_time_section(_load("comm_time.json"))
        + comm_time_verdict(_load("comm_time.json"))
        + worker_comparison(_load("comm_time.json"), _load("comm_time_no_worker.json"))
    )
    print(f"written {DOC}")
    comparison = _load("comparison.json")
    if comparison is not None:
        README.write_text(readme_with_headline(README.read_text(), comparison,
                                               _load("cifar10_resnet18_cpu/comparison.json")))
        print(f"written the comparison headline in {README}")


if __name__ == "__main__":
    main()
