"""Pieces that several methods share, each named once: averaging rules, masks on the wire,
and dense models in server state.

Server side: ``WeightedMean`` (FedAvg's running sum), ``average_over_holders`` (each weight
averaged over the clients whose mask holds it: per-client masks, FedDST, DisPFL), and the
screening of the clients' saliency scores (``decode_scores``; ``robust.combine_scores``
combines them).
Both sides: ``MaskCodec`` turns a mask into its bitmap payload and back (checking the digest)
and caches the value layout of each mask it has seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ssfl.comm import (
    HEADER,
    PAYLOAD_DTYPES,
    ParameterLayout,
    PayloadError,
    PayloadKind,
    body_size,
    decode_bits,
    decode_positions,
    decode_values,
    encode_bits,
    payload_parts,
    positions_size,
    read_header,
)
from ssfl.masks import Mask, bits_to_mask, mask_digest, mask_to_bits

#: how the server weighs the clients' saliency scores: by sample count (the paper) or equally
#: (the authors' code)
SCORE_AGGREGATIONS = ("weighted", "uniform")
#: how a client's saliency scores may travel (``[algorithm.ssfl] score_dtype``): float32 (the
#: paper), float16, bfloat16, log8 (8-bit log-scale codes; ``ssfl.comm.encode_log8``)
SCORE_DTYPES = tuple(PAYLOAD_DTYPES)
#: ``saliency_augment``: score batches augmented as training batches are, or not
SALIENCY_AUGMENTS = ("train", "off")
#: how a saliency mask shares k among the layers: "global" (one top-k over all layers, the
#: paper) or "erk" (each layer its ERK share, ranked by score within it)
LAYER_BUDGETS = ("global", "erk")


class WeightedMean:
    """Running weighted mean of equally-shaped tensors, summed in float64 (so the mean of
    identical updates is exactly that update); one running sum instead of every client's
    contribution, as fedjax's FedAvg keeps."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._total_weight = 0.0
        self.count = 0

    def add(self, value: torch.Tensor, weight: float = 1.0) -> None:
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weights must be positive and finite, got {weight}")
        value = value.to(torch.float64)
        if self._sum is None:
            self._sum = value * weight
        else:
            if value.shape != self._sum.shape:
                raise ValueError(f"shape {tuple(value.shape)} != {tuple(self._sum.shape)}")
            self._sum.add_(value, alpha=weight)
        self._total_weight += weight
        self.count += 1

    def result(self) -> torch.Tensor:
        if self._sum is None:
            raise ValueError("WeightedMean has no values")
        return (self._sum / self._total_weight).to(torch.float32)


