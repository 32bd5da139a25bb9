"""The authors' recipes: the local warm-restart cosine schedule (train.local_lr_schedule) and
saliency scored on augmented batches (saliency_augment)."""

from __future__ import annotations

import math

import pytest
import torch

from ssfl.client import (
    LocalData,
    TrainSettings,
    compute_scores,
    local_epoch_lr,
    local_train,
)
from ssfl.config import ConfigError, load_config
from ssfl.data.augment import normalize, random_crop_flip
from ssfl.masks import prunable_parameter_names, saliency_scores
from ssfl.models import SmallCNN
from ssfl.sim import run_experiment

COSINE = TrainSettings(local_lr_schedule="cosine_restarts", local_restart_epochs=4,
                       local_lr_min=0.0)


def test_local_cosine_by_hand() -> None:
    # T_0 = 4, floor 0, from 0.1: 0.1 * (1 + cos(pi e / 4)) / 2 for e = 0..3, then a restart.
    c = math.cos(math.pi / 4)
    expected = [0.1, 0.1 * (1 + c) / 2, 0.05, 0.1 * (1 - c) / 2, 0.1, 0.1 * (1 + c) / 2]
    got = [local_epoch_lr(0.1, e, COSINE) for e in range(6)]
    assert got == pytest.approx(expected, abs=1e-15)
    assert got[2] == pytest.approx(0.05) and got[4] == 0.1


def test_local_cosine_is_torchs_warm_restarts_stepped_per_epoch() -> None:
    settings = TrainSettings(local_lr_schedule="cosine_restarts", local_restart_epochs=10,
                             local_lr_min=1e-5)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.07)
    schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10,
                                                                    eta_min=1e-5)
    for epoch in range(25):
        assert local_epoch_lr(0.07, epoch, settings) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12), epoch
        optimizer.step()
        schedule.step()


def test_constant_schedule_is_the_rounds_rate() -> None:
    assert all(local_epoch_lr(0.3, e, TrainSettings()) == 0.3 for e in range(12))


def _tiny_data(n: int = 16, channels: int = 3, size: int = 8, seed: int = 0) -> LocalData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return LocalData(images, labels, torch.arange(n), (0.5,) * channels, (0.25,) * channels)


def _step_rates(monkeypatch: pytest.MonkeyPatch, settings: TrainSettings, lr: float) -> list[float]:
    """The learning rate of every optimiser step of one local_train call."""
    rates: list[float] = []
    original = torch.optim.SGD.step

    def spy(self: torch.optim.SGD, *args, **kwargs):  # type: ignore[no-untyped-def]
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    torch.manual_seed(0)
    model = SmallCNN(3, in_channels=3, image_size=8)
    local_train(model, _tiny_data(), settings, lr=lr, generator=torch.Generator().manual_seed(1))
    return rates


def test_local_train_steps_at_each_epochs_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 samples in batches of 8: two steps per epoch; T_0 = 2 halves the rate in every
    # second epoch and restarts it in the third.
    settings = TrainSettings(local_epochs=3, batch_size=8, local_lr_schedule="cosine_restarts",
                             local_restart_epochs=2, local_lr_min=0.0)
    rates = _step_rates(monkeypatch, settings, lr=0.2)
    assert rates == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.2, 0.2])


def test_constant_local_schedule_never_changes_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = _step_rates(monkeypatch, TrainSettings(local_epochs=3, batch_size=8), lr=0.2)
    assert rates == [0.2] * 6


