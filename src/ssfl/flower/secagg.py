"""Secure aggregation of the training rounds on Flower: Flower's SecAgg+ around SSFL's values.

With ``flower.secure-aggregation = true`` every training round of a global-mask method runs
Flower 1.42's SecAgg+ protocol (Bell et al., CCS 2020) instead of one ``train`` message per
client, and the server learns only the weighted mean of the round's value vectors:

1. ``setup``: each sampled node makes two key pairs and sends the public keys;
2. ``share_keys``: the server forwards each node its neighbours' public keys; each node splits
   its mask seed and its first private key into Shamir shares and returns them encrypted for
   each neighbour (the server only forwards them);
3. ``collect_masked_vectors``: the node receives its neighbours' shares and SSFL's payload,
   trains (the method's own ``client_step``, as in a plain round), multiplies its value vector
   by ``num-samples / max-weight``, clips and quantises it, adds its private mask and the
   pairwise masks it shares with its neighbours (they cancel in the sum), and uploads that;
4. ``unmask``: the nodes send the shares the server needs to remove the private masks of the
   nodes in the sum and the pairwise masks of the nodes that dropped after step 2; the server
   sums the masked vectors, removes the masks and dequantises the weighted mean.

Both halves are Flower's own code, unchanged: the server runs ``SecAggPlusWorkflow`` and the
ClientApp ``secaggplus_mod``. They were written for Flower's legacy strategies, so two small
adapters carry SSFL's messages through them:

* server (:func:`secure_round`): the workflow asks a ``Strategy`` for each node's ``FitIns``
  and hands the unmasked mean to ``Strategy.aggregate_fit``; a one-round strategy gives it
  SSFL's payload (``FitIns`` carrying the ``ssfl.comm`` bytes and the message's
  ``client-id``/``round``/``lr``) and keeps the mean. The workflow's
  ``Grid.send_and_receive`` (which pulls every 3 s) is replaced by pushes and pulls every
  ``flower.poll-interval-seconds`` with ``flower.round-timeout-seconds`` per stage; each
  stage's bytes and times are recorded.
* client (:func:`client_mod`): the mod sits on the ClientApp's ``train`` handler only and
  engages only for messages that carry SecAgg+'s stage (a plain round passes through; a node
  of a secure run refuses a plain round, so it never sends its values in the clear). Between
  the mod and SSFL's handler, the ``FitIns`` is unpacked into the handler's parameters and
  the reply's value payload becomes the float vector the mod masks (``FitRes``). The masked
  vector is sent as uint32 (it is reduced modulo ``modulus-range`` <= 2**32) instead of
  Flower's int64, half the bytes; the server widens it back before the workflow sums it.

Weighting: FedAvg's weights are the sample counts. SecAgg+ already carries them: each client
multiplies its values by ``num-samples / max-weight`` (quantised to ``1/quantization-range``)
and adds that factor as one more masked entry, so the server divides the unmasked sum by the
unmasked sum of the factors. ``max-weight`` defaults to the largest client in the server's own
split, so every factor is at most 1 and no value is scaled up into the clipping.

What the server still sees per client: its public keys, encrypted shares it cannot read, its
masked vector (uniform modulo ``modulus-range``), its sample count and train loss (plain
metrics, as in Flower's own ``FitRes``), its timings, and how many of its values were clipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from ssfl.config import Config, ConfigError
from ssfl.flower.protocol import (
    METRICS,
    FlowerSettings,
    message_wire_bytes,
    payload_values,
    secure_aggregation_requested,
)

#: the SecAgg+ stages in order (Flower's names)
STAGES = Stage.all()
#: a node's reply in the collect stage: its SSFL payload's values, as the legacy ``FitRes``
TENSOR_TYPE = "numpy.ndarray"


# ---- what may run with it -----------------------------------------------------------------


def check_secure_aggregation(config: Config, settings: FlowerSettings) -> None:
    """Refuse, with one ``ConfigError`` line and before any process or message, a run that
    asks for secure aggregation where it cannot work."""
    if not settings.secure_aggregation:
        return
    from ssfl import algorithms
    from ssfl.algorithms.robust import is_plain_mean
    from ssfl.algorithms.ssfl import FixedMaskFedAvg

    what = "flower.secure-aggregation"
    cls = algorithms.get(config.algorithm.name)
    if not issubclass(cls, FixedMaskFedAvg) or cls.per_client_masks or cls.personalised:
        raise ConfigError(
            f"{what} needs a method whose clients all send values over one global mask fixed "
            f"before training (ssfl, fedavg, random, random_erk, snip_single), not "
            f"{config.algorithm.name!r}: SecAgg+ sums vectors coordinate by coordinate, and "
            f"where each client sends coordinates of its own (its own mask, its own top-k, a "
            f"personal model) or the mask moves with what clients send, there is no common "
            f"vector to sum, and which weights a client updated, which its data decides, "
            f"would be visible to the server anyway")
    fed = config.federation
    if not is_plain_mean(fed):
        raise ConfigError(
            f"{what} gives the server only the sum of the round's updates: "
            f"federation.aggregator = {fed.aggregator!r}, update_clip_norm and adaptive_clip "
            f"need each client's update; use the plain mean (aggregator 'mean', both 0)")
    privacy = getattr(config, "privacy", None)
    if privacy is not None and getattr(privacy, "mode", "none") != "none":
        raise ConfigError(
            f"{what} with privacy.mode = {privacy.mode!r} is not supported yet: 'server' clips "
            f"each client's change, which needs each client's update; 'client' (clipped on the "
            f"client, noise on the sum) would fit, but its unweighted mean is not wired to "
            f"SecAgg+'s weighting")
    k = fed.clients_per_round
    if k < 2:
        raise ConfigError(f"{what} needs federation.clients_per_round >= 2 (got {k}): the sum "
                          f"of one client's values is that client's values")
    if k * settings.secagg_quantization_range >= settings.secagg_modulus_range:
        raise ConfigError(
            f"{what}: {k} clients per round times flower.secagg-quantization-range "
            f"({settings.secagg_quantization_range}) must stay below "
            f"flower.secagg-modulus-range ({settings.secagg_modulus_range}), or the sum wraps")
    make_workflow(settings, max_weight=1.0)  # Flower's own checks of the parameters


def check_sampled_nodes(config: Config, mapping: Mapping[int, int]) -> None:
    """SecAgg+ knows parties by node: its keys, shares and masks are a node's, so no round may
    sample two clients of one node (pooled SuperNodes). The sample is seeded: every round of
    the run is checked before the first message."""
    from ssfl.run.experiment import sample_clients

    fed = config.federation
    for rnd in range(1, config.run.rounds + 1):
        seen: dict[int, int] = {}
        for cid in sample_clients(config.run.seed, rnd, fed.num_clients, fed.clients_per_round):
            node = mapping[cid]
            if node in seen:
                raise ConfigError(
                    f"flower.secure-aggregation needs each sampled client on a SuperNode of "
                    f"its own (node config partition-id), but round {rnd} samples clients "
                    f"{seen[node]} and {cid}, both served by node {node}: SecAgg+ keys, shares "
                    f"and masks belong to a node")
            seen[node] = cid


def _number(value: float) -> int | float:
    """Flower's convention: an int counts clients, a float is a fraction."""
    return int(value) if value > 1 else float(value)


