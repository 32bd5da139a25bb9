"""Static-mask baselines: ERK random masks, SNIP on pooled data, SNIP on one client."""

from __future__ import annotations

import math

import pytest
import torch

from ssfl import algorithms
from ssfl.algorithms.base import NoSettings, Reply, Setup
from ssfl.algorithms.clientwise import ClientwiseRandomMasks
from ssfl.comm import HEADER, PayloadKind, encode_values
from ssfl.config import load_config
from ssfl.masks import erk_densities, layer_counts, mask_density, random_layerwise_mask
from ssfl.run.ledger import Ledger
from ssfl.run.loop import ClientReply, LedgerAsk, Transport
from ssfl.sim import run_experiment


class _Clients(Transport):
    """Clients that answer a request for scores with ``scores`` and acknowledge deliveries;
    records every message sent (kind, payload per client)."""

    def __init__(self, scores: torch.Tensor | None = None) -> None:
        self.scores = scores if scores is not None else torch.zeros(0)
        self.sent: list[tuple[str, dict[int, bytes]]] = []

    def exchange(self, kind, round, lr, payloads, attempt=1, *, ack=False):
        self.sent.append((kind, dict(payloads)))
        body = b"" if ack else encode_values(self.scores, kind=PayloadKind.SCORES)
        return [ClientReply(c, down, body, 5, 0.0) for c, down in payloads.items()]


def _set_up(name: str, initial: dict[str, torch.Tensor], density: float, *,
            num_clients: int = 3, seed: int = 0, scores: torch.Tensor | None = None,
            prunable: list[str] | None = None):
    """Run the set-up phase of ``name`` as the run loop does, with every byte counted;
    returns the method, its state, the messages sent and the one-time bytes. Every tensor of
    ``initial`` is prunable unless ``prunable`` says otherwise."""
    config = load_config(None, [f"algorithm.name={name}", f"algorithm.density={density}",
                                f"run.seed={seed}"])
    setup = Setup(config, {n: t.shape for n, t in initial.items()},
                  list(initial) if prunable is None else prunable, initial, num_clients)
    algorithm = algorithms.build(config, setup)
    clients, ledger = _Clients(scores), Ledger()
    state = algorithm.run_setup(algorithm.init(), LedgerAsk(clients, algorithm, ledger, 1))
    return algorithm, state, clients.sent, ledger.one_time()


def test_erk_densities_by_hand() -> None:
    shapes = {"a": torch.Size([4, 4]), "b": torch.Size([2, 8])}
    d = erk_densities(shapes, 0.5)
    # raw: a 8/16, b 10/16; scale = 16 / (0.5*16 + 0.625*16) = 8/9
    assert d["a"] == pytest.approx(4 / 9) and d["b"] == pytest.approx(5 / 9)


def test_erk_keeps_saturated_layers_dense_and_resolves_the_rest() -> None:
    shapes = {"a": torch.Size([1, 2]), "b": torch.Size([10, 10])}
    d = erk_densities(shapes, 0.5)
    assert d["a"] == 1.0 and d["b"] == pytest.approx(0.49)


def test_layer_counts_sum_exactly_and_respect_layer_sizes() -> None:
    shapes = {"a": torch.Size([3]), "b": torch.Size([3]), "c": torch.Size([3])}
    counts = layer_counts({"a": 0.5, "b": 0.5, "c": 0.5}, shapes, 5)
    assert counts == {"a": 2, "b": 2, "c": 1}  # 1.5 each: remainders go to earlier layers
    assert layer_counts({"a": 1.0, "b": 0.0, "c": 0.0}, shapes, 4) == {"a": 3, "b": 1, "c": 0}


@pytest.mark.parametrize("density", [0.5, 0.1, 0.05])
def test_random_erk_mask_has_exact_density_and_erk_shape(density: float) -> None:
    shapes = {"conv": torch.Size([16, 3, 3, 3]), "fc1": torch.Size([128, 256]),
              "fc2": torch.Size([10, 128])}
    total = sum(math.prod(s) for s in shapes.values())
    _, state, _, _ = _set_up("random_erk", {n: torch.zeros(s) for n, s in shapes.items()},
                             density, seed=3)
    mask = state.mask
    assert sum(int(m.sum()) for m in mask.values()) == round(density * total)
    # The big layer is pruned hardest, as ERK intends.
    assert mask["fc1"].float().mean() < mask["conv"].float().mean()
    again = random_layerwise_mask(shapes, erk_densities(shapes, density),
                                  round(density * total), torch.Generator().manual_seed(3))
    assert all(torch.equal(again[n], mask[n]) for n in shapes)


def test_mask_round_scores_one_client_for_snip_single_and_none_for_random() -> None:
    initial = {"w": torch.zeros(4)}
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0])
    single, state, sent, one_time = _set_up("snip_single", initial, 0.5, num_clients=7,
                                            scores=scores)
    assert [(kind, sorted(p)) for kind, p in sent] == [("scores", [0]), ("mask", list(range(7)))]
    assert single.setup_record(state) == {"scored_clients": [0]}
    assert state.mask["w"].tolist() == [False, True, False, True]
    # One score payload of 4 float32 values; the bitmap (4 bits: 1 byte) to all 7 clients.
    assert one_time == {"score_upload": HEADER.size + 16, "mask_broadcast": 7 * (HEADER.size + 1)}
    ssfl, state, sent, one_time = _set_up("ssfl", initial, 0.5, scores=scores)
    assert [(kind, sorted(p)) for kind, p in sent][0] == ("scores", [0, 1, 2])
    assert ssfl.setup_record(state) == {"scored_clients": [0, 1, 2]}
    assert one_time["score_upload"] == 3 * (HEADER.size + 16)
    _, state, sent, one_time = _set_up("random", initial, 0.5)
    assert [kind for kind, _ in sent] == ["mask"] and int(state.mask["w"].sum()) == 2
    assert one_time == {"mask_broadcast": 3 * (HEADER.size + 1)}
    # The oracle needs every client's data in one process: only the simulator has it.
    assert algorithms.get("snip_oracle").needs_pooled_data
    with pytest.raises(NotImplementedError, match="pooled"):
        _set_up("snip_oracle", initial, 0.5)


