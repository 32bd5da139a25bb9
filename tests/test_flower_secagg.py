"""Secure aggregation on Flower (``flower.secure-aggregation``, ``ssfl.flower.secagg``): Flower's
SecAgg+ workflow and mod around SSFL's value vectors. In process through the in-memory Grid
(every message through Flower's serialisation, the real ClientApp with its mods), and once on
a real local deployment (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flower_grid import InMemoryGrid  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402
from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import (  # noqa: E402
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from ssfl.algorithms.base import RoundFailed  # noqa: E402
from ssfl.comm import decode_values, encode_values  # noqa: E402
from ssfl.config import ConfigError, load_config  # noqa: E402
from ssfl.flower import client_app as client_module, secagg  # noqa: E402
from ssfl.flower.protocol import (  # noqa: E402
    CONFIG,
    PAYLOAD,
    FlowerSettings,
    config_from_run_config,
    payload_record,
    payload_values,
    run_config_from_config,
)
from ssfl.flower.server_app import check_supported, run_on_grid  # noqa: E402
from ssfl.masks import mask_digest  # noqa: E402
from ssfl.run.experiment import prepare  # noqa: E402

# 3 clients, all sampled, each on its own node; density 0.1 (SSFL's mask round first).
QUICK = [
    "run.rounds=1", "run.threads=1", "run.progress=false",
    "federation.num_clients=3", "federation.clients_per_round=3",
    "train.local_epochs=1", "train.batch_size=64", "algorithm.density=0.1",
    # SecAgg+ computes the plain mean; the plain runs it is held against do the same (the
    # default "auto" would clip them; under secure aggregation it resolves to 0 by itself:
    # test_auto_clip_resolves_from_the_flower_run_config)
    "federation.aggregator=mean",
]
NODES = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
SECURE = FlowerSettings(node_wait_seconds=5, secure_aggregation=True)


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node cache in a temporary folder; Flower's task identity for in-process replies."""
    monkeypatch.setenv("SSFL_CACHE_DIR", str(tmp_path_factory.mktemp("ssfl-cache")))
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@dataclass
class Spy:
    """What each side had: ``plaintext[(round, client)]`` the value vector a client computed
    inside its ClientApp (never sent), ``sent[round]`` the global values the server sent,
    ``received`` what the server got in each SecAgg+ stage (copied as it arrived)."""

    plaintext: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    sent: dict[int, np.ndarray] = field(default_factory=dict)
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _copy_reply(stage: str, reply: Message) -> dict[str, Any]:
    content = reply.content
    blobs = []
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            blobs += [bytes(v) for v in items if isinstance(v, bytes)]
    masked = [bytes_to_ndarray(b) for b in
              content[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])] \
        if RECORD_KEY_CONFIGS in content else []
    return {"node": reply.metadata.src_node_id, "blobs": blobs, "masked": masked,
            "arrays": sum(len(rec) for rec in content.array_records.values()),
            "payload": PAYLOAD in content}


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    out = Spy()
    process = client_module._process

    def client_side(kind: str, config: Any, payload: Any, context: Context) -> Any:
        metrics, reply = process(kind, config, payload, context)
        if kind == "train" and reply is not None:
            key = (int(config["round"]), int(config["client-id"]))
            out.plaintext[key] = np.asarray(payload_values(reply), dtype=np.float64)
        return metrics, reply

    monkeypatch.setattr(client_module, "_process", client_side)
    secure_round = secagg.secure_round

    def server_side(grid: Any, round: int, messages: Any, *args: Any, **kw: Any) -> Any:
        payload = next(iter(messages.values()))[1]
        out.sent[round] = decode_values(payload).double().numpy()

        def observe(stage: str, reply: Message) -> None:
            out.received.append((stage, _copy_reply(stage, reply)))

        return secure_round(grid, round, messages, *args, **{**kw, "observe": observe})

    monkeypatch.setattr(secagg, "secure_round", server_side)
    return out


