"""benchmarks/comm_time.py: the pure parts (tc commands, counters, ratios, the root/netns check)
and a short loopback run on a real local deployment (no namespace, no shaping)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def comm_time():
    return load_benchmark("comm_time")


@pytest.fixture(autouse=True)
def node_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ClientApps' partition cache in a temporary folder, never in the user's home."""
    monkeypatch.setenv("SSFL_CACHE_DIR", str(tmp_path_factory.mktemp("ssfl-cache")))


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


def test_round_record_takes_the_breakdown_of_the_last_reply(comm_time) -> None:
    row = {"round": 1, "seconds": 12.0, "client_compute_seconds": [2.0, 3.0],
           "client_setup_seconds": [0.1, 0.2], "aggregation_seconds": 0.1,
           "exchange_seconds": 11.5, "bytes_down": 10, "bytes_up": 10,
           "push_seconds": 0.2, "first_reply_seconds": 9.0, "last_reply_seconds": 11.5,
           "client_reply_seconds": [9.0, 11.5], "client_deliver_seconds": [1.0, 2.9],
           "client_startup_seconds": [4.0, 4.5], "client_import_seconds": [2.0, 2.2],
           "client_handler_seconds": [2.1, 3.2], "client_train_seconds": [2.0, 3.0],
           "client_decode_seconds": [0.01, 0.02], "client_encode_seconds": [0.01, 0.03],
           "client_return_seconds": [1.9, 0.9]}
    rec = comm_time.round_record(row, None)
    assert rec["last_deliver_seconds"] == 2.9 and rec["last_startup_seconds"] == 4.5
    assert rec["last_setup_seconds"] == 0.2 and rec["last_return_seconds"] == 0.9
    assert rec["server_seconds"] == pytest.approx(0.5) and rec["push_seconds"] == 0.2
    # A row without a time line (an older run): the parts are None.
    old = {k: v for k, v in row.items() if not k.startswith(("client_r", "client_d", "last"))}
    assert comm_time.round_record(old, None)["last_deliver_seconds"] is None
    # On loopback the run is its own base: its comm time is all fixed cost.
    recs = {"rounds": [comm_time.round_record(row, None)]}
    table = comm_time.summarise({"loopback": {"0.1": recs}})
    assert table["loopback"]["0.1"]["fixed_comm_seconds"] == pytest.approx(rec["comm_seconds"])
    assert table["loopback"]["0.1"]["last_startup_seconds"] == 4.5
    comm_time.print_breakdown(table)


def test_node_plan_gives_each_sampled_client_its_own_supernode(comm_time) -> None:
    from ssfl.run.experiment import sample_clients

    assert comm_time.node_plan(3, 2, 3, 0) == ([0, 1, 2], False)
    pinned, pool = comm_time.node_plan(1000, 2, 3, 0)
    assert pool and len(pinned) <= 6
    for rnd in (1, 2):
        assert set(sample_clients(0, rnd, 1000, 3)) <= set(pinned)
    assert comm_time.algorithm_overrides(0.1, "snip_single")[0] == "algorithm.name=snip_single"
    assert comm_time.algorithm_overrides(1.0, "snip_single")[0] == "algorithm.name=fedavg"


def test_estimate_of_the_resnet18_preset(comm_time) -> None:
    from ssfl.config import load_config

    config = load_config(None, [*comm_time.RESNET18_CONFIG, "run.rounds=2"])
    cost = comm_time.CostModel(step_seconds=2.0, eval_image_seconds=0.01)
    est = comm_time.estimate_seconds(config, [1.0, 0.1], [None, 100.0, 20.0, 5.0],
                                     "snip_single", cost)
    assert 44_000_000 < est["dense_payload_bytes"] < 45_000_000  # ResNet-18: 11.2 M floats
    assert est["samples_per_client"] == 50 and est["steps_per_client"] == 2
    assert est["supernodes"] <= 7
    runs = est["per_run_seconds"]
    dense = [runs[link]["1.0"] for link in ("unshaped", "100mbit", "20mbit", "5mbit")]
    assert dense == sorted(dense)  # slower links take longer
    # Two rounds at 5 Mbit/s move 2 x 6 x 44.7 MB: at least 860 s more than unshaped.
    assert runs["5mbit"]["1.0"] - runs["unshaped"]["1.0"] > 2 * 6 * 44e6 * 8 / 5e6
    assert runs["5mbit"]["0.1"] < runs["5mbit"]["1.0"]
    assert est["total_seconds"] == pytest.approx(
        sum(sum(per.values()) for per in runs.values()))


def test_main_estimate_runs_nothing(comm_time, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # no root needed for an estimate
    out = tmp_path / "x.json"
    assert comm_time.main(["--estimate", "--rounds", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "comm_time estimate (digits" in text and "5mbit" in text and "total:" in text
    assert not out.exists()
    monkeypatch.delenv("SSFL_DATA_DIR", raising=False)
    assert comm_time.main(["--resnet18", "--estimate"]) == 2
    assert "needs SSFL_DATA_DIR" in capsys.readouterr().err


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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_loopback_mode_runs_a_tiny_deployment(comm_time, tmp_path: Path) -> None:
    """The CI version: 2 SuperNodes on 127.0.0.1, one round of SSFL at density 0.1 (one run:
    a Flower run costs about a minute on a busy 2-core machine; the ratios are checked above)."""
    pytest.importorskip("flwr")
    out = tmp_path / "comm.json"
    code = comm_time.main([
        "--loopback", "--rounds", "1", "--densities", "0.1", "--timeout", "600",
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
    # Where the round's time went: Flower's delivery, the process start-up, the way back.
    rec = run["rounds"][0]
    for part in ("deliver", "startup", "import", "handler", "return", "reply"):
        assert rec[f"last_{part}_seconds"] is not None and rec[f"last_{part}_seconds"] >= 0
    assert row["fixed_comm_seconds"] == pytest.approx(row["comm_seconds"])
    assert result["qdisc"] is None and "--loopback" in result["command"]
