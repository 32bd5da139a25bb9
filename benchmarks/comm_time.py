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
* what of that is Flower's fixed cost rather than bytes: with the ``unshaped`` run of the same
  configuration (the same namespace and veth, no ``tc``), the communication time at (almost)
  no transfer cost (``fixed``). ``excess`` = shaped minus unshaped communication time is the
  part the bandwidth adds;
* where the round's time went, for the reply that came last (the round's time line,
  ``ssfl.flower.server_app.round_timeline``): the server's push, Flower's delivery (incl. the
  idle SuperNode's 3 s pull interval), the ClientApp process's start-up (and of it our
  module's imports), set-up (data from the node cache, model), training, the way back.

It writes ``benchmarks/results/comm_time.json`` and prints, per bandwidth, the time ratio
sparse/dense (raw, and of the excess over the unshaped run) next to the byte ratio, and the
breakdown.

Run it
------
    sudo .venv/bin/python benchmarks/comm_time.py                   # digits, 100/20/5 Mbit/s
    sudo .venv/bin/python benchmarks/comm_time.py --bandwidths 20 --densities 1.0 0.1
    sudo .venv/bin/python benchmarks/comm_time.py --cifar10          # small_cnn on CIFAR-10
                                                                     #   ($SSFL_DATA_DIR)
    sudo .venv/bin/python benchmarks/comm_time.py --resnet18         # ResNet-18 on CIFAR-10:
                                                                     #   transfer dominates
    python benchmarks/comm_time.py --resnet18 --estimate             # how long that would take
    python benchmarks/comm_time.py --loopback --rounds 1             # CI: 127.0.0.1, no shaping
    python benchmarks/comm_time.py --loopback --no-cache             # without the node cache

Presets (``--preset``): ``digits`` (default, below); ``cifar10`` (small_cnn, 10 clients, 3 per
round); ``resnet18``: ResNet-18 (CIFAR form, ``--width`` scales it: 1.0 is 11.2 M weights, a
44.7 MB dense payload; 0.5 is 11.2 MB) on CIFAR-10 split among 1000 clients (no config key
limits a client's data or steps, so each has 50 samples: 2 SGD steps of 32), 3 per round,
evaluation (10 000 test images through ResNet-18 on the server, a large part of each run's
time) only after the last round; ``--server-threads`` gives it more threads where cores are
free. With more than ``MAX_PINNED_NODES`` clients only the clients
the run samples get a SuperNode each (the sample is seeded, ``node_plan``), plus one SuperNode
without a partition for the others. Its sparse runs use ``snip_single`` (SNIP scores from
client 0 only), not ``ssfl``: SSFL's mask round asks every client for a dense score payload
(1000 x 44.7 MB); the training rounds, the part measured, carry exactly SSFL's bytes (a fixed
global mask, the same number of values at the same density). ``--sparse-algorithm`` chooses.

It needs root (network namespaces, veth, tc), ``ip`` with netns support and ``tc`` with the
chosen qdisc; it checks all of that first and says what is missing (``--loopback`` needs none of
it). Namespace, veth pair and every process it started are removed on exit, also on Ctrl-C or
SIGTERM. The default configuration is small so that it finishes in minutes on 2 cores: digits,
3 clients each on its own SuperNode, 3 per round, ``small_cnn`` at width 2 (about 350 k weights,
1.4 MB dense payload), 2 rounds of 1 local epoch, 1 thread per process. Any ``section.key=value``
override can be added with ``--set``.

Caveat: Flower 1.42 costs several seconds per message that no bandwidth removes (about 8.5 s
on the busy 2-core machine: a new ClientApp process per message, Python, ``import flwr`` and
``torch``; an idle SuperNode pulls only every 3 s; docs/flower.md has the breakdown). With a
small model those dominate the round and hide the payload gain: compare the ``excess`` ratio and
the ``fixed`` seconds, not only the raw time ratio; or use ``--resnet18``, where a dense round
moves 6 x 44.7 MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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

# Every preset runs the paper's FedAvg (federation.aggregator = "mean"), as the recorded
# figures were measured: the time measured is the paper's protocol's.
DEFAULT_CONFIG = [
    "run.name=comm-time", "run.threads=1", "run.progress=false", "run.checkpoint_every=0",
    "data.dataset=digits", "model.name=small_cnn", "model.width=2.0",
    "federation.num_clients=3", "federation.clients_per_round=3",
    "train.local_epochs=1", "federation.aggregator=mean", "train.batch_size=64",
]
CIFAR10_CONFIG = [
    "run.name=comm-time-cifar10", "run.threads=1", "run.progress=false",
    "run.checkpoint_every=0", "data.dataset=cifar10", "model.name=small_cnn", "model.width=1.0",
    "federation.num_clients=10", "federation.clients_per_round=3",
    "train.local_epochs=1", "federation.aggregator=mean", "train.batch_size=64",
]
# ResNet-18 (CIFAR form, 11.2 M weights: a 44.7 MB dense payload at width 1) on CIFAR-10, where
# the transfer dominates a round. There is no config key that limits a client's local data or
# steps, so the training set is split among 1000 clients (50 samples, 2 SGD steps each); 3 per
# round, each on its own SuperNode (``node_plan``). No evaluation (``run.eval_every=0``): 10 000
# test images through ResNet-18 on the server would take longer than the rounds measured.
RESNET18_CONFIG = [
    "run.name=comm-time-resnet18", "run.threads=1", "run.progress=false",
    "run.checkpoint_every=0", "run.eval_every=0", "data.dataset=cifar10",
    "model.name=resnet18", "model.width=1.0",
    "federation.num_clients=1000", "federation.clients_per_round=3",
    "train.local_epochs=1", "federation.aggregator=mean", "train.batch_size=32",
]
PRESETS = {"digits": DEFAULT_CONFIG, "cifar10": CIFAR10_CONFIG, "resnet18": RESNET18_CONFIG}
# The sparse algorithm of each preset. SSFL's mask round asks EVERY client for a dense score
# payload (1000 x 44.7 MB with the resnet18 preset), so that preset uses SNIP on one client's
# data (``snip_single``: SSFL's scoring on client 0 alone): its training rounds are SSFL's
# (a fixed global mask, values only, the same number of values at the same density).
SPARSE_ALGORITHM = {"digits": "ssfl", "cifar10": "ssfl", "resnet18": "snip_single"}
# With more clients than this, only the clients sampled in the run get their own SuperNode.
MAX_PINNED_NODES = 8


def algorithm_overrides(density: float, sparse: str = "ssfl") -> list[str]:
    """Density 1.0 is dense FedAvg; below, ``sparse`` (SSFL) at that density."""
    if density >= 1.0:
        return ["algorithm.name=fedavg", "algorithm.density=1.0"]
    return [f"algorithm.name={sparse}", f"algorithm.density={density}"]


def node_plan(num_clients: int, rounds: int, per_round: int, seed: int) -> tuple[list[int], bool]:
    """The client ids that get a SuperNode of their own (``partition-id``), and whether one more
    SuperNode without a partition serves the other clients (the mask round's messages only).

    Up to ``MAX_PINNED_NODES`` clients: one SuperNode each. Beyond: one SuperNode for each client
    that the run samples (the sample is seeded, ``ssfl.run.experiment.sample_clients``), so that a
    round's clients never share a SuperNode (a SuperNode handles its messages one at a time)."""
    if num_clients <= MAX_PINNED_NODES:
        return list(range(num_clients)), False
    from ssfl.run.experiment import sample_clients

    sampled = sorted({c for r in range(1, rounds + 1)
                      for c in sample_clients(seed, r, num_clients, per_round)})
    return sampled, len(sampled) < num_clients


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


# The parts of a client's reply time (``ssfl.flower.server_app.round_timeline``): Flower's
# delivery (incl. the SuperNode's idle pull interval), the ClientApp process's start-up (of it,
# our module's imports), the handler (set-up, decode, local training, encode), the way back.
PARTS = ("deliver", "startup", "import", "handler", "setup", "decode", "train", "encode",
         "return", "reply")


def last_reply_parts(row: dict[str, Any]) -> dict[str, float | None]:
    """The parts of the reply that came last (the round's critical path): ``last_<part>_seconds``
    (None where the row has no time line, e.g. an older run)."""
    replies = row.get("client_reply_seconds") or []
    known = [i for i, r in enumerate(replies) if r is not None]
    out: dict[str, float | None] = {f"last_{p}_seconds": None for p in PARTS}
    if not known:
        return out
    last = max(known, key=lambda i: replies[i])
    for part in PARTS:
        values = row.get(f"client_{part}_seconds") or []
        out[f"last_{part}_seconds"] = values[last] if last < len(values) else None
    return out


def round_record(row: dict[str, Any], wire: tuple[int, int] | None) -> dict[str, Any]:
    """One round's measurements; ``wire``: (down, up) bytes on the veth, if measured."""
    last_reply = row.get("last_reply_seconds")
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
        # Where the time went: the server's push, the critical client's parts, and the server's
        # own work in the round outside the exchange (payloads, decoding, aggregation).
        "push_seconds": row.get("push_seconds"),
        "first_reply_seconds": row.get("first_reply_seconds"),
        "server_seconds": row["seconds"] - last_reply if last_reply is not None else None,
        **last_reply_parts(row),
    }


def run_once(overrides: Sequence[str], *, net: Network | None, timeout: float,
             keep: Path | None = None, node_config: str = "",
             server_threads: int = 0, worker: bool = True) -> dict[str, Any]:
    """One experiment on a SuperLink (root namespace) and the SuperNodes of ``node_plan`` (in
    ``net``'s namespace; on 127.0.0.1 without ``net``). Returns its per-round records.
    ``node_config``: added to every SuperNode's ``--node-config``; ``server_threads``: the
    ServerApp's torch threads (``flower.server-threads``; 0: ``run.threads``); ``worker``: each
    SuperNode with its persistent worker (``ssfl.flower.worker``), so that the ClientApp
    process of each message imports no torch and loads no data or model."""
    from ssfl.config import load_config
    from ssfl.flower.local import (
        LocalDeployment,
        LocalDeploymentError,
        flower_env,
        flwr_run,
        free_port,
        worker_node_config,
        write_connection,
    )
    from ssfl.flower.protocol import FlowerSettings, run_config_from_config, run_config_toml
    from ssfl.flower.runconfig import write_app

    config = load_config(None, list(overrides))
    clients = config.federation.num_clients
    pinned, pool = node_plan(clients, config.run.rounds, config.federation.clients_per_round,
                             config.run.seed)
    workdir = Path(tempfile.mkdtemp(prefix="ssfl-comm-")).resolve()
    run_dir = workdir / "run"
    host = net.host_ip if net else "127.0.0.1"
    app = write_app(workdir / "app").parent
    settings = FlowerSettings(run_dir=str(run_dir), min_nodes=len(pinned) + int(pool),
                              round_timeout_seconds=max(600.0, timeout),
                              server_threads=server_threads)
    run_config = workdir / "run-config.toml"
    run_config.write_text(run_config_toml(run_config_from_config(config, settings)))
    flwr_home = workdir / "flwr-home"
    port = free_port()
    write_connection(flwr_home, port)
    text = (flwr_home / "config.toml").read_text().replace("127.0.0.1:", f"{host}:")
    (flwr_home / "config.toml").write_text(text)
    dep = LocalDeployment(workdir, port, flower_env(flwr_home, workdir))
    if worker:
        node_config = f"{node_config} {worker_node_config(workdir)}"
    monitor = _Monitor(net.host_if if net else None, run_dir)
    try:
        link = dep.start("superlink", ["flower-superlink", "--host", host, "--port", str(port),
                                       "--insecure", "--disable-runtime-dependency-installation"])
        _wait_health(f"http://{host}:{port}/health", link, time.monotonic() + 60)
        nodes = [(f"supernode-{i}", f"partition-id={i} num-partitions={clients} {node_config}")
                 for i in pinned] + ([("supernode-pool", node_config)] if pool else [])
        for name, extra in nodes:
            dep.start(name, (net.prefix() if net else []) + [
                "flower-supernode", "--superlink", f"{host}:{port}", "--insecure",
                "--host", "127.0.0.1", "--port", str(free_port())]
                + (["--node-config", extra.strip()] if extra.strip() else []))
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
                    "payload_bytes", "push_seconds", "first_reply_seconds", "server_seconds",
                    *(f"last_{p}_seconds" for p in PARTS))}
            # The fixed costs: the unshaped run (on loopback, the run itself).
            base = (results.get("unshaped") or results.get("loopback") or {}).get(density)
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


