"""benchmarks/comm_time.py: the pure parts (tc commands, counters, ratios, the root/netns check)
and a short loopback run on a real local deployment (no namespace, no shaping)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "comm_time.py"


@pytest.fixture(scope="module")
def comm_time():
    spec = importlib.util.spec_from_file_location("comm_time", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["comm_time"] = module
    spec.loader.exec_module(module)
    return module


def test_tc_commands(comm_time) -> None:
    (tbf,) = comm_time.tc_commands("veth0", 20, "tbf")
    assert tbf[:7] == ["tc", "qdisc", "replace", "dev", "veth0", "root", "tbf"]
    assert tbf[tbf.index("rate") + 1] == "20mbit"
    assert int(tbf[tbf.index("burst") + 1]) >= 65536  # a GSO super-packet always fits
    (fast,) = comm_time.tc_commands("veth0", 1000, "tbf")
    assert int(fast[fast.index("burst") + 1]) == 1_250_000  # 10 ms at 1 Gbit/s
    qdisc, cls = comm_time.tc_commands("veth1", 5.5, "htb", netns="ns1")
    assert qdisc[:4] == ["ip", "netns", "exec", "ns1"] and "htb" in qdisc
    assert cls[cls.index("rate") + 1] == cls[cls.index("ceil") + 1] == "5.5mbit"
    with pytest.raises(ValueError):
        comm_time.tc_commands("veth0", 0)
    with pytest.raises(ValueError):
        comm_time.tc_commands("veth0", 10, "netem")


def test_read_counters(comm_time, tmp_path: Path) -> None:
    stats = tmp_path / "vethX" / "statistics"
    stats.mkdir(parents=True)
    (stats / "rx_bytes").write_text("1234\n")
    (stats / "tx_bytes").write_text("98765\n")
    assert comm_time.read_counters("vethX", root=tmp_path) == (1234, 98765)
    if Path("/sys/class/net/lo/statistics/rx_bytes").exists():
        rx, tx = comm_time.read_counters("lo")
        assert rx >= 0 and tx >= 0


def test_comm_seconds_and_ratios(comm_time) -> None:
    row = {"round": 2, "seconds": 10.0, "client_compute_seconds": [1.0, 3.0],
           "client_setup_seconds": [2.0, 2.5], "aggregation_seconds": 0.5,
           "exchange_seconds": 9.0, "bytes_down": 100, "bytes_up": 80}
    assert comm_time.comm_seconds(row) == pytest.approx(6.5)  # 10 - max(1, 3) - 0.5
    rec = comm_time.round_record(row, (1000, 900))
    assert rec["wire_bytes"] == 1900 and rec["payload_bytes"] == 180
    assert rec["client_setup_seconds_max"] == 2.5
    assert comm_time.round_record(row, None)["wire_bytes"] is None
    assert comm_time.ratio(1.0, 4.0) == 0.25
    assert comm_time.ratio(None, 4.0) is None and comm_time.ratio(1.0, 0.0) is None

    def run(comm: float, wire: int) -> dict:
        return {"rounds": [{"comm_seconds": comm, "wire_bytes": wire, "payload_bytes": wire,
                            "seconds": comm + 1}]}

    table = comm_time.summarise({
        "unshaped": {"1.0": run(4.0, 1000), "0.1": run(3.0, 100)},
        "20mbit": {"1.0": run(14.0, 1000), "0.1": run(4.0, 110)},
    })
    sparse = table["20mbit"]["0.1"]
    assert sparse["time_ratio"] == pytest.approx(4 / 14)
    assert sparse["excess_time_ratio"] == pytest.approx((4 - 3) / (14 - 4))
    assert sparse["wire_byte_ratio"] == pytest.approx(0.11)
    assert table["20mbit"]["1.0"]["time_ratio"] == pytest.approx(1.0)
    assert table["unshaped"]["0.1"]["excess_comm_seconds"] == pytest.approx(0.0)
    comm_time.print_table(table)


def test_environment_check_says_what_is_missing(comm_time) -> None:
    assert comm_time.environment_problems(loopback=True, euid=1000, which=lambda _: None) == []
    problems = comm_time.environment_problems(loopback=False, euid=1000,
                                              which=lambda t: f"/usr/sbin/{t}")
    assert len(problems) == 1 and "needs root" in problems[0] and "--loopback" in problems[0]
    problems = comm_time.environment_problems(loopback=False, euid=0, which=lambda t: None)
    assert any("`ip` not found" in p for p in problems)
    assert any("`tc` not found" in p for p in problems)
    problems = comm_time.environment_problems(
        loopback=False, euid=0, which=lambda t: t,
        netns_probe=lambda qdisc: f"cannot set up a shaped network namespace ({qdisc}: nope)")
    assert problems == ["cannot set up a shaped network namespace (tbf: nope)"]
    message = comm_time.problems_message(problems)
    assert "cannot run here" in message and "--loopback" in message


def test_main_refuses_without_root(comm_time, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert comm_time.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs root" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_loopback_mode_runs_a_tiny_deployment(comm_time, tmp_path: Path) -> None:
    """The CI version: 2 SuperNodes on 127.0.0.1, one round of SSFL at density 0.1 (one run:
    a Flower run costs about a minute on a busy 2-core machine; the ratios are checked above)."""
    pytest.importorskip("flwr")
    out = tmp_path / "comm.json"
    code = comm_time.main([
        "--loopback", "--rounds", "1", "--densities", "0.1", "--timeout", "240",
        "--out", str(out), "--set", "federation.num_clients=2", "federation.clients_per_round=2",
        "model.width=1.0"])
    assert code == 0
    result = json.loads(out.read_text())
    rows = result["summary"]["loopback"]
    assert set(rows) == {"0.1"}
    row = rows["0.1"]
    assert row["seconds"] > 0 and row["comm_seconds"] is not None
    assert 0 <= row["comm_seconds"] <= row["seconds"]
    assert row["wire_bytes"] is None and row["time_ratio"] is None  # no veth, no dense run
    run = result["runs"]["loopback"]["0.1"]
    assert len(run["rounds"]) == 1 and run["density"] == pytest.approx(0.1, rel=0.05)
    assert run["rounds"][0]["payload_bytes"] > 0
    assert result["qdisc"] is None and "--loopback" in result["command"]
