"""FedDST and PruneFL: mask rules on hand-sized tensors, exact density and honest bytes in runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssfl import algorithms
from ssfl.algorithms.base import ClientContext, Reply, Setup
from ssfl.algorithms.common import average_over_holders
from ssfl.algorithms.feddst import FedDST, FedDSTSettings
from ssfl.algorithms.prunefl import PruneFL, PruneFLSettings
from ssfl.client import LocalData, TrainSettings, train_with_importance
from ssfl.comm import (
    HEADER,
    PayloadError,
    PayloadKind,
    encode_bits,
    encode_values,
    payload_parts,
    read_header,
)
from ssfl.config import ConfigError, load_config
from ssfl.masks import (
    cosine_fraction,
    drop_and_regrow,
    erk_counts,
    magnitude_mask,
    mask_digest,
    mask_to_bits,
    prune_to_counts,
)
from ssfl.run.ledger import Ledger
from ssfl.run.loop import ClientReply, LedgerAsk, Transport
from ssfl.sim import run_experiment

T, F_ = True, False


def _tiny_data(n: int = 6) -> LocalData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 2, 2), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    return LocalData(images, labels, torch.arange(n), (0.5,), (0.25,))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


# One step per round (batch >= data), no clipping, no augmentation: hand-checkable updates.
ONE_STEP = TrainSettings(momentum=0.9, weight_decay=0.0, local_epochs=1, batch_size=64,
                         clip_grad_norm=0.0, augment=False)


def _setup(initial: dict[str, torch.Tensor], prunable: list[str], density: float) -> Setup:
    # The hand computations are the paper's plain averages (no adaptive clipping).
    return Setup(load_config(None, [f"algorithm.density={density}",
                                    "federation.aggregator=mean"]),
                 {n: t.shape for n, t in initial.items()}, prunable, initial, num_clients=2)


def _feddst(initial: dict[str, torch.Tensor], prunable: list[str], density: float,
            **settings) -> FedDST:
    return FedDST(_setup(initial, prunable, density), FedDSTSettings(**settings))


def _context(algorithm, model: nn.Module, data: LocalData, round: int, seed: int = 0,
             client_id: int = 0) -> ClientContext:
    return ClientContext(client_id=client_id, round=round, lr=0.1, model=model, data=data,
                         settings=ONE_STEP, generator=torch.Generator().manual_seed(seed),
                         setup=algorithm.setup)


class _OneModelClients(Transport):
    """Every client runs the method's client side on one model and one data set (set-up
    messages only: no client state is kept)."""

    def __init__(self, algorithm, model: nn.Module, data: LocalData) -> None:
        self.algorithm, self.model, self.data = algorithm, model, data

    def exchange(self, kind, round, lr, payloads, attempt=1, *, ack=False):
        replies = []
        for c, down in payloads.items():
            out = self.algorithm.handle(kind, _context(self.algorithm, self.model, self.data,
                                                       round, client_id=c), down, None)
            replies.append(ClientReply(c, down, out.reply, len(self.data), 0.0))
        return replies


def test_cosine_fraction_by_hand() -> None:
    assert cosine_fraction(0.4, 0, 10) == pytest.approx(0.4)
    assert cosine_fraction(0.4, 5, 10) == pytest.approx(0.2)  # cos(pi/2) = 0
    assert cosine_fraction(0.4, 3, 9) == pytest.approx(0.3)  # cos(pi/3) = 1/2
    assert cosine_fraction(0.4, 10, 10) == 0.0 and cosine_fraction(0.4, 12, 10) == 0.0
    s = _feddst({"w": torch.ones(4, 4)}, ["w"], 0.5, prune_fraction=0.4, update_interval=3,
                update_until=9)
    assert [round(s.readjust_fraction(r), 6) for r in range(1, 10)] == \
        [0, 0, 0.3, 0, 0, 0.1, 0, 0, 0]


def test_drop_smallest_active_and_regrow_largest_gradient_inactive() -> None:
    w = torch.tensor([[0.5, -0.1, 0.0], [2.0, 0.0, -0.3]])
    mask = torch.tensor([[T, T, F_], [T, F_, T]])
    g = torch.tensor([[9.0, 9.0, 5.0], [9.0, -7.0, 1.0]])
    # k = round(0.5 * 4) = 2: drop -0.1 and -0.3; grow the two inactive (|g| 5 and 7). Active
    # and just-dropped weights are not candidates however large their gradient.
    new, grown = drop_and_regrow({"w": w}, {"w": mask}, {"w": g}, 0.5)
    assert new["w"].tolist() == [[T, F_, T], [T, T, F_]]
    assert grown["w"].tolist() == [2, 4]  # flat indices, ascending
    # k = round(0.25 * 4) = 1: drop -0.1 (smallest), grow index 4 (|-7| > 5).
    new, grown = drop_and_regrow({"w": w}, {"w": mask}, {"w": g}, 0.25)
    assert new["w"].tolist() == [[T, F_, F_], [T, T, T]] and grown["w"].tolist() == [4]
    # Ties go to the earlier position; a dense layer is left alone; counts are conserved.
    tie = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    new, _ = drop_and_regrow({"w": tie}, {"w": mask}, {"w": tie}, 0.25)
    assert new["w"].tolist() == [[F_, T, T], [T, F_, T]]
    dense = torch.ones(2, 3, dtype=torch.bool)
    new, grown = drop_and_regrow({"w": w}, {"w": dense}, {"w": g}, 0.5)
    assert bool(new["w"].all()) and grown["w"].numel() == 0
    gen = torch.Generator().manual_seed(1)
    for fraction in (0.05, 0.3, 0.9):
        weights = torch.randn(7, 9, generator=gen)
        m = torch.rand(7, 9, generator=gen) < 0.3
        new, _ = drop_and_regrow({"w": weights}, {"w": m}, {"w": torch.randn(7, 9)}, fraction)
        assert int(new["w"].sum()) == int(m.sum())


def test_initial_mask_is_magnitude_pruned_with_exact_erk_counts() -> None:
    shapes = {"a": torch.Size([8, 4, 3, 3]), "b": torch.Size([10, 32]), "c": torch.Size([3, 10])}
    counts = erk_counts(shapes, 0.2)
    assert sum(counts.values()) == round(0.2 * (288 + 320 + 30))
    w = torch.tensor([[0.3, -2.0, 0.1], [1.0, -0.2, 0.0]])
    assert magnitude_mask({"w": w}, {"w": 3})["w"].tolist() == [[T, T, F_], [T, F_, F_]]


def test_server_averages_over_holders_and_reprunes_by_magnitude_by_hand() -> None:
    # Holder-weighted average: weight i over the clients whose mask holds it.
    a = torch.tensor([T, T, T, F_, F_, F_])
    b = torch.tensor([F_, T, T, T, F_, F_])
    va = {"w": torch.tensor([0.75, 2.0, 3.0, 0, 0, 0]), "b": torch.tensor([10.0])}
    vb = {"w": torch.tensor([0, 6.0, 5.0, -0.75, 0, 0]), "b": torch.tensor([30.0])}
    shapes = {"w": torch.Size([6]), "b": torch.Size([1])}
    avg, held = average_over_holders([(va, {"w": a}, 1.0), (vb, {"w": b}, 3.0)], shapes)
    assert avg["w"].tolist() == [0.75, 5.0, 4.5, -0.75, 0.0, 0.0]
    assert held["w"].tolist() == [1, 4, 4, 3, 0, 0]
    assert avg["b"].item() == 25.0
    # Keep 3 by magnitude: 5 and 4.5, then a tie at 0.75 won by the weight more samples hold.
    assert prune_to_counts(avg, held, {"w": 3})["w"].tolist() == [F_, T, T, T, F_, F_]
    # Only held weights can be kept: 4 are held here, so 5 cannot be.
    assert prune_to_counts(avg, held, {"w": 4})["w"].tolist() == [T, T, T, T, F_, F_]
    with pytest.raises(ValueError, match="only 4 weights held, need 5"):
        prune_to_counts(avg, held, {"w": 5})


def test_feddst_aggregate_and_mask_downloads_by_hand() -> None:
    initial = {"w": torch.tensor([[4.0, 3.0, 2.0], [1.0, 0.5, 0.1]]), "b": torch.tensor([0.0])}
    s = _feddst(initial, ["w"], 0.5, prune_fraction=0.3, update_interval=1, update_until=10)
    state = s.init()
    assert s.counts == {"w": 3} and state.mask["w"].tolist() == [[T, T, T], [F_, F_, F_]]
    first = s.configure(state, 1, [0, 1], 1)
    parts = payload_parts(first[0])
    assert [read_header(p).kind for p in parts] == [PayloadKind.MASK, PayloadKind.VALUES]
    assert len(first[0]) == (HEADER.size + 1) + (HEADER.size + 4 * 4)
    assert first[1] == first[0]  # first contact: everyone gets the mask

    def reply(mask: list[bool], values: list[float], round: int = 1) -> bytes:
        m = {"w": torch.tensor(mask).reshape(2, 3)}
        d = mask_digest(m, ["w"])
        return (encode_bits(mask_to_bits(m, ["w"]), 6, round=round, digest=d)
                + encode_values(torch.tensor(values), round=round, digest=d))

    replies = [Reply(0, 1, s.check(state, 1, 0, reply([T, T, T, F_, F_, F_],
                                                       [0.75, 2.0, 3.0, 10.0]))),
               Reply(1, 3, s.check(state, 1, 1, reply([F_, T, T, T, F_, F_],
                                                       [6.0, 5.0, -0.75, 30.0])))]
    new, _ = s.aggregate(state, 1, replies, [0, 1])
    assert new.mask["w"].tolist() == [[F_, T, T], [T, F_, F_]]
    assert new.weights["w"].tolist() == [[0.0, 5.0, 4.5], [-0.75, 0.0, 0.0]]
    assert new.weights["b"].item() == 25.0 and new.mask_changes == (1,)
    assert state.mask["w"].tolist() == [[T, T, T], [F_, F_, F_]]  # the old state is intact
    # Client 1 already holds the new global mask (its own); client 0 must be sent it.
    down = s.configure(new, 2, [0, 1], 1)
    assert len(payload_parts(down[1])) == 1 and len(payload_parts(down[0])) == 2
    # A retry cannot know what a client kept from the failed attempt: both get the mask.
    assert [len(payload_parts(p)) for p in s.configure(new, 2, [0, 1], 2).values()] == [2, 2]
    # A client mask with the wrong layer count is rejected, naming the client (the loop then
    # leaves the client out of the round; see test_validation for a round left too short).
    with pytest.raises(PayloadError, match="client 0's mask has wrong layer counts"):
        s.check(new, 2, 0, reply([T, T, T, T, F_, F_], [1.0, 1, 1, 1, 1], round=2))
    # Round 2: client 0 keeps the global mask (values only), client 1's reply is lost. Client
    # 0 now holds the global mask; what client 1 holds is unknown, so it is sent the mask.
    keep = encode_values(torch.tensor([1.0, 2.0, 3.0, 4.0]), round=2,
                         digest=mask_digest(new.mask, ["w"]))
    after, _ = s.aggregate(new, 2, [Reply(0, 1, s.check(new, 2, 0, keep))], [0, 1])
    assert after.mask["w"].tolist() == new.mask["w"].tolist() and after.mask_changes == (1,)
    assert after.weights["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]
    down = s.configure(after, 3, [0, 1], 1)
    assert len(payload_parts(down[0])) == 1 and len(payload_parts(down[1])) == 2


def test_feddst_client_regrows_at_zero_with_fresh_momentum() -> None:
    model, data = _tiny_model(), _tiny_data()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Round 2 readjusts the mask, round 3 does not.
    s = _feddst(initial, ["1.weight"], 0.5, prune_fraction=0.5, update_interval=2,
                update_until=100)
    state = s.init()
    old = state.mask["1.weight"].clone()
    out = s.client_step(_context(s, model, data, 2), s.configure(state, 2, [0], 1)[0], None)
    mask_part, values_part = payload_parts(out.reply)
    assert out.state == mask_part  # the client keeps the mask it made
    new = s.codec.decode(mask_part)[0]["1.weight"]
    grown = new & ~old
    k = round(cosine_fraction(0.5, 2, 100) * 6)
    assert int(new.sum()) == int(old.sum()) == 6 and int(grown.sum()) == k == 3
    w = model[1].weight.detach()
    assert bool((w[grown] == 0).all()) and bool((w[~new] == 0).all())
    dense, mask, _ = s.check(state, 2, 0, out.reply)  # the server takes the new mask
    assert torch.equal(mask["1.weight"], new) and torch.equal(dense["1.weight"], w)
    # Next round (no readjustment) this client trains in its own mask, which it kept: a
    # regrown weight's first step is exactly -lr * grad, i.e. no momentum carried over.
    start = w.clone()
    digest = mask_digest({"1.weight": new}, ["1.weight"])
    down = encode_values(torch.cat([start[new], model[1].bias.detach()]), round=3, digest=digest)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model((data.images.float() / 255 - 0.5) / 0.25),
                                data.labels).backward()
    expected = -0.1 * model[1].weight.grad[grown]
    later = s.client_step(_context(s, model, data, 3, seed=1), down, out.state)
    assert len(payload_parts(later.reply)) == 1 and later.state == out.state
    assert torch.allclose(model[1].weight.detach()[grown], expected, atol=1e-6)


def test_prunefl_importance_is_squared_dense_gradient() -> None:
    model, data = _tiny_model(), _tiny_data()
    mask = {"1.weight": torch.tensor([[T, F_, F_, F_]] * 3)}
    with torch.no_grad():
        model[1].weight.mul_(mask["1.weight"])
    loss = nn.functional.cross_entropy(model((data.images.float() / 255 - 0.5) / 0.25),
                                       data.labels)
    g = torch.autograd.grad(loss, model[1].weight)[0]
    importance, result = train_with_importance(model, data, ONE_STEP, 0.1,
                                               torch.Generator().manual_seed(0), mask,
                                               ["1.weight"])
    assert result.steps == 1
    assert torch.allclose(importance["1.weight"], g.square(), rtol=1e-5, atol=1e-10)
    assert bool((importance["1.weight"][~mask["1.weight"]] > 0).any())  # pruned ones too


def test_prunefl_reconfiguration_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssfl.algorithms.prunefl as prunefl_module

    model, data = _tiny_model(), _tiny_data()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = PruneFL(_setup(initial, ["1.weight"], 0.25),
                PruneFLSettings(initial_rounds=2, update_interval=2, update_until=10))
    # Initial pruning on client 0: after each of its 2 local rounds, the top 3 of 12 weights.
    masks = []
    real_topk = prunefl_module.global_topk_mask

    def recording(scores, density):
        masks.append(real_topk(scores, density))
        return masks[-1]

    monkeypatch.setattr(prunefl_module, "global_topk_mask", recording)
    ledger = Ledger()
    state = s.run_setup(s.init(), LedgerAsk(_OneModelClients(s, model, data), s, ledger, 1))
    monkeypatch.setattr(prunefl_module, "global_topk_mask", real_topk)
    assert len(masks) == 2 and all(int(m["1.weight"].sum()) == 3 for m in masks)
    assert torch.equal(state.mask["1.weight"], masks[-1]["1.weight"])
    assert bool((state.weights["1.weight"][~state.mask["1.weight"]] == 0).all())
    # Its upload: the bitmap (12 bits: 2 bytes), 3 kept weights and 3 biases; nothing down.
    assert ledger.one_time() == {"initial_pruning_upload": HEADER.size + 2 + HEADER.size + 4 * 6}
    old = state.mask["1.weight"].reshape(-1)
    d = s.codec.digest(state.mask)
    values = [torch.full((6,), 1.0), torch.full((6,), 3.0)]
    imp = [torch.zeros(12), torch.zeros(12)]
    imp[0][[0, 5, 11]] = torch.tensor([8.0, 4.0, 1.0])
    imp[1][[5, 7, 11]] = torch.tensor([4.0, 2.0, 1.0])
    replies = [Reply(c, n, s.check(state, 2, c, encode_values(values[c], round=2, digest=d)
                                   + encode_values(imp[c], kind=PayloadKind.SCORES, round=2,
                                                   digest=d)))
               for c, n in ((0, 1), (1, 3))]
    new_state, _ = s.aggregate(state, 2, replies, [0, 1])
    # Weighted importance: [2, .., 4 (5), .., 1.5 (7), .., 1 (11)] -> keep 0, 5, 7.
    new = new_state.mask["1.weight"].reshape(-1)
    assert new.nonzero().squeeze(1).tolist() == [0, 5, 7]
    assert new_state.mask_changes == ((2,) if not torch.equal(new, old) else ())
    w = new_state.weights["1.weight"].reshape(-1)
    for i in (0, 5, 7):
        assert w[i].item() == (2.5 if old[i] else 0.0)  # averaged, or grown at exactly zero
    assert new_state.weights["1.bias"].tolist() == [2.5] * 3
    # An update round needs values and importance; other rounds values only.
    d = s.codec.digest(new_state.mask)
    with pytest.raises(PayloadError, match="round 4: expected 2 payloads, got 1"):
        s.check(new_state, 4, 0, encode_values(torch.ones(6), round=4, digest=d))
    scores = encode_values(torch.zeros(12), kind=PayloadKind.SCORES, round=3, digest=d)
    with pytest.raises(PayloadError, match="round 3: expected 1 payloads, got 2"):
        s.check(new_state, 3, 0, encode_values(torch.ones(6), round=3, digest=d) + scores)


COMMON = ["run.rounds=6", "run.progress=false", "federation.num_clients=4",
          "federation.clients_per_round=2", "train.local_epochs=1", "model.width=0.5",
          "algorithm.density=0.2",
          "algorithm.feddst.update_interval=2", "algorithm.feddst.update_until=6",
          "algorithm.prunefl.update_interval=2", "algorithm.prunefl.update_until=6",
          "algorithm.prunefl.initial_rounds=2"]


def _checked_run(monkeypatch: pytest.MonkeyPatch, name: str):
    """Run ``name`` on digits, recording the global mask's layer counts after every update."""
    seen: dict = {"counts": []}
    cls = algorithms.get(name)
    aggregate = cls.aggregate

    def checked(self, state, round, replies, sampled, refused=()):
        new, diagnostics = aggregate(self, state, round, replies, sampled, refused)
        seen["counts"].append({n: int(m.sum()) for n, m in self.global_mask(new).items()})
        seen["algorithm"], seen["state"] = self, new
        return new, diagnostics

    monkeypatch.setattr(cls, "aggregate", checked)
    result = run_experiment(load_config(None, [*COMMON, f"algorithm.name={name}"]), write=False)
    return result, seen