def print_breakdown(table: dict[str, dict[str, Any]]) -> None:
    """Where a round's time went (means over rounds; the reply that came last)."""
    cols = [("round", "seconds"), ("push", "push_seconds"), ("deliver", "last_deliver_seconds"),
            ("startup", "last_startup_seconds"), ("import", "last_import_seconds"),
            ("setup", "last_setup_seconds"), ("train", "last_train_seconds"),
            ("enc+dec", None), ("return", "last_return_seconds"),
            ("server", "server_seconds")]
    print("\nwhere a round's seconds go (the reply that came last; import is part of startup):")
    print(f"{'link':>9} {'density':>7} " + " ".join(f"{name:>7}" for name, _ in cols))
    for bandwidth, rows in table.items():
        for density, row in sorted(rows.items(), key=lambda kv: -float(kv[0])):
            cells = []
            for name, key in cols:
                if key is None:
                    parts = [row.get("last_decode_seconds"), row.get("last_encode_seconds")]
                    value = None if None in parts else sum(parts)  # type: ignore[arg-type]
                else:
                    value = row.get(key)
                cells.append(f"{_fmt(value, '.2f'):>7}")
            print(f"{bandwidth:>9} {float(density):>7.2f} " + " ".join(cells))


# ---- estimate of a full run ---------------------------------------------------------------------


