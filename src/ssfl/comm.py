"""What goes over the wire: the value layout of a masked model and the payload byte format.

After the mask round, server and clients share the mask, so a round's payload is just the active
values in an agreed order (``ParameterLayout``): no indices. Every byte count in ``ssfl`` is the
``len()`` of a payload produced here, never an estimate.

Payload format (little-endian), 28-byte header then the body:

    magic  b"SSFL"   4 bytes
    version          1 byte
    kind             1 byte   (PayloadKind)
    dtype            1 byte   (1 = float32, 2 = float16, 3 = packed bits, 4 = uint32 indices,
                              5 = bfloat16, 6 = log8: see below)
    reserved         1 byte   (0)
    round            4 bytes  (unsigned)
    count            8 bytes  (number of values or indices, or of bits for a mask)
    mask digest      8 bytes  (blake2b of the mask bitmap; zeros where no mask applies)

The body is ``count`` items of the dtype (packed bits: ``ceil(count / 8)`` bytes), except for
log8, whose body starts with two float32 (``LOG8``: the log of its smallest positive value and
the log step) followed by one uint8 code per value: code 0 is exactly 0, code c >= 1 is
``exp(log_min + (c - 1) * step)``. bfloat16 and log8 carry the mask round's saliency scores
(``[algorithm.ssfl] score_dtype``; docs/lean_mask.md); training payloads use ``VALUE_DTYPES``.
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
_BF16_CODE = 5  # bfloat16: the upper half of a float32 (round to nearest even), uint16 LE
_LOG8_CODE = 6  # 8-bit log-scale codes of non-negative values (see the module docstring)
#: every dtype a value payload can carry: name -> header code. The training payloads use
#: ``VALUE_DTYPES`` (``comm.value_dtype``); a score payload may use any of these
PAYLOAD_DTYPES: dict[str, int] = {
    **{name: code for name, (code, _) in VALUE_DTYPES.items()},
    "bfloat16": _BF16_CODE,
    "log8": _LOG8_CODE,
}
#: bytes per item of each dtype code; packed bits (code 3) are counted per bit, not here, and
#: a log8 body has its ``LOG8`` parameters before the codes
ITEM_SIZES = {1: 4, 2: 2, _INDEX_CODE: 4, _BF16_CODE: 2, _LOG8_CODE: 1}
_CODE_TO_DTYPE = {code: dt for code, dt in VALUE_DTYPES.values()}
_CODE_TO_NAME = {code: name for name, code in PAYLOAD_DTYPES.items()}
#: a log8 body's parameters: log of the smallest positive value, log step (float32 LE)
LOG8 = struct.Struct("<ff")
#: the largest finite float32: a decoded log8 value above it is refused
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
    if dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"unknown value dtype {dtype!r}; choose one of {sorted(PAYLOAD_DTYPES)}")
    flat = values.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    if dtype in VALUE_DTYPES:
        code, np_dtype = VALUE_DTYPES[dtype]
        body = flat.numpy().astype(np_dtype, copy=False).tobytes()
    elif dtype == "bfloat16":
        code = _BF16_CODE
        body = flat.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        code = _LOG8_CODE
        body = encode_log8(flat.numpy())
    header = HEADER.pack(MAGIC, VERSION, int(kind), code, 0, round, flat.numel(), digest)
    return header + body


def encode_log8(values: np.ndarray) -> bytes:
    """A log8 body: ``LOG8`` parameters, then one uint8 code per value (``ValueError`` unless
    every value is finite and >= 0).

    0 is code 0, exactly; the positive values are spread over codes 1..255 evenly in log space
    between the smallest and the largest, rounded to the nearest code. The map is monotone
    (a larger value never gets a smaller code), and a value in that range comes back within a
    factor ``exp(step / 2)`` of itself, ``step = log(max / min) / 254``."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not bool(np.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError("log8 encodes finite values >= 0 only")
    positive = x > 0
    codes = np.zeros(x.size, dtype=np.uint8)
    low, step = np.float32(0.0), np.float32(0.0)
    if bool(positive.any()):
        logs = np.log(x[positive])
        low = np.float32(logs.min())
        # Both parameters are float32 on the wire: choose them so that every code decodes to a
        # finite float32 (a value near the float32 maximum must not come back as infinity).
        while np.exp(float(low)) > _FLOAT32_MAX:
            low = np.nextafter(low, np.float32(-np.inf))
        step = np.float32(max(float(logs.max()) - float(low), 0.0) / 254)
        while step > 0 and np.exp(float(low) + 254 * float(step)) > _FLOAT32_MAX:
            step = np.nextafter(step, np.float32(0))
        offset = (np.rint((logs - float(low)) / float(step)) if step > 0
                  else np.zeros(logs.size))
        codes[positive] = (1 + np.clip(offset, 0, 254)).astype(np.uint8)
    return LOG8.pack(float(low), float(step)) + codes.tobytes()


def decode_log8(body: bytes, count: int) -> np.ndarray:
    """The float32 values of a log8 body of ``count`` codes; ``PayloadError`` for parameters
    that are not finite, a negative step, or a code that decodes beyond float32."""
    low, step = LOG8.unpack_from(body)
    if not (np.isfinite(low) and np.isfinite(step)) or step < 0:
        raise PayloadError(f"log8 parameters must be finite with a step >= 0, got log_min "
                           f"{low}, step {step}")
    codes = np.frombuffer(body, dtype=np.uint8, offset=LOG8.size, count=count)
    table = np.concatenate([[0.0], np.exp(low + np.arange(255, dtype=np.float64) * step)])
    values = table[codes]
    if values.size and float(values.max()) > _FLOAT32_MAX:
        raise PayloadError("log8 codes decode beyond the largest float32")
    return values.astype(np.float32)


