"""SparsyFed: Powerprop and top-k rules on hand-sized tensors, the server's aggregation by hand,
payload forms and their validation through the run loop's screening, and exact density, honest
bytes, determinism and resume (also on a transport that loses client states) in short runs on
the embedded digits data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from algo_helpers import (
    Stop,
    capture,
    folder_rows,
    loop_run,
    make_ctx,
    make_setup,
    play_round,
    run_on,
    stop_after,
    timeless,
)
from torch import nn
from torch.nn.utils import parametrize

from ssfl import algorithms
from ssfl.algorithms.base import RoundFailed
from ssfl.algorithms.common import load_weights_
from ssfl.algorithms.sparsyfed import (
    SparsyFed,
    SparsyFedSettings,
    choose_form,
    form_sizes,
    powerprop_forward,
    powerprop_parametrized,
    to_powerprop,
    topk_magnitude_mask,
)
from ssfl.checkpoint import load_checkpoint
from ssfl.client import LocalData, TrainSettings
from ssfl.comm import (
    PayloadError,
    PayloadKind,
    decode_indices,
    encode_bits,
    encode_indices,
    encode_values,
    payload_parts,
    read_header,
)
from ssfl.config import ConfigError, load_config
from ssfl.masks import mask_digest, mask_to_bits
from ssfl.sim import run_experiment

T, F_ = True, False


# ---------------------------------------------------------------------------- rules by hand


def test_powerprop_map_and_its_inverse_by_hand() -> None:
    v = torch.tensor([[4.0, -1.0, 0.0], [0.25, 9.0, -16.0]])
    w = powerprop_forward(v, 1.5)  # sign(v) |v|^1.5
    assert w.tolist() == [[8.0, -1.0, 0.0], [0.125, 27.0, -64.0]]
    torch.testing.assert_close(to_powerprop(w, 1.5), v)
    assert powerprop_forward(torch.tensor([[2.0, -3.0, 0.0]]), 2.0).tolist() == [[4.0, -9.0, 0.0]]
    assert to_powerprop(torch.tensor([[4.0, -9.0, 0.0]]), 2.0).tolist() == [[2.0, -3.0, 0.0]]
    # beta = 1 is the identity both ways.
    assert torch.equal(powerprop_forward(v, 1.0), v) and torch.equal(to_powerprop(v, 1.0), v)
    # The gradient beta |v|^(beta-1) is finite everywhere and exactly 0 at v = 0.
    x = torch.tensor([0.0, 1.0, -16.0], requires_grad=True)
    powerprop_forward(x, 1.25).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.25, 2.5]))


def test_topk_keeps_exactly_k_with_position_ties() -> None:
    weights = {"a": torch.tensor([[0.5, -2.0, 0.5], [1.0, 0.0, -0.5]]),
               "b": torch.tensor([0.5, 3.0])}
    # |3| > |-2| > |1|, then four ties at 0.5: the earliest (a[0, 0]) wins.
    mask = topk_magnitude_mask(weights, 4)
    assert mask["a"].tolist() == [[T, T, F_], [T, F_, F_]] and mask["b"].tolist() == [F_, T]
    mask = topk_magnitude_mask(weights, 6)  # all four ties but one: b[0] is the latest
    assert mask["a"].tolist() == [[T, T, T], [T, F_, T]] and mask["b"].tolist() == [F_, T]
    assert sum(int(m.sum()) for m in topk_magnitude_mask(weights, 0).values()) == 0
    assert all(bool(m.all()) for m in topk_magnitude_mask(weights, 8).values())
    with pytest.raises(ValueError):
        topk_magnitude_mask(weights, 9)
    gen = torch.Generator().manual_seed(0)
    many_ties = {"x": torch.randint(-3, 4, (7, 9), generator=gen).float(),
                 "y": torch.randint(-3, 4, (13,), generator=gen).float()}
    for k in range(0, 77, 7):
        assert sum(int(m.sum()) for m in topk_magnitude_mask(many_ties, k).values()) == k


def test_topk_is_a_stable_sort_by_magnitude_over_all_tensors() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        w = {"x": torch.randint(-4, 5, (11, 7), generator=gen).float() * 0.5,
             "y": torch.randn(30, generator=gen).double(),
             "z": torch.randint(-2, 3, (5,), generator=gen).float()}
        flat = torch.cat([w[n].reshape(-1).abs().to(torch.float32) for n in w])
        for k in (0, 1, 13, 57, flat.numel()):
            keep = torch.zeros(flat.numel(), dtype=torch.bool)
            keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
            got = torch.cat([topk_magnitude_mask(w, k)[n].reshape(-1) for n in w])
            assert torch.equal(got, keep)


def test_payload_form_is_the_smallest_by_hand() -> None:
    # 64 weights, float32, no dense part: dense 28+256; bitmap 28+8 + 28+4k; indices 28+4k +
    # 28+4k.
    assert form_sizes(64, 1, 0, 4) == {"dense": 284, "bitmap": 68, "indices": 64}
    assert choose_form(64, 1, 0, 4) == "indices"
    assert choose_form(64, 8, 0, 4) == "bitmap"  # 96 against 120
    assert choose_form(64, 64, 0, 4) == "dense"  # 284 against 320
    assert choose_form(32, 1, 0, 4) == "bitmap"  # a tie (64 bytes each) goes to the bitmap
    # Indices win below a density of 1/32 whatever the model.
    assert choose_form(10**6, 31_000, 500, 4) == "indices"
    assert choose_form(10**6, 32_000, 500, 4) == "bitmap"


# ---------------------------------------------------------------------------- server


def _alg(beta: float = 2.0, density: float = 0.5,
         initial: dict[str, torch.Tensor] | None = None, num_clients: int = 4) -> SparsyFed:
    initial = initial or {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
                          "b": torch.tensor([0.0])}
    return SparsyFed(make_setup(initial, ["w"], density, num_clients), SparsyFedSettings(beta))


def _reply(s: SparsyFed, w: list[list[float]], b: float, round: int = 1) -> bytes:
    tensors = {"w": torch.tensor(w), "b": torch.tensor([b])}
    return s.encode(tensors, {"w": tensors["w"] != 0}, round)


def test_server_averages_powerprop_parameters_and_reports_the_topk_model_by_hand() -> None:
    s = _alg(beta=2.0)
    assert s.k == 3
    a = _reply(s, [[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]], 1.0)
    b = _reply(s, [[4.0, 0.0, 0.0], [0.0, 16.0, 1.0]], 5.0)
    # Through the run loop: all 4 clients sampled, 0 and 1 answer, 2 and 3 drop out.
    r = loop_run(s, s.init(), [[(0, a, 1), (1, b, 3)]])
    first = s.configure(s.init(), 1, [0], 1)[0]
    row = play_round(r, 1)
    state = r.state
    assert "rejected" not in row and "diagnostics" not in row
    assert [f["client"] for f in row["failed"]] == [2, 3] and row["attempts"] == 1
    assert row["bytes_up"] == len(a) + len(b) and row["bytes_down"] == 4 * len(first)
    # v = sqrt: [[2,0,1],[0,0,3]] (1 sample) and [[2,0,0],[0,4,1]] (3 samples); the weighted
    # mean [[2,0,.25],[0,3,1.5]], squared back. (A mean of w would give [[4,0,.25],[0,12,3]].)
    assert state.weights["w"].tolist() == [[4.0, 0.0, 0.0625], [0.0, 9.0, 2.25]]
    assert state.weights["b"].tolist() == [4.0]
    # Clients get the aggregate (4 nonzeros, the union); the reported model keeps the top 3.
    assert s.support_density(state) == pytest.approx(4 / 6)
    assert s.global_mask(state)["w"].tolist() == [[T, F_, F_], [F_, T, T]]
    assert s.final_values(state).tolist() == [4.0, 0.0, 0.0, 0.0, 9.0, 2.25, 4.0]
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2, 3))
    model.b = nn.Parameter(torch.zeros(1))
    load_weights_(model, s.eval_weights(state))
    assert model.w.tolist() == [[4.0, 0.0, 0.0], [0.0, 9.0, 2.25]]
    assert s.eval_weights(state, client=1)["w"].tolist() == model.w.tolist()  # no own models
    # Every client (and a retry) downloads the same payload: the unpruned aggregate.
    down = s.configure(state, 2, [7, 8], 1)
    assert down[7] == down[8] == s.configure(state, 2, [7], 2)[7]
    got, _ = s.decode(down[7], 2)
    assert torch.equal(got["w"], state.weights["w"]) and torch.equal(got["b"], state.weights["b"])
    # With beta = 1 the same replies are plain FedAvg.
    s1 = _alg(beta=1.0)
    r1 = loop_run(s1, s1.init(), [[(0, _reply(s1, [[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]], 1.0), 1),
                                   (1, _reply(s1, [[4.0, 0.0, 0.0], [0.0, 16.0, 1.0]], 5.0), 3)]])
    play_round(r1, 1)
    assert r1.state.weights["w"].tolist() == [[4.0, 0.0, 0.25], [0.0, 12.0, 3.0]]


def test_checkpoint_is_the_aggregate_and_refuses_another_beta_or_density() -> None:
    s = _alg(beta=2.0)
    r = loop_run(s, s.init(), [[(0, _reply(s, [[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]], 1.0), 1)]])
    play_round(r, 1)
    meta, tensors = s.state_dict(r.state)
    assert meta == {"beta": 2.0, "k": 3} and sorted(tensors) == ["weights.b", "weights.w"]
    back = s.load_state(meta, tensors)
    assert all(torch.equal(back.weights[n], r.state.weights[n]) for n in r.state.weights)
    assert torch.equal(s.final_values(back), s.final_values(r.state))
    for other in (_alg(beta=1.5), _alg(beta=2.0, density=0.7)):
        with pytest.raises(ValueError, match="another beta or density"):
            other.load_state(meta, tensors)
    with pytest.raises(ValueError, match="do not fit"):
        s.load_state(meta, {"weights.w": torch.zeros(3, 2), "weights.b": torch.zeros(1)})


def test_positions_travel_as_bitmap_or_indices_and_round_trip() -> None:
    initial = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)),
               "b": torch.zeros(3)}
    for density, form in ((0.01, "indices"), (0.1, "bitmap"), (1.0, "dense")):
        s = _alg(1.25, density, initial)
        keep = topk_magnitude_mask({"w": initial["w"]}, s.k)
        tensors = {"w": initial["w"] * keep["w"], "b": torch.tensor([1.0, 2.0, 3.0])}
        payload = s.encode(tensors, keep, 5)
        assert choose_form(4096, s.k, 3, 4) == form
        assert len(payload) == form_sizes(4096, s.k, 3, 4)[form]
        kinds = [read_header(p).kind for p in payload_parts(payload)]
        assert kinds == {"indices": [PayloadKind.INDICES, PayloadKind.VALUES],
                         "bitmap": [PayloadKind.MASK, PayloadKind.VALUES],
                         "dense": [PayloadKind.VALUES]}[form]
        back, support = s.decode(payload, 5, kept=s.k)
        assert torch.equal(back["w"], tensors["w"]) and torch.equal(back["b"], tensors["b"])
        assert sum(int(m.sum()) for m in support.values()) == (s.k if form != "dense" else 4096)


def test_indices_payload_round_trip_and_refusals() -> None:
    payload = encode_indices(torch.tensor([0, 5, 4095]), round=2)
    assert len(payload) == 28 + 3 * 4 and read_header(payload).kind == PayloadKind.INDICES
    assert decode_indices(payload, expected_count=3, bound=4096).tolist() == [0, 5, 4095]
    with pytest.raises(PayloadError, match="below 4095"):
        decode_indices(payload, expected_count=3, bound=4095)
    with pytest.raises(PayloadError, match="length"):
        decode_indices(payload[:-1], expected_count=3, bound=4096)
    with pytest.raises(PayloadError, match="INDICES"):
        decode_indices(encode_values(torch.ones(3)), expected_count=3, bound=4096)
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_indices(torch.tensor([3, 3]))


def test_malformed_replies_are_rejected_by_name_and_the_round_goes_on() -> None:
    s = _alg(beta=1.25, num_clients=14)
    state = s.init()
    good = _reply(s, [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], 1.0)
    mask = {"w": torch.tensor([[T, F_, T], [F_, F_, T]])}
    digest = mask_digest(mask, ["w"])
    bits = encode_bits(mask_to_bits(mask, ["w"]), 6, round=1, digest=digest)
    four = {"w": torch.tensor([[T, T, T], [F_, F_, T]])}
    four_digest = mask_digest(four, ["w"])

    def values(vals: list[float], d: bytes = digest, round: int = 1) -> bytes:
        return encode_values(torch.tensor(vals), round=round, digest=d)

    cases = [
        (bits + values([math.nan, 1.0, 1.0, 1.0]), "NaN or infinite"),
        (bits + values([1.0, 1.0, 1.0, math.inf]), "NaN or infinite"),
        (encode_bits(mask_to_bits(four, ["w"]), 6, round=1, digest=four_digest)
         + values([1.0] * 5, four_digest), "bitmap keeps 4 weights, expected 3"),
        (encode_indices(torch.tensor([0, 2]), round=1, digest=digest) + values([1.0] * 3),
         "2 indices, expected 3"),
        (encode_indices(torch.tensor([0, 2, 9]), round=1, digest=digest) + values([1.0] * 4),
         "below 6"),
        (encode_bits(mask_to_bits(mask, ["w"]), 6, round=1, digest=four_digest)
         + values([1.0] * 4), "digest does not match"),
        (bits + values([1.0] * 3), "3 values, expected 4"),
        (bits + values([1.0] * 4, round=2), "round 2, expected 1"),
        (encode_bits(mask_to_bits(mask, ["w"]), 6, round=2, digest=digest) + values([1.0] * 4),
         "positions are for round 2"),
        (values([1.0] * 7, d=s.dense_digest), "dense payload has 6 nonzero weights, at most 3"),
        (bits + values([1.0] * 4) + values([1.0]), "expected 1 or 2 payloads, got 3"),
        (good[:-2], "bundle ends inside a payload"),
        (b"garbage", "shorter than the header"),
    ]
    replies = [(i, payload, 2) for i, (payload, _) in enumerate(cases)]
    replies.append((len(cases), good, 2))
    r = loop_run(s, state, [replies])
    row = play_round(r, 1)
    assert [x["client"] for x in row["rejected"]] == list(range(len(cases)))
    for rejection, (_, expected) in zip(row["rejected"], cases):
        assert expected in rejection["reason"], (expected, rejection["reason"])
    # The round went on with the one valid reply; every byte received is counted, valid or not.
    assert r.state.weights["w"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert row["bytes_up"] == sum(len(p) for _, p, _ in replies)
    # A round with no valid reply fails and leaves the model as it was.
    before = r.state
    nan2 = (encode_bits(mask_to_bits(mask, ["w"]), 6, round=2, digest=digest)
            + values([math.nan, 1, 1, 1], round=2))
    r2 = loop_run(s, before, [[(3, nan2, 1)]], "federation.max_round_attempts=2")
    with pytest.raises(RoundFailed, match="client 3: payload has 1 NaN"):
        play_round(r2, 2)
    assert r2.state is before and r2.state.weights["w"].tolist() == [[1.0, 0.0, 1.0],
                                                                   [0.0, 0.0, 1.0]]
    # A round retried after rejections sends the same payloads again (clients are stateless).
    assert len(r2.transport.sent) == 2 and r2.transport.sent[0] == r2.transport.sent[1]


# ---------------------------------------------------------------------------- client


def _tiny_data(n: int = 6) -> LocalData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 2, 2), dtype=torch.uint8, generator=g)
    return LocalData(images, torch.arange(n) % 3, torch.arange(n), (0.5,), (0.25,))


# One full-batch step per round, no clipping, decay or augmentation: hand-checkable.
ONE_STEP = TrainSettings(momentum=0.9, weight_decay=0.0, local_epochs=1, batch_size=64,
                         clip_grad_norm=0.0, augment=False)


def test_client_trains_in_powerprop_space_then_uploads_its_topk() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = _tiny_data()
    w0 = torch.tensor([[0.5, 0.0, -0.2, 0.1], [0.0, 0.3, -0.4, 0.0], [0.05, 0.0, 0.6, -0.7]])
    b0 = torch.tensor([0.1, -0.1, 0.0])
    beta, lr = 1.25, 0.1
    # By hand: v = to_powerprop(w); one SGD step on v, gradient dL/dw * beta |v|^(beta-1).
    with torch.no_grad():
        model[1].weight.copy_(w0)
        model[1].bias.copy_(b0)
    x = (data.images.float() / 255 - 0.5) / 0.25
    loss = nn.functional.cross_entropy(model(x), data.labels)
    gw, gb = torch.autograd.grad(loss, [model[1].weight, model[1].bias])
    v0 = to_powerprop(w0, beta)
    expected = powerprop_forward(v0 - lr * gw * beta * v0.abs().pow(beta - 1), beta)

    initial = {"1.weight": w0, "1.bias": b0}
    for density in (1.0, 0.5):
        setup = make_setup(initial, ["1.weight"], density)
        s = SparsyFed(setup, SparsyFedSettings(beta))
        state = s.init()
        down = s.configure(state, 1, [0], 1)[0]
        out = s.client_step(make_ctx(setup, model, data, 0, 1, lr, torch.Generator(), ONE_STEP),
                            down, None)
        assert out.state is None  # clients are stateless
        assert out.result is not None and out.result.steps == 1
        up = s.check(state, 1, 0, out.reply)  # the server accepts it
        kept = topk_magnitude_mask({"w": expected}, s.k)["w"]
        torch.testing.assert_close(up["1.weight"], expected * kept)
        torch.testing.assert_close(up["1.bias"], b0 - lr * gb)
        # Zeros of the download stay zero (zero gradient at v = 0), so they are never kept.
        assert bool((up["1.weight"][w0 == 0] == 0).all())
        assert int((up["1.weight"] != 0).sum()) == min(s.k, 8)  # w0 has 8 nonzeros
        # The shared model is a plain model again, holding the pruned upload.
        assert not parametrize.is_parametrized(model[1]) and type(model[1]) is nn.Linear
        assert [n for n, _ in model.named_parameters()] == ["1.weight", "1.bias"]
        assert torch.equal(model[1].weight.detach(), up["1.weight"])


def test_parametrization_is_removed_after_a_crash() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="boom"), \
            powerprop_parametrized(model, ["0.weight"], 1.25):
        assert parametrize.is_parametrized(model[0])
        raise RuntimeError("boom")
    assert not parametrize.is_parametrized(model[0])


# ---------------------------------------------------------------------------- config


def test_config_key_and_its_checks() -> None:
    config = load_config(None, ["algorithm.name=sparsyfed"])
    assert config.algorithm.options["sparsyfed"] == {"powerprop_beta": 1.25}
    assert algorithms.settings_of(config) == SparsyFedSettings(1.25)
    config = load_config(None, ["algorithm.name=sparsyfed", "algorithm.sparsyfed.powerprop_beta=2"])
    assert algorithms.settings_of(config) == SparsyFedSettings(2.0)
    for bad in ("0.5", "nan", "inf", "-1"):
        with pytest.raises(ConfigError, match="algorithm.sparsyfed: powerprop_beta must be"):
            load_config(None, ["algorithm.name=sparsyfed",
                               f"algorithm.sparsyfed.powerprop_beta={bad}"])
    with pytest.raises(ConfigError, match="unknown config key 'algorithm.sparsyfed.beta'"):
        load_config(None, ["algorithm.name=sparsyfed", "algorithm.sparsyfed.beta=2"])
    # Robust aggregation applies (test_robust.py checks the rules).
    load_config(None, ["algorithm.name=sparsyfed", "federation.update_clip_norm=1.0",
                       "federation.aggregator=median"])


# ---------------------------------------------------------------------------- whole runs

COMMON = ["run.rounds=4", "run.progress=false", "federation.num_clients=4",
          "federation.clients_per_round=2", "train.local_epochs=1", "model.width=0.5",
          "algorithm.name=sparsyfed", "algorithm.density=0.2", "train.lr=0.2",
          "data.dataset=digits", "run.threads=1"]


@pytest.mark.slow
@pytest.mark.parametrize("density,form", [(0.2, "bitmap"), (0.02, "indices")])
def test_run_keeps_density_exact_and_counts_real_bytes(monkeypatch: pytest.MonkeyPatch,
                                                       density: float, form: str) -> None:
    seen = capture(monkeypatch, SparsyFed)
    kept: list[int] = []
    check = SparsyFed.check

    def counting_check(self, state, round, client_id, payload):  # type: ignore[no-untyped-def]
        kept.append(sum(int(m.sum()) for m in self.decode(payload, round)[1].values()))
        return check(self, state, round, client_id, payload)

    monkeypatch.setattr(SparsyFed, "check", counting_check)
    config = load_config(None, [*COMMON, f"algorithm.density={density}"])
    result = run_experiment(config, write=False)
    s = seen["alg"]
    total, other = s.total, s.other
    assert s.k == round(density * total)
    assert choose_form(total, s.k, other, 4) == form
    # Every upload keeps exactly k positions; every round's reported model has exactly k.
    assert kept == [s.k] * 8 and [len(x) for x in seen["replies"]] == [2] * 4
    assert all("rejected" not in row and "failed" not in row for row in result.metrics)
    assert [sum(int(m.sum()) for m in s.global_mask(st).values()) for st in seen["states"]] \
        == [s.k] * 4
    assert sum(int(m.sum()) for m in result.mask.values()) == s.k
    assert result.summary["density"] == pytest.approx(s.k / total)
    # Uploads: exactly two payloads of the chosen form a round.
    for row in result.metrics:
        assert row["bytes_up"] == 2 * form_sizes(total, s.k, other, 4)[form]
    # Round 1 downloads the dense initial model; later ones the last aggregate, whose support
    # (the union of the clients' masks) is never sparser than the target: each download is
    # exactly the smallest form of that support.
    assert result.metrics[0]["bytes_down"] == 2 * form_sizes(total, total, other, 4)["dense"]
    for row, previous in zip(result.metrics[1:], seen["states"]):
        support = round(s.support_density(previous) * total)
        assert support >= s.k
        sizes = form_sizes(total, support, other, 4)
        assert row["bytes_down"] == 2 * sizes[choose_form(total, support, other, 4)]
        assert row["bytes_down"] >= row["bytes_up"]
    assert result.summary["one_time_bytes"] == {}
    if form == "bitmap":
        assert result.metrics[-1]["accuracy"] > 0.3  # it learns
        again = run_experiment(load_config(None, [*COMMON, f"algorithm.density={density}"]),
                               write=False)
        assert timeless(again.metrics) == timeless(result.metrics)
        assert torch.equal(again.final_values, result.final_values)


@pytest.mark.slow
def test_resume_after_a_crash_is_bit_identical_even_where_clients_lose_state(
        tmp_path: Path) -> None:
    overrides = [*COMMON, "run.rounds=5", "run.checkpoint_every=1", "run.eval_every=2"]
    config = load_config(None, overrides)
    reference = run_experiment(config, tmp_path / "ref")
    ref_meta, ref_tensors = load_checkpoint(reference.run_dir / "checkpoint.pt")

    # The simulator (client states saved with the checkpoint), and a transport whose clients
    # lose theirs (a new Flower run): SparsyFed's clients are stateless, so neither needs a
    # re-sync and both end bit-identical.
    for name in ("sim", "forgetful"):
        folder = tmp_path / name
        with pytest.raises(Stop):
            run_on(name, config, folder, on_round=stop_after(3))
        meta, _ = load_checkpoint(folder / "checkpoint.pt")
        assert meta["round"] == 3 and meta["clients"] == []
        resumed = run_on(name, config, folder, resume=True)
        rows = folder_rows(folder)
        assert rows == folder_rows(reference.run_dir) and len(rows) == 5
        meta, tensors = load_checkpoint(folder / "checkpoint.pt")
        assert meta["round"] == ref_meta["round"] == 5
        assert tensors.keys() == ref_tensors.keys()
        assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
        assert torch.equal(resumed.final_values, reference.final_values)
        assert resumed.summary["total_bytes"] == reference.summary["total_bytes"]
        assert "resync_bytes" not in resumed.summary
