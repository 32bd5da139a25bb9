"""Trained models out: model.safetensors in every run, load_model, ssfl evaluate/export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ssfl
from ssfl.cli import main
from ssfl.client import evaluate_samples
from ssfl.config import ConfigError, load_config
from ssfl.data.datasets import load_dataset
from ssfl.export import MODEL_FILE, ModelFileError, evaluate_run, export_sparse, read_model
from ssfl.sim import run_experiment

RUN = ["run.rounds=2", "run.threads=1", "run.progress=false", "federation.num_clients=6",
       "federation.clients_per_round=3", "train.local_epochs=1", "algorithm.density=0.1",
       "run.checkpoint_every=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "run"
    run_experiment(load_config(None, RUN), folder)
    return folder


def test_every_run_leaves_its_model_even_without_checkpoints(finished: Path) -> None:
    assert (finished / MODEL_FILE).is_file() and not (finished / "checkpoint.pt").exists()
    model, mask, config = read_model(finished)
    summary = json.loads((finished / "summary.json").read_text())
    params = dict(model.named_parameters())
    assert set(mask) and all(not bool(params[n][~m].any()) for n, m in mask.items())
    kept = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert kept == pytest.approx(summary["density"])
    assert config == load_config(finished / "config.toml")
    # The loaded model scores exactly what the run reported.
    test = load_dataset("digits", None, "test")
    correct, _ = evaluate_samples(ssfl.load_model(finished), test.images, test.labels,
                                  test.mean, test.std)
    assert int(correct.sum()) / correct.numel() == summary["final_accuracy"]
    assert evaluate_run(finished)["accuracy"] == summary["final_accuracy"]


def test_sparse_export_is_smaller_and_loads_to_the_same_model(finished: Path,
                                                                tmp_path: Path) -> None:
    path, size, dense = export_sparse(finished, tmp_path / "m.safetensors")
    assert size < 0.4 * dense  # density 0.1: values and a bitmap, not the zeros
    a, b = ssfl.load_model(finished), ssfl.load_model(path)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def test_cli_evaluate_and_export(finished: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((finished / "summary.json").read_text())
    assert main(["evaluate", str(finished)]) == 0
    assert f"accuracy {summary['final_accuracy']:.4f}" in capsys.readouterr().out
    assert main(["export", str(finished), "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "of the dense model file" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_other_data_is_refused_by_name_when_it_does_not_fit(finished: Path,
                                                             shared_data_dir: Path) -> None:
    """CIFAR-10 has the digits' 10 classes but 3x32x32 images: a clear error, no traceback;
    CIFAR-100's 100 classes: the same."""
    root = f'data.root="{shared_data_dir}"'
    with pytest.raises(ConfigError, match=r"cifar10 images \(3, 32, 32\) do not fit the model"):
        evaluate_run(finished, ["data.dataset=cifar10", root])


def test_broken_model_files_are_clear_errors(finished: Path, tmp_path: Path) -> None:
    data = (finished / MODEL_FILE).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        ssfl.load_model(tmp_path / "cut.safetensors")
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="not a model file written by ssfl"):
        ssfl.load_model(tmp_path / "other.safetensors")


def test_the_python_api_runs_from_a_dict(tmp_path: Path) -> None:
    result = ssfl.run_experiment({"run": {"rounds": 1, "threads": 1, "progress": False},
                       "federation": {"num_clients": 4, "clients_per_round": 2}},
                      tmp_path / "api")
    assert result.summary["rounds"] == 1 and (tmp_path / "api" / MODEL_FILE).is_file()
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        ssfl.run_experiment({"train": {"lrr": 1.0}})
