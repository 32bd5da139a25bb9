"""DisPFL (Dai et al., ICML 2022): decentralised personalised FL with personal sparse masks.

Paper: "DisPFL: Towards Communication-Efficient Personalized Federated Learning via
Decentralized Sparse Training"; authors' code: github.com/rong-dai/DisPFL
(``fedml_api/standalone/DisPFL/dispfl_api.py``, ``client.py``, ``my_model_trainer.py``).

Every client ``k`` keeps its own mask ``m_k`` (exact ERK layer counts of the target density,
for the whole run) and its own sparse model ``w_k``. In a round, each *active* client:

1. aggregates from its neighbours, itself included: each masked weight is the plain
   (unweighted) average over the neighbours whose mask holds it, then masked by ``m_k``;
   dense parameters (biases, norms) are averaged over all neighbours (``neighbour_average``);
2. trains inside ``m_k`` (``ssfl.client.local_train``: masked SGD, a fresh optimiser);
3. updates its mask (``update_mask``): per layer, drops the ``ceil(r * active)`` active weights
   of smallest magnitude and regrows as many by the largest dense-gradient magnitude on one
   local minibatch, with ``r = anneal/2 * (1 + cos(pi * (round-1) / rounds))``
   (``drop_ratio``); regrown weights start at exactly zero, dropped weights leave the model;
4. publishes its new mask and its model inside it.

The mask rules are small pure functions (``dispfl_neighbours``, ``neighbour_average``,
``drop_ratio``, ``update_mask``) so that tests can check them on hand-sized tensors; the method
(``DisPFL``) only moves bytes around them.

Who keeps what: the client's own model is the **client's state**, kept by whoever runs the
client (a dict in the simulator, the node's ``context.state`` on Flower): the very bytes it
last uploaded (its MASK payload, then its VALUES payload), or nothing before its first round
(then its initial model, derived from the seed). The relay's store of published models is the
**server state** (``RelayState``). Keeping the upload's bytes, not the trained float32 values,
makes the client's own copy exactly the relay's (with ``comm.value_dtype = float16`` both are
the float16-rounded upload).

Communication (the transport, used as a relay): DisPFL is peer-to-peer, and this project's
transport has a server in the middle, so the server plays a relay that stores each client's
last published model, exactly as the peer would have sent it. What client ``k`` downloads in a
round is, for each of its neighbours (itself excluded: it holds its own model), that
neighbour's MASK payload (bitmap) followed by its VALUES payload (the active values), all
concatenated (``ssfl.comm.payload_parts`` splits them); what it uploads is its new bitmap and
its values. A peer-to-peer link would carry the same bytes once (neighbour to client) instead
of twice (up to the relay, down to each neighbour), so the counted download is exactly what
DisPFL's peer-to-peer download costs; the upload is the relay's extra hop, counted once per
update and not once per neighbour that later reads it. Every byte counted is ``len()`` of a
real payload. A client that has never trained still holds its initial model (the shared seeded
initial weights inside its initial mask, both derived from the seed, so nobody pays to set them
up); it is sent like any other stored model when it is a neighbour.

Choices against the paper and the authors' code, and why:

- Participation: the run's sampled clients (``ssfl.run.experiment.sample_clients``, e.g. 10
  of 100) are the active ones, so compute per round equals the other methods'. The authors
  train every client in every round (``--active 1.0``).
- Neighbours: ``[algorithm.dispfl] neighbors`` (default 10, the authors'
  ``client_num_per_round`` = ``frac`` 0.1 of 100 clients) other clients drawn at random among
  all clients (the authors' ``--cs random`` of their scripts), from a generator seeded by
  (seed, round, client), so no RNG state is kept; at most all other clients. Neighbours need
  not be active in the round: they contribute their last stored model (the authors'
  ``w_per_mdls_lstrd``: models as at the start of the round, never those of the same round --
  the relay stores a round's uploads only after the whole round, ``aggregate``).
- Aggregation: the authors' ``_aggregate_func`` (a plain average over holders, not weighted by
  sample count). Only Conv/Linear weights are masked, as everywhere in this project; the
  authors' ``init_masks`` masks every parameter, biases and norms included. The robust rules of
  ``federation.aggregator`` and the clipping settings apply here, on the client side, over the
  neighbours (every one counting once; clipping around the client's own model), since there
  is no server-side average; the consensus model of the evaluation stays the plain average.
- What a neighbour contributes: its model after its last update, in its *new* mask (regrown
  weights at zero, dropped weights gone). In the authors' code the shared mask lags one update
  behind (``mask_pers_shared`` is the mask the neighbour trained with), so a neighbour's just-
  dropped weights still count and its regrown ones do not. We send the new sparse model because
  it is the model the client actually holds: every payload then has exactly the target density,
  as the paper describes ("each local model only maintains a fixed number of active parameters
  throughout the whole local training and peer-to-peer communication process").
- Mask update: after every local training (the authors' ``client.train`` unless ``--static``).
  Drop count ``ceil(r * active)`` per layer as the authors' ``fire_mask``; ``r`` uses the
  authors' 0-based round index (``round - 1``) over ``run.rounds`` (``comm_round``), so it
  starts at ``anneal`` and decays to 0. ``anneal`` is ``[algorithm.dispfl] anneal`` (default
  0.5, the authors' ``anneal_factor``), a key of its own so that FedDST's ``prune_fraction``
  (0.3) keeps its default. Regrowth by the largest |dense gradient| on one fresh seeded
  minibatch, in train mode (the authors' ``screen_gradients``: one minibatch, in eval mode;
  their shipped ``cifar10.sh`` passes ``--dis_gradient_check``, which regrows at random
  instead; we follow the code's default, gradient regrowth). Candidates for regrowth are the
  weights inactive *before* the drop (``ssfl.masks.drop_and_regrow``, shared with FedDST): the
  authors' sort may regrow a just-dropped weight; excluding it makes every update a swap of
  exactly k weights per layer, so each layer keeps exactly its count. A layer kept dense by ERK
  is never changed.
- Initial masks: a different random mask per client (the authors' scripts pass
  ``--different_initial``) with exact ERK layer counts (``ssfl.masks.erk_counts``), drawn from
  a generator seeded by (seed, client).
- A reply the relay rejects (malformed, wrong counts, NaN, wrong round or digest) is a
  ``Rejection``: the relay keeps that client's previous model and mask, and neighbours go on
  receiving that one. The client cannot know of the rejection and keeps the model it trained;
  so can a client whose reply was lost, and a client that answered a round that is then retried
  (too few valid replies) has already moved on. The relay therefore marks every sampled client
  whose upload it did not store (``RelayState.resend``), and sends such a client its own stored
  model, first in its next download (and every client of a retried round likewise); the client
  takes that copy as its own model. So a client always starts a round from the model the relay
  holds for it, as a peer's neighbours see it, and these extra bytes are counted (a real
  network pays them). A neighbour payload a client cannot validate makes that client fail the
  round (the transport reports it as dropped).

Evaluation: ``personalised`` is true, so the loop's ``personal_accuracy`` is each client's own
model as the relay stores it (``eval_weights(state, client)``) on its own test split (a client
that never trained is scored with its initial model). There is no global model in DisPFL;
``accuracy`` evaluates the consensus model (``eval_weights(state)``): each weight averaged over
all clients whose mask holds it, dense parameters over all clients -- what a client aggregating
from everybody would start from (the authors' ``w_per_globals``). ``global_mask`` is the union
of all client masks, the support of that consensus model (``mask.json`` reports it as the final
mask; the summary's ``density`` is the mean of the clients' own densities, each exactly the
target, see ``client_mask``).

Checkpoints store the server state: for the clients that have published at least once, the mask
bitmap (uint8), the values (float32) and the round of the upload (the others are derived from
the seed again), and the clients owed a resend. The simulator saves each client's own model
(its state) with them; a transport that loses client states (a new Flower run) gets them back
from the relay's store (``resync``: every client that has published receives its stored model
once, counted as a one-time resync cost).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from ssfl.algorithms.base import Algorithm, Ask, ClientContext, ClientOutput, Reply, Setup
from ssfl.algorithms.common import (
    MaskCodec,
    average_over_holders,
    bytes_tensor,
    flat_weights,
    load_weights_,
    tensor_bytes,
)
from ssfl.algorithms.robust import combine_over_holders, is_plain_mean
from ssfl.checkpoint import unprefixed
from ssfl.client import apply_regrowth_, cpu_weights, local_train, minibatch_gradient
from ssfl.comm import (
    PayloadError,
    decode_bits,
    decode_values,
    encode_values,
    payload_parts,
    read_header,
)
from ssfl.masks import (
    Mask,
    bits_to_mask,
    cosine_fraction,
    drop_and_regrow,
    erk_counts,
    erk_densities,
    random_layerwise_mask,
)

# ---------------------------------------------------------------------------- rules


def dispfl_neighbours(seed: int, round: int, client_id: int, num_clients: int,
                      count: int) -> list[int]:
    """The ``count`` neighbours (other clients, sorted) that ``client_id`` aggregates from in
    ``round``: uniform without replacement, seeded by (seed, round, client); all other clients
    if there are no more than ``count`` of them."""
    others = np.array([c for c in range(num_clients) if c != client_id], dtype=np.int64)
    if count >= len(others):
        return [int(c) for c in others]
    rng = np.random.default_rng([seed, round, client_id, 0xD15])
    return sorted(int(c) for c in rng.choice(others, size=count, replace=False))


def neighbour_average(
    own_mask: Mapping[str, torch.Tensor],
    models: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    shapes: Mapping[str, torch.Size],
    robust: Any = None,
    own: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """DisPFL's aggregation: ``models`` yields ``(dense tensors, mask)`` of the neighbours (the
    client itself included). Each masked weight is the plain average over the models whose mask
    holds it (0 where none does), then masked by ``own_mask``; other parameters are the plain
    average over all models.

    ``robust`` (the config's ``[federation]``) other than the plain mean: the rule of
    ``federation.aggregator`` over each weight's holders instead, every neighbour counting
    once, with clipping bounding each neighbour's difference from ``own``, the client's own
    current model (``ssfl.algorithms.robust.combine_over_holders``)."""
    contributions = ((d, m, 1.0) for d, m in models)
    if robust is None or is_plain_mean(robust):
        averages, _ = average_over_holders(contributions, shapes)
    else:
        if own is None:
            raise ValueError("a robust neighbour average needs the client's own model")
        averages, _ = combine_over_holders(contributions, shapes, own, robust)
    return {n: torch.where(own_mask[n], a, torch.zeros_like(a)) if n in own_mask else a
            for n, a in averages.items()}


def drop_ratio(anneal: float, round: int, rounds: int) -> float:
    """The fraction of each layer's active weights swapped after training in ``round``
    (1-based): ``anneal/2 * (1 + cos(pi * (round-1) / rounds))``, the authors' ``fire_mask``
    with their 0-based round index."""
    return cosine_fraction(anneal, round - 1, rounds)


def update_mask(
    weights: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    ratio: float,
) -> tuple[Mask, dict[str, torch.Tensor]]:
    """Per layer, drop ``ceil(ratio * active)`` smallest-magnitude active weights and regrow as
    many weights inactive before the drop, by largest gradient magnitude (ties: the earlier
    position). Returns the new mask (each layer's count unchanged) and the grown flat indices."""
    return drop_and_regrow(weights, mask, grads, ratio, ceil=True)


# ---------------------------------------------------------------------------- method


@dataclass(frozen=True)
class DisPFLSettings:
    """``[algorithm.dispfl]``."""

    neighbors: int = 10  # other clients each active client aggregates from (at most all)
    anneal: float = 0.5  # drop/regrow fraction anneal/2 * (1 + cos(pi * (round-1) / rounds))

    def __post_init__(self) -> None:
        if self.neighbors < 1:
            raise ValueError(f"neighbors must be at least 1, got {self.neighbors}")
        if not 0.0 <= self.anneal <= 1.0:
            raise ValueError(f"anneal must be in [0, 1], got {self.anneal}")


class Published(NamedTuple):
    """A client's model as the relay stores it."""

    bitmap: bytes  # its MASK payload (canonical bitmap; the round and digest in its header)
    values: torch.Tensor  # the values inside the mask (float32, layout order)
    round: int  # the round it was published in (0: the initial model)


@dataclass(frozen=True)
class RelayState:
    """The relay's store of the models clients published (client -> model), and the clients
    that may hold another model than the relay's copy of theirs (their last reply was not
    stored), to whom the relay sends that copy with their next download."""

    models: dict[int, Published] = field(default_factory=dict)
    resend: frozenset[int] = frozenset()


class DisPFL(Algorithm[RelayState]):
    """DisPFL: personal ERK masks, neighbour averaging through a relay, per-client
    drop/regrow; see the module docstring."""

    Settings = DisPFLSettings
    personalised = True
    per_client_masks = True
    #: on the client side: each client's neighbour average (``neighbour_average``)
    robust_aggregation = True

    def __init__(self, setup: Setup, settings: DisPFLSettings) -> None:
        super().__init__(setup, settings)
        self.codec = MaskCodec(setup.shapes, setup.prunable)
        self.counts = erk_counts(setup.prunable_shapes, setup.density)
        self.num_values = sum(self.counts.values()) + sum(
            math.prod(s) for n, s in setup.shapes.items() if n not in setup.prunable_shapes)
        self._initial_bitmaps: dict[int, bytes] = {}  # a cache: derived from the seed
        self._consensus: tuple[RelayState, dict[str, torch.Tensor]] | None = None  # a cache

    @classmethod
    def rounds_dependence(cls, config: Any, settings: DisPFLSettings) -> str | None:
        if settings.anneal == 0:
            return None
        return "its drop/regrow fraction anneals over run.rounds (algorithm.dispfl.anneal)"

    @classmethod
    def check_config(cls, config: Any, settings: Any) -> None:
        from ssfl.config import ConfigError

        if config.federation.num_clients < 2:
            raise ConfigError("algorithm.name = 'dispfl' needs federation.num_clients >= 2 "
                              "(each client aggregates from other clients)")
        # Krum runs over a client's neighbours and itself, not over the round's replies.
        fed = config.federation
        models = min(settings.neighbors, fed.num_clients - 1) + 1
        if fed.aggregator in ("krum", "multi_krum") and models <= fed.byzantine + 2:
            raise ConfigError(
                f"federation.aggregator = {fed.aggregator!r} with federation.byzantine = "
                f"{fed.byzantine} needs more than {fed.byzantine + 2} models per neighbour "
                f"average; DisPFL averages {models} (algorithm.dispfl.neighbors + 1): raise "
                f"algorithm.dispfl.neighbors to at least {fed.byzantine + 2}")

    # ---- what every party derives ----------------------------------------------------------
    def initial_mask(self, client_id: int) -> Mask:
        """Client ``client_id``'s initial mask: random, exact ERK layer counts, seeded by
        (seed, client)."""
        shapes, density = self.setup.prunable_shapes, self.setup.density
        mixed = ((self.setup.seed * 1_000_003 + client_id) * 1_000_033 + 0xD15) % 2**63
        return random_layerwise_mask(shapes, erk_densities(shapes, density),
                                     sum(self.counts.values()),
                                     torch.Generator().manual_seed(mixed))

    def initial_values(self, mask: Mask) -> torch.Tensor:
        """The seeded initial weights inside ``mask``."""
        return self.codec.layout(mask).gather(self.setup.initial)

    def neighbours(self, client_id: int, round: int) -> list[int]:
        return dispfl_neighbours(self.setup.seed, round, client_id, self.setup.num_clients,
                                 self.settings.neighbors)

    # ---- models on the wire ----------------------------------------------------------------
    def model_payload(self, mask: Mask, values: torch.Tensor, round: int) -> bytes:
        """A published model: its MASK payload, then its VALUES payload."""
        return self.payload_of(Published(self.codec.encode(mask, round), values, round))

    def payload_of(self, model: Published) -> bytes:
        return model.bitmap + encode_values(model.values, round=model.round,
                                            digest=read_header(model.bitmap).digest,
                                            dtype=self.setup.value_dtype)

    def read_model(self, mask_part: bytes, values_part: bytes, *, round: int | None = None,
                   before: int | None = None) -> tuple[Mask, bytes, torch.Tensor, int]:
        """Decode and check a published model: its bitmap has the right size, its digest and
        exact layer counts; its values the right count, digest, dtype and round (``round``, or
        any round before ``before``) and are finite. Returns the mask, its digest, the values
        and the round. Raises PayloadError."""
        mask, digest = self.codec.decode(mask_part)
        bad = {n: int(mask[n].sum()) for n in self.setup.prunable
               if int(mask[n].sum()) != self.counts[n]}
        if bad:
            raise PayloadError(f"mask has wrong layer counts {bad}, expected {self.counts}")
        published = read_header(mask_part).round
        if round is not None and published != round:
            raise PayloadError(f"mask is for round {published}, expected {round}")
        if before is not None and published >= before:
            raise PayloadError(f"stored model of round {published} is not from before "
                               f"round {before}")
        values = decode_values(values_part, expected_count=self.num_values,
                               expected_digest=digest, expected_round=published,
                               expected_dtype=self.setup.value_dtype, require_finite=True)
        return mask, digest, values, published

    def read_one(self, payload: bytes, *, round: int | None = None,
                 before: int | None = None) -> tuple[Mask, bytes, torch.Tensor, int]:
        """``read_model`` of a payload that holds one model (an upload, a client's state)."""
        parts = payload_parts(payload)
        if len(parts) != 2:
            raise PayloadError(f"expected 2 payloads (mask, values), got {len(parts)}")
        return self.read_model(parts[0], parts[1], round=round, before=before)

    # ---- the relay's store -----------------------------------------------------------------
    def bitmap_of(self, state: RelayState, client_id: int) -> bytes:
        """The MASK payload of the model the relay holds for ``client_id`` (its initial mask
        if it never published)."""
        if client_id in state.models:
            return state.models[client_id].bitmap
        if client_id not in self._initial_bitmaps:
            self._initial_bitmaps[client_id] = self.codec.encode(self.initial_mask(client_id))
        return self._initial_bitmaps[client_id]

    def published(self, state: RelayState, client_id: int) -> Published:
        """The model the relay holds for ``client_id``: its last upload, or its initial
        model."""
        if client_id in state.models:
            return state.models[client_id]
        bitmap = self.bitmap_of(state, client_id)
        return Published(bitmap, self.initial_values(self.codec.decode(bitmap)[0]), 0)

    def dense_model(self, model: Published) -> tuple[dict[str, torch.Tensor], Mask]:
        """Dense tensors of a stored model, and its mask."""
        mask, digest = self.codec.decode(model.bitmap)
        return self.codec.layout(mask, digest).dense_tensors(model.values), mask

    # ---- server (the relay) ----------------------------------------------------------------
    def init(self) -> RelayState:
        return RelayState()

    def resync(self, state: RelayState, ask: Ask) -> RelayState:
        """Clients that lost their state get their stored model back (the others start again
        from their initial model, which is what the relay holds for them); then every client
        holds the relay's copy of its model."""
        if state.models:
            ask.deliver("own_model", {c: self.payload_of(m)
                                      for c, m in sorted(state.models.items())},
                        label="resync_own_model")
        return replace(state, resend=frozenset())

    def configure(self, state: RelayState, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        """Each client's neighbours' stored models (MASK then VALUES payload each), after its
        own stored model where the client may hold another one (and in a retried round)."""
        payloads: dict[int, bytes] = {}  # each stored model encoded once per round

        def payload(client_id: int) -> bytes:
            if client_id not in payloads:
                payloads[client_id] = self.payload_of(self.published(state, client_id))
            return payloads[client_id]

        out = {}
        for c in clients:
            own = [payload(c)] if attempt > 1 or c in state.resend else []
            out[c] = b"".join(own + [payload(j) for j in self.neighbours(c, round)])
        return out

    def check(self, state: RelayState, round: int, client_id: int,
              payload: bytes) -> Published:
        """The client's new model: a mask with the exact layer counts and its finite values,
        both of this round."""
        if not 0 <= client_id < self.setup.num_clients:
            raise PayloadError(f"no client {client_id} in this federation")
        mask, _, values, _ = self.read_one(payload, round=round)
        return Published(self.codec.encode(mask, round), values, round)

    def aggregate(self, state: RelayState, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[RelayState, dict[str, Any]]:
        """Store the round's valid uploads; they become visible to neighbours only from the
        next round on (stored after the whole round). A sampled client whose upload is not
        stored may hold a model the relay does not have: it is owed a resend."""
        stored = {r.client_id: r.update for r in replies}
        resend = (state.resend | frozenset(sampled)) - stored.keys()
        return RelayState({**state.models, **stored}, frozenset(resend)), {}

    # ---- evaluation ------------------------------------------------------------------------
    def consensus(self, state: RelayState) -> dict[str, torch.Tensor]:
        """Each weight averaged over all clients whose mask holds it (dense parameters: over
        all clients), in client order."""
        if self._consensus is None or self._consensus[0] is not state:
            models = (self.dense_model(self.published(state, c)) + (1.0,)
                      for c in range(self.setup.num_clients))
            self._consensus = (state, average_over_holders(models, self.setup.shapes)[0])
        return self._consensus[1]

    def eval_weights(self, state: RelayState,
                     client: int | None = None) -> dict[str, torch.Tensor]:
        if client is None:
            return self.consensus(state)
        return self.dense_model(self.published(state, client))[0]

    def global_mask(self, state: RelayState) -> Mask:
        union = {n: torch.zeros(s, dtype=torch.bool)
                 for n, s in self.setup.prunable_shapes.items()}
        for c in range(self.setup.num_clients):
            for n, m in self.client_mask(state, c).items():
                union[n] |= m
        return union

    def client_mask(self, state: RelayState, client: int) -> Mask:
        return self.codec.decode(self.bitmap_of(state, client))[0]

    def final_values(self, state: RelayState) -> torch.Tensor:
        return flat_weights(self.consensus(state), list(self.setup.shapes))

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self, state: RelayState) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        models = sorted(state.models.items())
        meta = {"rounds": {str(c): m.round for c, m in models}, "resend": sorted(state.resend)}
        tensors: dict[str, torch.Tensor] = {}
        for c, m in models:
            tensors[f"bits.{c}"] = bytes_tensor(decode_bits(m.bitmap,
                                                            expected_count=self.codec.count))
            tensors[f"values.{c}"] = m.values
        return meta, tensors

    def load_state(self, meta: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> RelayState:
        bits = unprefixed("bits", dict(tensors))
        values = unprefixed("values", dict(tensors))
        rounds = {str(c): int(r) for c, r in meta["rounds"].items()}
        if bits.keys() != rounds.keys() or values.keys() != rounds.keys():
            raise ValueError("the checkpoint's DisPFL relay store is incomplete")
        models = {}
        for c, r in rounds.items():
            b = tensor_bytes(bits[c])
            if (not 0 <= int(c) < self.setup.num_clients
                    or len(b) != (self.codec.count + 7) // 8
                    or values[c].numel() != self.num_values):
                raise ValueError(f"the checkpoint's model of client {c} does not fit this run")
            mask = bits_to_mask(b, self.setup.prunable_shapes, self.setup.prunable)
            if any(int(mask[n].sum()) != k for n, k in self.counts.items()):
                raise ValueError(f"the checkpoint's mask of client {c} has wrong layer counts")
            models[int(c)] = Published(self.codec.encode(mask, r),
                                       values[c].clone().to(torch.float32), r)
        resend = frozenset(int(c) for c in meta["resend"])
        if not all(0 <= c < self.setup.num_clients for c in resend):
            raise ValueError("the checkpoint names clients this federation does not have")
        return RelayState(models, resend)

    # ---- client ----------------------------------------------------------------------------
    def client_setup(self, kind: str, ctx: ClientContext, received: bytes,
                     state: bytes | None) -> ClientOutput:
        if kind == "own_model":  # the relay's copy of this client's model (resync)
            self.read_one(received)
            return ClientOutput(b"", received)
        return super().client_setup(kind, ctx, received, state)

    def own_model(self, ctx: ClientContext, state: bytes | None) -> tuple[Mask, torch.Tensor]:
        """The client's own mask and values: its last upload (its state), or its initial
        model before its first round."""
        if state is None:
            mask = self.initial_mask(ctx.client_id)
            return mask, self.initial_values(mask)
        mask, _, values, _ = self.read_one(state, before=ctx.round)
        return mask, values

    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        nbrs = self.neighbours(ctx.client_id, ctx.round)
        parts = payload_parts(received)
        if len(parts) == 2 * (len(nbrs) + 1):  # the relay's copy of its own model comes first
            state, parts = b"".join(parts[:2]), parts[2:]
        elif len(parts) != 2 * len(nbrs):
            raise PayloadError(f"expected {2 * len(nbrs)} payloads ({len(nbrs)} neighbours), "
                               f"got {len(parts)}")
        own_mask, own_values = self.own_model(ctx, state)
        received_models = {j: self.read_model(parts[i], parts[i + 1], before=ctx.round)
                           for j, i in zip(nbrs, range(0, len(parts), 2))}

        def models() -> Iterator[tuple[dict[str, torch.Tensor], Mask]]:
            for j in sorted([*nbrs, ctx.client_id]):  # the authors' sorted neighbour order
                if j == ctx.client_id:
                    yield own, own_mask
                else:
                    mask, digest, values, _ = received_models[j]
                    yield self.codec.layout(mask, digest).dense_tensors(values), mask

        own = self.codec.layout(own_mask).dense_tensors(own_values)
        load_weights_(ctx.model, neighbour_average(own_mask, models(), self.setup.shapes,
                                                   self.setup.config.federation, own))
        result = local_train(ctx.model, ctx.data, ctx.settings, ctx.lr, ctx.generator, own_mask)
        new_mask = own_mask
        ratio = drop_ratio(self.settings.anneal, ctx.round, self.setup.config.run.rounds)
        if ratio > 0:
            prunable = self.setup.prunable
            grads = minibatch_gradient(ctx.model, ctx.data, ctx.settings, ctx.generator,
                                       prunable)
            new_mask, grown = update_mask(cpu_weights(ctx.model, prunable), own_mask, grads,
                                          ratio)
            apply_regrowth_(ctx.model, new_mask, grown)
        upload = self.model_payload(new_mask, self.codec.layout(new_mask).gather_model(ctx.model),
                                    ctx.round)
        # The client keeps exactly what it sent: its own copy is then the relay's, bit for bit.
        return ClientOutput(upload, upload, result)
