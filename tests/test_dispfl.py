"""DisPFL: its rules on hand-sized tensors, exact layer counts, honest relay bytes, personal
evaluation, validation through the run loop's screening, the relay's resend after rejections,
lost replies and retries, re-sync of clients that lost their state, and bit-identical resume."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from algo_helpers import (
    Forgetful,
    Stop,
    capture,
    folder_rows,
    loop_run,
    make_ctx,
    make_setup,
    play_round,
    run_on,
    screen_replies,
    stop_after,
    timeless,
)
from torch import nn

import ssfl.algorithms.dispfl as dispfl
from ssfl import algorithms
from ssfl.algorithms.base import ClientOutput, RoundFailed
from ssfl.algorithms.common import load_weights_
from ssfl.algorithms.dispfl import (
    DisPFL,
    DisPFLSettings,
    dispfl_neighbours,
    drop_ratio,
    neighbour_average,
    update_mask,
)
from ssfl.checkpoint import load_checkpoint
from ssfl.client import LocalData, TrainResult, TrainSettings, evaluate_samples
from ssfl.comm import HEADER, PayloadError, PayloadKind, encode_values, payload_parts, read_header
from ssfl.config import ConfigError, load_config
from ssfl.data.partition import class_counts, matching_test_splits
from ssfl.masks import erk_counts
from ssfl.run.experiment import prepare
from ssfl.run.loop import run
from ssfl.sim import InProcessTransport, run_experiment

T, F_ = True, False
SETTINGS = TrainSettings(momentum=0.9, weight_decay=0.0, local_epochs=1, batch_size=4,
                         clip_grad_norm=0.0, augment=False)


def _tiny_data(n: int = 12) -> LocalData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 2, 2), dtype=torch.uint8, generator=g)
    return LocalData(images, torch.arange(n) % 3, torch.arange(n), (0.5,), (0.25,))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _alg(model: nn.Module, num_clients: int = 4, neighbors: int = 2, anneal: float = 0.5,
         rounds: int = 10) -> DisPFL:
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup = make_setup(initial, ["1.weight", "3.weight"], 0.5, num_clients,
                       [f"run.rounds={rounds}"], name="dispfl")
    return DisPFL(setup, DisPFLSettings(neighbors, anneal))


def _step(s: DisPFL, model: nn.Module, data: LocalData, cid: int, rnd: int, down: bytes,
          state: bytes | None, seed: int | None = None) -> ClientOutput:
    """One client round, its generator seeded by (round, client) as the simulator does."""
    gen = torch.Generator().manual_seed(rnd * 10 + cid if seed is None else seed)
    return s.client_step(make_ctx(s.setup, model, data, cid, rnd, 0.1, gen, SETTINGS), down,
                         state)


def _accept(s: DisPFL, state, rnd: int, replies, sampled):  # type: ignore[no-untyped-def]
    """The relay's state after a round whose replies all pass the loop's screening."""
    valid, rejected = screen_replies(s, state, rnd, replies)
    assert not rejected
    return s.aggregate(state, rnd, valid, sampled)[0]


# ---------------------------------------------------------------------------- rules by hand


def test_neighbour_average_over_holders_by_hand() -> None:
    shapes = {"w": torch.Size([2, 3]), "b": torch.Size([1])}
    a = ({"w": torch.tensor([[1.0, 2, 0], [0, 3, 0]]), "b": torch.tensor([1.0])},
         {"w": torch.tensor([[T, T, F_], [F_, T, F_]])})
    b = ({"w": torch.tensor([[3.0, 0, 4], [0, 5, 0]]), "b": torch.tensor([2.0])},
         {"w": torch.tensor([[T, F_, T], [F_, T, F_]])})
    c = ({"w": torch.tensor([[0.0, 8, 6], [7, 0, 0]]), "b": torch.tensor([6.0])},
         {"w": torch.tensor([[F_, T, T], [T, F_, F_]])})
    # Holders: (0,0) a,b -> 2; (0,1) a,c -> 5; (0,2) b,c -> 5; (1,0) c -> 7; (1,1) a,b -> 4;
    # (1,2) nobody -> 0. Then masked by the client's own mask. Biases: (1+2+6)/3 = 3.
    out = neighbour_average(a[1], [a, b, c], shapes)
    assert out["w"].tolist() == [[2.0, 5.0, 0.0], [0.0, 4.0, 0.0]]
    assert out["b"].tolist() == [3.0]
    own = {"w": torch.tensor([[T, F_, T], [T, T, T]])}
    assert neighbour_average(own, [a, b, c], shapes)["w"].tolist() == [[2.0, 0.0, 5.0],
                                                                       [7.0, 4.0, 0.0]]


def test_drop_ratio_and_ceil_drop_count_by_hand() -> None:
    assert drop_ratio(0.5, 1, 10) == pytest.approx(0.5)  # the authors' round_idx 0
    assert drop_ratio(0.5, 6, 10) == pytest.approx(0.25)  # cos(pi/2) = 0
    assert drop_ratio(0.5, 11, 10) == 0.0
    w = torch.tensor([[0.5, -0.1, 0.0], [2.0, 0.0, -0.3]])
    mask = torch.tensor([[T, T, F_], [T, F_, T]])
    g = torch.tensor([[9.0, 9.0, 5.0], [9.0, -7.0, 1.0]])
    # k = ceil(0.3 * 4) = 2 (FedDST's rounding would give 1): drop -0.1 and -0.3, grow the two
    # weights inactive before the drop (|g| 7 and 5).
    new, grown = update_mask({"w": w}, {"w": mask}, {"w": g}, 0.3)
    assert new["w"].tolist() == [[T, F_, T], [T, T, F_]] and sorted(grown["w"].tolist()) == [2, 4]
    new, grown = update_mask({"w": w}, {"w": mask}, {"w": g}, 0.05)  # ceil(0.2) = 1
    assert new["w"].tolist() == [[T, F_, F_], [T, T, T]] and grown["w"].tolist() == [4]


def test_neighbours_are_seeded_others() -> None:
    n = dispfl_neighbours(3, 7, 5, 100, 10)
    assert len(n) == 10 == len(set(n)) and 5 not in n and n == sorted(n)
    assert n == dispfl_neighbours(3, 7, 5, 100, 10) != dispfl_neighbours(3, 8, 5, 100, 10)
    assert dispfl_neighbours(0, 1, 2, 4, 10) == [0, 1, 3]  # at most all other clients


def test_initial_masks_differ_per_client_with_exact_erk_counts() -> None:
    model = _tiny_model()
    s = _alg(model)
    state = s.init()
    assert s.counts == erk_counts(s.setup.prunable_shapes, 0.5) == {"1.weight": 11,
                                                                    "3.weight": 10}
    masks = [s.client_mask(state, c) for c in range(4)]
    assert all({n: int(m[n].sum()) for n in m} == s.counts for m in masks)
    assert not torch.equal(masks[0]["1.weight"], masks[1]["1.weight"])
    # Derived from the seed alone: every party computes the same ones.
    assert all(torch.equal(m[n], _alg(model).initial_mask(c)[n])
               for c, m in enumerate(masks) for n in m)
    # A client that never trained holds the shared initial weights inside its own mask.
    p = s.published(state, 2)
    assert p.round == 0 and p.values.numel() == s.num_values == 11 + 10 + 6 + 3
    dense, mask = s.dense_model(p)
    for n, w in model.named_parameters():
        expected = w.detach() * mask[n] if n in mask else w.detach()
        assert torch.equal(dense[n], expected)
    assert all(torch.equal(s.eval_weights(state, 2)[n], dense[n]) for n in dense)


# ---------------------------------------------------------------------------- client and relay


def test_counts_stay_exact_and_regrown_weights_are_zero_over_rounds() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model, rounds=8)
    state, states = s.init(), {}
    params = dict(model.named_parameters())
    swapped = []
    for rnd in range(1, 8):
        cid = rnd % 4
        old = s.client_mask(state, cid)
        down = s.configure(state, rnd, [cid], 1)[cid]
        out = _step(s, model, data, cid, rnd, down, states.get(cid), seed=rnd)
        assert out.state == out.reply  # the client keeps exactly what it sent
        states[cid] = out.state
        parts = payload_parts(out.reply)
        new, _, values, _ = s.read_model(parts[0], parts[1], round=rnd)  # checks the counts
        ratio = drop_ratio(0.5, rnd, 8)
        grown = {n: new[n] & ~old[n] for n in s.setup.prunable}
        for n in s.setup.prunable:
            assert int(new[n].sum()) == s.counts[n] == int(old[n].sum())
            k = min(math.ceil(ratio * s.counts[n]), old[n].numel() - s.counts[n])
            assert int(grown[n].sum()) == k
            swapped.append(k)
            w = params[n].detach()
            assert bool((w[grown[n]] == 0).all())  # regrown at exactly zero
            assert bool((w[~new[n]] == 0).all())  # dropped weights left the model
        assert read_header(parts[1]).count == s.num_values
        state = _accept(s, state, rnd, [(cid, out.reply, len(data))], [cid])
        assert state.resend == frozenset()
        assert all(torch.equal(s.client_mask(state, cid)[n], new[n]) for n in s.setup.prunable)
        assert torch.equal(s.published(state, cid).values, values)
        stored, _ = s.dense_model(s.published(state, cid))
        for n in s.setup.prunable:  # the stored model has the regrown weights at zero too
            assert bool((stored[n][grown[n]] == 0).all())
        # The relay's copy is the client's own, byte for byte.
        assert s.payload_of(state.models[cid]) == out.state
    assert all(k > 0 for k in swapped)


def test_client_aggregates_the_stored_models_of_round_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model, num_clients=3, neighbors=2, anneal=0.0)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def fake_train(model, data, settings, lr, generator, mask=None):  # type: ignore
        cid = len(seen)
        seen[cid] = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():  # a recognisable "training": every active weight + 1
            for n, p in model.named_parameters():
                p.add_(mask[n].float() if n in mask else torch.ones_like(p))
        return TrainResult(num_samples=len(data), mean_loss=0.0, steps=1)

    monkeypatch.setattr(dispfl, "local_train", fake_train)
    state = s.init()
    start = {c: s.dense_model(s.published(state, c)) for c in range(3)}
    downs = s.configure(state, 1, [0, 1], 1)
    outs = {c: _step(s, model, data, c, 1, downs[c], None) for c in (0, 1)}
    # Client 1's download carries client 0's round-0 (initial) model, not its round-1 upload.
    parts = payload_parts(downs[1])
    assert len(parts) == 4 and [read_header(p).round for p in parts] == [0, 0, 0, 0]
    assert [read_header(p).kind for p in parts] == [PayloadKind.MASK, PayloadKind.VALUES] * 2
    for cid in (0, 1):
        expected = neighbour_average(start[cid][1], [start[c] for c in range(3)],
                                     s.setup.shapes)
        assert all(torch.equal(seen[cid][n], expected[n]) for n in s.setup.shapes)
    # After the round, both uploads are stored; client 2 never trained.
    state = _accept(s, state, 1, [(c, outs[c].reply, 12) for c in (0, 1)], [0, 1])
    assert s.published(state, 0).round == s.published(state, 1).round == 1
    assert s.published(state, 2).round == 0
    # Round 2's downloads carry the round-1 uploads.
    rounds = [read_header(p).round for p in payload_parts(s.configure(state, 2, [2], 1)[2])]
    assert rounds == [1, 1, 1, 1]
    # The checkpoint holds the published models only, and reads back to the same store.
    meta, tensors = s.state_dict(state)
    assert meta == {"rounds": {"0": 1, "1": 1}, "resend": []}
    assert sorted(tensors) == ["bits.0", "bits.1", "values.0", "values.1"]
    assert tensors["bits.0"].dtype == torch.uint8
    back = s.load_state(json.loads(json.dumps(meta)), tensors)
    assert back.models.keys() == state.models.keys() and back.resend == state.resend
    for c, m in state.models.items():
        assert back.models[c].bitmap == m.bitmap and back.models[c].round == m.round
        assert torch.equal(back.models[c].values, m.values)
    with pytest.raises(ValueError, match="incomplete"):
        s.load_state({"rounds": {"0": 1}, "resend": []}, tensors)
    elsewhere = {"bits.7": tensors["bits.0"], "values.7": tensors["values.0"]}
    with pytest.raises(ValueError, match="client 7 does not fit"):  # only 3 clients here
        s.load_state({"rounds": {"7": 1}, "resend": []}, elsewhere)
    with pytest.raises(ValueError, match="does not fit"):  # another density
        DisPFL(make_setup(s.setup.initial, s.setup.prunable, 0.3, 3, name="dispfl"),
               s.settings).load_state(meta, tensors)


def test_relay_bytes_are_neighbour_models_down_and_own_model_up() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model, num_clients=5, neighbors=3)
    state = s.init()
    bitmap, values = HEADER.size + math.ceil(42 / 8), HEADER.size + 4 * s.num_values
    down = s.configure(state, 1, [2], 1)[2]
    nbrs = s.neighbours(2, 1)
    assert len(nbrs) == 3 and 2 not in nbrs
    assert len(down) == 3 * (bitmap + values)
    assert [len(p) for p in payload_parts(down)] == [bitmap, values] * 3
    out = _step(s, model, data, 2, 1, down, None, seed=0)
    assert [len(p) for p in payload_parts(out.reply)] == [bitmap, values]
    # The loop counts exactly these bytes: each download once (all 5 clients are sampled,
    # every download holds 3 models), the upload once.
    r = loop_run(s, state, [[(2, out.reply, 12)]])
    row = play_round(r, 1)
    assert row["bytes_down"] == 5 * len(down)
    assert row["bytes_up"] == len(out.reply) == bitmap + values


# ---------------------------------------------------------------------------- validation


def test_malformed_uploads_are_rejected_not_crashing() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model, num_clients=8)
    state = s.init()
    good = _step(s, model, data, 0, 1, s.configure(state, 1, [0], 1)[0], None, seed=0).reply
    mask_part, values_part = payload_parts(good)
    nan = bytearray(good)
    nan[-4:] = struct.pack("<f", math.nan)
    flipped = bytearray(mask_part)
    flipped[HEADER.size] ^= 0x80  # one bit more or less, its digest unchanged
    # One weight more, in a consistent bitmap and digest (a copy: the codec caches masks).
    extra = {n: m.clone() for n, m in s.codec.decode(mask_part)[0].items()}
    extra["1.weight"].view(-1)[int((~extra["1.weight"]).view(-1).nonzero()[0])] = True
    float16 = encode_values(torch.ones(s.num_values), round=1,
                            digest=read_header(mask_part).digest, dtype="float16")
    replies = [
        (1, bytes(nan), 12),
        (2, good[: len(mask_part)], 12),  # the bitmap alone
        (3, b"garbage", 12),
        (4, mask_part + float16, 12),  # wrong dtype
        (5, bytes(flipped) + values_part, 12),
        (7, s.codec.encode(extra, 1) + values_part, 12),
        (6, good.replace(struct.pack("<I", 1), struct.pack("<I", 2), 1), 12),  # wrong round
        (0, good, 12),
        (0, good, 12),  # twice
    ]
    r = loop_run(s, state, [replies])
    row = play_round(r, 1)
    reasons = [(x["client"], x["reason"]) for x in row["rejected"]]
    assert [c for c, _ in reasons] == [1, 2, 3, 4, 5, 7, 6, 0]
    assert "NaN or infinite" in reasons[0][1] and "expected 2 payloads" in reasons[1][1]
    assert "shorter than the header" in reasons[2][1] and "float16" in reasons[3][1]
    assert "digest does not match its bitmap" in reasons[4][1]
    assert "mask has wrong layer counts {'1.weight': 12}" in reasons[5][1]
    assert "round 2, expected 1" in reasons[6][1]
    assert "a second reply from client 0" in reasons[7][1]
    assert row["bytes_up"] == sum(len(p) for _, p, _ in replies)  # every byte received
    assert "failed" not in row
    # The relay also refuses a model claimed for a client this federation does not have.
    _, refused = screen_replies(s, state, 1, [(9, good, 12)])
    assert [(x.client_id, x.reason) for x in refused] == [(9, "no client 9 in this federation")]
    before, state = state, r.state
    assert s.published(state, 0).round == 1 and s.published(state, 1).round == 0
    # Every sampled client whose upload was not stored is owed its stored model.
    assert state.resend == {1, 2, 3, 4, 5, 6, 7}
    # A round without a valid reply fails and leaves the relay's store as it was.
    r2 = loop_run(s, before, [[(1, bytes(nan), 12)]], "federation.max_round_attempts=1")
    with pytest.raises(RoundFailed, match="client 1: payload has 1 NaN"):
        play_round(r2, 1)
    assert r2.state is before and before.models == {} and before.resend == frozenset()
    # A client given a malformed neighbour model fails (the transport reports it as dropped).
    down = bytearray(s.configure(state, 2, [3], 1)[3])
    down[-4:] = struct.pack("<f", math.inf)
    with pytest.raises(PayloadError, match="NaN or infinite"):
        _step(s, model, data, 3, 2, bytes(down), None)
    one = b"".join(payload_parts(s.configure(state, 2, [0], 1)[0])[:2])  # 0 is owed nothing
    with pytest.raises(PayloadError, match=r"expected 4 payloads \(2 neighbours\), got 2"):
        _step(s, model, data, 0, 2, one, None)


def test_after_a_lost_or_rejected_reply_the_client_restarts_from_the_relays_copy() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model, num_clients=4, neighbors=2)
    state, states = s.init(), {}
    # Round 1: client 0 trains; its upload is stored.
    out = _step(s, model, data, 0, 1, s.configure(state, 1, [0], 1)[0], None)
    states[0] = out.state
    state = _accept(s, state, 1, [(0, out.reply, 12)], [0])
    accepted = states[0]
    # Round 2, through the run loop (every client sampled): 0, 1 and 2 train; 0's reply is
    # lost, 1's is corrupted on the way and rejected, 2's is stored; 3 drops out. 0 and 1
    # moved on; the relay kept their previous models (1: its initial one).
    downs = s.configure(state, 2, [0, 1, 2, 3], 1)
    for c in (0, 1, 2):
        states[c] = _step(s, model, data, c, 2, downs[c], states.get(c)).state
    corrupted = bytearray(states[1])
    corrupted[-4:] = struct.pack("<f", math.nan)
    r = loop_run(s, state, [[(0, None, 12), (1, bytes(corrupted), 12), (2, states[2], 12)]])
    row = play_round(r, 2)
    assert [x["client"] for x in row["rejected"]] == [1]
    assert [x["client"] for x in row["failed"]] == [0, 3]
    state = r.state
    assert state.resend == {0, 1, 3}
    assert s.published(state, 0).round == 1 and s.published(state, 1).round == 0
    assert s.payload_of(state.models[2]) == states[2]
    # Round 3: the relay sends each its stored model first (0: round 1's; 1: its initial one).
    downs = s.configure(state, 3, [0, 1, 2], 1)
    for c, copy in ((0, accepted), (1, s.payload_of(s.published(state, 1)))):
        parts = payload_parts(downs[c])
        assert len(parts) == 2 * (len(s.neighbours(c, 3)) + 1)
        assert b"".join(parts[:2]) == copy
        # The client's round-3 result is that of a client that held the relay's copy (and
        # not that of one that went on from its unstored round-2 model).
        a = _step(s, model, data, c, 3, downs[c], states[c])
        b = _step(s, model, data, c, 3, b"".join(parts[2:]), copy)
        assert a.reply == b.reply and a.state == b.state
        assert a.reply != _step(s, model, data, c, 3, b"".join(parts[2:]), states[c]).reply
    assert len(payload_parts(downs[2])) == 2 * len(s.neighbours(2, 3))  # 2 is owed nothing
    replies = [(c, _step(s, model, data, c, 3, downs[c], states[c]).reply, 12) for c in (0, 1)]
    state = _accept(s, state, 3, replies, [0, 1])
    assert state.resend == {3}
    # Owed resends survive a checkpoint.
    meta, tensors = s.state_dict(state)
    assert meta["resend"] == [3] and s.load_state(meta, tensors).resend == {3}


def test_a_retry_redoes_the_round_from_the_same_model() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model, num_clients=4, neighbors=2)
    state, states = s.init(), {}
    for rnd in (1, 2):
        downs = s.configure(state, rnd, [0, 1], 1)
        outs = {c: _step(s, model, data, c, rnd, downs[c], states.get(c)) for c in (0, 1)}
        states.update({c: o.state for c, o in outs.items()})
        if rnd == 2:  # too few valid replies: the loop retries without aggregating
            retry = s.configure(state, rnd, [0, 1], 2)
            for c in (0, 1):  # a retry sends every client its stored model first
                parts = payload_parts(retry[c])
                assert len(parts) == 2 * (len(s.neighbours(c, rnd)) + 1)
                assert b"".join(parts[2:]) == downs[c]
            again = {c: _step(s, model, data, c, rnd, retry[c], states[c]) for c in (0, 1)}
            assert all(again[c].reply == outs[c].reply for c in (0, 1))
        state = _accept(s, state, rnd, [(c, outs[c].reply, 12) for c in (0, 1)], [0, 1])


class _Ask:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, dict[int, bytes], str]] = []

    def deliver(self, kind: str, payloads: dict[int, bytes], *, label: str) -> None:
        self.delivered.append((kind, dict(payloads), label))


def test_resync_delivers_each_published_client_its_stored_model() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _alg(model)
    state = s.init()
    ask = _Ask()
    assert s.resync(state, ask) == state and ask.delivered == []  # nobody published yet
    out = _step(s, model, data, 1, 1, s.configure(state, 1, [1], 1)[1], None)
    state = _accept(s, state, 1, [(1, out.reply, 12)], [1, 2])
    assert state.resend == {2}
    state = s.resync(state, ask)
    # Every client now holds the relay's copy (2: its initial model), so nobody is owed one.
    assert state.resend == frozenset()
    (kind, payloads, label), = ask.delivered
    assert kind == "own_model" and label == "resync_own_model" and payloads == {1: out.state}
    ctx = make_ctx(s.setup, model, data, 1, 0, 0.0, torch.Generator(), SETTINGS)
    got = s.handle("own_model", ctx, payloads[1], None)
    assert got.reply == b"" and got.state == out.state
    with pytest.raises(PayloadError):
        s.handle("own_model", ctx, b"junk" * 10, None)
    with pytest.raises(PayloadError, match="no set-up message 'score'"):
        s.handle("score", ctx, b"", None)


# ---------------------------------------------------------------------------- config


def test_config_keys_and_refusals() -> None:
    config = load_config(None, ["algorithm.name=dispfl"])
    assert config.algorithm.options["dispfl"] == {"neighbors": 10, "anneal": 0.5}
    config = load_config(None, ["algorithm.name=dispfl", "algorithm.dispfl.neighbors=3",
                                "algorithm.dispfl.anneal=0.25"])
    assert algorithms.settings_of(config) == DisPFLSettings(neighbors=3, anneal=0.25)
    for bad, message in [
        ("algorithm.dispfl.neighbors=0", "algorithm.dispfl: neighbors must be at least 1"),
        ("algorithm.dispfl.neighbors=2.5", "algorithm.dispfl.neighbors must be an integer"),
        ("algorithm.dispfl.anneal=1.5", "algorithm.dispfl: anneal must be in"),
        ("algorithm.dispfl.anneal=nan", "algorithm.dispfl: anneal must be in"),
        ("algorithm.dispfl.prune_fraction=0.3", "unknown config key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["algorithm.name=dispfl", bad])
    # Robust aggregation applies to the neighbour averages (test_robust.py checks the rules).
    load_config(None, ["algorithm.name=dispfl", "federation.update_clip_norm=1.0",
                       "federation.aggregator=median"])
    with pytest.raises(ConfigError, match="num_clients >= 2"):
        load_config(None, ["algorithm.name=dispfl", "federation.num_clients=1",
                           "federation.clients_per_round=1"])


# ---------------------------------------------------------------------------- whole runs

COMMON = ["run.rounds=4", "run.progress=false", "federation.num_clients=5",
          "federation.clients_per_round=2", "train.local_epochs=1", "model.width=0.5",
          "algorithm.name=dispfl", "algorithm.density=0.2", "algorithm.dispfl.neighbors=2",
          "data.dataset=digits", "run.threads=1"]
# Crashes (seeded), so that rounds are retried after some clients already trained, and some
# clients are owed a resend when they are next sampled (checked below, not assumed).
FAILING = [*COMMON, "run.rounds=5", "federation.clients_per_round=3",
           "federation.min_replies=2", "federation.failure_rate=0.3",
           "federation.max_round_attempts=10"]


def _model_bytes(s: DisPFL) -> int:
    """One published model on the wire (float32): its bitmap and its values."""
    return HEADER.size + math.ceil(s.setup.prunable_count / 8) + HEADER.size + 4 * s.num_values


@pytest.mark.slow
def test_run_is_deterministic_with_exact_bytes_and_personal_accuracy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture(monkeypatch, DisPFL)
    config = load_config(None, COMMON)
    result = run_experiment(config, write=False)
    s, state = seen["alg"], seen["states"][-1]
    again = run_experiment(load_config(None, COMMON), write=False)
    assert timeless(result.metrics) == timeless(again.metrics)
    assert torch.equal(result.final_values, again.final_values)
    for row in result.metrics:
        assert row["bytes_down"] == 2 * 2 * _model_bytes(s)  # 2 clients x 2 neighbours
        assert row["bytes_up"] == 2 * _model_bytes(s)
        assert "rejected" not in row and "failed" not in row
    assert result.summary["one_time_bytes"] == {}
    # Each client trains in exactly the target density; the global mask is only their union.
    total = s.setup.prunable_count
    assert result.summary["density"] == round(0.2 * total) / total
    assert result.summary["num_values"] == s.num_values
    assert all(torch.equal(result.mask[n], s.global_mask(state)[n]) for n in result.mask)
    # Every client's model keeps the exact ERK layer counts.
    assert all({n: int(m.sum()) for n, m in s.client_mask(state, c).items()} == s.counts
               for c in range(5))
    assert torch.equal(result.final_values, s.final_values(state))

    # personal_accuracy is each client's own model on its own test split, recomputed here.
    exp = prepare(config)
    test = exp.test_set
    counts = class_counts(exp.train_set.labels.numpy(), exp.parts, exp.train_set.num_classes)
    splits = [torch.from_numpy(i) for i in matching_test_splits(
        test.labels.numpy(), counts, per_client=max(1, len(test) // 5), seed=0)]
    model = exp.model
    own = []
    for c, idx in enumerate(splits):
        load_weights_(model, s.eval_weights(state, c))
        correct, _ = evaluate_samples(model, test.images[idx], test.labels[idx], test.mean,
                                      test.std)
        own.append(int(correct.sum()) / idx.numel())
    last = result.metrics[-1]
    assert last["personal_accuracy"] == sum(own) / 5
    # ... and accuracy is the consensus model's on the whole test set, which on the same
    # splits scores differently from the clients' own models.
    load_weights_(model, s.eval_weights(state))
    correct, _ = evaluate_samples(model, test.images, test.labels, test.mean, test.std)
    assert last["accuracy"] == int(correct.sum()) / correct.numel()
    consensus = sum(int(correct[idx].sum()) / idx.numel() for idx in splits) / 5
    assert last["personal_accuracy"] != consensus


@pytest.mark.slow
def test_failures_and_retries_start_every_client_from_the_relays_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture(monkeypatch, DisPFL)
    uploads: dict[tuple[int, int], list[bytes]] = {}
    step = DisPFL.client_step

    def recording_step(self, ctx, received, state):  # type: ignore[no-untyped-def]
        out = step(self, ctx, received, state)
        uploads.setdefault((ctx.round, ctx.client_id), []).append(out.reply)
        return out

    monkeypatch.setattr(DisPFL, "client_step", recording_step)
    config = load_config(None, FAILING)
    exp = prepare(config)
    transport = InProcessTransport(exp)
    held: list[dict[int, bytes]] = []
    result = run(exp, transport, write=False,
                 on_round=lambda row: held.append(dict(transport.states)))
    s = seen["alg"]
    size = _model_bytes(s)
    # The scenario happened: retries after some clients had trained, and resends owed.
    assert any(len(u) > 1 for u in uploads.values())
    assert any(c in state.resend for _, clients, attempt, state in seen["configured"]
               if attempt == 1 for c in clients)
    # A client that trained in an attempt that was retried, or whose reply was lost, redoes
    # the round from the relay's copy: every attempt of a round uploads the same model.
    assert all(len(set(u)) == 1 for u in uploads.values())
    # Downloads: neighbours' models, plus the client's own in a retry or where it is owed one;
    # every attempt's payloads are counted, crashed clients' included.
    expected: dict[int, int] = {}
    for rnd, clients, attempt, state in seen["configured"]:
        owed = sum(attempt > 1 or c in state.resend for c in clients)
        expected[rnd] = expected.get(rnd, 0) + (2 * len(clients) + owed) * size
    assert [row["bytes_down"] for row in result.metrics] == [expected[r] for r in range(1, 6)]
    # After every round, a client the relay owes nothing holds exactly the relay's copy.
    for state, clients in zip(seen["states"], held):
        for c in set(range(5)) - state.resend:
            assert clients.get(c) == (s.payload_of(state.models[c]) if c in state.models
                                      else None)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_resume_from_a_checkpoint_is_bit_identical_even_where_clients_lose_state(
        tmp_path: Path, dtype: str) -> None:
    overrides = [*COMMON, "run.rounds=5", "run.checkpoint_every=1", "run.eval_every=2",
                 f"comm.value_dtype={dtype}"]
    config = load_config(None, overrides)
    reference = run_experiment(config, tmp_path / "ref")
    _, ref_tensors = load_checkpoint(reference.run_dir / "checkpoint.pt")
    trained = {c for row in reference.metrics[:3] for c in row["clients"]}

    # The simulator saves the clients' own models with the checkpoint; a transport whose
    # clients lose theirs (a new Flower run) gets them back from the relay (re-sync).
    for name in ("sim", "forgetful"):
        folder = tmp_path / name
        with pytest.raises(Stop):
            run_on(name, config, folder, on_round=stop_after(3))
        meta, tensors = load_checkpoint(folder / "checkpoint.pt")
        assert meta["round"] == 3
        assert set(meta["algorithm"]["rounds"]) == {str(c) for c in trained}
        assert meta["clients"] == (sorted(str(c) for c in trained) if name == "sim" else [])
        published = [tensors[f"algorithm.values.{c}"].numel() for c in trained]
        resumed = run_on(name, config, folder, resume=True)
        assert folder_rows(folder) == folder_rows(reference.run_dir)
        _, tensors = load_checkpoint(folder / "checkpoint.pt")
        # The relay's store (and, in the simulator, every client's own model) as in the
        # uninterrupted run; a forgetful transport saves no client states.
        expected = {k: t for k, t in ref_tensors.items()
                    if name == "sim" or k.startswith("algorithm.")}
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in tensors)
        assert torch.equal(resumed.final_values, reference.final_values)
        summary = json.loads((folder / "summary.json").read_text())
        for key in ("final_accuracy", "final_personal_accuracy", "total_bytes"):
            assert summary[key] == reference.summary[key]
        if name == "sim":
            assert "resync_bytes" not in summary
        else:  # every client that had published got its stored model once, nothing came back
            itemsize = 2 if dtype == "float16" else 4
            bitmap = HEADER.size + math.ceil(sum(m.numel() for m in reference.mask.values()) / 8)
            assert summary["resync_bytes"] == sum(bitmap + HEADER.size + itemsize * n
                                                  for n in published)


@pytest.mark.slow
def test_resume_where_clients_lose_state_with_resends_owed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture(monkeypatch, DisPFL)
    config = load_config(None, [*FAILING, "run.checkpoint_every=1"])
    reference = run_experiment(config, tmp_path / "ref")
    ref_configured = [c for c in seen["configured"] if c[0] > 3]
    owed_at_cut = seen["states"][2].resend
    assert owed_at_cut  # the scenario: some client is owed its model at the checkpoint
    seen["configured"].clear()
    exp = prepare(config)
    with pytest.raises(Stop):
        run(exp, Forgetful(exp), tmp_path / "cut", on_round=stop_after(3))
    seen["configured"].clear()
    exp = prepare(config)
    resumed = run(exp, Forgetful(exp), tmp_path / "cut", resume=True)
    # The re-sync gave every client the relay's copy: nobody is owed one after it ...
    assert seen["configured"][0][0] == 4 and seen["configured"][0][3].resend == frozenset()
    # ... so the models, losses and accuracies are those of the uninterrupted run, and only
    # the resends the reference still paid for are missing from the downloads.
    assert torch.equal(resumed.final_values, reference.final_values)
    size = _model_bytes(seen["alg"])

    def owed(configured) -> int:  # type: ignore[no-untyped-def]
        return sum(c in state.resend for _, clients, attempt, state in configured
                   if attempt == 1 for c in clients)

    saved = (owed(ref_configured) - owed(seen["configured"])) * size
    assert saved > 0
    ref_rows, rows = folder_rows(tmp_path / "ref"), folder_rows(tmp_path / "cut")
    assert sum(r["bytes_down"] for r in ref_rows) - sum(r["bytes_down"] for r in rows) == saved
    ignore = ("bytes_down", "bytes_cumulative")
    assert [{k: v for k, v in r.items() if k not in ignore} for r in rows] \
        == [{k: v for k, v in r.items() if k not in ignore} for r in ref_rows]
    assert resumed.summary["final_personal_accuracy"] == reference.summary[
        "final_personal_accuracy"]
