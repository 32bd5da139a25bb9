"""Write docs/benchmarks.md from the result files in benchmarks/results/.

Every figure in the page is read from a results file that a benchmark script wrote, so the page
never drifts from what the commands produce:

    python benchmarks/throughput.py     # -> results/throughput.json
    python benchmarks/memory.py         # -> results/memory.json
    python benchmarks/reference.py      # -> results/reference.json (+ plots)
    python benchmarks/checkpoint_overhead.py  # -> results/checkpoint_overhead.json
    python benchmarks/render_docs.py    # -> docs/benchmarks.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"


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


def reference_section(data: dict[str, Any] | None) -> str:
    if data is None:
        return "_Not yet measured: run `python benchmarks/reference.py`._\n"
    table = (RESULTS / "reference.md").read_text()
    runs = {r["name"]: r for r in data["runs"]}
    note = ""
    if "ssfl-d0.1-s0" in runs:
        r = runs["ssfl-d0.1-s0"]
        share = sum(r["one_time_bytes"].values()) / r["total_bytes"]
        walls = [round(x["wall_seconds"]) for x in data["runs"]]
        note = (f"\nWall time per run: {min(walls)} to {max(walls)} s (the longer ones shared "
                f"the two cores with other jobs).\n")
        note += (f"\nSSFL's one-time cost is one dense float32 score upload per client (plus the "
                f"mask bitmap). In these {r['rounds']}-round runs it is {share:.0%} of everything "
                f"SSFL at density 0.1 sends; over the paper's 1000 rounds it would be a few "
                f"percent. The per-round ratio to dense is density plus the dense biases, as "
                f"the table shows.\n")
    return (f"Config `{data['config']}`"
            + (f" with overrides `{' '.join(data['overrides'])}`" if data["overrides"] else "")
            + ".\n\n" + table + note
            + "\n![accuracy against rounds](../benchmarks/results/reference_accuracy_vs_round.png)"
            + "\n![accuracy against bytes](../benchmarks/results/reference_accuracy_vs_bytes.png)\n")


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
    lines = [f"`{data['command']}` (qdisc {data['qdisc']}; config `{' '.join(data['config'])}`)."
             " Communication time = round time - slowest client's compute - aggregation.\n",
             "| link | density | round (s) | communication (s) | wire MB per round | "
             "time ratio to dense | wire byte ratio to dense |", "|---|---|---|---|---|---|---|"]
    for link, by_density in data["summary"].items():
        for density, r in by_density.items():
            lines.append(f"| {link} | {density} | {r['seconds']:.1f} | {r['comm_seconds']:.1f} |"
                         f" {r['wire_bytes'] / 1e6:.2f} | {r['time_ratio']:.2f} | "
                         f"{r['wire_byte_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(
        "# Benchmarks\n\n"
        "Generated by `python benchmarks/render_docs.py` from `benchmarks/results/`; each "
        "section names the command that produced its figures. Machine: 2 CPU cores, no GPU.\n\n"
        "## CPU reference experiment: SSFL against a random static mask\n\n"
        "`python benchmarks/reference.py` (CIFAR-10, 100 clients, 10 per round, balanced "
        "Dirichlet alpha 0.3, small CNN; SSFL and the random mask share the seed, hence the "
        "partition, initial weights and client sampling). Dense FedAvg is the density-1 row.\n\n"
        + reference_section(_load("reference.json"))
        + "\n## Simulator overhead\n\n`python benchmarks/throughput.py`: samples/s of a whole "
        "simulated client round (payload decode, scatter, batch assembly and augmentation, "
        "masked SGD, gather, encode) against a plain PyTorch loop over the same, "
        "ready-made batches.\n\n"
        + throughput_section(_load("throughput.json"))
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
        "behind a rate-limited veth pair; bytes from the interface counters.\n\n"
        + comm_time_section(_load("comm_time.json"))
        + "\nAt this size Flower's fixed per-round cost (a new ClientApp process per message, "
        "about 3 s of start-up each, and the SuperNodes' polling) dominates the round, so the "
        "time ratio does not follow the byte ratio yet; see the note on issue 4.\n"
    )
    print(f"written {DOC}")


if __name__ == "__main__":
    main()
