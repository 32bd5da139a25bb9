"""What goes over the wire: the value layout of a masked model and the payload byte format.

After the mask round, server and clients share the mask, so a round's payload is just the active
values in an agreed order (``ParameterLayout``): no indices. Every byte count in ``ssfl`` is the
``len()`` of a payload produced here, never an estimate.

Payload format (little-endian), 28-byte header then the body:

    magic  b"SSFL"   4 bytes
    version          1 byte
    kind             1 byte   (PayloadKind)
    dtype            1 byte   (1 = float32, 2 = float16, 3 = packed bits, 4 = uint32 indices)
    reserved         1 byte   (0)
    round            4 bytes  (unsigned)
    count            8 bytes  (number of values or indices, or of bits for a mask)
    mask digest      8 bytes  (blake2b of the mask bitmap; zeros where no mask applies)
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HEADER = struct.Struct("<4sBBBBIQ8s")
MAGIC = b"SSFL"
VERSION = 1
NO_DIGEST = bytes(8)


class PayloadKind(enum.IntEnum):
    VALUES = 1  # model values inside the mask (both directions, every round)
    SCORES = 2  # a client's saliency scores (mask round, upload)
    MASK = 3  # the mask bitmap (mask round, broadcast)
    INDICES = 4  # positions of kept weights, ascending (a sparse upload's alternative to a bitmap)


VALUE_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (1, np.dtype("<f4")),
    "float16": (2, np.dtype("<f2")),
}
_BITS_CODE = 3
_INDEX_CODE = 4  # uint32 little-endian
#: bytes per item of each dtype code; packed bits (code 3) are counted per bit, not here
ITEM_SIZES = {1: 4, 2: 2, _INDEX_CODE: 4}
_CODE_TO_DTYPE = {code: dt for code, dt in VALUE_DTYPES.values()}


class PayloadError(ValueError):
    """A payload that cannot be decoded or does not match what the receiver expects."""


@dataclass(frozen=True)
class PayloadHeader:
    kind: PayloadKind
    dtype_code: int
    round: int
    count: int
    digest: bytes


def encode_values(
    values: torch.Tensor,
    *,
    kind: PayloadKind = PayloadKind.VALUES,
    round: int = 0,
    digest: bytes = NO_DIGEST,
    dtype: str = "float32",
) -> bytes:
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown value dtype {dtype!r}; choose one of {sorted(VALUE_DTYPES)}")
    code, np_dtype = VALUE_DTYPES[dtype]
    body = values.detach().reshape(-1).to(device="cpu", dtype=torch.float32).numpy().astype(
        np_dtype, copy=False)
    header = HEADER.pack(MAGIC, VERSION, int(kind), code, 0, round, body.size, digest)
    return header + body.tobytes()


def encode_bits(bits: bytes, count: int, *, round: int = 0, digest: bytes = NO_DIGEST) -> bytes:
    header = HEADER.pack(MAGIC, VERSION, int(PayloadKind.MASK), _BITS_CODE, 0, round, count, digest)
    return header + bits


def encode_indices(indices: torch.Tensor, *, round: int = 0,
                   digest: bytes = NO_DIGEST) -> bytes:
    """Strictly increasing flat positions as uint32: the cheaper way to say which weights a
    sparse payload holds when fewer than 1 in 32 are kept (a bitmap costs 1 bit per weight)."""
    flat = indices.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= 2**32
                         or not bool((flat[1:] > flat[:-1]).all())):
        raise ValueError("indices must be strictly increasing and fit in uint32")
    body = flat.numpy().astype("<u4")
    header = HEADER.pack(MAGIC, VERSION, int(PayloadKind.INDICES), _INDEX_CODE, 0, round,
                         body.size, digest)
    return header + body.tobytes()


def decode_indices(payload: bytes, *, expected_count: int, bound: int) -> torch.Tensor:
    """Decode an INDICES payload, checking its count, its length, that the positions are
    strictly increasing and that each is below ``bound`` (the number of weights)."""
    header = read_header(payload)
    if header.kind != PayloadKind.INDICES or header.dtype_code != _INDEX_CODE:
        raise PayloadError(f"expected an INDICES payload, got {header.kind.name}")
    if header.count != expected_count:
        raise PayloadError(f"payload has {header.count} indices, expected {expected_count}")
    if len(payload) - HEADER.size != header.count * 4:
        raise PayloadError("indices payload length does not match its count")
    body = np.frombuffer(payload, dtype="<u4", offset=HEADER.size, count=header.count)
    indices = torch.from_numpy(body.astype(np.int64))
    if indices.numel() and (int(indices[-1]) >= bound
                            or not bool((indices[1:] > indices[:-1]).all())):
        raise PayloadError(f"indices must be strictly increasing and below {bound}")
    return indices


def read_header(payload: bytes) -> PayloadHeader:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) < HEADER.size:
        raise PayloadError(f"payload of {len(payload)} bytes is shorter than the header")
    magic, version, kind, code, _reserved, rnd, count, digest = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise PayloadError("payload does not start with the SSFL magic bytes")
    if version != VERSION:
        raise PayloadError(f"payload version {version} is not supported (expected {VERSION})")
    try:
        kind = PayloadKind(kind)
    except ValueError:
        raise PayloadError(f"unknown payload kind {kind}") from None
    return PayloadHeader(kind, code, rnd, count, digest)


def decode_values(
    payload: bytes,
    *,
    expected_kind: PayloadKind = PayloadKind.VALUES,
    expected_count: int | None = None,
    expected_digest: bytes | None = None,
    expected_round: int | None = None,
    expected_dtype: str | None = None,
    require_finite: bool = False,
) -> torch.Tensor:
    """Decode a value payload into a float32 tensor, checking every header field it is given
    (and, with ``require_finite``, that no value is NaN or infinite)."""
    header = read_header(payload)
    if header.kind != expected_kind:
        raise PayloadError(f"expected a {expected_kind.name} payload, got {header.kind.name}")
    if header.dtype_code not in _CODE_TO_DTYPE:
        raise PayloadError(f"unknown value dtype code {header.dtype_code}")
    if expected_dtype is not None and header.dtype_code != VALUE_DTYPES[expected_dtype][0]:
        got = next(name for name, (code, _) in VALUE_DTYPES.items()
                   if code == header.dtype_code)
        raise PayloadError(f"payload values are {got}, expected {expected_dtype}")
    np_dtype = _CODE_TO_DTYPE[header.dtype_code]
    if expected_count is not None and header.count != expected_count:
        raise PayloadError(f"payload has {header.count} values, expected {expected_count}")
    if expected_digest is not None and header.digest != expected_digest:
        raise PayloadError("payload was made for a different mask (mask digest differs)")
    if expected_round is not None and header.round != expected_round:
        raise PayloadError(f"payload is for round {header.round}, expected {expected_round}")
    body_size = len(payload) - HEADER.size
    if body_size != header.count * np_dtype.itemsize:
        raise PayloadError(
            f"payload body has {body_size} bytes, header says {header.count} values "
            f"of {np_dtype.itemsize} bytes"
        )
    body = np.frombuffer(payload, dtype=np_dtype, offset=HEADER.size, count=header.count)
    values = torch.from_numpy(body.astype(np.float32))
    if require_finite and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise PayloadError(f"payload has {bad} NaN or infinite values")
    return values


def decode_bits(payload: bytes, *, expected_count: int) -> bytes:
    header = read_header(payload)
    if header.kind != PayloadKind.MASK or header.dtype_code != _BITS_CODE:
        raise PayloadError(f"expected a MASK payload, got {header.kind.name}")
    if header.count != expected_count:
        raise PayloadError(f"mask has {header.count} bits, expected {expected_count}")
    if len(payload) - HEADER.size != (expected_count + 7) // 8:
        raise PayloadError("mask payload length does not match its bit count")
    return bytes(payload[HEADER.size :])


def payload_parts(payload: bytes) -> list[bytes]:
    """Split a bundle of concatenated payloads (each starts with its own header)."""
    parts, offset = [], 0
    while offset < len(payload):
        header = read_header(payload[offset:])
        itemsize = ITEM_SIZES.get(header.dtype_code)  # None: packed bits
        size = HEADER.size + ((header.count + 7) // 8 if itemsize is None
                              else header.count * itemsize)
        if offset + size > len(payload):
            raise PayloadError("bundle ends inside a payload")
        parts.append(payload[offset : offset + size])
        offset += size
    return parts


class ParameterLayout:
    """The order in which a masked model's values are laid out in a payload.

    Parameters come in ``named_parameters`` order; a masked weight contributes only its active
    entries (row-major), any other parameter (bias, normalisation) all of its entries.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], mask: Mapping[str, torch.Tensor]) -> None:
        unknown = set(mask) - set(shapes)
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {sorted(unknown)}")
        self.names: list[str] = list(shapes)
        self.shapes = dict(shapes)
        self.active: dict[str, torch.Tensor | None] = {}
        for name in self.names:
            if name in mask:
                if mask[name].shape != shapes[name]:
                    raise ValueError(f"mask for {name} has shape {tuple(mask[name].shape)}")
                # A fully kept layer is laid out like a dense one: copies, not index ops.
                keep = mask[name].reshape(-1)
                self.active[name] = None if bool(keep.all()) else keep.nonzero().squeeze(1)
            else:
                self.active[name] = None
        self.sizes = [
            idx.numel() if idx is not None else shapes[n].numel()
            for n, idx in self.active.items()
        ]
        self.num_values = sum(self.sizes)

    @classmethod
    def for_model(cls, model: nn.Module, mask: Mapping[str, torch.Tensor]) -> ParameterLayout:
        return cls({n: p.shape for n, p in model.named_parameters()}, mask)

    def gather(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name in self.names:
            flat = params[name].detach().reshape(-1)
            idx = self.active[name]
            parts.append(flat if idx is None else flat[idx])
        return torch.cat(parts).to(device="cpu", dtype=torch.float32)  # payloads are CPU

    def gather_model(self, model: nn.Module) -> torch.Tensor:
        return self.gather(dict(model.named_parameters()))

    @torch.no_grad()
    def scatter_(self, values: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
        """Write ``values`` into ``params`` in place; inactive entries become exactly zero."""
        if values.numel() != self.num_values:
            raise ValueError(f"expected {self.num_values} values, got {values.numel()}")
        for name, chunk in zip(self.names, torch.split(values, self.sizes)):
            target = params[name]
            idx = self.active[name]
            if idx is None:
                target.copy_(chunk.reshape(target.shape))
            else:
                # Build the dense tensor first: copy_ then works whatever the target's strides.
                dense = torch.zeros(target.numel(), dtype=target.dtype)
                dense[idx] = chunk.to(target.dtype)
                target.copy_(dense.view(target.shape))

    def scatter_model_(self, values: torch.Tensor, model: nn.Module) -> None:
        self.scatter_(values, dict(model.named_parameters()))

    def dense_tensors(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {n: torch.zeros(s) for n, s in self.shapes.items()}
        self.scatter_(values, out)
        return out


__all__: Sequence[str] = [
    "HEADER",
    "NO_DIGEST",
    "ParameterLayout",
    "PayloadError",
    "PayloadKind",
    "decode_bits",
    "decode_indices",
    "decode_values",
    "payload_parts",
    "encode_bits",
    "encode_indices",
    "encode_values",
    "read_header",
]
