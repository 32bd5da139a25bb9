"""FedDST and PruneFL: mask rules on hand-sized tensors, exact density and honest bytes in runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssfl import algorithms
from ssfl.client import LocalData, TrainSettings
from ssfl.comm import HEADER, PayloadKind, decode_bits, encode_bits, encode_values, read_header
from ssfl.config import ConfigError, load_config
from ssfl.dynamic import (
    FedDSTStrategy,
    PruneFLStrategy,
    average_over_holders,
    cosine_fraction,
    drop_and_regrow,
    erk_counts,
    magnitude_mask,
    prune_to_counts,
    train_with_importance,
)
from ssfl.masks import bits_to_mask, mask_digest, mask_to_bits
from ssfl.sim import run_experiment
from ssfl.strategies import payload_parts

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


def test_cosine_fraction_by_hand() -> None:
    assert cosine_fraction(0.4, 0, 10) == pytest.approx(0.4)
    assert cosine_fraction(0.4, 5, 10) == pytest.approx(0.2)  # cos(pi/2) = 0
    assert cosine_fraction(0.4, 3, 9) == pytest.approx(0.3)  # cos(pi/3) = 1/2
    assert cosine_fraction(0.4, 10, 10) == 0.0 and cosine_fraction(0.4, 12, 10) == 0.0
    s = FedDSTStrategy({"w": torch.ones(4, 4)}, ["w"], 0.5, prune_fraction=0.4,
                       update_interval=3, update_until=9)
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
    assert sorted(grown["w"].tolist()) == [2, 4]
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


def test_feddst_aggregate_and_mask_downloads_by_hand() -> None:
    initial = {"w": torch.tensor([[4.0, 3.0, 2.0], [1.0, 0.5, 0.1]]), "b": torch.tensor([0.0])}
    s = FedDSTStrategy(initial, ["w"], 0.5, prune_fraction=0.3, update_interval=1,
                       update_until=10)
    assert s.counts == {"w": 3} and s.mask["w"].tolist() == [[T, T, T], [F_, F_, F_]]
    first = s.payload_for(0, 1)
    parts = payload_parts(first)
    assert [read_header(p).kind for p in parts] == [PayloadKind.MASK, PayloadKind.VALUES]
    assert len(first) == (HEADER.size + 1) + (HEADER.size + 4 * 4)

    def reply(mask: list[bool], values: list[float]) -> bytes:
        m = {"w": torch.tensor(mask).reshape(2, 3)}
        d = mask_digest(m, ["w"])
        return (encode_bits(mask_to_bits(m, ["w"]), 6, round=1, digest=d)
                + encode_values(torch.tensor(values), round=1, digest=d))

    s.payload_for(1, 1)
    s.aggregate(1, [(0, reply([T, T, T, F_, F_, F_], [0.75, 2.0, 3.0, 10.0]), 1),
                    (1, reply([F_, T, T, T, F_, F_], [6.0, 5.0, -0.75, 30.0]), 3)])
    assert s.mask["w"].tolist() == [[F_, T, T], [T, F_, F_]]
    assert s.weights["w"].tolist() == [[0.0, 5.0, 4.5], [-0.75, 0.0, 0.0]]
    assert s.weights["b"].item() == 25.0 and s.mask_changes == [1]
    # Client 1 already holds the new global mask (its own); client 0 must be sent it.
    assert len(payload_parts(s.payload_for(1, 2))) == 1
    assert len(payload_parts(s.payload_for(0, 2))) == 2
    # A client mask with the wrong layer count is rejected, naming the client; alone in its
    # round it fails the round and leaves the model as it was.
    from ssfl.server import RoundFailed
    before = {n: w.clone() for n, w in s.weights.items()}
    with pytest.raises(RoundFailed, match="client 0: client 0's mask has wrong layer counts"):
        s.aggregate(1, [(0, reply([T, T, T, T, F_, F_], [1.0, 1, 1, 1, 1]), 1)])
    assert all(torch.equal(before[n], s.weights[n]) for n in before)


def test_feddst_client_regrows_at_zero_with_fresh_momentum() -> None:
    model, data = _tiny_model(), _tiny_data()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = FedDSTStrategy(initial, ["1.weight"], 0.5, prune_fraction=0.5, update_interval=1,
                       update_until=100)
    old = s.mask["1.weight"].clone()
    rep, _ = s.client_update(model, s.payload_for(0, 1), data, ONE_STEP, client_id=0, round=1,
                             lr=0.1, generator=torch.Generator().manual_seed(0))
    mask_part, values_part = payload_parts(rep)
    new = bits_to_mask(decode_bits(mask_part, expected_count=12), {"1.weight": old.shape},
                       ["1.weight"])["1.weight"]
    grown = new & ~old
    k = round(cosine_fraction(0.5, 1, 100) * 6)
    assert int(new.sum()) == int(old.sum()) == 6 and int(grown.sum()) == k == 3
    w = model[1].weight.detach()
    assert bool((w[grown] == 0).all()) and bool((w[~new] == 0).all())
    # Next round (no readjustment) this client trains in its own mask: a regrown weight's
    # first step is exactly -lr * grad, i.e. no momentum carried over from an earlier round.
    s.readjust_fraction = lambda r: 0.0
    start = w.clone()
    digest = mask_digest({"1.weight": new}, ["1.weight"])
    down = encode_values(torch.cat([start[new], model[1].bias.detach()]), round=2, digest=digest)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model((data.images.float() / 255 - 0.5) / 0.25),
                                data.labels).backward()
    expected = -0.1 * model[1].weight.grad[grown]
    s.client_update(model, down, data, ONE_STEP, client_id=0, round=2, lr=0.1,
                    generator=torch.Generator().manual_seed(1))
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


def test_prunefl_reconfiguration_by_hand() -> None:
    model, data = _tiny_model(), _tiny_data()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = PruneFLStrategy(initial, ["1.weight"], 0.25, model=model, initial_client=data,
                        settings=ONE_STEP, lr=0.1, generator=torch.Generator().manual_seed(0),
                        initial_rounds=2, update_interval=2, update_until=10)
    assert all(int(m["1.weight"].sum()) == 3 for m in s.initial_masks)
    assert s.setup_bytes == {"initial_pruning_upload": HEADER.size + 2 + HEADER.size + 4 * 6}
    old = s.mask["1.weight"].reshape(-1)
    d = s.digest
    values = [torch.full((6,), 1.0), torch.full((6,), 3.0)]
    imp = [torch.zeros(12), torch.zeros(12)]
    imp[0][[0, 5, 11]] = torch.tensor([8.0, 4.0, 1.0])
    imp[1][[5, 7, 11]] = torch.tensor([4.0, 2.0, 1.0])
    replies = [(c, encode_values(values[c], round=2, digest=d)
                + encode_values(imp[c], kind=PayloadKind.SCORES, round=2, digest=d), n)
               for c, n in ((0, 1), (1, 3))]
    s.aggregate(2, replies)
    # Weighted importance: [2, .., 4 (5), .., 1.5 (7), .., 1 (11)] -> keep 0, 5, 7.
    new = s.mask["1.weight"].reshape(-1)
    assert new.nonzero().squeeze(1).tolist() == [0, 5, 7]
    w = s.weights["1.weight"].reshape(-1)
    for i in (0, 5, 7):
        assert w[i].item() == (2.5 if old[i] else 0.0)  # averaged, or grown at exactly zero
    assert s.weights["1.bias"].tolist() == [2.5] * 3
    from ssfl.server import RoundFailed
    with pytest.raises(RoundFailed, match="client 0: round 4: expected 2 payloads"):
        s.aggregate(4, [(0, encode_values(torch.ones(6), round=4, digest=s.digest), 1)])


COMMON = ["run.rounds=6", "run.progress=false", "federation.num_clients=4",
          "federation.clients_per_round=2", "train.local_epochs=1", "model.width=0.5",
          "algorithm.density=0.2", "algorithm.update_interval=2", "algorithm.update_until=6",
          "algorithm.prunefl_initial_rounds=2"]


def _checked_run(monkeypatch: pytest.MonkeyPatch, name: str):
    """Run ``name`` on digits, recording the global mask's layer counts after every update."""
    seen: dict = {"counts": []}
    build = algorithms.TRAINING_STRATEGIES[name]

    def wrapped(ctx):
        strategy = build(ctx)
        aggregate = strategy.aggregate

        def checked(rnd, replies):
            update = aggregate(rnd, replies)
            seen["counts"].append({n: int(m.sum()) for n, m in strategy.global_mask().items()})
            return update

        strategy.aggregate = checked
        seen["strategy"] = strategy
        return strategy

    monkeypatch.setitem(algorithms.TRAINING_STRATEGIES, name, wrapped)
    result = run_experiment(load_config(None, [*COMMON, f"algorithm.name={name}"]), write=False)
    return result, seen


