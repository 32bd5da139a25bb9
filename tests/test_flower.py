"""SSFL on Flower: run-config mapping, payload encoding overhead, and parity with the simulator
(in process through an in-memory Grid, and across processes on a local deployment)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flower_grid import InMemoryGrid  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from ssfl.client import client_generator  # noqa: E402
from ssfl.comm import encode_values  # noqa: E402
from ssfl.config import Config, ConfigError, load_config  # noqa: E402
from ssfl.flower import client_app as client_module, node as node_module  # noqa: E402
from ssfl.flower.local import (  # noqa: E402
    processes_of,
    run_local,
    start_deployment,
    supernode_command,
)
from ssfl.flower.protocol import (  # noqa: E402
    CONFIG,
    METRICS,
    FlowerSettings,
    config_from_run_config,
    message_wire_bytes,
    payload_bytes,
    payload_record,
    process_start_time,
    run_config_from_config,
    run_config_toml,
)
from ssfl.flower.runconfig import render_pyproject  # noqa: E402
from ssfl.flower.server_app import (  # noqa: E402
    ExchangeTimes,
    FlowerRunError,
    round_timeline,
    run_on_grid,
)
from ssfl.masks import mask_digest  # noqa: E402
from ssfl.models import build_model  # noqa: E402
from ssfl.sim import run_experiment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "flower_app"

# Small and quick, but every stage of SSFL: mask round with scores, several rounds, sampling.
QUICK = [
    "run.rounds=2", "run.threads=1", "run.progress=false",
    "federation.num_clients=3", "federation.clients_per_round=2",
    "train.local_epochs=1", "train.batch_size=64",
]
COMPARED = ["round", "accuracy", "test_loss", "train_loss", "bytes_down", "bytes_up",
            "bytes_cumulative", "lr", "clients"]


@pytest.fixture(autouse=True)
def node_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ClientApps' partition cache (``$SSFL_CACHE_DIR/flower``) in a temporary folder, for
    this process and the deployments it starts, never in the user's home."""
    folder = tmp_path_factory.mktemp("ssfl-cache")
    monkeypatch.setenv("SSFL_CACHE_DIR", str(folder))
    return folder / "flower"


