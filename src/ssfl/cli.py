"""``ssfl`` command-line tool: ``ssfl run``, ``ssfl report``, ``ssfl config``, ``ssfl list``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssfl.config import Config, ConfigError, check_writable, load_config, with_more_rounds


def _run(args: argparse.Namespace) -> int:
    from ssfl.algorithms.base import RoundFailed, SetupFailed
    from ssfl.checkpoint import CheckpointError
    from ssfl.data.datasets import CorruptDatasetError, DatasetNotFoundError
    from ssfl.run.loop import RunInterrupted
    from ssfl.sim import run_experiment

    # Words with "=" are overrides; at most one other word, the config file. One positional
    # list (rather than two) lets options such as --out stand anywhere on the line.
    overrides = [w for w in args.words if "=" in w]
    paths = [w for w in args.words if "=" not in w]
    if len(paths) > 1:
        print(f"ssfl run: give at most one config file, got {paths}", file=sys.stderr)
        return 2
    config_path = paths[0] if paths else None
    try:
        if args.resume:
            if paths or overrides or args.out:
                raise ConfigError("--resume takes only the run folder: the run continues with "
                                  "the config it was started with")
            run_dir = Path(args.resume)
            config = load_config(run_dir / "config.toml")
            if args.rounds is not None:
                config = with_more_rounds(config, args.rounds)
            check_writable(config, run_dir, "--resume")
        else:
            refuse_flower_settings(config_path, overrides)
            config = load_config(config_path, overrides)
            run_dir = Path(args.out) if args.out else None
            if run_dir is not None:
                clear_old_run(run_dir, overwrite=args.overwrite)
            check_writable(config, run_dir, "--out" if run_dir is not None else "run.out_dir")
        if args.force and not args.resume:
            raise ConfigError("--force goes with --resume only")
        if args.rounds is not None and not args.resume:
            raise ConfigError("--rounds goes with --resume only (a new run takes run.rounds=N)")
        if args.overwrite and not args.out:
            raise ConfigError("--overwrite goes with --out only")
        show_round_lines()
        result = run_experiment(config, run_dir, resume=bool(args.resume), force=args.force,
                                progress=False if args.no_progress else None)
    except (ConfigError, DatasetNotFoundError, CorruptDatasetError, CheckpointError) as exc:
        print(f"ssfl run: {exc}", file=sys.stderr)
        return 2
    except SetupFailed as exc:
        print(f"ssfl run: the set-up phase failed: {exc}", file=sys.stderr)
        return 3
    except RoundFailed as exc:
        print(f"ssfl run: the run stopped: {exc}{_resume_hint(config, exc.run_dir)}",
              file=sys.stderr)
        return 3
    except RunInterrupted as exc:
        where = (f"; a checkpoint of round {exc.round} is in {exc.checkpoint.parent}: continue "
                 f"with: ssfl run --resume {exc.checkpoint.parent}" if exc.checkpoint else
                 " (the run writes no folder: nothing to resume)")
        print(f"\nssfl run: interrupted after round {exc.round}{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nssfl run: interrupted before the first round (loading data or the set-up "
              "phase): nothing was saved; start the run again", file=sys.stderr)
        return 130
    s = result.summary
    acc = s["final_accuracy"]
    accuracy = "not evaluated" if acc is None else f"{acc:.4f}"
    print(
        f"{s['algorithm']} density {s['density']:.3f}: final accuracy "
        f"{accuracy} after {s['rounds']} rounds; {s['ratio_to_dense']:.3f} of dense bytes "
        f"per round; "
        + ("" if "privacy" not in s else
           f"epsilon {'inf' if s['epsilon'] is None else format(s['epsilon'], '.3g')} at "
           f"delta {s['privacy']['delta']:g}; ")
        + f"run folder {result.run_dir}"
    )
    return 0


#: what a run writes into its folder (``--overwrite`` removes these, nothing else)
RUN_FILES = ("config.toml", "partition.json", "mask.json", "metrics.jsonl", "summary.json",
             "checkpoint.pt", "model.safetensors", "model.sparse.safetensors")


def clear_old_run(folder: Path, *, overwrite: bool) -> None:
    """``--out`` onto a folder that holds a run: refused unless ``--overwrite``, which removes
    that run's files (and only those) first."""
    old = [name for name in RUN_FILES if (folder / name).exists()]
    if not old:
        return
    if not overwrite:
        raise ConfigError(f"--out {folder} already holds a run ({', '.join(old)}): continue it "
                          f"with --resume {folder}, or pass --overwrite to replace it")
    for name in old:
        (folder / name).unlink()


