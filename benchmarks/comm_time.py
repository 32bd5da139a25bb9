"""Communication time of SSFL on a real Flower deployment behind rate-limited links (issue 4).

What it does
------------
The SuperLink (and the ServerApp it spawns) runs in the root network namespace; the SuperNodes
(and the ClientApp processes they spawn) run in a network namespace of their own, joined to the
root namespace by a veth pair. Both ends of the veth pair are rate-limited with ``tc`` (``tbf``
by default, ``--qdisc htb`` as an alternative; this kernel has no netem), so the downlink
(server to clients) and the uplink (clients to server) each get the given bandwidth, shared by
all clients as on one access link. For each bandwidth (default 100, 20 and 5 Mbit/s) it runs
dense FedAvg and SSFL at densities 0.5, 0.1 and 0.05 and measures per training round:

* bytes on the wire: the root-side veth counters (``/sys/class/net/<if>/statistics/
  {tx,rx}_bytes``: down = tx, up = rx; Ethernet/IP/TCP/HTTP framing included), read when the
  mask round ends (``mask.json`` appears) and whenever a round's row reaches ``metrics.jsonl``;
* communication time: ``seconds - max(client_compute_seconds) - aggregation_seconds`` (round
  time minus the critical-path client compute and the server's aggregation; the clients train
  in parallel);
* what of that is Flower's fixed cost rather than bytes: ``client_setup_seconds`` (data loading
  and model building in each freshly started ClientApp process) and, with the ``unshaped`` run
  of the same configuration (the same namespace and veth, no ``tc``), the communication time at
  (almost) no transfer cost. ``excess`` = shaped minus unshaped communication time is the part
  the bandwidth adds.

It writes ``benchmarks/results/comm_time.json`` and prints, per bandwidth, the time ratio
sparse/dense (raw, and of the excess over the unshaped run) next to the byte ratio.

Run it
------
    sudo .venv/bin/python benchmarks/comm_time.py                   # digits, 100/20/5 Mbit/s
    sudo .venv/bin/python benchmarks/comm_time.py --bandwidths 20 --densities 1.0 0.1
    sudo .venv/bin/python benchmarks/comm_time.py --cifar10          # small_cnn on CIFAR-10
                                                                     #   ($SSFL_DATA_DIR)
    python benchmarks/comm_time.py --loopback --rounds 1             # CI: 127.0.0.1, no shaping

It needs root (network namespaces, veth, tc), ``ip`` with netns support and ``tc`` with the
chosen qdisc; it checks all of that first and says what is missing (``--loopback`` needs none of
it). Namespace, veth pair and every process it started are removed on exit, also on Ctrl-C or
SIGTERM. The default configuration is small so that it finishes in minutes on 2 cores: digits,
3 clients each on its own SuperNode, 3 per round, ``small_cnn`` at width 2 (about 350 k weights,
1.4 MB dense payload), 2 rounds of 1 local epoch, 1 thread per process. Any ``section.key=value``
override can be added with ``--set``.

Caveat: Flower 1.42 costs a few seconds per message that no bandwidth removes (a new ClientApp
process per message: Python, ``import torch``/``flwr``, data loading; an idle SuperNode polls
the SuperLink every 3 s). With a small model those dominate the round and hide the payload
gain: compare the ``excess`` ratio, and the ``fixed`` seconds, not only the raw time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "comm_time.json"
SYS_NET = Path("/sys/class/net")

DEFAULT_CONFIG = [
    "run.name=comm-time", "run.threads=1", "run.progress=false", "run.checkpoint_every=0",
    "data.dataset=digits", "model.name=small_cnn", "model.width=2.0",
    "federation.num_clients=3", "federation.clients_per_round=3",
    "train.local_epochs=1", "train.batch_size=64",
]
CIFAR10_CONFIG = [
    "run.name=comm-time-cifar10", "run.threads=1", "run.progress=false",
    "run.checkpoint_every=0", "data.dataset=cifar10", "model.name=small_cnn", "model.width=1.0",
    "federation.num_clients=10", "federation.clients_per_round=3",
    "train.local_epochs=1", "train.batch_size=64",
]


def algorithm_overrides(density: float) -> list[str]:
    """Density 1.0 is dense FedAvg; below, SSFL at that density."""
    if density >= 1.0:
        return ["algorithm.name=fedavg", "algorithm.density=1.0"]
    return ["algorithm.name=ssfl", f"algorithm.density={density}"]


# ---- environment checks ---------------------------------------------------------------------


def environment_problems(*, loopback: bool, qdisc: str = "tbf", euid: int | None = None,
                         which: Any = shutil.which, netns_probe: Any = None) -> list[str]:
    """What stops the shaped benchmark from running here (empty: nothing). ``--loopback``
    needs none of it. ``euid``/``which``/``netns_probe`` are for tests."""
    if loopback:
        return []
    problems = []
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        problems.append("needs root: network namespaces, veth pairs and tc qdiscs need "
                        "CAP_NET_ADMIN (run it with sudo, e.g. `sudo .venv/bin/python "
                        "benchmarks/comm_time.py`), or use --loopback (no shaping)")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2")):
        if which(tool) is None:
            problems.append(f"`{tool}` not found (install {package})")
    if not problems:
        error = (netns_probe or _probe_netns)(qdisc)
        if error:
            problems.append(error)
    return problems


def _probe_netns(qdisc: str) -> str:
    """Create and remove a namespace with a shaped veth pair; '' if it all works."""
    name = f"ssfl-probe-{os.getpid()}"
    net = Network(name, subnet=250)
    try:
        net.create()
        net.shape(10.0, qdisc)
    except NetworkError as exc:
        return f"cannot set up a shaped network namespace ({exc})"
    finally:
        net.destroy()
    return ""


def problems_message(problems: Sequence[str]) -> str:
    return ("comm_time: the shaped benchmark cannot run here:\n"
            + "".join(f"  - {p}\n" for p in problems)
            + "  (`--loopback` runs the same measurement on 127.0.0.1 without shaping)")


# ---- network: namespace, veth, tc -----------------------------------------------------------


class NetworkError(RuntimeError):
    pass


def _run(command: Sequence[str]) -> None:
    out = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise NetworkError(f"`{' '.join(command)}` failed: {out.stderr.strip() or out.stdout}")


def tc_commands(dev: str, mbit: float, qdisc: str = "tbf",
                netns: str | None = None) -> list[list[str]]:
    """``tc`` commands that limit ``dev``'s egress to ``mbit`` Mbit/s (in ``netns`` if given).

    tbf: the bucket holds 10 ms at the rate but at least 64 KiB, so that a veth's GSO
    super-packets (up to 64 KiB) always fit; the queue holds 100 ms. htb: one class at rate =
    ceil = the bandwidth, the default for all traffic."""
    if mbit <= 0:
        raise ValueError("bandwidth must be > 0 Mbit/s")
    prefix = ["ip", "netns", "exec", netns] if netns else []
    rate = f"{mbit:g}mbit"
    if qdisc == "tbf":
        burst = max(65536, int(mbit * 1e6 / 8 * 0.010))
        return [prefix + ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                          "burst", str(burst), "latency", "100ms"]]
    if qdisc == "htb":
        return [prefix + ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
                          "default", "1"],
                prefix + ["tc", "class", "replace", "dev", dev, "parent", "1:", "classid",
                          "1:1", "htb", "rate", rate, "ceil", rate]]
    raise ValueError(f"qdisc must be tbf or htb, got {qdisc!r}")


@dataclass
class Network:
    """A namespace for the clients, a veth pair to the root namespace (``host_if`` in the root
    namespace at ``host_ip``, ``client_if`` in the namespace at ``client_ip``)."""

    ns: str
    subnet: int = 0  # 10.213.<subnet>.0/30

    @property
    def host_if(self) -> str:
        return f"sf{self.subnet}-{os.getpid() % 100000}h"[:15]

    @property
    def client_if(self) -> str:
        return f"sf{self.subnet}-{os.getpid() % 100000}c"[:15]

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.subnet}.1"

    @property
    def client_ip(self) -> str:
        return f"10.213.{self.subnet}.2"

    def create(self) -> None:
        _run(["ip", "netns", "add", self.ns])
        _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name",
              self.client_if])
        _run(["ip", "link", "set", self.client_if, "netns", self.ns])
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        inside = ["ip", "netns", "exec", self.ns]
        _run(inside + ["ip", "addr", "add", f"{self.client_ip}/30", "dev", self.client_if])
        _run(inside + ["ip", "link", "set", self.client_if, "up"])
        _run(inside + ["ip", "link", "set", "lo", "up"])  # SuperNode <-> its ClientApps

    def shape(self, mbit: float | None, qdisc: str = "tbf") -> None:
        """Limit both directions to ``mbit`` (``None``: remove the limits)."""
        if mbit is None:
            for dev, ns in ((self.host_if, None), (self.client_if, self.ns)):
                prefix = ["ip", "netns", "exec", ns] if ns else []
                subprocess.run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True, check=False)
            return
        for command in (tc_commands(self.host_if, mbit, qdisc)
                        + tc_commands(self.client_if, mbit, qdisc, netns=self.ns)):
            _run(command)

    def destroy(self) -> None:
        """Deleting the namespace deletes its veth end and so the pair; idempotent."""
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def read_counters(dev: str, root: Path = SYS_NET) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of a network interface."""
    stats = root / dev / "statistics"
    return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())


