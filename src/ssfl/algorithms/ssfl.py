"""SSFL (Ohib et al., TMLR; arXiv 2405.09037): one sparse subnetwork found before training.

Read top to bottom, this file is the whole method:

1. **Mask round** (``SSFL.run_setup``): every client scores each Conv/Linear weight of the same
   seeded initial model on its own data, SNIP-style ``|dL/dw * w|`` on
   the first ``saliency_batches`` minibatches of a shuffled pass (``client_setup("scores")``,
   ``ssfl.client.compute_scores``: cropped and flipped as training batches are, the model in
   eval mode, both as in the authors' code; ``saliency_augment = "off"`` scores the images
   as they are); the server averages the scores, weighted by sample count or uniformly as
   the authors' code does (``ssfl.algorithms.robust.combine_scores``; by default a client
   whose scores sum to more than twice the median client's is scaled down to that first,
   which no honest client measured here reached; ``score_rule = "mean"`` is the paper's plain
   mean), and keeps the global top-k for the target density (``ssfl.masks.global_topk_mask``,
   exact k, ties by position). The mask bitmap goes to every client once
   (``client_setup("mask")`` keeps it as the client's state).
2. **Sparse FedAvg in the fixed mask** (``FixedMaskFedAvg``): each round the sampled clients
   receive the active values only, in the agreed order of ``ParameterLayout`` (no indices),
   train inside the mask (``ssfl.client.train_round``: masked SGD) and return their active
   values; the server averages them weighted by sample count (``federation.aggregator =
   "mean"``, the paper's; the default "auto" clips each change to twice the round's median
   change norm and averages the updates multi-Krum selects: ``ssfl.algorithms.robust``).
   Biases and normalisation parameters are dense. With ``[privacy]`` the average is DP-FedAvg
   over the values instead (``ssfl.privacy``: each change clipped by the server or by the
   client, an unweighted mean, Gaussian noise; docs/privacy.md).

The static baselines of the paper's comparison (dense FedAvg, random masks, SNIP on one client
or on pooled data) differ only in how the mask is found: ``ssfl.algorithms.static``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ssfl.algorithms.base import (
    Algorithm,
    Ask,
    ClientContext,
    ClientOutput,
    Reply,
    Setup,
    SetupReply,
)
from ssfl.algorithms.common import (
    LAYER_BUDGETS,
    SALIENCY_AUGMENTS,
    SCORE_AGGREGATIONS,
    SCORE_DTYPES,
    MaskCodec,
    check_mode,
    decode_scores,
    load_weights_,
)
from ssfl.algorithms.robust import (
    SCORE_CLIP,
    SCORE_RULES,
    after_refusals,
    combine,
    combine_scores,
    score_bound,
    score_total,
)
from ssfl.client import compute_scores, encode_scores, train_round
from ssfl.comm import HEADER, VALUE_DTYPES, PayloadError, decode_values, encode_values
from ssfl.masks import (
    Mask,
    erk_topk_mask,
    full_mask,
    global_topk_mask,
    mask_density,
    topk_count,
    unflatten,
)
from ssfl.privacy import check_clipped, clip_reply, private_mean, wire_values

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FixedMaskState:
    """The server state of FedAvg in one fixed mask: the mask, the global model as its active
    values (layout order), the rounds completed and who scored in the mask round."""

    mask: Mask
    values: torch.Tensor
    round: int = 0
    scored: tuple[int, ...] = ()


class FixedMaskFedAvg(Algorithm[FixedMaskState]):
    """FedAvg over the active values of one mask fixed before round 1; subclasses choose the
    mask in ``run_setup`` (the default: dense, no set-up)."""

    robust_aggregation = True
    trusted_reference = True

    def __init__(self, setup: Setup, settings: Any) -> None:
        super().__init__(setup, settings)
        self.codec = MaskCodec(setup.shapes, setup.prunable)
        self.robust = setup.config.federation  # clipping and the aggregation rule

    # ---- server -----------------------------------------------------------------------------
    def init(self) -> FixedMaskState:
        return self.with_mask(full_mask(self.setup.prunable_shapes))

    def with_mask(self, mask: Mask, scored: Iterable[int] = ()) -> FixedMaskState:
        """The state at round 0 for ``mask``: the initial weights inside it."""
        return FixedMaskState(mask, self.codec.layout(mask).gather(self.setup.initial),
                              scored=tuple(scored))

    def deliver_mask(self, state: FixedMaskState, ask: Ask, label: str) -> None:
        """Send every client the mask bitmap once (a dense model needs none)."""
        if mask_density(state.mask) < 1.0:
            payload = self.codec.encode(state.mask)
            ask.deliver("mask", {c: payload for c in range(self.setup.num_clients)},
                        label=label)

    def trusted_client_state(self, state: FixedMaskState) -> bytes | None:
        """What a client holds after the set-up phase (the mask bitmap; dense: nothing), for
        the server's own client step under ``fltrust``."""
        return self.codec.encode(state.mask) if mask_density(state.mask) < 1.0 else None

    def resync(self, state: FixedMaskState, ask: Ask) -> FixedMaskState:
        self.deliver_mask(state, ask, label="resync_mask")
        return state

    def setup_record(self, state: FixedMaskState) -> dict[str, Any]:
        return {"scored_clients": list(state.scored)}  # for mask.json

    def configure(self, state: FixedMaskState, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        # Every client gets the same payload: the active global values.
        payload = encode_values(state.values, round=round, digest=self.codec.digest(state.mask),
                                dtype=self.setup.value_dtype)
        return {c: payload for c in clients}

    def check(self, state: FixedMaskState, round: int, client_id: int,
              payload: bytes) -> torch.Tensor:
        """The client's active values: exactly the expected size (nothing larger is decoded),
        the server's dtype, this round and mask, only finite values."""
        count = state.values.numel()
        expected = HEADER.size + count * VALUE_DTYPES[self.setup.value_dtype][1].itemsize
        if len(payload) > expected:
            raise PayloadError(f"payload of {len(payload)} bytes is over the limit of "
                               f"{expected} bytes")
        values = decode_values(payload, expected_count=count,
                               expected_digest=self.codec.digest(state.mask),
                               expected_round=round, expected_dtype=self.setup.value_dtype,
                               require_finite=True)
        privacy = self.setup.config.privacy
        if privacy.mode == "client":  # the clients promise to clip: verified here
            check_clipped(values, wire_values(state.values, self.setup.value_dtype),
                          privacy.clip_norm, self.setup.value_dtype)
        return values

    def aggregate(self, state: FixedMaskState, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = (),
                  trusted: Reply | None = None) -> tuple[FixedMaskState, dict[str, Any]]:
        """Weighted by sample count, or by the robust rule of ``federation.aggregator``; any
        mean of vectors on one mask stays on the mask. With ``[privacy]``: DP-FedAvg over the
        values (``ssfl.privacy.private_mean``: clipped changes, unweighted, Gaussian noise).
        ``trusted``: the server's own update on its clean sample (``fltrust``)."""
        if self.setup.config.privacy.mode != "none":
            return self.private_aggregate(state, round, replies)
        clipped: list[int] = []
        left_out: list[int] = []
        ratios: list[float | None] = []
        repeats: list[int] = []
        trust: list[float] = []
        values = combine([r.update for r in replies], [r.num_samples for r in replies],
                         state.values, after_refusals(self.robust, len(refused)), clipped,
                         left_out, ratios, repeats,
                         trusted=trusted.update if trusted is not None else None, trust=trust)
        # Whose changes the clipping scaled back, whose multi-Krum left out and how far those
        # stood out, and whose update copied another's (the metrics row's diagnostics): what
        # the default costs an honest run, and whom it stopped.
        info: dict[str, Any] = {key: [replies[i].client_id for i in positions]
                                for key, positions in (("clipped", clipped),
                                                       ("left_out", left_out),
                                                       ("repeats", repeats)) if positions}
        if ratios:
            info["krum_ratio"] = ratios
        if trust:
            info["trust"] = trust
        return replace(state, values=values, round=round), info

    def private_aggregate(self, state: FixedMaskState, round: int, replies: Sequence[Reply]
                          ) -> tuple[FixedMaskState, dict[str, Any]]:
        """Each change from the values as the clients received them clipped to
        ``privacy.clip_norm`` (mode ``client``: already clipped by the clients, so this changes
        at most the wire's last bits), summed, divided by ``clients_per_round``, noised."""
        privacy, config = self.setup.config.privacy, self.setup.config
        values, info = private_mean(
            [r.update for r in replies], wire_values(state.values, self.setup.value_dtype),
            clip_norm=privacy.clip_norm, noise_multiplier=privacy.noise_multiplier,
            clients_per_round=config.federation.clients_per_round,
            seed=self.setup.seed if privacy.noise_seed == "run" else None, round=round)
        if privacy.mode == "client":
            info.pop("clipped")  # the clients clipped; the server's count is rounding only
        return replace(state, values=values, round=round), {"privacy": info}

    def eval_weights(self, state: FixedMaskState, client: int | None = None) -> dict[str, Any]:
        return self.codec.layout(state.mask).dense_tensors(state.values)

    def global_mask(self, state: FixedMaskState) -> Mask:
        return state.mask

    def final_values(self, state: FixedMaskState) -> torch.Tensor:
        return state.values

    def state_dict(self, state: FixedMaskState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {"values": state.values, **{f"mask.{n}": m for n, m in state.mask.items()}}
        return {"round": state.round, "scored": list(state.scored)}, tensors

    def load_state(self, meta: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> FixedMaskState:
        mask = {n: tensors[f"mask.{n}"] for n in self.setup.prunable if f"mask.{n}" in tensors}
        if mask.keys() != set(self.setup.prunable) or any(
                m.shape != self.setup.shapes[n] or m.dtype != torch.bool for n, m in mask.items()):
            raise ValueError("the checkpoint's mask does not fit this model")
        if tensors["values"].numel() != self.codec.layout(mask).num_values:
            raise ValueError("the checkpoint's values do not fit this model and mask")
        return FixedMaskState(mask, tensors["values"].clone(), int(meta["round"]),
                              tuple(int(c) for c in meta.get("scored", ())))

    # ---- client -----------------------------------------------------------------------------
    def client_setup(self, kind: str, ctx: ClientContext, received: bytes,
                     state: bytes | None) -> ClientOutput:
        if kind != "mask":
            return super().client_setup(kind, ctx, received, state)
        self.codec.decode(received)  # checked, then kept: later rounds carry only values
        return ClientOutput(b"", received)

    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        # The mask the client holds: the bitmap it was sent, or none (dense FedAvg).
        mask = self.codec.decode(state)[0] if state else full_mask(self.setup.prunable_shapes)
        digest = self.codec.digest(mask)
        reply, result = train_round(ctx.model, self.codec.layout(mask, digest), mask, digest,
                                    received, ctx.data, ctx.settings, round=ctx.round, lr=ctx.lr,
                                    generator=ctx.generator, value_dtype=self.setup.value_dtype,
                                    timings=ctx.timings)
        privacy = self.setup.config.privacy
        if privacy.mode == "client":  # clip the change before it leaves the client
            reply = clip_reply(reply, received, privacy.clip_norm, round=ctx.round,
                               digest=digest, dtype=self.setup.value_dtype)
        return ClientOutput(reply, state, result)


@dataclass(frozen=True)
class SaliencySettings:
    """``[algorithm.ssfl]`` (and the SNIP baselines' tables)."""

    # "weighted" by client sample count (the paper), or "uniform" (the authors' code)
    score_aggregation: str = "weighted"
    # how the scores are combined: "clipped" (the default: the paper's mean, with any client
    # whose scores sum to more than twice the median client's scaled down to that), "mean"
    # (the paper), or another rule that bounds what one hostile client can do to the mask:
    # "normalised" (each client's scores sum to 1 first), "trimmed_mean"
    # (federation.trim_fraction from each end, unweighted), "median"
    score_rule: str = "clipped"
    saliency_batches: int = 1  # minibatches per client for the scores
    saliency_batch_size: int = 0  # their size; 0: train.batch_size
    # "train": the scored batches are augmented as the training batches are (train.augment),
    # as the authors score the first batch of their shuffled, cropped and flipped training
    # loader; "off": unaugmented images (what this project did before it had this key)
    saliency_augment: str = "train"
    # how the k kept weights are shared among the layers: "global" (the paper: one top-k of the
    # scores over all layers, so the scores also decide each layer's share) or "erk" (each
    # layer keeps its Erdos-Renyi-Kernel share, as the random ERK baseline, and the scores
    # choose which weights within it): a diagnostic of whether a layer bottleneck, not the
    # choice of weights, costs accuracy at low density (docs/benchmarks.md)
    layer_budget: str = "global"
    # 0: the paper (a filter may lose every weight, an input channel feed none); n > 0: every
    # output unit (a Conv filter, a Linear row) keeps, and every input channel feeds, at least
    # its n highest-scoring weights, the rest of the k going by layer_budget's rule: a
    # diagnostic of whether the units a saliency mask cuts off at low density cost accuracy
    # (docs/benchmarks.md)
    min_per_unit: int = 0
    # how each client's scores travel in the mask round (docs/lean_mask.md; the defaults of
    # these four keys are the paper's): "float32", "float16", "bfloat16" or "log8" (8-bit
    # log-scale codes)
    score_dtype: str = "float32"
    # 0: every score; m > 0: each client sends only its own top ceil(m * k) scores (k: the
    # weights the mask keeps) as their positions and values; the server counts the rest as 0
    score_topk: float = 0.0
    # only a sample seeded by run.seed scores: ceil(score_fraction x num_clients) clients
    # (every client still gets the mask); 1.0: every client
    score_fraction: float = 1.0
    # or exactly this many clients score (not with score_fraction); 0: score_fraction decides
    score_count: int = 0

    def __post_init__(self) -> None:
        if self.score_aggregation not in SCORE_AGGREGATIONS:
            raise ValueError(f"score_aggregation = {self.score_aggregation!r} is not allowed; "
                             f"choose one of {list(SCORE_AGGREGATIONS)}")
        if self.score_rule not in SCORE_RULES:
            raise ValueError(f"score_rule = {self.score_rule!r} is not allowed; choose one of "
                             f"{list(SCORE_RULES)}")
        if self.saliency_batches < 1:
            raise ValueError(f"saliency_batches must be at least 1, not {self.saliency_batches}")
        if self.saliency_batch_size < 0:
            raise ValueError("saliency_batch_size must be >= 0 (0: the training batch size)")
        if self.saliency_augment not in SALIENCY_AUGMENTS:
            raise ValueError(f"saliency_augment = {self.saliency_augment!r} is not allowed; "
                             f"choose one of {list(SALIENCY_AUGMENTS)}")
        if self.layer_budget not in LAYER_BUDGETS:
            raise ValueError(f"layer_budget = {self.layer_budget!r} is not allowed; choose one "
                             f"of {list(LAYER_BUDGETS)}")
        if self.min_per_unit < 0:
            raise ValueError(f"min_per_unit must be >= 0 (0: the paper's mask), not "
                             f"{self.min_per_unit}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype = {self.score_dtype!r} is not allowed; choose one "
                             f"of {list(SCORE_DTYPES)}")
        if not (math.isfinite(self.score_topk) and self.score_topk >= 0):
            raise ValueError(f"score_topk must be 0 (every score) or a multiple m > 0 of the "
                             f"kept count k, not {self.score_topk}")
        if not 0.0 < self.score_fraction <= 1.0:
            raise ValueError(f"score_fraction must be in (0, 1], not {self.score_fraction}")
        if self.score_count < 0:
            raise ValueError(f"score_count must be >= 0 (0: score_fraction decides), not "
                             f"{self.score_count}")
        if self.score_count > 0 and self.score_fraction < 1.0:
            raise ValueError("set score_fraction or score_count, not both")

    @property
    def samples_clients(self) -> bool:
        """Only some clients score (``score_fraction`` or ``score_count``)."""
        return self.score_count > 0 or self.score_fraction < 1.0

    @property
    def is_lean(self) -> bool:
        """Any setting of the lean mask round differs from the paper's."""
        return self.score_dtype != "float32" or self.score_topk > 0 or self.samples_clients


class SaliencyMask(FixedMaskFedAvg):
    """A fixed mask from SNIP saliency scores (the client side of scoring)."""

    Settings = SaliencySettings
    #: the last mask round's score sum per client, under ``score_rule = "clipped"``
    score_totals: dict[int, float] = {}

    @classmethod
    def check_config(cls, config: Any, settings: Any) -> None:
        from ssfl.config import ConfigError

        super().check_config(config, settings)
        clients = config.federation.num_clients
        if settings.score_count > clients:
            raise ConfigError(f"algorithm.{config.algorithm.name}.score_count = "
                              f"{settings.score_count} is more than the {clients} clients")

    def score_top(self) -> int:
        """How many scores each client sends: 0 for all of them (``score_topk`` 0), else
        ``ceil(score_topk x k)`` (at most every weight), k the weights the mask keeps."""
        m = self.settings.score_topk
        if m <= 0:
            return 0
        count = self.setup.prunable_count
        return min(count, max(1, math.ceil(m * topk_count(self.setup.density, count))))

    def scoring_clients(self) -> list[int]:
        """The clients asked for scores: every client (the paper), or a sample seeded by
        ``run.seed`` alone (``ssfl.run.experiment.sample_clients`` for round 0, the set-up
        phase), of ``score_count`` clients or ``ceil(score_fraction x num_clients)``."""
        n, s = self.setup.num_clients, self.settings
        if not s.samples_clients:
            return list(range(n))
        from ssfl.run.experiment import sample_clients  # the one seeded client sample

        size = s.score_count or math.ceil(s.score_fraction * n - 1e-9)
        return sample_clients(self.setup.seed, 0, n, min(n, max(1, size)))

    def client_setup(self, kind: str, ctx: ClientContext, received: bytes,
                     state: bytes | None) -> ClientOutput:
        if kind not in ("scores", "pooled_scores"):
            return super().client_setup(kind, ctx, received, state)
        s = self.settings
        batches = s.saliency_batches
        if kind == "pooled_scores":  # as many samples as the federated round, from all data
            batches *= self.setup.num_clients
        load_weights_(ctx.model, self.setup.initial)  # the seeded model, whatever it held
        scores = compute_scores(ctx.model, ctx.data, num_batches=batches,
                                batch_size=s.saliency_batch_size or ctx.settings.batch_size,
                                generator=ctx.generator,
                                augment=s.saliency_augment == "train" and ctx.settings.augment)
        return ClientOutput(encode_scores(scores, s.score_dtype, self.score_top()), state)

    def scores_to_mask(self, replies: Sequence[SetupReply], mode: str) -> tuple[Mask, list[int]]:
        """The global top-k of the aggregated scores (or, with ``layer_budget = "erk"``, the
        top of each layer's ERK share; with ``min_per_unit``, every unit's best first), and
        the clients whose scores it used (a malformed score payload is logged and left out, as
        a bad update in a round is)."""
        check_mode(mode)
        count, used = self.setup.prunable_count, []
        dtype, top = self.settings.score_dtype, self.score_top()

        def decoded(chosen: Sequence[SetupReply]) -> Iterable[tuple[torch.Tensor, float]]:
            for r in chosen:
                try:
                    scores = decode_scores(r.payload, count, dtype=dtype, top=top)
                except PayloadError as exc:
                    logger.warning("mask round: rejected the scores of client %d: %s",
                                   r.client_id, exc)
                    continue
                used.append(r.client_id)
                yield scores, float(r.num_samples) if mode == "weighted" else 1.0

        rule, totals = self.settings.score_rule, []
        if rule == "clipped":
            # Every client's total first (one decoded payload at a time, as the mean holds
            # them), so the bound is known before any client's scores are added.
            totals = [score_total(scores) for scores, _ in decoded(replies)]
            valid = set(used)
            # kept for whoever wants to see how near honest clients come to the bound
            # (benchmarks/robustness.py score-totals)
            self.score_totals = dict(zip(used, totals))
            bound = score_bound(totals) if totals else 0.0
            scaled = [c for c, t in zip(used, totals) if t > bound]
            if scaled:
                logger.warning("mask round: the scores of client(s) %s sum to more than %g "
                               "times the median client's; scaled down to that", scaled,
                               SCORE_CLIP)
            replies = [r for r in replies if r.client_id in valid]
            used.clear()
        flat = combine_scores(decoded(replies), count, rule=rule, totals=totals,
                              trim_fraction=self.setup.config.federation.trim_fraction)
        if top:
            # Scores nobody sent are 0: if fewer than k weights have a positive score, the
            # rest of the mask is chosen by position (the top-k's tie rule).
            positive, k = int((flat > 0).sum()), topk_count(self.setup.density, count)
            if positive < k:
                logger.warning("mask round: only %d weights have a positive combined score "
                               "(score_topk = %g, rule %s); the other %d of the %d kept are "
                               "the earliest by position", positive, self.settings.score_topk,
                               self.settings.score_rule, k - positive, k)
        scores = unflatten(flat, self.setup.prunable_shapes, self.setup.prunable)
        choose = erk_topk_mask if self.settings.layer_budget == "erk" else global_topk_mask
        return choose(scores, self.setup.density, per_unit=self.settings.min_per_unit), used


class SSFL(SaliencyMask):
    """SSFL: federated SNIP scores of all clients, global top-k, sparse FedAvg in that mask."""

    def run_setup(self, state: FixedMaskState, ask: Ask) -> FixedMaskState:
        if self.setup.density >= 1.0:
            return state  # nothing to prune: dense FedAvg
        clients = self.scoring_clients()  # every client, or a seeded sample of them
        replies = ask.query("scores", {c: b"" for c in clients}, label="score_upload")
        mask, scored = self.scores_to_mask(replies, self.settings.score_aggregation)
        state = self.with_mask(mask, scored=scored)
        self.deliver_mask(state, ask, label="mask_broadcast")
        return state
