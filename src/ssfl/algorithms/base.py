"""The one interface every federated method implements, with the server and the client apart.

A method is an :class:`Algorithm`: an object built from the config that holds only constants
(shapes, density, its settings), plus two explicit kinds of state that it never keeps itself:

- the **server state** (one value per run, ``S``), passed in and returned by every server step
  and saved in checkpoints (``state_dict``/``load_state``);
- each **client's state** (``bytes`` or ``None``), passed in and returned by every client step
  and kept by whoever runs the client: a dict in the simulator, the node's ``context.state`` on
  Flower. Being bytes, it travels and checkpoints the same way everywhere.

Server side, in the order the run loop (``ssfl.run.loop``) calls it:

1. ``init()`` -> state; ``run_setup(state, ask)`` -> state: an optional phase before round 1 that
   talks to clients through ``ask`` (SSFL's mask round, PruneFL's initial pruning);
2. per round: ``configure(state, round, clients, attempt)`` -> what each sampled client
   receives; the loop screens every reply (``check`` decodes one and raises ``PayloadError`` if
   it is malformed), enforces ``federation.min_replies`` and retries; then
   ``aggregate(state, round, replies, sampled)`` -> (state, diagnostics);
3. ``eval_weights(state, client)``: the weights to evaluate (the global model, or a client's
   own model for personalised methods).

Client side: ``client_setup(kind, ctx, received, state)`` answers the set-up phase's messages
and ``client_step(ctx, received, state)`` is one round of local work. Both are pure functions of
their arguments (the model in ``ctx`` is a reused buffer: load what you need into it first).

Every message is real bytes in the ``ssfl.comm`` format, and the loop counts each one once in
its byte ledger; an algorithm never counts bytes itself.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from ssfl.client import LocalData, TrainResult, TrainSettings
from ssfl.comm import PayloadError
from ssfl.masks import Mask

S = TypeVar("S")  # an algorithm's server state


@dataclass(frozen=True)
class Setup:
    """What every party derives from the config alone (nothing of it travels)."""

    config: Any  # ssfl.config.Config
    shapes: dict[str, torch.Size]  # every parameter, in named_parameters order
    prunable: list[str]  # the Conv/Linear weights, in the same order
    initial: dict[str, torch.Tensor]  # the seeded initial weights (CPU, float32)
    num_clients: int
    client_sizes: tuple[int, ...] = ()  # samples per client where known (the server's split)

    @property
    def prunable_shapes(self) -> dict[str, torch.Size]:
        return {n: self.shapes[n] for n in self.prunable}

    @property
    def prunable_count(self) -> int:
        return sum(math.prod(s) for s in self.prunable_shapes.values())

    @property
    def seed(self) -> int:
        return int(self.config.run.seed)

    @property
    def density(self) -> float:
        return float(self.config.algorithm.density)

    @property
    def value_dtype(self) -> str:
        return str(self.config.comm.value_dtype)


@dataclass
class ClientContext:
    """Everything a client step may use besides the payload it received and its own state."""

    client_id: int
    round: int  # 0 in the set-up phase
    lr: float
    model: nn.Module  # a reused buffer on the training device: load what you need first
    data: LocalData
    settings: TrainSettings
    generator: torch.Generator  # seeded by (seed, round, client)
    setup: Setup
    #: seconds of the step's parts (decode, train, encode) where the step measures them
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientOutput:
    """A client's answer: the reply payload, its new state (None: none), what training did."""

    reply: bytes
    state: bytes | None
    result: TrainResult | None = None


@dataclass(frozen=True)
class Reply:
    """A reply that passed screening: who sent it, its claimed sample count, and what
    ``Algorithm.check`` decoded from it."""

    client_id: int
    num_samples: int
    update: Any


@dataclass(frozen=True)
class SetupReply:
    """A client's answer in the set-up phase (raw payload; the algorithm decodes it)."""

    client_id: int
    payload: bytes
    num_samples: int