# ---- one run on the deployment --------------------------------------------------------------


class _Monitor(threading.Thread):
    """Reads the interface counters when the mask round ends and when each round's row reaches
    ``metrics.jsonl`` (checked every 20 ms)."""

    def __init__(self, dev: str | None, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.dev, self.run_dir = dev, run_dir
        self.marks: dict[int, tuple[int, int]] = {}  # 0: end of the mask round; r: round r
        self.stop_event = threading.Event()

    def counters(self) -> tuple[int, int]:
        return read_counters(self.dev) if self.dev else (0, 0)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.poll()
            time.sleep(0.02)

    def poll(self) -> None:
        now = None
        if 0 not in self.marks and (self.run_dir / "mask.json").exists():
            now = self.counters()
            self.marks[0] = now
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            done = sum(1 for line in metrics.read_text().splitlines() if line.endswith("}"))
            for rnd in range(1, done + 1):
                if rnd not in self.marks:
                    now = now or self.counters()
                    self.marks[rnd] = now


def comm_seconds(row: dict[str, Any]) -> float:
    """Round time minus the critical-path client compute and the server's aggregation."""
    compute = max(row.get("client_compute_seconds") or [0.0])
    return row["seconds"] - compute - row["aggregation_seconds"]


def round_record(row: dict[str, Any], wire: tuple[int, int] | None) -> dict[str, Any]:
    """One round's measurements; ``wire``: (down, up) bytes on the veth, if measured."""
    return {
        "round": row["round"],
        "seconds": row["seconds"],
        "client_compute_seconds_max": max(row.get("client_compute_seconds") or [0.0]),
        "client_setup_seconds_max": max(row.get("client_setup_seconds") or [0.0]),
        "aggregation_seconds": row["aggregation_seconds"],
        "exchange_seconds": row.get("exchange_seconds"),
        "comm_seconds": comm_seconds(row),
        "payload_bytes": row["bytes_down"] + row["bytes_up"],
        "wire_bytes_down": wire[0] if wire else None,
        "wire_bytes_up": wire[1] if wire else None,
        "wire_bytes": sum(wire) if wire else None,
    }


def run_once(overrides: Sequence[str], *, net: Network | None, timeout: float,
             keep: Path | None = None) -> dict[str, Any]:
    """One experiment on a SuperLink (root namespace) and one SuperNode per client (in
    ``net``'s namespace; on 127.0.0.1 without ``net``). Returns its per-round records."""
    from ssfl.config import load_config
    from ssfl.flower.local import (
        LocalDeployment,
        LocalDeploymentError,
        flower_env,
        flwr_run,
        free_port,
        write_connection,
    )
    from ssfl.flower.protocol import FlowerSettings, run_config_from_config, run_config_toml
    from ssfl.flower.runconfig import write_app

    config = load_config(None, list(overrides))
    clients = config.federation.num_clients
    workdir = Path(tempfile.mkdtemp(prefix="ssfl-comm-")).resolve()
    run_dir = workdir / "run"
    host = net.host_ip if net else "127.0.0.1"
    app = write_app(workdir / "app").parent
    settings = FlowerSettings(run_dir=str(run_dir), min_nodes=clients,
                              round_timeout_seconds=max(600.0, timeout))
    run_config = workdir / "run-config.toml"
    run_config.write_text(run_config_toml(run_config_from_config(config, settings)))
    flwr_home = workdir / "flwr-home"
    port = free_port()
    write_connection(flwr_home, port)
    text = (flwr_home / "config.toml").read_text().replace("127.0.0.1:", f"{host}:")
    (flwr_home / "config.toml").write_text(text)
    dep = LocalDeployment(workdir, port, flower_env(flwr_home, workdir))
    monitor = _Monitor(net.host_if if net else None, run_dir)
    try:
        link = dep.start("superlink", ["flower-superlink", "--host", host, "--port", str(port),
                                       "--insecure", "--disable-runtime-dependency-installation"])
        _wait_health(f"http://{host}:{port}/health", link, time.monotonic() + 60)
        for i in range(clients):
            dep.start(f"supernode-{i}", (net.prefix() if net else []) + [
                "flower-supernode", "--superlink", f"{host}:{port}", "--insecure",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={clients}"])
        before = monitor.counters()
        monitor.start()
        flwr_run(dep, app, run_config, timeout, echo=False)
        monitor.stop_event.set()
        monitor.join()
        monitor.poll()
        after = monitor.counters()
        if not (run_dir / "summary.json").exists():
            raise LocalDeploymentError(f"the run wrote no summary.json (logs in {workdir})")
    finally:
        monitor.stop_event.set()
        dep.stop()
        if keep is not None:
            shutil.copytree(workdir, keep, dirs_exist_ok=True)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if x.endswith("}")] if (run_dir / "metrics.jsonl").exists() else []
        summary = (json.loads((run_dir / "summary.json").read_text())
                   if (run_dir / "summary.json").exists() else {})
        shutil.rmtree(workdir, ignore_errors=True)
    records = []
    for row in rows:
        r = row["round"]
        wire = None
        if net is not None and r in monitor.marks and r - 1 in monitor.marks:
            (rx1, tx1), (rx0, tx0) = monitor.marks[r], monitor.marks[r - 1]
            wire = (tx1 - tx0, rx1 - rx0)  # root side: tx goes down to the clients
        records.append(round_record(row, wire))
    return {
        "rounds": records,
        "wire_bytes_total": (sum(after) - sum(before)) if net is not None else None,
        "dense_bytes_per_round": summary.get("dense_bytes_per_round"),
        "bytes_per_round": summary.get("bytes_per_round"),
        "final_accuracy": summary.get("final_accuracy"),
        "density": summary.get("density"),
    }


def _wait_health(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not answer on {url}")


# ---- summary ----------------------------------------------------------------------------------


def mean_of(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def summarise(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per bandwidth and density: means per round, and ratios to dense (density "1.0") at the
    same bandwidth; ``excess`` subtracts the same density's ``unshaped`` run."""
    table: dict[str, dict[str, Any]] = {}
    for bandwidth, by_density in results.items():
        dense = by_density.get("1.0")
        rows = {}
        for density, res in by_density.items():
            recs = res["rounds"]
            row = {key: mean_of(recs, key) for key in
                   ("seconds", "comm_seconds", "client_setup_seconds_max", "exchange_seconds",
                    "client_compute_seconds_max", "aggregation_seconds", "wire_bytes",
                    "payload_bytes")}
            base = results.get("unshaped", {}).get(density)
            row["fixed_comm_seconds"] = mean_of(base["rounds"], "comm_seconds") if base else None
            row["excess_comm_seconds"] = (row["comm_seconds"] - row["fixed_comm_seconds"]
                                          if row["fixed_comm_seconds"] is not None
                                          and row["comm_seconds"] is not None else None)
            rows[density] = row
        for density, row in rows.items():
            d = rows.get("1.0") if dense is not None else None
            row["time_ratio"] = ratio(row["comm_seconds"], d and d["comm_seconds"])
            row["excess_time_ratio"] = ratio(row["excess_comm_seconds"],
                                             d and d["excess_comm_seconds"])
            row["wire_byte_ratio"] = ratio(row["wire_bytes"], d and d["wire_bytes"])
            row["payload_byte_ratio"] = ratio(row["payload_bytes"], d and d["payload_bytes"])
        table[bandwidth] = rows
    return table


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(table: dict[str, dict[str, Any]]) -> None:
    print(f"{'link':>9} {'density':>7} {'round s':>8} {'comm s':>7} {'setup s':>7} "
          f"{'fixed s':>7} {'wire MB':>8} {'time':>6} {'excess':>6} {'bytes':>6} "
          f"{'payload':>7}")
    print(f"{'':>9} {'':>7} {'':>8} {'':>7} {'':>7} {'':>7} {'/round':>8} "
          f"{'ratio sparse/dense':>28}")
    for bandwidth, rows in table.items():
        for density, row in sorted(rows.items(), key=lambda kv: -float(kv[0])):
            wire = row["wire_bytes"] / 1e6 if row["wire_bytes"] is not None else None
            print(f"{bandwidth:>9} {float(density):>7.2f} {_fmt(row['seconds'], '.2f'):>8} "
                  f"{_fmt(row['comm_seconds'], '.2f'):>7} "
                  f"{_fmt(row['client_setup_seconds_max'], '.2f'):>7} "
                  f"{_fmt(row['fixed_comm_seconds'], '.2f'):>7} {_fmt(wire, '.3f'):>8} "
                  f"{_fmt(row['time_ratio']):>6} {_fmt(row['excess_time_ratio']):>6} "
                  f"{_fmt(row['wire_byte_ratio']):>6} {_fmt(row['payload_byte_ratio']):>7}")


# ---- main -------------------------------------------------------------------------------------


class _Terminated(BaseException):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Communication time of dense FedAvg and SSFL on a Flower deployment "
                    "behind rate-limited veth links (see the module docstring).")
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[100.0, 20.0, 5.0],
                        metavar="MBIT", help="link rates in Mbit/s (default: 100 20 5)")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.05],
                        help="1.0 is dense FedAvg (default: 1.0 0.5 0.1 0.05)")
    parser.add_argument("--rounds", type=int, default=2, help="training rounds per run")
    parser.add_argument("--no-unshaped", action="store_true",
                        help="skip the unshaped runs that measure the fixed costs")
    parser.add_argument("--qdisc", choices=["tbf", "htb"], default="tbf")
    parser.add_argument("--loopback", action="store_true",
                        help="no namespace, no shaping: everything on 127.0.0.1 (for CI)")
    parser.add_argument("--cifar10", action="store_true",
                        help="small_cnn on CIFAR-10 from $SSFL_DATA_DIR (10 clients, 3 per "
                             "round) instead of digits")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="further ssfl config overrides")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    problems = environment_problems(loopback=args.loopback, qdisc=args.qdisc)
    if problems:
        print(problems_message(problems), file=sys.stderr)
        return 2
    base = list(CIFAR10_CONFIG if args.cifar10 else DEFAULT_CONFIG)
    if args.cifar10:
        data_dir = os.environ.get("SSFL_DATA_DIR")
        if not data_dir:
            print("comm_time: --cifar10 needs SSFL_DATA_DIR (the folder holding "
                  "cifar-10-batches-bin/)", file=sys.stderr)
            return 2
        base.append(f"data.root={data_dir}")
    base += [f"run.rounds={args.rounds}", *args.set]
    links: list[tuple[str, float | None]] = (
        [("loopback", None)] if args.loopback
        else ([] if args.no_unshaped else [("unshaped", None)])
        + [(f"{b:g}mbit", b) for b in args.bandwidths])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"

    def on_term(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    net = None if args.loopback else Network(f"ssfl-comm-{os.getpid()}")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    started = time.time()
    try:
        if net is not None:
            net.create()
        for label, mbit in links:
            if net is not None:
                net.shape(None)
                if mbit is not None:
                    net.shape(mbit, args.qdisc)
            for density in args.densities:
                overrides = base + algorithm_overrides(density)
                print(f"comm_time: {label}, density {density:g} ...", flush=True)
                t0 = time.monotonic()
                res = run_once(overrides, net=net, timeout=args.timeout)
                print(f"  done in {time.monotonic() - t0:.0f} s: comm "
                      f"{_fmt(mean_of(res['rounds'], 'comm_seconds'), '.2f')} s/round, wire "
                      f"{_fmt(mean_of(res['rounds'], 'wire_bytes'), '.0f')} B/round", flush=True)
                results.setdefault(label, {})[str(float(density))] = res
    except (KeyboardInterrupt, _Terminated):
        print("comm_time: interrupted; namespace and processes removed", file=sys.stderr)
        return 130
    except NetworkError as exc:
        print(f"comm_time: {exc}", file=sys.stderr)
        return 2
    finally:
        if net is not None:
            net.destroy()
        signal.signal(signal.SIGTERM, previous)
    table = summarise(results)
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/comm_time.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "config": base, "qdisc": None if args.loopback else args.qdisc,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": time.time() - started,
        "definitions": {
            "comm_seconds": "seconds - max(client_compute_seconds) - aggregation_seconds",
            "fixed_comm_seconds": "comm_seconds of the unshaped run (same namespace/veth)",
            "excess_comm_seconds": "comm_seconds - fixed_comm_seconds",
            "wire_bytes": "root-side veth tx (down) + rx (up) bytes between the round's "
                          "start and end marks",
        },
        "summary": table, "runs": results,
    }, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
