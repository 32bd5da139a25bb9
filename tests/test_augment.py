"""Batch augmentation: shapes, determinism, exact window semantics, normalisation."""

from __future__ import annotations

import pytest
import torch

from ssfl.data import normalize, random_crop_flip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_dtypes() -> None:
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    y = random_crop_flip(x, _gen(0))
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.is_contiguous()
    z = normalize(y, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert z.shape == x.shape and z.dtype == torch.float32


def test_deterministic_given_seed() -> None:
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    a = random_crop_flip(x, _gen(7))
    b = random_crop_flip(x, _gen(7))
    c = random_crop_flip(x, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_identity_without_padding_and_flip() -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, _gen(0), padding=0, flip=False), x)


def test_outputs_are_windows_of_padded_image() -> None:
    """Every output is one of the (2p+1)^2 windows of the zero-padded image, maybe flipped."""
    p = 2
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)  # distinct, nonzero pixels
    padded = torch.nn.functional.pad(img, (p, p, p, p))[0, 0]
    windows = {}
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            win = padded[dy:dy + 4, dx:dx + 4]
            windows[(dy, dx, False)] = win
            windows[(dy, dx, True)] = win.flip(1)
    batch = img.expand(400, 1, 4, 4).contiguous()
    out = random_crop_flip(batch, _gen(0), padding=p, flip=True)
    seen = set()
    for o in out[:, 0]:
        matches = [key for key, win in windows.items() if torch.equal(o, win)]
        assert matches, f"output is not a window of the padded image:\n{o}"
        seen.update(matches)
    # 400 draws over 50 equally likely outcomes: all offsets and both flips occur.
    assert {(dy, dx) for dy, dx, _ in seen} == {(a, b) for a in range(5) for b in range(5)}
    assert {f for _, _, f in seen} == {False, True}

    no_flip = random_crop_flip(batch, _gen(1), padding=p, flip=False)
    for o in no_flip[:, 0]:
        assert any(torch.equal(o, windows[(dy, dx, False)])
                   for dy in range(5) for dx in range(5))


def test_flip_only_flips_horizontally() -> None:
    x = torch.randint(0, 256, (200, 2, 5, 6), dtype=torch.uint8)
    y = random_crop_flip(x, _gen(3), padding=0, flip=True)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(y, x)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(y, x)])
    assert torch.all(flipped | same) and flipped.any() and same.any()


def test_normalize_matches_formula() -> None:
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    got = normalize(x, mean, std)
    for c in range(3):
        expected = (x[:, c].double() / 255.0 - mean[c]) / std[c]
        torch.testing.assert_close(got[:, c].double(), expected, atol=1e-5, rtol=1e-5)


def test_input_validation() -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="channels"):
        normalize(x, (0.5,), (0.5,))
    with pytest.raises(TypeError, match="uint8"):
        random_crop_flip(x.float(), _gen(0))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_crop_flip(x[0], _gen(0))
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(x, _gen(0), padding=-1)