def make_workflow(settings: FlowerSettings, max_weight: float) -> Any:
    from flwr.server.workflow import SecAggPlusWorkflow

    try:
        return SecAggPlusWorkflow(
            _number(settings.secagg_num_shares),
            _number(settings.secagg_reconstruction_threshold),
            max_weight=max_weight,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=settings.secagg_quantization_range,
            modulus_range=settings.secagg_modulus_range,
            timeout=settings.round_timeout_seconds,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"flower.secagg-*: {exc}") from None


# ---- server -----------------------------------------------------------------------------------


@dataclass
class StageRecord:
    """One SecAgg+ stage as the server saw it."""

    stage: str
    nodes: list[int]  # the node of each message pushed, in order
    push_started: float = math.nan  # time.time()
    push_ended: float = math.nan
    pulled: list[float] = field(default_factory=list)  # per message, NaN: no reply
    seconds: float = 0.0  # push start to the last reply (or the time-out)
    replies: int = 0
    errors: int = 0
    #: protocol bytes (keys, encrypted shares, node lists, shares; 8 per number), not counting
    #: SSFL's payload down and the masked vectors up, which the ledger counts as ``train``
    protocol_down: int = 0
    protocol_up: int = 0
    #: every byte of the messages as Flower serialises them (when measured)
    wire_down: int | None = None
    wire_up: int | None = None