def _bound(config: Any, settings: FlowerSettings, clients: list[int]) -> float:
    """The most SecAgg+'s quantisation can move one value of the weighted mean: each client
    rounds ``value * n_i / max_weight`` to a step of ``2 * clip / quantization_range``
    (stochastically: at most one step), the sum is divided by ``sum(n_i) / max_weight``."""
    sizes = [len(p) for p in prepare(config).parts]
    weight = max(sizes)
    step = 2 * settings.secagg_clipping_range / settings.secagg_quantization_range
    return len(clients) * step / (sum(sizes[c] for c in clients) / weight) + 1e-6


def _weighted_mean(values: dict[tuple[int, int], np.ndarray], rnd: int, clients: list[int],
                   config: Any) -> np.ndarray:
    sizes = [len(p) for p in prepare(config).parts]
    total = sum(sizes[c] for c in clients)
    return sum(values[(rnd, c)] * sizes[c] for c in clients) / total


def test_secure_mean_is_plain_sparse_fedavg_within_the_quantisation_error(spy: Spy) -> None:
    """Same config and seed: the secure run's round equals plain sparse FedAvg's (the
    simulator's code path over Flower) up to SecAgg+'s quantisation, and the aggregate is the
    sample-weighted mean of the values the clients computed."""
    config = load_config(None, QUICK)
    plain = run_on_grid(InMemoryGrid(run_config_from_config(config), NODES), config,
                        FlowerSettings(node_wait_seconds=5), write=False)
    grid = InMemoryGrid(run_config_from_config(config, SECURE), NODES)
    secure = run_on_grid(grid, config, SECURE, write=False)
    bound = _bound(config, SECURE, [0, 1, 2])
    prunable = list(plain["mask"])
    assert mask_digest(secure["mask"], prunable) == mask_digest(plain["mask"], prunable)
    diff = (secure["values"] - plain["values"]).abs().max().item()
    assert 0 < diff <= bound, (diff, bound)  # quantised, but within one step per client
    # The clients computed exactly what plain FedAvg's clients computed; the mean is theirs.
    expected = _weighted_mean(spy.plaintext, 1, [0, 1, 2], config)
    assert np.abs(secure["values"].double().numpy() - expected).max() <= bound
    row, plain_row = secure["metrics"][0], plain["metrics"][0]
    assert row["secagg_clients"] == [0, 1, 2] and row["secagg_clipped"] == 0
    assert set(row["secagg_stage_seconds"]) == set(Stage.all())
    assert row["train_loss"] == pytest.approx(plain_row["train_loss"], rel=1e-6)
    assert abs(row["accuracy"] - plain_row["accuracy"]) <= 0.01
    # Down: the same payloads plus the protocol; up: each masked vector is uint32, one more
    # entry (the weight) and two .npy headers, plus public keys and shares.
    assert row["bytes_down"] > plain_row["bytes_down"]
    assert plain_row["bytes_up"] < row["bytes_up"] < 1.2 * plain_row["bytes_up"]
    stages = secure["summary"]["secagg_message_bytes_per_round"]
    assert set(stages) == set(Stage.all()) and all(v["up"] > 0 for v in stages.values())
    # Four messages per node and round: setup, share keys, collect (training), unmask.
    assert [t for _, t in grid.received].count("train") == 4 * 3


