"""Helpers for the method tests (test_sparsyfed.py, test_dispfl.py): an algorithm on a
hand-sized model, a client context, the run loop's own screening and round on canned replies,
a transport that loses its clients' states, and capturing the state of a whole run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ssfl.algorithms.base import Algorithm, ClientContext, Rejection, Reply, Setup
from ssfl.client import LocalData, TrainSettings
from ssfl.config import load_config
from ssfl.run.loop import ClientReply, Run, Transport, play_round, screen
from ssfl.sim import InProcessTransport

#: (client, payload, claimed sample count): a reply as a transport hands it to the loop (a
#: payload of None: the reply was lost, see ``CannedTransport``)
Canned = tuple[int, bytes | None, int]


def make_setup(initial: Mapping[str, torch.Tensor], prunable: Sequence[str], density: float,
               num_clients: int = 4, overrides: Iterable[str] = (),
               name: str = "sparsyfed") -> Setup:
    """The ``Setup`` of a hand-sized model (``initial``: its weights, in parameter order).
    Its aggregation is the paper's plain FedAvg (no adaptive clipping, which the default
    "auto" would add) unless ``overrides`` say otherwise: the hand computations are of it."""
    config = load_config(None, [f"algorithm.name={name}", f"algorithm.density={density}",
                                f"federation.num_clients={num_clients}",
                                "federation.clients_per_round=1", "federation.aggregator=mean",
                                *overrides])
    return Setup(config, {n: t.shape for n, t in initial.items()}, list(prunable),
                 {n: t.detach().clone() for n, t in initial.items()}, num_clients)


def make_ctx(setup: Setup, model: torch.nn.Module, data: LocalData, client_id: int,
             round: int, lr: float, generator: torch.Generator,
             settings: TrainSettings) -> ClientContext:
    return ClientContext(client_id=client_id, round=round, lr=lr, model=model, data=data,
                         settings=settings, generator=generator, setup=setup)


def screen_replies(alg: Algorithm[Any], state: Any, round: int,
                   replies: Iterable[Canned]) -> tuple[list[Reply], list[Rejection]]:
    """The run loop's own screening (``ssfl.run.loop.screen``: duplicate senders, sample
    counts, then ``alg.check``) of canned replies."""
    run = SimpleNamespace(algorithm=alg, state=state, client_sizes=())
    replies = list(replies)
    return screen(run, round, [ClientReply(c, b"", p, n, 1.0)  # type: ignore[arg-type]
                               for c, p, n in replies], [c for c, _, _ in replies])


class CannedTransport(Transport):
    """Answers an attempt of a round with that attempt's canned replies (the last list again
    for later attempts; a payload of ``None``: the client's reply was lost), and every asked
    client without a canned reply with an error reply (it dropped out); records what was sent.
    Canned replies come from asked clients only, as from a real transport."""

    def __init__(self, attempts: Sequence[Sequence[Canned]]) -> None:
        self.attempts = attempts
        self.sent: list[dict[int, bytes]] = []

    def exchange(self, kind: str, round: int, lr: float, payloads: Mapping[int, bytes],
                 attempt: int = 1, *, ack: bool = False) -> list[ClientReply]:
        self.sent.append(dict(payloads))
        canned = self.attempts[min(attempt, len(self.attempts)) - 1]
        assert {c for c, _, _ in canned} <= payloads.keys(), "a reply from a client not asked"
        out = [ClientReply(c, payloads[c], b"", 0, math.nan, error="reply lost") if p is None
               else ClientReply(c, payloads[c], p, n, 1.0) for c, p, n in canned]
        answered = {c for c, _, _ in canned}
        out += [ClientReply(c, down, b"", 0, math.nan, error="dropped out")
                for c, down in payloads.items() if c not in answered]
        return out


def loop_run(alg: Algorithm[Any], state: Any, attempts: Sequence[Sequence[Canned]],
             *overrides: str) -> Run:
    """A run of the real loop at ``state`` whose transport answers with canned replies, every
    client sampled in every round: ``play_round(run, round)`` then screens, enforces
    ``federation.min_replies``, retries, aggregates into ``run.state`` and counts the bytes
    (``run.ledger``) as in any run, and raises ``RoundFailed`` as the loop does."""
    n = alg.setup.num_clients
    config = load_config(None, [f"federation.num_clients={n}",
                                f"federation.clients_per_round={n}", *overrides])
    run = Run(SimpleNamespace(config=config), CannedTransport(attempts), alg,  # type: ignore
              SimpleNamespace(path=None))
    run.state = state
    return run


class Forgetful(InProcessTransport):
    """The simulator, except that its clients lose their states when a run is resumed (as a
    new Flower run does): nothing of them is checkpointed, so the loop re-syncs them."""

    keeps_client_state = False

    def client_states(self) -> dict[int, bytes]:
        return {}

    def load_client_states(self, states: Mapping[int, bytes]) -> None:
        self.states = {}


class Stop(Exception):
    """Raised from ``on_round`` to cut a run short (a crash after a checkpoint)."""


def stop_after(round: int) -> Callable[[dict[str, Any]], None]:
    def on_round(row: dict[str, Any]) -> None:
        if row["round"] == round:
            raise Stop

    return on_round


def run_on(transport: str, config: Any, folder: Path, **options: Any) -> Any:
    """One run in ``folder`` on the simulator (``"sim"``: client states saved with its
    checkpoints) or on a transport whose clients lose their state on resume (``"forgetful"``,
    as a new Flower run); ``options`` go to the run (``resume``, ``on_round``)."""
    from ssfl.run.loop import run
    from ssfl.sim import prepare, run_experiment

    if transport == "sim":
        return run_experiment(config, folder, **options)
    exp = prepare(config)
    return run(exp, Forgetful(exp), folder, **options)


def timeless(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows without their timings (which differ between runs)."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def folder_rows(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return timeless(json.loads(line) for line in lines)


def capture(monkeypatch: pytest.MonkeyPatch, cls: type[Algorithm[Any]]) -> dict[str, Any]:
    """Record, for every run of ``cls`` in this test: the algorithm object (``alg``), the
    server state after each aggregation (``states``) and the valid replies it aggregated
    (``replies``), and the state each ``configure`` saw with its round, clients and attempt
    (``configured``)."""
    seen: dict[str, Any] = {"states": [], "replies": [], "configured": []}
    aggregate, configure = cls.aggregate, cls.configure

    def recording_aggregate(self, state, round, replies, sampled, refused=()):  # type: ignore[no-untyped-def]
        seen["alg"] = self
        new, diagnostics = aggregate(self, state, round, replies, sampled, refused)
        seen["states"].append(new)
        seen["replies"].append(list(replies))
        return new, diagnostics

    def recording_configure(self, state, round, clients, attempt):  # type: ignore[no-untyped-def]
        seen["configured"].append((round, list(clients), attempt, state))
        return configure(self, state, round, clients, attempt)

    monkeypatch.setattr(cls, "aggregate", recording_aggregate)
    monkeypatch.setattr(cls, "configure", recording_configure)
    return seen


__all__ = ["Canned", "CannedTransport", "Forgetful", "Stop", "capture", "folder_rows",
           "loop_run", "make_ctx", "make_setup", "play_round", "screen_replies", "stop_after",
           "timeless"]