def _assert_same_metrics(sim: list[dict], fl: list[dict]) -> None:
    assert len(sim) == len(fl)
    for a, b in zip(sim, fl):
        for key in COMPARED:
            if isinstance(a[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)
        assert len(b["client_compute_seconds"]) == len(b["clients"])
        assert b["aggregation_seconds"] >= 0


# ---- run config -----------------------------------------------------------------------------


def flatten_tables(table: dict, prefix: str = "") -> dict:
    """Nested TOML tables as Flower flattens them: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in table.items():
        out.update(flatten_tables(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_run_config_round_trip_and_typed_errors() -> None:
    config = load_config(None, ["train.lr=0.1", "algorithm.density=0.1", "run.name=x"])
    settings = FlowerSettings(run_dir="/tmp/x", min_nodes=3)
    flat = run_config_from_config(config, settings)
    assert flat["train.lr"] == 0.1 and flat["federation.num-clients"] == 20
    back, back_settings = config_from_run_config(flat)
    assert back == config and back_settings == settings
    # A run-config TOML file, as `flwr run --run-config FILE.toml` flattens it.
    parsed = tomllib.loads(run_config_toml(flat))

    flat_again = flatten_tables(parsed)
    assert flat_again == flat
    # ints are accepted for floats; wrong types and unknown keys name the key.
    assert config_from_run_config({"train.lr": 1})[0].train.lr == 1.0
    with pytest.raises(ConfigError, match="train.local_epochs"):
        config_from_run_config({"train.local-epochs": "two"})
    with pytest.raises(ConfigError, match="federation.num_client"):
        config_from_run_config({"federation.num-client": 3})
    with pytest.raises(ConfigError, match="flower.min-node"):
        config_from_run_config({"flower.min-node": 3})
    with pytest.raises(ConfigError, match="density"):
        config_from_run_config({"algorithm.density": 1.5})


def test_flower_app_is_up_to_date_and_lists_every_config_key() -> None:
    """Flower only accepts --run-config overrides of keys the app declares: all of them."""
    assert (APP / "pyproject.toml").read_text() == render_pyproject(), (
        "flower_app/pyproject.toml is stale: run `python -m ssfl.flower.runconfig --app "
        "flower_app`")
    declared = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]

    flat = flatten_tables(declared["config"])
    assert set(run_config_from_config(Config(), FlowerSettings())) <= set(flat)
    # Every built-in method's own keys are declared, so any of them can be overridden.
    for name in ("ssfl", "feddst", "prunefl", "sparsyfed", "dispfl", "snip_single"):
        assert any(key.startswith(f"algorithm.{name}.") for key in flat), name
    assert "algorithm.feddst.update-interval" in flat
    config, _ = config_from_run_config(flat)  # the defaults are a valid config
    assert config.data.dataset == "digits"
    components = declared["components"]
    assert components == {"serverapp": "ssfl.flower.server_app:app",
                          "clientapp": "ssfl.flower.client_app:app"}


# ---- payload encoding -------------------------------------------------------------------------


def _metadata(message_type: str) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=2,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type=message_type)


def test_payload_record_round_trip_through_flower_serialisation() -> None:
    payload = encode_values(torch.randn(1000), round=3)
    msg = Message(RecordDict({"payload": payload_record(payload)}), metadata=_metadata("train"))
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    back = inflate_object_from_contents(msg.object_id, contents)
    assert payload_bytes(back.content["payload"]) == payload


@pytest.mark.parametrize("density", [1.0, 0.05])
def test_flower_encoding_overhead_at_resnet18_size_is_below_2_percent(density: float) -> None:
    """A train message and its reply, serialised as Flower pushes them (every nested object
    deflated), against the raw value bytes of a ResNet-18 payload (dense and at 5 % density)."""
    model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, seed=0)
    total = sum(p.numel() for p in model.parameters())
    count = int(total * density)
    values = torch.randn(count)  # random: chunks do not de-duplicate
    payload = encode_values(values, round=1)
    raw_value_bytes = 4 * count
    train = Message(
        RecordDict({CONFIG: ConfigRecord({"client-id": 17, "round": 1, "lr": 0.05}),
                    "payload": payload_record(payload)}),
        metadata=_metadata("train"),
    )
    down = message_wire_bytes(train)
    overhead = (down - raw_value_bytes) / raw_value_bytes
    assert down > raw_value_bytes
    assert overhead < 0.02, f"{down} bytes for {raw_value_bytes} value bytes: {overhead:.4%}"
    # The SSFL header is 28 bytes; Flower adds the .npy header and per-object metadata.
    assert down - len(payload) < 2_000 + 200 * math.ceil(len(payload) / 5_242_880)


# ---- in-process Grid: the apps without processes ------------------------------------------------


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "node_configs"),
    [
        # one SuperNode per client, pinned by partition-id (a real deployment)
        (QUICK, [{"partition-id": i, "num-partitions": 3} for i in range(3)]),
        # 5 clients served by 2 SuperNodes without a partition-id; float16 values; random mask
        (QUICK + ["federation.num_clients=5", "federation.clients_per_round=3",
                  "comm.value_dtype=float16"], [{}, {}]),
        (QUICK + ["algorithm.name=random", "algorithm.density=0.1"], [{}, {}]),
        (QUICK + ["algorithm.name=fedavg", "algorithm.density=1.0"], [{}]),
        (QUICK + ["algorithm.name=snip_single", "algorithm.density=0.2"], [{}, {}]),
        (QUICK + ["algorithm.name=random_erk", "algorithm.density=0.2"], [{}, {}]),
        # the methods with per-client or changing masks, personal models and client state
        (QUICK + ["algorithm.name=random_clientwise", "algorithm.density=0.3"], [{}, {}]),
        (QUICK + ["algorithm.name=feddst", "algorithm.density=0.3", "run.rounds=4",
                  "algorithm.feddst.update_interval=2", "algorithm.feddst.update_until=4"],
         [{"partition-id": i, "num-partitions": 3} for i in range(3)]),
        (QUICK + ["algorithm.name=prunefl", "algorithm.density=0.3", "run.rounds=4",
                  "algorithm.prunefl.update_interval=2", "algorithm.prunefl.initial_rounds=2"],
         [{}, {}]),
        (QUICK + ["algorithm.name=sparsyfed", "algorithm.density=0.2"], [{}, {}]),
        (QUICK + ["algorithm.name=dispfl", "algorithm.density=0.3",
                  "algorithm.dispfl.neighbors=1"], [{}, {}]),
    ],
)
def test_in_process_flower_run_matches_simulator(
    task_identity: None, tmp_path: Path, overrides: list[str], node_configs: list[dict]
) -> None:
    config = load_config(None, overrides)
    sim = run_experiment(config, write=False)
    grid = InMemoryGrid(run_config_from_config(config), node_configs)
    fl = run_on_grid(grid, config, FlowerSettings(node_wait_seconds=5), tmp_path / "run")
    prunable = list(sim.mask)
    assert mask_digest(fl["mask"], prunable) == mask_digest(sim.mask, prunable)
    assert json.loads((tmp_path / "run" / "mask.json").read_text())["final"]["digest"] == \
        mask_digest(sim.mask, prunable).hex()
    assert fl["summary"]["one_time_bytes"] == sim.summary["one_time_bytes"]
    _assert_same_metrics(sim.metrics, fl["metrics"])
    assert torch.equal(fl["values"], sim.final_values)
    for key in ["density", "final_accuracy", "final_personal_accuracy", "bytes_per_round",
                "dense_bytes_per_round", "ratio_to_dense", "num_values", "total_bytes"]:
        assert fl["summary"][key] == sim.summary[key], key
    # Set-up messages go to each client (SSFL: scores, then the mask); rounds carry payloads.
    types = [t for _, t in grid.received]
    assert set(types) <= {"query.hello", "query.setup", "train"}
    assert types.count("train") == config.run.rounds * config.federation.clients_per_round
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    _assert_same_metrics(sim.metrics, written)
    for row in written:  # the time line of each round (one entry per replying client)
        k = len(row["clients"])
        assert len(row["client_reply_seconds"]) == len(row["client_handler_seconds"]) == k
        assert row["push_seconds"] >= 0
        assert row["first_reply_seconds"] <= row["last_reply_seconds"] <= row["seconds"]
        assert all(t >= 0 for t in row["client_train_seconds"])
    assert {"config.toml", "partition.json", "mask.json", "metrics.jsonl", "summary.json"} <= {
        p.name for p in (tmp_path / "run").iterdir()}


@pytest.mark.slow
def test_local_deployment_refuses_a_pooled_data_method_before_any_process(
        tmp_path: Path) -> None:
    """One line on stderr, exit 2, and no SuperLink was started (no work folder written)."""
    workdir = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-m", "ssfl.flower.local", "algorithm.name=snip_oracle",
         "--workdir", str(workdir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "pooled data" in done.stderr
    assert "Traceback" not in done.stderr and not workdir.exists()


def test_pooled_data_method_is_refused_before_any_work() -> None:
    config = load_config(None, [*QUICK, "algorithm.name=snip_oracle"])
    with pytest.raises(ConfigError, match="pooled data of every client"):
        run_on_grid(InMemoryGrid(run_config_from_config(config), [{}]), config,
                    FlowerSettings(), write=False)


def test_pinned_nodes_must_cover_every_client(task_identity: None) -> None:
    config = load_config(None, QUICK)
    grid = InMemoryGrid(run_config_from_config(config),
                        [{"partition-id": 0, "num-partitions": 3}])
    with pytest.raises(FlowerRunError, match=r"partition\(s\) \[1, 2\]"):
        run_on_grid(grid, config, FlowerSettings(node_wait_seconds=0.5), write=False)
    grid = InMemoryGrid(run_config_from_config(config),
                        [{"partition-id": 0, "num-partitions": 4}])
    with pytest.raises(FlowerRunError, match="num-partitions=4"):
        run_on_grid(grid, config, FlowerSettings(node_wait_seconds=0.5), write=False)


def _scores_message(cid: int) -> Message:
    """SSFL's set-up message asking client ``cid`` for its saliency scores."""
    return Message(RecordDict({CONFIG: ConfigRecord({"client-id": cid, "kind": "scores",
                                                     "round": 0, "lr": 0.0}),
                               "payload": payload_record(b"")}),
                   metadata=_metadata("query.setup"))


def test_node_cache_serves_later_messages_with_the_same_data(
    task_identity: None, node_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ClientApp process that finds its client's part in the node cache answers exactly as
    one that loaded and split the whole data set (which wrote the cache); ``cache-dir="off"``
    disables the cache."""
    config = load_config(None, QUICK)
    flat = run_config_from_config(config)

    def fresh_process_reply(node_config: dict, cid: int = 1) -> Message:
        # Flower starts a new process per message: nothing survives but files and the context.
        monkeypatch.setattr(node_module, "_PROC", node_module._Process())
        monkeypatch.setattr(client_module, "_PROC", client_module._Process())
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                          run_config=dict(flat))
        return client_module.app(_scores_message(cid), context)

    node = {"partition-id": 1, "num-partitions": 3}
    first = fresh_process_reply(node)
    files = sorted(node_cache.glob("digits-client1-*.npz"))
    assert len(files) == 1 and first.content[METRICS]["cache-hit"] == 0
    second = fresh_process_reply(node)
    assert second.content[METRICS]["cache-hit"] == 1
    assert payload_bytes(second.content["payload"]) == payload_bytes(first.content["payload"])
    assert second.content[METRICS]["num-samples"] == first.content[METRICS]["num-samples"]
    # Another seed is another split: another file.
    flat = run_config_from_config(load_config(None, [*QUICK, "run.seed=3"]))
    assert fresh_process_reply(node).content[METRICS]["cache-hit"] == 0
    assert len(list(node_cache.glob("digits-client1-*.npz"))) == 2
    off = fresh_process_reply({**node, "cache-dir": "off"})
    assert off.content[METRICS]["cache-hit"] == 0
    assert len(list(node_cache.glob("*.npz"))) == 2
    # The time stamps the server's breakdown needs.
    metrics = second.content[METRICS]
    assert metrics["handler-seconds"] >= metrics["setup-seconds"] >= 0
    assert metrics["import-seconds"] >= 0
    assert metrics["first-message"] == 1  # a fresh process (0: it had handled one before)
    assert abs(metrics["handler-started"] - time.time()) < 600


def test_node_config_device_overrides_the_runs_and_is_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    flat = run_config_from_config(load_config(None, QUICK))
    monkeypatch.setattr(node_module, "_PROC", node_module._Process())
    assert node_module._setup(flat, {}).config.run.device == "auto"
    assert node_module._setup(flat, {"device": "cpu"}).config.run.device == "cpu"
    with pytest.raises(ConfigError, match="node config device must be 'auto', 'cpu', 'cuda'"):
        node_module._setup(flat, {"device": "gpu1"})


def test_cached_part_trains_bit_identically(tmp_path: Path) -> None:
    """The cached part keeps the data set's strides (digits' size-1 channel dimension): torch
    picks its kernels from them, so a different layout would change the float sums."""
    from ssfl.client import LocalData, local_train
    from ssfl.run.experiment import prepare, seeded_model, train_settings

    config = load_config(None, QUICK)
    exp = prepare(config, with_test=False)
    path = node_module.partition_cache_file(config, "", 2, tmp_path)
    node_module.save_part(path, exp.train_set, exp.parts[2])
    part = node_module.load_part(path)
    assert part is not None and part.images.stride() == exp.train_set.images.stride()
    cached = LocalData(part.images, part.labels, torch.arange(len(part)), part.mean, part.std)
    models = []
    for data in (exp.client(2), cached):
        model = seeded_model(config, part)
        local_train(model, data, train_settings(config), 0.05, client_generator(0, 1, 2))
        models.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(models[0], models[1])
    assert node_module.load_part(tmp_path / "missing.npz") is None
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert node_module.load_part(tmp_path / "broken.npz") is None
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:2000])  # a truncated write
    assert node_module.load_part(tmp_path / "cut.npz") is None


def test_cache_key_follows_the_data_files(shared_data_dir: Path) -> None:
    """The cache file's name hashes the data files it was derived from (and the split)."""
    from ssfl.data.datasets import source_files

    files = source_files("cifar10", shared_data_dir, "train")
    assert len(files) == 5 and all(f.is_file() for f in files)
    assert source_files("digits", None, "train") == []
    config = load_config(None, [*QUICK, "data.dataset=cifar10", f"data.root={shared_data_dir}"])
    a = node_module.partition_cache_file(config, "", 1, Path("/c"))
    assert a == node_module.partition_cache_file(config, "", 1, Path("/c"))
    assert a != node_module.partition_cache_file(config, "", 2, Path("/c"))
    other = load_config(None, [*QUICK, "data.dataset=cifar10", f"data.root={shared_data_dir}",
                               "data.alpha=0.5"])
    assert a != node_module.partition_cache_file(other, "", 1, Path("/c"))


def test_process_start_time_of_a_child_is_when_it_was_started() -> None:
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs Linux /proc")
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "from ssfl.flower.protocol import process_start_time as p; "
                               "print(p())"], capture_output=True, text=True, check=True)
    started = float(out.stdout)
    assert before - 0.05 <= started <= time.time()  # to the kernel's 10 ms tick
    assert process_start_time(999_999_999) is None