@pytest.mark.slow
def test_oracle_and_single_run_end_to_end_with_honest_costs() -> None:
    common = ["run.rounds=1", "run.progress=false", "federation.num_clients=6",
              "federation.clients_per_round=2", "train.local_epochs=1",
              "algorithm.density=0.2"]
    oracle = run_experiment(load_config(None, [*common, "algorithm.name=snip_oracle"]),
                            write=False)
    single = run_experiment(load_config(None, [*common, "algorithm.name=snip_single"]),
                            write=False)
    ssfl = run_experiment(load_config(None, [*common, "algorithm.name=ssfl"]), write=False)
    assert "score_upload" not in oracle.summary["one_time_bytes"]  # computed centrally
    assert single.summary["one_time_bytes"]["score_upload"] * 6 == \
        ssfl.summary["one_time_bytes"]["score_upload"]
    for r in (oracle, single, ssfl):
        assert abs(r.summary["density"] - 0.2) < 1e-3


def test_clientwise_aggregation_averages_each_weight_over_its_holders() -> None:
    from ssfl.masks import mask_digest

    initial = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.0])}
    setup = Setup(load_config(None, ["algorithm.name=random_clientwise", "algorithm.density=0.5",
                                     "run.seed=0", "federation.aggregator=mean"]),
                  {n: t.shape for n, t in initial.items()}, ["w"], initial, 2)
    strategy = ClientwiseRandomMasks(setup, NoSettings())
    state = strategy.init()
    m0, m1 = strategy.client_mask(state, 0)["w"], strategy.client_mask(state, 1)["w"]
    assert int(m0.sum()) == int(m1.sum()) == 2
    # Each client is sent the values inside its own mask (its two weights and the bias).
    down = strategy.configure(state, 1, [0, 1], 1)
    for cid, m in ((0, m0), (1, m1)):
        assert down[cid] == encode_values(torch.cat([initial["w"][m], initial["b"]]), round=1,
                                          digest=mask_digest({"w": m}, ["w"]))
    replies = []
    for cid, value, n in ((0, 10.0, 1), (1, 40.0, 3)):
        mask = strategy.client_mask(state, cid)
        # Each client returns `value` for its two weights and its bias.
        payload = encode_values(torch.full((3,), value), round=1,
                                digest=mask_digest(mask, ["w"]))
        replies.append(Reply(cid, n, strategy.check(state, 1, cid, payload)))
    new, _ = strategy.aggregate(state, 1, replies, [0, 1])
    w = new.weights["w"]
    for i in range(4):
        if m0[i] and m1[i]:
            assert w[i] == pytest.approx((10.0 * 1 + 40.0 * 3) / 4)
        elif m0[i]:
            assert w[i] == 10.0
        elif m1[i]:
            assert w[i] == 40.0
        else:
            assert w[i] == initial["w"][i]  # no holder this round: unchanged
    assert new.weights["b"].item() == pytest.approx(32.5)
    # Before round 1 each client is sent its own mask once (4 bits: 1 byte of bitmap).
    clientwise, _, sent, one_time = _set_up("random_clientwise", initial, 0.5, num_clients=2,
                                              prunable=["w"])
    assert [kind for kind, _ in sent] == ["mask"]
    assert {c: clientwise.codec.decode(p)[0]["w"].tolist() for c, p in sent[0][1].items()} == \
        {0: m0.tolist(), 1: m1.tolist()}
    assert one_time == {"mask_broadcast": 2 * (HEADER.size + 1)}


def test_clientwise_runs_end_to_end_with_per_client_payloads() -> None:
    config = load_config(None, ["run.rounds=2", "run.progress=false", "federation.num_clients=4",
                                "federation.clients_per_round=2", "train.local_epochs=1",
                                "algorithm.name=random_clientwise", "algorithm.density=0.1"])
    result = run_experiment(config, write=False)
    s = result.summary
    prunable = sum(m.numel() for m in result.mask.values())
    assert s["one_time_bytes"] == {"mask_broadcast": 4 * (HEADER.size + math.ceil(prunable / 8))}
    # The reported density is what each client trains in (exact), not the union of the masks.
    assert s["density"] == round(0.1 * prunable) / prunable
    assert mask_density(result.mask) > 0.1  # the union of four clients' masks
    assert abs(s["ratio_to_dense"] - 0.1) < 0.02


def test_payload_parts_splits_bundles() -> None:
    from ssfl.comm import encode_bits, payload_parts

    a = encode_bits(b"\xff\x80", 9)
    b = encode_values(torch.ones(3), dtype="float16")
    assert payload_parts(a + b) == [a, b]
    from ssfl.comm import PayloadError
    with pytest.raises(PayloadError):
        payload_parts(a + b[:-1])