class Ask(Protocol):
    """How the set-up phase talks to clients; the loop implements it over the transport and
    counts every payload in the byte ledger under ``label`` (a one-time cost)."""

    def query(self, kind: str, payloads: Mapping[int, bytes], *, label: str,
              all_required: bool = False) -> list[SetupReply]:
        """Send each client its payload with message ``kind``; the replies of the clients that
        answered, in the order asked. With ``all_required``, clients that failed are asked
        again (up to ``federation.max_round_attempts``), then the run stops."""
        ...

    def deliver(self, kind: str, payloads: Mapping[int, bytes], *, label: str) -> None:
        """Send each client its payload (acknowledged, nothing comes back)."""
        ...

    def pooled(self, kind: str) -> bytes:
        """Run ``client_setup(kind)`` once on the pooled data of every client (only where one
        process holds all data: the simulator); raises ``NotImplementedError`` elsewhere."""
        ...


class RoundFailed(RuntimeError):
    """Too few valid replies to aggregate a round; the server state was left unchanged."""

    def __init__(self, round: int, valid: int, required: int,
                 rejected: Sequence[Rejection] = ()) -> None:
        reasons = "; ".join(f"client {r.client_id}: {r.reason}" for r in rejected)
        super().__init__(
            f"round {round}: {valid} valid replies, at least {required} required"
            + (f" (rejected: {reasons})" if reasons else "")
        )
        self.round, self.valid, self.required = round, valid, required
        self.rejected = tuple(rejected)
        self.run_dir: object = None  # set by the loop: where the last checkpoint is


class SetupFailed(RuntimeError):
    """The set-up phase could not get what it needs from the clients."""


@dataclass(frozen=True)
class Rejection:
    """A client reply the server refused, and why (logged and recorded in the metrics)."""

    client_id: int
    reason: str


@dataclass(frozen=True)
class NoSettings:
    """Settings of a method that has none of its own."""


