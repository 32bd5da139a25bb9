"""Server side of SSFL and its static-mask baselines: mask construction and sparse FedAvg.

``SparseFedAvgServer`` holds the explicit server state (global values, mask, round) and turns
client payloads into the next global model. The simulator and the Flower ServerApp drive the same
object; they differ only in how payloads reach the clients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ssfl.comm import (
    HEADER,
    VALUE_DTYPES,
    ParameterLayout,
    PayloadError,
    PayloadKind,
    decode_values,
    encode_bits,
    encode_values,
)
from ssfl.masks import (
    Mask,
    WeightedMean,
    erk_densities,
    full_mask,
    global_topk_mask,
    mask_digest,
    mask_to_bits,
    random_global_mask,
    random_layerwise_mask,
    topk_count,
    unflatten,
)

logger = logging.getLogger(__name__)

ALGORITHMS: dict[str, str] = {
    "ssfl": "SSFL: mask from federated SNIP saliency scores of all clients, global top-k",
    "fedavg": "dense FedAvg (density 1, no mask round)",
    "random": "FedAvg inside a random global mask of the same density (static)",
    "random_erk": "FedAvg inside a random mask with ERK layer densities (static)",
    "snip_oracle": "SNIP on the pooled data of all clients (not federated: a mask-quality "
    "upper bound), global top-k",
    "snip_single": "SNIP on a single client's data (client 0), global top-k",
    "random_clientwise": "FedAvg where each client trains in its own random mask (static); "
    "each weight is averaged over the clients holding it",
    "feddst": "FedDST: ERK magnitude mask, clients drop/regrow every R rounds (dynamic)",
    "prunefl": "PruneFL: pruned on client 0, top-k by squared gradients every R rounds (dynamic)",
    "sparsyfed": "SparsyFed: Powerprop local training, clients upload their top-k weights, "
    "FedAvg (dynamic)",
    "dispfl": "DisPFL: personalised ERK masks, decentralised neighbour averaging, per-client "
    "drop/regrow (personal models)",
}
SCORE_AGGREGATIONS = ("weighted", "uniform")

# Collects score payloads from the given clients: yields (client id, payload, client sample
# count) for each client that answered. The simulator computes them in process; the Flower
# server sends query messages.
ScoreCollector = Callable[[Sequence[int]], Iterable[tuple[int, bytes, int]]]


def needs_scores(algorithm: str, density: float) -> bool:
    return algorithm in ("ssfl", "snip_single", "snip_oracle") and density < 1.0


@dataclass(frozen=True)
class MaskRound:
    """The outcome of the mask round: the mask and what finding it cost."""

    mask: Mask
    score_upload_bytes: int
    scored_clients: list[int]


def find_mask(
    algorithm: str,
    prunable_shapes: Mapping[str, torch.Size],
    density: float,
    *,
    num_clients: int,
    seed: int,
    score_aggregation: str = "weighted",
    collect_scores: ScoreCollector | None = None,
    pooled_scores: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> MaskRound:
    """Run the mask round of ``algorithm``: ask the clients for scores where it needs them,
    aggregate, and build the mask. The mask is built from the clients that answered (recorded
    in ``scored_clients``); score bytes are the lengths of the payloads received."""
    scored: list[int] = []
    nbytes = 0
    scores: Mapping[str, torch.Tensor] | None = None

    def counted(payloads: Iterable[tuple[int, bytes, int]]) -> Iterable[tuple[bytes, int]]:
        nonlocal nbytes
        for client_id, payload, n in payloads:
            nbytes += len(payload)
            scored.append(client_id)
            yield payload, n

    if needs_scores(algorithm, density):
        if algorithm == "snip_oracle":
            if pooled_scores is None:
                raise ValueError("snip_oracle needs the pooled data, which only the simulator has")
            scores = pooled_scores()
        else:
            if collect_scores is None:
                raise ValueError(f"{algorithm} needs a way to collect client scores")
            asked = list(range(num_clients)) if algorithm == "ssfl" else [0]
            scores = aggregate_scores(counted(collect_scores(asked)), prunable_shapes,
                                      mode=score_aggregation)
    mask = build_mask(algorithm, prunable_shapes, density, scores=scores, seed=seed)
    return MaskRound(mask=mask, score_upload_bytes=nbytes, scored_clients=scored)


def aggregate_scores(
    payloads: Iterable[tuple[bytes, int]],
    shapes: Mapping[str, torch.Size],
    *,
    mode: str,
) -> dict[str, torch.Tensor]:
    """Mean of the clients' saliency scores: weighted by sample count, or uniform.

    ``payloads`` yields ``(score payload, client sample count)``; the mean is kept as a running
    sum, so memory does not grow with the number of clients.
    """
    if mode not in SCORE_AGGREGATIONS:
        raise ValueError(f"score aggregation must be one of {SCORE_AGGREGATIONS}, got {mode!r}")
    names = list(shapes)
    count = sum(math.prod(s) for s in shapes.values())
    mean = WeightedMean()
    for payload, num_samples in payloads:
        scores = decode_values(payload, expected_kind=PayloadKind.SCORES, expected_count=count,
                               require_finite=True)
        mean.add(scores, float(num_samples) if mode == "weighted" else 1.0)
    if mean.count == 0:
        raise RoundFailed(0, 0, 1, [])
    return unflatten(mean.result(), shapes, names)


def build_mask(
    algorithm: str,
    prunable_shapes: Mapping[str, torch.Size],
    density: float,
    *,
    scores: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Mask:
    if algorithm not in ALGORITHMS or algorithm == "random_clientwise":
        raise ValueError(f"no global mask for algorithm {algorithm!r}; global-mask algorithms: "
                         f"{sorted(set(ALGORITHMS) - {'random_clientwise'})}")
    if density >= 1.0 or algorithm == "fedavg":
        return full_mask(prunable_shapes)
    if algorithm == "random":
        return random_global_mask(prunable_shapes, density, torch.Generator().manual_seed(seed))
    if algorithm == "random_erk":
        total = topk_count(density, sum(math.prod(s) for s in prunable_shapes.values()))
        return random_layerwise_mask(prunable_shapes, erk_densities(prunable_shapes, density),
                                     total, torch.Generator().manual_seed(seed))
    if scores is None:
        raise ValueError(f"{algorithm} needs the aggregated saliency scores to build its mask")
    return global_topk_mask(scores, density)


@dataclass(frozen=True)
class Rejection:
    """A client update the server refused, and why (logged and recorded in the metrics)."""

    client_id: int
    reason: str


@dataclass(frozen=True)
class RoundUpdate:
    """What the server learnt from one round's replies."""

    num_clients: int
    num_samples: int
    bytes_up: int
    rejected: tuple[Rejection, ...] = ()


