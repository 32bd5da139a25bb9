"""run.device: where the model trains. The CPU path is the reference; the CUDA tests run only on
a machine whose PyTorch sees a GPU (they are skipped on the 2-core CI machine)."""

from __future__ import annotations

import pytest
import torch

from ssfl.config import ConfigError, load_config
from ssfl.run.experiment import resolve_device
from ssfl.sim import run_experiment

FAST = ["run.rounds=4", "run.eval_every=2", "run.progress=false", "federation.num_clients=6",
        "federation.clients_per_round=3", "model.width=0.5", "algorithm.density=0.2",
        "algorithm.update_interval=2", "algorithm.prunefl_initial_rounds=1"]
ALGORITHMS = ["ssfl", "fedavg", "random_clientwise", "feddst", "prunefl", "dispfl", "sparsyfed"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def _run(*overrides: str):
    return run_experiment(load_config(None, [*FAST, *overrides]), write=False)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", "", "cuda:0:1"])
def test_device_names_are_checked(bad: str) -> None:
    with pytest.raises(ConfigError, match="run.device must be 'auto', 'cpu', 'cuda'"):
        load_config(None, [f'run.device="{bad}"'])


def test_good_device_names_load() -> None:
    for name in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_config(None, [f'run.device="{name}"']).run.device == name


def test_auto_is_the_gpu_when_there_is_one() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="sees no CUDA GPU.*use 'auto' or 'cpu'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        _run("run.device=\"cuda:0\"")


def test_summary_names_the_device() -> None:
    assert _run('run.device="cpu"').summary["device"] == "cpu"


@needs_cuda
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_gpu_run_keeps_the_masks_bytes_and_learns_like_the_cpu_run(algorithm: str) -> None:
    """Same seed on both devices. Floating-point sums differ between the devices, so the
    checks are the invariants: exact density; for fixed masks the same bytes (payload sizes
    depend only on the mask sizes; a dynamic method's masks, and so its bytes, follow the
    weights); finite losses; accuracy near the CPU run's."""
    cpu = _run(f"algorithm.name={algorithm}", 'run.device="cpu"')
    gpu = _run(f"algorithm.name={algorithm}", 'run.device="cuda"')
    assert gpu.summary["device"].startswith("cuda")
    assert gpu.summary["density"] == pytest.approx(cpu.summary["density"], abs=1e-12)
    if algorithm in ("ssfl", "fedavg", "random_clientwise"):
        for key in ("bytes_per_round", "num_values", "total_bytes"):
            assert gpu.summary[key] == cpu.summary[key], key
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in gpu.metrics)
    assert abs(gpu.summary["final_accuracy"] - cpu.summary["final_accuracy"]) < 0.2
    assert gpu.final_values.device.type == "cpu"  # the server's state stays on the CPU


@needs_cuda
def test_auto_on_a_gpu_asks_cudnn_for_reproducible_kernels() -> None:
    torch.backends.cudnn.deterministic = False
    assert resolve_device("auto").type == "cuda"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_the_checkpoint_records_the_device(tmp_path) -> None:
    from ssfl.checkpoint import load_checkpoint

    run_experiment(load_config(None, [*FAST, 'run.device="cpu"']), tmp_path / "run")
    meta, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert meta["device"] == "cpu"


@needs_cuda
def test_a_gpu_run_is_reproducible() -> None:
    a, b = _run('run.device="cuda"'), _run('run.device="cuda"')
    assert [m["train_loss"] for m in a.metrics] == [m["train_loss"] for m in b.metrics]
    assert torch.equal(a.final_values, b.final_values)
