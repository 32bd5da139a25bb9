"""A local Flower deployment on loopback: one SuperLink, N SuperNodes, one ``flwr run``.

    python -m ssfl.flower.local --supernodes 3 [CONFIG.toml] [section.key=value ...]

starts ``flower-superlink`` and N ``flower-supernode`` processes (``--insecure``, or with
``--secure`` TLS and SuperNode authentication; 127.0.0.1 only, free ports), runs the SSFL Flower
app on them with ``flwr run``, waits for the run to end, and stops every process it started (each
in its own process group, also on Ctrl-C or SIGTERM). The run folder is the same as ``ssfl run``
writes, plus ``flower-logs/``.

CONFIG.toml and the overrides are an ordinary ``ssfl`` config (without a file: the app's
shortened digits quickstart, 3 clients and 5 rounds); they become the run config of the Flower
app. If the number of SuperNodes equals ``federation.num_clients``, SuperNode i holds client i
(node config ``partition-id=i num-partitions=N``); otherwise the SuperNodes serve the clients in
turn.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ssfl.config import ConfigError, load_config
from ssfl.flower.protocol import (
    _flower_settings,
    run_config_from_config,
    run_config_toml,
)
from ssfl.flower.runconfig import APP_DEFAULTS, write_app

CONNECTION = "ssfl-local"


class LocalDeploymentError(RuntimeError):
    pass


class _Interrupted(BaseException):
    """SIGTERM turned into an exception, so that ``finally`` blocks stop the processes."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (Linux /proc)."""
    if not Path("/proc").is_dir():
        return set()
    tree, out, todo = _children_map(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


MARKER = "SSFL_FLOWER_WORKDIR"  # every process of a deployment carries its workdir in its env


def processes_of(workdir: Path) -> set[int]:
    """Live processes that carry ``workdir``'s marker in their environment: exactly the
    processes of that deployment (and nobody else's), however they were started."""
    wanted = f"{MARKER}={workdir}".encode()
    found = set()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class LocalDeployment:
    """Processes of one local deployment; ``stop()`` ends all of them (idempotent)."""

    workdir: Path
    superlink_port: int
    env: dict[str, str]
    certs: Path | None = None  # secure profile: the folder of certs.make_certificates
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env=self.env,
            cwd=self.workdir, start_new_session=True,  # its own process group
        )
        self.procs.append((name, proc))
        return proc

    def all_pids(self) -> set[int]:
        pids = set()
        for _, proc in self.procs:
            pids.add(proc.pid)
            pids |= descendants(proc.pid)
        return pids

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every process group started here and to every process carrying this
        deployment's marker (e.g. the detached SuperLink of a simulation), SIGKILL to what is
        left after ``grace`` seconds."""
        pids = self.all_pids() | processes_of(self.workdir)
        for _, proc in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        for _, proc in self.procs:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Anything that left its process group is ended by pid.
        for pid in pids | processes_of(self.workdir):
            if alive(pid):
                _signal(pid, signal.SIGKILL)
        for log in self.logs:
            log.close()
        self.procs.clear()
        self.logs.clear()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_health(dep: LocalDeployment, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the SuperLink's HTTP(S) endpoint answers."""
    scheme = "https" if dep.certs is not None else "http"
    url = f"{scheme}://127.0.0.1:{dep.superlink_port}/health"
    context = ssl.create_default_context(cafile=str(dep.certs / "ca.crt")) if dep.certs else None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalDeploymentError(f"the SuperLink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise LocalDeploymentError(f"the SuperLink did not answer on {url} in time")


def flower_env(flwr_home: Path, workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        MARKER: str(workdir),
        "FLWR_HOME": str(flwr_home),
        # Never let a SuperLink/SuperNode install the app's dependencies (it would pull a CUDA
        # torch): the apps run in this environment, where ssfl is installed.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # SuperExec looks for new tasks every second by default; 0.1 s shortens each hop.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL") or "0.1",
    })
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def write_connection(flwr_home: Path, port: int, ca: Path | None = None,
                     name: str = CONNECTION) -> None:
    """The ``flwr`` CLI's connection to the SuperLink (``$FLWR_HOME/config.toml``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca}"\n' if ca is not None else "insecure = true\n"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\n{security}'
    )


def superlink_command(port: int, certs: Path | None) -> list[str]:
    command = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        return command + ["--insecure"]
    return command + ["--ssl-ca-certfile", str(certs / "ca.crt"),
                      "--ssl-certfile", str(certs / "server.pem"),
                      "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]


def supernode_command(
    port: int, *, certs: Path | None = None, key: Path | None = None,
    node_config: str = "", max_wait: float | None = None,
) -> list[str]:
    """A SuperNode on 127.0.0.1: plaintext (``certs`` None) or TLS, with ``key`` for
    SuperNode authentication."""
    command = ["flower-supernode", "--superlink", f"127.0.0.1:{port}",
               "--host", "127.0.0.1", "--port", str(free_port())]
    command += ["--insecure"] if certs is None else ["--root-certificates", str(certs / "ca.crt")]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    if node_config:
        command += ["--node-config", node_config]
    if max_wait is not None:
        command += ["--max-retries", "3", "--max-wait-time", str(max_wait)]
    return command


def register_supernode(dep: LocalDeployment, public_key: Path) -> None:
    """``flwr supernode register``: the SuperLink will accept the SuperNode holding this key."""
    out = subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION],
                         capture_output=True, env=dep.env, cwd=dep.workdir, timeout=120,
                         check=False)
    if out.returncode != 0:
        raise LocalDeploymentError(
            f"could not register {public_key}: {out.stdout.decode(errors='replace')[-800:]}")


def worker_node_config(workdir: Path) -> str:
    """Node config that gives each SuperNode its persistent worker (``ssfl.flower.worker``),
    with the sockets in the deployment's folder (the workers carry its marker, so ``stop()``
    ends them with the rest)."""
    return f'worker=true worker-dir="{workdir / "workers"}"'


def start_deployment(
    workdir: Path, num_supernodes: int, *, pinned_partitions: int | None, secure: bool = False,
    worker: bool = False,
) -> LocalDeployment:
    """SuperLink + ``num_supernodes`` SuperNodes on 127.0.0.1; returns once the link answers.

    ``pinned_partitions``: give SuperNode i ``partition-id=i num-partitions=<that>``; ``None``:
    no partition in the node config (the nodes serve any client). ``secure``: TLS with a fresh
    private CA (``workdir/certs``) and SuperNode authentication (each SuperNode's public key is
    registered with the SuperLink before the SuperNode starts). ``worker``: each SuperNode
    gets a persistent worker that keeps torch, data and model loaded between messages."""
    workdir = workdir.resolve()
    flwr_home = workdir / "flwr-home"
    port = free_port()
    certs = None
    if secure:
        from ssfl.flower.certs import make_certificates

        certs = workdir / "certs"
        make_certificates(certs, num_supernodes=num_supernodes)
    write_connection(flwr_home, port, certs / "ca.crt" if certs else None)
    dep = LocalDeployment(workdir, port, flower_env(flwr_home, workdir), certs)
    try:
        link = dep.start("superlink", superlink_command(port, certs))
        _wait_health(dep, time.monotonic() + 60, link)
        for i in range(num_supernodes):
            key = None
            if certs is not None:
                register_supernode(dep, certs / f"supernode-{i}.pub")
                key = certs / f"supernode-{i}"
            node_config = (f"partition-id={i} num-partitions={pinned_partitions}"
                           if pinned_partitions is not None else "")
            if worker:
                node_config = f"{node_config} {worker_node_config(workdir)}".strip()
            dep.start(f"supernode-{i}", supernode_command(port, certs=certs, key=key,
                                                          node_config=node_config))
    except BaseException:
        dep.stop()
        raise
    return dep


def prepare_simulation(workdir: Path) -> LocalDeployment:
    """Flower's simulation engine (Ray): ``flwr run`` itself starts a local SuperLink in
    simulation mode (detached; on free ports here) that runs the ServerApp and the simulated
    SuperNodes in one process. Needs ``ray`` (``pip install "flwr[simulation]==1.42.0"``)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise LocalDeploymentError(
            "the simulation engine needs ray: pip install ray==2.55.1 (flwr 1.42's "
            "[simulation] extra)")
    workdir = workdir.resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        'address = ":local:"\n')
    env = flower_env(flwr_home, workdir)
    port = free_port()
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    return LocalDeployment(workdir, port, env)


