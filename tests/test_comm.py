"""Payload format and value layout: round trips, exact sizes, and refusal of bad payloads."""

from __future__ import annotations

import pytest
import torch

from ssfl.comm import (
    HEADER,
    ParameterLayout,
    PayloadError,
    PayloadKind,
    decode_bits,
    decode_values,
    encode_bits,
    encode_values,
)
from ssfl.masks import global_topk_mask, prunable_parameter_names
from ssfl.models import SmallCNN


def test_header_is_28_bytes_and_body_is_exactly_the_values() -> None:
    values = torch.tensor([1.0, -2.5, 3.25])
    payload = encode_values(values, round=7)
    assert HEADER.size == 28
    assert len(payload) == 28 + 3 * 4
    assert len(encode_values(values, dtype="float16")) == 28 + 3 * 2
    torch.testing.assert_close(decode_values(payload, expected_round=7), values)


def test_float16_round_trip_loses_only_precision() -> None:
    values = torch.tensor([1.0, 0.333333, -1000.5])
    back = decode_values(encode_values(values, dtype="float16"))
    torch.testing.assert_close(back, values, rtol=1e-3, atol=0)


def test_decoder_rejects_malformed_payloads() -> None:
    good = encode_values(torch.ones(4), round=3, digest=b"abcdefgh")
    with pytest.raises(PayloadError, match="shorter than the header"):
        decode_values(good[:10])
    with pytest.raises(PayloadError, match="magic"):
        decode_values(b"XXXX" + good[4:])
    with pytest.raises(PayloadError, match="body has"):
        decode_values(good[:-1])
    with pytest.raises(PayloadError, match="expected 5"):
        decode_values(good, expected_count=5)
    with pytest.raises(PayloadError, match="different mask"):
        decode_values(good, expected_digest=b"12345678")
    with pytest.raises(PayloadError, match="round 3"):
        decode_values(good, expected_round=4)
    with pytest.raises(PayloadError, match="SCORES"):
        decode_values(good, expected_kind=PayloadKind.SCORES)
    with pytest.raises(PayloadError, match="bytes"):
        decode_values("not bytes")  # type: ignore[arg-type]


def test_bits_payload_round_trip() -> None:
    payload = encode_bits(b"\xa0\x80", 9)
    assert len(payload) == 28 + 2
    assert decode_bits(payload, expected_count=9) == b"\xa0\x80"
    with pytest.raises(PayloadError):
        decode_bits(payload, expected_count=17)


def test_layout_orders_values_and_skips_only_masked_weights() -> None:
    shapes = {"w": torch.Size([2, 3]), "b": torch.Size([2])}
    mask = {"w": torch.tensor([[True, False, True], [False, False, True]])}
    layout = ParameterLayout(shapes, mask)
    params = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([10.0, 11.0])}
    assert layout.num_values == 5
    assert layout.gather(params).tolist() == [0.0, 2.0, 5.0, 10.0, 11.0]
    target = {"w": torch.full((2, 3), 9.0), "b": torch.zeros(2)}
    layout.scatter_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), target)
    assert target["w"].tolist() == [[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]
    assert target["b"].tolist() == [4.0, 5.0]


def test_layout_round_trip_on_a_real_model_and_size_matches_density() -> None:
    model = SmallCNN(10)
    names = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    mask = global_topk_mask({n: params[n].detach().abs() for n in names}, 0.1)
    layout = ParameterLayout.for_model(model, mask)
    prunable = sum(params[n].numel() for n in names)
    other = sum(p.numel() for n, p in params.items() if n not in names)
    assert layout.num_values == round(0.1 * prunable) + other
    values = layout.gather_model(model)
    clone = SmallCNN(10)
    layout.scatter_model_(values, clone)
    for name, p in clone.named_parameters():
        expected = params[name].detach() * mask[name] if name in mask else params[name].detach()
        assert torch.equal(p.detach(), expected)
    payload = encode_values(values)
    assert len(payload) == HEADER.size + 4 * layout.num_values
    torch.testing.assert_close(decode_values(payload, expected_count=layout.num_values), values)


def test_layout_rejects_mismatched_masks() -> None:
    with pytest.raises(ValueError, match="does not have"):
        ParameterLayout({"w": torch.Size([2])}, {"v": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        ParameterLayout({"w": torch.Size([2])}, {"w": torch.ones(3, dtype=torch.bool)})
