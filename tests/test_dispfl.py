"""DisPFL: its rules on hand-sized tensors, exact layer counts, honest relay bytes, personal
evaluation, validation and bit-identical resume."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from ssfl import algorithms, dispfl
from ssfl.checkpoint import load_checkpoint
from ssfl.client import LocalData, TrainResult, TrainSettings, evaluate_samples
from ssfl.comm import HEADER, PayloadKind, encode_values, read_header
from ssfl.config import ConfigError, load_config
from ssfl.data.partition import class_counts, matching_test_splits
from ssfl.dispfl import (
    DisPFLStrategy,
    dispfl_neighbours,
    drop_ratio,
    neighbour_average,
    update_mask,
)
from ssfl.dynamic import erk_counts
from ssfl.engine import prepare
from ssfl.server import RoundFailed
from ssfl.sim import run_experiment
from ssfl.strategies import payload_parts

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


def _strategy(model: nn.Module, num_clients: int = 4, neighbors: int = 2, **kw) -> DisPFLStrategy:
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    return DisPFLStrategy(initial, ["1.weight", "3.weight"], 0.5, num_clients, seed=0,
                          rounds=kw.pop("rounds", 10), neighbors=neighbors, **kw)


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
    s = _strategy(_tiny_model())
    assert s.counts == erk_counts(s.prunable_shapes, 0.5) == {"1.weight": 11, "3.weight": 10}
    masks = [s.client_mask(c) for c in range(4)]
    assert all({n: int(m[n].sum()) for n in m} == s.counts for m in masks)
    assert not torch.equal(masks[0]["1.weight"], masks[1]["1.weight"])
    _, _, values, rnd = s.client_model(2)  # the shared initial weights inside its own mask
    assert rnd == 0 and values.numel() == s.num_values == 11 + 10 + 6 + 3


# ---------------------------------------------------------------------------- client and relay


def _lazy_round(s: DisPFLStrategy, model, data, round: int, clients):
    """Replies as the engine produces them: each client's download is made after the previous
    client's reply has been handed to ``aggregate``."""
    downloads = {}
    for cid in clients:
        downloads[cid] = s.payload_for(cid, round)
        reply, _ = s.client_update(model, downloads[cid], data, SETTINGS, client_id=cid,
                                   round=round, lr=0.1,
                                   generator=torch.Generator().manual_seed(round * 10 + cid))
        yield cid, reply, len(data)
    _lazy_round.downloads = downloads  # type: ignore[attr-defined]


def test_counts_stay_exact_and_regrown_weights_are_zero_over_rounds() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _strategy(model, rounds=8)
    params = dict(model.named_parameters())
    swapped = []
    for rnd in range(1, 8):
        cid = rnd % 4
        old = s.client_mask(cid)
        reply, _ = s.client_update(model, s.payload_for(cid, rnd), data, SETTINGS,
                                   client_id=cid, round=rnd, lr=0.1,
                                   generator=torch.Generator().manual_seed(rnd))
        parts = payload_parts(reply)
        new, _, values, _ = s.read_model(parts[0], parts[1], round=rnd)  # checks the counts
        ratio = drop_ratio(0.5, rnd, 8)
        for n in s.prunable:
            assert int(new[n].sum()) == s.counts[n] == int(old[n].sum())
            grown = new[n] & ~old[n]
            k = min(math.ceil(ratio * s.counts[n]), old[n].numel() - s.counts[n])
            assert int(grown.sum()) == k
            swapped.append(k)
            w = params[n].detach()
            assert bool((w[grown] == 0).all())  # regrown at exactly zero
            assert bool((w[~new[n]] == 0).all())  # dropped weights left the model
        assert read_header(parts[1]).count == s.num_values
        s.aggregate(rnd, [(cid, reply, len(data))])
        assert all(torch.equal(s.client_mask(cid)[n], new[n]) for n in s.prunable)
        _, layout, stored, _ = s.client_model(cid)
        assert torch.equal(stored, values)
        for n in s.prunable:  # the stored model has the regrown weights at zero too
            assert bool((layout.dense_tensors(stored)[n][new[n] & ~old[n]] == 0).all())
    assert all(k > 0 for k in swapped)


