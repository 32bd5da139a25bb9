"""The byte ledger: every payload's serialised length, counted once, in one place.

The run loop records each payload that crosses the network as it is sent or received, by
phase (``setup`` before round 1, ``round`` per training round, ``resync`` when a resumed run
brings clients back up to date), by label (what it was: ``score_upload``, ``mask_broadcast``,
``train``) and by direction (``down``: server to client, ``up``: client to server). The
metrics rows and the summary read their byte figures from here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DOWN, UP = "down", "up"
SETUP, ROUND, RESYNC = "setup", "round", "resync"


@dataclass
class Ledger:
    """Bytes by (phase, round, label, direction); round is 0 outside training rounds."""

    entries: dict[tuple[str, int, str, str], int] = field(default_factory=dict)

    def count(self, phase: str, label: str, direction: str, payloads: Iterable[bytes],
              round: int = 0) -> int:
        """Add the lengths of ``payloads``; returns how many bytes that was."""
        if direction not in (DOWN, UP):
            raise ValueError(f"direction must be {DOWN!r} or {UP!r}, got {direction!r}")
        return self.add(phase, label, direction, sum(len(p) for p in payloads), round=round)

    def add(self, phase: str, label: str, direction: str, nbytes: int, round: int = 0) -> int:
        """Add ``nbytes`` bytes that are not one payload (a protocol's own messages)."""
        if direction not in (DOWN, UP):
            raise ValueError(f"direction must be {DOWN!r} or {UP!r}, got {direction!r}")
        key = (phase, round, label, direction)
        self.entries[key] = self.entries.get(key, 0) + nbytes
        return nbytes

    def _sum(self, phase: str | None = None, round: int | None = None,
             direction: str | None = None) -> int:
        return sum(v for (p, r, _, d), v in self.entries.items()
                   if (phase is None or p == phase) and (round is None or r == round)
                   and (direction is None or d == direction))

    def one_time(self) -> dict[str, int]:
        """The set-up phase's bytes by label (both directions), labels with bytes only."""
        out: dict[str, int] = {}
        for (phase, _, label, _), nbytes in self.entries.items():
            if phase == SETUP and nbytes:
                out[label] = out.get(label, 0) + nbytes
        return out

    def round_bytes(self, round: int) -> tuple[int, int]:
        """(down, up) of training round ``round``, retries included."""
        return (self._sum(ROUND, round, DOWN), self._sum(ROUND, round, UP))

    def total(self) -> int:
        """Every byte of the run: set-up and rounds (a resumed run's re-sync apart)."""
        return self._sum(SETUP) + self._sum(ROUND)

    def resync_bytes(self) -> int:
        return self._sum(RESYNC)

    def to_json(self) -> list[list[Any]]:
        return [[*key, nbytes] for key, nbytes in self.entries.items()]

    @classmethod
    def from_json(cls, rows: Iterable[Iterable[Any]]) -> Ledger:
        ledger = cls()
        for phase, round, label, direction, nbytes in rows:
            ledger.entries[(str(phase), int(round), str(label), str(direction))] = int(nbytes)
        return ledger

    def labels(self) -> Mapping[str, int]:
        """Bytes by label over the whole run (for reports)."""
        out: dict[str, int] = {}
        for (_, _, label, _), nbytes in self.entries.items():
            out[label] = out.get(label, 0) + nbytes
        return out