@pytest.mark.parametrize("override, words", [
    ('train.local_lr_schedule="cosine"', "local_lr_schedule"),
    ("train.local_restart_epochs=0", "local_restart_epochs"),
    ('train.local_lr_schedule="cosine_restarts",train.local_lr_min=0.5', "local_lr_min"),
    ('algorithm.ssfl.saliency_augment="crop"', "saliency_augment"),
    ('algorithm.ssfl.layer_budget="per_layer"', "layer_budget"),
    ("algorithm.ssfl.min_per_unit=-1", "min_per_unit"),
])
def test_bad_recipe_keys_are_refused_by_name(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(None, ["train.lr=0.1", *override.split(",")])


def test_local_lr_min_only_matters_for_the_cosine() -> None:
    config = load_config(None, ["train.lr=1e-6", "train.local_lr_min=1e-5"])
    assert config.train.local_lr_schedule == "constant"


def test_augmented_scores_are_those_of_the_first_augmented_batch() -> None:
    torch.manual_seed(0)
    model = SmallCNN(3, in_channels=3, image_size=8)
    data = _tiny_data()
    got = compute_scores(model, data, num_batches=1, batch_size=8,
                         generator=torch.Generator().manual_seed(5), augment=True)
    # By hand: the shuffled order, its first 8 images, cropped and flipped from the same
    # generator, normalised.
    g = torch.Generator().manual_seed(5)
    order = data.indices[torch.randperm(len(data), generator=g)][:8]
    images = normalize(random_crop_flip(data.images[order], g), data.mean, data.std)
    expected = saliency_scores(model, [(images, data.labels[order])],
                               prunable_parameter_names(model))
    plain = compute_scores(model, data, num_batches=1, batch_size=8,
                           generator=torch.Generator().manual_seed(5), augment=False)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert any(not torch.equal(got[n], plain[n]) for n in got)


def _mask(*overrides: str) -> dict[str, torch.Tensor]:
    config = load_config(None, ["data.dataset=digits", "run.rounds=1", "run.threads=1",
                                "federation.num_clients=4", "federation.clients_per_round=2",
                                "run.progress=false", "run.checkpoint_every=0",
                                "run.eval_every=0", "algorithm.density=0.2", *overrides])
    return run_experiment(config, write=False, progress=False).mask


def test_saliency_augment_follows_the_training_augmentation() -> None:
    # Digits train unaugmented (train.augment auto), so "train" scores the same batches as
    # "off"; with crop and flip switched on for training, the scored batches change too.
    off = _mask('algorithm.ssfl.saliency_augment="off"')
    same = _mask('algorithm.ssfl.saliency_augment="train"')
    assert all(torch.equal(off[n], same[n]) for n in off)
    augmented = _mask('algorithm.ssfl.saliency_augment="train"', 'train.augment="crop_flip"')
    off_augmented = _mask('algorithm.ssfl.saliency_augment="off"', 'train.augment="crop_flip"')
    assert all(torch.equal(off[n], off_augmented[n]) for n in off)
    assert any(not torch.equal(off[n], augmented[n]) for n in off)


def test_erk_layer_budget_keeps_the_erk_counts_and_the_scores_choice_within_layers() -> None:
    # The same scores (same seed, same clients) under both budgets: "erk" keeps exactly the
    # random ERK baseline's per-layer counts, and in a layer where it keeps at least as many
    # weights as the global top-k did, it keeps every weight the global top-k kept there
    # (both rank that layer's weights by the same scores).
    from ssfl.masks import erk_counts

    everywhere = _mask()
    per_layer = _mask('algorithm.ssfl.layer_budget="erk"')
    shapes = {n: m.shape for n, m in everywhere.items()}
    assert {n: int(m.sum()) for n, m in per_layer.items()} == erk_counts(shapes, 0.2)
    assert any(not torch.equal(everywhere[n], per_layer[n]) for n in everywhere)
    for name in everywhere:
        if int(per_layer[name].sum()) >= int(everywhere[name].sum()):
            assert bool(per_layer[name][everywhere[name]].all())


def test_min_per_unit_reconnects_every_unit_and_keeps_the_density() -> None:
    # At density 0.2 the paper's mask leaves output units of conv2 and fc1 with no weight and
    # input channels of fc1 and fc2 feeding none; one weight per unit reconnects all of them
    # with the same count. Each cut-off unit needs a weight of its own row or column, and each
    # of the floor's new weights serves at least one: between max(dead, unused) and their sum
    # weights make way.
    from ssfl.masks import dead_units

    plain = _mask()
    floored = _mask("algorithm.ssfl.min_per_unit=1")
    units = dead_units(plain).values()
    dead, unused = sum(u[0] for u in units), sum(u[2] for u in units)
    assert dead > 0 and unused > 0
    assert all(u[0] == 0 and u[2] == 0 for u in dead_units(floored).values())
    assert sum(int(m.sum()) for m in floored.values()) == sum(int(m.sum()) for m in plain.values())
    moved = sum(int((plain[n] & ~floored[n]).sum()) for n in plain)
    assert max(dead, unused) <= moved <= dead + unused
    with pytest.raises(ValueError, match="more than the"):
        _mask("algorithm.ssfl.min_per_unit=5", "algorithm.density=0.01")
