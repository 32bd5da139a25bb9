"""Client side: saliency scoring and masked local training on a client's own data.

These functions are shared by the in-process simulator and the Flower ClientApp; they take a
model, the client's data and settings, and return payload bytes, so that the adapters only move
bytes around.

They compute on whatever device the model is on (``run.device``): the client's data stays on
the CPU and each minibatch is moved when it is drawn, so the random crops, flips and sample
order are drawn from the same CPU generator on any device. Whatever goes back to the server
(scores, values, masks) comes back as CPU tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ssfl.comm import (
    ParameterLayout,
    PayloadKind,
    decode_values,
    encode_positions,
    encode_values,
)
from ssfl.data.augment import normalize, random_crop_flip
from ssfl.masks import Mask, flatten, prunable_parameter_names, saliency_scores, top_k


@dataclass(frozen=True)
class LocalData:
    """A client's data: index set into one shared uint8 image tensor (never copied per client)."""

    images: torch.Tensor  # uint8 [N, C, H, W], the whole data set
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64, this client's samples
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.indices.numel())


@dataclass(frozen=True)
class TrainSettings:
    momentum: float = 0.9
    weight_decay: float = 5e-4
    local_epochs: int = 1
    batch_size: int = 32
    clip_grad_norm: float = 10.0  # 0 disables clipping
    augment: bool = True
    local_lr_schedule: str = "constant"  # or "cosine_restarts" (``local_epoch_lr``)
    local_restart_epochs: int = 10
    local_lr_min: float = 1e-5


def local_epoch_lr(round_lr: float, epoch: int, settings: TrainSettings) -> float:
    """The learning rate of local epoch ``epoch`` (0-based) in a round whose rate is
    ``round_lr``: constant, or the warm-restart cosine of the authors' CIFAR-100 recipe,
    ``eta_min + (round_lr - eta_min) * (1 + cos(pi * (epoch mod T_0) / T_0)) / 2``, which is
    what torch's ``CosineAnnealingWarmRestarts(T_0, eta_min)`` gives when it is stepped once
    per epoch and made afresh each round."""
    if settings.local_lr_schedule == "constant":
        return round_lr
    if settings.local_lr_schedule != "cosine_restarts":
        raise ValueError(f"unknown local_lr_schedule {settings.local_lr_schedule!r}")
    low, period = settings.local_lr_min, settings.local_restart_epochs
    return low + (round_lr - low) * (1.0 + math.cos(math.pi * (epoch % period) / period)) / 2


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    mean_loss: float
    steps: int


