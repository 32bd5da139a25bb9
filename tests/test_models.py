"""Models: the paper's ResNet-18 form, the small CNN, seeded initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssfl.models import ResNet18, SmallCNN, build_model


def test_resnet18_is_the_cifar_form_with_groupnorm() -> None:
    model = ResNet18(10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.BatchNorm2d)) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    # The standard CIFAR ResNet-18 with a 10-class head has 11,173,962 parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_runs_on_cifar_and_tiny_imagenet_sizes(size: int) -> None:
    model = ResNet18(200, width=0.125)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 200)


def test_width_scales_channels() -> None:
    assert ResNet18(10, width=0.5).conv1.out_channels == 32
    assert SmallCNN(10, width=0.5).conv1.out_channels == 16


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32), (3, 64)])
def test_small_cnn_shapes(channels: int, size: int) -> None:
    model = SmallCNN(7, in_channels=channels, image_size=size)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("small_cnn", num_classes=10, in_channels=3, image_size=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("small_cnn", num_classes=10, in_channels=3, image_size=32, seed=5)
    c = build_model("small_cnn", num_classes=10, in_channels=3, image_size=32, seed=6)
    pa, pb, pc = (torch.cat([p.reshape(-1) for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", num_classes=10, in_channels=3, image_size=32, seed=0)