@dataclass
class CostModel:
    """Costs for :func:`estimate_seconds`: the fixed ones measured on the 2-core development
    machine (busy with other jobs; docs/flower.md), the model's own from
    :func:`measure_costs`."""

    start_seconds: float = 25.0  # SuperLink, SuperNodes, `flwr run`, ServerApp start, hello
    stop_seconds: float = 6.0  # stopping the processes
    message_seconds: float = 9.0  # a message's fixed cost: delivery, process start, return
    step_seconds: float = 2.2  # one SGD step (ResNet-18, batch 32, one thread)
    eval_image_seconds: float = 0.038  # one test image through ResNet-18 on the server
    server_load_seconds: float = 5.0  # the ServerApp's data loading and partitioning
    client_load_seconds: float = 3.0  # a SuperNode's first full data load (then cached)


# (channels, image size, classes, train samples, test samples) of each data set.
DATA_SHAPES = {"digits": (1, 8, 10, 1437, 360), "cifar10": (3, 32, 10, 50000, 10000),
               "cifar100": (3, 32, 100, 50000, 10000),
               "tinyimagenet": (3, 64, 200, 100000, 10000)}


def _model_for(config: Any) -> Any:
    from ssfl.models import build_model

    channels, size, classes, _, _ = DATA_SHAPES[config.data.dataset]
    return build_model(config.model.name, num_classes=classes, in_channels=channels,
                       image_size=size, width=config.model.width, seed=0)


