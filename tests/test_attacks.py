"""Simulated hostile clients (``ssfl.attacks``) and the robust score rules of the mask round."""

from __future__ import annotations

import json

import pytest
import torch

from ssfl.algorithms.base import SetupFailed
from ssfl.algorithms.robust import combine_scores
from ssfl.attacks import FLOAT32_MAX, INFLATED_SAMPLES, Attacker
from ssfl.comm import PayloadKind, decode_values, encode_values, read_header
from ssfl.config import ConfigError, load_config

DIGEST = bytes(range(8))
RECEIVED = encode_values(torch.tensor([1.0, 2.0]), round=3, digest=DIGEST)
HONEST = encode_values(torch.tensor([2.0, 4.0]), round=3, digest=DIGEST)


def tampered(kind: str, reply: bytes = HONEST, **kwargs: object) -> tuple[list[float], int]:
    attacker = Attacker(kind, 1, **kwargs)  # type: ignore[arg-type]
    out, samples = attacker.tamper("train", RECEIVED, reply, 7)
    header = read_header(out)
    assert (header.round, header.digest) == (3, DIGEST)  # the attacker speaks the protocol
    return decode_values(out).tolist(), samples


def test_each_attack_on_a_hand_made_update() -> None:
    # global [1, 2], honest values [2, 4]: the honest change is [1, 2]
    huge = float(torch.tensor(1e30, dtype=torch.float32))
    assert tampered("huge") == ([huge, huge], 7)
    assert tampered("boost") == ([21.0, 42.0], 7)  # global + 20 x change
    assert tampered("boost", boost=3.0) == ([4.0, 8.0], 7)
    assert tampered("sign_flip") == ([0.0, 0.0], 7)  # global - change
    assert tampered("zeros") == ([0.0, 0.0], 7)
    assert tampered("inflate_samples") == ([2.0, 4.0], INFLATED_SAMPLES)
    assert tampered("poison_scores") == ([2.0, 4.0], 7)  # training replies stay honest


def test_replay_resends_the_first_update_under_each_new_header() -> None:
    attacker = Attacker("replay", 1)
    first, _ = attacker.tamper("train", RECEIVED, HONEST, 7)
    later = encode_values(torch.tensor([9.0, 9.0]), round=8, digest=DIGEST)
    out, _ = attacker.tamper("train", RECEIVED, later, 7)
    assert decode_values(first).tolist() == [2.0, 4.0]
    assert decode_values(out).tolist() == [2.0, 4.0] and read_header(out).round == 8


def test_poisoned_scores_max_out_every_layer_but_the_last() -> None:
    attacker = Attacker("poison_scores", 1, layer_sizes=(3, 2))
    scores = encode_values(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), kind=PayloadKind.SCORES)
    out, samples = attacker.tamper("scores", b"", scores, 7)
    assert decode_values(out, expected_kind=PayloadKind.SCORES).tolist() == \
        [FLOAT32_MAX] * 3 + [0.0, 0.0]
    # Other attacks leave the scores alone; so does every attack an empty (failed) reply.
    assert Attacker("huge", 1).tamper("scores", b"", scores, 7)[0] == scores
    assert Attacker("huge", 1).tamper("train", RECEIVED, b"", 7) == (b"", 7)


def test_the_first_clients_asked_are_the_hostile_ones() -> None:
    assert Attacker("zeros", 2).hostile([4, 9, 11, 30]) == {4, 9}


POISON = [torch.tensor([9.0, 9.0, 9.0, 0.0])]  # one hostile client's scores
HONEST_SCORES = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3.0, 2.0, 1.0, 4.0]),
                 torch.tensor([2.0, 2.0, 2.0, 2.0])]


def scores_by(rule: str, rows: list[torch.Tensor]) -> list[float]:
    return combine_scores(((r, 1.0) for r in rows), 4, rule=rule, trim_fraction=0.25).tolist()


def test_score_rules_by_hand() -> None:
    rows = HONEST_SCORES + POISON
    assert scores_by("mean", rows) == [3.75, 3.75, 3.75, 2.5]
    # normalised: sums 10, 10, 8, 27 -> the hostile client has one quarter of the say
    expected = [(0.1 + 0.3 + 0.25 + 1 / 3) / 4, (0.2 + 0.2 + 0.25 + 1 / 3) / 4,
                (0.3 + 0.1 + 0.25 + 1 / 3) / 4, (0.4 + 0.4 + 0.25) / 4]
    assert scores_by("normalised", rows) == pytest.approx(expected)
    # per weight, sorted: [1,2,3,9] [2,2,2,9] [1,2,3,9] [0,2,4,4] -> drop one from each end
    assert scores_by("trimmed_mean", rows) == [2.5, 2.0, 2.5, 3.0]
    assert scores_by("median", rows) == [2.5, 2.0, 2.5, 3.0]
    assert scores_by("median", HONEST_SCORES) == [2.0, 2.0, 2.0, 4.0]
    with pytest.raises(SetupFailed, match="no client"):
        scores_by("median", [])