def _sizes(result, algorithm, state) -> tuple[int, int, int]:
    prunable = sum(m.numel() for m in result.mask.values())
    bitmap = HEADER.size + math.ceil(prunable / 8)
    values = HEADER.size + 4 * algorithm.codec.layout(state.mask).num_values
    return prunable, bitmap, values


def test_feddst_run_keeps_density_exact_and_pays_for_mask_changes(monkeypatch) -> None:
    result, seen = _checked_run(monkeypatch, "feddst")
    s = seen["algorithm"]
    prunable, bitmap, values = _sizes(result, s, seen["state"])
    assert len(seen["counts"]) == 6 and all(c == s.counts for c in seen["counts"])
    assert sum(s.counts.values()) == round(0.2 * prunable)
    assert seen["state"].mask_changes  # the mask did move
    m = result.metrics
    # Clients readjust in rounds 2 and 4 (alpha_6 = 0): those uploads carry a bitmap.
    for row in m:
        per_client = bitmap + values if row["round"] in (2, 4) else values
        assert row["bytes_up"] == 2 * per_client
        sent = (row["bytes_down"] - 2 * values) / bitmap
        assert sent in (0, 1, 2)
    assert m[0]["bytes_down"] == 2 * (bitmap + values)  # first contact: everyone gets the mask
    assert m[1]["bytes_up"] > m[2]["bytes_up"]
    assert result.summary["one_time_bytes"] == {}


