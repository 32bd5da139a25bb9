"""Batch-level image augmentation on whole uint8 tensors.

Images stay ``uint8 [B, C, H, W]`` until the last moment (4x less memory traffic than
float) and every op works on the whole batch with tensor indexing, never a Python loop
over images, so it runs at the same speed on CPU and GPU.  Randomness comes only from
the explicit ``torch.Generator`` so runs are reproducible.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize", "random_crop_flip"]


def _check_batch(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4:
        raise ValueError(f"{what}: expected a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{what}: expected uint8 images (0..255), got {images.dtype}")


def normalize(images_uint8: torch.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32 ``[B, C, H, W]``.

    ``mean``/``std`` are in [0, 1] units (the published data set constants).
    """
    _check_batch(images_uint8, "normalize")
    channels = images_uint8.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize: {channels} channels but {len(mean)} means and "
                         f"{len(std)} stds")
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize: std must be positive, got {tuple(std)}")
    dev = images_uint8.device
    # (x/255 - m)/s == x * (1/(255 s)) - m/s: one float copy and two in-place passes instead
    # of three temporaries; this runs on every training batch.
    scale = torch.tensor([1.0 / (255.0 * v) for v in std], dtype=torch.float32,
                         device=dev).view(1, channels, 1, 1)
    shift = torch.tensor([m / v for m, v in zip(mean, std)], dtype=torch.float32,
                         device=dev).view(1, channels, 1, 1)
    return images_uint8.to(torch.float32).mul_(scale).sub_(shift)


def random_crop_flip(images_uint8: torch.Tensor, generator: torch.Generator,
                     padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Zero-pad by ``padding``, crop a random ``H x W`` window per image, random h-flip.

    The standard CIFAR augmentation (``RandomCrop(32, padding=4)`` +
    ``RandomHorizontalFlip``), vectorised: per-image row/column source indices are built
    from random offsets and gathered with one advanced-indexing call.  Random numbers
    are drawn on the generator's device (CPU generators for CPU tensors) in the fixed
    order: row offsets, column offsets, flips.
    """
    _check_batch(images_uint8, "random_crop_flip")
    if padding < 0:
        raise ValueError(f"random_crop_flip: padding must be >= 0, got {padding}")
    b, c, h, w = images_uint8.shape
    dev = images_uint8.device
    gdev = generator.device
    off_y = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(dev)
    off_x = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(dev)
    rows = off_y[:, None] + torch.arange(h, device=dev)  # [B, H] rows in padded image
    cols = off_x[:, None] + torch.arange(w, device=dev)  # [B, W]
    if flip:
        do_flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(dev)
        cols = torch.where(do_flip[:, None], cols.flip(1), cols)
    padded = F.pad(images_uint8, (padding, padding, padding, padding)) if padding else images_uint8
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]].contiguous()
