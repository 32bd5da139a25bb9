"""What the SSFL ServerApp and ClientApp agree on: message types, record layout, run config.

Payloads are the ``bytes`` made by :mod:`ssfl.comm` (28-byte header + raw values); in Flower each
one travels as ONE uint8 array inside an ``ArrayRecord`` under the key ``"payload"``, so Flower
adds only its own small framing (the ``.npy`` header and the object metadata) to the value bytes.

Messages, in the order the server sends them:

============== ======================================= =====================================
message type   server -> client                        client -> server
============== ======================================= =====================================
query.hello    (nothing)                               the node's ``partition-id`` (or -1)
query.setup    ``kind`` (the method's set-up message,  reply payload (empty for a delivery),
               e.g. ``scores``, ``mask``),             ``num-samples``, compute seconds
               ``client-id``, payload
train          ``client-id``, ``round``, ``lr``,       reply payload, ``num-samples``,
               the method's payload                    ``train-loss``, compute seconds
============== ======================================= =====================================

Every method runs through these two messages: the node hands them to the method's
``Algorithm.handle`` (``ssfl.flower.node``), the same client code the simulator runs, with the
client's state kept in the node's ``context.state`` under ``client_state_key(client-id)``.

Run config: every key of :class:`ssfl.config.Config` is a Flower run-config key
``<section>.<key-in-kebab-case>`` (``train.lr``, ``federation.num-clients``), plus the Flower-only
keys of :class:`FlowerSettings` (``flower.*``). Both apps read the same fused run config (the
defaults in ``[tool.flwr.app.config]`` with ``flwr run --run-config`` overrides), convert it with
:func:`config_from_run_config`, and so build the same typed, validated ``Config``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# This module must import without torch: the ClientApp process (started per message by Flower's
# deployment engine) imports it, and forwards to the node's worker, which has torch loaded.
# ssfl.config is torch-free; its registry checks import torch only when they run.
from ssfl.config import (
    Config,
    ConfigError,
    from_dict,
    toml_tables,
    validate,
)

MSG_HELLO = "query.hello"
MSG_SETUP = "query.setup"
MSG_TRAIN = "train"

PAYLOAD = "payload"  # the ArrayRecord (and its single Array) holding payload bytes
CONFIG = "config"  # the ConfigRecord of a message's parameters
METRICS = "metrics"  # the MetricRecord of a reply's numbers

# Keys of the node's state between messages (``context.state``; plain values in the handlers).
STATE_DATA = "ssfl-data"  # {"client-id": int}: the client whose data this node last loaded
CLIENT_STATE_PREFIX = "ssfl-client-"  # + client id: that client's state (bytes)


def client_state_key(client_id: int) -> str:
    """Where a node keeps a client's state (a node may serve several clients)."""
    return f"{CLIENT_STATE_PREFIX}{client_id}"


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """The node's ``partition-id`` and ``num-partitions`` (-1 where its node config has none)."""
    pid = node_config.get("partition-id")
    num = node_config.get("num-partitions")
    return (int(pid) if pid is not None else -1, int(num) if num is not None else -1)

@dataclass(frozen=True)
class FlowerSettings:
    """The Flower-only run-config keys, ``flower.<kebab-case field>``."""

    # Exact run folder to write ("": <run.out-dir>/<run.name>-<time>, as the simulator does).
    # A relative path is relative to the working directory of the ServerApp process.
    run_dir: str = ""
    # Start once at least this many SuperNodes are connected (and, where SuperNodes carry a
    # ``partition-id``, every client id has a node).
    min_nodes: int = 1
    # Give up if the SuperNodes are not there after this many seconds.
    node_wait_seconds: float = 300.0
    # Give up on an exchange (a round, the mask round) whose replies take longer than this.
    round_timeout_seconds: float = 1800.0
    # How often the ServerApp asks the SuperLink for replies.
    poll_interval_seconds: float = 0.1
    # Torch threads of the ServerApp (evaluation, aggregation); 0: run.threads, as the clients.
    server_threads: int = 0
    # Continue the run in `run-dir` from its last checkpoint (as `ssfl run --resume`).
    resume: bool = False
    # Secure aggregation of the training rounds (Flower's SecAgg+; docs/secure_aggregation.md):
    # the server unmasks only the weighted sum of the round's value vectors, never one
    # client's. Global-mask methods only (ssfl, fedavg, random, random_erk, snip_single).
    secure_aggregation: bool = False
    # SecAgg+'s parameters, as Flower's SecAggPlusWorkflow names them. num-shares: each
    # client's secrets are split among this many clients, itself included (> 2, or at most 1:
    # that fraction of the sampled clients); reconstruction-threshold: shares needed to rebuild
    # one (>= 2, or at most 1: that fraction of num-shares). A client that drops after the
    # keys were shared is unmasked from its neighbours' shares if at least this many answer.
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    # Each client multiplies its values by num-samples / max-weight (0: the largest client's
    # sample count in the server's split), clips them to [-clipping-range, clipping-range] and
    # quantises them to quantization-range levels; the masks are drawn modulo modulus-range
    # (a power of 2, at most 2**32, more than clients-per-round * quantization-range).
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_modulus_range: int = 4294967296
    secagg_max_weight: float = 0.0


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