def refuse_flower_settings(config_path: str | None, overrides: Sequence[str]) -> None:
    """``flower.*`` keys (secure aggregation among them) belong to runs on Flower: say so in
    one line rather than as an unknown section."""
    keys = [w.split("=", 1)[0] for w in overrides if w.startswith("flower.")]
    if config_path is not None and not keys:
        import tomllib

        try:
            table = tomllib.loads(Path(config_path).read_text()).get("flower")
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            table = None  # load_config reports what is wrong with the file
        keys = [f"flower.{k}" for k in table] if isinstance(table, dict) else []
    if keys:
        secure = any("secure" in k or "secagg" in k for k in keys)
        raise ConfigError(
            f"{keys[0]} is a Flower setting (python -m ssfl.flower.local, flwr run), not one "
            "of the simulator's" + (
                ": secure aggregation hides each client's upload from the server, and in the "
                "simulator clients and server are one process with nothing uploaded"
                if secure else ""))


def _resume_hint(config: Config, run_dir: object) -> str:
    """How to go on after a failed round: ``--resume`` only where a checkpoint exists to
    resume from, else why there is none and what to change."""
    from ssfl.checkpoint import FILENAME

    if run_dir is None:
        return ""
    if (Path(str(run_dir)) / FILENAME).exists():
        return (f"; its last checkpoint is in {run_dir}: once the cause is gone, continue it "
                f"with: ssfl run --resume {run_dir} (the failed round replays the same "
                f"clients with the same seeds)")
    every = config.run.checkpoint_every
    why = ("run.checkpoint_every = 0 writes none" if every == 0 else
           f"the first is written after round {min(every, config.run.rounds)}")
    return (f"; it cannot be resumed: no checkpoint was written to {run_dir} ({why}); start "
            f"it again (set run.checkpoint_every to a small number, e.g. 1, to make it "
            f"resumable from the last good round)")


def _config(args: argparse.Namespace) -> int:
    """The resolved config as TOML (validated, as ``ssfl run`` would use it), or every key."""
    from ssfl.config import to_toml

    if args.keys:
        from ssfl.config_keys import all_keys

        for key, default, text in all_keys():
            print(f"{key} = {default!r}" + (f"\n    {text}" if text else ""))
        return 0
    overrides = [w for w in args.words if "=" in w]
    paths = [w for w in args.words if "=" not in w]
    if len(paths) > 1:
        print(f"ssfl config: give at most one config file, got {paths}", file=sys.stderr)
        return 2
    try:
        config = load_config(paths[0] if paths else None, overrides)
    except ConfigError as exc:
        print(f"ssfl config: {exc}", file=sys.stderr)
        return 2
    print(to_toml(config), end="")
    return 0


