"""The SuperNode's persistent worker (ssfl.flower.worker): wire format, life cycle, errors, and
a Flower run through workers that matches the simulator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import test_flower  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from test_flower import (  # noqa: E402, F401
    QUICK,
    _metadata,
    _scores_message,
    needs_linux,
    node_cache,
    task_identity,
)

from ssfl.config import load_config  # noqa: E402
from ssfl.flower import client_app as client_module, worker  # noqa: E402
from ssfl.flower.protocol import CONFIG, METRICS, payload_bytes, run_config_from_config  # noqa: E402


def _wait_gone(pid: int, seconds: float = 60.0) -> bool:  # generous: a busy machine
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A child of this process that exited is a zombie until reaped; workers are detached
        # (start_new_session) but still our children.
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture()
def worker_dir(tmp_path_factory: pytest.TempPathFactory):
    """A private folder for the workers' sockets; every worker started in it is stopped (its
    socket removed) and must have exited after the test."""
    folder = tmp_path_factory.mktemp("w")
    folder.chmod(0o700)
    yield folder
    pids = [int(p.read_text()) for p in folder.glob("*.pid")]
    for sock in folder.glob("*.sock"):
        sock.unlink()
    assert all(_wait_gone(pid) for pid in pids), "a worker did not exit when its socket went"


def test_client_app_module_imports_no_torch() -> None:
    """With the worker, each message's process only imports the ClientApp module: no torch."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, ssfl.flower.client_app; "
         "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_frames_round_trip_and_refuse_garbage() -> None:
    blocks: list[bytes] = []
    state = {"ssfl-mask": b"\x00\x01\xff", "ssfl-data": {"client-id": 2}}
    packed = worker.pack_state(state, blocks)
    assert packed == {"ssfl-mask": {"block": 0}, "ssfl-data": {"client-id": 2}}
    header = {"kind": "train", "state": packed, "payload": 1, "x": 0.1 + 0.2}
    a, b = socket.socketpair()
    with a, b:
        a.sendall(worker.encode_frame(header, [*blocks, b"payload" * 1000]))
        got, got_blocks = worker.read_frame(b)
        assert got == header and got_blocks == [b"\x00\x01\xff", b"payload" * 1000]
        assert worker.unpack_state(got["state"], got_blocks) == state
        a.sendall(b"HTTP/1.1 200 OK\r\n")
        with pytest.raises(worker.WorkerError, match="not an ssfl worker frame"):
            worker.read_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(worker.encode_frame({"k": 1}, [b"abc"])[:-1])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(worker.WorkerError, match="closed after"):
            worker.read_frame(b)


def test_socket_paths(tmp_path: Path) -> None:
    private = tmp_path / "p"
    a = worker.socket_path(7, {"worker-dir": str(private), "partition-id": 1})
    assert a.parent == private.resolve() and oct(private.stat().st_mode & 0o777) == "0o700"
    # one worker per node: another node id or node config gets another socket
    assert a == worker.socket_path(7, {"worker-dir": str(private), "partition-id": 1})
    assert a != worker.socket_path(8, {"worker-dir": str(private), "partition-id": 1})
    # Unix socket paths have a length limit: a deep folder falls back to the default one.
    deep = tmp_path / ("x" * 120)
    assert worker.socket_path(7, {"worker-dir": str(deep)}).parent == worker.default_dir()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(worker.WorkerError, match="private"):
        worker.socket_path(7, {"worker-dir": str(shared)})
    assert worker.enabled({"worker": True}) and worker.enabled({"worker": "on"})
    assert not worker.enabled({}) and not worker.enabled({"worker": "false"})
    with pytest.raises(ValueError, match="worker="):
        worker.enabled({"worker": "maybe"})


def _context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=11, node_config=node_config, state=RecordDict(),
                   run_config=dict(run_config))


