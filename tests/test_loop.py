"""The run loop's rules, on a fake transport and a two-client fake method (no model, no data):
screening, min_replies after screening, retries, the byte ledger."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ssfl.algorithms.base import Reply, RoundFailed
from ssfl.comm import decode_values, encode_values
from ssfl.config import load_config
from ssfl.run.ledger import Ledger
from ssfl.run.loop import ClientReply, Run, Transport, play_round


class Mean:
    """A fake method: the state is one number; a client sends a VALUES payload of one float."""

    personalised = False

    def configure(self, state: float, round: int, clients: Sequence[int],
                  attempt: int) -> dict[int, bytes]:
        return {c: encode_values(torch.tensor([state]), round=round) for c in clients}

    def check(self, state: float, round: int, client_id: int, payload: bytes) -> float:
        return float(decode_values(payload, expected_count=1)[0])  # PayloadError if malformed

    def aggregate(self, state: float, round: int, replies: Sequence[Reply],
                  sampled: Sequence[int], refused: Sequence[int] = ()
                  ) -> tuple[float, dict[str, Any]]:
        total = sum(r.num_samples for r in replies)
        return sum(r.update * r.num_samples for r in replies) / total, {"n": len(replies)}


class Scripted(Transport):
    """Replies as scripted per (attempt, client): a value, 'bad', 'crash', or a sample count."""

    def __init__(self, script: Mapping[tuple[int, int], Any]) -> None:
        self.script, self.calls = script, 0

    def exchange(self, kind: str, round: int, lr: float, payloads: Mapping[int, bytes],
                 attempt: int = 1, *, ack: bool = False) -> list[ClientReply]:
        self.calls += 1
        out = []
        for cid, down in payloads.items():
            what = self.script.get((attempt, cid), (float(cid + 1), 10))
            if what == "crash":
                out.append(ClientReply(cid, down, b"", 0, math.nan, error="crashed"))
            elif what == "bad":
                out.append(ClientReply(cid, down, b"bad", 10, 1.0))
            else:
                value, samples = what
                out.append(ClientReply(cid, down, encode_values(torch.tensor([value])),
                                       samples, 1.0))
        return out


def make_run(transport: Transport, *overrides: str) -> Run:
    config = load_config(None, ["federation.num_clients=2", "federation.clients_per_round=2",
                                *overrides])
    exp = SimpleNamespace(config=config)
    r = Run(exp, transport, Mean(), SimpleNamespace(path=None))  # type: ignore[arg-type]
    r.state = 0.0
    return r


def test_two_valid_replies_are_averaged_by_samples_and_every_byte_is_counted() -> None:
    r = make_run(Scripted({(1, 0): (1.0, 10), (1, 1): (4.0, 30)}))
    row = play_round(r, 1)
    assert r.state == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    payload = len(encode_values(torch.tensor([0.0])))  # 28-byte header + one float32
    assert (row["bytes_down"], row["bytes_up"]) == (2 * payload, 2 * payload)
    assert r.ledger.round_bytes(1) == (2 * payload, 2 * payload)
    assert row["bytes_cumulative"] == 4 * payload and row["diagnostics"] == {"n": 2}
    assert row["train_loss"] == 1.0 and "rejected" not in row and "failed" not in row


@pytest.mark.parametrize("claim", [0, -5, 2.7, True, "10", None])
def test_a_bad_sample_count_is_rejected_by_name(claim: object) -> None:
    r = make_run(Scripted({(1, 1): (9.0, claim)}))
    row = play_round(r, 1)
    assert r.state == 1.0  # client 0 alone
    assert row["rejected"] == [{"client": 1, "attempt": 1, "reason": f"sample count must be a "
                                                                     f"positive integer, got "
                                                                     f"{claim!r}"}]


def test_min_replies_counts_valid_replies_and_retries_the_round() -> None:
    # Attempt 1: one valid, one rejected -> too few for min_replies=2; attempt 2: both valid.
    transport = Scripted({(1, 1): "bad"})
    r = make_run(transport, "federation.min_replies=2")
    row = play_round(r, 1)
    assert transport.calls == 2 and r.state == pytest.approx(1.5)
    # The retry shows in the row: both attempts, and the rejection with its attempt.
    assert row["attempts"] == 2 and [x["attempt"] for x in row["rejected"]] == [1]
    # Both attempts' bytes count: 2 payloads down and 2 up in each.
    payload = len(encode_values(torch.tensor([0.0])))
    assert row["bytes_down"] == 4 * payload and row["bytes_up"] == 3 * payload + len(b"bad")


def test_a_round_that_never_gets_enough_valid_replies_fails_and_leaves_the_state() -> None:
    script = {(a, 1): "crash" for a in (1, 2, 3)}
    r = make_run(Scripted(script), "federation.min_replies=2", "federation.max_round_attempts=3")
    with pytest.raises(RoundFailed, match="1 valid replies, at least 2 required"):
        play_round(r, 1)
    assert r.state == 0.0


def test_a_crashed_client_is_recorded_and_the_round_goes_on() -> None:
    r = make_run(Scripted({(1, 0): "crash"}))
    row = play_round(r, 1)
    assert r.state == 2.0
    assert row["failed"] == [{"client": 0, "attempt": 1, "reason": "crashed"}]


def test_a_second_reply_from_one_client_is_rejected() -> None:
    class Twice(Scripted):
        def exchange(self, *args: Any, **kwargs: Any) -> list[ClientReply]:
            replies = super().exchange(*args, **kwargs)
            return [*replies, replies[0]]

    r = make_run(Twice({}))
    row = play_round(r, 1)
    assert [x["client"] for x in row["rejected"]] == [0]
    assert "a second reply" in row["rejected"][0]["reason"]


def test_a_sample_count_above_the_clients_partition_is_rejected() -> None:
    # The server's own split gives client 1 twenty samples; it claims 10**9.
    r = make_run(Scripted({(1, 1): (9.0, 10**9)}))
    r.client_sizes = (10, 20)
    row = play_round(r, 1)
    assert r.state == 1.0  # client 0 alone: 10**9 samples bought no weight
    assert row["rejected"] == [{"client": 1, "attempt": 1,
                                "reason": "claims 1000000000 samples; its partition holds 20"}]
    # A claim up to the partition's size is fine (a client may train on fewer samples).
    r = make_run(Scripted({(1, 1): (4.0, 20)}))
    r.client_sizes = (10, 20)
    play_round(r, 1)
    assert r.state == pytest.approx((1.0 * 10 + 4.0 * 20) / 30)


def test_a_reply_from_a_client_not_asked_is_rejected() -> None:
    class Stranger(Scripted):
        def exchange(self, *args: Any, **kwargs: Any) -> list[ClientReply]:
            replies = super().exchange(*args, **kwargs)
            stranger = ClientReply(7, b"", encode_values(torch.tensor([99.0])), 10, 1.0)
            return [*replies, stranger]

    r = make_run(Stranger({}))
    row = play_round(r, 1)
    assert r.state == pytest.approx(1.5)  # clients 0 and 1 alone
    assert row["rejected"] == [{"client": 7, "attempt": 1,
                                "reason": "a reply from client 7, which was not asked"}]


def test_ledger_counts_each_payload_once_by_phase_label_and_direction() -> None:
    ledger = Ledger()
    ledger.count("setup", "score_upload", "up", [b"abc", b"de"])
    ledger.count("setup", "mask_broadcast", "down", [b"x"] * 4)
    ledger.count("round", "train", "down", [b"1234"], round=1)
    ledger.count("round", "train", "up", [b"12"], round=1)
    assert ledger.one_time() == {"score_upload": 5, "mask_broadcast": 4}
    assert ledger.round_bytes(1) == (4, 2) and ledger.round_bytes(2) == (0, 0)
    assert ledger.total() == 15
    assert Ledger.from_json(ledger.to_json()) == ledger
    with pytest.raises(ValueError, match="direction"):
        ledger.count("setup", "x", "sideways", [])