@dataclass
class SecureResult:
    """A secure round: the weighted mean of the value vectors of the nodes in the sum (None:
    the protocol stopped), and what each node sent."""

    mean: np.ndarray | None
    summed: list[int]  # node ids whose vectors are in the mean
    weights: dict[int, int]  # node id -> its claimed sample count (plain FitRes metadata)
    metrics: dict[int, dict[str, Any]]  # node id -> its collect reply's metrics
    masked_bytes: dict[int, int]  # node id -> bytes of the masked vector it uploaded
    stages: list[StageRecord]
    problem: str = ""

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.stage == name), None)


def _value_bytes(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def _protocol_bytes(content: RecordDict) -> int:
    """The SecAgg+ record's bytes, without the masked vector (counted as the round's upload)."""
    if RECORD_KEY_CONFIGS not in content:
        return 0
    record = content[RECORD_KEY_CONFIGS]
    return sum(_value_bytes(v) for k, v in record.items() if k != Key.MASKED_PARAMETERS)


def _stage_of(message: Message) -> str:
    return str(message.content[RECORD_KEY_CONFIGS][Key.STAGE])


class StageGrid:
    """The ``Grid`` that ``SecAggPlusWorkflow`` talks to: ``send_and_receive`` pushes the
    stage's messages through the run's grid and pulls every ``poll`` seconds until every node
    answered or ``timeout`` passed (a node without a reply counts as dropped, as in Flower's
    own ``send_and_receive``); records each stage, and observes what the server receives
    (``observe``, for tests)."""

    def __init__(self, grid: Any, poll: float, wire: bool = False,
                 observe: Callable[[str, Message], None] | None = None) -> None:
        self.grid, self.poll, self.wire, self.observe = grid, poll, wire, observe
        self.stages: list[StageRecord] = []
        self.collected: list[Message] = []
        self.masked: dict[int, int] = {}  # node -> bytes of its masked vector as sent

    def send_and_receive(self, messages: Sequence[Message], *,
                         timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = _stage_of(messages[0]) if messages else "?"
        rec = StageRecord(stage, [m.metadata.dst_node_id for m in messages])
        if self.wire:
            rec.wire_down = sum(message_wire_bytes(m) for m in messages)
        rec.protocol_down = sum(_protocol_bytes(m.content) for m in messages)
        started = time.perf_counter()
        rec.push_started = time.time()
        ids = list(self.grid.push_messages(messages))
        rec.push_ended = time.time()
        pending = {i for i in ids if i}
        arrived: dict[str, tuple[Message, float]] = {}
        deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        while pending and time.monotonic() <= deadline:
            pulled = self.grid.pull_messages(sorted(pending))
            now = time.time()
            for reply in pulled:
                key = reply.metadata.reply_to_message_id
                if key in pending:
                    pending.discard(key)
                    arrived[key] = (reply, now)
            if pending:
                time.sleep(self.poll)
        rec.seconds = time.perf_counter() - started
        rec.pulled = [arrived[i][1] if i in arrived else math.nan for i in ids]
        replies = [arrived[i][0] for i in ids if i in arrived]
        for reply in replies:
            if self.observe is not None:
                self.observe(stage, reply)
            if reply.has_error():
                rec.errors += 1
                continue
            rec.replies += 1
            if self.wire:
                rec.wire_up = (rec.wire_up or 0) + message_wire_bytes(reply)
            rec.protocol_up += _protocol_bytes(reply.content)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                self.masked[reply.metadata.src_node_id] = _widen_masked_vector(reply)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.collected = replies
        self.stages.append(rec)
        return replies


def _widen_masked_vector(reply: Message) -> int:
    """The node sent its masked vector as uint32 (:func:`client_mod`); the workflow sums
    int64 arrays, as Flower's mod sends them. Returns the bytes as sent."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    record = reply.content[RECORD_KEY_CONFIGS]
    blobs = list(record[Key.MASKED_PARAMETERS])
    arrays = [bytes_to_ndarray(b) for b in blobs]
    if any(a.dtype != np.uint32 for a in arrays):
        raise ValueError(f"node {reply.metadata.src_node_id}: masked vector is not uint32")
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a.astype(np.int64)) for a in arrays]
    return sum(len(b) for b in blobs)


def _one_round_strategy(instructions: list[tuple[Any, Any]]) -> Any:
    """The ``Strategy`` the workflow asks for each node's ``FitIns`` (SSFL's payload) and
    hands the unmasked mean to."""
    from flwr.server.strategy import Strategy

    class OneRound(Strategy):
        results: list[tuple[Any, Any]] | None = None
        failures: list[Any] = []

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any,
                          client_manager: Any) -> list[tuple[Any, Any]]:
            return list(instructions)

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]],
                          failures: list[Any]) -> tuple[None, dict[str, Any]]:
            self.results, self.failures = list(results), list(failures)
            return None, {}

        def configure_evaluate(self, server_round: int, parameters: Any,
                               client_manager: Any) -> list[tuple[Any, Any]]:
            return []

        def aggregate_evaluate(self, server_round: int, results: Any,
                               failures: Any) -> tuple[None, dict[str, Any]]:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    return OneRound()


def secure_round(grid: Any, round: int, messages: Mapping[int, tuple[dict[str, Any], bytes]],
                 settings: FlowerSettings, max_weight: float, *, wire: bool = False,
                 observe: Callable[[str, Message], None] | None = None) -> SecureResult:
    """One training round under SecAgg+: ``messages`` maps each sampled node to its
    ``train`` parameters (``client-id``, ``round``, ``lr``, ``kind``) and SSFL payload.
    Returns the weighted mean of the value vectors of the nodes that made it into the sum."""
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import (
        MAIN_CONFIGS_RECORD,
        MAIN_PARAMS_RECORD,
        Key as WorkflowKey,
    )

    instructions = [(GridClientProxy(node, grid, 0),
                     FitIns(Parameters([payload], "ssfl"), dict(config)))
                    for node, (config, payload) in messages.items()]
    strategy = _one_round_strategy(instructions)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    stage_grid = StageGrid(grid, settings.poll_interval_seconds, wire=wire, observe=observe)
    make_workflow(settings, max_weight)(stage_grid, context)
    metrics: dict[int, dict[str, Any]] = {}
    for reply in stage_grid.collected:
        if not reply.has_error() and METRICS in reply.content:
            record = reply.content[METRICS]
            metrics[reply.metadata.src_node_id] = {str(k): record[k] for k in record}
    result = SecureResult(None, [], {}, metrics, stage_grid.masked, stage_grid.stages)
    if not strategy.results:
        last = stage_grid.stages[-1] if stage_grid.stages else None
        result.problem = (
            "secure aggregation stopped" + (
                f" after stage {last.stage!r}: {last.replies} of {len(last.nodes)} nodes "
                f"answered"
                if last else " before its first stage")
            + " (fewer than flower.secagg-reconstruction-threshold for some node)")
        return result
    arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
    result.mean = np.asarray(arrays[0], dtype=np.float64).reshape(-1)
    result.summed = [proxy.node_id for proxy, _ in strategy.results]
    result.weights = {proxy.node_id: int(res.num_examples) for proxy, res in strategy.results}
    return result


# ---- client -----------------------------------------------------------------------------------

#: what a node's handler returns for (kind, parameters, payload, context): metrics, reply bytes
Process = Callable[[str, Mapping[str, Any], "bytes | None", Context],
                   "tuple[dict[str, Any], bytes | None]"]


def client_mod(process: Process) -> Callable[[Message, Context, Any], Message]:
    """The ClientApp's ``train`` mod: Flower's ``secaggplus_mod`` for the messages of a
    SecAgg+ round, with SSFL's handler (``process``) inside it; anything else passes through,
    except that a node of a secure run refuses to train a plain round."""

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:
            return call_next(message, context)
        if RECORD_KEY_CONFIGS not in message.content:
            if secure_aggregation_requested(context.run_config):
                raise ValueError("this run has flower.secure-aggregation = true: the node "
                                 "sends its values only masked, in a SecAgg+ round")
            return call_next(message, context)
        from flwr.client.mod import secaggplus_mod

        out = secaggplus_mod(message, context, _fit_handler(process))
        _narrow_masked_vector(out, context)
        return out

    return mod


def _fit_handler(process: Process) -> Callable[[Message, Context], Message]:
    """SSFL's handler in the legacy fit format the mod expects: ``FitIns`` (the payload and
    the message's parameters) in, ``FitRes`` (the values as one float64 array, the sample
    count) out, with the handler's metrics beside it."""
    from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
    from flwr.compat.common import recorddict_compat as compat

    def handler(message: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
        payload = fitins.parameters.tensors[0] if fitins.parameters.tensors else None
        metrics, reply = process("train", dict(fitins.config), payload, context)
        if reply is None:
            raise ValueError("the method's round gave no payload to aggregate")
        values = payload_values(reply).astype(np.float64)
        num_samples = int(metrics["num-samples"])
        metrics["secagg-clipped"] = _clipped(values, num_samples, context)
        content = compat.fitres_to_recorddict(
            FitRes(Status(Code.OK, ""), Parameters([ndarray_to_bytes(values)], TENSOR_TYPE),
                   num_samples, {}), keep_input=False)
        content[METRICS] = MetricRecord(dict(metrics))
        return Message(content, reply_to=message)

    return handler


def _clipped(values: np.ndarray, num_samples: int, context: Context) -> int:
    """How many values SecAgg+ will clip: |value * num_samples / max_weight| above the
    clipping range (the count is reported; the values themselves never leave the node)."""
    state = context.state[RECORD_KEY_STATE] if RECORD_KEY_STATE in context.state else {}
    clip, weight = state.get("clipping_range"), state.get("max_weight")
    if not clip or not weight:
        return 0
    return int(np.count_nonzero(np.abs(values) * (num_samples / float(weight)) > float(clip)))


def _narrow_masked_vector(out: Message, context: Context) -> None:
    """Flower's mod sends the masked vector as int64; its entries are reduced modulo
    ``modulus-range`` (at most 2**32), so uint32 holds them exactly: half the upload."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    if out.has_error() or RECORD_KEY_CONFIGS not in out.content:
        return
    record = out.content[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS not in record:
        return
    state = context.state[RECORD_KEY_STATE]
    if int(state["mod_range"]) > 2**32:
        raise ValueError("flower.secagg-modulus-range must be at most 2**32")
    arrays = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a.astype(np.uint32)) for a in arrays]
