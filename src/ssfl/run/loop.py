"""The run loop: one federated run, whatever method it runs and whatever carries the messages.

It owns everything that is the same for every method: set-up of the run folder, the set-up
phase's messages, per round the seeded client sample, sending, collecting, screening (checks,
then ``federation.min_replies``, then retries), aggregation, evaluation under both protocols,
the metrics row, checkpoints, and the byte ledger. The method (``ssfl.algorithms``) decides what
the payloads hold; a ``Transport`` only moves them (``ssfl.sim`` in process, ``ssfl.flower``
over Flower), so both produce the same mask and metrics.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssfl import algorithms, privacy
from ssfl.algorithms.base import (
    TRAIN,
    Algorithm,
    Rejection,
    Reply,
    RoundFailed,
    SetupFailed,
    SetupReply,
)
from ssfl.algorithms.common import load_weights_
from ssfl.checkpoint import FILENAME as CHECKPOINT, CheckpointError, load_checkpoint
from ssfl.client import evaluate_samples
from ssfl.comm import PayloadError, encode_values, payload_parts, read_header
from ssfl.config import Config, ConfigError
from ssfl.loggers import RoundLogger, open_loggers
from ssfl.masks import Mask, layer_densities, mask_density, mask_digest
from ssfl.run.checkpoints import restore, save, verify
from ssfl.run.experiment import (
    Experiment,
    device_name,
    learning_rate,
    make_run_dir,
    make_setup,
    sample_clients,
)
from ssfl.run.ledger import DOWN, RESYNC, ROUND, SETUP, UP, Ledger
from ssfl.run.records import RunFolder

logger = logging.getLogger(__name__)


# ---- what a transport does ----------------------------------------------------------------
@dataclass(frozen=True)
class ClientReply:
    client_id: int
    down: bytes  # what the server sent this client
    payload: bytes  # what the client sent back (empty if it failed)
    num_samples: Any  # as the client claimed it (screened by the loop)
    train_loss: float
    error: str = ""  # why the client gave no reply (crashed, timed out, disconnected)


@dataclass(frozen=True)
class SecureReplies:
    """A training round under secure aggregation: the server learns the weighted mean of the
    value vectors of the clients in the sum, never one client's vector."""

    #: one per sampled client: ``payload`` as long as the masked vector it uploaded (for the
    #: byte ledger; its content is not kept); ``error`` says why a client is not in the sum
    replies: list[ClientReply]
    #: the weighted mean (by sample count) of the summed clients' value vectors; None: the
    #: protocol stopped (``problem`` says why) and nothing can be aggregated
    mean: torch.Tensor | None
    summed: tuple[int, ...]  # the clients in the mean
    #: the protocol's own bytes this round (keys, encrypted shares), both directions
    protocol_down: int = 0
    protocol_up: int = 0
    problem: str = ""