def check_sample_count(num_samples: object) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PayloadError(f"sample count must be a positive integer, got {num_samples!r}")
    return num_samples


def screen_replies(
    round: int,
    replies: Iterable[tuple[int, bytes, int]],
    check: Callable[[int, bytes, int], object],
    rejected: list[Rejection],
) -> Iterable[tuple[int, object, int]]:
    """Yield ``(client id, check(...), sample count)`` for each reply that passes ``check``; a
    reply that fails (``PayloadError``) is logged with its reason, appended to ``rejected``
    and skipped, so one bad client never stops the round."""
    for client_id, payload, num_samples in replies:
        try:
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
            checked = check(client_id, payload, check_sample_count(num_samples))
        except PayloadError as exc:
            rejected.append(Rejection(client_id, str(exc)))
            logger.warning("round %d: rejected update of client %d: %s", round, client_id, exc)
            continue
        yield client_id, checked, num_samples


class RoundFailed(RuntimeError):
    """Too few valid replies to aggregate a round; the global model was left unchanged."""

    def __init__(self, round: int, valid: int, required: int,
                 rejected: Sequence[Rejection]) -> None:
        reasons = "; ".join(f"client {r.client_id}: {r.reason}" for r in rejected)
        super().__init__(
            f"round {round}: {valid} valid replies, at least {required} required"
            + (f" (rejected: {reasons})" if reasons else "")
        )
        self.round, self.valid, self.required = round, valid, required
        self.rejected = tuple(rejected)
        self.run_dir: object = None  # set by the engine: where the last checkpoint is


