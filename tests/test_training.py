"""Masked local training, the server's sparse FedAvg and how the static methods find
their mask."""

from __future__ import annotations

import pytest
import torch

from ssfl.algorithms.base import NoSettings, Reply, Setup, SetupFailed, SetupReply
from ssfl.algorithms.common import decode_scores
from ssfl.algorithms.robust import combine_scores
from ssfl.algorithms.ssfl import SSFL, FixedMaskFedAvg, SaliencySettings
from ssfl.algorithms.static import DenseFedAvg, RandomMask
from ssfl.client import LocalData, TrainSettings, client_generator, local_train, train_round
from ssfl.comm import ParameterLayout, PayloadError, PayloadKind, decode_values, encode_values
from ssfl.config import load_config
from ssfl.masks import full_mask, global_topk_mask, mask_digest, prunable_parameter_names
from ssfl.models import SmallCNN


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


def _setup(initial: dict[str, torch.Tensor], prunable: list[str], *overrides: str,
           num_clients: int = 2) -> Setup:
    # The hand computations are the paper's FedAvg: no adaptive clipping ("auto" clips at 2x).
    return Setup(load_config(None, ["federation.aggregator=mean", *overrides]),
                 {n: t.shape for n, t in initial.items()},
                 prunable, initial, num_clients)


def test_server_fedavg_is_sample_weighted_by_hand() -> None:
    initial = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0])}
    mask = {"w": torch.tensor([[True, False], [False, True]])}
    algorithm = FixedMaskFedAvg(_setup(initial, ["w"]), NoSettings())
    state = algorithm.with_mask(mask)
    assert state.values.tolist() == [1.0, 4.0, 0.0] and state.round == 0
    digest = mask_digest(mask, ["w"])
    # Every sampled client receives the same payload: the active global values, this round.
    down = algorithm.configure(state, 1, [0, 1], 1)
    assert down[0] == down[1]
    assert decode_values(down[0], expected_round=1, expected_digest=digest).tolist() == \
        [1.0, 4.0, 0.0]
    r1 = encode_values(torch.tensor([1.0, 1.0, 1.0]), round=1, digest=digest)
    r2 = encode_values(torch.tensor([4.0, 7.0, 10.0]), round=1, digest=digest)
    replies = [Reply(0, 10, algorithm.check(state, 1, 0, r1)),
               Reply(1, 20, algorithm.check(state, 1, 1, r2))]
    new, _ = algorithm.aggregate(state, 1, replies, [0, 1])
    assert new.values.tolist() == [3.0, 5.0, 7.0] and new.round == 1
    assert state.values.tolist() == [1.0, 4.0, 0.0]  # the old state is left as it was
    dense = algorithm.eval_weights(new)
    assert dense["w"].tolist() == [[3.0, 0.0], [0.0, 5.0]] and dense["b"].tolist() == [7.0]


def test_score_aggregation_weighted_and_uniform_by_hand() -> None:
    payloads = [
        (encode_values(torch.tensor([1.0, 0.0]), kind=PayloadKind.SCORES), 1),
        (encode_values(torch.tensor([0.0, 4.0]), kind=PayloadKind.SCORES), 3),
    ]

    def combined(weighted: bool, rule: str = "mean") -> dict[str, torch.Tensor]:
        pairs = ((decode_scores(p, 2), float(n) if weighted else 1.0) for p, n in payloads)
        return {"w": combine_scores(pairs, 2, rule=rule)}

    weighted, uniform = combined(True), combined(False)
    assert weighted["w"].tolist() == [0.25, 3.0]
    assert uniform["w"].tolist() == [0.5, 2.0]
    # The two modes can pick different masks: weighted keeps w[1], and so does uniform here;
    # with one weight kept out of two, both choose the larger mean.
    assert global_topk_mask(weighted, 0.5)["w"].tolist() == [False, True]
    with pytest.raises(ValueError, match="score rule"):
        combined(True, "mode")


