"""Mask rules on tiny hand-checkable tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssfl.algorithms.common import WeightedMean
from ssfl.masks import (
    apply_mask_,
    bits_to_mask,
    dead_units,
    erk_counts,
    erk_topk_mask,
    global_top_k,
    global_topk_mask,
    jaccard,
    mask_density,
    mask_digest,
    mask_to_bits,
    prunable_parameter_names,
    random_global_mask,
    saliency_scores,
    top_k,
    topk_count,
    unit_floor,
)
from ssfl.models import ResNet18, SmallCNN


def test_global_topk_on_a_2x3_tensor_by_eye() -> None:
    scores = {"w": torch.tensor([[0.1, 0.9, 0.3], [0.7, 0.2, 0.8]])}
    mask = global_topk_mask(scores, density=0.5)  # k = 3: 0.9, 0.8, 0.7
    assert mask["w"].tolist() == [[False, True, False], [True, False, True]]



def test_top_k_by_hand_with_ties_by_position_and_a_tiebreak() -> None:
    key = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0])
    assert top_k(key, 2).tolist() == [True, False, True, False, False]
    assert top_k(key, 3).tolist() == [True, False, True, True, False]
    # A tie at the boundary goes to the earlier position (1 before 4).
    assert top_k(key, 4).tolist() == [True, True, True, True, False]
    assert top_k(torch.zeros(4), 2).tolist() == [True, True, False, False]
    # Among equal keys the larger tiebreak wins, then the earlier position: 2.0 first, then
    # the 1.0s with tiebreak 5 (positions 2 and 3) before those with 0 (positions 0 and 4).
    key = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0])
    tiebreak = torch.tensor([0.0, 0.0, 5.0, 5.0, 0.0])
    assert top_k(key, 2, tiebreak).tolist() == [False, True, True, False, False]
    assert top_k(key, 4, tiebreak).tolist() == [True, True, True, True, False]
    # The tiebreak never overrides the key: the largest key stays in even with tiebreak 0.
    assert top_k(key, 1, tiebreak).tolist() == [False, True, False, False, False]
    # A 2-D key is selected flat (row-major); k = 0 and k = n are allowed, nothing else.
    assert top_k(torch.tensor([[0.5, 4.0], [4.0, 1.0]]), 2).tolist() == [False, True, True, False]
    assert not top_k(key, 0).any() and top_k(key, 5).all()
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="cannot keep"):
            top_k(key, bad)


def test_global_top_k_keeps_exactly_k_and_ties_go_to_the_earlier_tensor() -> None:
    keys = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([[5.0, 0.0]])}
    mask = global_top_k(keys, 2)
    assert mask["a"].tolist() == [False, True] and mask["b"].tolist() == [[True, False]]
    mask = global_top_k(keys, 1)  # the tie at 5.0 goes to the earlier tensor
    assert mask["a"].tolist() == [False, True] and mask["b"].tolist() == [[False, False]]

def test_topk_is_global_across_layers_not_per_layer() -> None:
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0])}
    mask = global_topk_mask(scores, density=0.5)  # k = 3: 20, 10, 4
    assert mask["a"].tolist() == [False, False, False, True]
    assert mask["b"].tolist() == [True, True]


def test_erk_layer_budget_keeps_each_layers_erk_share_and_its_top_scores() -> None:
    # a (2x3, 6 weights) outscores b (4x4, 16) everywhere: the global top-11 (density 0.5 of
    # 22) keeps all of a and b's five best. ERK by hand: densities proportional to
    # sum(shape)/prod(shape) = 5/6 and 8/16, scaled to 11 weights: 11/13 x (5, 8) = 4.23 and
    # 6.77 kept, rounded by largest remainder to 4 and 7.
    a = torch.tensor([[10.0, 15.0, 11.0], [14.0, 12.0, 13.0]])
    b = torch.arange(16.0).flip(0).reshape(4, 4) / 16  # 15/16 first, 0 last
    scores = {"a": a, "b": b}
    shapes = {"a": a.shape, "b": b.shape}
    assert erk_counts(shapes, 0.5) == {"a": 4, "b": 7}
    mask = erk_topk_mask(scores, 0.5)
    assert mask["a"].tolist() == [[False, True, False], [True, True, True]]  # 15, 14, 13, 12
    assert mask["b"].reshape(-1).tolist() == [True] * 7 + [False] * 9
    everywhere = global_topk_mask(scores, 0.5)
    assert bool(everywhere["a"].all()) and int(everywhere["b"].sum()) == 5
    with pytest.raises(ValueError, match="NaN"):
        erk_topk_mask({"a": torch.tensor([float("nan"), 1.0])}, 0.5)


def test_dead_units_by_eye() -> None:
    # A 3x2 linear mask: output row 1 keeps nothing, input column 1 keeps nothing.
    linear = torch.tensor([[True, False], [False, False], [True, False]])
    # A conv mask (2 filters, 3 input channels, 1x2 kernels): filter 0 keeps one tap of input
    # channel 2 only, filter 1 keeps nothing; inputs 0 and 1 feed no kept weight.
    conv = torch.zeros(2, 3, 1, 2, dtype=torch.bool)
    conv[0, 2, 0, 1] = True
    got = dead_units({"fc": linear, "conv": conv, "bias": torch.ones(3, dtype=torch.bool)})
    assert got == {"fc": (1, 3, 1, 2), "conv": (1, 2, 2, 3)}


def test_a_unit_floor_keeps_every_row_and_column_connected_by_eye() -> None:
    # 3 outputs x 3 inputs. The global top-6 takes 9, 8, 7, 6, 2, 1: row 2 keeps nothing.
    a = torch.tensor([[9.0, 8.0, 1.0], [7.0, 6.0, 2.0], [0.5, 0.4, 0.3]])
    scores = {"a": a, "bias": torch.tensor([5.0])}
    plain = global_topk_mask({"a": a}, 2 / 3)
    assert plain["a"].tolist() == [[True, True, True], [True, True, True], [False] * 3]
    # The floor: each row's best (9, 7, 0.5) and each column's best (9, 8, 2).
    floor = unit_floor(scores, 1)
    assert floor["a"].tolist() == [[True, True, False], [True, False, True],
                                   [True, False, False]]
    assert not floor["bias"].any()  # no units in a 1-D tensor
    # Floored top-6: the five floor weights, then the best of the rest (6); 1 makes way.
    floored = global_topk_mask({"a": a}, 2 / 3, per_unit=1)
    assert floored["a"].tolist() == [[True, True, False], [True, True, True],
                                     [True, False, False]]
    assert dead_units(plain) == {"a": (1, 3, 0, 3)} and dead_units(floored) == {"a": (0, 3, 0, 3)}
    # Ties go to the earlier position, within a row (column 0 for both rows) and within a
    # column (row 0 for both columns).
    tied = unit_floor({"t": torch.ones(2, 2)}, 1)["t"]
    assert tied.tolist() == [[True, True], [True, False]]
    # A floor larger than k, or than a unit, is refused with the numbers.
    with pytest.raises(ValueError, match="takes 5 weights, more than the 4"):
        global_topk_mask({"a": a}, 4 / 9, per_unit=1)
    with pytest.raises(ValueError, match="a unit has 3"):
        unit_floor(scores, 4)


@pytest.mark.parametrize("density", [0.1, 0.02])
@pytest.mark.parametrize("budget", ["global", "erk"])
def test_a_unit_floor_leaves_no_filter_dead_and_density_exact_on_a_real_model(
        density: float, budget: str) -> None:
    torch.manual_seed(0)
    model = ResNet18(10, width=0.125)
    names = prunable_parameter_names(model)
    # Scores that empty filters: each filter's scores scaled by a factor spread over 1e-6..1,
    # so a plain top-k at low density keeps only the loud filters.
    scores = {}
    for n, p in model.named_parameters():
        if n in names:
            loud = torch.logspace(-6, 0, p.shape[0])[torch.randperm(p.shape[0])]
            scores[n] = torch.rand(p.shape) * loud.reshape(-1, *[1] * (p.dim() - 1))
    choose = global_topk_mask if budget == "global" else erk_topk_mask
    plain, floored = choose(scores, density), choose(scores, density, per_unit=1)
    assert sum(dead for dead, *_ in dead_units(plain).values()) > 0
    assert all(dead == 0 and unused == 0 for dead, _, unused, _ in dead_units(floored).values())
    assert sum(int(m.sum()) for m in floored.values()) == sum(int(m.sum()) for m in plain.values())
    if budget == "erk":
        assert {n: int(m.sum()) for n, m in floored.items()} == \
            {n: int(m.sum()) for n, m in plain.items()}
    # Only weights of the plain mask's lowest ranks make way: every weight the floored mask
    # kept beyond its floor is above every plain-mask weight it dropped.
    floor = unit_floor(scores, 1)
    dropped = torch.cat([scores[n][plain[n] & ~floored[n]] for n in names])
    kept = torch.cat([scores[n][floored[n] & ~floor[n]] for n in names])
    if budget == "global":
        assert dropped.numel() > 0 and float(kept.min()) >= float(dropped.max())


@pytest.mark.parametrize("density", [0.5, 0.1, 0.013])
def test_erk_layer_budget_density_is_exact_on_a_real_model(density: float) -> None:
    torch.manual_seed(0)
    model = ResNet18(10, width=0.125)
    names = prunable_parameter_names(model)
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters() if n in names}
    mask = erk_topk_mask(scores, density)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in mask.values()) == topk_count(density, total)
    assert {n: int(m.sum()) for n, m in mask.items()} == erk_counts(
        {n: s.shape for n, s in scores.items()}, density)


def test_ties_are_broken_by_position_so_density_is_exact() -> None:
    scores = {"a": torch.zeros(3), "b": torch.zeros(3)}
    mask = global_topk_mask(scores, density=0.5)
    assert mask["a"].tolist() == [True, True, True]  # earlier positions win ties
    assert mask["b"].tolist() == [False, False, False]


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.1, 0.05, 0.013])
def test_density_is_exact_for_a_real_model(density: float) -> None:
    model = SmallCNN(10)
    names = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    torch.manual_seed(0)
    scores = {n: torch.rand(params[n].shape).round(decimals=2) for n in names}  # many ties
    mask = global_topk_mask(scores, density)
    assert sum(int(m.sum()) for m in mask.values()) == round(density * total)
    rnd = random_global_mask({n: params[n].shape for n in names}, density,
                             torch.Generator().manual_seed(1))
    assert sum(int(m.sum()) for m in rnd.values()) == round(density * total)


def test_topk_count_rejects_bad_density() -> None:
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            topk_count(bad, 100)
    with pytest.raises(ValueError, match="keeps no weight"):
        topk_count(0.001, 10)


def test_prunable_names_are_conv_and_linear_weights_including_first_and_last() -> None:
    model = SmallCNN(10)
    assert prunable_parameter_names(model) == [
        "conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"
    ]
    resnet = ResNet18(10, width=0.125)
    names = prunable_parameter_names(resnet)
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert not any("norm" in n or n.endswith("bias") for n in names)
    # 1 stem conv + 8 blocks * 2 convs + 3 shortcut convs + fc
    assert len(names) == 21


def test_saliency_is_abs_grad_times_weight_on_a_hand_computed_linear_model() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    x = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([0])
    scores = saliency_scores(model, [(x, y)])
    # logits = W x = [-3, 6.5]; p = softmax; dL/dlogits = p - onehot(0); dL/dW = outer(that, x)
    p = torch.softmax(torch.tensor([-3.0, 6.5]), 0)
    g = torch.outer(p - torch.tensor([1.0, 0.0]), x[0])
    expected = (g * model[0].weight.detach()).abs()
    torch.testing.assert_close(scores["0.weight"], expected)
    assert model[0].weight.grad is None  # scoring leaves no gradient behind


def test_saliency_averages_per_batch_scores_and_restores_train_mode() -> None:
    torch.manual_seed(0)
    model = SmallCNN(3, in_channels=1, image_size=8)
    b1 = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    b2 = (torch.randn(4, 1, 8, 8), torch.tensor([1, 1, 2, 2]))
    model.train()
    s1, s2 = saliency_scores(model, [b1]), saliency_scores(model, [b2])
    both = saliency_scores(model, [b1, b2])
    for name in both:
        torch.testing.assert_close(both[name], (s1[name] + s2[name]) / 2)
    assert model.training


def test_weighted_mean_by_hand() -> None:
    mean = WeightedMean()
    mean.add(torch.tensor([1.0, 0.0]), 1.0)
    mean.add(torch.tensor([4.0, 3.0]), 2.0)
    torch.testing.assert_close(mean.result(), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError):
        mean.add(torch.tensor([1.0]), 1.0)
    with pytest.raises(ValueError):
        mean.add(torch.tensor([1.0, 1.0]), 0.0)


def test_bitmap_round_trip_and_size() -> None:
    mask = {"a": torch.tensor([[True, False, True]]), "b": torch.tensor([False] * 6)}
    bits = mask_to_bits(mask, ["a", "b"])
    assert len(bits) == 2  # 9 bits -> 2 bytes
    assert bits[0] == 0b10100000
    back = bits_to_mask(bits, {"a": torch.Size([1, 3]), "b": torch.Size([6])}, ["a", "b"])
    assert all(torch.equal(back[n], mask[n]) for n in mask)
    with pytest.raises(ValueError):
        bits_to_mask(bits + b"\0", {"a": torch.Size([1, 3]), "b": torch.Size([6])}, ["a", "b"])


def test_digest_differs_between_masks() -> None:
    a = {"w": torch.tensor([True, False])}
    b = {"w": torch.tensor([False, True])}
    assert mask_digest(a, ["w"]) != mask_digest(b, ["w"])
    assert mask_digest(a, ["w"]) == mask_digest({"w": a["w"].clone()}, ["w"])


def test_apply_mask_zeroes_exactly_the_masked_weights() -> None:
    model = nn.Linear(3, 2, bias=False)
    keep = torch.tensor([[True, False, True], [False, True, False]])
    before = model.weight.detach().clone()
    apply_mask_(model, {"weight": keep})
    assert torch.equal(model.weight.detach(), before * keep)
    assert mask_density({"weight": keep}) == 0.5


def test_jaccard_by_eye() -> None:
    a = {"w": torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)}
    b = {"w": torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)}
    # intersection {(0,0), (1,1)} = 2; union {(0,0), (0,1), (1,1), (1,2)} = 4
    assert jaccard(a, b) == 0.5
    assert jaccard(a, a) == 1.0
    assert jaccard(a, {"w": ~a["w"]}) == 0.0
    with pytest.raises(ValueError, match="different layers"):
        jaccard(a, {"v": a["w"]})