class Transport(ABC):
    """Moves payloads between the server and the clients; holds no FL logic."""

    #: True where the clients' states survive with the server's checkpoint (the simulator
    #: saves them in it); False where a resumed run starts with clients that lost theirs.
    keeps_client_state: bool = False
    #: the clients run in this process (the simulator), not on machines of their own
    in_process: bool = False
    #: training rounds go through ``exchange_mean`` (secure aggregation): the loop aggregates
    #: the mean it returns instead of screening each client's reply
    secure_aggregation: bool = False

    def check_supported(self, algorithm: type[Algorithm[Any]]) -> None:
        """Raise ``ConfigError`` before any work if this transport cannot run ``algorithm``."""

    def bind(self, algorithm: Algorithm[Any]) -> None:
        """The run's method, for transports that run its client side in this process."""

    @abstractmethod
    def exchange(self, kind: str, round: int, lr: float, payloads: Mapping[int, bytes],
                 attempt: int = 1, *, ack: bool = False) -> list[ClientReply]:
        """Send each client its payload as a message of ``kind``; one reply per client, in the
        order of ``payloads`` (the order of the server's sums), ``error`` set for a client
        that failed. ``ack``: a delivery, whose replies carry no payload."""

    def exchange_mean(self, round: int, lr: float, payloads: Mapping[int, bytes],
                      attempt: int = 1) -> SecureReplies:
        """A training round under secure aggregation (where ``secure_aggregation``)."""
        raise NotImplementedError("this transport has no secure aggregation")

    def pooled(self, algorithm: Algorithm[Any], kind: str) -> bytes:
        raise NotImplementedError("this transport has no pooled data (the simulator has)")

    def trusted_update(self, algorithm: Algorithm[Any], round: int, lr: float, payload: bytes,
                       state: bytes | None) -> tuple[bytes, int]:
        """``fltrust``: the method's client step run by the server on its own clean sample
        (``federation.root_samples`` images), from ``payload`` and client ``state``; the reply
        and the sample's size. Nothing travels, so nothing is counted."""
        raise NotImplementedError("this transport holds no clean sample on the server (the "
                                  "simulator does)")

    def client_states(self) -> dict[int, bytes]:
        """The clients' states, to save with a checkpoint (where this transport keeps them)."""
        return {}

    def watch_local_models(self, hook: Callable[[int, Any], None]) -> None:
        """Call ``hook(client, model)`` with each client's model right after it trained, where
        this transport holds it (the simulator); elsewhere nothing is called."""

    def load_client_states(self, states: Mapping[int, bytes]) -> None:
        """Restore what ``client_states`` returned."""

    def round_info(self) -> dict[str, Any]:
        """Extra per-round measurements (for example time in the network) for the metrics."""
        return {}

    def summary_info(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    final_values: torch.Tensor
    mask: dict[str, torch.Tensor]


# ---- the set-up phase's messages, counted in the ledger ------------------------------------
class LedgerAsk:
    """``Ask`` over a transport: set-up messages, every payload counted under its label."""

    def __init__(self, transport: Transport, algorithm: Algorithm[Any], ledger: Ledger,
                 attempts: int, phase: str = SETUP, sizes: Sequence[int] = ()) -> None:
        self.transport, self.algorithm, self.ledger = transport, algorithm, ledger
        self.attempts, self.phase, self.sizes = attempts, phase, sizes

    def _send(self, kind: str, payloads: Mapping[int, bytes], label: str, attempt: int,
              ack: bool) -> list[ClientReply]:
        replies = self.transport.exchange(kind, 0, 0.0, payloads, attempt, ack=ack)
        self.ledger.count(self.phase, label, DOWN, (r.down for r in replies))
        self.ledger.count(self.phase, label, UP, (r.payload for r in replies if not r.error))
        for r in replies:
            if r.error:
                logger.warning("%s: client %d failed: %s", kind, r.client_id, r.error)
        return replies

    def query(self, kind: str, payloads: Mapping[int, bytes], *, label: str,
              all_required: bool = False) -> list[SetupReply]:
        answered: dict[int, SetupReply] = {}
        pending = dict(payloads)
        for attempt in range(1, (self.attempts if all_required else 1) + 1):
            for r in self._send(kind, pending, label, attempt, ack=False):
                if r.error or r.client_id not in pending or r.client_id in answered:
                    continue
                try:
                    answered[r.client_id] = SetupReply(
                        r.client_id, bytes(r.payload),
                        check_sample_count(r.num_samples, r.client_id, self.sizes))
                except (PayloadError, TypeError) as exc:
                    logger.warning("%s: rejected reply of client %d: %s", kind, r.client_id, exc)
            pending = {c: p for c, p in pending.items() if c not in answered}
            if not pending:
                break
        if all_required and pending:
            raise SetupFailed(f"{kind}: clients {sorted(pending)} did not answer in "
                              f"{self.attempts} attempts")
        return [answered[c] for c in payloads if c in answered]

    def deliver(self, kind: str, payloads: Mapping[int, bytes], *, label: str) -> None:
        failed = [r for r in self._send(kind, payloads, label, 1, ack=True) if r.error]
        if failed:
            raise SetupFailed(f"{kind}: could not deliver to clients "
                              f"{[r.client_id for r in failed]}: {failed[0].error}")

    def pooled(self, kind: str) -> bytes:
        return self.transport.pooled(self.algorithm, kind)


def check_sample_count(num_samples: object, client_id: int = -1,
                       sizes: Sequence[int] = ()) -> int:
    """A claimed sample count: a positive integer, and at most what the server's own split
    gives that client (where it knows)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise PayloadError(f"sample count must be a positive integer, got {num_samples!r}")
    if 0 <= client_id < len(sizes) and num_samples > sizes[client_id]:
        raise PayloadError(f"claims {num_samples} samples; its partition holds "
                           f"{sizes[client_id]}")
    return num_samples


# ---- one run ---------------------------------------------------------------------------------
@dataclass
class Run:
    """A run in progress: what the loop's steps read and update."""

    exp: Experiment
    transport: Transport
    algorithm: Algorithm[Any]
    folder: RunFolder
    state: Any = None
    ledger: Ledger = field(default_factory=Ledger)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    mask_info: dict[str, Any] = field(default_factory=dict)
    first_round: int = 1
    #: each client's sample count as the server's own split says (empty: unknown): a claim
    #: above it is rejected, so no client can buy weight in the average by inflating it
    client_sizes: tuple[int, ...] = ()
    started: float = 0.0  # perf_counter at the (virtual) start, earlier sessions included
    values_per_payload: int = 0
    #: the authors' personalised protocol: per client, the accuracy of its last local model
    #: (right after it trained) on its own test split; simulator only
    local_accuracy: dict[int, float] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.exp.config


def run(
    exp: Experiment,
    transport: Transport,
    run_dir: Path | None = None,
    *,
    write: bool = True,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``exp`` to the end (or, with ``resume``, on from the checkpoint in ``run_dir``;
    ``force``: even from one written by another ssfl version or commit)."""
    if exp.config.privacy.mode != "none":
        privacy.require_accountant()  # before any work: epsilon is reported every round
        if exp.config.privacy.noise_seed == "run" and not transport.in_process:
            logger.warning("privacy.noise_seed = 'run': the noise is drawn from run.seed, "
                           "which every client knows, so any client can subtract it; set "
                           "privacy.noise_seed = 'secret' for a deployment (docs/privacy.md)")
    if exp.config.federation.aggregator == "fltrust" and not transport.in_process:
        raise ConfigError("federation.aggregator = 'fltrust' trains on a clean sample held by "
                          "the server, which only the simulator has: choose another rule")
    algorithm = algorithms.build(exp.config, make_setup(exp))
    transport.check_supported(type(algorithm))
    transport.bind(algorithm)
    if exp.test_set is None:
        raise ValueError("the server needs the test set")
    checkpoint = load_for_resume(exp, run_dir, force=force) if resume else None
    folder = RunFolder.open(exp, make_run_dir(exp.config, run_dir) if write else None,
                            fresh=checkpoint is None)
    r = Run(exp, transport, algorithm, folder, client_sizes=tuple(len(p) for p in exp.parts))
    if exp.config.run.eval_every > 0:  # a run that never evaluates needs no local scores
        transport.watch_local_models(lambda cid, model: record_local_accuracy(r, cid, model))
    if checkpoint is None:
        set_up(r)
    else:
        restore(r, checkpoint, force=force)
        if not transport.keeps_client_state:
            ask = LedgerAsk(transport, algorithm, r.ledger, 1, phase=RESYNC)
            r.state = algorithm.resync(r.state, ask)
    folder.write_mask(r.mask_info)
    folder.start_metrics(r.metrics)
    loggers = open_loggers(exp.config.run.loggers, folder.path, exp.config)
    try:
        play_rounds(r, progress, with_loggers(loggers, on_round))
    finally:
        for logger_ in loggers:
            logger_.close()
    return finish(r)


def with_loggers(loggers: Sequence[RoundLogger], on_round: Callable[[dict[str, Any]], None]
                 | None) -> Callable[[dict[str, Any]], None] | None:
    """The per-round hook: the experiment loggers first, then the caller's callback."""
    if not loggers:
        return on_round

    def each_round(row: dict[str, Any]) -> None:
        for logger_ in loggers:
            logger_.log(row)
        if on_round is not None:
            on_round(row)

    return each_round


def load_for_resume(exp: Experiment, run_dir: Path | None, *, force: bool = False
                    ) -> tuple[dict[str, Any], Any]:
    if run_dir is None:
        raise ValueError("resume needs the run folder")
    if not (Path(run_dir) / CHECKPOINT).exists():
        raise CheckpointError(why_no_checkpoint(Path(run_dir), exp.config))
    meta, tensors = load_checkpoint(Path(run_dir) / CHECKPOINT)
    # Code version, data fingerprint, config and structure, before anything reads the metadata
    verify(meta, tensors, exp, force=force)
    before, now = meta.get("device"), device_name(exp.model)
    if before is not None and before != now:
        logger.warning("%s was checkpointed on %s and resumes on %s: the rest of the run "
                       "will differ in the last bits from an uninterrupted one", run_dir,
                       before, now)
    return meta, tensors


def why_no_checkpoint(folder: Path, config: Config) -> str:
    """The truth about a run folder without a checkpoint, and what to do."""
    if not (folder / "config.toml").exists():
        return f"{folder} is not a run folder (it has no config.toml): nothing to resume"
    every = config.run.checkpoint_every
    if every == 0:
        return (f"{folder} has no checkpoint: its run.checkpoint_every = 0 writes none; start "
                f"the run again (with run.checkpoint_every > 0 to make it resumable)")
    metrics = folder / "metrics.jsonl"
    rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    return (f"{folder} has no checkpoint: the run stopped after {rows} round(s), before its "
            f"first checkpoint (written every {every} rounds, and on Ctrl-C), so it was "
            f"killed or crashed early; start the run again")


def set_up(r: Run) -> None:
    """The set-up phase (mask round), timed, and the mask it left."""
    started = time.perf_counter()
    ask = LedgerAsk(r.transport, r.algorithm, r.ledger,
                    r.config.federation.max_round_attempts, sizes=r.client_sizes)
    r.state = r.algorithm.run_setup(r.algorithm.init(), ask)
    r.mask_info = {**mask_stats(r.algorithm.global_mask(r.state), r.exp.prunable),
                   **r.algorithm.setup_record(r.state),
                   "seconds": time.perf_counter() - started}
    r.started = time.perf_counter()


def mask_stats(mask: dict[str, torch.Tensor], prunable: list[str]) -> dict[str, Any]:
    return {
        "density": mask_density(mask),
        "kept": int(sum(int(m.sum()) for m in mask.values())),
        "prunable": int(sum(m.numel() for m in mask.values())),
        "per_layer": layer_densities(mask),
        "digest": mask_digest(mask, prunable).hex(),
    }


# ---- the rounds ------------------------------------------------------------------------------
def play_rounds(r: Run, progress: bool | None,
                on_round: Callable[[dict[str, Any]], None] | None) -> None:
    bar = Progress(r.config.run.rounds,
                   r.config.run.progress if progress is None else progress,
                   done=r.first_round - 1)
    last_accuracy = next((m["accuracy"] for m in reversed(r.metrics)
                          if m["accuracy"] is not None), None)
    done = Completed.of(r, r.first_round - 1)
    try:
        for rnd in range(r.first_round, r.config.run.rounds + 1):
            row = play_round(r, rnd)
            if is_eval_round(r.config, rnd):
                row.update(evaluate(r))
                last_accuracy = row["accuracy"]
            r.metrics.append(row)
            r.folder.append_row(row)
            done = Completed.of(r, rnd)
            if is_checkpoint_round(r.config, rnd) and r.folder.path is not None:
                save(r, rnd)
            if on_round is not None:
                on_round(row)
            bar.update(row, acc=f"{last_accuracy:.3f}" if last_accuracy is not None else "-",
                       loss=f"{row['train_loss']:.3f}")
    except KeyboardInterrupt:
        raise RunInterrupted(done.round, save_completed(r, done)) from None
    finally:
        bar.close()
        r.folder.close()


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during the rounds: the round in progress was abandoned and, where the run has a
    folder, a checkpoint of the last completed round written (``checkpoint``)."""

    def __init__(self, round: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted after round {round}")
        self.round = round
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Completed:
    """What the run held after its last completed round: the server state (a value), the
    clients' states and the byte ledger's entries (both copied), and the metrics rows."""

    round: int
    state: Any
    clients: dict[int, bytes]
    ledger: dict[tuple[str, int, str, str], int]
    rows: int
    local_accuracy: dict[int, float]

    @classmethod
    def of(cls, r: Run, rnd: int) -> Completed:
        return cls(rnd, r.state, r.transport.client_states(), dict(r.ledger.entries),
                   len(r.metrics), dict(r.local_accuracy))


def save_completed(r: Run, done: Completed) -> Path | None:
    """Put the run back to ``done`` (a round cut short may have moved the server state, some
    clients' states and the ledger) and checkpoint it; the checkpoint's path, or None when the
    run writes no folder."""
    if r.folder.path is None:
        return None
    r.state = done.state
    r.transport.load_client_states(done.clients)
    r.ledger.entries = dict(done.ledger)
    r.local_accuracy = dict(done.local_accuracy)
    del r.metrics[done.rows:]
    save(r, done.round)
    return r.folder.path / CHECKPOINT


def play_round(r: Run, rnd: int) -> dict[str, Any]:
    """Sample, send, collect, screen (retrying a round with too few valid replies), aggregate;
    the round's metrics row, without evaluation."""
    config = r.config
    started = time.perf_counter()
    lr = learning_rate(config, rnd)
    chosen = sample_clients(config.run.seed, rnd, config.federation.num_clients,
                            config.federation.clients_per_round)
    failed: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    attempts = config.federation.max_round_attempts
    for attempt in range(1, attempts + 1):
        if r.transport.secure_aggregation:
            replies, valid, counted, rejected = secure_attempt(r, rnd, lr, chosen, attempt,
                                                               failed)
        else:
            replies = send_and_collect(r, rnd, lr, chosen, attempt, failed)
            valid, rejected = screen(r, rnd, replies, chosen)
            counted = valid
        screened_at = time.perf_counter()
        rejections += [{"client": x.client_id, "attempt": attempt, "reason": x.reason}
                       for x in rejected]
        if len(counted) >= config.federation.min_replies:
            break
        failure = RoundFailed(rnd, len(counted), config.federation.min_replies, rejected)
        logger.warning("%s; attempt %d of %d", failure, attempt, attempts)
        if attempt == attempts:
            failure.run_dir = r.folder.path
            raise failure
    # Refused: sampled clients none of whose replies passed screening (a reply under another
    # client's id, or a second one beside a valid reply, says nothing about who is left).
    accepted = {x.client_id for x in valid}
    refused = sorted({x.client_id for x in rejected if x.client_id in chosen} - accepted)
    extra = ({"trusted": server_reference(r, rnd, lr)}
             if config.federation.aggregator == "fltrust" else {})
    r.state, diagnostics = r.algorithm.aggregate(r.state, rnd, valid, chosen, refused, **extra)
    aggregation_seconds = time.perf_counter() - screened_at
    down, up = r.ledger.round_bytes(rnd)
    losses = valid_losses(replies, counted)
    row: dict[str, Any] = {
        "round": rnd, "accuracy": None, "test_loss": None,
        "train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses),
        "bytes_down": down, "bytes_up": up, "bytes_cumulative": r.ledger.total(),
        "seconds": time.perf_counter() - started, "lr": lr, "clients": chosen,
        "aggregation_seconds": aggregation_seconds, **r.transport.round_info(),
    }
    if failed:
        row["failed"] = failed
    if failed or attempt > 1:
        row["attempts"] = attempt
    if rejections:
        row["rejected"] = rejections
    if diagnostics:
        row["diagnostics"] = diagnostics
    if config.privacy.mode != "none":  # the guarantee after this round's release
        row["epsilon"] = privacy.report(privacy.config_epsilon(config, rnd))
    return row


def server_reference(r: Run, rnd: int, lr: float) -> Reply:
    """``fltrust``'s reference: the server trains the round's global model on its own clean
    sample with the method's own client step, as a client numbered after every real one (and
    after the pooled data's virtual client), so its random stream is its own."""
    client = r.config.federation.num_clients + 1
    payload = r.algorithm.configure(r.state, rnd, [client], 1)[client]
    reply, samples = r.transport.trusted_update(r.algorithm, rnd, lr, payload,
                                                r.algorithm.trusted_client_state(r.state))
    return Reply(client, samples, r.algorithm.check(r.state, rnd, client, reply))


def send_and_collect(r: Run, rnd: int, lr: float, chosen: Sequence[int], attempt: int,
                     failed: list[dict[str, Any]]) -> list[ClientReply]:
    """One attempt's messages; every byte sent and received goes into the ledger."""
    payloads = r.algorithm.configure(r.state, rnd, chosen, attempt)
    replies = r.transport.exchange(TRAIN, rnd, lr, payloads, attempt)
    r.ledger.count(ROUND, TRAIN, DOWN, (x.down for x in replies), round=rnd)
    # Every byte received counts, valid or not.
    r.ledger.count(ROUND, TRAIN, UP, (x.payload for x in replies if not x.error), round=rnd)
    for x in replies:
        if x.error:
            logger.warning("round %d attempt %d: client %d dropped: %s", rnd, attempt,
                           x.client_id, x.error)
            failed.append({"client": x.client_id, "attempt": attempt, "reason": x.error})
        elif x.down:
            # The values are the last part (a mask bitmap may come first).
            r.values_per_payload = read_header(payload_parts(x.down)[-1]).count
    return replies


def secure_attempt(r: Run, rnd: int, lr: float, chosen: Sequence[int], attempt: int,
                   failed: list[dict[str, Any]]
                   ) -> tuple[list[ClientReply], list[Reply], list[Reply], list[Rejection]]:
    """One attempt of a round under secure aggregation: the transport returns only the
    weighted mean of the summed clients' values. It goes to the method's ``aggregate`` as one
    reply (client id -1) carrying their total sample count: the weighted mean of one vector
    is that vector. Returns the replies, that one reply (or none), the summed clients (for
    ``min_replies`` and the train loss; no update) and the rejections."""
    payloads = r.algorithm.configure(r.state, rnd, chosen, attempt)
    got = r.transport.exchange_mean(rnd, lr, payloads, attempt)
    replies = got.replies
    r.ledger.count(ROUND, TRAIN, DOWN, (x.down for x in replies), round=rnd)
    r.ledger.count(ROUND, TRAIN, UP, (x.payload for x in replies if not x.error), round=rnd)
    # The protocol's own messages (keys, encrypted shares) are part of the round's cost.
    r.ledger.add(ROUND, "secagg", DOWN, got.protocol_down, round=rnd)
    r.ledger.add(ROUND, "secagg", UP, got.protocol_up, round=rnd)
    for x in replies:
        if x.error:
            logger.warning("round %d attempt %d: client %d is not in the sum: %s", rnd,
                           attempt, x.client_id, x.error)
            failed.append({"client": x.client_id, "attempt": attempt, "reason": x.error})
        elif x.down:
            r.values_per_payload = read_header(payload_parts(x.down)[-1]).count
    # Every client got the same payload: the mean has its values' count.
    count = read_header(payload_parts(replies[0].down)[-1]).count if replies else 0
    counted: list[Reply] = []
    try:
        if got.mean is None:
            raise PayloadError(got.problem or "secure aggregation gave no sum")
        for cid in got.summed:
            x = next(x for x in replies if x.client_id == cid)
            counted.append(Reply(cid, check_sample_count(x.num_samples, cid, r.client_sizes),
                                 None))
        if got.mean.numel() != count or not bool(torch.isfinite(got.mean).all()):
            raise PayloadError(f"the unmasked mean has {got.mean.numel()} values (expected "
                               f"{count}) or values that are not finite")
    except PayloadError as exc:
        logger.warning("round %d attempt %d: secure aggregation failed: %s", rnd, attempt, exc)
        return replies, [], [], [Rejection(-1, str(exc))]
    total = sum(c.num_samples for c in counted)
    return replies, [Reply(-1, total, got.mean)], counted, []


def screen(r: Run, rnd: int, replies: Sequence[ClientReply], asked: Sequence[int]
           ) -> tuple[list[Reply], list[Rejection]]:
    """Each answered reply checked (sender, sample count, then the method's own decoding); a
    bad one is logged and recorded with its reason, and the round goes on without it."""
    valid: list[Reply] = []
    rejected: list[Rejection] = []
    seen: set[int] = set()
    for x in replies:
        if x.error:
            continue
        try:
            if x.client_id not in asked:
                raise PayloadError(f"a reply from client {x.client_id}, which was not asked")
            if x.client_id in seen:
                raise PayloadError(f"a second reply from client {x.client_id} in round {rnd}")
            seen.add(x.client_id)
            if not isinstance(x.payload, (bytes, bytearray)):
                raise PayloadError(f"payload must be bytes, got {type(x.payload).__name__}")
            num_samples = check_sample_count(x.num_samples, x.client_id, r.client_sizes)
            update = r.algorithm.check(r.state, rnd, x.client_id, bytes(x.payload))
        except PayloadError as exc:
            rejected.append(Rejection(x.client_id, str(exc)))
            logger.warning("round %d: rejected update of client %d: %s", rnd, x.client_id, exc)
            continue
        valid.append(Reply(x.client_id, num_samples, update))
    return valid, rejected


def valid_losses(replies: Sequence[ClientReply], valid: Sequence[Reply]
                 ) -> list[tuple[float, int]]:
    """(train loss, samples) of the replies that were aggregated."""
    losses = {x.client_id: x.train_loss for x in replies if not x.error}
    return [(losses[v.client_id], v.num_samples) for v in valid]


def is_eval_round(config: Config, rnd: int) -> bool:
    every = config.run.eval_every  # 0: never (benchmarks that time the rounds)
    return every > 0 and (rnd % every == 0 or rnd == config.run.rounds)


def is_checkpoint_round(config: Config, rnd: int) -> bool:
    every = config.run.checkpoint_every
    return every > 0 and (rnd % every == 0 or rnd == config.run.rounds)


def evaluate(r: Run) -> dict[str, Any]:
    """Both protocols: the global model on the central test set, and the mean over clients of
    the accuracy on each client's own test split (its own model for personalised methods)."""
    started = time.perf_counter()
    test, model, tests = r.exp.test_set, r.exp.model, r.folder.client_tests
    assert test is not None
    load_weights_(model, r.algorithm.eval_weights(r.state))
    correct, losses = evaluate_samples(model, test.images, test.labels, test.mean, test.std)
    if r.algorithm.personalised:
        personal = 0.0
        for cid, idx in enumerate(tests):
            load_weights_(model, r.algorithm.eval_weights(r.state, cid))
            own, _ = evaluate_samples(model, test.images[idx], test.labels[idx], test.mean,
                                      test.std)
            personal += int(own.sum()) / max(1, idx.numel())
        personal /= len(tests)
    else:
        personal = sum(int(correct[idx].sum()) / max(1, idx.numel())
                       for idx in tests) / len(tests)
    # fsum: the same mean whatever order the clients were recorded in (a resumed run)
    local = (math.fsum(r.local_accuracy.values()) / len(r.local_accuracy)
             if r.local_accuracy else None)
    return {"accuracy": int(correct.sum()) / correct.numel(),  # exact, not float32
            "test_loss": float(losses.mean()), "personal_accuracy": personal,
            "local_accuracy": local, "eval_seconds": time.perf_counter() - started}


def record_local_accuracy(r: Run, cid: int, model: Any) -> None:
    """The authors' protocol: a client's model right after its local training, on the client's
    own test split (kept until the client trains again)."""
    test, idx = r.exp.test_set, r.folder.client_tests[cid]
    assert test is not None
    correct, _ = evaluate_samples(model, test.images[idx], test.labels[idx], test.mean,
                                  test.std)
    r.local_accuracy[cid] = int(correct.sum()) / max(1, idx.numel())


# ---- the end ---------------------------------------------------------------------------------
def finish(r: Run) -> RunResult:
    wall = time.perf_counter() - r.started
    mask = r.algorithm.global_mask(r.state)
    # Dynamic methods change the global mask during training: report the final one too.
    r.mask_info["final"] = mask_stats(mask, r.exp.prunable)
    if r.algorithm.per_client_masks:
        # The global mask is the union of the clients' masks; each trains in its own.
        n = len(r.exp.parts)
        r.mask_info["final"]["union_of_client_masks"] = True
        r.mask_info["final"]["client_density"] = sum(
            mask_density(r.algorithm.client_mask(r.state, c)) for c in range(n)) / n
    r.folder.write_mask(r.mask_info)
    if r.folder.path is not None:
        write_model(r, mask)
    summary = summarise(r, wall)
    r.folder.write_summary(summary)
    return RunResult(r.folder.path, summary, r.metrics,
                     r.algorithm.final_values(r.state).clone(), mask)


def write_model(r: Run, mask: Mask) -> None:
    """The final global model as ``model.safetensors`` (``ssfl.export``), also when
    checkpoints are off: the weights ``eval_weights`` gives, the mask, the config."""
    from ssfl.export import MODEL_FILE, model_metadata, save_model

    assert r.folder.path is not None
    load_weights_(r.exp.model, r.algorithm.eval_weights(r.state))
    _, channels, height, _ = r.exp.train_set.images.shape
    save_model(r.folder.path / MODEL_FILE, r.exp.model, mask, model_metadata(
        r.config, num_classes=r.exp.train_set.num_classes, in_channels=channels,
        image_size=height))


def summarise(r: Run, wall: float) -> dict[str, Any]:
    config, metrics, exp = r.config, r.metrics, r.exp
    accuracies = [m["accuracy"] for m in metrics if m["accuracy"] is not None]
    # Per client and round, averaged over the run: equal in every round for a static mask.
    client_rounds = sum(len(m["clients"]) for m in metrics)
    down = round(sum(m["bytes_down"] for m in metrics) / client_rounds)
    up = round(sum(m["bytes_up"] for m in metrics) / client_rounds)
    # A dense payload of the same model, encoded for real, is the yardstick for the ratio.
    dense = len(encode_values(torch.cat([t.reshape(-1) for t in exp.initial.values()]),
                              dtype=config.comm.value_dtype))
    samples = sum(len(exp.parts[c]) * config.train.local_epochs
                  for m in metrics for c in m["clients"])
    seconds = sum(m["seconds"] for m in metrics)
    final = r.mask_info["final"]
    summary: dict[str, Any] = {
        "algorithm": config.algorithm.name,
        "density": final.get("client_density", final["density"]),
        "target_density": config.algorithm.density,
        "dataset": config.data.dataset, "model": config.model.name,
        "rounds": config.run.rounds, "seed": config.run.seed,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "final_personal_accuracy": next(
            (m["personal_accuracy"] for m in reversed(metrics) if m["accuracy"] is not None),
            None),
        "final_local_accuracy": next(
            (m.get("local_accuracy") for m in reversed(metrics) if m["accuracy"] is not None),
            None),
        "one_time_bytes": r.ledger.one_time(),
        "bytes_per_round": {"down": down, "up": up},
        "dense_bytes_per_round": {"down": dense, "up": dense},
        "ratio_to_dense": (down + up) / (2 * dense),
        "total_bytes": r.ledger.total(),
        "num_values": r.values_per_payload,
        "num_parameters": sum(t.numel() for t in exp.initial.values()),
        "wall_seconds": wall,
        "mask_seconds": r.mask_info.get("seconds", 0.0),
        "device": device_name(exp.model),
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        **r.transport.summary_info(),
    }
    if r.ledger.resync_bytes():
        summary["resync_bytes"] = r.ledger.resync_bytes()
    if config.privacy.mode != "none":
        done = metrics[-1]["round"] if metrics else 0
        summary["privacy"] = privacy.summary(config, r.algorithm, done)
        summary["epsilon"] = summary["privacy"]["epsilon"]
    return summary


class Progress:
    """A progress bar on a terminal; elsewhere (a log file, a pipe, ``--no-progress``) one plain
    INFO line per round on the ``ssfl`` logger, which ``ssfl run`` prints."""

    def __init__(self, total: int, enabled: bool, done: int = 0) -> None:
        self.bar = None
        self.total = total
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="round", dynamic_ncols=True)

    def update(self, row: Mapping[str, Any], **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        accuracy = row.get("accuracy")
        logger.info("round %d/%d: %strain loss %s, %.2f MB, %.1f s", row["round"], self.total,
                    f"accuracy {accuracy:.4f}, " if accuracy is not None else "",
                    postfix.get("loss", "-"), (row["bytes_down"] + row["bytes_up"]) / 1e6,
                    row["seconds"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["ClientReply", "Run", "RunInterrupted", "RunResult", "SecureReplies", "SetupFailed",
           "Transport", "run"]
