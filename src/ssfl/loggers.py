"""Optional experiment loggers fed by the per-round hook: TensorBoard and Weights & Biases.

``run.loggers = "tensorboard,wandb"`` (any subset) adds them to a run that writes a folder:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs``); needs
  the ``tensorboard`` package (``pip install -e ".[tensorboard]"``).
- ``wandb``: a Weights & Biases run in ``RUN_DIR/wandb``, offline unless ``WANDB_MODE`` says
  otherwise (``wandb sync`` uploads it later); needs ``wandb`` (``".[wandb]"``).

Each gets every numeric field of each round's metrics row (accuracy, losses, bytes, seconds,
learning rate, epsilon under DP) at step = round, and the resolved config once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from ssfl.config import Config, ConfigError, to_toml

LOGGERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class RoundLogger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers (not its lists, flags or missing evaluations)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
            and math.isfinite(float(v))}


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + to_toml(config) + "\n```", 0)

    def log(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: Config) -> None:
        import wandb

        self.run = wandb.init(project="ssfl", name=run_dir.name, dir=str(run_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              config=config.to_dict())

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["round"]))

    def close(self) -> None:
        self.run.finish()


def check_loggers(names: str) -> list[str]:
    """The names in ``run.loggers``; ``ConfigError`` for an unknown one or a missing package,
    before any work."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if name not in LOGGERS:
            from ssfl.config import did_you_mean

            raise ConfigError(f"run.loggers: unknown logger {name!r}{did_you_mean(name, LOGGERS)}"
                              f"; choose from {list(LOGGERS)}")
        try:
            __import__(_PACKAGES[name])
        except ImportError:
            raise ConfigError(f"run.loggers names {name!r}, but the {_PACKAGES[name]} package "
                              f"is not installed: pip install -e \".[{name}]\"") from None
    return chosen


def open_loggers(names: str, run_dir: Path | None, config: Config) -> list[RoundLogger]:
    if run_dir is None:
        return []  # a run that writes no folder has nowhere to put their files
    loggers: list[RoundLogger] = []
    for name in check_loggers(names):
        loggers.append(TensorBoardLogger(run_dir, config) if name == "tensorboard"
                       else WandbLogger(run_dir, config))
    return loggers
