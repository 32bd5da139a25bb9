"""SparsyFed: Powerprop and top-k rules on hand-sized tensors, the server's aggregation by hand,
payload forms and their validation, and exact density, honest bytes, determinism and resume in
short runs on the embedded digits data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ssfl import algorithms
from ssfl.checkpoint import load_checkpoint
from ssfl.client import LocalData, TrainSettings
from ssfl.comm import (
    PayloadKind,
    encode_bits,
    encode_indices,
    encode_values,
    read_header,
)
from ssfl.config import ConfigError, load_config
from ssfl.masks import mask_digest, mask_to_bits
from ssfl.server import RoundFailed
from ssfl.sim import run_experiment
from ssfl.sparsyfed import (
    SparsyFedStrategy,
    choose_form,
    form_sizes,
    powerprop_forward,
    powerprop_parametrized,
    to_powerprop,
    topk_magnitude_mask,
)
from ssfl.strategies import payload_parts

T, F_ = True, False


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


def _strategy(beta: float = 2.0, density: float = 0.5) -> SparsyFedStrategy:
    initial = {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "b": torch.tensor([0.0])}
    return SparsyFedStrategy(initial, ["w"], density, beta=beta)


def _reply(s: SparsyFedStrategy, w: list[list[float]], b: float, round: int = 1) -> bytes:
    tensors = {"w": torch.tensor(w), "b": torch.tensor([b])}
    return s.encode(tensors, {"w": tensors["w"] != 0}, round)


def test_server_averages_powerprop_parameters_and_reports_the_topk_model_by_hand() -> None:
    s = _strategy(beta=2.0)
    assert s.k == 3
    a = _reply(s, [[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]], 1.0)
    b = _reply(s, [[4.0, 0.0, 0.0], [0.0, 16.0, 1.0]], 5.0)
    update = s.aggregate(1, [(0, a, 1), (1, b, 3)])
    assert update.num_clients == 2 and update.num_samples == 4
    assert update.bytes_up == len(a) + len(b)
    # v = sqrt: [[2,0,1],[0,0,3]] (1 sample) and [[2,0,0],[0,4,1]] (3 samples); the weighted
    # mean [[2,0,.25],[0,3,1.5]], squared back. (A mean of w would give [[4,0,.25],[0,12,3]].)
    assert s.weights["w"].tolist() == [[4.0, 0.0, 0.0625], [0.0, 9.0, 2.25]]
    assert s.weights["b"].tolist() == [4.0]
    # Clients get the aggregate (4 nonzeros, the union); the reported model keeps the top 3.
    assert s.support_density() == pytest.approx(4 / 6)
    assert s.global_mask()["w"].tolist() == [[T, F_, F_], [F_, T, T]]
    assert s.global_values().tolist() == [4.0, 0.0, 0.0, 0.0, 9.0, 2.25, 4.0]
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(2, 3))
    model.b = nn.Parameter(torch.zeros(1))
    s.load_global_(model)
    assert model.w.tolist() == [[4.0, 0.0, 0.0], [0.0, 9.0, 2.25]]
    down, _ = s.decode(s.payload_for(7, 2), 2)
    assert torch.equal(down["w"], s.weights["w"]) and torch.equal(down["b"], s.weights["b"])
    # With beta = 1 the same replies are plain FedAvg.
    s1 = _strategy(beta=1.0)
    s1.aggregate(1, [(0, _reply(s1, [[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]], 1.0), 1),
                     (1, _reply(s1, [[4.0, 0.0, 0.0], [0.0, 16.0, 1.0]], 5.0), 3)])
    assert s1.weights["w"].tolist() == [[4.0, 0.0, 0.25], [0.0, 12.0, 3.0]]


def test_positions_travel_as_bitmap_or_indices_and_round_trip() -> None:
    initial = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)),
               "b": torch.zeros(3)}
    for density, form in ((0.01, "indices"), (0.1, "bitmap"), (1.0, "dense")):
        s = SparsyFedStrategy(initial, ["w"], density, beta=1.25)
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
    from ssfl.comm import PayloadError, decode_indices

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
    s = _strategy(beta=1.25)
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
        (values([1.0] * 7, d=s._dense[2]), "dense payload has 6 nonzero weights, at most 3"),
        (bits + values([1.0] * 4) + values([1.0]), "expected 1 or 2 payloads, got 3"),
        (good[:-2], "bundle ends inside a payload"),
        (b"garbage", "shorter than the header"),
    ]
    replies = [(10 + i, payload, 2) for i, (payload, _) in enumerate(cases)]
    replies.append((99, good, 2))
    update = s.aggregate(1, replies)
    assert update.num_clients == 1 and update.bytes_up == len(good)
    assert [r.client_id for r in update.rejected] == [10 + i for i in range(len(cases))]
    for rejection, (_, expected) in zip(update.rejected, cases):
        assert expected in rejection.reason, (expected, rejection.reason)
    assert s.weights["w"].tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    # A round with no valid reply fails and leaves the model as it was.
    before = {n: w.clone() for n, w in s.weights.items()}
    with pytest.raises(RoundFailed, match="client 3: payload has 1 NaN"):
        s.aggregate(2, [(3, encode_bits(mask_to_bits(mask, ["w"]), 6, round=2, digest=digest)
                         + values([math.nan, 1, 1, 1], round=2), 1)])
    assert all(torch.equal(before[n], s.weights[n]) for n in before)


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
        s = SparsyFedStrategy(initial, ["1.weight"], density, beta=beta)
        reply, result = s.client_update(model, s.payload_for(0, 1), data, ONE_STEP, client_id=0,
                                        round=1, lr=lr, generator=torch.Generator())
        assert result.steps == 1
        up, _ = s.decode(reply, 1, kept=s.k)
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


def test_config_key_and_its_checks() -> None:
    assert load_config(None, ["algorithm.name=sparsyfed"]).algorithm.powerprop_beta == 1.25
    for bad in ("0.5", "nan", "inf", "-1"):
        with pytest.raises(ConfigError, match="algorithm.powerprop_beta must be"):
            load_config(None, ["algorithm.name=sparsyfed", f"algorithm.powerprop_beta={bad}"])
    with pytest.raises(ConfigError, match="update_clip_norm applies to the global-mask"):
        load_config(None, ["algorithm.name=sparsyfed", "federation.update_clip_norm=1.0"])


COMMON = ["run.rounds=6", "run.progress=false", "federation.num_clients=4",
          "federation.clients_per_round=2", "train.local_epochs=1", "model.width=0.5",
          "algorithm.name=sparsyfed", "algorithm.density=0.2", "train.lr=0.2"]


def _checked_run(monkeypatch: pytest.MonkeyPatch, overrides: list[str]):
    """Run on digits, recording every upload's kept count and length and, after every round,
    the reported global mask's count."""
    seen: dict = {"kept": [], "global": [], "sizes": []}
    build = algorithms.TRAINING_STRATEGIES["sparsyfed"]

    def wrapped(ctx):
        strategy = build(ctx)
        aggregate = strategy.aggregate

        def checked(rnd, replies):
            replies = list(replies)
            seen["sizes"].append(sum(len(p) for _, p, _ in replies))
            for _, payload, _ in replies:
                _, support = strategy.decode(payload, rnd)
                seen["kept"].append(sum(int(m.sum()) for m in support.values()))
            update = aggregate(rnd, replies)
            seen["global"].append(sum(int(m.sum()) for m in strategy.global_mask().values()))
            return update

        strategy.aggregate = checked
        seen["strategy"] = strategy
        return strategy

    monkeypatch.setitem(algorithms.TRAINING_STRATEGIES, "sparsyfed", wrapped)
    result = run_experiment(load_config(None, [*COMMON, *overrides]), write=False)
    return result, seen