def average_over_holders(
    contributions: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float]],
    shapes: Mapping[str, torch.Size],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Average each weight over the contributions whose mask holds it.

    ``contributions`` yields ``(dense tensors, mask, weight)``; parameters without a mask entry
    (biases, norms) are held by everyone. Returns the averages (0 where nobody holds the weight)
    and, per masked parameter, the summed weight of its holders (0: nobody held it).
    """
    sums = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    held: dict[str, torch.Tensor] = {}
    total = 0.0
    for dense, mask, weight in contributions:
        total += weight
        for n in shapes:
            sums[n] += dense[n].to(torch.float64) * weight
            if n in mask:
                held.setdefault(n, torch.zeros(shapes[n], dtype=torch.float64))
                held[n] += mask[n].to(torch.float64) * weight
    if total <= 0:  # nothing held anywhere: the caller decides (a failed round)
        return {n: torch.zeros(s) for n, s in shapes.items()}, {}
    averages = {}
    for n in shapes:
        if n in held:
            averages[n] = torch.where(held[n] > 0, sums[n] / held[n].clamp(min=1e-300),
                                      torch.zeros_like(sums[n])).to(torch.float32)
        else:
            averages[n] = (sums[n] / total).to(torch.float32)
    return averages, held


def check_mode(mode: str) -> None:
    if mode not in SCORE_AGGREGATIONS:
        raise ValueError(f"score aggregation must be one of {SCORE_AGGREGATIONS}, got {mode!r}")


def score_payload_size(count: int, dtype: str = "float32", top: int = 0) -> int:
    """The exact size of a score payload (``ssfl.client.encode_score_vector``): ``count``
    scores in ``dtype``, or (``top`` > 0) the positions of ``top`` of them plus their values."""
    code = PAYLOAD_DTYPES[dtype]
    if top <= 0:
        return HEADER.size + body_size(code, count)
    return positions_size(count, top) + HEADER.size + body_size(code, top)


def decode_scores(payload: bytes, count: int, *, dtype: str | None = None,
                  top: int = 0) -> torch.Tensor:
    """A client's saliency scores as one dense vector of ``count``: finite values, none
    negative (they are ``|dL/dw * w|``); ``PayloadError`` otherwise.

    ``dtype``: the values must be of that dtype (None: any). ``top`` > 0: the payload holds only
    the client's ``top`` largest scores (``ssfl.client.encode_score_vector``): exactly
    ``score_payload_size`` bytes, the positions of exactly ``top`` weights in the form the
    counts call for, then ``top`` values; every score it does not send is 0."""
    if top <= 0:
        scores = decode_values(payload, expected_kind=PayloadKind.SCORES, expected_count=count,
                               expected_dtype=dtype, require_finite=True)
        sent = scores
    else:
        if dtype is not None:
            expected = score_payload_size(count, dtype, top)
            if len(payload) != expected:
                raise PayloadError(f"score payload of {len(payload)} bytes; the top {top} of "
                                   f"{count} scores in {dtype} take {expected} bytes")
        parts = payload_parts(payload)
        if len(parts) != 2:
            raise PayloadError(f"expected positions and values (2 payloads), got {len(parts)}")
        keep = decode_positions(parts[0], total=count, kept=top)
        sent = decode_values(parts[1], expected_kind=PayloadKind.SCORES, expected_count=top,
                             expected_dtype=dtype, require_finite=True)
        scores = torch.zeros(count, dtype=torch.float32)
        scores[keep] = sent
    negative = int((sent < 0).sum())
    if negative:
        raise PayloadError(f"saliency scores are |dL/dw * w| >= 0, but {negative} are negative")
    return scores


class MaskCodec:
    """A model's masks as bitmap payloads, both ways, with a cache of the value layout of each
    mask seen (decoding a bitmap and indexing its active weights is the costly part; the cache
    is a speed-up, never state)."""

    def __init__(self, shapes: Mapping[str, torch.Size], prunable: Sequence[str],
                 cache_size: int = 8) -> None:
        self.shapes = dict(shapes)
        self.prunable = list(prunable)
        self.prunable_shapes = {n: self.shapes[n] for n in self.prunable}
        self.count = sum(math.prod(s) for s in self.prunable_shapes.values())
        self.cache_size = cache_size
        self._cache: dict[bytes, ParameterLayout] = {}

    def digest(self, mask: Mask) -> bytes:
        return mask_digest(mask, self.prunable)

    def encode(self, mask: Mask, round: int = 0) -> bytes:
        """The MASK payload of ``mask`` (its digest in the header)."""
        return encode_bits(mask_to_bits(mask, self.prunable), self.count, round=round,
                           digest=self.digest(mask))

    def decode(self, payload: bytes) -> tuple[Mask, bytes]:
        """Mask and digest of a MASK payload; ``PayloadError`` if its bitmap has the wrong
        size or does not match the digest in its header."""
        bits = decode_bits(payload, expected_count=self.count)
        mask = bits_to_mask(bits, self.prunable_shapes, self.prunable)
        digest = self.digest(mask)
        if read_header(payload).digest != digest:
            raise PayloadError("mask payload's digest does not match its bitmap")
        self._remember(digest, mask)
        return mask, digest

    def layout(self, mask: Mask, digest: bytes | None = None) -> ParameterLayout:
        """The value layout of ``mask`` (from the cache when this mask was seen)."""
        digest = digest if digest is not None else self.digest(mask)
        return self._remember(digest, mask)

    def _remember(self, digest: bytes, mask: Mask) -> ParameterLayout:
        # A layout holds index tensors computed from the mask, never the mask itself.
        entry = self._cache.pop(digest, None) or ParameterLayout(self.shapes, mask)
        self._cache[digest] = entry  # most recent last
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        return entry


def load_weights_(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy dense tensors into the model's parameters (on whatever device it is)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])


def flat_weights(weights: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """A dense model as one flat vector, in ``names`` order."""
    return torch.cat([weights[n].reshape(-1) for n in names])


def bytes_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor (for checkpoints, which hold tensors only)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.numpy().tobytes())


def dense_copy(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float32 copy of a dense model (server state must not alias the caller's tensors)."""
    return {n: t.detach().clone().to(torch.float32) for n, t in weights.items()}


def shapes_match(weights: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> bool:
    return {n: w.shape for n, w in weights.items()} == dict(shapes)
