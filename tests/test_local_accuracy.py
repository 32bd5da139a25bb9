"""The authors' personalised protocol (``local_accuracy``): each client's last local model,
right after it trained, on its own test split, averaged over the clients that have trained."""

from __future__ import annotations

import pytest
import torch

from ssfl.algorithms.common import load_weights_
from ssfl.client import evaluate_samples
from ssfl.config import load_config
from ssfl.run import loop
from ssfl.run.experiment import prepare, sample_clients
from ssfl.sim import run_experiment

RUN = ["run.rounds=2", "run.threads=1", "run.progress=false", "federation.num_clients=6",
       "federation.clients_per_round=3", "train.local_epochs=1", "algorithm.density=1.0",
       "algorithm.name=fedavg"]


def test_local_accuracy_is_the_mean_over_trained_clients_of_their_own_split(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a learning rate too small to change a prediction, every local model predicts as
    the initial model: local_accuracy is then the initial model's accuracy on each trained
    client's own split, averaged over the clients trained so far (round 1: three; round 2:
    the union of both samples)."""
    config = load_config(None, [*RUN, "train.lr=1e-12", "train.momentum=0",
                                "train.weight_decay=0", "train.clip_grad_norm=0"])
    tests: list[torch.Tensor] = []
    real_open = loop.RunFolder.open

    def keep_tests(*args, **kwargs):  # type: ignore[no-untyped-def]
        folder = real_open(*args, **kwargs)
        tests.extend(folder.client_tests)
        return folder

    monkeypatch.setattr(loop.RunFolder, "open", keep_tests)
    result = run_experiment(config, write=False)
    exp = prepare(config)
    load_weights_(exp.model, exp.initial)
    test = exp.test_set
    assert test is not None
    own = [int(evaluate_samples(exp.model, test.images[idx], test.labels[idx], test.mean,
                                test.std)[0].sum()) / idx.numel() for idx in tests]
    trained: set[int] = set()
    for row in result.metrics:
        trained |= set(sample_clients(0, row["round"], 6, 3))
        assert row["local_accuracy"] == pytest.approx(
            sum(own[c] for c in trained) / len(trained))
    assert result.summary["final_local_accuracy"] == result.metrics[-1]["local_accuracy"]


def test_local_accuracy_of_real_training_is_a_fraction_and_differs_from_the_global() -> None:
    result = run_experiment(load_config(None, RUN), write=False)
    for row in result.metrics:
        assert 0.0 <= row["local_accuracy"] <= 1.0
    assert result.metrics[-1]["local_accuracy"] != result.metrics[-1]["personal_accuracy"]
