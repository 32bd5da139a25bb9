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
``drop_ratio``, ``update_mask``) so that tests can check them on hand-sized tensors.

Communication (the engine's transport, used as a relay): DisPFL is peer-to-peer, and this
project's transport has a server in the middle, so the server plays a relay that stores each
client's last published model, exactly as the peer would have sent it. What client ``k``
downloads in a round is, for each of its neighbours (itself excluded: it holds its own model),
that neighbour's MASK payload (bitmap) followed by its VALUES payload (the active values), all
concatenated (``ssfl.strategies.payload_parts`` splits them); what it uploads is its new bitmap
and its values. A peer-to-peer link would carry the same bytes once (neighbour to client)
instead of twice (up to the relay, down to each neighbour), so the counted download is exactly
what DisPFL's peer-to-peer download costs; the upload is the relay's extra hop, counted once per
update and not once per neighbour that later reads it. Every byte counted is ``len()`` of a real
payload. A client that has never trained still holds its initial model (the shared seeded
initial weights inside its initial mask, both derived from the seed, so nobody pays to set them
up); it is sent like any other stored model when it is a neighbour.

Choices against the paper and the authors' code, and why:

- Participation: the engine's sampled clients (``ssfl.engine.sample_clients``, e.g. 10 of 100)
  are the active ones, so compute per round equals the other methods'. The authors train every
  client in every round (``--active 1.0``).
- Neighbours: ``algorithm.neighbors`` (default 10, the authors' ``client_num_per_round`` =
  ``frac`` 0.1 of 100 clients) other clients drawn at random among all clients (the authors'
  ``--cs random`` of their scripts), from a generator seeded by (seed, round, client), so no RNG
  state is kept; at most all other clients. Neighbours need not be active in the round: they
  contribute their last stored model (the authors' ``w_per_mdls_lstrd``: models as at the start
  of the round, never those of the same round -- the relay stores a round's uploads only after
  the whole round, ``aggregate``).
- Aggregation: the authors' ``_aggregate_func`` (a plain average over holders, not weighted by
  sample count). Only Conv/Linear weights are masked, as everywhere in this project; the
  authors' ``init_masks`` masks every parameter, biases and norms included.