def client_generator(seed: int, round: int, client_id: int) -> torch.Generator:
    """An independent, reproducible RNG for one client in one round."""
    # Mix the three integers so that (seed, round, client) triples never share a stream.
    mixed = (seed * 1_000_003 + round) * 1_000_033 + client_id
    return torch.Generator().manual_seed(mixed % (2**63))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def iterate_batches(
    data: LocalData,
    batch_size: int,
    generator: torch.Generator,
    *,
    augment: bool,
    shuffle: bool = True,
    device: torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the client's data in a seeded order; augmentation runs per whole batch,
    on ``device`` (default: the CPU) with draws from the CPU ``generator``."""
    n = len(data)
    order = data.indices[torch.randperm(n, generator=generator)] if shuffle else data.indices
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        images, labels = data.images[idx], data.labels[idx]
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        if augment:
            images = random_crop_flip(images, generator)
        yield normalize(images, data.mean, data.std), labels


def local_train(
    model: nn.Module,
    data: LocalData,
    settings: TrainSettings,
    lr: float,
    generator: torch.Generator,
    mask: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Local SGD restricted to the mask.

    Gradients of masked-out weights are zeroed before the optimiser step, and the weights are
    re-masked after it, so neither momentum nor weight decay can revive a pruned weight. A fresh
    optimiser is made per call, as in FedAvg, so no momentum carries across rounds.
    """
    params = dict(model.named_parameters())
    device = model_device(model)
    # Layers kept whole (density 1, dense FedAvg) need no masking work at all.
    masked = [(params[n], m.to(device=params[n].device, dtype=params[n].dtype))
              for n, m in (mask or {}).items() if not bool(m.all())]
    masked_params = [p for p, _ in masked]
    masked_keep = [k for _, k in masked]
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    model.train()
    # Summed on the model's device in float64 (the same IEEE sums as Python floats), so a GPU
    # is not made to wait for the host after every step.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    steps, seen = 0, 0
    for epoch in range(settings.local_epochs):
        if epoch > 0 and settings.local_lr_schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = local_epoch_lr(lr, epoch, settings)
        for inputs, targets in iterate_batches(
            data, settings.batch_size, generator, augment=settings.augment, device=device
        ):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            if masked:
                torch._foreach_mul_([p.grad for p in masked_params], masked_keep)
            if settings.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
            optimizer.step()
            if masked:
                # SGD alone keeps them at zero (zero gradient, zero momentum, zero decay); the
                # re-mask is a cheap guard against any optimiser change that would not.
                with torch.no_grad():
                    torch._foreach_mul_(masked_params, masked_keep)
            total_loss += loss.detach().to(torch.float64) * targets.numel()
            seen += targets.numel()
            steps += 1
    mean_loss = float(total_loss) / seen if seen else math.nan
    return TrainResult(num_samples=len(data), mean_loss=mean_loss, steps=steps)


@torch.inference_mode()
def evaluate_samples(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness (bool) and cross-entropy of ``model`` on a uint8 image tensor
    (CPU tensors, whatever device the model is on).

    Per-sample results let one pass over the test set serve both the global accuracy and every
    client's personalised accuracy (a mean over that client's test indices).
    """
    model.eval()
    device = model_device(model)
    correct, losses = [], []
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append(logits.argmax(1) == y)
    return torch.cat(correct).cpu(), torch.cat(losses).cpu()


def compute_scores(
    model: nn.Module,
    data: LocalData,
    *,
    num_batches: int,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = False,
) -> dict[str, torch.Tensor]:
    """Saliency of each prunable weight on the first ``num_batches`` minibatches of a shuffled
    pass over this client's data, augmented (random crop and flip, as in training) or not.
    If the client has fewer samples than ``num_batches * batch_size``, its batches are the
    ones it has.
    """
    batches = iterate_batches(data, batch_size, generator, augment=augment,
                              device=model_device(model))
    chosen = (b for i, b in zip(range(num_batches), batches))
    return saliency_scores(model, chosen, prunable_parameter_names(model))


#: the largest finite value of the 16-bit score dtypes: a larger score is sent as this
#: (saturated), not as infinity, which the server's screening would refuse
_SATURATE = {"float16": float(torch.finfo(torch.float16).max),
             "bfloat16": float(torch.finfo(torch.bfloat16).max)}


def encode_scores(scores: Mapping[str, torch.Tensor], dtype: str = "float32",
                  top: int = 0) -> bytes:
    """A client's saliency scores (the layers in ``scores`` order) as its score payload."""
    return encode_score_vector(flatten(scores, list(scores)), dtype=dtype, top=top)


def encode_score_vector(flat: torch.Tensor, *, dtype: str = "float32", top: int = 0) -> bytes:
    """The score payload of one flat score vector (``[algorithm.ssfl]`` ``score_dtype`` and
    ``score_topk``, docs/lean_mask.md): with ``top`` 0 every score, one SCORES payload in
    ``dtype`` (float32: the paper's); with ``top`` > 0 only the client's ``top`` largest scores
    (``ssfl.masks.top_k``: ties by position) as their positions (``encode_positions``: a bitmap,
    or indices where fewer than 1 in 32 are sent) followed by their values in ``dtype``.
    float16 and bfloat16 saturate at their largest finite value."""
    flat = flat.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    if dtype in _SATURATE:
        flat = flat.clamp(max=_SATURATE[dtype])
    if top <= 0:
        return encode_values(flat, kind=PayloadKind.SCORES, dtype=dtype)
    keep = top_k(flat, top)
    return encode_positions(keep) + encode_values(flat[keep], kind=PayloadKind.SCORES,
                                                  dtype=dtype)


def train_round(
    model: nn.Module,
    layout: ParameterLayout,
    mask: Mask,
    digest: bytes,
    payload: bytes,
    data: LocalData,
    settings: TrainSettings,
    *,
    round: int,
    lr: float,
    generator: torch.Generator,
    value_dtype: str = "float32",
    timings: dict[str, float] | None = None,
) -> tuple[bytes, TrainResult]:
    """One client's part of a round: load the global values, train inside the mask, reply.

    ``timings``, if given, receives the seconds of each step: ``decode`` (payload into the
    model), ``train`` (local SGD) and ``encode`` (the reply payload)."""
    started = time.perf_counter()
    values = decode_values(
        payload, expected_count=layout.num_values, expected_digest=digest, expected_round=round
    )
    layout.scatter_model_(values, model)
    decoded = time.perf_counter()
    result = local_train(model, data, settings, lr, generator, mask)
    trained = time.perf_counter()
    reply = encode_values(
        layout.gather_model(model), round=round, digest=digest, dtype=value_dtype
    )
    if timings is not None:
        timings.update(decode=decoded - started, train=trained - decoded,
                       encode=time.perf_counter() - trained)
    return reply, result


def minibatch_gradient(
    model: nn.Module,
    data: LocalData,
    settings: TrainSettings,
    generator: torch.Generator,
    names: list[str],
) -> dict[str, torch.Tensor]:
    """Dense gradient of the loss on one minibatch of the client's data (``.grad`` untouched),
    as CPU tensors."""
    inputs, targets = next(iterate_batches(data, settings.batch_size, generator,
                                           augment=settings.augment, device=model_device(model)))
    params = dict(model.named_parameters())
    model.train()
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: g.detach().cpu() for n, g in zip(names, grads)}


def cpu_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named weights of ``model`` as CPU tensors (the very tensors when it is on the CPU)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu() for n in names}


@torch.no_grad()
def apply_regrowth_(model: nn.Module, new_mask: Mask, grown: Mapping[str, torch.Tensor]) -> None:
    """After a drop-and-regrow: regrown weights start at exactly zero, dropped weights leave."""
    params = dict(model.named_parameters())
    for n, keep in new_mask.items():
        params[n].view(-1)[grown[n].to(params[n].device)] = 0.0
        params[n].masked_fill_(~keep.to(params[n].device), 0.0)


def train_with_importance(
    model: nn.Module,
    data: LocalData,
    settings: TrainSettings,
    lr: float,
    generator: torch.Generator,
    mask: Mapping[str, torch.Tensor],
    names: list[str],
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """``local_train`` that also returns PruneFL's importance: the squared dense gradient of
    every weight in ``names`` (masked-out ones included), averaged over the local iterations.

    Gradient hooks see each minibatch's gradient before ``local_train`` masks it, so this costs
    no extra backward pass.
    """
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}

    def hook(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            sums[name].add_(grad.detach().to(torch.float64).square())
        return accumulate

    handles = [params[n].register_hook(hook(n)) for n in names]
    try:
        result = local_train(model, data, settings, lr, generator, mask)
    finally:
        for h in handles:
            h.remove()
    steps = max(result.steps, 1)
    return {n: (s / steps).to(device="cpu", dtype=torch.float32) for n, s in sums.items()}, result
