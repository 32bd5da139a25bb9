"""Malformed Flower replies never crash the ServerApp: a reply whose fields are missing, of the
wrong type or out of range is rejected (or recorded as failed) by name and the round goes on
(``FlowerTransport.exchange`` unpacks without trusting the node; the loop's ``screen`` judges)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flower_grid import InMemoryGrid  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from ssfl.algorithms.base import TRAIN, NoSettings, Setup  # noqa: E402
from ssfl.algorithms.ssfl import FixedMaskFedAvg  # noqa: E402
from ssfl.comm import PayloadError, encode_values  # noqa: E402
from ssfl.config import load_config  # noqa: E402
from ssfl.flower.protocol import (  # noqa: E402
    METRICS,
    MSG_HELLO,
    MSG_SETUP,
    MSG_TRAIN,
    PAYLOAD,
    FlowerSettings,
    payload_record,
    run_config_from_config,
)
from ssfl.flower.server_app import FlowerRunError, FlowerTransport, run_on_grid  # noqa: E402
from ssfl.masks import mask_digest  # noqa: E402
from ssfl.run.loop import screen  # noqa: E402

QUICK = [
    "run.rounds=2", "run.threads=1", "run.progress=false",
    "federation.num_clients=3", "federation.clients_per_round=2",
    "train.local_epochs=1", "train.batch_size=64",
]
NODES = [{"partition-id": i, "num-partitions": 3} for i in range(3)]


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory):
    """As ``task_identity`` and ``node_cache`` of test_flower.py, for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSFL_CACHE_DIR", str(tmp_path_factory.mktemp("ssfl-cache")))
        for attr in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, attr, 1)
        yield


def _tamper_metric(key: str, value: Any = None):
    def tamper(content: RecordDict) -> None:
        record = content[METRICS]
        values = {k: record[k] for k in record if k != key}
        if value is not None:
            values[key] = value
        # A MetricRecord cannot hold True as a number: such a node sends a ConfigRecord.
        content[METRICS] = (ConfigRecord(values) if isinstance(value, bool)
                            else MetricRecord(values))
    return tamper


def _tamper_payload(make):
    def tamper(content: RecordDict) -> None:
        if make is None:
            del content[PAYLOAD]
        else:
            content[PAYLOAD] = make()
    return tamper


class TamperingGrid(InMemoryGrid):
    """Tampers the reply to the first message of ``message_type`` (train: of round 1)."""

    def __init__(self, config_flat: dict, node_configs: list[dict], message_type: str,
                 tamper) -> None:
        super().__init__(config_flat, node_configs)
        self.message_type, self.tamper = message_type, tamper
        self.tampered: list[int] = []  # the client (train, setup) or node (hello) tampered

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, mid in zip(messages, ids):
            meta = message.metadata
            if self.tampered or meta.message_type != self.message_type or \
                    (meta.message_type == MSG_TRAIN and meta.group_id != "1"):
                continue
            reply = self.replies[mid]
            self.tamper(reply.content)
            self.tampered.append(meta.dst_node_id if meta.message_type == MSG_HELLO
                                 else int(message.content["config"]["client-id"]))
        return ids


def _run(tmp_path: Path, message_type: str, tamper) -> tuple[dict, TamperingGrid]:
    config = load_config(None, QUICK)
    grid = TamperingGrid(run_config_from_config(config), NODES, message_type, tamper)
    result = run_on_grid(grid, config, FlowerSettings(node_wait_seconds=5), tmp_path / "run")
    return result, grid


