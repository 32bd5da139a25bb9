"""The command line: --version, ssfl config, ssfl list, suggestions, one line per round."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ssfl import algorithms
from ssfl.cli import main
from ssfl.config import Config, ConfigError, from_dict, load_config
from ssfl.config_keys import all_keys, field_help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert re.fullmatch(r"ssfl \S+( \(git [0-9a-f]{12}\))?\n", capsys.readouterr().out)


def test_config_prints_the_resolved_config_that_loads_back(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "configs/quickstart.toml", "train.lr=0.125"]) == 0
    printed = capsys.readouterr().out
    config = from_dict(tomllib.loads(printed))
    assert config == load_config("configs/quickstart.toml", ["train.lr=0.125"])
    assert config.train.lr == 0.125


def test_a_misspelt_key_or_name_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "train.lrr=0.1"]) == 2
    assert "unknown config key 'train.lrr' (did you mean 'lr'?)" in capsys.readouterr().err
    for override, hint in [("trian.lr=1", "did you mean 'train'?"),
                           ("algorithm.name=sssfl", "did you mean 'ssfl'?"),
                           ("model.name=resnet19", "did you mean 'resnet18'?"),
                           ("algorithm.feddts.update_interval=3", "did you mean 'feddst'?"),
                           ("algorithm.ssfl.score_rul=mean", "did you mean 'score_rule'?")]:
        with pytest.raises(ConfigError, match=re.escape(hint)):
            load_config(None, [override])
    with pytest.raises(ConfigError) as far:
        load_config(None, ["train.zzzzzz=1"])
    assert "did you mean" not in str(far.value)  # nothing close: no guess


def test_keys_list_every_key_with_its_default_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    rows = all_keys()
    config = Config().to_dict()
    expected = {f"{s}.{k}" for s, table in config.items() for k, v in table.items()
                if not isinstance(v, dict)}
    assert expected <= {key for key, _, _ in rows}
    for method in algorithms.names():
        for name in algorithms.get(method).Settings.__dataclass_fields__:
            assert f"algorithm.{method}.{name} = " in out
    # Every key of the core sections says what it does.
    core = ("run.", "data.", "model.", "algorithm.name", "algorithm.density", "federation.",
            "train.", "comm.", "attack.")
    assert [key for key, _, text in rows if key.startswith(core) and not text] == []
    assert "train.lr = 0.05\n    the local SGD learning rate of round 1" in out


def test_field_help_reads_comments_beside_and_above() -> None:
    from dataclasses import dataclass

    @dataclass
    class Example:
        # above,
        # in two lines
        a: int = 1  # and beside
        b: str = "x"

        c: float = 0.5  # beside only

    assert field_help(Example) == {"a": "above, in two lines and beside", "b": "",
                                   "c": "beside only"}


def test_list_names_every_method_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*algorithms.names(), "small_cnn", "resnet18", "cifar10", "balanced_dirichlet",
                 "trimmed_mean", "poison_scores"]:
        assert re.search(rf"\b{name}\b", out), name
    assert "simulator only" in out  # snip_oracle's pooled data


def test_one_plain_line_per_round_without_a_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "run.rounds=2", "run.threads=1", "federation.num_clients=6",
                 "federation.clients_per_round=2", "train.local_epochs=1", "--out",
                 str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in lines] == ["round 1/2", "round 2/2"]
    assert re.search(r"round 2/2: accuracy 0\.\d{4}, train loss \d+\.\d{3}, \d+\.\d\d MB, ",
                     lines[-1])
