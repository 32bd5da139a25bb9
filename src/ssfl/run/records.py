"""The run folder: what a run writes as it goes (config, partition, mask, one metrics line per
round, summary), and the clients' test splits of the personalised protocol."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ssfl.config import to_toml
from ssfl.data.partition import class_counts, matching_test_splits
from ssfl.run.experiment import Experiment


@dataclass
class RunFolder:
    """Files of one run; ``path`` None: nothing is written (tests, benchmarks)."""

    path: Path | None
    client_tests: list[torch.Tensor]
    _metrics: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, exp: Experiment, path: Path | None, *, fresh: bool) -> RunFolder:
        test = exp.test_set
        assert test is not None
        train_counts = class_counts(exp.train_set.labels.numpy(), exp.parts,
                                    exp.train_set.num_classes)
        tests = [torch.from_numpy(idx) for idx in matching_test_splits(
            test.labels.numpy(), train_counts,
            per_client=max(1, len(test) // len(exp.parts)), seed=exp.config.run.seed)]
        folder = cls(path, tests)
        if path is not None:
            # Also on a resume: a run continued past its planned end records its new rounds.
            (path / "config.toml").write_text(to_toml(exp.config))
        if path is not None and fresh:
            (path / "partition.json").write_text(json.dumps({
                "class_counts": train_counts.tolist(), "sizes": [len(p) for p in exp.parts],
                "test_class_counts": class_counts(
                    test.labels.numpy(), [t.numpy() for t in tests],
                    exp.train_set.num_classes).tolist(),
            }))
        return folder

    def start_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Open ``metrics.jsonl`` afresh with the rows so far (a resumed run drops the rows a
        killed process wrote after its checkpoint: they are computed again)."""
        if self.path is not None:
            self._metrics = (self.path / "metrics.jsonl").open("w")
            self._metrics.writelines(json.dumps(row) + "\n" for row in rows)
            self._metrics.flush()

    def append_row(self, row: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def write_mask(self, info: dict[str, Any]) -> None:
        if self.path is not None:
            (self.path / "mask.json").write_text(json.dumps(info, indent=1))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.path is not None:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=1))