def test_client_aggregates_the_stored_models_of_round_start(monkeypatch) -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _strategy(model, num_clients=3, neighbors=2, anneal=0.0)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def fake_train(model, data, settings, lr, generator, mask=None):
        cid = len(seen)
        seen[cid] = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():  # a recognisable "training": every active weight + 1
            for n, p in model.named_parameters():
                p.add_(mask[n].float() if n in mask else torch.ones_like(p))
        return TrainResult(num_samples=len(data), mean_loss=0.0, steps=1)

    monkeypatch.setattr(dispfl, "local_train", fake_train)
    start = {c: s.client_model(c) for c in range(3)}
    s.aggregate(1, _lazy_round(s, model, data, 1, [0, 1]))
    downloads = _lazy_round.downloads  # type: ignore[attr-defined]
    # Client 1's download carries client 0's round-0 (initial) model, not its round-1 upload.
    parts = payload_parts(downloads[1])
    assert len(parts) == 4 and [read_header(p).round for p in parts] == [0, 0, 0, 0]
    assert [read_header(p).kind for p in parts] == [PayloadKind.MASK, PayloadKind.VALUES] * 2
    for cid in (0, 1):
        models = [(start[c][1].dense_tensors(start[c][2]), start[c][0]) for c in range(3)]
        expected = neighbour_average(start[cid][0], models, s.shapes)
        assert all(torch.equal(seen[cid][n], expected[n]) for n in s.shapes)
    # After the round, both uploads are stored; client 2 never trained.
    assert s.client_model(0)[3] == s.client_model(1)[3] == 1 and s.client_model(2)[3] == 0
    meta, tensors = s.state_dict()
    assert meta == {"rounds": {"0": 1, "1": 1}}
    assert sorted(tensors) == ["bits.0", "bits.1", "values.0", "values.1"]
    assert tensors["bits.0"].dtype == torch.uint8


def test_relay_bytes_are_neighbour_models_down_and_own_model_up() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _strategy(model, num_clients=5, neighbors=3)
    bitmap, values = HEADER.size + math.ceil(42 / 8), HEADER.size + 4 * s.num_values
    down = s.payload_for(2, 1)
    nbrs = s.neighbours(2, 1)
    assert len(nbrs) == 3 and 2 not in nbrs
    assert len(down) == 3 * (bitmap + values)
    assert [len(p) for p in payload_parts(down)] == [bitmap, values] * 3
    reply, _ = s.client_update(model, down, data, SETTINGS, client_id=2, round=1, lr=0.1,
                               generator=torch.Generator().manual_seed(0))
    assert [len(p) for p in payload_parts(reply)] == [bitmap, values]
    assert s.aggregate(1, [(2, reply, 12)]).bytes_up == len(reply) == bitmap + values


# ---------------------------------------------------------------------------- validation


def test_malformed_uploads_are_rejected_not_crashing() -> None:
    model, data = _tiny_model(), _tiny_data()
    s = _strategy(model)
    good, _ = s.client_update(model, s.payload_for(0, 1), data, SETTINGS, client_id=0, round=1,
                              lr=0.1, generator=torch.Generator().manual_seed(0))
    mask_part, values_part = payload_parts(good)
    nan = bytearray(good)
    nan[-4:] = struct.pack("<f", math.nan)
    bad_count = bytearray(mask_part)
    bad_count[HEADER.size] ^= 0x80  # one bit more or less: wrong layer count, wrong digest
    replies = [
        (1, bytes(nan), 12),
        (2, good[: len(mask_part)], 12),  # the bitmap alone
        (3, b"garbage", 12),
        (0, mask_part + encode_values(torch.ones(s.num_values), round=1,
                                      digest=read_header(mask_part).digest,
                                      dtype="float16"), 12),  # wrong dtype
        (0, bytes(bad_count) + values_part, 12),
        (0, good.replace(struct.pack("<I", 1), struct.pack("<I", 2), 1), 12),  # wrong round
        (0, good, 12),
        (0, good, 12),  # twice
        (9, good, 12),  # not a client of this federation
    ]
    update = s.aggregate(1, replies)
    assert update.num_clients == 1
    reasons = [(r.client_id, r.reason) for r in update.rejected]
    assert [c for c, _ in reasons] == [1, 2, 3, 0, 0, 0, 0, 9]
    assert "NaN or infinite" in reasons[0][1] and "expected 2 payloads" in reasons[1][1]
    assert "float16" in reasons[3][1] and "round 2, expected 1" in reasons[5][1]
    assert "second update" in reasons[6][1]
    assert s.client_model(0)[3] == 1 and s.client_model(1)[3] == 0
    before = s.state_dict()
    with pytest.raises(RoundFailed):
        s.aggregate(2, [(1, bytes(nan), 12)])
    assert s.state_dict()[0] == before[0]
    # A client given a malformed neighbour model fails (the transport reports it dropped).
    down = bytearray(s.payload_for(3, 2))
    down[-4:] = struct.pack("<f", math.inf)
    with pytest.raises(ValueError, match="NaN or infinite"):
        s.client_update(model, bytes(down), data, SETTINGS, client_id=3, round=2, lr=0.1,
                        generator=torch.Generator().manual_seed(0))


