"""Models used in the paper and a small CNN that trains quickly on a CPU.

ResNet-18 follows the CIFAR form used by SSFL and the sparse-FL literature: a 3x3 stride-1 stem,
no max-pool, and GroupNorm instead of BatchNorm. GroupNorm matters in federated learning because
BatchNorm's running statistics are client-specific and average badly under non-IID data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # With a reduced width a layer may have fewer channels than groups; fall back to the largest
    # divisor so that narrow test models stay valid.
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(planes, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), _group_norm(planes, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images. ``width`` scales every stage (64 at width 1.0)."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: float = 1.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.norm1 = _group_norm(widths[0], norm_groups)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, norm_groups))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layers(out)
        # Global average pooling makes the same network work on 32x32 (CIFAR) and 64x64
        # (Tiny-ImageNet) input.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers and two linear layers (the classic FedAvg CIFAR CNN, 3x3 kernels).

    Chosen for CPU throughput: a 100-client CIFAR-10 run of 100 rounds fits in minutes on two
    cores. The flatten size is derived from the input size, so it also runs on 8x8 digits.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, image_size: int = 32, width: float = 1.0
    ) -> None:
        super().__init__()
        c1, c2, hidden = (max(1, round(c * width)) for c in (32, 64, 256))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        reduced = image_size // 4
        self.fc1 = nn.Linear(c2 * reduced * reduced, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last activations make oneDNN's CPU convolutions 1.5-1.8x faster here (measured
        # in benchmarks/throughput.py); the weights keep their default layout, so state dicts and
        # payloads are unaffected.
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {"resnet18": ResNet18, "small_cnn": SmallCNN}


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float = 1.0,
    seed: int,
) -> nn.Module:
    """Build a model with a seeded initialisation.

    Every client and the server call this with the same seed and so hold bit-identical initial
    weights without sending them: the SSFL mask round needs all clients to score the same model.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    # Initialise under a private generator state so that the caller's global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "resnet18":
            return ResNet18(num_classes, in_channels=in_channels, width=width)
        return SmallCNN(num_classes, in_channels=in_channels, image_size=image_size, width=width)