def run_config_from_config(
    config: Config, settings: FlowerSettings | None = None
) -> dict[str, Any]:
    """The flat Flower run config (``section.kebab-key`` -> value) of a Config. The
    simulator's ``[attack]`` is not part of it (a deployment's clients are what they are)."""
    refuse_attack(config)
    flat: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        if section == "attack":
            continue
        for key, value in values.items():
            if isinstance(value, dict):  # a method's table: algorithm.<method>.<key>
                flat.update({f"{section}.{key}.{_kebab(k)}": v for k, v in value.items()})
            else:
                flat[f"{section}.{_kebab(key)}"] = value
    if settings is not None:
        for f in dataclasses.fields(settings):
            flat[f"flower.{_kebab(f.name)}"] = getattr(settings, f.name)
    return flat


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[Config, FlowerSettings]:
    """Typed ``Config`` (validated as ``ssfl run`` does) and Flower settings from a run config.

    Keys are ``section.key`` with the key in kebab-case (snake_case is accepted too); an unknown
    section or key, or a value of the wrong type, raises :class:`ssfl.config.ConfigError` naming
    the key.
    """
    raw: dict[str, dict[str, Any]] = {}
    flower: dict[str, Any] = {}
    for dotted, value in run_config.items():
        if "." not in dotted:
            raise ConfigError(
                f"run-config key {dotted!r} must look like section.key (e.g. train.lr)"
            )
        section, key = dotted.split(".", 1)
        if section == "flower":
            flower[_snake(key)] = value
        elif section == "algorithm" and "." in key:  # algorithm.<method>.<key>
            method, key = key.split(".", 1)
            raw.setdefault(section, {}).setdefault(method, {})[_snake(key)] = value
        else:
            raw.setdefault(section, {})[_snake(key)] = value
    config = from_dict(raw)
    # Each process runs on its own machine: more torch threads than its cores are capped there
    # (run.threads is bounded by the cores of the machine that reads the config).
    config.run.threads = min(config.run.threads, os.cpu_count() or 1)
    settings = _flower_settings(flower)
    # Under secure aggregation the server sees only the sum: "auto" clips nothing there.
    validate(config, secure_aggregation=settings.secure_aggregation)
    refuse_attack(config)
    return config, settings


def refuse_attack(config: Config) -> None:
    if config.attack.kind != "none":
        raise ConfigError(f"attack.kind = {config.attack.kind!r}: simulated attacks run in the "
                          f"simulator only (ssfl run); on Flower set attack.kind = 'none'")


