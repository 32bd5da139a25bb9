"""The server checks every client update before aggregating: bad ones are rejected with a
reason naming the client, the rest of the round goes on, and nothing can corrupt the model."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ssfl.comm import HEADER, encode_values
from ssfl.server import RoundFailed, SparseFedAvgServer

INITIAL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5])}
MASK = {"w": torch.tensor([[True, False], [True, True]])}


def _server(**kwargs) -> SparseFedAvgServer:
    return SparseFedAvgServer(INITIAL, ["w"], MASK, **kwargs)


def _good(server: SparseFedAvgServer, values: list[float], round: int = 1) -> bytes:
    return encode_values(torch.tensor(values), round=round, digest=server.digest)


def test_each_kind_of_bad_update_is_rejected_with_its_reason_and_the_round_goes_on() -> None:
    server = _server()
    good = _good(server, [1.0, 1.0, 1.0, 1.0])
    nan = _good(server, [float("nan"), 1.0, 1.0, 1.0])
    inf = _good(server, [1.0, float("inf"), 1.0, 1.0])
    cases = [
        (_good(server, [1.0, 1.0, 1.0]), "3 values, expected 4"),
        (encode_values(torch.ones(4), round=1, digest=b"12345678"), "different mask"),
        (_good(server, [1.0] * 4, round=2), "round 2, expected 1"),
        (encode_values(torch.ones(4), round=1, digest=server.digest, dtype="float16"),
         "float16, expected float32"),
        (nan, "NaN or infinite"),
        (inf, "NaN or infinite"),
        (good + b"\0" * 100, "over the limit"),
        (good[:-2], "body has"),
        (b"garbage", "shorter than the header"),
    ]
    replies = [(i + 10, payload, 5) for i, (payload, _) in enumerate(cases)]
    replies.append((99, good, 5))
    update = server.aggregate_from(1, replies)
    assert update.num_clients == 1
    assert [r.client_id for r in update.rejected] == [10 + i for i in range(len(cases))]
    for rejection, (_, expected) in zip(update.rejected, cases):
        assert expected in rejection.reason, (expected, rejection.reason)
    assert server.values.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("count", [0, -3, 2.5, "7", True])
def test_bad_sample_counts_are_rejected(count: object) -> None:
    server = _server()
    update = server.aggregate_from(
        1, [(0, _good(server, [9.0] * 4), count), (1, _good(server, [1.0] * 4), 2)]
    )
    assert len(update.rejected) == 1 and "sample count" in update.rejected[0].reason
    assert server.values.tolist() == [1.0] * 4


def test_too_few_valid_replies_fail_the_round_and_keep_the_model() -> None:
    server = _server()
    before = server.values.clone()
    with pytest.raises(RoundFailed, match="1 valid replies, at least 2 required") as info:
        server.aggregate_from(1, [(0, _good(server, [5.0] * 4), 1), (1, b"junk", 1)],
                              min_replies=2)
    assert info.value.rejected[0].client_id == 1
    assert torch.equal(server.values, before) and server.round == 0


def test_update_norm_clipping_bounds_each_clients_change() -> None:
    server = _server(update_clip_norm=1.0)
    start = server.values.clone()  # [1, 3, 4, 0.5]
    far = start + torch.tensor([100.0, 0.0, 0.0, 0.0])
    server.aggregate_from(1, [(0, _good(server, far.tolist()), 1)])
    torch.testing.assert_close(server.values, start + torch.tensor([1.0, 0.0, 0.0, 0.0]))


def _mutations(payload: bytes):
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(payload) - 1), st.integers(0, 255)).map(
            lambda t: payload[: t[0]] + bytes([t[1]]) + payload[t[0] + 1 :]),
        st.integers(0, len(payload)).map(lambda n: payload[:n]),
        st.binary(min_size=1, max_size=64).map(lambda extra: payload + extra),
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)).map(
            lambda t: payload[:8] + struct.pack("<IQ", *t) + payload[20:]),
    )


_TEMPLATE = encode_values(torch.tensor([1.0, 1.0, 1.0, 1.0]), round=1,
                          digest=_server().digest)


@settings(max_examples=3000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(_TEMPLATE))
def test_fuzzed_payloads_never_crash_the_server_or_change_the_model(payload: bytes) -> None:
    server = _server()
    before = server.values.clone()
    try:
        update = server.aggregate_from(1, [(7, payload, 3)])
    except RoundFailed as exc:
        assert exc.rejected and exc.rejected[0].client_id == 7
        assert torch.equal(server.values, before)
        return
    # Accepted only if it is a fully valid update: exact size, finite values.
    assert payload == _TEMPLATE or (len(payload) == HEADER.size + 16
                                    and torch.isfinite(server.values).all())
    assert update.num_clients == 1 and not update.rejected


@pytest.mark.parametrize("algorithm", ["ssfl", "random_clientwise", "feddst", "prunefl",
                                       "dispfl", "sparsyfed"])
def test_every_algorithm_rejects_a_corrupt_update_and_goes_on(
    algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses
    import math

    from ssfl.config import load_config
    from ssfl.sim import InProcessTransport, run_experiment

    real = InProcessTransport.train

    def corrupting(self, round, lr, client_ids, strategy, attempt=1):
        for reply in real(self, round, lr, client_ids, strategy, attempt):
            if reply.client_id == client_ids[0]:  # one hostile client per round: NaNs
                body = bytearray(reply.payload)
                body[-4:] = struct.pack("<f", math.nan)
                reply = dataclasses.replace(reply, payload=bytes(body))
            yield reply

    monkeypatch.setattr(InProcessTransport, "train", corrupting)
    config = load_config(None, ["run.rounds=4", "run.progress=false", "federation.num_clients=6",
                                "federation.clients_per_round=3", "train.local_epochs=1",
                                f"algorithm.name={algorithm}", "algorithm.density=0.3",
                                "algorithm.update_interval=2", "model.width=0.5"])
    result = run_experiment(config, write=False)
    for row in result.metrics:
        assert [r["client"] for r in row["rejected"]] == [row["clients"][0]]
        assert "NaN or infinite" in row["rejected"][0]["reason"]
    assert torch.isfinite(result.final_values).all()
