"""End-to-end simulator runs: determinism, exact byte accounting, the mask invariant, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssfl.cli import main
from ssfl.comm import HEADER
from ssfl.config import ConfigError, load_config
from ssfl.sim import learning_rate, run_experiment, sample_clients

FAST = ["run.rounds=3", "run.progress=false", "federation.num_clients=6",
        "federation.clients_per_round=3", "train.local_epochs=1", "model.width=0.5"]


def _run(*overrides: str, path: Path | None = None):
    config = load_config(None, [*FAST, *overrides])
    return run_experiment(config, path, write=path is not None)


def _without_times(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics]


def test_same_seed_same_mask_and_metrics_different_seed_differs() -> None:
    a, b = _run("run.seed=3"), _run("run.seed=3")
    assert all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)
    assert _without_times(a.metrics) == _without_times(b.metrics)
    assert torch.equal(a.final_values, b.final_values)
    c = _run("run.seed=4")
    assert not all(torch.equal(a.mask[n], c.mask[n]) for n in a.mask)


@pytest.mark.parametrize(("algorithm", "density"), [("ssfl", 0.1), ("random", 0.2),
                                                    ("fedavg", 1.0)])
def test_bytes_are_exact_and_ratio_is_density_plus_dense_part(algorithm: str,
                                                              density: float) -> None:
    result = _run(f"algorithm.name={algorithm}", f"algorithm.density={density}")
    s = result.summary
    prunable = sum(m.numel() for m in result.mask.values())
    kept = sum(int(m.sum()) for m in result.mask.values())
    other = s["num_parameters"] - prunable
    assert kept == round(density * prunable)
    values = kept + other
    assert s["num_values"] == values
    one_way = HEADER.size + 4 * values
    assert s["bytes_per_round"] == {"down": one_way, "up": one_way}
    dense = HEADER.size + 4 * s["num_parameters"]
    assert s["dense_bytes_per_round"]["down"] == dense
    expected_ratio = (density * prunable + other) / (prunable + other)
    assert abs(s["ratio_to_dense"] - expected_ratio) / expected_ratio < 0.01
    for row in result.metrics:
        assert row["bytes_down"] == 3 * s["bytes_per_round"]["down"]
        assert row["bytes_up"] == 3 * s["bytes_per_round"]["up"]
    one_time = s["one_time_bytes"]
    if algorithm == "ssfl":
        assert one_time["score_upload"] == 6 * (HEADER.size + 4 * prunable)
    else:
        assert "score_upload" not in one_time
    if density < 1:
        assert one_time["mask_broadcast"] == 6 * (HEADER.size + math.ceil(prunable / 8))
    else:
        assert one_time == {}
    per_round = [r["bytes_down"] + r["bytes_up"] for r in result.metrics]
    assert result.metrics[-1]["bytes_cumulative"] == sum(one_time.values()) + sum(per_round)


def test_global_model_stays_inside_the_mask() -> None:
    result = _run("algorithm.density=0.05")
    assert result.final_values.numel() == result.summary["num_values"]
    assert abs(result.summary["density"] - 0.05) < 1e-4


def test_float16_halves_the_value_bytes() -> None:
    s32 = _run("algorithm.density=0.5").summary
    s16 = _run("algorithm.density=0.5", "comm.value_dtype=float16").summary
    assert s16["bytes_per_round"]["down"] == HEADER.size + 2 * s32["num_values"]
    assert s32["bytes_per_round"]["down"] == HEADER.size + 4 * s32["num_values"]


def test_uniform_and_weighted_score_aggregation_both_run() -> None:
    w = _run("algorithm.score_aggregation=weighted", "data.partition=dirichlet")
    u = _run("algorithm.score_aggregation=uniform", "data.partition=dirichlet")
    assert w.summary["density"] == u.summary["density"]


def test_clients_share_one_image_tensor() -> None:
    from ssfl.sim import InProcessTransport, prepare

    exp = prepare(load_config(None, FAST))
    clients = InProcessTransport(exp).clients
    assert len(clients) == exp.config.federation.num_clients
    # Index sets into the one uint8 tensor, never copies of it.
    assert {c.images.data_ptr() for c in clients} == {exp.train_set.images.data_ptr()}


def test_eval_every_zero_trains_without_evaluating() -> None:
    result = _run("run.eval_every=0")
    assert [r["accuracy"] for r in result.metrics] == [None] * len(result.metrics)
    assert result.summary["final_accuracy"] is None
    assert result.summary["bytes_per_round"] == _run().summary["bytes_per_round"]
    with pytest.raises(ConfigError, match="run.eval_every must be >= 0"):
        load_config(None, ["run.eval_every=-1"])


def test_run_folder_contents(tmp_path: Path) -> None:
    result = _run("run.eval_every=2", path=tmp_path / "run")
    folder = result.run_dir
    assert folder is not None
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["accuracy"] is None and rows[1]["accuracy"] is not None
    assert rows[2]["accuracy"] is not None  # the last round is always evaluated
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[2]["accuracy"]
    assert 0.0 <= rows[2]["personal_accuracy"] <= 1.0
    assert summary["final_personal_accuracy"] == rows[2]["personal_accuracy"]
    assert load_config(folder / "config.toml").run.eval_every == 2
    part = json.loads((folder / "partition.json").read_text())
    assert len(part["class_counts"]) == 6 and sum(part["sizes"]) <= 1438
    # Each client's test split holds only classes the client trains on.
    for train_row, test_row in zip(part["class_counts"], part["test_class_counts"]):
        assert all(t == 0 for c, t in zip(train_row, test_row) if c == 0)
        assert sum(test_row) == 359 // 6
    mask = json.loads((folder / "mask.json").read_text())
    assert mask["scored_clients"] == list(range(6))


def test_learning_rate_schedules_by_hand() -> None:
    exp = load_config(None, ["train.lr=0.1", "train.lr_decay=0.5", "run.rounds=4"])
    assert [learning_rate(exp, r) for r in (1, 2, 3)] == [0.1, 0.05, 0.025]
    cos = load_config(None, ["train.lr=0.1", "train.lr_schedule=cosine", "run.rounds=4"])
    assert learning_rate(cos, 1) == pytest.approx(0.1)
    assert learning_rate(cos, 3) == pytest.approx(0.05)


def test_client_sampling_is_seeded_per_round() -> None:
    a = sample_clients(0, 5, 100, 10)
    assert a == sample_clients(0, 5, 100, 10) and a == sorted(a) and len(set(a)) == 10
    assert a != sample_clients(0, 6, 100, 10)


def test_cli_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "r1"
    assert main(["run", "--out", str(run_dir), "--no-progress", *FAST]) == 0
    assert "final accuracy" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    assert "| r1" in capsys.readouterr().out or (tmp_path / "rep" / "summary.md").exists()
    assert (tmp_path / "rep" / "accuracy_vs_bytes.png").exists()


def test_cli_reports_config_and_data_errors_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["run", "--out", str(tmp_path / "x"), "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    monkeypatch.setenv("SSFL_DATA_DIR", str(tmp_path / "empty"))
    assert main(["run", "--out", str(tmp_path / "y"), "data.dataset=cifar10"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-bin" in err
    assert not (tmp_path / "y").exists()  # nothing was started


@pytest.mark.slow
def test_real_cifar10_round(shared_data_dir: Path) -> None:
    config = load_config(None, [
        f"data.root={json.dumps(str(shared_data_dir))}", "data.dataset=cifar10",
        "run.rounds=1", "run.progress=false", "federation.num_clients=100",
        "federation.clients_per_round=2", "train.local_epochs=1", "algorithm.density=0.1",
        "data.partition=balanced_dirichlet",
    ])
    result = run_experiment(config, write=False)
    assert result.summary["final_accuracy"] is not None
    assert 0.0 <= result.summary["final_accuracy"] <= 1.0
    assert abs(result.summary["ratio_to_dense"] - 0.1) < 0.01