def build_settings(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """A method's settings dataclass from its config table (``[algorithm.<name>]``): unknown
    keys and wrong types are errors naming the key; each dataclass may check its own ranges in
    ``__post_init__`` by raising ``ValueError``."""
    from ssfl.config import ConfigError, coerce, did_you_mean

    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{where}.{key}'{did_you_mean(key, known)}; "
                              f"allowed: "
                              f"{sorted(known) or 'none (this method has no settings)'}")
        default = known[key].default
        values[key] = coerce(f"{where}.{key}", value, type(default))
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class Algorithm(ABC, Generic[S]):
    """One federated method; see the module docstring for who calls what and when."""

    #: the name in ``algorithm.name`` (set by ``ssfl.algorithms.register``)
    name: ClassVar[str] = ""
    #: one line for listings and errors
    description: ClassVar[str] = ""
    #: the method's own settings, the table ``[algorithm.<name>]`` of the config
    Settings: ClassVar[type] = NoSettings
    #: each client keeps a model of its own: ``personal_accuracy`` evaluates it
    personalised: ClassVar[bool] = False
    #: each client trains in a mask of its own (``client_mask``); ``global_mask`` is the union
    per_client_masks: ClassVar[bool] = False
    #: needs every client's data in one place (``Ask.pooled``): simulator only
    needs_pooled_data: ClassVar[bool] = False
    #: honours ``federation.aggregator``, ``update_clip_norm`` and ``adaptive_clip`` (the robust
    #: rules of ``ssfl.algorithms.robust``) wherever it averages models (the server's aggregate;
    #: DisPFL: each client's neighbour average); the config refuses them for other methods
    robust_aggregation: ClassVar[bool] = False
    #: its ``aggregate`` takes ``trusted``: the server's own update on a clean sample, which
    #: ``federation.aggregator = "fltrust"`` computes with the method's own client step, from
    #: the state ``trusted_client_state`` gives
    trusted_reference: ClassVar[bool] = False

    def __init__(self, setup: Setup, settings: Any) -> None:
        self.setup = setup
        self.settings = settings

    @classmethod
    def check_config(cls, config: Any, settings: Any) -> None:
        """Refuse, with ``ConfigError``, a config this method cannot run (checked before any
        work; default: nothing to check beyond the settings themselves)."""

    @classmethod
    def rounds_dependence(cls, config: Any, settings: Any) -> str | None:
        """What of this method reads ``run.rounds`` in rounds already played (a schedule
        spread over the whole run), in words; None if nothing does (the default). A finished
        run of such a method cannot be continued to more rounds (``ssfl run --resume --rounds``):
        its played rounds would differ from those of a longer run."""
        return None

    # ---- server -----------------------------------------------------------------------------
    @abstractmethod
    def init(self) -> S:
        """The server state before the set-up phase."""

    def run_setup(self, state: S, ask: Ask) -> S:
        """The set-up phase before round 1 (default: none)."""
        return state

    def resync(self, state: S, ask: Ask) -> S:
        """Bring clients that lost their state (a resumed run on a transport that does not
        keep client states, such as a new Flower run) back to what the server expects."""
        return state

    def setup_record(self, state: S) -> dict[str, Any]:
        """What the set-up phase did, for ``mask.json`` (for example who scored)."""
        return {"scored_clients": []}

    @abstractmethod
    def configure(self, state: S, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        """What each sampled client receives this round (``attempt`` > 1: a retry)."""

    @abstractmethod
    def check(self, state: S, round: int, client_id: int, payload: bytes) -> Any:
        """Decode one client's reply, or raise ``PayloadError`` saying what is wrong."""

    @abstractmethod
    def aggregate(self, state: S, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[S, dict[str, Any]]:
        """The new state from the round's valid replies (in sampled order), and diagnostics
        for the round's metrics row (empty: none). ``sampled`` also lists clients whose reply
        failed or was rejected; ``refused`` those whose reply screening rejected (the robust
        default counts them among the hostile clients it tolerates: ``robust.after_refusals``).
        Methods with ``trusted_reference`` also take ``trusted`` (a ``Reply``: the server's own
        update on its clean sample) under ``federation.aggregator = "fltrust"``."""

    def trusted_client_state(self, state: S) -> bytes | None:
        """The client state the server's own client step starts from (``fltrust``: what any
        client holds after the set-up phase); only methods with ``trusted_reference``."""
        raise NotImplementedError(f"{self.name} takes no server-side reference update")

    @abstractmethod
    def eval_weights(self, state: S, client: int | None = None) -> dict[str, torch.Tensor]:
        """Dense tensors of the model to evaluate: the global one, or ``client``'s own (for
        methods without personal models, the global one)."""

    @abstractmethod
    def global_mask(self, state: S) -> Mask: ...

    def client_mask(self, state: S, client: int) -> Mask:
        """The mask ``client`` trains in (without per-client masks, the global one)."""
        return self.global_mask(state)

    @abstractmethod
    def final_values(self, state: S) -> torch.Tensor:
        """The global model as one flat vector (for checks and golden results)."""

    @abstractmethod
    def state_dict(self, state: S) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The server state as JSON-able metadata and tensors (checkpoints)."""

    @abstractmethod
    def load_state(self, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> S:
        """Inverse of ``state_dict``; raises ``ValueError`` if it does not fit this run."""

    # ---- client -----------------------------------------------------------------------------
    def client_setup(self, kind: str, ctx: ClientContext, received: bytes,
                     state: bytes | None) -> ClientOutput:
        """Answer a set-up message of ``kind`` (default: this method has none)."""
        raise PayloadError(f"{self.name} has no set-up message {kind!r}")

    @abstractmethod
    def client_step(self, ctx: ClientContext, received: bytes,
                    state: bytes | None) -> ClientOutput:
        """One round of local work on what the server sent."""

    def handle(self, kind: str, ctx: ClientContext, received: bytes,
               state: bytes | None) -> ClientOutput:
        """The client's entry point for any message: ``train`` or a set-up ``kind``."""
        if kind == TRAIN:
            return self.client_step(ctx, received, state)
        return self.client_setup(kind, ctx, received, state)


#: the message kind of a training round (set-up kinds are the algorithm's own names)
TRAIN = "train"