@pytest.fixture(scope="module")
def reference(identity: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(tmp_path_factory.mktemp("ref"), "none", lambda content: None)[0]


REJECTED = [
    ("no-num-samples", _tamper_metric("num-samples"), "got None"),
    ("num-samples-2.7", _tamper_metric("num-samples", 2.7), "got 2.7"),
    ("num-samples-inf", _tamper_metric("num-samples", math.inf), "got inf"),
    ("num-samples-nan", _tamper_metric("num-samples", math.nan), "got nan"),
    ("num-samples-neg", _tamper_metric("num-samples", -3), "got -3"),
    ("num-samples-true", _tamper_metric("num-samples", True), "got True"),
    ("garbage-payload", _tamper_payload(lambda: payload_record(b"garbage")), "header"),
]
FAILED = [
    ("no-payload", _tamper_payload(None), "no payload"),
    ("float32-payload", _tamper_payload(
        lambda: ArrayRecord({PAYLOAD: Array(np.ones(8, np.float32))})), "float32"),
    ("payload-under-another-key", _tamper_payload(
        lambda: ArrayRecord({"other": Array(np.ones(8, np.uint8))})), "payload"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("tamper", "reason"), [c[1:] for c in REJECTED + FAILED],
                         ids=[c[0] for c in REJECTED + FAILED])
def test_a_tampered_train_reply_is_refused_by_name_and_the_run_goes_on(
        identity: None, tmp_path: Path, tamper, reason: str) -> None:
    result, grid = _run(tmp_path, MSG_TRAIN, tamper)
    [client] = grid.tampered
    first = result["metrics"][0]
    refused = first.get("rejected", []) + first.get("failed", [])
    assert [(r["client"], r["attempt"]) for r in refused] == [(client, 1)]
    assert reason in refused[0]["reason"], refused[0]["reason"]
    assert all("rejected" not in m and "failed" not in m for m in result["metrics"][1:])
    assert torch.isfinite(result["values"]).all()
    assert len(result["metrics"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("key", ["compute-seconds", "setup-seconds", "train-loss",
                                 "handler-seconds", "first-message", "decode-seconds"])
@pytest.mark.parametrize("value", [None, "x"], ids=["missing", "text"])
def test_a_missing_or_non_numeric_timing_or_loss_is_unknown_not_a_crash(
        identity: None, tmp_path: Path, reference: dict, key: str, value: Any) -> None:
    if value is None:
        tamper = _tamper_metric(key)
    else:
        def tamper(content: RecordDict) -> None:
            record = content[METRICS]
            content[METRICS] = ConfigRecord({**{k: record[k] for k in record}, key: value})
    result, grid = _run(tmp_path, MSG_TRAIN, tamper)
    assert grid.tampered
    # The update itself was fine: it is aggregated, the model is the untampered run's.
    assert torch.equal(result["values"], reference["values"])
    first, ref = result["metrics"][0], reference["metrics"][0]
    assert "rejected" not in first and "failed" not in first
    if key == "train-loss":
        assert math.isnan(first["train_loss"])
    else:
        assert first["train_loss"] == ref["train_loss"]
    if key in ("compute-seconds", "setup-seconds"):
        column = f"client_{key.replace('-', '_')}"
        assert len(first[column]) == len(ref[column]) - 1  # skipped, the rest floats
        assert all(isinstance(s, float) for s in first[column])
    if key == "handler-seconds":
        assert None in first["client_handler_seconds"]


@pytest.mark.slow
@pytest.mark.parametrize(("tamper", "kept"), [
    (_tamper_payload(lambda: payload_record(b"\x00garbage scores")), False),
    (_tamper_payload(lambda: ArrayRecord({PAYLOAD: Array(np.ones(8, np.float32))})), False),
    (_tamper_metric("num-samples", 2.7), False),
    (_tamper_metric("compute-seconds"), True),
], ids=["garbage", "float32", "num-samples-2.7", "no-compute-seconds"])
def test_a_tampered_score_reply_is_left_out_and_the_run_goes_on(
        identity: None, tmp_path: Path, reference: dict, tamper, kept: bool) -> None:
    """SSFL's mask round leaves a malformed score reply out (the mask is the others' top-k);
    a reply that only lacks its compute seconds is used as it is."""
    result, grid = _run(tmp_path, MSG_SETUP, tamper)
    assert grid.tampered
    prunable = list(reference["mask"])
    same = mask_digest(result["mask"], prunable) == mask_digest(reference["mask"], prunable)
    assert same == kept
    assert result["summary"]["density"] == reference["summary"]["density"]
    assert torch.isfinite(result["values"]).all()
    if kept:
        assert torch.equal(result["values"], reference["values"])


@pytest.mark.parametrize("tamper", [
    _tamper_metric("partition-id"), _tamper_metric("num-partitions"),
    _tamper_metric("partition-id", 1.5), _tamper_metric("partition-id", True),
    lambda content: content.pop(METRICS),
], ids=["no-partition-id", "no-num-partitions", "float", "bool", "no-metrics"])
def test_a_hello_reply_without_an_integer_partition_names_the_node(
        identity: None, tmp_path: Path, tamper) -> None:
    with pytest.raises(FlowerRunError, match=r"node 1000: hello reply has no integer"):
        _run(tmp_path, MSG_HELLO, tamper)


# ---- fuzzing: random reply contents through the real unpacking and the loop's screen ----------

INITIAL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5])}
MASK = {"w": torch.tensor([[True, False], [True, True]])}
DIGEST = mask_digest(MASK, ["w"])
GOOD = encode_values(torch.tensor([1.0, 1.0, 1.0, 1.0]), round=1, digest=DIGEST)
KEYS = ["num-samples", "train-loss", "compute-seconds", "setup-seconds", "worker-seconds",
        "handler-seconds", "handler-started", "process-started", "first-message",
        "import-seconds", "decode-seconds", "train-seconds", "encode-seconds", "client-id"]
_INT64 = st.integers(-(2**63), 2**63 - 1)
_VALUE = st.one_of(_INT64, st.floats(), st.booleans(), st.text(max_size=8),
                   st.binary(max_size=8), st.lists(_INT64, max_size=3),
                   st.lists(st.floats(), max_size=3))
_NUMBER = st.one_of(_INT64, st.floats(), st.lists(st.floats(), max_size=3))
_METRICS = st.one_of(
    st.just({"num-samples": 5, "train-loss": 0.5, "compute-seconds": 1.0,
             "setup-seconds": 0.1}),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), _VALUE, max_size=8)
    .map(ConfigRecord),
    st.dictionaries(st.sampled_from(KEYS), _NUMBER, max_size=8).map(MetricRecord),
    st.fixed_dictionaries({"num-samples": _VALUE, "train-loss": _VALUE}).map(ConfigRecord),
)
_DTYPES = st.sampled_from(["uint8", "int8", "float32", "float64", "int64", "bool", "float16"])
_FLIPS = st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=4)