class _Ask:
    """The set-up phase's messages, recorded; every client asked for scores answers with
    ``scores`` (none answers when it is None)."""

    def __init__(self, scores: torch.Tensor | None = None) -> None:
        self.scores = scores
        self.asked: list[tuple[str, list[int]]] = []
        self.delivered: list[tuple[str, dict[int, bytes]]] = []

    def query(self, kind, payloads, *, label, all_required=False):
        self.asked.append((kind, list(payloads)))
        if self.scores is None:
            return []
        body = encode_values(self.scores, kind=PayloadKind.SCORES)
        return [SetupReply(c, body, 5) for c in payloads]

    def deliver(self, kind, payloads, *, label):
        self.delivered.append((kind, dict(payloads)))

    def pooled(self, kind):
        raise NotImplementedError


def test_each_static_method_finds_its_mask_in_the_set_up_phase() -> None:
    initial = {"w": torch.ones(4, 5)}
    shapes = {"w": torch.Size([4, 5])}
    dense = DenseFedAvg(_setup(initial, ["w"], "algorithm.name=fedavg", "algorithm.density=1.0"),
                        NoSettings())
    ask = _Ask()
    state = dense.run_setup(dense.init(), ask)
    assert torch.equal(state.mask["w"], full_mask(shapes)["w"])
    assert ask.asked == [] and ask.delivered == []  # a dense model needs no message

    def random_mask(seed: int) -> torch.Tensor:
        method = RandomMask(_setup(initial, ["w"], "algorithm.name=random",
                                   "algorithm.density=0.25", f"run.seed={seed}"), NoSettings())
        ask = _Ask()
        state = method.run_setup(method.init(), ask)
        # No scores; the bitmap goes to every client once.
        assert ask.asked == [] and [k for k, _ in ask.delivered] == ["mask"]
        sent = ask.delivered[0][1]
        assert sorted(sent) == [0, 1]
        assert all(torch.equal(method.codec.decode(p)[0]["w"], state.mask["w"])
                   for p in sent.values())
        return state.mask["w"]

    rnd = random_mask(1)
    assert int(rnd.sum()) == 5
    assert torch.equal(rnd, random_mask(1)) and not torch.equal(rnd, random_mask(2))

    ssfl = SSFL(_setup(initial, ["w"], "algorithm.density=0.25", num_clients=3),
                SaliencySettings())
    ask = _Ask(torch.arange(20.0))
    state = ssfl.run_setup(ssfl.init(), ask)
    assert ask.asked == [("scores", [0, 1, 2])]
    assert state.mask["w"].reshape(-1).nonzero().squeeze(1).tolist() == [15, 16, 17, 18, 19]
    assert ssfl.setup_record(state) == {"scored_clients": [0, 1, 2]}
    # A malformed score payload (here: NaN) is left out, by name; the rest build the mask.
    bad = _Ask(torch.arange(20.0))
    good_query = bad.query

    def one_nan(kind, payloads, **kw):
        replies = good_query(kind, payloads, **kw)
        nan = encode_values(torch.full((20,), float("nan")), kind=PayloadKind.SCORES)
        return [replies[0], SetupReply(1, nan, 5), replies[2]]

    bad.query = one_nan  # type: ignore[method-assign]
    state = ssfl.run_setup(ssfl.init(), bad)
    assert ssfl.setup_record(state) == {"scored_clients": [0, 2]}
    assert state.mask["w"].reshape(-1).nonzero().squeeze(1).tolist() == [15, 16, 17, 18, 19]
    # Negative scores cannot be |dL/dw * w|: one hostile client's -3e38 on a whole layer is
    # left out instead of emptying that layer.
    hostile = _Ask(torch.arange(20.0))
    honest_query = hostile.query

    def one_negative(kind, payloads, **kw):
        replies = honest_query(kind, payloads, **kw)
        scores = encode_values(torch.full((20,), -3e38), kind=PayloadKind.SCORES)
        return [replies[0], replies[1], SetupReply(2, scores, 5)]

    hostile.query = one_negative  # type: ignore[method-assign]
    state = ssfl.run_setup(ssfl.init(), hostile)
    assert ssfl.setup_record(state) == {"scored_clients": [0, 1]}
    assert state.mask["w"].reshape(-1).nonzero().squeeze(1).tolist() == [15, 16, 17, 18, 19]
    # Without any client's scores there is no mask to build.
    with pytest.raises(SetupFailed, match="no client sent valid saliency scores"):
        ssfl.run_setup(ssfl.init(), _Ask(None))


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