class SparseFedAvgServer:
    """FedAvg over the active values of a fixed mask.

    State: ``values`` (the global model as a flat vector of active values in layout order), the
    ``mask``, and ``round`` (rounds completed).
    """

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: list[str],
        mask: Mask,
        *,
        value_dtype: str = "float32",
        update_clip_norm: float = 0.0,
    ) -> None:
        self.shapes = {n: t.shape for n, t in initial.items()}
        self.prunable = prunable
        self.mask = mask
        self.update_clip_norm = update_clip_norm  # 0: no clipping
        self.layout = ParameterLayout(self.shapes, mask)
        self.digest = mask_digest(mask, prunable)
        self.value_dtype = value_dtype
        # Gathering through the layout drops masked-out initial weights: the global model starts
        # inside the mask.
        self.values = self.layout.gather(initial)
        self.round = 0

    def mask_payload(self) -> bytes:
        """The mask as a bitmap payload, sent to each client once."""
        bits = mask_to_bits(self.mask, self.prunable)
        count = sum(self.mask[n].numel() for n in self.prunable)
        return encode_bits(bits, count, digest=self.digest)

    def broadcast(self, round: int) -> bytes:
        """The payload every client sampled in ``round`` receives: the active global values."""
        return encode_values(self.values, round=round, digest=self.digest, dtype=self.value_dtype)

    def aggregate(self, round: int, replies: Iterable[tuple[bytes, int]], *,
                  min_replies: int = 1) -> RoundUpdate:
        """FedAvg of ``(payload, sample count)`` replies; see ``aggregate_from``."""
        return self.aggregate_from(
            round, ((i, p, n) for i, (p, n) in enumerate(replies)), min_replies=min_replies
        )

    def check_update(self, round: int, payload: bytes, num_samples: object) -> torch.Tensor:
        """Decode one client update, or raise PayloadError saying what is wrong with it.

        A valid update has exactly the expected size, the server's dtype, this round and this
        mask, only finite values, and a positive integer sample count.
        """
        expected_size = HEADER.size + self.layout.num_values * VALUE_DTYPES[self.value_dtype][
            1].itemsize
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > expected_size:
            raise PayloadError(f"payload of {len(payload)} bytes is over the limit of "
                               f"{expected_size} bytes")
        check_sample_count(num_samples)
        return decode_values(
            payload, expected_count=self.layout.num_values, expected_digest=self.digest,
            expected_round=round, expected_dtype=self.value_dtype, require_finite=True,
        )

    def aggregate_from(self, round: int, replies: Iterable[tuple[int, bytes, int]], *,
                       min_replies: int = 1) -> RoundUpdate:
        """FedAvg weighted by sample count over the valid replies' active values.

        Each reply is checked first (``check_update``); a bad one is rejected with its reason
        and the round goes on without it. With fewer than ``min_replies`` valid replies the
        round raises ``RoundFailed`` and the global model stays as it was. With
        ``update_clip_norm`` set, each client's change to the global model is clipped to that
        L2 norm before averaging (robust aggregation). The average of vectors laid out on the
        same mask is itself on the mask: inactive weights have no slot in the vector.
        """
        mean = WeightedMean()
        samples, nbytes = 0, 0
        rejected: list[Rejection] = []
        sizes: dict[int, int] = {}

        def check(client_id: int, payload: bytes, num_samples: int) -> torch.Tensor:
            sizes[client_id] = len(payload)
            return self.check_update(round, payload, num_samples)

        for client_id, values, num_samples in screen_replies(round, replies, check, rejected):
            assert isinstance(values, torch.Tensor)
            payload_size = sizes[client_id]
            if self.update_clip_norm > 0:
                delta = values - self.values
                norm = float(delta.norm())
                if norm > self.update_clip_norm:
                    values = self.values + delta * (self.update_clip_norm / norm)
            mean.add(values, float(num_samples))
            samples += num_samples
            nbytes += payload_size
        if mean.count < min_replies:
            raise RoundFailed(round, mean.count, min_replies, rejected)
        self.values = mean.result()
        self.round = round
        return RoundUpdate(num_clients=mean.count, num_samples=samples, bytes_up=nbytes,
                           rejected=tuple(rejected))

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The global model as full tensors (inactive weights are zero)."""
        return self.layout.dense_tensors(self.values)