def test_prunefl_run_keeps_density_exact_and_counts_dense_uploads(monkeypatch) -> None:
    result, seen = _checked_run(monkeypatch, "prunefl")
    prunable, bitmap, values = _sizes(result, seen["algorithm"], seen["state"])
    k = round(0.2 * prunable)
    assert len(seen["counts"]) == 6 and all(sum(c.values()) == k for c in seen["counts"])
    dense_scores = HEADER.size + 4 * prunable
    for row in result.metrics:
        dense = row["round"] in (2, 4, 6)
        assert row["bytes_up"] == 2 * (values + (dense_scores if dense else 0))
    assert result.metrics[1]["bytes_up"] > 2 * 4 * prunable  # a dense round costs dense bytes
    assert result.summary["one_time_bytes"] == {"initial_pruning_upload": bitmap + values}
    assert seen["state"].mask_changes


def test_config_validates_dynamic_keys() -> None:
    for bad, key in (("algorithm.feddst.update_interval=0", "update_interval"),
                     ("algorithm.feddst.update_until=-1", "update_until"),
                     ("algorithm.feddst.prune_fraction=1.5", "prune_fraction"),
                     ("algorithm.prunefl.update_interval=0", "update_interval"),
                     ("algorithm.prunefl.initial_rounds=0", "initial_rounds"),
                     # the flat spelling of earlier versions is checked the same way
                     ("algorithm.update_interval=0", "update_interval"),
                     ("algorithm.prunefl_initial_rounds=0", "initial_rounds")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["algorithm.name=feddst", bad])
    options = load_config(None, ["algorithm.name=prunefl"]).algorithm.options
    assert options == {"prunefl": {"update_interval": 10, "update_until": 0,
                                   "initial_rounds": 5}}