def _rows(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in metrics]


def test_run_keeps_density_exact_counts_real_bytes_and_is_deterministic(monkeypatch) -> None:
    result, seen = _checked_run(monkeypatch, [])
    s = seen["strategy"]
    prunable = s.total
    assert s.k == round(0.2 * prunable)
    assert seen["kept"] == [s.k] * 12 and seen["global"] == [s.k] * 6
    assert result.summary["density"] == pytest.approx(s.k / prunable)
    upload = form_sizes(prunable, s.k, s.other, 4)["bitmap"]
    assert choose_form(prunable, s.k, s.other, 4) == "bitmap"
    for row, size in zip(result.metrics, seen["sizes"]):
        assert row["bytes_up"] == size == 2 * upload
    # Round 1 downloads the dense initial model; later downloads are the union aggregate,
    # never sparser than the target.
    assert result.metrics[0]["bytes_down"] == 2 * form_sizes(prunable, prunable, s.other,
                                                              4)["dense"]
    assert all(row["bytes_down"] >= 2 * upload for row in result.metrics[1:])
    assert s.support_density() >= s.k / prunable
    assert result.metrics[-1]["accuracy"] > 0.3  # it learns
    assert result.summary["one_time_bytes"] == {}
    again, _ = _checked_run(monkeypatch, [])
    assert _rows(again.metrics) == _rows(result.metrics)
    assert torch.equal(again.final_values, result.final_values)


def test_low_density_uploads_carry_indices(monkeypatch) -> None:
    result, seen = _checked_run(monkeypatch, ["algorithm.density=0.02", "run.rounds=2"])
    s = seen["strategy"]
    assert choose_form(s.total, s.k, s.other, 4) == "indices"
    assert seen["kept"] == [s.k] * 4 and seen["global"] == [s.k] * 2
    for row in result.metrics:
        assert row["bytes_up"] == 2 * form_sizes(s.total, s.k, s.other, 4)["indices"]


def test_resume_after_a_crash_is_bit_identical(tmp_path: Path) -> None:
    overrides = [*COMMON, "run.checkpoint_every=1", "run.eval_every=2", "run.threads=1"]
    reference = run_experiment(load_config(None, overrides), tmp_path / "ref")

    class Crash(Exception):
        pass

    def crash_after_three(row):
        if row["round"] == 3:
            raise Crash

    folder = tmp_path / "crashed"
    with pytest.raises(Crash):
        run_experiment(load_config(None, overrides), folder, on_round=crash_after_three)
    assert load_checkpoint(folder / "checkpoint.pt")[0]["round"] == 3
    resumed = run_experiment(load_config(None, overrides), folder, resume=True)

    def rows(path: Path) -> list[dict]:
        return _rows([json.loads(line) for line in
                      (path / "metrics.jsonl").read_text().splitlines()])

    assert rows(folder) == rows(reference.run_dir) and len(rows(folder)) == 6
    meta, tensors = load_checkpoint(folder / "checkpoint.pt")
    ref_meta, ref_tensors = load_checkpoint(reference.run_dir / "checkpoint.pt")
    assert meta["round"] == ref_meta["round"] == 6
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    assert torch.equal(resumed.final_values, reference.final_values)
    assert resumed.summary["total_bytes"] == reference.summary["total_bytes"]


def test_flower_refuses_it_before_any_work() -> None:
    pytest.importorskip("flwr")
    from ssfl.flower.server_app import check_supported

    with pytest.raises(ConfigError, match="does not run on Flower"):
        check_supported(load_config(None, ["algorithm.name=sparsyfed"]))