def body_size(dtype_code: int, count: int) -> int:
    """Bytes of a payload body of ``count`` items of ``dtype_code`` (any code not known as an
    item type counts as packed bits, as the MASK payload's)."""
    if dtype_code == _LOG8_CODE:
        return LOG8.size + count
    itemsize = ITEM_SIZES.get(dtype_code)  # None: packed bits
    return (count + 7) // 8 if itemsize is None else count * itemsize


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


def positions_form(total: int, kept: int) -> str:
    """How a sparse payload says which ``kept`` of ``total`` entries it holds: ``"bitmap"``
    (1 bit per entry) or ``"indices"`` (4 bytes per kept entry), whichever body is smaller;
    the bitmap on a tie. Depends on the counts alone, so the receiver knows what to expect."""
    return "indices" if 4 * kept < (total + 7) // 8 else "bitmap"


def positions_size(total: int, kept: int) -> int:
    """Bytes of ``encode_positions`` for ``kept`` of ``total`` entries (header included)."""
    form = positions_form(total, kept)
    return HEADER.size + (4 * kept if form == "indices" else (total + 7) // 8)


def encode_positions(keep: torch.Tensor, *, round: int = 0, digest: bytes = NO_DIGEST) -> bytes:
    """The kept entries of a flat bool tensor as a MASK bitmap or an INDICES payload, whichever
    is smaller (``positions_form``)."""
    flat = keep.detach().reshape(-1).to(device="cpu", dtype=torch.bool)
    if positions_form(flat.numel(), int(flat.sum())) == "indices":
        return encode_indices(flat.nonzero().squeeze(1), round=round, digest=digest)
    return encode_bits(np.packbits(flat.numpy()).tobytes(), flat.numel(), round=round,
                       digest=digest)


def decode_positions(payload: bytes, *, total: int, kept: int) -> torch.Tensor:
    """A flat bool tensor of ``total`` entries from ``encode_positions``: the form the counts
    call for (``positions_form``), exactly ``kept`` entries set; ``PayloadError`` otherwise."""
    header = read_header(payload)
    form = positions_form(total, kept)
    if form == "indices":
        if header.kind != PayloadKind.INDICES:
            raise PayloadError(f"expected the positions as INDICES ({kept} of {total}), got "
                               f"{header.kind.name}")
        keep = torch.zeros(total, dtype=torch.bool)
        keep[decode_indices(payload, expected_count=kept, bound=total)] = True
        return keep
    if header.kind != PayloadKind.MASK:
        raise PayloadError(f"expected the positions as a MASK bitmap ({kept} of {total}), got "
                           f"{header.kind.name}")
    bits = np.frombuffer(decode_bits(payload, expected_count=total), dtype=np.uint8)
    keep = torch.from_numpy(np.unpackbits(bits, count=total).astype(bool))
    count = int(keep.sum())
    if count != kept:
        raise PayloadError(f"bitmap keeps {count} entries, expected {kept}")
    return keep


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
    if header.dtype_code not in _CODE_TO_NAME:
        raise PayloadError(f"unknown value dtype code {header.dtype_code}")
    if expected_dtype is not None and header.dtype_code != PAYLOAD_DTYPES[expected_dtype]:
        got = _CODE_TO_NAME[header.dtype_code]
        raise PayloadError(f"payload values are {got}, expected {expected_dtype}")
    if expected_count is not None and header.count != expected_count:
        raise PayloadError(f"payload has {header.count} values, expected {expected_count}")
    if expected_digest is not None and header.digest != expected_digest:
        raise PayloadError("payload was made for a different mask (mask digest differs)")
    if expected_round is not None and header.round != expected_round:
        raise PayloadError(f"payload is for round {header.round}, expected {expected_round}")
    size = len(payload) - HEADER.size
    if size != body_size(header.dtype_code, header.count):
        extra = f" after {LOG8.size} bytes of log8 parameters" \
            if header.dtype_code == _LOG8_CODE else ""
        raise PayloadError(
            f"payload body has {size} bytes, header says {header.count} values "
            f"of {ITEM_SIZES[header.dtype_code]} bytes{extra}"
        )
    if header.dtype_code in _CODE_TO_DTYPE:
        body = np.frombuffer(payload, dtype=_CODE_TO_DTYPE[header.dtype_code],
                             offset=HEADER.size, count=header.count)
        values = torch.from_numpy(body.astype(np.float32))
    elif header.dtype_code == _BF16_CODE:
        raw = np.frombuffer(payload, dtype="<u2", offset=HEADER.size, count=header.count)
        values = torch.from_numpy((raw.astype("<u4") << 16).view("<f4").astype(np.float32))
    else:
        values = torch.from_numpy(decode_log8(bytes(payload[HEADER.size:]), header.count))
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
        size = HEADER.size + body_size(header.dtype_code, header.count)
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
    "decode_positions",
    "decode_values",
    "encode_positions",
    "payload_parts",
    "positions_size",
    "encode_bits",
    "encode_indices",
    "encode_values",
    "read_header",
]
