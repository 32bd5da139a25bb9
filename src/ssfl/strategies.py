"""Training-round strategies: what each client receives, how it trains, how the server merges.

A strategy holds the explicit server state of one algorithm's training rounds. The simulator
(and any other adapter) calls, per round: ``payload_for(client, round)`` for each sampled client,
``client_update(...)`` on that client (this is the client-side code), then ``aggregate(round,
replies)``. Payloads are real bytes in the ``ssfl.comm`` format, so every count is exact.

- ``StaticMaskStrategy``: one global mask fixed before training (SSFL, random, ERK, SNIP
  variants, dense FedAvg). Every round carries only the active values.
- ``ClientMaskStrategy``: each client trains inside its own fixed random mask (the "random
  clientwise" ablation of the SSFL paper); each weight is averaged over the clients holding it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ssfl.checkpoint import prefixed, unprefixed
from ssfl.client import LocalData, TrainResult, TrainSettings, train_round
from ssfl.comm import (
    HEADER,
    ITEM_SIZES,
    ParameterLayout,
    PayloadError,
    decode_values,
    encode_bits,
    encode_values,
    read_header,
)
from ssfl.masks import Mask, mask_digest, mask_to_bits, random_global_mask
from ssfl.server import (
    Rejection,
    RoundFailed,
    RoundUpdate,
    SparseFedAvgServer,
    screen_replies,
)

Reply = tuple[int, bytes, int]  # (client id, payload, client sample count)


class TrainingStrategy(ABC):
    """Server state and per-round logic of one algorithm (see the module docstring)."""

    #: one-time costs paid before round 1 (for example each client's own mask), in bytes
    setup_bytes: dict[str, int]

    #: True for methods where each client keeps its own model (personalised FL): the engine
    #: then computes ``personal_accuracy`` with ``load_personal_`` on each client's own test
    #: split instead of with the global model.
    personalised: bool = False

    @abstractmethod
    def payload_for(self, client_id: int, round: int) -> bytes: ...

    @abstractmethod
    def client_update(
        self,
        model: nn.Module,
        payload: bytes,
        data: LocalData,
        settings: TrainSettings,
        *,
        client_id: int,
        round: int,
        lr: float,
        generator: torch.Generator,
    ) -> tuple[bytes, TrainResult]: ...

    @abstractmethod
    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate: ...

    @abstractmethod
    def load_global_(self, model: nn.Module) -> None:
        """Write the current global model into ``model`` (for evaluation)."""

    def load_personal_(self, model: nn.Module, client_id: int) -> None:
        """Write client ``client_id``'s own model into ``model`` (for its personalised
        evaluation); without personal models, the global one."""
        self.load_global_(model)

    @abstractmethod
    def global_mask(self) -> Mask: ...

    #: True when every client trains in a mask of its own (``client_mask``); ``global_mask`` is
    #: then the union of those masks, which no client trains in.
    per_client_masks: bool = False

    def client_mask(self, client_id: int) -> Mask:
        """The mask client ``client_id`` trains in; without per-client masks, the global one."""
        return self.global_mask()

    @abstractmethod
    def global_values(self) -> torch.Tensor:
        """The global model as a flat vector (for checks and checkpoints)."""

    @abstractmethod
    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Everything needed to continue the run: JSON-able metadata and tensors."""

    @abstractmethod
    def load_state_dict(self, meta: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None: ...


class StaticMaskStrategy(TrainingStrategy):
    """Sparse FedAvg in one fixed global mask; all clients get the same payload in a round."""

    def __init__(self, server: SparseFedAvgServer, min_replies: int = 1) -> None:
        self.server = server
        self.min_replies = min_replies  # valid updates a round needs
        # The mask bitmap travels once, before round 1, through the transport (engine.run).
        self.setup_bytes = {}
        self._cached: tuple[int, bytes] | None = None

    def payload_for(self, client_id: int, round: int) -> bytes:
        if self._cached is None or self._cached[0] != round:
            self._cached = (round, self.server.broadcast(round))
        return self._cached[1]

    def client_update(self, model, payload, data, settings, *, client_id, round, lr, generator):
        s = self.server
        return train_round(model, s.layout, s.mask, s.digest, payload, data, settings,
                           round=round, lr=lr, generator=generator, value_dtype=s.value_dtype)

    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate:
        return self.server.aggregate_from(round, replies, min_replies=self.min_replies)

    def load_global_(self, model: nn.Module) -> None:
        self.server.layout.scatter_model_(self.server.values, model)

    def global_mask(self) -> Mask:
        return self.server.mask

    def global_values(self) -> torch.Tensor:
        return self.server.values

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {"values": self.server.values, **prefixed("mask", self.server.mask)}
        return {"round": self.server.round}, tensors

    def load_state_dict(self, meta: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
        if unprefixed("mask", dict(tensors)).keys() != self.server.mask.keys() or any(
            not torch.equal(tensors[f"mask.{n}"], m) for n, m in self.server.mask.items()
        ):
            raise ValueError("the checkpoint was saved with a different mask")
        values = tensors["values"]
        if values.shape != self.server.values.shape:
            raise ValueError("the checkpoint's values do not fit this model and mask")
        self.server.values = values.clone()
        self.server.round = int(meta["round"])
        self._cached = None


class DenseGlobalModel:
    """For strategies whose global model is a dict of dense tensors, ``self.weights`` (zero
    where no weight is active): evaluation, flat values and checkpoint restore."""

    weights: dict[str, torch.Tensor]
    shapes: dict[str, torch.Size]

    def load_global_(self, model: nn.Module) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.weights[n])

    def global_values(self) -> torch.Tensor:
        return torch.cat([self.weights[n].reshape(-1) for n in self.shapes])

    def _restore_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        weights = unprefixed("weights", dict(tensors))
        if {n: w.shape for n, w in weights.items()} != self.shapes:
            raise ValueError("the checkpoint's weights do not fit this model")
        self.weights = {n: w.clone() for n, w in weights.items()}


def client_random_mask(shapes: Mapping[str, torch.Size], density: float, seed: int,
                       client_id: int) -> Mask:
    """Client ``client_id``'s random global mask; derived from (seed, client) so it never needs
    storing."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + client_id) % 2**63)
    return random_global_mask(shapes, density, generator)


class ClientMaskStrategy(DenseGlobalModel, TrainingStrategy):
    """Each client has its own random global mask of the target density, fixed for the run.

    The server keeps a dense global model. A client receives (and returns) the values inside its
    own mask; the server averages each weight over the clients of the round that hold it,
    weighted by sample count, and leaves weights that no such client holds unchanged. Each
    client's mask is sent to it once, as a bitmap (counted in ``setup_bytes``).
    """

    def __init__(
        self,
        initial: Mapping[str, torch.Tensor],
        prunable: list[str],
        density: float,
        num_clients: int,
        *,
        seed: int,
        value_dtype: str = "float32",
    ) -> None:
        self.shapes = {n: t.shape for n, t in initial.items()}
        self.prunable = prunable
        self.density = density
        self.seed = seed
        self.value_dtype = value_dtype
        self.weights = {n: t.detach().clone().to(torch.float32) for n, t in initial.items()}
        prunable_count = sum(math.prod(self.shapes[n]) for n in prunable)
        # Every client's bitmap payload has the same length: encode one for real and count it
        # once per client.
        example = encode_bits(mask_to_bits(self.client_mask(0), prunable), prunable_count)
        self.setup_bytes = {"mask_broadcast": len(example) * num_clients}
        self._union = self._union_mask(num_clients)

    per_client_masks = True

    def client_mask(self, client_id: int) -> Mask:
        return client_random_mask({n: self.shapes[n] for n in self.prunable}, self.density,
                                  self.seed, client_id)

    def _union_mask(self, num_clients: int) -> Mask:
        union = {n: torch.zeros(self.shapes[n], dtype=torch.bool) for n in self.prunable}
        for cid in range(num_clients):
            for n, m in self.client_mask(cid).items():
                union[n] |= m
        return union

    def _layout(self, client_id: int) -> tuple[ParameterLayout, Mask, bytes]:
        mask = self.client_mask(client_id)
        return ParameterLayout(self.shapes, mask), mask, mask_digest(mask, self.prunable)

    def payload_for(self, client_id: int, round: int) -> bytes:
        layout, _, digest = self._layout(client_id)
        return encode_values(layout.gather(self.weights), round=round, digest=digest,
                             dtype=self.value_dtype)

    def client_update(self, model, payload, data, settings, *, client_id, round, lr, generator):
        layout, mask, digest = self._layout(client_id)
        return train_round(model, layout, mask, digest, payload, data, settings, round=round,
                           lr=lr, generator=generator, value_dtype=self.value_dtype)

    def aggregate(self, round: int, replies: Iterable[Reply]) -> RoundUpdate:
        sums = {n: torch.zeros(s, dtype=torch.float64) for n, s in self.shapes.items()}
        weight = {n: torch.zeros(s, dtype=torch.float64) for n, s in self.shapes.items()}
        clients = samples = nbytes = 0
        rejected: list[Rejection] = []

        def check(client_id: int, payload: bytes, num_samples: int) -> tuple[dict, Mask, int]:
            layout, mask, digest = self._layout(client_id)
            values = decode_values(payload, expected_count=layout.num_values,
                                   expected_digest=digest, expected_round=round,
                                   expected_dtype=self.value_dtype, require_finite=True)
            return layout.dense_tensors(values), mask, len(payload)

        for client_id, checked, num_samples in screen_replies(round, replies, check, rejected):
            dense, mask, size = checked  # type: ignore[misc]
            for n in self.shapes:
                sums[n] += dense[n].to(torch.float64) * num_samples
                # Dense parameters (biases, norms) are held by every client.
                weight[n] += (mask[n].to(torch.float64) if n in mask else 1.0) * num_samples
            clients, samples, nbytes = clients + 1, samples + num_samples, nbytes + size
        if clients == 0:
            raise RoundFailed(round, 0, 1, rejected)
        for n in self.shapes:
            held = weight[n] > 0
            averaged = (sums[n] / weight[n].clamp(min=1e-300)).to(torch.float32)
            self.weights[n] = torch.where(held, averaged, self.weights[n])
        return RoundUpdate(num_clients=clients, num_samples=samples, bytes_up=nbytes,
                           rejected=tuple(rejected))

    def global_mask(self) -> Mask:
        return self._union

    def state_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, prefixed("weights", self.weights)

    def load_state_dict(self, meta: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
        self._restore_weights(tensors)


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