def test_round_timeline_splits_each_reply() -> None:
    times = ExchangeTimes(push_started=100.0, push_ended=100.5,
                          pulled=[110.0, float("nan"), 112.0])
    fresh = {"process-started": 102.0, "handler-started": 106.0, "handler-seconds": 3.0,
             "first-message": 1, "import-seconds": 2.5, "setup-seconds": 0.1,
             "decode-seconds": 0.01, "train-seconds": 2.8, "encode-seconds": 0.02}
    reused = dict(fresh, **{"first-message": 0, "handler-started": 108.0})
    out = round_timeline(times, [fresh, None, reused])
    assert out["push_seconds"] == 0.5
    assert out["client_reply_seconds"] == [10.0, 12.0]
    assert out["first_reply_seconds"] == 10.0 and out["last_reply_seconds"] == 12.0
    assert out["client_deliver_seconds"] == [2.0, None]  # a reused process has no start-up
    assert out["client_startup_seconds"] == [4.0, None]
    assert out["client_import_seconds"] == [2.5, None]
    assert out["client_return_seconds"] == [1.0, 1.0]
    assert out["client_train_seconds"] == [2.8, 2.8]
    # deliver + startup + handler + return is the whole reply time
    assert 2.0 + 4.0 + 3.0 + 1.0 == out["client_reply_seconds"][0]
    # Replies of an older ClientApp (no time stamps): None, not an error.
    old = round_timeline(times, [{"compute-seconds": 1.0}, None, None])
    assert old["client_deliver_seconds"] == [None] and old["client_return_seconds"] == [None]