def measure_costs(config: Any, cost: CostModel | None = None,
                  server_threads: int = 0) -> CostModel:
    """``cost`` with the model's SGD step (``run.threads`` threads) and per-image evaluation
    time (``server_threads``, 0: the same) measured here on random inputs of the data set's
    shape; a few seconds."""
    import torch
    from torch.nn import functional as F

    cost = dataclasses.replace(cost or CostModel())
    threads = torch.get_num_threads()
    torch.set_num_threads(config.run.threads or threads)
    try:
        model = _model_for(config)
        channels, size, classes, _, _ = DATA_SHAPES[config.data.dataset]
        batch = config.train.batch_size
        x, y = torch.randn(batch, channels, size, size), torch.randint(0, classes, (batch,))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        times = []
        for _ in range(3):  # the first one warms up
            started = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        cost.step_seconds = min(times[1:])
        model.eval()
        torch.set_num_threads(server_threads or config.run.threads or threads)
        with torch.inference_mode():
            xe = torch.randn(128, channels, size, size)
            model(xe[:8])
            started = time.perf_counter()
            model(xe)
            cost.eval_image_seconds = (time.perf_counter() - started) / 128
    finally:
        torch.set_num_threads(threads)
    return cost


def _payload_bytes(config: Any, density: float) -> tuple[int, int]:
    """(values payload, dense score payload) in bytes for ``config``'s model at ``density``."""
    from ssfl.masks import prunable_parameter_names

    model = _model_for(config)
    prunable = set(prunable_parameter_names(model))
    weights = sum(p.numel() for n, p in model.named_parameters() if n in prunable)
    other = sum(p.numel() for n, p in model.named_parameters() if n not in prunable)
    values = round(weights * min(1.0, density)) + other
    return 28 + 4 * values, 28 + 4 * weights


