"""ssfl: Salient Sparse Federated Learning (Ohib et al., TMLR): simulate, deploy on Flower,
report. The Python API (docs/api.md):

    import ssfl
    result = ssfl.run_experiment({"algorithm": {"density": 0.1}, "run": {"rounds": 20}})
    model = ssfl.load_model(result.run_dir)

Imports are lazy, so ``import ssfl`` stays cheap. (``ssfl.run`` is the run-loop package, so
the function is ``run_experiment``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ssfl.config import Config
    from ssfl.run.loop import RunResult

__all__ = ["load_config", "load_model", "run_experiment"]


def load_config(path: Any = None, overrides: Any = ()) -> Config:
    """A validated config from a TOML file (None: the embedded quickstart) and
    ``section.key=value`` overrides."""
    from ssfl.config import load_config as _load

    return _load(path, list(overrides))


def run_experiment(config: Any = None, run_dir: Any = None, **kwargs: Any) -> RunResult:
    """Run one experiment in the simulator. ``config``: a ``Config``, a TOML path, a nested
    dict (``{"train": {"lr": 0.1}}``) or None (the quickstart); keyword arguments go to
    ``ssfl.sim.run_experiment`` (``write``, ``on_round``, ``resume``, ``progress``)."""
    from pathlib import Path

    from ssfl.config import Config as _Config, from_dict, validate
    from ssfl.sim import run_experiment as _run

    if isinstance(config, dict):
        config = from_dict(config)
        validate(config)
    elif not isinstance(config, _Config):
        config = load_config(config)
    return _run(config, None if run_dir is None else Path(run_dir), **kwargs)


def load_model(path: Any) -> nn.Module:
    """A run's trained model, ready in eval mode: a run folder, its ``model.safetensors`` or
    an ``ssfl export`` file."""
    from ssfl.export import load_model as _load

    return _load(path)
