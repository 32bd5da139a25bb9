"""A SuperNode's persistent worker: torch, the client's data and the model stay loaded.

Flower 1.42's deployment engine starts a new ClientApp process for every message. Importing
torch and building the model and data in each of those processes costs seconds per message
(``import torch`` alone about 2.3 s on the reference machine), a fixed cost per round that hides
the byte savings of a sparse round on a fast link. With node config ``worker=true`` the
ClientApp (:mod:`ssfl.flower.client_app`, which then never imports torch) forwards each
message's parameters, payload bytes and the node's state to this worker over a Unix socket and
returns its answer; the worker runs the same handlers (:mod:`ssfl.flower.node`) as the in-process
ClientApp, so results are identical.

Life cycle: the first message that finds no worker starts one (a detached process, under a
lock so that concurrent ClientApp processes start one between them); it serves one request at a
time and exits after ``worker-idle-seconds`` without a request or when its socket file is
removed (its pid is in ``<socket>.pid``, its log in ``<socket>.log``). ``python -m
ssfl.flower.local`` stops the workers of its deployment with the rest.

Node config keys: ``worker`` (true/false, default false), ``worker-dir`` (folder of the
socket, default ``$XDG_RUNTIME_DIR/ssfl`` or ``<tmp>/ssfl-<uid>``; created private),
``worker-idle-seconds`` (default 1800).

Wire format (both directions): ``b"SSFW"``, the header's length and the number of binary
blocks (``!4sII``), the JSON header, then each block as a ``!Q`` length and its bytes. Bytes
values (payloads, the kept mask) travel as blocks and appear in the header as ``{"block": i}``.

This module imports no torch at module level: the ClientApp side (:func:`call`) must start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MAGIC = b"SSFW"
_HEAD = struct.Struct("!4sII")
_BLOCK = struct.Struct("!Q")
#: Unix socket paths are limited to 107 bytes on Linux; longer folders fall back to the default.
_MAX_SOCKET_PATH = 100
DEFAULT_IDLE_SECONDS = 1800.0
START_TIMEOUT_SECONDS = 120.0


class WorkerError(RuntimeError):
    """The worker could not be started or reached, or its handler failed (its message says
    which, with the worker's error and log)."""


# ---- where a node's worker listens ----------------------------------------------------------


def enabled(node_config: Mapping[str, Any]) -> bool:
    value = node_config.get("worker", False)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "on", "1", "yes"):
        return True
    if text in ("false", "off", "0", "no", ""):
        return False
    raise ValueError(f"node config worker={value!r}: use true or false")


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check that an existing one is ours and private: the
    socket accepts requests from whoever can open it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise WorkerError(
            f"worker folder {path} must belong to this user and be private (chmod 700), or "
            "choose another with node config worker-dir=<folder>")
    return path


def default_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "ssfl"
    return Path(tempfile.gettempdir()) / f"ssfl-{os.getuid()}"


def socket_path(node_id: int, node_config: Mapping[str, Any]) -> Path:
    """The socket of this node's worker: one worker per SuperNode (several SuperNodes on one
    host each get their own, as separate machines would)."""
    ident = json.dumps([int(node_id), sorted((str(k), str(v)) for k, v in node_config.items())])
    name = f"w-{hashlib.blake2b(ident.encode(), digest_size=6).hexdigest()}.sock"
    folder = Path(str(node_config.get("worker-dir", "")) or default_dir()).expanduser()
    if len(str(folder.resolve() / name)) > _MAX_SOCKET_PATH:
        folder = default_dir()
    return _private_dir(folder.resolve()) / name


def idle_seconds(node_config: Mapping[str, Any]) -> float:
    value = float(node_config.get("worker-idle-seconds", DEFAULT_IDLE_SECONDS))
    if value <= 0:
        raise ValueError(f"node config worker-idle-seconds={value}: must be > 0")
    return value


# ---- frames -----------------------------------------------------------------------------------


def encode_frame(header: Mapping[str, Any], blocks: Sequence[bytes]) -> bytes:
    head = json.dumps(header).encode()
    parts = [_HEAD.pack(MAGIC, len(head), len(blocks)), head]
    for block in blocks:
        parts += [_BLOCK.pack(len(block)), block]
    return b"".join(parts)


def _read_exact(conn: socket.socket, count: int) -> bytes:
    buf = bytearray(count)
    view, got = memoryview(buf), 0
    while got < count:
        n = conn.recv_into(view[got:], count - got)
        if n == 0:
            raise WorkerError(f"connection closed after {got} of {count} bytes")
        got += n
    return bytes(buf)


