"""What secure aggregation costs on Flower (docs/secure_aggregation.md): per-round bytes and time
with and without SecAgg+ on one local deployment, and accuracy parity on the quickstart.

    python benchmarks/secagg.py                         # both parts; results/secagg.{json,md}
    python benchmarks/secagg.py deployment --rounds 3 --densities 1.0 0.1 0.05
    python benchmarks/secagg.py parity --rounds 50 --densities 0.5
    python benchmarks/secagg.py parity --config configs/cifar10_cpu.toml   # the CPU reference
    python benchmarks/secagg.py report                  # the tables again from secagg.json

``deployment``: the quickstart (``configs/quickstart.toml``: digits, 20 clients, 5 per round,
balanced Dirichlet 0.3) shortened to ``--rounds`` rounds, dense FedAvg at density 1 and SSFL
below, each run twice, plain and with ``flower.secure-aggregation = true``, on ONE local
deployment (SuperLink and SuperNodes as processes on 127.0.0.1, each SuperNode with its
persistent worker): every client that the run samples has a SuperNode of its own (SecAgg+
needs that), one more SuperNode without a partition answers the others' mask-round messages
(``comm_time.node_plan``; the sample is seeded, so every run samples the same clients). Per
round it records the ledger's bytes (payloads; with SecAgg+ also the protocol's keys and
shares: ``secagg``), the round's seconds, the four stages' seconds, and once per run every
message as Flower serialises it (``message_wire_bytes``). The SuperNodes' workers are started
by the first run, so the first run's mask round is slower; the rounds are not affected.

``parity``: a full run of ``--config`` (the quickstart unless given; its rounds and density
unless ``--rounds``/``--densities``), plain vs SecAgg+, in process:
the real ServerApp and ClientApp code with every message through Flower's serialisation
(``tests/flower_grid.py``'s in-memory Grid, one node per client), so that 50 rounds take
minutes, not the hours of 200 SecAgg+ messages per round through Flower's process-per-message
engine. Records each round's accuracy, the largest difference of the global values after
round 1 (against the quantisation bound) and at the end.

Run it with one thread, under nice: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/secagg.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from comm_time import _wait_health, node_plan  # noqa: E402  (a sibling script)

CONFIG = REPO / "configs" / "quickstart.toml"
OUT = HERE / "results" / "secagg"
# The plain mean without SecAgg+ too (the default "auto" is the mean under SecAgg+ only), so
# that both sides of every comparison compute the same aggregate.
BASE = ["run.threads=1", "run.progress=false", "run.checkpoint_every=0",
        "federation.aggregator=mean"]
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def method(density: float) -> list[str]:
    if density >= 1.0:
        return ["algorithm.name=fedavg", "algorithm.density=1.0"]
    return ["algorithm.name=ssfl", f"algorithm.density={density}"]


# ---- part 1: one local deployment ---------------------------------------------------------


def deployment(densities: Sequence[float], rounds: int, timeout: float) -> list[dict[str, Any]]:
    from ssfl.config import load_config
    from ssfl.flower.local import (
        LocalDeployment,
        flower_env,
        flwr_run,
        free_port,
        processes_of,
        worker_node_config,
        write_connection,
    )
    from ssfl.flower.protocol import FlowerSettings, run_config_from_config, run_config_toml
    from ssfl.flower.runconfig import write_app

    config = load_config(str(CONFIG), [*BASE, f"run.rounds={rounds}"])
    fed = config.federation
    pinned, pool = node_plan(fed.num_clients, rounds, fed.clients_per_round, config.run.seed)
    workdir = Path(tempfile.mkdtemp(prefix="ssfl-secagg-")).resolve()
    flwr_home = workdir / "flwr-home"
    port = free_port()
    write_connection(flwr_home, port)
    dep = LocalDeployment(workdir, port, flower_env(flwr_home, workdir))
    env_node = worker_node_config(workdir)
    app = write_app(workdir / "app").parent
    records: list[dict[str, Any]] = []

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the finally below stops every process of the deployment

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        link = dep.start("superlink", ["flower-superlink", "--host", "127.0.0.1", "--port",
                                       str(port), "--insecure",
                                       "--disable-runtime-dependency-installation"])
        _wait_health(f"http://127.0.0.1:{port}/health", link, time.monotonic() + 60)
        nodes = [(f"supernode-{c}", f"partition-id={c} num-partitions={fed.num_clients} "
                  f"{env_node}") for c in pinned] + ([("supernode-pool", env_node)] if pool else [])
        for name, node_config in nodes:
            dep.start(name, ["flower-supernode", "--superlink", f"127.0.0.1:{port}",
                             "--insecure", "--host", "127.0.0.1", "--port", str(free_port()),
                             "--node-config", node_config])
        print(f"deployment: SuperLink + {len(nodes)} SuperNodes ({len(pinned)} pinned"
              f"{', 1 pooled' if pool else ''}) in {workdir}", flush=True)
        for density in densities:
            for secure in (False, True):
                cfg = load_config(str(CONFIG), [*BASE, f"run.rounds={rounds}",
                                                f"run.name=secagg-{density}-{int(secure)}",
                                                *method(density)])
                run_dir = workdir / f"run-{density}-{'secure' if secure else 'plain'}"
                settings = FlowerSettings(run_dir=str(run_dir), min_nodes=len(nodes),
                                          round_timeout_seconds=600.0,
                                          secure_aggregation=secure)
                run_config = workdir / f"{run_dir.name}.toml"
                run_config.write_text(run_config_toml(run_config_from_config(cfg, settings)))
                started = time.perf_counter()
                flwr_run(dep, app, run_config, timeout, echo=False)
                record = read_run(run_dir, density, secure, cfg.federation.clients_per_round)
                record["run_seconds"] = time.perf_counter() - started
                records.append(record)
                print(f"  density {density} {'SecAgg+' if secure else 'plain  '}: "
                      f"{record['round_seconds']:.1f} s/round, "
                      f"{record['bytes_per_round']['up'] / 1e3:.1f} kB up, "
                      f"{record['bytes_per_round']['down'] / 1e3:.1f} kB down per round, "
                      f"accuracy {record['final_accuracy']:.4f}", flush=True)
    finally:
        dep.stop()
        for pid in processes_of(workdir):  # this deployment's own processes only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    return records


def read_run(run_dir: Path, density: float, secure: bool, per_round: int) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    summary = json.loads((run_dir / "summary.json").read_text())
    if secure:
        stages = summary["secagg_message_bytes_per_round"]
        wire = {"down": sum(s["down"] for s in stages.values()),
                "up": sum(s["up"] for s in stages.values())}
    else:
        one = summary["message_bytes_per_round"]  # one message and one reply
        wire = {"down": one["down"] * per_round, "up": one["up"] * per_round}
        stages = {}
    return {
        "density": density, "secure": secure, "rounds": len(rows),
        "round_seconds": statistics.mean(r["seconds"] for r in rows),
        "round_seconds_each": [r["seconds"] for r in rows],
        "stage_seconds": {s: statistics.mean(r["secagg_stage_seconds"][s] for r in rows)
                          for s in STAGES} if secure else {},
        "client_compute_seconds": statistics.mean(max(r["client_compute_seconds"])
                                                  for r in rows),
        "bytes_per_round": {"down": statistics.mean(r["bytes_down"] for r in rows),
                            "up": statistics.mean(r["bytes_up"] for r in rows)},
        "wire_bytes_per_round": wire, "wire_bytes_by_stage": stages,
        "accuracy": [r["accuracy"] for r in rows],
        "final_accuracy": summary["final_accuracy"],
        "num_values": summary["num_values"], "one_time_bytes": summary["one_time_bytes"],
        "clipped": sum(r.get("secagg_clipped", 0) for r in rows),
    }


# ---- part 2: accuracy parity, in process --------------------------------------------------


def parity(densities: Sequence[float], rounds: int,
           config_path: Path = CONFIG) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "tests"))
    from flower_grid import InMemoryGrid  # Flower's message path without processes
    from flwr.supercore.task_identity import TaskIdentity

    from ssfl.config import load_config
    from ssfl.flower.protocol import FlowerSettings, run_config_from_config
    from ssfl.flower.server_app import run_on_grid
    from ssfl.run.experiment import prepare, sample_clients

    # In-process replies need a task identity (a real ClientApp process has one).
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1

    def run(config: Any, secure: bool) -> tuple[Any, float]:
        n = config.federation.num_clients
        nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
        settings = FlowerSettings(node_wait_seconds=5, secure_aggregation=secure)
        started = time.perf_counter()
        result = run_on_grid(InMemoryGrid(run_config_from_config(config, settings), nodes),
                             config, settings, write=False)
        return result, time.perf_counter() - started

    out = []
    for density in densities:
        # Round 1 alone: both runs start from the same global values and the same mask, so
        # their difference after it is SecAgg+'s quantisation (bounded), nothing else.
        one = load_config(str(config_path), [*BASE, "run.rounds=1", *method(density)])
        plain_1, secure_1 = run(one, False)[0], run(one, True)[0]
        sizes = [len(p) for p in prepare(one).parts]
        first = sample_clients(one.run.seed, 1, one.federation.num_clients,
                               one.federation.clients_per_round)
        defaults = FlowerSettings()
        step = 2 * defaults.secagg_clipping_range / defaults.secagg_quantization_range
        bound = len(first) * step / (sum(sizes[c] for c in first) / max(sizes))
        config = load_config(str(config_path), [*BASE, f"run.rounds={rounds}",
                                                 *method(density)])
        (plain, t_plain), (secure, t_secure) = run(config, False), run(config, True)
        # Only the evaluated rounds have an accuracy (run.eval_every; the quickstart
        # evaluates every round, the CPU reference every tenth).
        rows_p, rows_s = ([r for r in run["metrics"] if r["accuracy"] is not None]
                          for run in (plain, secure))
        evaluated = [r["round"] for r in rows_p]
        acc_p, acc_s = [r["accuracy"] for r in rows_p], [r["accuracy"] for r in rows_s]
        record = {
            "config": config_name(config_path), "density": density, "rounds": rounds,
            "evaluated_rounds": evaluated,
            "accuracy_plain": acc_p, "accuracy_secure": acc_s,
            "final_accuracy": {"plain": acc_p[-1], "secure": acc_s[-1]},
            "best_accuracy": {"plain": max(acc_p), "secure": max(acc_s)},
            "max_accuracy_difference": max(abs(a - b) for a, b in zip(acc_p, acc_s)),
            "values_difference_after_round_1": float(
                (secure_1["values"] - plain_1["values"]).abs().max()),
            "quantisation_bound_round_1": bound,
            "values_difference_final": float((secure["values"] - plain["values"]).abs().max()),
            "clipped": sum(r.get("secagg_clipped", 0) for r in secure["metrics"]),
            "seconds": {"plain": t_plain, "secure": t_secure},
        }
        out.append(record)
        print(f"parity {record['config']} density {density}, {rounds} rounds: final accuracy plain "
              f"{acc_p[-1]:.4f} / SecAgg+ {acc_s[-1]:.4f}, largest per-round difference "
              f"{record['max_accuracy_difference']:.4f}; values after round 1 differ by "
              f"{record['values_difference_after_round_1']:.2e} (bound {bound:.2e})", flush=True)
    return out


def config_name(path: Path) -> str:
    """A config as the tables name it: relative to the repository when it lies inside."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def merge_parity(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """The recorded parity rows with ``new`` replacing those of the same config and density
    (rows recorded before the config was named were the quickstart's)."""
    def key(row: dict[str, Any]) -> tuple[str, float]:
        return row.get("config", "configs/quickstart.toml"), row["density"]
    replaced = {key(r) for r in new}
    return [r for r in old if key(r) not in replaced] + list(new)


# ---- the tables ----------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Secure aggregation (SecAgg+) on Flower: cost and parity", "",
             "Generated by `python benchmarks/secagg.py` (docs/secure_aggregation.md).", ""]
    dep = results.get("deployment") or []
    if dep:
        meta = results["deployment_meta"]
        lines += [
            f"## Per round on one local deployment ({meta['rounds']} rounds per run)", "",
            f"{meta['setting']}. Bytes: the run's ledger (payloads; with SecAgg+ also its keys "
            "and shares), mean per round over all clients of the round; wire: every message "
            "as Flower serialises it. Seconds: mean round time (evaluation excluded); the "
            "SecAgg+ round is four message exchanges (setup, share keys, collect = training, "
            "unmask).", "",
            "| density | values | aggregation | s/round | setup | share keys | collect | "
            "unmask | up kB/round | down kB/round | wire up kB | wire down kB | accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dep:
            st = r["stage_seconds"]
            stages = [f"{st[s]:.1f}" if st else "-" for s in STAGES]
            lines.append(
                f"| {r['density']} | {r['num_values']} | "
                f"{'SecAgg+' if r['secure'] else 'plain'} | {r['round_seconds']:.1f} | "
                + " | ".join(stages)
                + f" | {r['bytes_per_round']['up'] / 1e3:.1f} | "
                f"{r['bytes_per_round']['down'] / 1e3:.1f} | "
                f"{r['wire_bytes_per_round']['up'] / 1e3:.1f} | "
                f"{r['wire_bytes_per_round']['down'] / 1e3:.1f} | {r['final_accuracy']:.4f} |")
        lines += ["", "Ratios SecAgg+ / plain at the same density:", "",
                  "| density | time | bytes up | bytes down | wire up | wire down |",
                  "|---|---|---|---|---|---|"]
        for density in sorted({r["density"] for r in dep}, reverse=True):
            pair = {r["secure"]: r for r in dep if r["density"] == density}
            if len(pair) < 2:
                continue
            p, s = pair[False], pair[True]
            lines.append(
                f"| {density} | {s['round_seconds'] / p['round_seconds']:.2f} | "
                f"{s['bytes_per_round']['up'] / p['bytes_per_round']['up']:.3f} | "
                f"{s['bytes_per_round']['down'] / p['bytes_per_round']['down']:.3f} | "
                f"{s['wire_bytes_per_round']['up'] / p['wire_bytes_per_round']['up']:.3f} | "
                f"{s['wire_bytes_per_round']['down'] / p['wire_bytes_per_round']['down']:.3f} |")
        lines.append("")
    par = results.get("parity") or []
    if par:
        lines += ["## Accuracy parity (in process)", "",
                  "| config | density | rounds | final plain | final SecAgg+ | best plain | "
                  "best SecAgg+ | largest difference at an evaluated round | "
                  "values after round 1: difference (bound) | "
                  "values at the end |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in par:
            d1 = r["values_difference_after_round_1"]
            lines.append(
                f"| {r.get('config', 'configs/quickstart.toml')} | {r['density']} | "
                f"{r['rounds']} | {r['final_accuracy']['plain']:.4f} | "
                f"{r['final_accuracy']['secure']:.4f} | {r['best_accuracy']['plain']:.4f} | "
                f"{r['best_accuracy']['secure']:.4f} | {r['max_accuracy_difference']:.4f} | "
                f"{d1:.2e} ({r['quantisation_bound_round_1']:.2e}) | "
                f"{r['values_difference_final']:.2e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/secagg.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", default="all",
                        choices=["all", "deployment", "parity", "report"])
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per run (deployment: 3; parity: the config's)")
    parser.add_argument("--densities", type=float, nargs="+", default=None,
                        help="deployment: 1.0 0.1 0.05; parity: the config's density")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", default=str(OUT), help="writes OUT.json and OUT.md")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="parity: the experiment (default the quickstart; "
                             "configs/cifar10_cpu.toml for the CPU reference)")
    args = parser.parse_args(argv)
    from ssfl.config import load_config

    out = Path(args.out)
    results: dict[str, Any] = (json.loads(out.with_suffix(".json").read_text())
                               if out.with_suffix(".json").exists() else {})
    if args.part in ("all", "deployment"):
        rounds = args.rounds or 3
        results["deployment"] = deployment(args.densities or [1.0, 0.1, 0.05], rounds,
                                           args.timeout)
        results["deployment_meta"] = {
            "rounds": rounds, "machine": f"{os.cpu_count()} cores",
            "setting": f"configs/quickstart.toml (digits, 20 clients, 5 per round, small_cnn), "
                       f"dense FedAvg at density 1, SSFL below; 1 thread per process, "
                       f"SuperNodes with their workers, 127.0.0.1, the {os.cpu_count()}-core "
                       f"machine shared with other jobs"}
    if args.part in ("all", "parity"):
        rounds = (args.rounds if args.part == "parity" and args.rounds
                  else load_config(str(args.config)).run.rounds)
        densities = (args.densities if args.part == "parity" and args.densities
                     else [load_config(str(args.config)).algorithm.density])
        results["parity"] = merge_parity(results.get("parity") or [],
                                         parity(densities, rounds, args.config))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
