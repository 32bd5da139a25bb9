"""In-process simulator: every client of a federation, one after another, in one process.

Clients share one reused model object (memory does not grow with the number of clients) and one
uint8 image tensor (clients are index sets into it). Every message still goes through the same
payload encoding as a real deployment, so every byte count is the length of a real payload.
This module only carries payloads: the method is ``ssfl.algorithms``, the loop ``ssfl.run``.
Each client's state is kept in a dict here (and saved with the checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssfl.algorithms import Algorithm, build
from ssfl.algorithms.base import TRAIN, ClientContext
from ssfl.attacks import attacker_for
from ssfl.client import LocalData, TrainSettings, client_generator
from ssfl.config import Config
from ssfl.run.experiment import (  # re-exported: the simulator's public API
    Experiment,
    learning_rate,
    make_run_dir,
    make_setup,
    prepare,
    sample_clients,
    train_settings,
)
from ssfl.run.loop import ClientReply, RunResult, Transport, run

__all__ = ["InProcessTransport", "RunResult", "learning_rate", "make_run_dir", "run_experiment",
           "sample_clients"]


#: the random stream that draws fltrust's clean sample (apart from the split's and clients')
ROOT_SAMPLE_STREAM = 7


class InProcessTransport(Transport):
    """Runs each client's code in this process, on the experiment's one shared model."""

    keeps_client_state = True
    in_process = True

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.algorithm: Algorithm[Any] = build(exp.config, make_setup(exp))
        self.clients = [exp.client(c) for c in range(len(exp.parts))]
        self.settings: TrainSettings = train_settings(exp.config)
        self.states: dict[int, bytes] = {}
        self.local_model_hook: Callable[[int, Any], None] | None = None
        self.root: LocalData | None = None  # fltrust's clean sample, drawn at first use
        # Simulated hostile clients ([attack]); None in an honest run.
        self.attacker = attacker_for(exp.config, [
            math.prod(s) for s in self.algorithm.setup.prunable_shapes.values()])

    def bind(self, algorithm: Algorithm[Any]) -> None:
        self.algorithm = algorithm

    def _crashes(self, round: int, client_id: int, attempt: int) -> bool:
        """Injected fault: does this client crash in this attempt of this round (seeded)?"""
        rate = self.exp.config.federation.failure_rate
        if rate <= 0:
            return False
        rng = np.random.default_rng([self.exp.config.run.seed, round, client_id, attempt, 1])
        return bool(rng.random() < rate)

    def _context(self, cid: int, round: int, lr: float, data: LocalData) -> ClientContext:
        return ClientContext(client_id=cid, round=round, lr=lr, model=self.exp.model,
                             data=data, settings=self.settings,
                             generator=client_generator(self.exp.config.run.seed, round, cid),
                             setup=self.algorithm.setup)

    def exchange(self, kind: str, round: int, lr: float, payloads: Mapping[int, bytes],
                 attempt: int = 1, *, ack: bool = False) -> list[ClientReply]:
        replies = []
        hostile = self.attacker.hostile(list(payloads)) if self.attacker and not ack else set()
        for cid, down in payloads.items():
            if not ack and self._crashes(round, cid, attempt):
                replies.append(ClientReply(cid, down, b"", 0, math.nan, error="injected crash"))
                continue
            ctx = self._context(cid, round, lr, self.clients[cid])
            try:
                out = self.algorithm.handle(kind, ctx, down, self.states.get(cid))
            except Exception as exc:  # a crashing client must not take the server down
                replies.append(ClientReply(cid, down, b"", 0, math.nan,
                                           error=f"client raised {type(exc).__name__}: {exc}"))
                continue
            if out.state is None:
                self.states.pop(cid, None)
            else:
                self.states[cid] = out.state
            if kind == TRAIN and self.local_model_hook is not None:
                self.local_model_hook(cid, self.exp.model)  # the model it just trained
            result = out.result
            reply = out.reply
            samples = result.num_samples if result else len(self.clients[cid])
            if cid in hostile:
                reply, samples = self.attacker.tamper(kind, down, reply, samples)
            replies.append(ClientReply(cid, down, reply, samples,
                                       result.mean_loss if result else math.nan))
        return replies

    def pooled(self, algorithm: Algorithm[Any], kind: str) -> bytes:
        # The pooled data is a virtual client after the last one (its own RNG stream).
        t = self.exp.train_set
        pooled = LocalData(t.images, t.labels, torch.from_numpy(np.concatenate(self.exp.parts)),
                           t.mean, t.std)
        ctx = self._context(len(self.clients), 0, 0.0, pooled)
        return algorithm.client_setup(kind, ctx, b"", None).reply

    def trusted_update(self, algorithm: Algorithm[Any], round: int, lr: float, payload: bytes,
                       state: bytes | None) -> tuple[bytes, int]:
        if self.root is None:
            # Drawn once, uniformly from the whole training set (seeded by the run's seed):
            # a small sample of the task's distribution, as FLTrust's server holds.
            t = self.exp.train_set
            pool = np.concatenate(self.exp.parts)
            rng = np.random.default_rng([self.exp.config.run.seed, ROOT_SAMPLE_STREAM])
            size = min(self.exp.config.federation.root_samples
                       or max(1, len(pool) // len(self.exp.parts)), len(pool))
            picked = np.sort(rng.choice(len(pool), size=size, replace=False))
            self.root = LocalData(t.images, t.labels, torch.from_numpy(pool[picked]), t.mean,
                                  t.std)
        ctx = self._context(len(self.clients) + 1, round, lr, self.root)
        return algorithm.handle(TRAIN, ctx, payload, state).reply, len(self.root)

    def client_states(self) -> dict[int, bytes]:
        return dict(self.states)

    def watch_local_models(self, hook: Callable[[int, Any], None]) -> None:
        self.local_model_hook = hook

    def load_client_states(self, states: Mapping[int, bytes]) -> None:
        self.states = dict(states)


def run_experiment(
    config: Config,
    run_dir: Path | None = None,
    *,
    write: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run one federated experiment as ``config`` says and (if ``write``) save it to a folder.

    With ``resume``, ``run_dir`` is a run folder with a checkpoint: the run continues after the
    checkpoint's round and ends exactly as an uninterrupted run would.
    """
    exp = prepare(config)
    return run(exp, InProcessTransport(exp), run_dir, write=write, resume=resume, force=force,
               progress=progress, on_round=on_round)