def test_the_server_never_holds_a_clients_values(spy: Spy) -> None:
    """Everything the server receives in every SecAgg+ stage: no array with content, no SSFL
    payload, no client's values (as float32 bytes) anywhere, and each masked vector is
    uniform modulo 2**32 and uncorrelated with the values it hides; only their mean comes
    out."""
    config = load_config(None, QUICK)
    grid = InMemoryGrid(run_config_from_config(config, SECURE), NODES)
    result = run_on_grid(grid, config, SECURE, write=False)
    values = spy.plaintext
    assert sorted(values) == [(1, 0), (1, 1), (1, 2)]
    assert {stage for stage, _ in spy.received} == set(Stage.all())
    assert len(spy.received) == 4 * 3
    assert not any(got["arrays"] or got["payload"] for _, got in spy.received)
    everything = b"".join(b for _, got in spy.received for b in got["blobs"])
    for (_, cid), v in values.items():
        f32 = v.astype("<f4")
        for start in (0, len(f32) // 2):  # 16 consecutive values, as they would go in plain
            assert f32[start:start + 16].tobytes() not in everything, cid
    collect = [got for stage, got in spy.received if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(collect) == 3
    for got in collect:
        weight, vector = got["masked"]
        assert vector.dtype == np.uint32 and weight.dtype == np.uint32
        assert len(vector) == len(values[(1, 0)])
        for v in values.values():
            assert abs(np.corrcoef(vector.astype(np.float64), v)[0, 1]) < 0.1
        # Spread over [0, 2**32): masked, not quantised values around 2**21.
        assert vector.max() > 2**31 + 2**30 and vector.min() < 2**30
    expected = _weighted_mean(values, 1, [0, 1, 2], config)
    assert np.abs(result["values"].double().numpy() - expected).max() <= \
        _bound(config, SECURE, [0, 1, 2])


class DroppingGrid(InMemoryGrid):
    """A node that crashes in one stage of one round: its ClientApp ran, its reply never
    arrives (the server waits ``round-timeout-seconds`` for it)."""

    def __init__(self, *args: Any, drop: dict[tuple[int, str], set[int]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.drop = drop

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg, mid in zip(messages, ids):
            if RECORD_KEY_CONFIGS not in msg.content:
                continue
            stage = msg.content[RECORD_KEY_CONFIGS][Key.STAGE]
            rnd = int(msg.metadata.group_id)
            if msg.metadata.dst_node_id in self.drop.get((rnd, stage), set()):
                self.replies.pop(mid, None)
        return ids


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_a_node_that_drops_mid_round_is_tolerated(spy: Spy, stage: str) -> None:
    """3 clients, shares with all 3, threshold 2: one node dropping in round 1 costs nothing
    but its place in the sum. Dropped while training (collect): the mean of the other two,
    their pairwise masks with it rebuilt from their shares of its key. Dropped after
    uploading (unmask): all three, its own mask rebuilt from the others' shares. It is back
    in round 2."""
    config = load_config(None, [*QUICK, "run.rounds=2", "federation.min_replies=2"])
    settings = FlowerSettings(node_wait_seconds=5, secure_aggregation=True,
                              round_timeout_seconds=1.0, secagg_num_shares=1.0,
                              secagg_reconstruction_threshold=2.0)
    victim = 1001  # client 1's node
    grid = DroppingGrid(run_config_from_config(config, settings), NODES,
                        drop={(1, stage): {victim}})
    result = run_on_grid(grid, config, settings, write=False)
    first, second = result["metrics"]
    summed = [0, 2] if stage == Stage.COLLECT_MASKED_VECTORS else [0, 1, 2]
    assert first["secagg_clients"] == summed
    if stage == Stage.COLLECT_MASKED_VECTORS:
        assert [f["client"] for f in first["failed"]] == [1]
    assert second["secagg_clients"] == [0, 1, 2] and "failed" not in second
    # Round 1's mean is what round 2 sent every client.
    assert np.abs(spy.sent[2] - _weighted_mean(spy.plaintext, 1, summed, config)).max() <= \
        _bound(config, settings, summed)
    assert np.abs(result["values"].double().numpy()
                  - _weighted_mean(spy.plaintext, 2, [0, 1, 2], config)).max() <= \
        _bound(config, settings, [0, 1, 2])


def test_too_many_drops_fail_the_round_and_nothing_is_aggregated() -> None:
    """Two of three nodes gone while training: one masked vector, no threshold of shares for
    anyone: SecAgg+ stops, the round is retried, then the run stops (RoundFailed)."""
    config = load_config(None, [*QUICK, "federation.min_replies=1",
                                "federation.max_round_attempts=2"])
    settings = FlowerSettings(node_wait_seconds=5, secure_aggregation=True,
                              round_timeout_seconds=0.5)
    grid = DroppingGrid(run_config_from_config(config, settings), NODES,
                        drop={(1, Stage.COLLECT_MASKED_VECTORS): {1000, 1001}})
    with pytest.raises(RoundFailed, match="secure aggregation stopped"):
        run_on_grid(grid, config, settings, write=False)


# ---- what it refuses, before any process or message -------------------------------------


@pytest.mark.parametrize(("overrides", "match"), [
    (["algorithm.name=feddst", "algorithm.density=0.3"], "one global mask"),
    (["algorithm.name=sparsyfed", "algorithm.density=0.3"], "one global mask"),
    (["algorithm.name=random_clientwise", "algorithm.density=0.3"], "one global mask"),
    (["algorithm.name=dispfl", "algorithm.density=0.3"], "one global mask"),
    (["algorithm.name=prunefl", "algorithm.density=0.3"], "one global mask"),
    (["federation.aggregator=median"], "only the sum"),
    (["federation.update_clip_norm=1.0"], "only the sum"),
    (["federation.clients_per_round=1", "federation.min_replies=1"], "clients_per_round >= 2"),
])
def test_methods_and_rules_that_cannot_be_summed_are_refused(overrides: list[str],
                                                            match: str) -> None:
    config = load_config(None, [*QUICK, *overrides])
    with pytest.raises(ConfigError, match=match) as info:
        check_supported(config, SECURE)
    assert "\n" not in str(info.value)
    check_supported(config, FlowerSettings())  # fine without secure aggregation


def test_a_round_with_two_clients_on_one_node_is_refused_before_any_message() -> None:
    config = load_config(None, QUICK)
    grid = InMemoryGrid(run_config_from_config(config, SECURE), [{}, {}])
    with pytest.raises(ConfigError, match=r"round 1 samples clients \d and \d, both served"):
        run_on_grid(grid, config, SECURE, write=False)
    assert not [t for _, t in grid.received if t != "query.hello"]


def test_a_pooled_node_the_rounds_never_sample_is_fine(spy: Spy) -> None:
    """Clients that no round samples may share a SuperNode (it answers the mask round)."""
    config = load_config(None, [*QUICK, "federation.num_clients=6",
                                "federation.clients_per_round=3"])
    from ssfl.run.experiment import sample_clients

    sampled = sorted(set(sample_clients(config.run.seed, 1, 6, 3)))
    nodes = [{"partition-id": c, "num-partitions": 6} for c in sampled] + [{}]
    result = run_on_grid(InMemoryGrid(run_config_from_config(config, SECURE), nodes), config,
                         SECURE, write=False)
    assert result["metrics"][0]["secagg_clients"] == sampled


def test_local_deployment_refuses_before_any_process(tmp_path: Path) -> None:
    from ssfl.flower.local import run_local

    # 3 clients all sampled in round 1, on 2 SuperNodes (pooled: client c on node c mod 2).
    for kwargs in [{"pool": True}, {}]:
        with pytest.raises(ConfigError, match="round 1 samples clients 0 and 2"):
            run_local(None, QUICK, run_dir=tmp_path / "run", workdir=tmp_path / "work",
                      flower={"secure_aggregation": True}, echo=False, supernodes=2,
                      timeout=1, **kwargs)
    with pytest.raises(ConfigError, match="one global mask"):
        run_local(None, [*QUICK, "algorithm.name=feddst"], run_dir=tmp_path / "run",
                  workdir=tmp_path / "work", flower={"secure_aggregation": True}, echo=False,
                  timeout=1)
    assert not (tmp_path / "work").exists()


def test_simulator_refuses_flower_settings_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ssfl.cli", "run",
                           "flower.secure-aggregation=true", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "Flower setting" in done.stderr and "nothing uploaded" in done.stderr


@pytest.mark.parametrize(("key", "value", "match"), [
    ("secagg-modulus-range", 3_000_000_000, "power of 2"),
    ("secagg-modulus-range", 2**33, "at most 2\\*\\*32"),
    ("secagg-quantization-range", 2**32, "more than"),
    ("secagg-num-shares", 2.0, "at least 3"),
    ("secagg-num-shares", 3.5, "whole number"),
    ("secagg-reconstruction-threshold", 0.0, "> 0"),
    ("secagg-clipping-range", -1.0, "> 0"),
])
def test_secagg_parameters_are_checked(key: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_run_config({f"flower.{key}": value})


def test_the_sum_must_not_wrap() -> None:
    config = load_config(None, QUICK)
    settings = FlowerSettings(secure_aggregation=True, secagg_quantization_range=2**31)
    with pytest.raises(ConfigError, match="wraps"):
        check_supported(config, settings)


def test_a_node_of_a_secure_run_refuses_a_plain_round() -> None:
    """Whatever the server asks, a node of a secure run never sends its values in plain."""
    config = load_config(None, QUICK)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                      run_config=run_config_from_config(config, SECURE))
    message = Message(RecordDict({
        CONFIG: ConfigRecord({"client-id": 0, "round": 1, "lr": 0.1}),
        PAYLOAD: payload_record(encode_values(torch.zeros(10), round=1))}),
        metadata=Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=5,
                          reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                          message_type="train"))
    with pytest.raises(ValueError, match="only masked"):
        client_module.app(message, context)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_payload_values_reads_ssfl_payloads_without_torch(dtype: str) -> None:
    values = torch.linspace(-2, 2, 37)
    payload = encode_values(values, round=3, digest=b"\x02" * 8, dtype=dtype)
    assert np.array_equal(payload_values(payload), decode_values(payload).numpy())
    with pytest.raises(ValueError):
        payload_values(payload[:-1])
    with pytest.raises(ValueError):
        payload_values(b"XXXX" + payload[4:])


# ---- a real local deployment ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_secure_aggregation_on_a_local_deployment(tmp_path: Path) -> None:
    """SuperLink and 3 SuperNodes (with their workers) as processes, ``flwr run``: every
    round is SecAgg+'s four stages; the mask is the simulator's and the accuracy within
    quantisation of it; no process survives."""
    from ssfl.flower.local import processes_of, run_local
    from ssfl.sim import run_experiment

    overrides = [*QUICK, "run.rounds=1"]
    workdir = (tmp_path / "work").resolve()
    try:
        run_dir = run_local(None, overrides, supernodes=3, run_dir=tmp_path / "run",
                            timeout=600, echo=False, workdir=workdir, worker=True,
                            flower={"secure_aggregation": True})
    finally:
        import time

        for _ in range(120):
            if not processes_of(workdir):
                break
            time.sleep(0.5)
    assert not processes_of(workdir)
    sim = run_experiment(load_config(None, overrides), write=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] is True
    assert json.loads((run_dir / "mask.json").read_text())["final"]["digest"] == \
        mask_digest(sim.mask, list(sim.mask)).hex()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    for row, ref in zip(rows, sim.metrics):
        assert row["secagg_clients"] == [0, 1, 2]
        assert abs(row["accuracy"] - ref["accuracy"]) <= 0.02
        assert set(row["secagg_stage_seconds"]) == set(Stage.all())


def test_auto_resolves_from_the_flower_run_config() -> None:
    """The Flower app declares the robust defaults as "auto" (aggregator "auto", adaptive_clip
    -1); a run resolves them: clipped multi-Krum where the server combines each update, the
    plain mean where SecAgg+ shows it only the sum."""
    from ssfl.config import AUTO
    from ssfl.flower.runconfig import render_pyproject

    app = render_pyproject()
    assert "adaptive-clip = -1.0" in app and 'aggregator = "auto"' in app
    run_config = run_config_from_config(load_config(None, [q for q in QUICK
                                                           if "aggregator" not in q]))
    run_config["federation.adaptive-clip"] = AUTO
    plain, _ = config_from_run_config(run_config)
    secure, settings = config_from_run_config({**run_config,
                                               "flower.secure-aggregation": True})
    assert settings.secure_aggregation
    assert (plain.federation.aggregator, plain.federation.adaptive_clip) == ("auto", 2.0)
    assert (secure.federation.aggregator, secure.federation.adaptive_clip) == ("mean", 0.0)