def _flipped(flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(GOOD)
    for i, b in flips:
        out[i] = b
    return bytes(out)


_PAYLOAD = st.one_of(
    st.none(),  # no payload record
    st.just(GOOD),
    _FLIPS.map(_flipped),
    st.binary(max_size=64),
    hnp.arrays(_DTYPES, hnp.array_shapes(min_dims=0, max_dims=2, max_side=6)),
    st.builds(lambda b: ArrayRecord({"other": Array(np.frombuffer(b, np.uint8))}),
              st.binary(max_size=8)),
    st.builds(lambda v: MetricRecord({PAYLOAD: v}), st.floats()),
)


def _record(payload: Any) -> Any:
    if isinstance(payload, bytes):
        return payload_record(payload)
    if isinstance(payload, np.ndarray):
        return ArrayRecord({PAYLOAD: Array(payload)})
    return payload


class FuzzGrid(InMemoryGrid):
    """One pinned-free node; answers hello, and each train message with ``self.content()``,
    through Flower's own serialisation."""

    def __init__(self) -> None:
        super().__init__({}, [])
        self.content = lambda: RecordDict()

    def get_node_ids(self):
        return [7]

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            if message.metadata.message_type == MSG_HELLO:
                content = RecordDict({METRICS: MetricRecord({"partition-id": -1,
                                                             "num-partitions": -1})})
            else:
                content = self.content()
            reply = Message(content, reply_to=message)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[message.object_id] = InMemoryGrid._transport(reply)
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - unused
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(scope="module")
def fuzz_rig():
    config = load_config(None, ["algorithm.density=0.5"])
    setup = Setup(config, {n: t.shape for n, t in INITIAL.items()}, ["w"], INITIAL,
                  num_clients=100)
    algorithm = FixedMaskFedAvg(setup, NoSettings())
    state = algorithm.with_mask(MASK)
    grid = FuzzGrid()
    transport = FlowerTransport(grid, config, FlowerSettings(node_wait_seconds=1,
                                                             poll_interval_seconds=0.0))
    counts = {"examples": 0, "valid": 0}
    yield SimpleNamespace(algorithm=algorithm, state=state, grid=grid, transport=transport,
                          counts=counts)
    print(f"\nfuzzed Flower replies: {counts['examples']}, valid {counts['valid']}, crashes 0")


def _fully_valid(algorithm, state, payload: Any, metrics: Any) -> bool:
    if not isinstance(payload, bytes) or metrics is None or "num-samples" not in metrics:
        return False
    n = metrics["num-samples"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return False
    try:
        algorithm.check(state, 1, 0, payload)
    except PayloadError:
        return False
    return True


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(metrics=st.none() | _METRICS, payload=_PAYLOAD)
def test_fuzzed_replies_never_crash_and_never_change_the_model_unless_valid(
        fuzz_rig, metrics: Any, payload: Any) -> None:
    rig = fuzz_rig
    if isinstance(metrics, dict):
        metrics = MetricRecord(metrics)
    content: dict[str, Any] = {}
    if metrics is not None:
        content[METRICS] = metrics
    if payload is not None:
        content[PAYLOAD] = _record(payload)
    rig.grid.content = lambda: RecordDict(dict(content))
    before = rig.state.values.clone()
    replies = rig.transport.exchange(TRAIN, 1, 0.1, {0: b"down"})
    assert len(replies) == 1
    run = SimpleNamespace(algorithm=rig.algorithm, state=rig.state, client_sizes=())
    valid, rejected = screen(run, 1, replies, [0])
    expected = _fully_valid(rig.algorithm, rig.state, payload, metrics)
    assert bool(valid) == expected
    assert len(valid) + len(rejected) + sum(bool(r.error) for r in replies) == 1
    info = rig.transport.round_info()
    for column in ("client_compute_seconds", "client_setup_seconds"):
        assert all(isinstance(s, float) for s in info[column])
    if valid:
        new, _ = rig.algorithm.aggregate(rig.state, 1, valid, [0])
        assert torch.isfinite(new.values).all()
    assert torch.equal(rig.state.values, before)
    rig.counts["examples"] += 1
    rig.counts["valid"] += bool(valid)
