"""``ssfl`` command-line tool: ``ssfl run`` and ``ssfl report``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ssfl.config import Config, ConfigError, check_writable, load_config


def _run(args: argparse.Namespace) -> int:
    from ssfl.algorithms.base import RoundFailed, SetupFailed
    from ssfl.checkpoint import CheckpointError
    from ssfl.data.datasets import CorruptDatasetError, DatasetNotFoundError
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
            check_writable(config, run_dir, "--resume")
        else:
            config = load_config(config_path, overrides)
            run_dir = Path(args.out) if args.out else None
            check_writable(config, run_dir, "--out" if run_dir is not None else "run.out_dir")
        if args.force and not args.resume:
            raise ConfigError("--force goes with --resume only")
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
    s = result.summary
    acc = s["final_accuracy"]
    accuracy = "not evaluated" if acc is None else f"{acc:.4f}"
    print(
        f"{s['algorithm']} density {s['density']:.3f}: final accuracy "
        f"{accuracy} after {s['rounds']} rounds; {s['ratio_to_dense']:.3f} of dense bytes "
        f"per round; run folder {result.run_dir}"
    )
    return 0


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
    run.add_argument("--force", action="store_true",
                     help="with --resume: continue even a checkpoint written by another ssfl "
                     "version or commit (never one of other data or another partition)")
    run.set_defaults(func=_run)
    rep = sub.add_parser("report", help="tables and plots for one or several run folders")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="folder for plots and tables (default: ./ssfl-report)")
    rep.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse cannot take positionals again after an option (``run cfg.toml --out D k=v``);
    # the words it leaves over are the rest of ``run``'s config and overrides.
    args, extra = parser.parse_known_args(argv)
    unknown = [w for w in extra if w.startswith("-") or args.command != "run"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.words = [*args.words, *extra]
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