def flwr_run(
    dep: LocalDeployment, app: Path, run_config_file: Path, timeout: float, echo: bool = True,
    extra: Sequence[str] = (),
) -> int:
    """``flwr run --stream`` against the deployment; returns the run id once the run ends."""
    log_path = dep.workdir / "flwr-run.log"
    command = ["flwr", "run", str(app), CONNECTION, "--run-config", str(run_config_file),
               "--stream", *extra]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dep.env, cwd=dep.workdir, start_new_session=True)
        dep.procs.append(("flwr-run", proc))
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        run_id = None
        buffer = b""
        while True:
            chunk = proc.stdout.read()
            if chunk:
                log.write(chunk)
                log.flush()
                if echo:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                buffer += chunk
                if run_id is None and b"Successfully started run " in buffer:
                    tail = buffer.split(b"Successfully started run ", 1)[1].split()
                    if tail and tail[0].isdigit():
                        run_id = int(tail[0])
            if proc.poll() is not None and not chunk:
                break
            if time.monotonic() > deadline:
                raise LocalDeploymentError(f"the run did not finish within {timeout:.0f} s")
            time.sleep(0.1)
    if proc.returncode != 0 or run_id is None:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise LocalDeploymentError(f"`flwr run` failed (exit code {proc.returncode}):\n{tail}")
    return run_id


