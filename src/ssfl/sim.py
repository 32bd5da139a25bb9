"""In-process simulator: every client of a federation, one after another, in one process.

Clients share one reused model object (memory does not grow with the number of clients) and one
uint8 image tensor (clients are index sets into it). Every message still goes through the same
payload encoding as a real deployment, so every byte count is the length of a real payload. The
experiment logic lives in ``ssfl.engine``; this module only carries payloads to clients in
process.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssfl.client import LocalData, client_generator, compute_scores, encode_scores
from ssfl.config import Config
from ssfl.engine import (  # re-exported: the simulator's public API
    ClientReply,
    Experiment,
    RunResult,
    Transport,
    learning_rate,
    make_run_dir,
    prepare,
    run,
    sample_clients,
    train_settings,
)
from ssfl.strategies import TrainingStrategy

logger = logging.getLogger(__name__)

__all__ = ["InProcessTransport", "RunResult", "learning_rate", "make_run_dir", "run_experiment",
           "sample_clients"]


class InProcessTransport(Transport):
    """Runs each client's code in this process, on the experiment's one shared model."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.clients = [exp.client(c) for c in range(len(exp.parts))]
        self.settings = train_settings(exp.config)

    def _score_batches(self) -> tuple[int, int]:
        algo = self.exp.config.algorithm
        return algo.saliency_batches, algo.saliency_batch_size or self.exp.config.train.batch_size

    def _crashes(self, round: int, client_id: int, attempt: int) -> bool:
        """Injected fault: does this client crash in this attempt of this round (seeded)?"""
        rate = self.exp.config.federation.failure_rate
        if rate <= 0:
            return False
        rng = np.random.default_rng([self.exp.config.run.seed, round, client_id, attempt, 1])
        return bool(rng.random() < rate)

    def collect_scores(self, client_ids: Sequence[int]) -> Iterator[tuple[int, bytes, int]]:
        batches, batch_size = self._score_batches()
        seed = self.exp.config.run.seed
        for cid in client_ids:
            if self._crashes(0, cid, 1):
                logger.warning("mask round: client %d failed (injected crash)", cid)
                continue
            scores = compute_scores(self.exp.model, self.clients[cid], num_batches=batches,
                                    batch_size=batch_size,
                                    generator=client_generator(seed, 0, cid))
            yield cid, encode_scores(scores), len(self.clients[cid])

    def pooled_scores(self) -> dict[str, torch.Tensor]:
        # The oracle sees as many samples as the federated mask round, drawn from all data.
        batches, batch_size = self._score_batches()
        t = self.exp.train_set
        pooled = LocalData(t.images, t.labels, torch.from_numpy(np.concatenate(self.exp.parts)),
                           t.mean, t.std)
        return compute_scores(self.exp.model, pooled, num_batches=batches * len(self.clients),
                              batch_size=batch_size,
                              generator=client_generator(self.exp.config.run.seed, 0,
                                                         len(self.clients)))

    def deliver_mask(self, payload: bytes | None) -> int:
        # Every client receives the bitmap once; in process they read the strategy's mask.
        return 0 if payload is None else len(payload) * len(self.clients)

    def train(self, round: int, lr: float, client_ids: Sequence[int],
              strategy: TrainingStrategy, attempt: int = 1) -> Iterator[ClientReply]:
        seed = self.exp.config.run.seed
        for cid in client_ids:
            down = strategy.payload_for(cid, round)
            if self._crashes(round, cid, attempt):
                yield ClientReply(cid, down, b"", 0, math.nan, error="injected crash")
                continue
            try:
                reply, result = strategy.client_update(
                    self.exp.model, down, self.clients[cid], self.settings, client_id=cid,
                    round=round, lr=lr, generator=client_generator(seed, round, cid),
                )
            except Exception as exc:  # a crashing client must not take the server down
                yield ClientReply(cid, down, b"", 0, math.nan,
                                  error=f"client raised {type(exc).__name__}: {exc}")
                continue
            yield ClientReply(cid, down, reply, result.num_samples, result.mean_loss)


def run_experiment(
    config: Config,
    run_dir: Path | None = None,
    *,
    write: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Run one federated experiment as ``config`` says and (if ``write``) save it to a folder.

    With ``resume``, ``run_dir`` is a run folder with a checkpoint: the run continues after the
    checkpoint's round and ends exactly as an uninterrupted run would (all randomness is drawn
    from (seed, round, client), so no RNG state needs saving).
    """
    exp = prepare(config)
    return run(exp, InProcessTransport(exp), run_dir, write=write, resume=resume,
               progress=progress, on_round=on_round)
