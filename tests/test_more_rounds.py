"""Continuing a finished run past its planned end (``ssfl run --resume RUN_DIR --rounds N``):
the continued run is the run a config of N rounds plays, bit for bit, and a config whose
earlier rounds read ``run.rounds`` is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from same_run import assert_same_run, metric_rows

from ssfl.checkpoint import CheckpointError
from ssfl.cli import main
from ssfl.config import ConfigError, load_config, rounds_dependence, with_more_rounds
from ssfl.sim import run_experiment

# Evaluations every 2 rounds: round 6, the first run's last, is an evaluation round either way.
RUN = ["run.progress=false", "run.checkpoint_every=3", "run.eval_every=2",
       "federation.num_clients=6", "federation.clients_per_round=3", "train.local_epochs=2",
       "model.width=0.5", "run.threads=1"]


@pytest.mark.parametrize("method", [["algorithm.name=ssfl"],
                                    ["algorithm.name=fedavg", "algorithm.density=1.0"]])
def test_a_run_continued_to_more_rounds_is_the_longer_run(tmp_path: Path,
                                                          method: list[str]) -> None:
    longer = run_experiment(load_config(None, [*RUN, *method, "run.rounds=9"]),
                            tmp_path / "nine")
    folder = tmp_path / "six"
    run_experiment(load_config(None, [*RUN, *method, "run.rounds=6"]), folder)
    assert len(metric_rows(folder)) == 6

    assert main(["run", "--resume", str(folder), "--rounds", "9", "--no-progress"]) == 0
    assert_same_run(folder, longer.run_dir, 9)
    # The folder now describes a 9-round run: a plain resume finds nothing left to play.
    assert load_config(folder / "config.toml").run.rounds == 9
    assert main(["run", "--resume", str(folder), "--no-progress"]) == 0
    assert metric_rows(folder) == metric_rows(longer.run_dir)


def test_what_reads_run_rounds_is_named() -> None:
    assert rounds_dependence(load_config(None, RUN)) == []
    cosine = load_config(None, [*RUN, "train.lr_schedule=cosine"])
    assert rounds_dependence(cosine) == [
        "train.lr_schedule = 'cosine' spreads the learning rate over run.rounds"]
    (feddst,) = rounds_dependence(load_config(None, [*RUN, "algorithm.name=feddst"]))
    assert feddst.startswith("feddst: its mask updates run until half of run.rounds")
    # A fixed end of the mask updates no longer depends on the run's length.
    assert rounds_dependence(load_config(None, [*RUN, "algorithm.name=feddst",
                                                "algorithm.feddst.update_until=4"])) == []
    (dispfl,) = rounds_dependence(load_config(None, [*RUN, "algorithm.name=dispfl"]))
    assert "anneals over run.rounds" in dispfl
    assert rounds_dependence(load_config(None, [*RUN, "algorithm.name=dispfl",
                                                "algorithm.dispfl.anneal=0"])) == []


def test_more_rounds_is_refused_where_the_played_rounds_would_differ() -> None:
    config = load_config(None, [*RUN, "run.rounds=6"])
    assert with_more_rounds(config, 10).run.rounds == 10
    assert with_more_rounds(config, 6) == config
    with pytest.raises(ConfigError, match="fewer than the run's run.rounds = 6: a run is "
                                          "continued, never shortened"):
        with_more_rounds(config, 5)
    with pytest.raises(ConfigError, match="whole number"):
        with_more_rounds(config, 0)
    cosine = load_config(None, [*RUN, "run.rounds=6", "train.lr_schedule=cosine"])
    with pytest.raises(ConfigError, match="cannot be continued to 10 rounds: "
                                          "train.lr_schedule = 'cosine'.*run.rounds=10"):
        with_more_rounds(cosine, 10)
    assert with_more_rounds(cosine, 6) == cosine  # the same rounds: a plain resume


def test_the_cli_and_the_checkpoint_refuse_it_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "cosine"
    overrides = [*RUN, "run.rounds=3", "train.lr_schedule=cosine"]
    run_experiment(load_config(None, overrides), folder)
    before = metric_rows(folder)
    assert main(["run", "--resume", str(folder), "--rounds", "5"]) == 2
    assert "cannot be continued to 5 rounds: train.lr_schedule = 'cosine'" in (
        capsys.readouterr().err)
    assert main(["run", "--rounds", "5", *overrides]) == 2
    assert "--rounds goes with --resume only" in capsys.readouterr().err
    # Through the API, a config of more rounds meets the checkpoint's own check.
    with pytest.raises(CheckpointError, match="cannot be continued from 3 to 5 rounds"):
        run_experiment(load_config(None, [*overrides, "run.rounds=5"]), folder, resume=True)
    with pytest.raises(CheckpointError, match="never shortened to 2"):
        run_experiment(load_config(None, [*overrides, "run.rounds=2"]), folder, resume=True)
    assert metric_rows(folder) == before  # nothing computed was lost
