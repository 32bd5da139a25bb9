"""The lean mask round (docs/lean_mask.md): score dtypes, each client's top-k' scores, a seeded
sample of scoring clients; exact payload sizes, refusal of malformed score payloads, and whole
runs whose one-time score upload shrinks as the settings say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssfl.algorithms.base import Setup, SetupReply
from ssfl.algorithms.common import decode_scores, score_payload_size
from ssfl.algorithms.ssfl import SSFL, SaliencySettings
from ssfl.attacks import FLOAT32_MAX, Attacker
from ssfl.client import encode_score_vector, encode_scores
from ssfl.comm import (
    HEADER,
    LOG8,
    PayloadError,
    PayloadKind,
    decode_log8,
    decode_values,
    encode_bits,
    encode_indices,
    encode_log8,
    encode_positions,
    encode_values,
    payload_parts,
    positions_form,
    read_header,
)
from ssfl.config import ConfigError, load_config
from ssfl.masks import flatten, top_k
from ssfl.sim import run_experiment

# ---- the dtypes ------------------------------------------------------------------------------


def test_float16_and_bfloat16_round_trip_within_half_an_ulp() -> None:
    x = torch.tensor([0.0, 1e-3, 0.3333, 1.0, 7.5, 1000.25])
    for dtype, rel in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        back = decode_values(encode_values(x, dtype=dtype))
        assert back[0] == 0.0
        assert torch.all((back[1:] - x[1:]).abs() <= rel * x[1:].abs())
    # bfloat16 keeps float32's range: a score far below float16's smallest survives
    tiny = torch.tensor([1e-12, 3e30])
    torch.testing.assert_close(decode_values(encode_values(tiny, dtype="bfloat16")), tiny,
                               rtol=2.0**-8, atol=0)


def test_16_bit_scores_saturate_instead_of_becoming_infinite() -> None:
    x = torch.tensor([1e6, FLOAT32_MAX])
    for dtype in ("float16", "bfloat16"):
        back = decode_scores(encode_score_vector(x, dtype=dtype), 2, dtype=dtype)
        assert bool(torch.isfinite(back).all()) and float(back[1]) >= float(back[0]) > 0


def test_log8_by_hand_zero_is_zero_and_codes_are_evenly_spaced_in_log_space() -> None:
    x = np.array([0.0, 1.0, 10.0, 100.0, 0.0])
    body = encode_log8(x)
    low, step = LOG8.unpack_from(body)
    assert len(body) == LOG8.size + 5
    assert low == 0.0 and step == pytest.approx(math.log(100.0) / 254, rel=1e-6)
    assert list(body[LOG8.size:]) == [0, 1, 128, 255, 0]  # 10 is halfway in log space
    back = decode_log8(body, 5)
    assert back[0] == 0.0 and back[4] == 0.0
    np.testing.assert_allclose(back[1:4], [1.0, 10.0, 100.0], rtol=1e-5)
    # nothing positive: every code 0; one positive value (step 0): exact
    assert decode_log8(encode_log8(np.zeros(3)), 3).tolist() == [0.0, 0.0, 0.0]
    assert decode_log8(encode_log8(np.array([0.0, 2.5])), 2).tolist() == [0.0, 2.5]
    with pytest.raises(ValueError, match="finite values >= 0"):
        encode_log8(np.array([1.0, -1.0]))


def test_log8_round_trip_error_is_at_most_half_a_step_and_order_is_kept() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(5000, generator=g) * 3.0)  # a wide log-normal, like SNIP scores
    x[::50] = 0.0
    payload = encode_values(x, dtype="log8")
    assert len(payload) == HEADER.size + LOG8.size + 5000
    back = decode_values(payload)
    positive = x > 0
    assert torch.equal(back == 0, ~positive)  # 0 <-> 0, nothing else
    _, step = LOG8.unpack_from(payload, HEADER.size)
    ratio = (back[positive].double() / x[positive].double()).log().abs()
    assert float(ratio.max()) <= step / 2 + 1e-5  # within a factor exp(step / 2)
    # monotone: a larger score never comes back smaller...
    order = torch.argsort(x)
    assert bool((back[order][1:] >= back[order][:-1]).all())
    # ...and two scores a step apart in log space keep their order strictly
    a, b = x[positive][:-1].double(), x[positive][1:].double()
    apart = (b / a).log().abs() > step
    fa, fb = back[positive][:-1][apart], back[positive][1:][apart]
    assert bool(((a[apart] < b[apart]) == (fa < fb)).all())


def test_log8_never_decodes_to_infinity_even_at_the_float32_maximum() -> None:
    x = torch.tensor([0.0, 1e-30, FLOAT32_MAX])
    back = decode_values(encode_values(x, dtype="log8"), require_finite=True)
    assert back[0] == 0.0 and bool(torch.isfinite(back).all())
    assert float(back[2]) == pytest.approx(FLOAT32_MAX, rel=0.2)


# ---- payload sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "body"), [("float32", 4 * 10), ("float16", 2 * 10),
                                             ("bfloat16", 2 * 10), ("log8", 8 + 10)])
def test_dense_score_payload_is_header_plus_n_items(dtype: str, body: int) -> None:
    payload = encode_score_vector(torch.arange(10.0), dtype=dtype)
    assert len(payload) == 28 + body == score_payload_size(10, dtype)
    assert read_header(payload).kind == PayloadKind.SCORES


def test_the_default_score_payload_is_the_papers_byte_for_byte() -> None:
    scores = {"a": torch.rand(3, 4), "b": torch.rand(5)}
    old = encode_values(flatten(scores, ["a", "b"]), kind=PayloadKind.SCORES)
    assert encode_scores(scores) == old == encode_score_vector(flatten(scores, ["a", "b"]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "log8"])
def test_top_scores_payload_is_a_bitmap_plus_k_values(dtype: str) -> None:
    n, top = 100, 7
    payload = encode_score_vector(torch.rand(n), dtype=dtype, top=top)
    item = {"float32": 4, "float16": 2, "bfloat16": 2, "log8": 1}[dtype]
    values = 28 + top * item + (8 if dtype == "log8" else 0)
    assert len(payload) == (28 + 13) + values == score_payload_size(n, dtype, top)
    positions, sent = payload_parts(payload)
    assert read_header(positions).kind == PayloadKind.MASK and len(positions) == 28 + 13
    assert read_header(sent).count == top


def test_top_scores_payload_uses_indices_below_one_in_32() -> None:
    n = 1000
    assert positions_form(n, 31) == "indices" and positions_form(n, 32) == "bitmap"
    payload = encode_score_vector(torch.rand(n), top=10)
    positions, _ = payload_parts(payload)
    assert read_header(positions).kind == PayloadKind.INDICES
    assert len(payload) == (28 + 4 * 10) + (28 + 4 * 10) == score_payload_size(n, "float32", 10)
    assert len(encode_score_vector(torch.rand(n), top=40)) == (28 + 125) + (28 + 160)


def test_a_clients_top_payload_decodes_to_exactly_its_top_scores_and_zeros_elsewhere() -> None:
    scores = torch.tensor([0.5, 3.0, 0.0, 2.0, 3.0, 1.0, 2.0, 0.25])
    payload = encode_score_vector(scores, top=3)
    back = decode_scores(payload, 8, dtype="float32", top=3)
    # the 3 largest: 3.0, 3.0, then one of the two 2.0s: the earlier position (ssfl.masks.top_k)
    assert back.tolist() == [0.0, 3.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    assert torch.equal(back != 0, top_k(scores, 3))
    g = torch.Generator().manual_seed(1)
    big = torch.rand(5000, generator=g)
    for top in (10, 500):  # the indices form and the bitmap form
        back = decode_scores(encode_score_vector(big, top=top), 5000, dtype="float32", top=top)
        keep = top_k(big, top)
        assert torch.equal(back[keep], big[keep]) and int((back[~keep] != 0).sum()) == 0


# ---- screening -------------------------------------------------------------------------------


def test_malformed_score_payloads_are_refused_by_name() -> None:
    n, top = 64, 8
    good = encode_score_vector(torch.rand(n), dtype="log8", top=top)
    assert decode_scores(good, n, dtype="log8", top=top).count_nonzero() == top
    positions, values = payload_parts(good)
    # the size is exact: nothing larger or smaller is decoded
    for payload in (good + b"\0", good[:-1], positions + values + values,
                    encode_score_vector(torch.rand(n), dtype="float32", top=top)):
        with pytest.raises(PayloadError, match=f"of {len(payload)} bytes; the top 8 of 64 "
                                               "scores in log8 take 80 bytes"):
            decode_scores(payload, n, dtype="log8", top=top)
    # of the right size, but not what was agreed
    cases = {
        "float16, expected log8": encode_score_vector(torch.rand(n), dtype="float16", top=top),
        "keeps 9 entries": encode_positions(torch.arange(n) < 9) + values,
    }
    for reason, payload in cases.items():
        assert len(payload) == len(good)
        with pytest.raises(PayloadError, match=reason):
            decode_scores(payload, n, dtype="log8", top=top)
    # without a dtype to size it by, the form is still checked part by part
    for reason, payload in {"ends inside": good[:-1],
                            "2 payloads": positions + values + values,
                            "MASK bitmap": encode_indices(torch.arange(top)) + values}.items():
        with pytest.raises(PayloadError, match=reason):
            decode_scores(payload, n, top=top)
    bad_step = values[:HEADER.size] + LOG8.pack(0.0, -1.0) + values[HEADER.size + LOG8.size:]
    with pytest.raises(PayloadError, match="step >= 0"):
        decode_scores(positions + bad_step, n, dtype="log8", top=top)
    nan = values[:HEADER.size] + LOG8.pack(float("nan"), 0.1) + values[HEADER.size + LOG8.size:]
    with pytest.raises(PayloadError, match="finite"):
        decode_scores(positions + nan, n, dtype="log8", top=top)
    huge = values[:HEADER.size] + LOG8.pack(80.0, 1.0) + values[HEADER.size + LOG8.size:]
    with pytest.raises(PayloadError, match="beyond the largest float32"):
        decode_scores(positions + huge, n, dtype="log8", top=top)
    # negative or non-finite values in the sent scores, dense or top
    neg = encode_values(-torch.ones(top), kind=PayloadKind.SCORES, dtype="bfloat16")
    with pytest.raises(PayloadError, match="negative"):
        decode_scores(positions + neg, n, dtype="bfloat16", top=top)
    inf = encode_values(torch.full((n,), math.inf), kind=PayloadKind.SCORES, dtype="float16")
    with pytest.raises(PayloadError, match="NaN or infinite"):
        decode_scores(inf, n, dtype="float16")
    with pytest.raises(PayloadError, match="expected 64"):  # a dense payload of the wrong size
        decode_scores(encode_values(torch.ones(65), kind=PayloadKind.SCORES), n)
    # a bitmap of the right size whose header claims another count
    with pytest.raises(PayloadError):
        decode_scores(encode_bits(bytes(8), 65) + values, n, dtype="log8", top=top)


def _ssfl(*overrides: str, num_clients: int = 10, size: int = 40) -> SSFL:
    config = load_config(None, [f"federation.num_clients={num_clients}", "algorithm.density=0.1",
                                *overrides])
    from ssfl import algorithms

    initial = {"w": torch.zeros(size), "b": torch.zeros(2)}
    setup = Setup(config, {n: t.shape for n, t in initial.items()}, ["w"], initial, num_clients)
    return SSFL(setup, algorithms.settings_of(config))


class _Ask:
    """Each client asked answers with ``scores`` as the method's client would encode them."""

    def __init__(self, method: SSFL, scores: torch.Tensor) -> None:
        self.method, self.scores = method, scores
        self.asked: list[int] = []
        self.delivered: list[int] = []

    def query(self, kind, payloads, *, label, all_required=False):
        self.asked = list(payloads)
        s = self.method.settings
        body = encode_score_vector(self.scores, dtype=s.score_dtype, top=self.method.score_top())
        return [SetupReply(c, body, 5) for c in payloads]

    def deliver(self, kind, payloads, *, label):
        self.delivered = list(payloads)


