"""Config parsing and validation: bad input stops before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssfl.config import ConfigError, check_against_data, load_config, parse_override, to_toml


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path: Path) -> None:
    config = load_config()
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_overrides_are_typed() -> None:
    config = load_config(None, ["train.lr=0.1", "run.rounds=3", "data.dataset=cifar10",
                                "train.augment=none", "federation.num_clients=7"])
    assert config.train.lr == 0.1 and config.run.rounds == 3
    assert config.data.dataset == "cifar10" and config.federation.num_clients == 7
    assert parse_override("algorithm.density=1") == ("algorithm", "density", 1)
    assert load_config(None, ["algorithm.density=1"]).algorithm.density == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=0.1"], "unknown config key 'train.lrr'"),
        (["nosuch.key=1"], r"unknown config section \[nosuch\]"),
        (["algorithm.density=0"], r"algorithm.density must be in \(0, 1\]"),
        (["algorithm.density=1.5"], r"algorithm.density must be in \(0, 1\]"),
        (["algorithm.name=magic"], "algorithm.name = 'magic' is not allowed; choose one of"),
        (["algorithm.name=fedavg"], "dense FedAvg: set algorithm.density = 1.0"),
        (["data.dataset=mnist"], "data.dataset = 'mnist' is not allowed"),
        (["data.partition=weird"], "data.partition"),
        (["federation.clients_per_round=30"], "exceeds federation.num_clients"),
        (["run.rounds=0"], "run.rounds must be at least 1"),
        (["run.rounds=1.5"], "run.rounds must be an integer"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["train.augment=yes"], "train.augment"),
        (["comm.value_dtype=int8"], "comm.value_dtype"),
        (["algorithm.name=feddst", "federation.update_clip_norm=1.0"],
         "update_clip_norm applies to the global-mask methods"),
        (["algorithm.feddst.nosuch=1"], "unknown config key 'algorithm.feddst.nosuch'"),
        (["algorithm.feddst.update_interval=0"], "algorithm.feddst: update_interval must be"),
        (["algorithm.feddst.prune_fraction=yes"], "algorithm.feddst.prune_fraction must be"),
        (["algorithm.magic.x=1"], r"\[algorithm.magic\] names no method"),
        (["algorithm.name=dispfl", "federation.num_clients=1",
          "federation.clients_per_round=1"], "needs federation.num_clients >= 2"),
        (["run.plugins=no_such_module_here"], "no_such_module_here"),
        (["a.b.c=1"], "algorithm.<method>.key"),
        (["federation.min_replies=9"], "exceeds federation.clients_per_round"),
        (["federation.failure_rate=1.0"], "failure_rate must be in"),
        (["train.lr"], "section.key=value"),
        (["lr=0.1"], "section.key"),
    ],
)
def test_bad_config_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_checks_against_the_data_set() -> None:
    config = load_config(None, ["federation.num_clients=100", "federation.clients_per_round=10"])
    with pytest.raises(ConfigError, match="exceeds the 50 training samples"):
        check_against_data(config, num_train=50, num_classes=10)
    patho = load_config(None, ["data.partition=pathological", "data.classes_per_client=12"])
    with pytest.raises(ConfigError, match="classes_per_client"):
        check_against_data(patho, num_train=1000, num_classes=10)


def test_shipped_configs_are_valid() -> None:
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs, "configs/ should hold example configs"
    for path in configs:
        load_config(path)


def test_method_tables_are_the_methods_own_and_old_flat_keys_still_load(tmp_path: Path) -> None:
    new = load_config(None, ["algorithm.name=feddst", "algorithm.feddst.update_interval=3"])
    assert new.algorithm.options == {
        "feddst": {"update_interval": 3, "update_until": 0, "prune_fraction": 0.3}}
    # The spelling of earlier versions (flat keys under [algorithm]) gives the same config.
    old = load_config(None, ["algorithm.name=feddst", "algorithm.update_interval=3"])
    assert old == new
    # The resolved config writes the chosen method's table in full and reads back the same.
    text = to_toml(new)
    assert "[algorithm.feddst]\nupdate_interval = 3\n" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(path) == new
    # Tables of other methods are checked, then left out of the resolved config.
    both = load_config(None, ["algorithm.name=ssfl", "algorithm.feddst.update_interval=3"])
    assert list(both.algorithm.options) == ["ssfl"]


def test_config_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, ssfl.config, ssfl.flower.protocol; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