def test_clipped_scores_by_hand() -> None:
    rows = HONEST_SCORES + POISON
    totals = [float(r.sum()) for r in rows]  # 10, 10, 8, 27: median 10, bound 20
    clipped = combine_scores(((r, 1.0) for r in rows), 4, rule="clipped", totals=totals)
    poison = POISON[0] * (20 / 27)  # the hostile client's say scaled down to twice the median
    assert clipped.tolist() == pytest.approx(((sum(HONEST_SCORES) + poison) / 4).tolist())
    # No client over the bound: the paper's mean, bit for bit (weighted as it is).
    honest = [(r, w) for r, w in zip(HONEST_SCORES, (1.0, 2.0, 5.0))]
    assert torch.equal(
        combine_scores(iter(honest), 4, rule="clipped", totals=[10.0, 10.0, 8.0]),
        combine_scores(iter(honest), 4, rule="mean"))


def test_a_client_with_all_zero_scores_counts_but_adds_nothing_when_normalised() -> None:
    rows = [torch.tensor([1.0, 3.0]), torch.zeros(2)]
    assert combine_scores(((r, 1.0) for r in rows), 2, rule="normalised").tolist() == \
        [0.125, 0.375]


BASE = ["run.rounds=2", "run.threads=1", "run.progress=false", "federation.num_clients=10",
        "federation.clients_per_round=5", "train.local_epochs=1", "algorithm.density=0.2",
        "run.eval_every=0"]


def test_attack_settings_are_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match="attack.kind"):
        load_config(None, [*BASE, "attack.kind=bribe"])
    with pytest.raises(ConfigError, match="some clients are honest"):
        load_config(None, [*BASE, "attack.kind=zeros", "attack.hostile_per_round=5"])
    with pytest.raises(ConfigError, match="attack.boost"):
        load_config(None, [*BASE, "attack.kind=boost", "attack.boost=0"])
    with pytest.raises(ConfigError, match="needs a method with one global mask"):
        load_config(None, [*BASE, "attack.kind=zeros", "algorithm.name=feddst"])
    with pytest.raises(ConfigError, match="saliency mask round"):
        load_config(None, [*BASE, "attack.kind=poison_scores", "algorithm.name=random"])
    with pytest.raises(ConfigError, match="score_rule"):
        load_config(None, [*BASE, "algorithm.ssfl.score_rule=mode"])
    load_config(None, [*BASE, "attack.kind=poison_scores", "algorithm.ssfl.score_rule=median"])


def test_flower_refuses_a_simulated_attack() -> None:
    from ssfl.flower.protocol import config_from_run_config, run_config_from_config

    config = load_config(None, [*BASE, "attack.kind=zeros"])
    with pytest.raises(ConfigError, match="simulator only"):
        run_config_from_config(config)
    flat = run_config_from_config(load_config(None, BASE))
    assert not any(k.startswith("attack.") for k in flat)  # no attack keys on Flower
    with pytest.raises(ConfigError, match="simulator only"):
        config_from_run_config({**flat, "attack.kind": "huge"})


def last_layer_density(rule: str, tmp_path) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    from ssfl.sim import run_experiment

    config = load_config(None, [*BASE, "run.rounds=1", "attack.kind=poison_scores",
                                f"algorithm.ssfl.score_rule={rule}"])
    result = run_experiment(config, tmp_path / rule)
    mask = json.loads((result.run_dir / "mask.json").read_text())
    last = list(mask["per_layer"])[-1]
    return mask["per_layer"][last], mask["scored_clients"]


def test_one_poisoning_client_of_ten_empties_the_last_layer_unless_scores_are_robust(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Client 0 (hostile) gives every weight but the last layer's the largest float32 score:
    it passes screening (finite, non-negative), and under the plain mean the last layer keeps
    no weight; each robust rule keeps it, the default ("clipped") included."""
    density, scored = last_layer_density("mean", tmp_path)
    assert density == 0.0 and 0 in scored
    for rule in ("clipped", "normalised", "trimmed_mean", "median"):
        assert last_layer_density(rule, tmp_path)[0] > 0.05, rule