def test_a_malformed_lean_score_payload_leaves_its_client_out_of_the_mask() -> None:
    method = _ssfl("algorithm.ssfl.score_topk=2", 'algorithm.ssfl.score_dtype="log8"')
    assert method.score_top() == 8  # k = round(0.1 x 40) = 4, k' = 2k
    scores = torch.arange(40.0)
    honest = encode_score_vector(scores, dtype="log8", top=8)
    dense = encode_score_vector(scores)  # the paper's form: not what this run agreed on
    mask, used = method.scores_to_mask(
        [SetupReply(0, honest, 5), SetupReply(1, dense, 5), SetupReply(2, honest[:-3], 5)],
        "weighted")
    assert used == [0]
    assert mask["w"].nonzero().squeeze(1).tolist() == [36, 37, 38, 39]


# ---- the settings ----------------------------------------------------------------------------


def test_settings_are_checked_by_name() -> None:
    SaliencySettings(score_dtype="log8", score_topk=1.5, score_fraction=0.2)
    for bad, match in [({"score_dtype": "int4"}, "score_dtype"),
                       ({"score_topk": -1.0}, "score_topk"),
                       ({"score_topk": math.inf}, "score_topk"),
                       ({"score_fraction": 0.0}, "score_fraction"),
                       ({"score_fraction": 1.5}, "score_fraction"),
                       ({"score_count": -1}, "score_count"),
                       ({"score_count": 3, "score_fraction": 0.5}, "not both")]:
        with pytest.raises(ValueError, match=match):
            SaliencySettings(**bad)
    with pytest.raises(ConfigError, match="more than the 4 clients"):
        load_config(None, ["federation.num_clients=4", "federation.clients_per_round=2",
                           "algorithm.ssfl.score_count=5"])
    with pytest.raises(ConfigError, match="client 0 alone"):
        load_config(None, ["algorithm.name=snip_single", "algorithm.snip_single.score_count=2"])
    load_config(None, ["algorithm.name=snip_single", 'algorithm.snip_single.score_dtype="log8"',
                       "algorithm.snip_single.score_topk=2"])
    with pytest.raises(ConfigError, match="never travel"):
        load_config(None, ["algorithm.name=snip_oracle",
                           'algorithm.snip_oracle.score_dtype="float16"'])


