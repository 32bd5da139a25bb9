"""Fault injection on a real Flower deployment (issue 5): SIGKILL one SuperNode mid-run.

A SuperLink and 3 SuperNodes (SuperNode i holds client i) run as processes on 127.0.0.1; after
round 1 is in ``metrics.jsonl`` the process group of SuperNode 1 (the SuperNode and any
ClientApp process it started) is killed with SIGKILL, at the start of round 2. Round 2 samples
clients 0 and 1 (seeded sampling, 2 of 3 clients per round) and needs one valid update
(``federation.min_replies=1``), so the run must go on without client 1: round 2 records it under
``failed`` with the reason (its Flower node id and the round timeout), accuracy is still
reported, the run ends normally, and no process is left behind.

The round timeout also bounds the first exchanges (hello, mask round), whose ClientApp processes
start cold: about 15 s on a 2-core machine whose cores are both busy with other jobs, more when
they are busier; a 30 s timeout failed there (every node missed the mask round). So the timeout
is 120 s, which never slows a healthy run: the killed node is still found after round 1, once it
misses two 30 s heartbeats (the SuperLink then answers "Node Unavailable" for it, 36-60 s after
the kill) or, at the latest, by the timeout. Takes about 2 minutes. ``SSFL_TEST_TIME_SCALE``
multiplies every limit here for slower machines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from test_flower import QUICK, _stop_leftovers, needs_linux, node_cache  # noqa: E402, F401

from ssfl.flower.local import processes_of  # noqa: E402
from ssfl.run.experiment import sample_clients  # noqa: E402

pytestmark = pytest.mark.slow  # a real deployment: SuperLink, SuperNodes, `flwr run`

TIME_SCALE = float(os.environ.get("SSFL_TEST_TIME_SCALE", "1"))
# flower.round-timeout-seconds: how long the server waits for a node's reply (see above)
TIMEOUT_S = round(120 * TIME_SCALE)
RUN_LIMIT_S = 600 * TIME_SCALE  # the whole run; only a hung run comes near it
KILLED = 1  # the client (= partition id = SuperNode index) whose SuperNode is killed


def _supernode_pid(workdir: Path, partition: int) -> int:
    """The SuperNode process holding ``partition`` (found by the deployment's marker and its
    command line; it leads its own process group, as the launcher starts it)."""
    wanted = f"partition-id={partition} num-partitions=3"
    for pid in processes_of(workdir):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-supernode") for a in argv) and wanted.encode() in argv \
                and os.getpgid(pid) == pid:
            return pid
    raise AssertionError(f"no SuperNode with {wanted!r} among {sorted(processes_of(workdir))}")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@needs_linux
def test_run_survives_a_supernode_killed_mid_run(tmp_path: Path) -> None:
    workdir = (tmp_path / "work").resolve()
    run_dir = tmp_path / "run"
    rounds = 2
    assert KILLED in sample_clients(0, 2, 3, 2)  # round 2 samples clients 0 and 1
    console = tmp_path / "console.log"  # a file, not a pipe: a full pipe would block the run
    with console.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ssfl.flower.local", "--supernodes", "3", *QUICK,
             f"run.rounds={rounds}", "federation.clients_per_round=2",
             "federation.min_replies=1", "run.checkpoint_every=0",
             f"flower.round-timeout-seconds={TIMEOUT_S}",
             "--out", str(run_dir), "--workdir", str(workdir), "--timeout", str(RUN_LIMIT_S)],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    killed_after = None
    try:
        deadline = time.monotonic() + RUN_LIMIT_S + 10
        while killed_after is None and time.monotonic() < deadline and proc.poll() is None:
            rows = _rows(run_dir / "metrics.jsonl")
            if rows:
                pid = _supernode_pid(workdir, KILLED)
                os.killpg(pid, signal.SIGKILL)
                killed_after = rows[-1]["round"]
            time.sleep(0.2)
        assert killed_after is not None, console.read_text(errors="replace")[-3000:]
        assert killed_after == 1, "the run was too far along when the kill landed"
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        text = console.read_text(errors="replace")
        assert proc.returncode == 0, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        leftovers = _stop_leftovers(workdir)
    assert not leftovers, f"processes left running: {leftovers}"
    # The run says so on its console and completed every round.
    assert "final accuracy" in text, text[-3000:]
    rows = _rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["nodes"] == 3
    # The killed SuperNode's Flower node id, as it logged it on connecting.
    log = (run_dir / "flower-logs" / f"supernode-{KILLED}.log").read_text(errors="replace")
    node_ids = re.findall(r"SuperNode ID:\s*(\d+)", log)
    assert node_ids, log[-2000:]
    for row in rows[:killed_after]:
        assert "failed" not in row, row
    # Every round after the kill was aggregated from the other sampled client and names client
    # 1 and its node: the server waited the round timeout for it, or (once the node missed two
    # 30 s heartbeats) the SuperLink answered for it that the node is unavailable.
    for row in rows[killed_after:]:
        assert row["accuracy"] is not None and 0.0 <= row["accuracy"] <= 1.0
        (failed,) = row["failed"]
        assert failed["client"] == KILLED and failed["attempt"] == 1, row
        assert failed["reason"].startswith(f"node {node_ids[-1]} "), failed
        assert (f"sent no reply within {TIMEOUT_S} s" in failed["reason"]
                or "Node Unavailable" in failed["reason"]), failed
        if "no reply" in failed["reason"]:
            assert row["seconds"] >= TIMEOUT_S
        assert row["attempts"] == 1
        assert len(row["client_compute_seconds"]) == 1
    assert summary["final_accuracy"] is not None
    # ... and says so on the console (the ServerApp's log, streamed by `flwr run`).
    assert f"client {KILLED} dropped: node {node_ids[-1]} " in text, text[-3000:]