- What a neighbour contributes: its model after its last update, in its *new* mask (regrown
  weights at zero, dropped weights gone). In the authors' code the shared mask lags one update
  behind (``mask_pers_shared`` is the mask the neighbour trained with), so a neighbour's just-
  dropped weights still count and its regrown ones do not. We send the new sparse model because
  it is the model the client actually holds: every payload then has exactly the target density,
  as the paper describes ("each local model only maintains a fixed number of active parameters
  throughout the whole local training and peer-to-peer communication process").
- Mask update: after every local training (the authors' ``client.train`` unless ``--static``).
  Drop count ``ceil(r * active)`` per layer as the authors' ``fire_mask``; ``r`` uses the
  authors' 0-based round index (``round - 1``) over ``run.rounds`` (``comm_round``), so it starts
  at ``anneal`` and decays to 0. ``anneal`` is ``algorithm.dispfl_anneal`` (default 0.5, the
  authors' ``anneal_factor``), a key of its own so that FedDST's ``prune_fraction`` (0.3) keeps
  its default. Regrowth by the largest |dense gradient| on one fresh seeded minibatch, in train
  mode (the authors' ``screen_gradients``: one minibatch, in eval mode; their shipped
  ``cifar10.sh`` passes ``--dis_gradient_check``, which regrows at random instead; we follow the
  code's default, gradient regrowth). Candidates for regrowth are the weights inactive *before*
  the drop (``ssfl.dynamic.drop_and_regrow``, shared with FedDST): the authors' sort may regrow a
  just-dropped weight; excluding it makes every update a swap of exactly k weights per layer,
  so each layer keeps exactly its count. A layer kept dense by ERK is never changed.
- Initial masks: a different random mask per client (the authors' scripts pass
  ``--different_initial``) with exact ERK layer counts (``ssfl.dynamic.erk_counts``), drawn from
  a generator seeded by (seed, client).
- A reply the relay rejects (malformed, wrong counts, NaN, wrong round or digest) is a
  ``Rejection``: the relay keeps that client's previous model and mask, and so does the client
  (its state is what the relay stored; with ``comm.value_dtype = float16`` a client's own copy
  is therefore its float16-rounded upload). A neighbour payload a client cannot validate makes
  that client fail the round (the transport reports it as dropped).

Evaluation: ``personalised`` is true, so the engine's ``personal_accuracy`` is each client's own
stored model on its own test split (a client that never trained is scored with its initial
model). There is no global model in DisPFL; ``accuracy`` evaluates the consensus model
(``load_global_``): each weight averaged over all clients whose mask holds it, dense parameters
over all clients -- what a client aggregating from everybody would start from (the authors'
``w_per_globals``). ``global_mask`` is the union of all client masks, the support of that
consensus model (``mask.json`` reports it as the final mask; the summary's ``density`` is the
mean of the clients' own densities, each exactly the target, see ``client_mask``).

Checkpoints store, for the clients that have published at least once, the mask bitmap (uint8),
the values (float32) and the round of the upload; the others are derived from the seed again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ssfl.checkpoint import unprefixed
from ssfl.client import local_train
from ssfl.comm import (
    ParameterLayout,
    PayloadError,
    decode_bits,
    decode_values,
    encode_bits,
    encode_values,
    read_header,
)
from ssfl.dynamic import (
    apply_regrowth_,
    average_over_holders,
    cosine_fraction,
    cpu_weights,
    drop_and_regrow,
    erk_counts,
    minibatch_gradient,
)
from ssfl.masks import (
    Mask,
    bits_to_mask,
    erk_densities,
    mask_digest,
    mask_to_bits,
    random_layerwise_mask,
)
from ssfl.server import Rejection, RoundFailed, RoundUpdate, screen_replies
from ssfl.strategies import Reply, TrainingStrategy, payload_parts

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
) -> dict[str, torch.Tensor]:
    """DisPFL's aggregation: ``models`` yields ``(dense tensors, mask)`` of the neighbours (the
    client itself included). Each masked weight is the plain average over the models whose mask
    holds it (0 where none does), then masked by ``own_mask``; other parameters are the plain
    average over all models."""
    averages, _ = average_over_holders(((d, m, 1.0) for d, m in models), shapes)
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


# ---------------------------------------------------------------------------- strategy


class DisPFLStrategy(TrainingStrategy):
    """DisPFL behind the ``TrainingStrategy`` interface; see the module docstring."""

    personalised = True
    per_client_masks = True

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: Sequence[str],
        density: float,
        num_clients: int,
        *,
        seed: int,
        rounds: int,
        neighbors: int = 10,
        anneal: float = 0.5,
        value_dtype: str = "float32",
        min_replies: int = 1,
    ) -> None:
        if num_clients < 2:
            raise ValueError("DisPFL needs at least 2 clients")
        self.shapes = {n: t.shape for n, t in initial.items()}
        self.prunable = list(prunable)
        self.prunable_shapes = {n: self.shapes[n] for n in self.prunable}
        self.prunable_count = sum(math.prod(s) for s in self.prunable_shapes.values())
        self.density = density
        self.counts = erk_counts(self.prunable_shapes, density)
        self.num_values = sum(self.counts.values()) + sum(
            math.prod(s) for n, s in self.shapes.items() if n not in self.prunable_shapes)
        self.num_clients = num_clients
        self.seed = seed
        self.rounds = rounds
        self.neighbors = neighbors
        self.anneal = anneal
        self.value_dtype = value_dtype
        self.min_replies = min_replies
        self.initial = {n: t.detach().clone().to(torch.float32) for n, t in initial.items()}
        self.setup_bytes: dict[str, int] = {}
        #: the relay's store, for clients that have published: (bitmap, values, round)
        self._stored: dict[int, tuple[bytes, torch.Tensor, int]] = {}
        self._initial_bits: dict[int, bytes] = {}  # a cache: derived from the seed

    # -- client state ---------------------------------------------------------------------
    def initial_mask(self, client_id: int) -> Mask:
        """Client ``client_id``'s initial mask: random, exact ERK layer counts, seeded by
        (seed, client)."""
        mixed = ((self.seed * 1_000_003 + client_id) * 1_000_033 + 0xD15) % 2**63
        return random_layerwise_mask(self.prunable_shapes,
                                     erk_densities(self.prunable_shapes, self.density),
                                     sum(self.counts.values()),
                                     torch.Generator().manual_seed(mixed))

    def _state(self, client_id: int) -> tuple[bytes, torch.Tensor | None, int]:
        """(bitmap, values or None for the initial model, round) of a client's stored model."""
        if client_id in self._stored:
            return self._stored[client_id]
        if client_id not in self._initial_bits:
            self._initial_bits[client_id] = mask_to_bits(self.initial_mask(client_id),
                                                         self.prunable)
        return self._initial_bits[client_id], None, 0

    def _decode_bits(self, bits: bytes) -> tuple[Mask, ParameterLayout]:
        mask = bits_to_mask(bits, self.prunable_shapes, self.prunable)
        return mask, ParameterLayout(self.shapes, mask)

    def client_model(self, client_id: int) -> tuple[Mask, ParameterLayout, torch.Tensor, int]:
        """Client ``client_id``'s own mask, its layout, its values and the round it last
        published (0: never, its initial model)."""
        bits, values, rnd = self._state(client_id)
        mask, layout = self._decode_bits(bits)
        if values is None:
            values = layout.gather(self.initial)
        return mask, layout, values, rnd

    def client_mask(self, client_id: int) -> Mask:
        return self._decode_bits(self._state(client_id)[0])[0]

    def neighbours(self, client_id: int, round: int) -> list[int]:
        return dispfl_neighbours(self.seed, round, client_id, self.num_clients, self.neighbors)

    def model_payload(self, mask: Mask, values: torch.Tensor, round: int) -> bytes:
        """A published model: its MASK payload, then its VALUES payload."""
        return self._bits_payload(mask_to_bits(mask, self.prunable), values, round)

    def _bits_payload(self, bits: bytes, values: torch.Tensor, round: int) -> bytes:
        # ``bits`` is always ``mask_to_bits`` of the mask, so this is ``mask_digest``.
        digest = hashlib.blake2b(bits, digest_size=8).digest()
        return (encode_bits(bits, self.prunable_count, round=round, digest=digest)
                + encode_values(values, round=round, digest=digest, dtype=self.value_dtype))

    def read_model(self, mask_part: bytes, values_part: bytes, *, round: int | None = None,
                   before: int | None = None) -> tuple[Mask, bytes, torch.Tensor, int]:
        """Decode and check a published model: its bitmap has the right size, its digest and
        exact layer counts; its values the right count, digest, dtype and round (``round``, or
        any round before ``before``) and are finite. Returns the mask, its canonical bitmap
        (``mask_to_bits``), the values and the round. Raises PayloadError."""
        header = read_header(mask_part)
        bits = decode_bits(mask_part, expected_count=self.prunable_count)
        mask = bits_to_mask(bits, self.prunable_shapes, self.prunable)
        if header.digest != mask_digest(mask, self.prunable):
            raise PayloadError("mask payload's digest does not match its bitmap")
        bad = {n: int(mask[n].sum()) for n in self.prunable
               if int(mask[n].sum()) != self.counts[n]}
        if bad:
            raise PayloadError(f"mask has wrong layer counts {bad}, expected {self.counts}")
        if round is not None and header.round != round:
            raise PayloadError(f"mask is for round {header.round}, expected {round}")
        if before is not None and header.round >= before:
            raise PayloadError(f"stored model of round {header.round} is not from before "
                               f"round {before}")
        values = decode_values(values_part, expected_count=self.num_values,
                               expected_digest=header.digest, expected_round=header.round,
                               expected_dtype=self.value_dtype, require_finite=True)
        return mask, mask_to_bits(mask, self.prunable), values, header.round

    # -- relay -> client ------------------------------------------------------------------
    def payload_for(self, client_id: int, round: int) -> bytes:
        parts = []
        for j in self.neighbours(client_id, round):
            bits, values, rnd = self._state(j)
            if values is None:  # never trained: its initial model
                values = self._decode_bits(bits)[1].gather(self.initial)
            parts.append(self._bits_payload(bits, values, rnd))
        return b"".join(parts)

    # -- client ---------------------------------------------------------------------------
    def client_update(self, model, payload, data, settings, *, client_id, round, lr, generator):
        nbrs = self.neighbours(client_id, round)
        parts = payload_parts(payload)
        if len(parts) != 2 * len(nbrs):
            raise PayloadError(f"expected {2 * len(nbrs)} payloads ({len(nbrs)} neighbours), "
                               f"got {len(parts)}")
        own_mask, own_layout, own_values, _ = self.client_model(client_id)

        def models() -> Iterator[tuple[dict[str, torch.Tensor], Mask]]:
            received = {}
            for j, i in zip(nbrs, range(0, len(parts), 2)):
                received[j] = self.read_model(parts[i], parts[i + 1], before=round)
            for j in sorted([*nbrs, client_id]):  # the authors' sorted neighbour order
                if j == client_id:
                    yield own_layout.dense_tensors(own_values), own_mask
                else:
                    mask, _, values, _ = received[j]
                    yield ParameterLayout(self.shapes, mask).dense_tensors(values), mask

        averaged = neighbour_average(own_mask, models(), self.shapes)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(averaged[n])
        result = local_train(model, data, settings, lr, generator, own_mask)
        new_mask: Mask = own_mask
        ratio = drop_ratio(self.anneal, round, self.rounds)
        if ratio > 0:
            grads = minibatch_gradient(model, data, settings, generator, self.prunable)
            new_mask, grown = update_mask(cpu_weights(model, self.prunable), own_mask, grads,
                                          ratio)
            apply_regrowth_(model, new_mask, grown)
        values = ParameterLayout(self.shapes, new_mask).gather_model(model)
        return self.model_payload(new_mask, values, round), result

    # -- client -> relay ------------------------------------------------------------------
    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate:
        """Check each upload and store the valid ones; they become visible to neighbours only
        from the next round on (stored after the whole round)."""
        rejected: list[Rejection] = []
        accepted: dict[int, tuple[bytes, torch.Tensor, int]] = {}
        samples = nbytes = 0

        def check(client_id: int, payload: bytes, num_samples: int):
            if not 0 <= client_id < self.num_clients:
                raise PayloadError(f"no client {client_id} in this federation")
            if client_id in accepted:
                raise PayloadError(f"a second update from client {client_id} in round {round}")
            parts = payload_parts(payload)
            if len(parts) != 2:
                raise PayloadError(f"expected 2 payloads (mask, values), got {len(parts)}")
            _, bits, values, _ = self.read_model(parts[0], parts[1], round=round)
            return bits, values, len(payload)

        for client_id, checked, num_samples in screen_replies(round, replies, check, rejected):
            bits, values, size = checked  # type: ignore[misc]
            accepted[client_id] = (bits, values, round)
            samples += num_samples
            nbytes += size
        if len(accepted) < self.min_replies:
            raise RoundFailed(round, len(accepted), self.min_replies, rejected)
        self._stored.update(accepted)
        return RoundUpdate(num_clients=len(accepted), num_samples=samples, bytes_up=nbytes,
                           rejected=tuple(rejected))

    # -- evaluation -----------------------------------------------------------------------
    def load_personal_(self, model: nn.Module, client_id: int) -> None:
        _, layout, values, _ = self.client_model(client_id)
        layout.scatter_model_(values, model)

    def consensus(self) -> dict[str, torch.Tensor]:
        """Each weight averaged over all clients whose mask holds it (dense parameters: over
        all clients), in client order."""
        def models():
            for c in range(self.num_clients):
                mask, layout, values, _ = self.client_model(c)
                yield layout.dense_tensors(values), mask, 1.0

        return average_over_holders(models(), self.shapes)[0]

    def load_global_(self, model: nn.Module) -> None:
        weights = self.consensus()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])

    def global_values(self) -> torch.Tensor:
        weights = self.consensus()
        return torch.cat([weights[n].reshape(-1) for n in self.shapes])

    def global_mask(self) -> Mask:
        union = {n: torch.zeros(s, dtype=torch.bool) for n, s in self.prunable_shapes.items()}
        for c in range(self.num_clients):
            for n, m in self.client_mask(c).items():
                union[n] |= m
        return union

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"rounds": {str(c): r for c, (_, _, r) in sorted(self._stored.items())}}
        tensors: dict[str, torch.Tensor] = {}
        for c, (bits, values, _) in sorted(self._stored.items()):
            tensors[f"bits.{c}"] = torch.frombuffer(bytearray(bits), dtype=torch.uint8)
            tensors[f"values.{c}"] = values
        return meta, tensors

    def load_state_dict(self, meta: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
        bits = unprefixed("bits", dict(tensors))
        values = unprefixed("values", dict(tensors))
        rounds = {str(c): int(r) for c, r in meta["rounds"].items()}
        if bits.keys() != rounds.keys() or values.keys() != rounds.keys():
            raise ValueError("the checkpoint's DisPFL client state is incomplete")
        stored = {}
        for c, r in rounds.items():
            b = bytes(bits[c].numpy().tobytes())
            if len(b) != (self.prunable_count + 7) // 8 or values[c].numel() != self.num_values:
                raise ValueError(f"the checkpoint's model of client {c} does not fit this model")
            stored[int(c)] = (b, values[c].clone().to(torch.float32), r)
        self._stored = stored