def test_the_scoring_sample_is_seeded_reproducible_and_of_the_right_size() -> None:
    everyone = _ssfl()
    assert everyone.scoring_clients() == list(range(10))
    for overrides, size in [(["algorithm.ssfl.score_fraction=0.2"], 2),
                            (["algorithm.ssfl.score_fraction=0.25"], 3),  # ceil(2.5)
                            (["algorithm.ssfl.score_fraction=0.01"], 1),  # at least one
                            (["algorithm.ssfl.score_count=4"], 4),
                            (["algorithm.ssfl.score_count=10"], 10)]:
        method = _ssfl(*overrides, "run.seed=3")
        sample = method.scoring_clients()
        assert len(sample) == size == len(set(sample)) and sample == sorted(sample)
        assert all(0 <= c < 10 for c in sample)
        assert _ssfl(*overrides, "run.seed=3").scoring_clients() == sample
    seeds = {tuple(_ssfl("algorithm.ssfl.score_count=3", f"run.seed={s}").scoring_clients())
             for s in range(6)}
    assert len(seeds) > 1  # the sample follows run.seed
    # only the sample is asked; every client receives the mask; the record names the scorers
    method = _ssfl("algorithm.ssfl.score_count=3", "run.seed=3")
    ask = _Ask(method, torch.arange(40.0))
    state = method.run_setup(method.init(), ask)
    assert ask.asked == method.scoring_clients()
    assert ask.delivered == list(range(10))
    assert method.setup_record(state) == {"scored_clients": ask.asked}