def test_train_before_mask_is_refused_never_trained_densely(task_identity: None) -> None:
    """A client that never received SSFL's mask cannot read a sparse round's payload (its
    count and mask digest are another mask's): the message fails instead of training."""
    config = load_config(None, QUICK)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                      run_config=run_config_from_config(config))
    sparse = encode_values(torch.zeros(100), round=1, digest=b"\x01" * 8)
    msg = Message(RecordDict({CONFIG: ConfigRecord({"client-id": 0, "round": 1, "lr": 0.1}),
                              "payload": payload_record(sparse)}),
                  metadata=_metadata("train"))
    with pytest.raises(ValueError, match="payload has 100 values, expected"):
        client_module.app(msg, context)


# ---- a real local deployment: SuperLink + SuperNodes as processes -------------------------------


def _stop_leftovers(workdir: Path) -> set[int]:
    """Processes of the deployment in ``workdir`` still running after it was stopped (killed
    here, so that no test leaves one behind). Only that deployment's processes: they carry the
    workdir in their environment, so other Flower processes on the machine are never touched."""
    leftovers: set[int] = set()
    for _ in range(120):  # processes may take a moment to exit after SIGTERM (a busy machine: many)
        leftovers = processes_of(workdir)
        if not leftovers:
            return set()
        time.sleep(0.5)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