def read_frame(conn: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    magic, head_len, count = _HEAD.unpack(_read_exact(conn, _HEAD.size))
    if magic != MAGIC:
        raise WorkerError(f"not an ssfl worker frame (starts with {magic!r})")
    header = json.loads(_read_exact(conn, head_len))
    blocks = [_read_exact(conn, _BLOCK.unpack(_read_exact(conn, _BLOCK.size))[0])
              for _ in range(count)]
    return header, blocks


def pack_state(state: Mapping[str, Any], blocks: list[bytes]) -> dict[str, Any]:
    """The node state with its bytes values moved to ``blocks``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, bytes | bytearray | memoryview):
            out[key] = {"block": len(blocks)}
            blocks.append(bytes(value))
        else:
            out[key] = value
    return out


def unpack_state(packed: Mapping[str, Any], blocks: Sequence[bytes]) -> dict[str, Any]:
    return {k: blocks[v["block"]] if isinstance(v, dict) and set(v) == {"block"} else v
            for k, v in packed.items()}


# ---- the ClientApp's side -------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(path: Path, idle: float) -> socket.socket:
    """Connect to the worker at ``path``, starting it first if none answers. A lock file
    makes concurrent callers start one worker between them."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead worker's socket
        log_path = path.with_suffix(".log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ssfl.flower.worker", "--socket", str(path),
                 "--idle-seconds", str(idle)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the ClientApp process that started it
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if proc.poll() is not None:
                raise WorkerError(f"the node's worker exited with status {proc.returncode} "
                                  f"while starting; its log ({log_path}):\n{_log_tail(log_path)}")
            time.sleep(0.05)
        proc.kill()
        raise WorkerError(f"the node's worker did not answer on {path} within "
                          f"{START_TIMEOUT_SECONDS:.0f} s; log: {log_path}")


def call(path: Path, kind: str, config: Mapping[str, Any], payload: bytes | None,
         run_config: Mapping[str, Any], node_config: Mapping[str, Any],
         state: Mapping[str, Any], *, idle: float = DEFAULT_IDLE_SECONDS,
         ) -> tuple[dict[str, Any], bytes | None, dict[str, Any], dict[str, float | int]]:
    """Have the worker at ``path`` (started if needed) run handler ``kind``; returns the
    reply's metrics and payload, the state entries the handler changed and this call's figures
    (``worker-seconds``: the round trip; ``worker-started``: 1 if this call started it)."""
    started = time.perf_counter()
    spawned = 0
    conn = _connect(path)
    if conn is None:
        conn, spawned = _start(path, idle), 1
    blocks: list[bytes] = []
    header = {"kind": kind, "config": dict(config), "run_config": dict(run_config),
              "node_config": dict(node_config), "state": pack_state(state, blocks),
              "payload": None}
    if payload is not None:
        header["payload"] = len(blocks)
        blocks.append(payload)
    with conn:
        conn.sendall(encode_frame(header, blocks))
        reply, reply_blocks = read_frame(conn)
    if not reply.get("ok"):
        raise WorkerError(f"the node's worker failed: {reply.get('error', 'no error text')}")
    out_payload = reply_blocks[reply["payload"]] if reply.get("payload") is not None else None
    return (reply["metrics"], out_payload, unpack_state(reply["state"], reply_blocks),
            {"worker-seconds": time.perf_counter() - started, "worker-started": spawned})


# ---- the worker's side ------------------------------------------------------------------------


def _answer(conn: socket.socket) -> None:
    from ssfl.flower import node

    try:
        header, blocks = read_frame(conn)
        state = unpack_state(header["state"], blocks)
        payload = blocks[header["payload"]] if header.get("payload") is not None else None
        before = dict(state)
        metrics, reply = node.handle(header["kind"], header["config"], payload,
                                     header["run_config"], header["node_config"], state)
        # Only what the handler changed goes back (not the mask bitmap of every message).
        changed = {k: v for k, v in state.items() if before.get(k) != v}
        changed.update({k: None for k in before.keys() - state.keys()})  # None: removed
        out_blocks: list[bytes] = []
        answer = {"ok": True, "metrics": metrics, "state": pack_state(changed, out_blocks),
                  "payload": None}
        if reply is not None:
            answer["payload"] = len(out_blocks)
            out_blocks.append(reply)
    except Exception as exc:  # the worker outlives a bad request; the caller gets the reason
        traceback.print_exc()
        answer, out_blocks = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
    conn.sendall(encode_frame(answer, out_blocks))


def _same_file(path: Path, ident: tuple[int, int]) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == ident


def serve(path: Path, idle: float) -> None:
    """Answer requests on ``path`` one at a time until ``idle`` seconds pass without one or
    the socket file is removed or replaced."""
    from ssfl.flower import node  # noqa: F401  (torch, once, before the first request)

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file: owner only
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    st = path.stat()
    ident = (st.st_dev, st.st_ino)
    server.listen(16)
    server.settimeout(1.0)
    pid_file = path.with_suffix(".pid")
    pid_file.write_text(f"{os.getpid()}\n")
    print(f"ssfl worker {os.getpid()} serving on {path} (idle limit {idle:g} s)", flush=True)
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if time.monotonic() - last > idle or not _same_file(path, ident):
                    break
                continue
            with conn:
                conn.settimeout(None)
                try:
                    _answer(conn)
                except (OSError, WorkerError) as exc:  # the caller went away
                    print(f"request dropped: {exc}", flush=True)
            last = time.monotonic()
    finally:
        server.close()
        if _same_file(path, ident):
            path.unlink()
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
    print(f"ssfl worker {os.getpid()} stopped", flush=True)


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(0)  # through serve()'s clean-up: socket and pid file removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssfl.flower.worker",
                                     description="A SuperNode's persistent ssfl worker (the "
                                     "ClientApp starts it; see ssfl.flower.worker).")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_term)
    serve(Path(args.socket), args.idle_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