def test_poisoned_scores_keep_the_lean_form_and_pass_screening() -> None:
    attacker = Attacker("poison_scores", 1, layer_sizes=(30, 10))
    honest = encode_score_vector(torch.rand(40), dtype="bfloat16", top=8)
    out, _ = attacker.tamper("scores", b"", honest, 7)
    back = decode_scores(out, 40, dtype="bfloat16", top=8)
    assert back.nonzero().squeeze(1).tolist() == list(range(8))  # 8 largest, earliest first
    assert float(back.max()) > 1e38


# ---- whole runs ------------------------------------------------------------------------------

RUN = ["run.rounds=1", "run.progress=false", "run.eval_every=0", "run.threads=1",
       "federation.num_clients=8", "federation.clients_per_round=2", "model.width=0.5",
       "algorithm.density=0.1"]


def _whole_run(*overrides: str):
    return run_experiment(load_config(None, [*RUN, *overrides]), write=False)


def test_whole_runs_shrink_the_score_upload_by_the_expected_factor() -> None:
    reference = _whole_run()
    prunable = sum(m.numel() for m in reference.mask.values())
    k = round(0.1 * prunable)
    dense = reference.summary["one_time_bytes"]["score_upload"]
    assert dense == 8 * (28 + 4 * prunable)
    cases = {
        ('algorithm.ssfl.score_dtype="float16"',): 8 * score_payload_size(prunable, "float16"),
        ('algorithm.ssfl.score_dtype="bfloat16"',): 8 * score_payload_size(prunable, "bfloat16"),
        ('algorithm.ssfl.score_dtype="log8"',): 8 * (28 + 8 + prunable),
        ("algorithm.ssfl.score_topk=1",): 8 * ((28 + math.ceil(prunable / 8)) + 28 + 4 * k),
        ("algorithm.ssfl.score_topk=2", 'algorithm.ssfl.score_dtype="log8"'):
            8 * ((28 + math.ceil(prunable / 8)) + 28 + 8 + 2 * k),
        ("algorithm.ssfl.score_fraction=0.25",): 2 * (28 + 4 * prunable),
        ("algorithm.ssfl.score_count=3",): 3 * (28 + 4 * prunable),
    }
    masks = {}
    for overrides, expected in cases.items():
        result = _whole_run(*overrides)
        one_time = result.summary["one_time_bytes"]
        assert one_time["score_upload"] == expected, overrides
        assert one_time["mask_broadcast"] == reference.summary["one_time_bytes"]["mask_broadcast"]
        assert sum(int(m.sum()) for m in result.mask.values()) == k
        masks[overrides] = result.mask
    # roughly: 16-bit halves it, log8 quarters it, top-k' at d = 0.1 about 0.13 of it
    assert cases[('algorithm.ssfl.score_dtype="log8"',)] / dense == pytest.approx(0.25, abs=0.01)
    assert cases[("algorithm.ssfl.score_topk=1",)] / dense == pytest.approx(0.131, abs=0.01)
    # snip_single's one client may send lean scores too
    single = _whole_run("algorithm.name=snip_single", "algorithm.snip_single.score_topk=1",
                        'algorithm.snip_single.score_dtype="log8"')
    assert single.summary["one_time_bytes"]["score_upload"] == \
        score_payload_size(prunable, "log8", k)
    # 16-bit scores pick (nearly) the same mask as float32 ones
    ref = reference.mask
    bf16 = masks[('algorithm.ssfl.score_dtype="bfloat16"',)]
    both = sum(int((ref[n] & bf16[n]).sum()) for n in ref)
    assert both / (2 * k - both) > 0.9


def test_default_settings_spelled_out_give_the_same_mask_as_before() -> None:
    implicit = _whole_run()
    explicit = _whole_run('algorithm.ssfl.score_dtype="float32"', "algorithm.ssfl.score_topk=0",
                          "algorithm.ssfl.score_fraction=1.0", "algorithm.ssfl.score_count=0")
    assert all(torch.equal(implicit.mask[n], explicit.mask[n]) for n in implicit.mask)
    assert implicit.summary["one_time_bytes"] == explicit.summary["one_time_bytes"]
    assert torch.equal(implicit.final_values, explicit.final_values)
