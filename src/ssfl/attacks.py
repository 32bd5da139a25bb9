"""Hostile clients for robustness studies, in the simulator (``[attack]`` in the config).

In every exchange the first ``hostile_per_round`` clients asked (the round's sample is sorted,
so these are random clients) are hostile: each computes its honest reply and then tampers with
it before it reaches the server, so exactly that many hostile replies arrive per round. The
attacks work on the global-mask methods (SSFL, the SNIP and random-mask baselines, dense
FedAvg), whose reply is one vector of values over the mask the client received:

- ``huge``: every value 1e30 (finite, so no NaN check stops it);
- ``boost``: the client's change to the global model times ``boost`` (20: model replacement);
- ``sign_flip``: the change reversed (``global - change``);
- ``zeros``: every value 0 (a client that wipes the model);
- ``inflate_samples``: the honest update, claiming 10^9 samples;
- ``replay``: the first update any hostile client computed, re-sent in every later round
  under that round's header (a stale model, as a lagging or colluding node would send);
- ``poison_scores``: in the mask round, the largest finite float32 (3.4e38) as the saliency of
  every weight outside the last prunable layer and 0 inside it (all non-negative, so no
  screening can reject it): under a plain mean of scores the top-k keeps no weight of the last
  layer. Training replies stay honest. A lean mask round's form is kept (``score_dtype``,
  saturated where the dtype cannot hold 3.4e38; with ``score_topk``, its k' scores on the
  earliest weights).

The attacker knows the protocol (it re-encodes under the right header and digest), so these
attacks test the aggregation rule, not the payload checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ssfl.client import encode_score_vector
from ssfl.comm import (
    PAYLOAD_DTYPES,
    VALUE_DTYPES,
    PayloadKind,
    decode_values,
    encode_values,
    payload_parts,
    read_header,
)
from ssfl.config import Config

#: the sample count an ``inflate_samples`` client claims
INFLATED_SAMPLES = 10**9
#: the largest finite float32: the strongest score a payload check cannot call invalid
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class Attacker:
    """The hostile clients' shared behaviour for one run (``replay`` remembers an update)."""

    kind: str
    hostile_per_round: int
    boost: float = 20.0
    #: the sizes of the prunable layers in score order (for ``poison_scores``)
    layer_sizes: Sequence[int] = ()
    _replayed: torch.Tensor | None = field(default=None, repr=False)

    def hostile(self, clients: Sequence[int]) -> set[int]:
        """The hostile ones among the clients asked in one exchange."""
        return set(list(clients)[: self.hostile_per_round])

    def tamper(self, kind: str, received: bytes, reply: bytes,
               num_samples: int) -> tuple[bytes, int]:
        """A hostile client's reply and sample claim, made from its honest ones. ``kind`` is the
        message kind (``train`` or a set-up kind such as ``scores``)."""
        if not reply:
            return reply, num_samples
        header = read_header(reply)
        # Score payloads: dense (SCORES) or a client's top scores (positions, then SCORES).
        if header.kind == PayloadKind.SCORES or kind == "scores":
            return (self.poison(reply) if self.kind == "poison_scores" else reply), num_samples
        if kind != "train" or header.kind != PayloadKind.VALUES:
            return reply, num_samples
        if self.kind == "inflate_samples":
            return reply, INFLATED_SAMPLES
        if self.kind == "poison_scores":
            return reply, num_samples
        values = decode_values(reply)
        reference = decode_values(received)
        if reference.numel() != values.numel():
            raise ValueError("the attack simulation needs a method whose replies are values over "
                             "the payload it received (a global-mask method)")
        if self.kind == "huge":
            values = torch.full_like(values, 1e30)
        elif self.kind == "boost":
            values = reference + self.boost * (values - reference)
        elif self.kind == "sign_flip":
            values = reference - (values - reference)
        elif self.kind == "zeros":
            values = torch.zeros_like(values)
        elif self.kind == "replay":
            if self._replayed is None:
                self._replayed = values.clone()
            values = self._replayed
        dtype = next(name for name, (code, _) in VALUE_DTYPES.items() if code == header.dtype_code)
        return encode_values(values, round=header.round, digest=header.digest,
                             dtype=dtype), num_samples

    def poison(self, reply: bytes) -> bytes:
        """The poisoned scores in the form of the honest payload (its dtype; its number of
        scores when it sends only its top ones, which then go to the earliest positions)."""
        parts = payload_parts(reply)
        values = read_header(parts[-1])
        top = values.count if len(parts) > 1 else 0
        total = sum(self.layer_sizes) if top and self.layer_sizes else values.count
        dtype = next(n for n, code in PAYLOAD_DTYPES.items() if code == values.dtype_code)
        last = self.layer_sizes[-1] if self.layer_sizes else 0
        poisoned = torch.full((total,), FLOAT32_MAX)
        if last:
            poisoned[-last:] = 0.0
        return encode_score_vector(poisoned, dtype=dtype, top=top)


def attacker_for(config: Config, layer_sizes: Sequence[int]) -> Attacker | None:
    """The run's attacker as ``[attack]`` says (None: every client is honest)."""
    if config.attack.kind == "none":
        return None
    return Attacker(config.attack.kind, config.attack.hostile_per_round, config.attack.boost,
                    tuple(layer_sizes))