def estimate_seconds(config: Any, densities: Sequence[float], links: Sequence[float | None],
                     sparse: str, cost: CostModel | None = None,
                     samples_per_client: int | None = None,
                     test_images: int | None = None) -> dict[str, Any]:
    """Seconds a full benchmark would take: per link (None: unshaped) and density, a run is
    start + mask round + rounds x (fixed + compute + transfer) + final evaluation + stop. Each
    direction of the link carries the round's payloads one after the other (down: the sampled
    clients' messages; up: their replies); Flower's framing (~2 %) is ignored."""
    cost = cost or CostModel()
    k = config.federation.clients_per_round
    n = config.federation.num_clients
    _, _, _, train_size, test_size = DATA_SHAPES[config.data.dataset]
    samples = samples_per_client or train_size // n
    # run.eval_every=0 (the presets): no evaluation at all, not even after the last round
    test = (test_images or test_size) if config.run.eval_every > 0 else 0
    steps = config.train.local_epochs * -(-samples // config.train.batch_size)
    pinned, pool = node_plan(n, config.run.rounds, k, config.run.seed)
    nodes = len(pinned) + int(pool)
    per_run: dict[str, dict[str, float]] = {}
    total = 0.0
    for mbit in links:
        label = "unshaped" if mbit is None else f"{mbit:g}mbit"
        per_run[label] = {}
        for density in densities:
            values, scores = _payload_bytes(config, density)
            rate = math.inf if mbit is None else mbit * 1e6 / 8  # bytes per second
            algorithm = "fedavg" if density >= 1.0 else sparse
            mask = 0.0
            if algorithm != "fedavg":
                bitmap = (scores - 28) // 4 / 8
                mask = cost.message_seconds + nodes * bitmap / rate  # the bitmap to each node
                scorers = {"ssfl": n, "snip_single": 1}.get(algorithm, 0)
                if scorers:
                    mask += (cost.message_seconds + cost.step_seconds
                             + scorers * scores / rate)
            else:
                mask = cost.message_seconds
            round_seconds = (cost.message_seconds + steps * cost.step_seconds
                             + 2 * k * values / rate)
            seconds = (cost.start_seconds + cost.server_load_seconds + cost.client_load_seconds
                       + mask + config.run.rounds * round_seconds
                       + test * cost.eval_image_seconds + cost.stop_seconds)
            per_run[label][str(float(density))] = seconds
            total += seconds
    runs = sum(len(per) for per in per_run.values())
    return {"total_seconds": total, "per_run_seconds": per_run, "steps_per_client": steps,
            "eval_seconds": runs * test * cost.eval_image_seconds, "cost": dataclasses.asdict(cost),
            "samples_per_client": samples, "supernodes": nodes,
            "dense_payload_bytes": _payload_bytes(config, 1.0)[0]}


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
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="digits (default): small_cnn width 2, 3 clients; cifar10: "
                             "small_cnn on CIFAR-10, 10 clients, 3 per round; resnet18: "
                             "ResNet-18 on CIFAR-10, 1000 clients of 50 samples, 3 per round, "
                             "sparse runs with snip_single (CIFAR-10 from $SSFL_DATA_DIR)")
    parser.add_argument("--cifar10", action="store_true", help="the same as --preset cifar10")
    parser.add_argument("--resnet18", action="store_true", help="the same as --preset resnet18")
    parser.add_argument("--width", type=float, default=None,
                        help="model.width (the payload grows with its square; resnet18 at "
                             "1.0: 44.7 MB dense, 0.5: 11.2 MB)")
    parser.add_argument("--sparse-algorithm", default=None,
                        choices=["ssfl", "snip_single", "random", "random_erk"],
                        help="the algorithm of the runs below density 1 (default: the "
                             "preset's: ssfl; snip_single for resnet18)")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                        help="further ssfl config overrides")
    parser.add_argument("--no-cache", action="store_true",
                        help="SuperNodes without the partition cache (node config "
                             "cache-dir=\"off\"): every ClientApp process loads and splits "
                             "the whole data set, as before the cache")
    parser.add_argument("--no-worker", action="store_true",
                        help="SuperNodes without their persistent worker: every ClientApp "
                             "process imports torch and builds data and model, as before the "
                             "worker")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="torch threads of the ServerApp, i.e. of its final evaluation "
                             "(default 0: run.threads; more help only where cores are free)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--estimate", action="store_true",
                        help="print how long the runs would take (a cost model measured on "
                             "the 2-core machine) and exit without running anything")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    preset = args.preset or ("resnet18" if args.resnet18 else
                             "cifar10" if args.cifar10 else "digits")
    sparse = args.sparse_algorithm or SPARSE_ALGORITHM[preset]
    server_threads = args.server_threads or 0
    base = list(PRESETS[preset])
    if preset != "digits":
        data_dir = os.environ.get("SSFL_DATA_DIR")
        if not data_dir:
            print(f"comm_time: the {preset} preset needs SSFL_DATA_DIR (the folder holding "
                  "cifar-10-batches-bin/)", file=sys.stderr)
            return 2
        base.append(f"data.root={data_dir}")
    if args.width is not None:
        base.append(f"model.width={args.width}")
    base += [f"run.rounds={args.rounds}", *args.set]
    links: list[tuple[str, float | None]] = (
        [("loopback", None)] if args.loopback
        else ([] if args.no_unshaped else [("unshaped", None)])
        + [(f"{b:g}mbit", b) for b in args.bandwidths])
    if args.estimate:
        from ssfl.config import load_config

        config = load_config(None, base)
        est = estimate_seconds(config, args.densities, [m for _, m in links], sparse,
                               measure_costs(config, server_threads=server_threads))
        print(f"comm_time estimate ({preset}, {config.model.name} width {config.model.width:g}, "
              f"dense payload {est['dense_payload_bytes'] / 1e6:.1f} MB, "
              f"{est['samples_per_client']} samples = {est['steps_per_client']} steps per "
              f"client, {est['supernodes']} SuperNodes, sparse: {sparse}):")
        for label, per in est["per_run_seconds"].items():
            print(f"  {label:>9}: " + ", ".join(f"d={float(d):g} {sec / 60:.1f} min"
                                                for d, sec in per.items()))
        print(f"  total: {est['total_seconds'] / 3600:.2f} h (of it the server's final "
              f"evaluations: {est['eval_seconds'] / 3600:.2f} h)")
        return 0
    problems = environment_problems(loopback=args.loopback, qdisc=args.qdisc)
    if problems:
        print(problems_message(problems), file=sys.stderr)
        return 2
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
                overrides = base + algorithm_overrides(density, sparse)
                print(f"comm_time: {label}, density {density:g} ...", flush=True)
                t0 = time.monotonic()
                res = run_once(overrides, net=net, timeout=args.timeout,
                               node_config='cache-dir="off"' if args.no_cache else "",
                               server_threads=server_threads, worker=not args.no_worker)
                print(f"  done in {time.monotonic() - t0:.0f} s: comm "
                      f"{_fmt(mean_of(res['rounds'], 'comm_seconds'), '.2f')} s/round, wire "
                      f"{_fmt(mean_of(res['rounds'], 'wire_bytes'), '.0f')} B/round", flush=True)
                results.setdefault(label, {})[str(float(density))] = res
                # Each finished run is kept at once: a later failure loses nothing measured.
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".partial.json").write_text(json.dumps(
                    {"config": base, "results": results}, indent=1))
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
    print_breakdown(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/comm_time.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "preset": preset, "sparse_algorithm": sparse,
        "config": base, "qdisc": None if args.loopback else args.qdisc,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": time.time() - started,
        "definitions": {
            "comm_seconds": "seconds - max(client_compute_seconds) - aggregation_seconds",
            "fixed_comm_seconds": "comm_seconds of the unshaped run (same namespace/veth)",
            "excess_comm_seconds": "comm_seconds - fixed_comm_seconds",
            "wire_bytes": "root-side veth tx (down) + rx (up) bytes between the round's "
                          "start and end marks",
            "last_<part>_seconds": "the parts of the reply that came last "
                                   "(ssfl.flower.server_app.round_timeline): deliver (push "
                                   "to ClientApp process start), startup (process start to "
                                   "handler; import: this app's imports), handler (setup, "
                                   "decode, train, encode), return (handler end to the "
                                   "reply's arrival), reply (push to arrival)",
            "server_seconds": "seconds - last_reply_seconds: the server's own work in the "
                              "round (payloads, push excluded, decoding, aggregation)",
        },
        "summary": table, "runs": results,
    }, indent=1))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