def run_status(dep: LocalDeployment, run_id: int) -> str:
    out = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, env=dep.env, cwd=dep.workdir, timeout=120, check=False,
    )
    try:
        data: Any = json.loads(out.stdout)
        runs = data.get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return f"unknown ({out.stdout.decode(errors='replace')[-200:]})"


def run_local(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    supernodes: int | None = 3,
    run_dir: Path | None = None,
    app: Path | None = None,
    timeout: float = 3600.0,
    pool: bool = False,
    echo: bool = True,
    keep_workdir: bool = False,
    secure: bool = False,
    workdir: Path | None = None,
    simulation: bool = False,
    flower: dict[str, Any] | None = None,
    worker: bool = False,
) -> Path:
    """Run one experiment on a local deployment; returns the run folder.

    ``secure``: TLS and SuperNode authentication (fresh certificates and keys). ``workdir``:
    where FLWR_HOME, logs and certificates go (default: a temporary folder, removed after).
    ``simulation``: Flower's simulation engine instead of SuperLink and SuperNode processes
    (``supernodes`` simulated SuperNodes, which must equal ``federation.num_clients``).
    ``flower``: further ``FlowerSettings`` fields, e.g. ``{"round_timeout_seconds": 15.0}``
    (on the command line: ``flower.round-timeout-seconds=15``). ``worker``: a persistent
    worker per SuperNode (``ssfl.flower.worker``; not with the simulation engine, whose
    processes already persist)."""
    if config_path is None:
        # No config file: the Flower app's quickstart (3 clients, 5 rounds), then the overrides.
        overrides = [*APP_DEFAULTS, *overrides]
    secure_sum = _flower_settings(flower or {}).secure_aggregation
    config = load_config(config_path, overrides, secure_aggregation=secure_sum)
    config.run.progress = False
    # A method Flower cannot run is refused here, before any process starts.
    from ssfl.flower.server_app import check_supported

    check_supported(config)
    if supernodes is None:
        supernodes = config.federation.num_clients if simulation else 3
    if supernodes < 1:
        raise ValueError("need at least one SuperNode")
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.run.out_dir) / f"{config.run.name}-flower-{stamp}"
    run_dir = run_dir.expanduser().resolve()
    if (run_dir / "summary.json").exists():
        raise LocalDeploymentError(f"{run_dir} already holds a finished run")
    if simulation and worker:
        raise LocalDeploymentError("--worker is for SuperNode processes; the simulation "
                                   "engine already keeps its ClientApp processes")
    if simulation and (pool or secure or supernodes != config.federation.num_clients):
        raise LocalDeploymentError(
            "the simulation engine gives SuperNode i partition i: use as many SuperNodes as "
            f"federation.num_clients ({config.federation.num_clients}), without --pool/--secure")
    pinned = None if pool or supernodes != config.federation.num_clients else supernodes
    # Checked and typed as the apps do (an unknown key or a wrong type is a ConfigError).
    settings = _flower_settings({**(flower or {}), "run_dir": str(run_dir),
                                 "min_nodes": supernodes})
    check_supported(config, settings)  # secure aggregation: the method and its settings
    if settings.secure_aggregation and pinned is None:
        # Pooled SuperNodes serve the clients in turn (client c on node c mod N): no round
        # may sample two clients of one node.
        from ssfl.flower.secagg import check_sampled_nodes

        check_sampled_nodes(config, {c: c % supernodes
                                     for c in range(config.federation.num_clients)})
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="ssfl-flower-"))
    else:
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        keep_workdir = True
    if app is None:
        # A fresh app definition, rendered from this version's Config (never stale).
        app = write_app(workdir / "app").parent
    run_config_file = workdir / "run-config.toml"
    run_config_file.write_text(run_config_toml(run_config_from_config(config, settings)))

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise _Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    dep: LocalDeployment | None = None
    try:
        extra: list[str] = []
        if simulation:
            dep = prepare_simulation(workdir)
            extra = ["--federation-config",
                     f"num-supernodes={supernodes} client-resources-num-cpus=1"]
        else:
            dep = start_deployment(workdir, supernodes, pinned_partitions=pinned, secure=secure,
                                   worker=worker)
        run_id = flwr_run(dep, app, run_config_file, timeout, echo=echo, extra=extra)
        if not (run_dir / "summary.json").exists():
            raise LocalDeploymentError(
                f"run {run_id} ended (status: {run_status(dep, run_id)}) without writing "
                f"{run_dir}/summary.json; logs in {run_dir / 'flower-logs'}"
            )
        return run_dir
    except _Interrupted:
        raise KeyboardInterrupt from None
    finally:
        try:
            if dep is not None:
                dep.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            logs = run_dir / "flower-logs"  # kept also when the run failed
            logs.mkdir(parents=True, exist_ok=True)
            for log in [*workdir.glob("*.log"), *workdir.glob("flwr-home/local-superlink/*.log"),
                        *workdir.glob("workers/*.log")]:
                shutil.copy(log, logs / log.name)
            if not keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssfl.flower.local",
        description="Run SSFL on a local Flower deployment (SuperLink + N SuperNodes on "
                    "127.0.0.1) and stop every process afterwards.",
    )
    parser.add_argument("words", nargs="*", metavar="CONFIG|section.key=value",
                        help="an ssfl config file and/or overrides, as for `ssfl run`")
    parser.add_argument("--supernodes", "-n", type=int, default=None,
                        help="SuperNodes to start (default: 3; with --simulation: "
                             "federation.num_clients)")
    parser.add_argument("--out", help="run folder (default: <run.out_dir>/<name>-flower-<time>)")
    parser.add_argument("--app", help="Flower app folder (default: one rendered from this "
                        "version of ssfl, the same as flower_app/)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    parser.add_argument("--pool", action="store_true",
                        help="SuperNodes without partition-id: they serve the clients in turn")
    parser.add_argument("--secure", action="store_true",
                        help="TLS (fresh private CA) and SuperNode authentication")
    parser.add_argument("--simulation", action="store_true",
                        help="Flower's simulation engine (Ray) instead of SuperLink/SuperNode "
                             "processes; --supernodes defaults to federation.num_clients")
    parser.add_argument("--worker", action="store_true",
                        help="a persistent worker per SuperNode that keeps torch, data and "
                             "model loaded (spares each message's process the imports)")
    parser.add_argument("--workdir", help="folder for FLWR_HOME, logs and certificates "
                        "(kept; default: a temporary folder, removed afterwards)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temporary FLWR_HOME and logs")
    args = parser.parse_args(argv)
    overrides = [w for w in args.words if "=" in w and not w.startswith("flower.")]
    paths = [w for w in args.words if "=" not in w]
    flower = {}  # flower.<key>=<TOML value>: Flower-only settings (FlowerSettings)
    for word in (w for w in args.words if "=" in w and w.startswith("flower.")):
        key, value = word.split("=", 1)
        try:
            flower[key[len("flower."):].replace("-", "_")] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            flower[key[len("flower."):].replace("-", "_")] = value
    if len(paths) > 1:
        parser.error(f"give at most one config file, got {paths}")
    try:
        run_dir = run_local(
            paths[0] if paths else None, overrides, supernodes=args.supernodes,
            run_dir=Path(args.out) if args.out else None,
            app=Path(args.app) if args.app else None,
            timeout=args.timeout, pool=args.pool, keep_workdir=args.keep_workdir,
            secure=args.secure, workdir=Path(args.workdir) if args.workdir else None,
            simulation=args.simulation, flower=flower, worker=args.worker,
        )
    except (ConfigError, LocalDeploymentError) as exc:
        print(f"ssfl.flower.local: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssfl.flower.local: interrupted; all processes stopped", file=sys.stderr)
        return 130
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\nssfl on Flower: {summary['algorithm']} density {summary['density']:.3f}, final "
          f"accuracy {summary['final_accuracy']:.4f} after {summary['rounds']} rounds on "
          f"{summary['nodes']} SuperNodes\nresults: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