needs_linux = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")


def run_local_matching_simulator(tmp_path: Path, overrides: list[str], supernodes: int,
                                 **options: Any) -> tuple[Path, list[dict], Any]:
    """``run_local`` in ``tmp_path/work``; asserts that no process outlives it and that its
    mask and per-round metrics are the simulator's. Returns the run folder, its metrics rows
    and the simulator's result."""
    workdir = (tmp_path / "work").resolve()
    try:
        run_dir = run_local(None, overrides, supernodes=supernodes, run_dir=tmp_path / "run",
                            timeout=600, echo=False, workdir=workdir, **options)
    finally:
        leftovers = _stop_leftovers(workdir)
    assert not leftovers, f"processes left running: {leftovers}"
    sim = run_experiment(load_config(None, overrides), write=False)
    assert json.loads((run_dir / "mask.json").read_text())["final"]["digest"] == \
        mask_digest(sim.mask, list(sim.mask)).hex()
    fl = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    _assert_same_metrics(sim.metrics, fl)
    return run_dir, fl, sim


@pytest.mark.slow
@needs_linux
def test_local_deployment_matches_simulator_and_leaves_no_process(tmp_path: Path,
                                                                  node_cache: Path) -> None:
    """2 SuperNodes (one per client) and a SuperLink as processes on 127.0.0.1, ``flwr run``;
    same mask digest and per-round metrics as the simulator."""
    run_dir, fl, sim = run_local_matching_simulator(
        tmp_path, [*QUICK, "federation.num_clients=2"], supernodes=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nodes"] == 2 and summary["engine"] == "flower"
    assert summary["total_bytes"] == sim.summary["total_bytes"]
    assert summary["one_time_bytes"] == sim.summary["one_time_bytes"]
    assert (run_dir / "flower-logs" / "superlink.log").is_file()
    # Every message starts a ClientApp process: each reply splits into Flower's delivery, the
    # process's start-up (our imports part of it), the handler and the way back.
    for row in fl:
        for i in range(len(row["clients"])):
            parts = [row[f"client_{p}_seconds"][i]
                     for p in ("deliver", "startup", "handler", "return")]
            assert all(p is not None and p >= -0.05 for p in parts), row
            assert sum(parts) == pytest.approx(row["client_reply_seconds"][i], abs=0.05)
            assert 0 < row["client_import_seconds"][i] < row["client_startup_seconds"][i]
    # The nodes cached their partitions (the mask round loaded the data set, then wrote them).
    assert len(list(node_cache.glob("digits-client*.npz"))) == 2


@pytest.mark.slow
@needs_linux
@pytest.mark.parametrize("method", [
    ["algorithm.name=dispfl", "algorithm.density=0.3", "algorithm.dispfl.neighbors=1"],
])
def test_stateful_methods_on_a_real_deployment_match_the_simulator(
        tmp_path: Path, node_cache: Path, method: list[str]) -> None:
    """DisPFL (personal models and masks kept by the clients, a relay in the middle) on
    SuperLink and SuperNode processes with workers: the simulator's metrics, bit for bit.
    Every method matches the simulator through Flower's message path in-process
    (test_in_process_flower_run_matches_simulator); a real deployment adds the processes, and
    DisPFL asks the most of them (client state in the nodes' workers, two exchanges a round).
    FedDST and SparsyFed ran here too until the CI run neared its 20 minutes."""
    run_dir, _, sim = run_local_matching_simulator(
        tmp_path, [*QUICK, "federation.num_clients=2", *method], supernodes=2, worker=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("total_bytes", "final_accuracy", "final_personal_accuracy", "density"):
        assert summary[key] == sim.summary[key], key


@pytest.mark.slow
@needs_linux
@pytest.mark.parametrize("method", [
    ["algorithm.name=dispfl", "algorithm.density=0.3", "algorithm.dispfl.neighbors=1"]])
def test_simulation_engine_matches_simulator_and_leaves_no_process(tmp_path: Path,
                                                                   method: list[str]) -> None:
    """``flwr run`` on Flower's simulation engine (Ray, 3 simulated SuperNodes): DisPFL, whose
    clients keep their own models in the simulated nodes' state (SSFL's path through the
    engine is the same ServerApp and ClientApp; the real deployments above run SSFL)."""
    pytest.importorskip("ray")
    run_local_matching_simulator(tmp_path, [*QUICK, *method], supernodes=3, simulation=True)


@pytest.mark.slow
@needs_linux
def test_local_deployment_stops_everything_on_sigterm(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssfl.flower.local", "--supernodes", "2", *QUICK,
         "run.rounds=50", "--out", str(tmp_path / "run"), "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        seen = b""
        while b"Successfully started run" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert b"Successfully started run" in seen, seen.decode(errors="replace")[-2000:]
        assert len(processes_of(workdir.resolve())) >= 3  # link + 2 nodes (+ helpers)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 130, out.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        leftovers = _stop_leftovers(workdir.resolve())
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.mark.slow
@needs_linux
def test_secure_superlink_refuses_unregistered_and_plaintext_supernodes(tmp_path: Path) -> None:
    """TLS + SuperNode authentication: the registered SuperNode connects; a SuperNode with an
    unregistered key, one without a key, and one without TLS are all refused."""
    from ssfl.flower.certs import make_supernode_keys

    workdir = tmp_path / "work"
    workdir.mkdir()
    dep = start_deployment(workdir, 1, pinned_partitions=None, secure=True)
    try:
        assert dep.certs is not None
        stranger = make_supernode_keys(dep.certs, "stranger")["stranger"]
        port = dep.superlink_port
        refused = {
            "unregistered": dep.start("unregistered", supernode_command(
                port, certs=dep.certs, key=stranger, max_wait=10)),
            "no-key": dep.start("no-key", supernode_command(port, certs=dep.certs, max_wait=10)),
            "plaintext": dep.start("plaintext", supernode_command(port, max_wait=10)),
        }
        for name, proc in refused.items():
            assert proc.wait(timeout=180) != 0, name
        log = (workdir / "supernode-0.log").read_text()
        deadline = time.monotonic() + 120
        while "SuperNode ID:" not in log and time.monotonic() < deadline:
            time.sleep(0.5)
            log = (workdir / "supernode-0.log").read_text()
        assert "SuperNode ID:" in log, log[-2000:]
        assert dep.procs[1][1].poll() is None  # the registered SuperNode is still connected
        link_log = (workdir / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log
    finally:
        dep.stop()
        leftovers = _stop_leftovers(workdir.resolve())
    assert not leftovers, f"processes left running: {leftovers}"


def test_numpy_uint8_payload_is_one_array() -> None:
    record = payload_record(b"\x01\x02\x03")
    assert list(record) == ["payload"]
    assert record["payload"].numpy().dtype == np.uint8


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    ["algorithm.name=ssfl"],
    ["algorithm.name=feddst", "algorithm.density=0.3", "algorithm.feddst.update_interval=2"],
    ["algorithm.name=dispfl", "algorithm.density=0.3", "algorithm.dispfl.neighbors=1"],
])
def test_flower_server_resumes_from_its_checkpoint_bit_identical(
    task_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: list[str]
) -> None:
    """A new ServerApp continues a killed one from its checkpoint with fresh nodes, which lost
    their clients' states: the method re-syncs them (SSFL sends the mask again, DisPFL each
    client's own model, FedDST forgets which mask each client held) and the run ends with the
    uninterrupted run's model and accuracy. The re-sync's bytes are reported apart."""
    import ssfl.flower.server_app as server_app

    config = load_config(None, [*QUICK, "run.rounds=4", "run.checkpoint_every=1", *method])
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    reference = run_on_grid(InMemoryGrid(run_config_from_config(config), nodes), config,
                            FlowerSettings(node_wait_seconds=5), tmp_path / "ref")

    real_exchange = server_app.FlowerTransport.exchange

    def crash_in_round_3(self, kind, round, *args, **kwargs):
        if kind == "train" and round == 3:
            raise KeyboardInterrupt("server killed")
        return real_exchange(self, kind, round, *args, **kwargs)

    monkeypatch.setattr(server_app.FlowerTransport, "exchange", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_on_grid(InMemoryGrid(run_config_from_config(config), nodes), config,
                    FlowerSettings(node_wait_seconds=5), tmp_path / "crashed")
    monkeypatch.setattr(server_app.FlowerTransport, "exchange", real_exchange)
    resumed = run_on_grid(InMemoryGrid(run_config_from_config(config), nodes), config,
                          FlowerSettings(node_wait_seconds=5, resume=True), tmp_path / "crashed")
    assert torch.equal(resumed["values"], reference["values"])
    assert [m["accuracy"] for m in resumed["metrics"]] == \
        [m["accuracy"] for m in reference["metrics"]]
    if config.algorithm.name == "feddst":  # it re-sends masks its clients may have held
        assert resumed["summary"]["total_bytes"] >= reference["summary"]["total_bytes"]
    else:
        _assert_same_metrics(reference["metrics"], resumed["metrics"])
        assert resumed["summary"]["total_bytes"] == reference["summary"]["total_bytes"]
        assert resumed["summary"]["resync_bytes"] > 0