def _sizes(result, strategy) -> tuple[int, int, int]:
    prunable = sum(m.numel() for m in result.mask.values())
    bitmap = HEADER.size + math.ceil(prunable / 8)
    values = HEADER.size + 4 * strategy.layout.num_values
    return prunable, bitmap, values


def test_feddst_run_keeps_density_exact_and_pays_for_mask_changes(monkeypatch) -> None:
    result, seen = _checked_run(monkeypatch, "feddst")
    s = seen["strategy"]
    prunable, bitmap, values = _sizes(result, s)
    assert len(seen["counts"]) == 6 and all(c == s.counts for c in seen["counts"])
    assert sum(s.counts.values()) == round(0.2 * prunable)
    assert s.mask_changes  # the mask did move
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
    s = seen["strategy"]
    prunable, bitmap, values = _sizes(result, s)
    k = round(0.2 * prunable)
    assert len(seen["counts"]) == 6 and all(sum(c.values()) == k for c in seen["counts"])
    dense_scores = HEADER.size + 4 * prunable
    for row in result.metrics:
        dense = row["round"] in (2, 4, 6)
        assert row["bytes_up"] == 2 * (values + (dense_scores if dense else 0))
    assert result.metrics[1]["bytes_up"] > 2 * 4 * prunable  # a dense round costs dense bytes
    assert result.summary["one_time_bytes"] == {"initial_pruning_upload": bitmap + values}
    assert s.mask_changes


def test_config_validates_dynamic_keys() -> None:
    for bad in ("algorithm.update_interval=0", "algorithm.update_until=-1",
                "algorithm.prune_fraction=1.5", "algorithm.prunefl_initial_rounds=0"):
        with pytest.raises(ConfigError):
            load_config(None, ["algorithm.name=feddst", bad])
    assert load_config(None, ["algorithm.name=prunefl"]).algorithm.update_interval == 10