@pytest.mark.slow
def test_worker_answers_as_the_process_does_reports_errors_and_idles_out(
    task_identity: None, worker_dir: Path  # noqa: F811
) -> None:
    """Scores through the worker are the bytes the ClientApp computes itself; a bad request
    is an error naming the cause and the worker keeps serving; it exits when idle."""
    flat = run_config_from_config(load_config(None, QUICK))
    node = {"partition-id": 1, "num-partitions": 3}
    local = client_module.app(_scores_message(1), _context(node, flat))
    with_worker = {**node, "worker": True, "worker-dir": str(worker_dir),
                   "worker-idle-seconds": 3.0}
    context = _context(with_worker, flat)
    first = client_module.app(_scores_message(1), context)
    assert payload_bytes(first.content["payload"]) == payload_bytes(local.content["payload"])
    metrics = first.content[METRICS]
    assert metrics["worker-started"] == 1 and metrics["worker-seconds"] > 0
    assert metrics["num-samples"] == local.content[METRICS]["num-samples"]
    assert context.state["ssfl-data"]["client-id"] == 1
    (pid_file,) = worker_dir.glob("*.pid")
    pid = int(pid_file.read_text())
    # a client id this node does not hold: the worker's error, then it serves the next message
    with pytest.raises(worker.WorkerError, match="holds partition 1, not client 2"):
        client_module.app(_scores_message(2), context)
    train = Message(RecordDict({CONFIG: ConfigRecord({"client-id": 1, "round": 1, "lr": 0.1}),
                                "payload": first.content["payload"]}),
                    metadata=_metadata("train"))
    # a train message carrying no model values (a score payload): refused by the method
    with pytest.raises(worker.WorkerError, match="expected a VALUES payload, got SCORES"):
        client_module.app(train, context)
    again = client_module.app(_scores_message(1), context)
    assert again.content[METRICS]["worker-started"] == 0
    assert again.content[METRICS]["setup-seconds"] == 0  # data and config kept in the worker
    assert payload_bytes(again.content["payload"]) == payload_bytes(local.content["payload"])
    assert _wait_gone(pid, 60), "the worker did not exit after its idle limit"
    assert not list(worker_dir.glob("*.sock")) and not list(worker_dir.glob("*.pid"))
    log = next(worker_dir.glob("*.log")).read_text()
    assert "not client 2" in log and "stopped" in log


@pytest.mark.slow
def test_a_killed_worker_is_replaced_mid_run(
    task_identity: None, worker_dir: Path  # noqa: F811
) -> None:
    """SIGKILL leaves the socket file behind; the next message starts a new worker, which
    answers the same from the node's state in ``context.state``."""
    flat = run_config_from_config(load_config(None, QUICK))
    context = _context({"worker": True, "worker-dir": str(worker_dir)}, flat)
    first = client_module.app(_scores_message(0), context)
    (pid_file,) = worker_dir.glob("*.pid")
    old = int(pid_file.read_text())
    os.kill(old, signal.SIGKILL)
    assert _wait_gone(old)
    assert list(worker_dir.glob("*.sock"))  # stale: nobody listens
    again = client_module.app(_scores_message(0), context)
    assert again.content[METRICS]["worker-started"] == 1
    assert int(pid_file.read_text()) != old
    assert payload_bytes(again.content["payload"]) == payload_bytes(first.content["payload"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "node_configs"),
    [
        (QUICK, [{"partition-id": i, "num-partitions": 3, "worker": True} for i in range(3)]),
        (QUICK + ["federation.num_clients=5", "federation.clients_per_round=3",
                  "comm.value_dtype=float16"], [{"worker": True}, {"worker": True}]),
    ],
)
def test_flower_run_through_workers_matches_simulator(
    task_identity: None, tmp_path: Path, worker_dir: Path,  # noqa: F811
    overrides: list[str], node_configs: list[dict],
) -> None:
    """The in-process Flower run of test_flower, each node's handlers in its worker: same mask,
    metrics, bytes and final values as the simulator."""
    node_configs = [{**nc, "worker-dir": str(worker_dir)} for nc in node_configs]
    test_flower.test_in_process_flower_run_matches_simulator(None, tmp_path, overrides,
                                                             node_configs)
    assert len(list(worker_dir.glob("*.pid"))) == len(node_configs)  # one worker per node


@pytest.mark.slow
@needs_linux
def test_local_deployment_with_workers_matches_simulator_and_stops_them(
    tmp_path: Path, node_cache: Path  # noqa: F811
) -> None:
    """SuperLink and 2 SuperNodes as processes, each node with its worker: the simulator's
    results; after the first message of a node its ClientApp processes load no torch, data or
    model; ``stop()`` ends the workers with the rest."""
    _, fl, _ = test_flower.run_local_matching_simulator(
        tmp_path, [*QUICK, "federation.num_clients=2", "run.rounds=3"], supernodes=2,
        worker=True)
    workdir = (tmp_path / "work").resolve()
    assert len(list((workdir / "workers").glob("*.log"))) == 2
    assert not list((workdir / "workers").glob("*.pid"))  # the workers stopped cleanly or died
    for row in fl:
        assert all(s == 0 for s in row["client_setup_seconds"]), row  # all kept in the workers
        assert all(w is not None and 0 < w < h for w, h in
                   zip(row["client_worker_seconds"], row["client_handler_seconds"]))