def test_config_keys_and_refusals() -> None:
    assert load_config(None, ["algorithm.name=dispfl"]).algorithm.neighbors == 10
    assert load_config(None, ["algorithm.name=dispfl"]).algorithm.dispfl_anneal == 0.5
    for bad, message in [
        ("algorithm.neighbors=0", "algorithm.neighbors must be at least 1"),
        ("algorithm.dispfl_anneal=1.5", "dispfl_anneal must be in"),
        ("federation.update_clip_norm=1.0", "update_clip_norm applies to the global-mask"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["algorithm.name=dispfl", bad])
    with pytest.raises(ConfigError, match="num_clients >= 2"):
        load_config(None, ["algorithm.name=dispfl", "federation.num_clients=1",
                           "federation.clients_per_round=1"])


# ---------------------------------------------------------------------------- end to end

COMMON = ["run.rounds=4", "run.progress=false", "federation.num_clients=5",
          "federation.clients_per_round=2", "train.local_epochs=1", "model.width=0.5",
          "algorithm.name=dispfl", "algorithm.density=0.2", "algorithm.neighbors=2"]


def _captured_run(monkeypatch, overrides, **kw):
    seen = {}
    build = algorithms.TRAINING_STRATEGIES["dispfl"]

    def wrapped(ctx):
        seen["strategy"] = build(ctx)
        return seen["strategy"]

    monkeypatch.setitem(algorithms.TRAINING_STRATEGIES, "dispfl", wrapped)
    config = load_config(None, overrides)
    return config, run_experiment(config, **kw), seen["strategy"]


def _rows(metrics):
    return [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics]


def test_run_is_deterministic_with_exact_bytes_and_personal_accuracy(monkeypatch) -> None:
    config, result, s = _captured_run(monkeypatch, COMMON, write=False)
    _, again, _ = _captured_run(monkeypatch, COMMON, write=False)
    assert _rows(result.metrics) == _rows(again.metrics)
    assert torch.equal(result.final_values, again.final_values)
    bitmap = HEADER.size + math.ceil(s.prunable_count / 8)
    values = HEADER.size + 4 * s.num_values
    for row in result.metrics:
        assert row["bytes_down"] == 2 * 2 * (bitmap + values)  # 2 clients x 2 neighbours
        assert row["bytes_up"] == 2 * (bitmap + values)
    assert result.summary["one_time_bytes"] == {}
    # Each client trains in exactly the target density; the global mask is only their union.
    assert result.summary["density"] == round(0.2 * s.prunable_count) / s.prunable_count
    assert result.summary["num_values"] == s.num_values
    # Every client's model keeps the exact ERK layer counts.
    assert all({n: int(m.sum()) for n, m in s.client_mask(c).items()} == s.counts
               for c in range(5))

    # personal_accuracy is each client's own model on its own test split, recomputed here.
    exp = prepare(config)
    test = exp.test_set
    counts = class_counts(exp.train_set.labels.numpy(), exp.parts, exp.train_set.num_classes)
    splits = [torch.from_numpy(i) for i in matching_test_splits(
        test.labels.numpy(), counts, per_client=max(1, len(test) // 5), seed=0)]
    model = exp.model
    own = []
    for c, idx in enumerate(splits):
        s.load_personal_(model, c)
        correct, _ = evaluate_samples(model, test.images[idx], test.labels[idx], test.mean,
                                      test.std)
        own.append(int(correct.sum()) / idx.numel())
    last = result.metrics[-1]
    assert last["personal_accuracy"] == sum(own) / 5
    # ... not the consensus model's accuracy on the same splits.
    s.load_global_(model)
    correct, _ = evaluate_samples(model, test.images, test.labels, test.mean, test.std)
    assert last["accuracy"] == int(correct.sum()) / correct.numel()
    consensus = sum(int(correct[idx].sum()) / idx.numel() for idx in splits) / 5
    assert last["personal_accuracy"] != consensus


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path, monkeypatch) -> None:
    overrides = [*COMMON, "run.rounds=6", "run.checkpoint_every=1", "run.eval_every=2"]
    config = load_config(None, overrides)
    reference = run_experiment(config, tmp_path / "ref")

    class Stop(Exception):
        pass

    def stop_after_3(row):
        if row["round"] == 3:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(config, tmp_path / "cut", on_round=stop_after_3)
    meta, tensors = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert meta["round"] == 3
    trained = {c for row in reference.metrics[:3] for c in row["clients"]}
    assert set(meta["strategy"]["rounds"]) == {str(c) for c in trained}
    run_experiment(config, tmp_path / "cut", resume=True)

    def rows(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return _rows([json.loads(line) for line in lines])

    assert rows(tmp_path / "cut") == rows(tmp_path / "ref")
    meta, tensors = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    _, ref_tensors = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["final_accuracy"] == reference.summary["final_accuracy"]
    assert summary["final_personal_accuracy"] == reference.summary["final_personal_accuracy"]