def _flower_settings(values: Mapping[str, Any]) -> FlowerSettings:
    allowed = {f.name: f for f in dataclasses.fields(FlowerSettings)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(
                f"unknown run-config key 'flower.{_kebab(key)}'; allowed: "
                f"{sorted('flower.' + _kebab(k) for k in allowed)}"
            )
        default = allowed[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(
                f"flower.{_kebab(key)} must be of type {type(default).__name__}, got {value!r}"
            )
        kwargs[key] = value
    settings = FlowerSettings(**kwargs)
    if settings.min_nodes < 1:
        raise ConfigError("flower.min-nodes must be at least 1")
    if settings.server_threads < 0:
        raise ConfigError("flower.server-threads must be >= 0 (0: run.threads)")
    if min(settings.node_wait_seconds, settings.round_timeout_seconds,
           settings.poll_interval_seconds) <= 0:
        raise ConfigError("flower.*-seconds must be > 0")
    check_secagg_settings(settings)
    return settings


def check_secagg_settings(s: FlowerSettings) -> None:
    """SecAgg+'s own parameters (what they combine with: ``ssfl.flower.secagg``)."""
    for key, value, whole_above_one in (
            ("num-shares", s.secagg_num_shares, True),
            ("reconstruction-threshold", s.secagg_reconstruction_threshold, True),
            ("clipping-range", s.secagg_clipping_range, False),
            ("max-weight", s.secagg_max_weight, False)):
        if not math.isfinite(value) or value < 0 or (value == 0 and key != "max-weight"):
            raise ConfigError(f"flower.secagg-{key} must be > 0, got {value}")
        if whole_above_one and value > 1 and value != int(value):
            raise ConfigError(f"flower.secagg-{key} must be a whole number of clients or a "
                              f"fraction of at most 1, got {value}")
    if s.secagg_num_shares > 1 and s.secagg_num_shares <= 2:
        raise ConfigError("flower.secagg-num-shares as a number of clients must be at least 3 "
                          f"(or a fraction of at most 1), got {s.secagg_num_shares}")
    if s.secagg_reconstruction_threshold > 1 and s.secagg_num_shares > 1 \
            and s.secagg_reconstruction_threshold >= s.secagg_num_shares:
        raise ConfigError("flower.secagg-reconstruction-threshold must be less than "
                          "flower.secagg-num-shares")
    q, m = s.secagg_quantization_range, s.secagg_modulus_range
    if q < 2:
        raise ConfigError(f"flower.secagg-quantization-range must be at least 2, got {q}")
    if m <= q or m > 2**32 or m & (m - 1):
        raise ConfigError("flower.secagg-modulus-range must be a power of 2, at most 2**32 "
                          f"and more than flower.secagg-quantization-range ({q}), got {m}")


def secure_aggregation_requested(run_config: Mapping[str, Any]) -> bool:
    """Whether a run config turns secure aggregation on (read by the ClientApp, which then
    refuses to send a training round's values in plain)."""
    return run_config.get("flower.secure-aggregation") is True


def run_config_toml(flat: Mapping[str, Any]) -> str:
    """A flat run config as a TOML file for ``flwr run --run-config FILE.toml``.

    Flower flattens nested tables with dots, so ``[train] lr = 0.1`` is the key ``train.lr``.
    """
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, key = dotted.rsplit(".", 1)  # algorithm.<method>.<key>: table algorithm.<m>
        sections.setdefault(section, {})[key] = value
    return toml_tables(sections)


# ---- payloads in Flower records -----------------------------------------------------------


def payload_record(payload: bytes) -> Any:
    """One payload as an ``ArrayRecord`` holding a single uint8 array (no copy of the values
    beyond the one Flower makes when it serialises the array)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({PAYLOAD: Array(np.frombuffer(payload, dtype=np.uint8))})


def payload_bytes(record: Any) -> bytes:
    """The payload bytes carried by :func:`payload_record`."""
    array = record[PAYLOAD].numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"payload array must be 1-D uint8, got {array.dtype} {array.shape}")
    return array.tobytes()


#: ``ssfl.comm``'s payload header (read here without torch, for the ClientApp process)
_HEADER = struct.Struct("<4sBBBBIQ8s")
_VALUE_CODES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}


def payload_values(payload: bytes) -> np.ndarray:
    """The values of one ``ssfl.comm`` value payload (float32 or float16, no copy), read
    without torch; anything else (a bundle, a mask, scores, a short body) is a ValueError."""
    if len(payload) < _HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes has no header")
    magic, _, kind, code, _, _, count, _ = _HEADER.unpack_from(payload)
    dtype = _VALUE_CODES.get(code)
    if magic != b"SSFL" or kind != 1 or dtype is None:
        raise ValueError(f"not a value payload (magic {magic!r}, kind {kind}, dtype {code})")
    if len(payload) != _HEADER.size + count * dtype.itemsize:
        raise ValueError(f"value payload of {len(payload)} bytes does not hold {count} values")
    return np.frombuffer(payload, dtype, count, offset=_HEADER.size)


def message_wire_bytes(message: Any) -> int:
    """Bytes of a Flower ``Message`` as Flower serialises it for transport: the sum of the
    deflated objects (message, record dict, records, arrays, array chunks) it pushes.

    The HTTP request framing around each object comes on top (a few hundred bytes per object;
    one object per 5 MiB chunk of an array)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


class Stopwatch:
    """``with Stopwatch() as w: ...`` then ``w.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started


def process_start_time(pid: int | str = "self") -> float | None:
    """Wall-clock time (``time.time()`` scale) at which process ``pid`` started, to the
    kernel's clock tick (10 ms), or ``None`` where ``/proc`` does not say (not Linux).

    ``/proc/<pid>/stat`` gives the start in clock ticks since boot (``CLOCK_BOOTTIME``); the
    ClientApp reports it so that the server can split a reply's latency into Flower's delivery
    (before the process exists) and the process's own start-up."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        now = time.time()
        return now - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def resolve_run_dir(settings: FlowerSettings) -> Path | None:
    return Path(settings.run_dir).expanduser() if settings.run_dir else None
