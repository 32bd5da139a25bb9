"""Masked local training and the server's sparse FedAvg."""

from __future__ import annotations

import pytest
import torch

from ssfl.client import LocalData, TrainSettings, client_generator, local_train, train_round
from ssfl.comm import ParameterLayout, PayloadError, PayloadKind, encode_values
from ssfl.masks import full_mask, global_topk_mask, mask_digest, prunable_parameter_names
from ssfl.models import SmallCNN
from ssfl.server import SparseFedAvgServer, aggregate_scores, build_mask


def _tiny_data(n: int = 24, seed: int = 0) -> LocalData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return LocalData(images, labels, torch.arange(n), (0.5,), (0.25,))


def _model_and_mask(density: float = 0.3) -> tuple[SmallCNN, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = SmallCNN(3, in_channels=1, image_size=8)
    params = dict(model.named_parameters())
    names = prunable_parameter_names(model)
    mask = global_topk_mask({n: params[n].detach().abs() for n in names}, density)
    return model, mask


SETTINGS = TrainSettings(momentum=0.9, weight_decay=5e-2, local_epochs=3, batch_size=8,
                         clip_grad_norm=1.0, augment=True)


def test_masked_weights_stay_exactly_zero_despite_momentum_and_weight_decay() -> None:
    model, mask = _model_and_mask()
    layout = ParameterLayout.for_model(model, mask)
    layout.scatter_model_(layout.gather_model(model), model)  # start inside the mask
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    local_train(model, _tiny_data(), SETTINGS, lr=0.5, generator=torch.Generator().manual_seed(0),
                mask=mask)
    for name, keep in mask.items():
        p = dict(model.named_parameters())[name].detach()
        assert torch.count_nonzero(p[~keep]) == 0, name
        assert not torch.equal(p[keep], before[name][keep]), f"{name} did not train"


def test_without_the_mask_the_same_training_revives_pruned_weights() -> None:
    # The property above is not vacuous: unmasked training does move the zeroed weights.
    model, mask = _model_and_mask()
    layout = ParameterLayout.for_model(model, mask)
    layout.scatter_model_(layout.gather_model(model), model)
    local_train(model, _tiny_data(), SETTINGS, lr=0.5, generator=torch.Generator().manual_seed(0))
    p = dict(model.named_parameters())["fc1.weight"].detach()
    assert torch.count_nonzero(p[~mask["fc1.weight"]]) > 0


def test_local_training_is_deterministic_given_the_generator() -> None:
    results = []
    for _ in range(2):
        model, mask = _model_and_mask()
        local_train(model, _tiny_data(), SETTINGS, lr=0.1,
                    generator=client_generator(3, 4, 5), mask=mask)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_client_generators_differ_across_seed_round_and_client() -> None:
    draws = {
        tuple(torch.randint(0, 10**6, (3,), generator=client_generator(*key)).tolist())
        for key in [(0, 1, 2), (0, 2, 1), (1, 1, 2), (0, 1, 3)]
    }
    assert len(draws) == 4


def test_server_fedavg_is_sample_weighted_by_hand() -> None:
    initial = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0])}
    mask = {"w": torch.tensor([[True, False], [False, True]])}
    server = SparseFedAvgServer(initial, ["w"], mask)
    assert server.values.tolist() == [1.0, 4.0, 0.0]
    r1 = encode_values(torch.tensor([1.0, 1.0, 1.0]), round=1, digest=server.digest)
    r2 = encode_values(torch.tensor([4.0, 7.0, 10.0]), round=1, digest=server.digest)
    update = server.aggregate(1, [(r1, 10), (r2, 20)])
    assert server.values.tolist() == [3.0, 5.0, 7.0]
    assert update.num_clients == 2 and update.num_samples == 30
    assert update.bytes_up == len(r1) + len(r2)
    dense = server.dense_state()
    assert dense["w"].tolist() == [[3.0, 0.0], [0.0, 5.0]] and dense["b"].tolist() == [7.0]


def test_score_aggregation_weighted_and_uniform_by_hand() -> None:
    shapes = {"w": torch.Size([2])}
    payloads = [
        (encode_values(torch.tensor([1.0, 0.0]), kind=PayloadKind.SCORES), 1),
        (encode_values(torch.tensor([0.0, 4.0]), kind=PayloadKind.SCORES), 3),
    ]
    weighted = aggregate_scores(payloads, shapes, mode="weighted")
    uniform = aggregate_scores(payloads, shapes, mode="uniform")
    assert weighted["w"].tolist() == [0.25, 3.0]
    assert uniform["w"].tolist() == [0.5, 2.0]
    # The two modes can pick different masks: weighted keeps w[1], and so does uniform here;
    # with one weight kept out of two, both choose the larger mean.
    assert global_topk_mask(weighted, 0.5)["w"].tolist() == [False, True]
    with pytest.raises(ValueError, match="weighted"):
        aggregate_scores(payloads, shapes, mode="median")


def test_build_mask_per_algorithm() -> None:
    shapes = {"w": torch.Size([4, 5])}
    assert torch.equal(build_mask("fedavg", shapes, 1.0)["w"], full_mask(shapes)["w"])
    rnd = build_mask("random", shapes, 0.25, seed=1)
    assert int(rnd["w"].sum()) == 5
    assert torch.equal(rnd["w"], build_mask("random", shapes, 0.25, seed=1)["w"])
    scores = {"w": torch.arange(20.0).reshape(4, 5)}
    top = build_mask("ssfl", shapes, 0.25, scores=scores)
    assert top["w"].reshape(-1).nonzero().squeeze(1).tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="saliency"):
        build_mask("ssfl", shapes, 0.25)


def test_train_round_replies_on_the_mask_and_rejects_a_stale_round() -> None:
    model, mask = _model_and_mask()
    names = prunable_parameter_names(model)
    layout = ParameterLayout.for_model(model, mask)
    digest = mask_digest(mask, names)
    down = encode_values(layout.gather_model(model), round=2, digest=digest)
    reply, result = train_round(model, layout, mask, digest, down, _tiny_data(), SETTINGS,
                                round=2, lr=0.1, generator=torch.Generator().manual_seed(0))
    assert len(reply) == len(down)  # same layout both ways
    assert result.num_samples == 24 and result.steps == 9
    with pytest.raises(PayloadError):
        train_round(model, layout, mask, digest, down, _tiny_data(), SETTINGS, round=3, lr=0.1,
                    generator=torch.Generator().manual_seed(0))