def _list(args: argparse.Namespace) -> int:
    """What can be named in a config: methods, models, data sets, splits, rules, attacks."""
    from ssfl import algorithms
    from ssfl.algorithms.robust import AGGREGATORS, SCORE_RULES
    from ssfl.config import ATTACK_KINDS
    from ssfl.data.datasets import DATASETS
    from ssfl.data.partition import PARTITIONS
    from ssfl.models import MODELS

    print("methods (algorithm.name):")
    for name, text in algorithms.descriptions().items():
        cls = algorithms.get(name)
        tags = [t for t, on in (("personalised", cls.personalised),
                                ("per-client masks", cls.per_client_masks),
                                ("simulator only", cls.needs_pooled_data)) if on]
        print(f"  {name:<18} {text}" + (f" [{', '.join(tags)}]" if tags else ""))
    for title, names in (("models (model.name)", MODELS), ("data sets (data.dataset)", DATASETS),
                         ("splits (data.partition)", PARTITIONS),
                         ("aggregation rules (federation.aggregator)", AGGREGATORS),
                         ("score rules (algorithm.ssfl.score_rule)", SCORE_RULES),
                         ("simulated attacks (attack.kind)", ATTACK_KINDS)):
        print(f"{title}: {', '.join(names)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """A finished run's model scored on its test data, or on data the overrides name."""
    from ssfl.data.datasets import CorruptDatasetError, DatasetNotFoundError
    from ssfl.export import ModelFileError, evaluate_run

    try:
        scores = evaluate_run(args.run, [w for w in args.overrides])
    except (ModelFileError, ConfigError, DatasetNotFoundError, CorruptDatasetError) as exc:
        print(f"ssfl evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"{args.run}: accuracy {scores['accuracy']:.4f}, test loss {scores['test_loss']:.4f} "
          f"on {scores['samples']} {scores['dataset']} test samples (density "
          f"{scores['density']:.3f})")
    return 0


def _export(args: argparse.Namespace) -> int:
    """A run's model as a compact sparse file (kept values and a bitmap per masked weight)."""
    from ssfl.export import ModelFileError, export_sparse

    try:
        path, size, dense = export_sparse(args.run, args.out)
    except (ModelFileError, OSError) as exc:
        print(f"ssfl export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {size:,} bytes, {size / dense:.3f} of the dense model file "
          f"({dense:,} bytes)")
    return 0


def _version() -> str:
    from ssfl.run.checkpoints import code_version

    code = code_version()
    commit = f" (git {code['commit'][:12]})" if code["commit"] else ""
    return f"ssfl {code['version']}{commit}"


class CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the stream of the
    moment the handler was made, which a test harness may have closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def show_round_lines() -> None:
    """``ssfl run`` prints the loop's INFO lines (one per round without a terminal) and its
    warnings (rejected updates, failed clients) as plain lines on stderr."""
    logger = logging.getLogger("ssfl")
    for old in [h for h in logger.handlers if getattr(h, "ssfl_cli", False)]:
        logger.removeHandler(old)  # a second main() in one process: today's stderr, once
    handler = CurrentStderr()
    handler.ssfl_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _report(args: argparse.Namespace) -> int:
    from ssfl.report import RunFolderError, report

    try:
        print(report(args.runs, args.out))
    except RunFolderError as exc:
        print(f"ssfl report: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssfl", description="Salient Sparse Federated Learning: simulate and report."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run one federated experiment",
        description="Run a federated experiment. Without a config file it runs the embedded "
        "quickstart (scikit-learn's digits, offline). Overrides look like train.lr=0.1.",
    )
    run.add_argument("words", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]",
                     help="an optional TOML config file, then overrides such as train.lr=0.1")
    run.add_argument("--out", help="run folder (default: <run.out_dir>/<run.name>-<time>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="with --out: replace the run already in that folder")
    run.add_argument("--rounds", type=int, metavar="N",
                     help="with --resume: continue the run to N rounds in all, past its planned "
                     "end (refused where its schedule reads run.rounds, e.g. a cosine learning "
                     "rate)")
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue even a checkpoint written by another ssfl "
                     "version or commit (never one of other data or another partition)")
    run.set_defaults(func=_run)
    rep = sub.add_parser("report", help="tables, figures (PNG + SVG) and a self-contained "
                         "report.html for one or several run folders")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="folder for the report (default: ./ssfl-report)")
    rep.set_defaults(func=_report)
    cfg = sub.add_parser("config", help="show the resolved config, or every key (--keys)",
                         description="Print the config a run would use (the file and "
                         "overrides applied, validated) as TOML; --keys lists every key with "
                         "its default and what it does.")
    cfg.add_argument("words", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    cfg.add_argument("--keys", action="store_true", help="every key, its default and its help")
    cfg.set_defaults(func=_config)
    lst = sub.add_parser("list", help="methods, models, data sets and other names a config "
                         "can use")
    lst.set_defaults(func=_list)
    ev = sub.add_parser("evaluate", help="score a finished run's model on test data",
                        description="Load RUN's model.safetensors and report its accuracy and "
                        "loss on the test split of its data set; data overrides (data.root=..., "
                        "data.dataset=...) point it at other data with the same classes.")
    ev.add_argument("run", help="a run folder (or a model .safetensors file)")
    ev.add_argument("overrides", nargs="*", metavar="section.key=value")
    ev.set_defaults(func=_evaluate)
    ex = sub.add_parser("export", help="write a run's model as a compact sparse file",
                        description="Write RUN's model with only the kept values of each "
                        "masked weight and its mask as a bitmap (safetensors); ssfl.load_model "
                        "reads it.")
    ex.add_argument("run", help="a run folder (or its model.safetensors)")
    ex.add_argument("--out", help="the file to write (default: RUN/model.sparse.safetensors)")
    ex.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse cannot take positionals again after an option (``run cfg.toml --out D k=v``);
    # the words it leaves over are the rest of ``run``'s config and overrides.
    args, extra = parser.parse_known_args(argv)
    unknown = [w for w in extra if w.startswith("-")
               or args.command not in ("run", "config", "evaluate")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and args.command == "evaluate":
        args.overrides = [*args.overrides, *extra]
    elif extra:
        args.words = [*args.words, *extra]
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
