"""Static-mask baselines: ERK random masks, SNIP on pooled data, SNIP on one client."""

from __future__ import annotations

import math

import pytest
import torch

from ssfl.comm import HEADER
from ssfl.config import load_config
from ssfl.masks import erk_densities, layer_counts, mask_density, random_layerwise_mask
from ssfl.server import build_mask, find_mask
from ssfl.sim import run_experiment


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
    mask = build_mask("random_erk", shapes, density, seed=3)
    assert sum(int(m.sum()) for m in mask.values()) == round(density * total)
    # The big layer is pruned hardest, as ERK intends.
    assert mask["fc1"].float().mean() < mask["conv"].float().mean()
    again = random_layerwise_mask(shapes, erk_densities(shapes, density),
                                  round(density * total), torch.Generator().manual_seed(3))
    assert all(torch.equal(again[n], mask[n]) for n in shapes)


def test_find_mask_scores_one_client_for_snip_single_and_none_for_random() -> None:
    shapes = {"w": torch.Size([4])}
    asked: list[list[int]] = []

    def collect(ids):
        asked.append(list(ids))
        from ssfl.comm import PayloadKind, encode_values
        for cid in ids:
            yield cid, encode_values(torch.tensor([1.0, 4.0, 2.0, 3.0]),
                                     kind=PayloadKind.SCORES), 5

    single = find_mask("snip_single", shapes, 0.5, num_clients=7, seed=0, collect_scores=collect)
    assert asked == [[0]] and single.scored_clients == [0]
    assert single.mask["w"].tolist() == [False, True, False, True]
    assert single.score_upload_bytes == HEADER.size + 16
    ssfl = find_mask("ssfl", shapes, 0.5, num_clients=3, seed=0, collect_scores=collect)
    assert asked[-1] == [0, 1, 2] and ssfl.score_upload_bytes == 3 * (HEADER.size + 16)
    rnd = find_mask("random", shapes, 0.5, num_clients=3, seed=0, collect_scores=collect)
    assert rnd.score_upload_bytes == 0 and len(asked) == 2
    with pytest.raises(ValueError, match="pooled"):
        find_mask("snip_oracle", shapes, 0.5, num_clients=3, seed=0)


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
    from ssfl.comm import encode_values
    from ssfl.masks import mask_digest
    from ssfl.strategies import ClientMaskStrategy

    initial = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.0])}
    strategy = ClientMaskStrategy(initial, ["w"], 0.5, num_clients=2, seed=0)
    m0, m1 = strategy.client_mask(0)["w"], strategy.client_mask(1)["w"]
    assert int(m0.sum()) == int(m1.sum()) == 2
    replies = []
    for cid, value, n in ((0, 10.0, 1), (1, 40.0, 3)):
        mask = strategy.client_mask(cid)
        # Each client returns `value` for its two weights and its bias.
        payload = encode_values(torch.full((3,), value), round=1,
                                digest=mask_digest(mask, ["w"]))
        replies.append((cid, payload, n))
    strategy.aggregate(1, replies)
    w = strategy.weights["w"]
    for i in range(4):
        if m0[i] and m1[i]:
            assert w[i] == pytest.approx((10.0 * 1 + 40.0 * 3) / 4)
        elif m0[i]:
            assert w[i] == 10.0
        elif m1[i]:
            assert w[i] == 40.0
        else:
            assert w[i] == initial["w"][i]  # no holder this round: unchanged
    assert strategy.weights["b"].item() == pytest.approx(32.5)
    assert strategy.setup_bytes["mask_broadcast"] == 2 * (HEADER.size + 1)


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
    from ssfl.comm import encode_bits, encode_values
    from ssfl.strategies import payload_parts

    a = encode_bits(b"\xff\x80", 9)
    b = encode_values(torch.ones(3), dtype="float16")
    assert payload_parts(a + b) == [a, b]
    from ssfl.comm import PayloadError
    with pytest.raises(PayloadError):
        payload_parts(a + b[:-1])
