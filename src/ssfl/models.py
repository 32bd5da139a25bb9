"""Models used in the paper and a small CNN that trains quickly on a CPU.

ResNet-18 follows the CIFAR form used by SSFL and the sparse-FL literature: a 3x3 stride-1 stem,
no max-pool, and GroupNorm instead of BatchNorm. GroupNorm matters in federated learning because
BatchNorm's running statistics are client-specific and average badly under non-IID data.

Models are built by name (``model.name`` in a config) through :func:`build_model`, which looks
the name up in :data:`MODELS`. To add a model from user code, decorate a builder with
:func:`register_model`; the builder takes the same arguments as the built-in ones and
returns a fresh, randomly initialised module (seeding is :func:`build_model`'s job)::

    from torch import nn
    from ssfl.models import build_model, register_model

    @register_model("mlp")
    def build_mlp(num_classes: int, *, in_channels: int, image_size: int,
                  width: float) -> nn.Module:
        hidden = max(1, round(128 * width))
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, hidden),
                             nn.ReLU(), nn.Linear(hidden, num_classes))

    model = build_model("mlp", num_classes=10, in_channels=3, image_size=32, seed=0)

Register before the config is validated, e.g. at import of your module (every process that
builds models, such as a Flower node, must import that module too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol, TypeVar

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


class ModelBuilder(Protocol):
    """Builds an untrained model for the data set's shape: ``num_classes`` outputs for
    ``[N, in_channels, image_size, image_size]`` input; ``width`` scales its channels (1.0 is
    the standard size; a builder without a notion of width may ignore it)."""

    def __call__(
        self, num_classes: int, *, in_channels: int, image_size: int, width: float
    ) -> nn.Module: ...


# Kept for code that annotated factories with it; every MODELS value is a ModelBuilder.
ModelFactory = Callable[..., nn.Module]
BuilderT = TypeVar("BuilderT", bound=ModelBuilder)

_BUILDERS: dict[str, ModelBuilder] = {}

#: Registered models, name -> builder, in registration order (built-ins first). A read-only
#: live view: add entries with :func:`register_model`, which refuses accidental duplicates.
MODELS: Mapping[str, ModelBuilder] = MappingProxyType(_BUILDERS)


def register_model(name: str, *, replace: bool = False) -> Callable[[BuilderT], BuilderT]:
    """Decorator that makes a builder available to :func:`build_model` as ``name``.

    The builder is called as ``builder(num_classes, in_channels=..., image_size=...,
    width=...)`` (see :class:`ModelBuilder`) under the seeded generator of
    :func:`build_model`, so it must take its randomness from torch's global generator and
    must not seed it itself. Returns the builder unchanged.

    Raises:
        ValueError: ``name`` is empty, or already registered and ``replace`` is false.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def decorate(builder: BuilderT) -> BuilderT:
        if not callable(builder):
            raise TypeError(f"register_model({name!r}) needs a callable, got {builder!r}")
        if name in _BUILDERS and not replace:
            raise ValueError(f"model {name!r} is already registered; pass replace=True to "
                             f"replace it")
        _BUILDERS[name] = builder
        return builder

    return decorate


@register_model("resnet18")
def _build_resnet18(
    num_classes: int, *, in_channels: int, image_size: int, width: float
) -> nn.Module:
    del image_size  # global average pooling makes the network independent of it
    return ResNet18(num_classes, in_channels=in_channels, width=width)


@register_model("small_cnn")
def _build_small_cnn(
    num_classes: int, *, in_channels: int, image_size: int, width: float
) -> nn.Module:
    return SmallCNN(num_classes, in_channels=in_channels, image_size=image_size, width=width)


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

    ``name`` is any key of :data:`MODELS` (built-in or added with :func:`register_model`).

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
        TypeError: the registered builder did not return an ``nn.Module``.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_BUILDERS)}")
    # Initialise under a private generator state so that the caller's global RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(num_classes, in_channels=in_channels, image_size=image_size, width=width)
    # A registered builder is user code: fail here, not deep inside training.
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder of model {name!r} returned {type(model).__name__}, "
                        f"not an nn.Module")
    return model
