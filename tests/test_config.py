"""Config parsing and validation: bad input stops before any work, naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ssfl.config import (
    ConfigError,
    check_against_data,
    check_writable,
    load_config,
    parse_override,
    to_toml,
)


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
        # Bounds: each message names the key, the allowed range and the value given.
        (["run.seed=-1"], r"run.seed must be in \[0, 2\*\*63\).*got -1$"),
        (["run.seed=1180591620717411303424"], r"run.seed must be in \[0, 2\*\*63\)"),
        (["run.seed=9223372036854775808"], r"run.seed must be in \[0, 2\*\*63\)"),
        (["model.width=1e4"], r"model.width must be in \(0, 16\].*got 10000.0"),
        (["model.width=0"], "model.width must be > 0"),
        (["model.width=nan"], "model.width must be > 0 and finite"),
        (["train.lr=1e30"], r"train.lr must be in \(0, 10\].*got 1e\+30"),
        (["train.lr=inf"], "train.lr must be > 0 and finite, got inf"),
        (["train.momentum=1e6"], r"train.momentum must be in \[0, 1\).*got 1000000.0"),
        (["train.momentum=1"], r"train.momentum must be in \[0, 1\)"),
        (["train.momentum=-0.1"], r"train.momentum must be in \[0, 1\)"),
        (["train.weight_decay=1"], r"train.weight_decay must be in \[0, 1\)"),
        (["train.weight_decay=-1e-4"], r"train.weight_decay must be in \[0, 1\)"),
        (["train.lr_decay=0"], r"train.lr_decay must be in \(0, 1\]"),
        (["train.lr_decay=1.01"], r"train.lr_decay must be in \(0, 1\]"),
        (["train.clip_grad_norm=-1"], "train.clip_grad_norm must be >= 0"),
        (["train.clip_grad_norm=inf"], "train.clip_grad_norm must be >= 0 and finite"),
        (["federation.update_clip_norm=-1"], "federation.update_clip_norm must be >= 0"),
        (["federation.update_clip_norm=nan"], "federation.update_clip_norm must be >= 0"),
        (["data.alpha=0"], "data.alpha must be > 0"),
        (["data.alpha=1e7"], r"data.alpha must be in \(0, 1e\+06\]"),
        (["data.alpha=inf"], "data.alpha must be > 0 and finite"),
        (["run.rounds=1000001"], "run.rounds must be at most 1_000_000, got 1_000_001"),
        (["federation.num_clients=1000001", "federation.clients_per_round=1"],
         "federation.num_clients must be at most 1_000_000"),
        (["federation.num_clients=20000", "federation.clients_per_round=10001"],
         "federation.clients_per_round must be at most 10_000"),
        (["federation.max_round_attempts=101"],
         "federation.max_round_attempts must be at most 100"),
        (["train.batch_size=65537"], "train.batch_size must be at most 65_536, got 65_537"),
        (["train.local_epochs=10001"], "train.local_epochs must be at most 10_000"),
        (["run.threads=-1"], "run.threads must be >= 0"),
        (['run.name="a\\nb"'], r"run.name = 'a\\nb' is not allowed: it names the run folder"),
        (['run.name="../escape"'], "run.name = '../escape' is not allowed"),
        (['run.name="a/b"'], "run.name = 'a/b' is not allowed"),
        (['run.name="a\\\\b"'], "run.name = .* is not allowed"),
        (['run.name=".hidden"'], "run.name = '.hidden' is not allowed"),
        (['run.name=""'], "run.name = '' is not allowed"),
        (['run.name="two words"'], "run.name = 'two words' is not allowed"),
        (["run.name=" + "x" * 101], "run.name = 'x+' is not allowed"),
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


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[run]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"config file '.*latin1.toml' is not UTF-8"):
        load_config(latin1)


def test_threads_are_bounded_by_the_machines_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert load_config(None, ["run.threads=4"]).run.threads == 4
    with pytest.raises(ConfigError, match=r"run.threads must be at most the 4 CPU cores of "
                                          r"this machine \(os.cpu_count\(\)\), got 100000"):
        load_config(None, ["run.threads=100000"])


def test_bounds_admit_their_edges() -> None:
    config = load_config(None, [
        "run.seed=9223372036854775807", "model.width=16", "train.lr=10", "train.lr_decay=1",
        "train.momentum=0", "train.weight_decay=0", "data.alpha=1e6", "run.rounds=1000000",
        "train.batch_size=65536", "train.local_epochs=10000", "federation.max_round_attempts=100",
        'run.name="cifar10-resnet18_s0.d0.1"'])
    assert config.run.seed == 2**63 - 1 and config.model.width == 16.0


def test_run_folder_must_be_writable(tmp_path: Path) -> None:
    config = load_config(None, [f"run.out_dir={str(tmp_path / 'new' / 'runs')!r}"])
    check_writable(config)  # missing folders are fine where they can be made ...
    assert not (tmp_path / "new").exists()  # ... and the check makes none of them
    check_writable(config, tmp_path, "--out")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="run.out_dir = .*a_file.* is not a folder"):
        check_writable(load_config(None, [f"run.out_dir={str(a_file)!r}"]))
    with pytest.raises(ConfigError, match="--out = .*a_file/x.* cannot be created: .*a_file.* "
                                          "is not a folder"):
        check_writable(config, a_file / "x", "--out")
    with pytest.raises(ConfigError, match="run.out_dir = .* cannot be written: .*NUL"):
        check_writable(load_config(None, ['run.out_dir="a\\u0000b"']))


def test_a_read_only_out_dir_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssfl.cli import main

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root?) may write to a folder of mode 0o500")
        config = load_config(None, [f"run.out_dir={str(locked)!r}"])
        with pytest.raises(ConfigError, match="run.out_dir = .*locked.* cannot be written"):
            check_writable(config)
        with pytest.raises(ConfigError, match="--out = .*locked/run.* cannot be created"):
            check_writable(config, locked / "run", "--out")
        assert main(["run", "--no-progress", f"run.out_dir={str(locked)!r}"]) == 2
        assert "run.out_dir = " in capsys.readouterr().err
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_cli_refuses_an_out_dir_it_cannot_make_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssfl.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["run", "--no-progress", f"run.out_dir={str(a_file / 'runs')!r}"]) == 2
    assert "ssfl run: run.out_dir = " in capsys.readouterr().err
    assert main(["run", "--no-progress", "--out", str(a_file / "run")]) == 2
    assert "ssfl run: --out = " in capsys.readouterr().err


def test_a_failed_round_suggests_resume_only_with_a_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssfl.checkpoint import FILENAME
    from ssfl.cli import _resume_hint, main

    # Every client crashes in round 1 and no checkpoint is ever written: no --resume hint.
    run_dir = tmp_path / "run"
    code = main(["run", "--no-progress", "--out", str(run_dir), "data.dataset=digits",
                 "algorithm.name=fedavg", "algorithm.density=1.0", "run.rounds=2",
                 "federation.num_clients=2", "federation.clients_per_round=2",
                 "federation.failure_rate=0.99", "federation.max_round_attempts=1",
                 "run.checkpoint_every=0", "run.threads=1", "train.local_epochs=1"])
    err = capsys.readouterr().err
    assert code == 3 and "the run stopped: round 1" in err
    assert not (run_dir / FILENAME).exists()
    assert "--resume" not in err
    assert "cannot be resumed" in err and "run.checkpoint_every = 0 writes none" in err
    # A checkpoint every 5 rounds, but the run failed before the first.
    config = load_config(None, ["run.checkpoint_every=5", "run.rounds=20"])
    hint = _resume_hint(config, run_dir)
    assert "--resume" not in hint and "the first is written after round 5" in hint
    # With a checkpoint in the folder the hint names it.
    (run_dir / FILENAME).write_bytes(b"")
    assert f"ssfl run --resume {run_dir}" in _resume_hint(config, run_dir)
    assert _resume_hint(config, None) == ""


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


def test_a_density_that_keeps_no_weight_is_refused_before_any_client_works() -> None:
    from ssfl.sim import prepare

    with pytest.raises(ConfigError, match="keeps no weight: small_cnn .* prunable weights"):
        prepare(load_config(None, ["algorithm.density=1e-9"]))


# ---- fuzzed configs: every bad one a ConfigError, never a traceback ----------------------------

def _known_keys() -> list[str]:
    from ssfl.config import Config

    config = Config()
    keys = [f"{section}.{key}" for section, values in config.to_dict().items()
            for key, value in values.items() if not isinstance(value, dict)]
    return keys + ["algorithm.ssfl.score_rule", "algorithm.ssfl.saliency_batches",
                   "algorithm.feddst.update_interval", "run.nosuchkey", "nosection.key"]


_VALUES = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: "nan" if f != f else ("inf" if f == float("inf") else
                                        "-inf" if f == float("-inf") else repr(f))),
    st.sampled_from(["true", "false", '""', '"x"', "[1, 2]", "{a = 1}", '"\\u0000"', "1e400",
                     '"median"', '"none"', '"boost"', '"cuda:7"', "0", "-1", "0.5"]),
    st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(_known_keys()), _VALUES), min_size=1, max_size=4))
def test_fuzzed_overrides_load_or_raise_a_config_error(pairs: list[tuple[str, str]]) -> None:
    """1,500 random configs (random keys, of every type and range, several at once): each
    loads or is refused with a ConfigError; nothing else escapes (the figure in
    docs/reliability.md)."""
    try:
        load_config(None, [f"{key}={value}" for key, value in pairs])
    except ConfigError:
        pass
