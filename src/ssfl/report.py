"""Summaries, figures and a self-contained HTML page for finished (or interrupted) `ssfl run`
folders.

The point of sparse federated learning is a trade-off: accuracy against bytes on the wire.  This
module turns run folders into the views that make that trade-off visible -- a Markdown/CSV table
(one row per run, and mean +- std over seeds), figures (accuracy, train loss and personalised
accuracy per round, accuracy against cumulative bytes, per-layer density of the final masks; PNG
and SVG) and ``report.html``, which embeds all of them and opens offline -- without importing
torch or any of the training code, so a report can be built on a laptop from folders copied off
a GPU machine.

A run folder holds ``config.toml``, ``metrics.jsonl`` (one JSON object per completed round),
``mask.json`` and, once the run finished, ``summary.json``.  A folder without ``summary.json``
is an interrupted run: it is still reported, from what ``metrics.jsonl`` holds, and flagged as
incomplete.

Runs whose configs differ only in the seed (and in settings that do not change results: name,
output folder, threads, device...) form a group: the figures draw one line per group, the mean
over its seeds with a +- one standard deviation band, and the legend says how many runs it holds.

Units: MB means 10**6 bytes (what network tools and papers usually quote).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import statistics
import textwrap
import tomllib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ssfl.plotstyle import (
    MethodStyle,
    dataset_label,
    density_label,
    integer_ticks,
    log_ticks,
    method_style,
    model_label,
    plain_number,
)

if TYPE_CHECKING:  # matplotlib is imported lazily: loading runs must not need it
    from matplotlib.figure import Figure

__all__ = [
    "RunFolderError",
    "RunRecord",
    "RunStats",
    "RunSeries",
    "RunGroup",
    "load_run",
    "display_names",
    "run_stats",
    "run_series",
    "group_runs",
    "setting_text",
    "build_figures",
    "summary_table",
    "group_table",
    "summary_csv",
    "plot_runs",
    "report_html",
    "report",
    "DEFAULT_REPORT_DIR",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MASK_FILE = "mask.json"
HTML_FILE = "report.html"

#: Where `report` writes when no output folder is given, relative to the
#: current directory.  Deliberately *not* next to the run folders: a report
#: folder inside ``runs/`` would be picked up by ``ssfl report runs/*`` next time.
DEFAULT_REPORT_DIR = "ssfl-report"

#: The figures, by file stem (each is written as STEM.png and STEM.svg), in report order.  The
#: personalised-accuracy and per-layer-density figures are drawn only when some run has the data.
ACCURACY_VS_ROUND = "accuracy_vs_round"
TRAIN_LOSS_VS_ROUND = "train_loss_vs_round"
PERSONAL_ACCURACY_VS_ROUND = "personal_accuracy_vs_round"
ACCURACY_VS_BYTES = "accuracy_vs_bytes"
LAYER_DENSITY = "layer_density"
FIGURE_FORMATS = ("png", "svg")

BYTES_PER_MB = 1_000_000
UNKNOWN = "—"
INCOMPLETE_MARK = "(incomplete)"


class RunFolderError(ValueError):
    """A run folder is missing or one of its files cannot be read.

    The message always names the folder or file, and says what to do, because
    it is shown as-is by the CLI.
    """


@dataclass(frozen=True)
class RunRecord:
    """Everything read from one run folder, unprocessed.

    ``summary`` is None when ``summary.json`` is absent, i.e. the run was
    interrupted before the simulator could write it; ``mask`` is None when ``mask.json`` is.
    """

    path: Path
    name: str
    config: dict
    metrics: list[dict]
    summary: dict | None
    mask: dict | None = None

    @property
    def complete(self) -> bool:
        """True once the simulator wrote ``summary.json`` (it does so last)."""
        return self.summary is not None


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def load_run(path: str | os.PathLike[str]) -> RunRecord:
    """Read a run folder; raise `RunFolderError` with an actionable message.

    ``metrics.jsonl`` is required (without it there is nothing to report).
    ``config.toml`` is optional -- it supplies the display name and tells which
    runs differ only in their seed -- ``summary.json`` is optional because
    interrupted runs lack it, and ``mask.json`` only feeds the per-layer density
    figure.  Files that exist but are malformed are always an error: silently
    skipping them would produce a report that looks right and is not.
    """
    folder = Path(path)
    _check_folder(folder)
    config = _read_config(folder / CONFIG_FILE)
    summary = _read_json_object(folder / SUMMARY_FILE, f"to report the run from {METRICS_FILE} "
                                "alone (it will be marked incomplete)")
    mask = _read_json_object(folder / MASK_FILE, "to report the run without its per-layer "
                             "densities")
    metrics = _read_metrics(folder / METRICS_FILE, run_finished=summary is not None)
    return RunRecord(
        path=folder,
        name=_run_name(config, folder),
        config=config,
        metrics=metrics,
        summary=summary,
        mask=mask,
    )


def _check_folder(folder: Path) -> None:
    """Fail early, with a hint, on the usual ways of pointing at the wrong thing."""
    if not folder.exists():
        raise RunFolderError(
            f"run folder {str(folder)!r} does not exist; pass the folder that "
            f"`ssfl run` wrote (the one holding {METRICS_FILE})"
        )
    if not folder.is_dir():
        raise RunFolderError(
            f"{str(folder)!r} is a file, not a run folder; pass the folder that "
            f"contains it (e.g. {str(folder.parent)!r})"
        )
    if (folder / METRICS_FILE).is_file():
        return
    nested = sorted(p.parent.name for p in folder.glob(f"*/{METRICS_FILE}"))
    hint = (
        f"; it looks like a folder of runs -- pass its subfolders instead "
        f"(e.g. {', '.join(nested[:3])})"
        if nested
        else "; is the run still starting, or is this not a run folder?"
    )
    raise RunFolderError(f"{str(folder)!r} has no {METRICS_FILE}{hint}")


def _read_config(file: Path) -> dict:
    """Parse config.toml if present; a missing one just means 'no name given'."""
    if not file.is_file():
        return {}
    try:
        with file.open("rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(
            f"{str(file)!r} is not valid TOML ({exc}); fix or delete it "
            f"(it is only used for the run name)"
        ) from exc


def _read_json_object(file: Path, without: str) -> dict | None:
    """Parse summary.json or mask.json; None if absent (an interrupted run lacks the summary).

    ``without`` says what deleting a malformed file would leave, for the error message.
    """
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(
            f"{str(file)!r} is not valid JSON ({exc}); delete it {without}"
        ) from exc
    if not isinstance(data, dict):
        raise RunFolderError(
            f"{str(file)!r} must hold a JSON object, found {type(data).__name__}; "
            f"delete it {without}"
        )
    return data


def _read_metrics(file: Path, *, run_finished: bool) -> list[dict]:
    """Parse metrics.jsonl, one object per non-blank line, in file order.

    One malformed line is tolerated: the *last* line of an *interrupted* run
    when it has no trailing newline.  That is what a process killed mid-write
    leaves behind, and refusing to report such a run would defeat the purpose
    of reporting incomplete runs.  Anywhere else a bad line is an error that
    names its 1-based line number.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"{str(file)!r} is not UTF-8 text ({exc})") from exc
    lines = text.split("\n")
    rows: list[dict] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(_parse_metrics_line(line))
        except ValueError as exc:
            cut_off = lineno == len(lines) and not text.endswith("\n")
            if cut_off and not run_finished:
                warnings.warn(
                    f"{file}: ignoring truncated last line {lineno} "
                    f"(the run was interrupted while writing it)",
                    stacklevel=3,
                )
                continue
            raise RunFolderError(
                f"{str(file)!r} line {lineno}: {exc}; each line must be one JSON "
                f"object with an integer 'round' -- fix or delete that line"
            ) from exc
    return rows


def _parse_metrics_line(line: str) -> dict:
    """One metrics row; ValueError (with a short reason) if it is not usable."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, found {type(row).__name__}")
    rnd = row.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool):
        raise ValueError(f"'round' must be an integer, found {rnd!r}")
    return row


def _run_name(config: dict, folder: Path) -> str:
    """``[run] name`` from the config, else the folder name."""
    run_table = config.get("run")
    if isinstance(run_table, dict):
        name = run_table.get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    return folder.resolve().name or str(folder)


def display_names(runs: Sequence[RunRecord]) -> list[str]:
    """Unique labels for table rows and plot legends, in the order of ``runs``.

    Runs from a sweep often share ``[run] name`` (one config, many seeds), so
    colliding names get the folder name appended; if that still collides (the
    same folder name under different parents, or a folder passed twice) a
    counter makes the label unique.
    """
    counts = Counter(run.name for run in runs)
    labels = [
        f"{run.name} [{run.path.resolve().name}]"
        if counts[run.name] > 1 and run.path.resolve().name != run.name
        else run.name
        for run in runs
    ]
    seen: Counter[str] = Counter()
    totals = Counter(labels)
    unique: list[str] = []
    for label in labels:
        seen[label] += 1
        unique.append(f"{label} #{seen[label]}" if totals[label] > 1 else label)
    return unique


# ----------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStats:
    """The numbers of one table row, unformatted; None means unknown.

    Kept separate from formatting so the Markdown table and the CSV agree by
    construction, and so tests can check values rather than strings.
    """

    name: str
    path: Path
    complete: bool
    algorithm: str | None
    density: float | None
    rounds: int | None
    final_accuracy: float | None
    best_accuracy: float | None
    # The personalised protocol: mean over clients of the accuracy on each client's own test
    # split (follows its training classes); reported beside the global accuracy.
    personal_accuracy: float | None
    mb_per_round: float | None
    total_mb: float | None
    ratio_to_dense: float | None
    wall_seconds: float | None


def run_stats(run: RunRecord, name: str | None = None) -> RunStats:
    """Derive a table row; prefer summary.json, fall back to metrics.jsonl.

    summary.json is the simulator's own account (it knows e.g. the planned
    number of rounds and the dense baseline), so it wins when present; for an
    interrupted run every column that metrics.jsonl can support is rebuilt
    from it, and the rest (ratio to dense) is left unknown.  Byte columns are
    the exception: they come from metrics.jsonl first (see `_mb_per_round`).
    """
    summary = run.summary or {}
    accuracies = [a for a in (_num(r.get("accuracy")) for r in run.metrics) if a is not None]
    return RunStats(
        name=name if name is not None else run.name,
        path=run.path,
        complete=run.complete,
        algorithm=_algorithm(summary, run.config),
        density=_first_num(summary.get("density"), _config_algorithm(run.config).get("density")),
        rounds=_rounds(summary, run.metrics),
        final_accuracy=_first_num(
            summary.get("final_accuracy"), accuracies[-1] if accuracies else None
        ),
        best_accuracy=_first_num(
            summary.get("best_accuracy"), max(accuracies) if accuracies else None
        ),
        personal_accuracy=_first_num(
            summary.get("final_personal_accuracy"),
            next((_num(r.get("personal_accuracy")) for r in reversed(run.metrics)
                  if _num(r.get("personal_accuracy")) is not None), None),
        ),
        mb_per_round=_mb_per_round(summary, run.config, run.metrics),
        total_mb=_total_mb(summary, run.metrics),
        ratio_to_dense=_num(summary.get("ratio_to_dense")),
        wall_seconds=_first_num(summary.get("wall_seconds"), _round_seconds(run.metrics)),
    )


def _num(value: Any) -> float | None:
    """A finite number as float, else None (null, NaN, strings, bools...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _first_num(*values: Any) -> float | None:
    """The first value that is a finite number."""
    for value in values:
        number = _num(value)
        if number is not None:
            return number
    return None


def _config_algorithm(config: dict) -> dict:
    """The config's [algorithm] table, or {} if it is absent or not a table."""
    table = config.get("algorithm")
    return table if isinstance(table, dict) else {}


def _algorithm(summary: dict, config: dict) -> str | None:
    """summary.algorithm, else ``[algorithm] name`` from the config."""
    for value in (summary.get("algorithm"), _config_algorithm(config).get("name")):
        if isinstance(value, str) and value:
            return value
    return None


def _rounds(summary: dict, metrics: list[dict]) -> int | None:
    """Rounds run: summary.rounds, else the last completed round number."""
    value = _num(summary.get("rounds"))
    if value is not None:
        return int(value)
    return max((int(r["round"]) for r in metrics), default=None)


def _sum_key(metrics: list[dict], key: str) -> float | None:
    """Sum of a numeric per-round key, or None if no row has it."""
    values = [v for v in (_num(r.get(key)) for r in metrics) if v is not None]
    return sum(values) if values else None


def _round_seconds(metrics: list[dict]) -> float | None:
    """Wall time of the completed rounds, for runs without summary.wall_seconds.

    The simulator times evaluation separately (``eval_seconds``) from the
    round's ``seconds``, so both are added; one-time setup is not in the rows.
    """
    seconds = _sum_key(metrics, "seconds")
    if seconds is None:
        return None
    return seconds + (_sum_key(metrics, "eval_seconds") or 0.0)


def _mb_per_round(summary: dict, config: dict, metrics: list[dict]) -> float | None:
    """MB the server moves per round, down + up over all sampled clients.

    Measured: the mean of ``bytes_down + bytes_up`` over the rows of
    metrics.jsonl (these never include one-time costs, which only enter
    ``bytes_cumulative``), so that Total MB = one-time + rounds x this.
    summary.bytes_per_round is *per client*, so it is only a fallback, scaled
    by ``[federation] clients_per_round``, for rows that lack the byte counts.
    """
    totals = [
        down + up
        for down, up in ((_num(r.get("bytes_down")), _num(r.get("bytes_up"))) for r in metrics)
        if down is not None and up is not None
    ]
    if totals:
        return sum(totals) / len(totals) / BYTES_PER_MB
    per_client = summary.get("bytes_per_round")
    federation = config.get("federation")
    clients = _num(federation.get("clients_per_round")) if isinstance(federation, dict) else None
    if not isinstance(per_client, dict) or clients is None:
        return None
    down, up = _num(per_client.get("down")), _num(per_client.get("up"))
    if down is None or up is None:
        return None
    return clients * (down + up) / BYTES_PER_MB


def _total_mb(summary: dict, metrics: list[dict]) -> float | None:
    """All bytes moved, one-time costs (score upload, mask broadcast) included.

    The last ``bytes_cumulative`` covers exactly the rounds that ran, so it is
    right for interrupted runs too; summary.total_bytes (written by the
    simulator, not required by the format) is the fallback.
    """
    cumulative = [c for c in (_num(r.get("bytes_cumulative")) for r in metrics) if c is not None]
    if cumulative:
        return cumulative[-1] / BYTES_PER_MB
    total = _num(summary.get("total_bytes"))
    return None if total is None else total / BYTES_PER_MB


# ----------------------------------------------------------------------------
# Table / CSV
# ----------------------------------------------------------------------------

TABLE_HEADER = (
    "Run",
    "Algorithm",
    "Density",
    "Rounds",
    "Final acc (%)",
    "Best acc (%)",
    "Personal acc (%)",
    "MB/round (down+up)",
    "Total MB (incl. one-time)",
    "Ratio to dense (per round)",
    "Wall time",
)


def summary_table(runs: Sequence[RunRecord]) -> str:
    """A Markdown table, one row per run, plus a footnote if any run is incomplete.

    Unknown values print as an em dash rather than 0 or nan, so a missing
    number is never mistaken for a measured one.
    """
    stats = [run_stats(run, label) for run, label in zip(runs, display_names(runs))]
    rows = [TABLE_HEADER, *(_table_row(s) for s in stats)]
    lines = [
        _md_row(rows[0]),
        "|" + "|".join(" ---: " if i >= 2 else " --- " for i in range(len(TABLE_HEADER))) + "|",
        *(_md_row(row) for row in rows[1:]),
    ]
    if any(not s.complete for s in stats):
        lines += [
            "",
            f"Runs marked {INCOMPLETE_MARK} have no {SUMMARY_FILE}: they were "
            f"interrupted, their figures come from the rounds in {METRICS_FILE}, "
            f"and their ratio to dense is unknown.",
        ]
    return "\n".join(lines) + "\n"


def _table_row(s: RunStats) -> tuple[str, ...]:
    """Format one RunStats for the Markdown table."""
    return (
        s.name if s.complete else f"{s.name} {INCOMPLETE_MARK}",
        s.algorithm or UNKNOWN,
        _fmt(s.density, "{:.3g}"),  # achieved density, e.g. 0.100003 -> 0.1
        UNKNOWN if s.rounds is None else str(s.rounds),
        _fmt(None if s.final_accuracy is None else 100 * s.final_accuracy, "{:.2f}"),
        _fmt(None if s.best_accuracy is None else 100 * s.best_accuracy, "{:.2f}"),
        _fmt(None if s.personal_accuracy is None else 100 * s.personal_accuracy, "{:.2f}"),
        _fmt_mb(s.mb_per_round),
        _fmt_mb(s.total_mb),
        _fmt(s.ratio_to_dense, "{:.3f}"),
        _fmt_duration(s.wall_seconds),
    )


def _md_row(cells: Sequence[str]) -> str:
    """One Markdown table line; pipes in run names must not split the cell."""
    return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"


def _fmt(value: float | None, spec: str) -> str:
    return UNKNOWN if value is None else spec.format(value)


def _fmt_mb(mb: float | None) -> str:
    """Two decimals for >= 1 MB, three significant digits below.

    Sparse runs of small models move kilobytes per round; fixed decimals would
    print them as 0.00 and hide exactly the difference the table is for.
    """
    if mb is None:
        return UNKNOWN
    return f"{mb:,.2f}" if mb >= 1 else f"{mb:.3g}"


def _fmt_duration(seconds: float | None) -> str:
    """Human wall time: '42.0 s', '3m 05s', '2h 07m'."""
    if seconds is None:
        return UNKNOWN
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


CSV_FIELDS = (
    "name",
    "path",
    "complete",
    "algorithm",
    "density",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "personal_accuracy",
    "mb_per_round",
    "total_mb",
    "ratio_to_dense",
    "wall_seconds",
)


def summary_csv(runs: Sequence[RunRecord]) -> str:
    """The same rows as `summary_table`, unrounded, for spreadsheets/pandas.

    Accuracies stay fractions in [0, 1] (as in the run files); unknowns are
    empty cells, which pandas reads as NaN.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for run, label in zip(runs, display_names(runs)):
        s = run_stats(run, label)
        values = {
            **{f: getattr(s, f) for f in CSV_FIELDS},
            "path": str(s.path),
            "complete": str(s.complete).lower(),
        }
        writer.writerow(["" if values[f] is None else values[f] for f in CSV_FIELDS])
    return buffer.getvalue()


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSeries:
    """What one plotted line shows: evaluated rounds only.

    ``rounds`` / ``accuracy_pct`` feed accuracy-vs-round; ``mb`` /
    ``mb_accuracy_pct`` feed accuracy-vs-bytes (a separate y list because a
    row may lack ``bytes_cumulative`` while still having an accuracy).
    """

    label: str
    rounds: list[int]
    accuracy_pct: list[float]
    mb: list[float]
    mb_accuracy_pct: list[float]


def run_series(runs: Sequence[RunRecord]) -> list[RunSeries]:
    """The x/y data for each run, in order, skipping rounds without evaluation."""
    series = []
    for run, label in zip(runs, display_names(runs)):
        rounds, acc, mb, mb_acc = [], [], [], []
        for row in run.metrics:
            accuracy = _num(row.get("accuracy"))
            if accuracy is None:
                continue
            rounds.append(int(row["round"]))
            acc.append(100 * accuracy)
            cumulative = _num(row.get("bytes_cumulative"))
            if cumulative is not None:
                mb.append(cumulative / BYTES_PER_MB)
                mb_acc.append(100 * accuracy)
        series.append(RunSeries(label, rounds, acc, mb, mb_acc))
    return series



# ----------------------------------------------------------------------------
# Seed groups
# ----------------------------------------------------------------------------

#: Config keys that name, place or pace a run without changing what it computes: runs whose
#: configs differ only in these (and the seed) are one experiment repeated over seeds.
NOT_THE_SETTING = frozenset({
    "run.name", "run.seed", "run.out_dir", "run.threads", "run.device", "run.progress",
    "run.checkpoint_every", "data.root", "data.download",
})


@dataclass(frozen=True)
class RunGroup:
    """Runs that differ only in their seed: one line (the mean, +- std band) in the figures.

    A run without ``config.toml`` is a group of its own (nothing says what else it shares with
    the others), and so are runs of one setting that repeat a seed (a rerun, or a folder passed
    twice: they are not a sample over seeds).
    """

    label: str
    algorithm: str | None
    #: the table's density (achieved, else the configured one), mean over the runs; 1 for FedAvg
    density: float | None
    runs: tuple[RunRecord, ...]
    #: the runs' labels in the per-run table (`display_names`)
    names: tuple[str, ...]
    seeds: tuple[int | None, ...] = field(default=())

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def style(self) -> MethodStyle:
        """The method's colour and marker (`ssfl.plotstyle.method_style`)."""
        return method_style(self.algorithm)


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _setting(run: RunRecord) -> dict[str, Any] | None:
    """The config's keys that change results (flattened); None when there is no config.toml."""
    if not run.config:
        return None
    return {k: v for k, v in _flatten(run.config).items() if k not in NOT_THE_SETTING}


def _seed(run: RunRecord) -> int | None:
    """``[run] seed`` from the config, else summary.seed."""
    run_table = run.config.get("run")
    for value in (run_table.get("seed") if isinstance(run_table, dict) else None,
                  (run.summary or {}).get("seed")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def group_runs(runs: Sequence[RunRecord]) -> list[RunGroup]:
    """Runs grouped by setting (everything but the seed), in order of first appearance."""
    names = display_names(runs)
    stats = [run_stats(run, name) for run, name in zip(runs, names)]
    settings = [_setting(run) for run in runs]
    buckets: list[list[int]] = []
    for i, setting in enumerate(settings):
        home = next((b for b in buckets if setting is not None
                     and stats[b[0]].algorithm == stats[i].algorithm
                     and _same_setting(settings[b[0]], setting)), None)
        if home is None:
            buckets.append([i])
        else:
            home.append(i)
    members: list[list[int]] = []
    for indices in buckets:
        seeds = [_seed(runs[i]) for i in indices]
        if len(indices) > 1 and (None in seeds or len(set(seeds)) < len(seeds)):
            members.extend([i] for i in indices)
        else:
            members.append(indices)
    members.sort(key=lambda indices: indices[0])
    labels = _group_labels(runs, stats, members)
    groups = []
    for indices, label in zip(members, labels):
        algorithm = stats[indices[0]].algorithm
        densities = [d for d in (stats[i].density for i in indices) if d is not None]
        density = 1.0 if algorithm == "fedavg" else (
            statistics.fmean(densities) if densities else None)
        groups.append(RunGroup(
            label=label, algorithm=algorithm, density=density,
            runs=tuple(runs[i] for i in indices), names=tuple(names[i] for i in indices),
            seeds=tuple(_seed(runs[i]) for i in indices)))
    return groups


def _same_setting(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal on every key both configs have: a key only one of them has was added to ssfl
    after the other run was made, which ran with that key's default."""
    if a is None or b is None:
        return False
    return all(_canonical(a[k]) == _canonical(b[k]) for k in a.keys() & b.keys())


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _group_labels(runs: Sequence[RunRecord], stats: Sequence[RunStats],
                  members: Sequence[Sequence[int]]) -> list[str]:
    """"SSFL d=0.1", plus what tells apart groups of the same method and density (the config
    keys where they differ, else the run's name), the number of seeds, and "incomplete"."""
    def base(indices: Sequence[int]) -> str:
        s = stats[indices[0]]
        densities = [d for d in (stats[i].density for i in indices) if d is not None]
        density = 1.0 if s.algorithm == "fedavg" else (
            statistics.fmean(densities) if densities else None)
        return f"{method_style(s.algorithm).label} {density_label(density)}"

    bases = [base(m) for m in members]
    counts = Counter(bases)
    extras: list[list[str]] = [[] for _ in members]
    for label in (b for b, c in counts.items() if c > 1):
        same = [k for k, b in enumerate(bases) if b == label]
        settings = [_setting(runs[members[k][0]]) or {} for k in same]
        # keys every one of them has (a key missing from an older run's config is no
        # difference, see `_same_setting`) on which they disagree, at most two in a legend
        common = set.intersection(*(set(st) for st in settings)) if settings else set()
        differ = [key for key in sorted(common - {"algorithm.name", "algorithm.density"})
                  if len({_canonical(st[key]) for st in settings}) > 1]
        for k, st in zip(same, settings):
            extras[k] = [f"{key}={_short(st.get(key))}" for key in differ[:2]]
        # the same setting twice (a repeated seed), or no config to compare: name the run
        shown = Counter(tuple(extras[k]) for k in same)
        for k in same:
            if shown[tuple(extras[k])] > 1:
                extras[k].append(stats[members[k][0]].name)
    labels = []
    for k, indices in enumerate(members):
        parts = list(extras[k])
        if len(indices) > 1:
            parts.append(f"n={len(indices)}")
        if any(not runs[i].complete for i in indices):
            parts.append("incomplete")
        labels.append(bases[k] + (f" ({'; '.join(parts)})" if parts else ""))
    seen: Counter[str] = Counter()
    totals = Counter(labels)
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(f"{label} #{seen[label]}" if totals[label] > 1 else label)
    return unique


def _short(value: Any) -> str:
    """A config value for a legend: ``0.05``, ``mean``, ``-`` for a missing key."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


GROUP_HEADER = (
    "Group",
    "Runs",
    "Seeds",
    "Final acc (%)",
    "Best acc (%)",
    "Personal acc (%)",
    "MB/round (down+up)",
    "Total MB (incl. one-time)",
    "Wall time (mean)",
)


def group_table(runs: Sequence[RunRecord]) -> str:
    """A Markdown table, one row per seed group: mean +- sample standard deviation over its
    runs (over those that have the figure), the plain value for a group of one."""
    lines = [
        _md_row(GROUP_HEADER),
        "|" + "|".join(" ---: " if i >= 1 else " --- " for i in range(len(GROUP_HEADER))) + "|",
    ]
    lines += [_md_row(row) for row in _group_rows(runs)]
    return "\n".join(lines) + "\n"


def _group_rows(runs: Sequence[RunRecord]) -> list[tuple[str, ...]]:
    rows = []
    for group in group_runs(runs):
        stats = [run_stats(run, name) for run, name in zip(group.runs, group.names)]

        def col(attr: str, scale: float = 1.0, spec: str = "{:.2f}") -> str:
            values = [scale * v for v in (getattr(s, attr) for s in stats) if v is not None]
            if not values:
                return UNKNOWN
            if len(values) == 1:
                return spec.format(values[0])
            mean, std = statistics.fmean(values), statistics.stdev(values)
            return f"{spec.format(mean)} ± {spec.format(std)}"

        seeds = ", ".join(UNKNOWN if s is None else str(s) for s in group.seeds)
        walls = [s.wall_seconds for s in stats if s.wall_seconds is not None]
        rows.append((
            group.label,
            str(group.n),
            seeds,
            col("final_accuracy", 100),
            col("best_accuracy", 100),
            col("personal_accuracy", 100),
            col("mb_per_round", 1, _mb_spec(stats, "mb_per_round")),
            col("total_mb", 1, _mb_spec(stats, "total_mb")),
            _fmt_duration(statistics.fmean(walls) if walls else None),
        ))
    return rows


def _mb_spec(stats: Sequence[RunStats], attr: str) -> str:
    """The per-run table's MB format (`_fmt_mb`) for a group's mean and std: two decimals from
    1 MB, three significant digits below."""
    values = [v for v in (getattr(s, attr) for s in stats) if v is not None]
    return "{:,.2f}" if values and statistics.fmean(values) >= 1 else "{:.3g}"


def _has_seed_groups(runs: Sequence[RunRecord]) -> bool:
    return any(g.n > 1 for g in group_runs(runs))


# ----------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------

#: Each figure's title (also its caption and alt text in report.html).
FIGURE_TITLES = {
    ACCURACY_VS_ROUND: "Global test accuracy per round",
    TRAIN_LOSS_VS_ROUND: "Training loss per round",
    PERSONAL_ACCURACY_VS_ROUND: "Personalised accuracy per round (each client on its own test "
                                "split)",
    ACCURACY_VS_BYTES: "Test accuracy against cumulative communication",
    LAYER_DENSITY: "Per-layer density of the final mask",
}

_EXTRA_LINESTYLES = ("--", "-.", ":", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1, 1, 1)))
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo")


def setting_text(runs: Sequence[RunRecord]) -> str:
    """What the runs were trained on, for figure titles: "CIFAR-10, small CNN, 100 clients
    (10 per round), balanced Dirichlet α=0.3"; the parts the runs disagree on list every value
    (data set, model) or are left out (federation, split)."""
    def values(summary_key: str | None, section: str, key: str) -> list[Any]:
        found: list[Any] = []
        for run in runs:
            table = run.config.get(section)
            value = (run.summary or {}).get(summary_key) if summary_key else None
            if value is None and isinstance(table, dict):
                value = table.get(key)
            if value is not None and value not in found:
                found.append(value)
        return found

    datasets = values("dataset", "data", "dataset")
    model_names = values("model", "model", "name")
    parts = []
    if datasets:
        parts.append(" / ".join(dataset_label(str(d)) for d in datasets))
    if model_names:
        parts.append(" / ".join(model_label(str(m)) for m in model_names))
    clients = values(None, "federation", "num_clients")
    per_round = values(None, "federation", "clients_per_round")
    if len(clients) == 1 and len(per_round) == 1:
        parts.append(f"{clients[0]} clients ({per_round[0]} per round)")
    splits = {_split_label(run.config) for run in runs}
    if len(splits) == 1 and None not in splits:
        parts.append(splits.pop())
    return ", ".join(parts) if parts else "data set and model not recorded"


def _split_label(config: dict) -> str | None:
    data = config.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("partition"), str):
        return None
    partition, alpha = data["partition"], _num(data.get("alpha"))
    if partition in ("balanced_dirichlet", "dirichlet") and alpha is not None:
        kind = "balanced Dirichlet" if partition == "balanced_dirichlet" else "Dirichlet"
        return f"{kind} α={alpha:g}"
    if partition == "pathological" and _num(data.get("classes_per_client")) is not None:
        return f"{data['classes_per_client']} classes per client"
    return "IID" if partition == "iid" else partition


def _group_curve(group: RunGroup, key: str, scale: float,
                 by_bytes: bool = False) -> tuple[list[float], list[float], list[float]]:
    """x, mean y and std y (0 for one value) per round, over the group's runs that have ``key``
    at that round; x is the round, or with ``by_bytes`` the mean cumulative MB at that round."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for run in group.runs:
        for row in run.metrics:
            y = _num(row.get(key))
            if y is None:
                continue
            x: float | None = float(row["round"])
            if by_bytes:
                cumulative = _num(row.get("bytes_cumulative"))
                x = None if cumulative is None else cumulative / BYTES_PER_MB
            if x is not None:
                by_round.setdefault(int(row["round"]), []).append((x, scale * y))
    xs, means, stds = [], [], []
    for rnd in sorted(by_round):
        points = by_round[rnd]
        ys = [p[1] for p in points]
        xs.append(statistics.fmean(p[0] for p in points))
        means.append(statistics.fmean(ys))
        stds.append(statistics.stdev(ys) if len(ys) > 1 else 0.0)
    return xs, means, stds


def _variants(groups: Sequence[RunGroup]) -> list[int]:
    """Per group, its rank among the groups of the same method (densest first): the first
    draws in the method's own line style, the others in other dash patterns / hatches."""
    order = sorted(range(len(groups)),
                   key=lambda k: (groups[k].algorithm or "", -(groups[k].density or 0.0), k))
    rank: dict[int, int] = {}
    seen: Counter[str | None] = Counter()
    for k in order:
        rank[k] = seen[groups[k].algorithm]
        seen[groups[k].algorithm] += 1
    return [rank[k] for k in range(len(groups))]


def _linestyle(group: RunGroup, variant: int) -> Any:
    if variant == 0:
        return group.style.linestyle
    others = [ls for ls in _EXTRA_LINESTYLES if ls != group.style.linestyle]
    return others[(variant - 1) % len(others)]


def _new_figure(width: float = 9.0, height: float = 4.8) -> "Figure":
    """A Figure on the Agg canvas, never pyplot: no backend switch in a user's notebook, and
    nothing registered in pyplot's global figure list, so repeated calls do not leak figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _titles(fig: "Figure", title: str, setting: str) -> None:
    """The figure's title over its whole width (an axes title beside a wide legend would be
    cut off): what it shows, then what the runs were trained on."""
    fig.suptitle(f"{title}\n{textwrap.fill(setting, 110)}", fontsize="large", linespacing=1.4)


def _legend_label(group: RunGroup) -> str:
    """The group's label, wrapped so that a long one cannot squeeze the axes."""
    return textwrap.fill(group.label, 48, break_long_words=False, break_on_hyphens=False)


def _legend(ax: Any, groups: Sequence[RunGroup]) -> None:
    """Beside the axes (it never hides a curve); one column per 18 entries."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    title = "mean ± std over seeds" if any(g.n > 1 for g in groups) else None
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False,
              title=title, title_fontsize="small", ncols=max(1, math.ceil(len(handles) / 18)))


def _curve_figure(groups: Sequence[RunGroup], setting: str, *, title: str, key: str,
                  scale: float, ylabel: str, by_bytes: bool = False) -> "Figure":
    """One line per group with data (groups without any get none), a +- std band for groups of
    several seeds; rounds on integer ticks; bytes on a log axis once they span over 10x."""
    from matplotlib.ticker import FuncFormatter

    fig = _new_figure()
    ax = fig.add_subplot()
    drawn_x: list[float] = []
    for group, variant in zip(groups, _variants(groups)):
        xs, means, stds = _group_curve(group, key, scale, by_bytes)
        if not xs:
            continue
        style = group.style
        ax.plot(xs, means, color=style.color, marker=style.marker,
                linestyle=_linestyle(group, variant), linewidth=1.6, markersize=5,
                markevery=max(1, len(xs) // 15), label=_legend_label(group))
        if group.n > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=style.color,
                            alpha=0.18, linewidth=0, label="_band")
        drawn_x += xs
    if drawn_x:
        if by_bytes:
            lo, hi = min(drawn_x), max(drawn_x)
            if lo > 0 and hi > 10 * lo:
                # a sparse run beside a dense one would otherwise be squashed against the axis
                ax.set_xscale("log")
                log_ticks(ax.xaxis, lo, hi)
            else:
                ax.xaxis.set_major_formatter(FuncFormatter(plain_number))
        else:
            integer_ticks(ax.xaxis)
        _legend(ax, groups)
    else:
        ax.text(0.5, 0.5, "no evaluated rounds", ha="center", va="center",
                transform=ax.transAxes)
        if not by_bytes:
            integer_ticks(ax.xaxis)
    ax.set_xlabel("Cumulative communication, down + up incl. one-time (MB" +
                  (", log scale)" if ax.get_xscale() == "log" else ")") if by_bytes else "Round")
    ax.set_ylabel(ylabel)
    _titles(fig, title, setting)
    ax.grid(True, alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    return fig


def _final_per_layer(run: RunRecord) -> dict[str, float]:
    """mask.json's per-layer densities of the final mask (the set-up one for an interrupted
    run, whose mask.json has no "final" yet); {} without mask.json."""
    if not run.mask:
        return {}
    table = run.mask.get("final") if isinstance(run.mask.get("final"), dict) else run.mask
    per_layer = table.get("per_layer")
    if not isinstance(per_layer, dict):
        return {}
    return {str(k): v for k, v in ((k, _num(v)) for k, v in per_layer.items()) if v is not None}


def _layer_density_figure(groups: Sequence[RunGroup], setting: str) -> "Figure | None":
    """Grouped bars: per layer, the density each group's final mask keeps (mean over seeds, with
    a std error bar); None when no run has a mask.json."""
    bars = []
    layers: list[str] = []
    for group, variant in zip(groups, _variants(groups)):
        per_run = [p for p in (_final_per_layer(r) for r in group.runs) if p]
        if not per_run:
            continue
        for p in per_run:
            layers += [name for name in p if name not in layers]
        means = {name: statistics.fmean(vals) for name in layers
                 if (vals := [p[name] for p in per_run if name in p])}
        stds = {name: statistics.stdev(vals) if len(vals) > 1 else 0.0 for name in layers
                if (vals := [p[name] for p in per_run if name in p])}
        bars.append((group, variant, means, stds, len(per_run)))
    if not bars:
        return None
    width = 0.8 / len(bars)
    fig = _new_figure(width=min(18.0, max(9.0, 3.0 + 0.12 * len(layers) * len(bars))))
    ax = fig.add_subplot()
    for k, (group, variant, means, stds, n) in enumerate(bars):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(layers))]
        ax.bar(xs, [means.get(name, math.nan) for name in layers], width,
               yerr=[stds.get(name, 0.0) for name in layers] if n > 1 else None,
               color=group.style.color, hatch=_HATCHES[variant % len(_HATCHES)],
               edgecolor="0.15", linewidth=0.4, error_kw={"elinewidth": 0.8},
               label=_legend_label(group))
    short = [name.removesuffix(".weight") for name in layers]
    rotate = len(layers) > 5 or max(len(s) for s in short) > 10
    ax.set_xticks(range(len(layers)), short, rotation=45 if rotate else 0,
                  ha="right" if rotate else "center", fontsize="small")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("Layer (prunable weights)")
    ax.set_ylabel("Fraction of weights kept")
    _titles(fig, FIGURE_TITLES[LAYER_DENSITY], setting)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, [b[0] for b in bars])
    return fig


def build_figures(runs: Sequence[RunRecord]) -> dict[str, "Figure"]:
    """The report's figures, keyed by file stem, in report order, not yet saved.

    Separate from `plot_runs` so notebooks can restyle them and tests can inspect what was
    drawn (e.g. count lines) without decoding images.  The personalised-accuracy figure is
    drawn only when some run recorded ``personal_accuracy``, the per-layer density figure only
    when some run has a ``mask.json``.
    """
    groups = group_runs(runs)
    setting = setting_text(runs)
    figures = {
        ACCURACY_VS_ROUND: _curve_figure(
            groups, setting, title=FIGURE_TITLES[ACCURACY_VS_ROUND], key="accuracy", scale=100,
            ylabel="Test accuracy (%)"),
        TRAIN_LOSS_VS_ROUND: _curve_figure(
            groups, setting, title=FIGURE_TITLES[TRAIN_LOSS_VS_ROUND], key="train_loss",
            scale=1, ylabel="Training loss"),
    }
    if any(_num(row.get("personal_accuracy")) is not None for run in runs for row in run.metrics):
        figures[PERSONAL_ACCURACY_VS_ROUND] = _curve_figure(
            groups, setting, title=FIGURE_TITLES[PERSONAL_ACCURACY_VS_ROUND],
            key="personal_accuracy", scale=100, ylabel="Personalised accuracy (%)")
    figures[ACCURACY_VS_BYTES] = _curve_figure(
        groups, setting, title=FIGURE_TITLES[ACCURACY_VS_BYTES], key="accuracy", scale=100,
        ylabel="Test accuracy (%)", by_bytes=True)
    layer_figure = _layer_density_figure(groups, setting)
    if layer_figure is not None:
        figures[LAYER_DENSITY] = layer_figure
    return figures


def plot_runs(runs: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Write every figure as PNG and SVG (``STEM.png``, ``STEM.svg``); return their paths.

    Rendered on the Agg canvas (see `_new_figure`), so this works headless and never touches
    the session's pyplot backend.  The SVGs keep text as paths (they look the same without the
    fonts) and carry no date, so the same runs give the same files.
    """
    import matplotlib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "ssfl-report", "svg.fonttype": "path"}):
        for stem, fig in build_figures(runs).items():
            for fmt in FIGURE_FORMATS:
                path = out_dir / f"{stem}.{fmt}"
                fig.savefig(path, dpi=150, metadata={"Date": None} if fmt == "svg" else None)
                paths.append(path)
    return paths


# ----------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1a1a1a;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } .setting { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.note { color: #555; font-size: 0.9em; }
figure { margin: 1.5em 0; } figure img { width: 100%; height: auto; display: block; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; }
.broken { color: #b00; font-weight: bold; }
"""

#: Marks the page once it has loaded: how many figures rendered, where each one is drawn, the
#: page's height (what a headless browser check reads back), and a visible warning under a
#: figure that did not render (a viewer that blocks data: images, a truncated file).
_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("figure.report-figure img");
  var ok = 0;
  images.forEach(function (img) {
    var box = img.getBoundingClientRect();
    img.setAttribute("data-box", [box.left + window.scrollX, box.top + window.scrollY,
                                  box.width, box.height].map(Math.round).join(","));
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var p = document.createElement("p");
    p.className = "broken";
    p.textContent = "This figure did not render; open the image file of the same name.";
    img.parentNode.appendChild(p);
  });
  var root = document.documentElement;
  root.setAttribute("data-figures-rendered", ok + "/" + images.length);
  root.setAttribute("data-page-height", Math.ceil(root.scrollHeight));
});
"""


def report_html(runs: Sequence[RunRecord], figures: Sequence[Path] = ()) -> str:
    """``report.html``: the tables and every figure in one file that needs nothing else.

    Figures are embedded as base64 ``data:`` images -- the SVG of a stem when ``figures`` holds
    one, else its PNG -- and the page's Content-Security-Policy forbids loading anything that is
    not in the file, so it opens the same offline, from an e-mail or a CI artefact.
    """
    setting = setting_text(runs)
    names = display_names(runs)
    stats = [run_stats(run, name) for run, name in zip(runs, names)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ssfl report: {html.escape(setting)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<h1>ssfl report</h1>",
        f'<p class="setting">{html.escape(setting)}; {len(runs)} run'
        f'{"s" if len(runs) != 1 else ""}. MB = 10<sup>6</sup> bytes.</p>',
        '<h2 id="runs">Runs</h2>',
        _html_table("runs-table", TABLE_HEADER, [_table_row(s) for s in stats], first_text=2),
    ]
    grouped = _has_seed_groups(runs)
    if any(not s.complete for s in stats):
        parts.append(f'<p class="note">Runs marked {INCOMPLETE_MARK} have no {SUMMARY_FILE}: '
                     f"they were interrupted, their figures come from the rounds in "
                     f"{METRICS_FILE}, and their ratio to dense is unknown.</p>")
    if grouped:
        parts += ['<h2 id="seeds">Mean ± std over seeds</h2>',
                  '<p class="note">Runs whose configs differ only in the seed; standard '
                  "deviation over the runs (sample, n - 1).</p>",
                  _html_table("groups-table", GROUP_HEADER, _group_rows(runs), first_text=1)]
    by_stem: dict[str, Path] = {}
    for path in figures:
        if path.suffix == ".svg" or (path.suffix == ".png" and path.stem not in by_stem):
            by_stem[path.stem] = path
    if by_stem:
        parts.append('<h2 id="figures">Figures</h2>')
    for stem, path in by_stem.items():
        mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = FIGURE_TITLES.get(stem, stem.replace("_", " "))
        notes = [path.name]
        if stem == LAYER_DENSITY:
            notes.append("for methods with per-client masks, the union of the clients' masks")
        if grouped:
            notes.append("error bars: ± one standard deviation over seeds" if stem == LAYER_DENSITY
                         else "lines: mean over seeds, bands: ± one standard deviation")
        parts.append(
            f'<figure class="report-figure" id="{html.escape(stem)}">'
            f'<img alt="{html.escape(caption)}" src="data:{mime};base64,{data}">'
            f"<figcaption>{html.escape(caption)} ({html.escape('; '.join(notes))})"
            f"</figcaption></figure>")
    parts += [f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _html_table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]], *,
                first_text: int) -> str:
    """An HTML table; columns from ``first_text`` on are numbers (right-aligned)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{html.escape(c)}</td>' if i >= first_text
            else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def report(
    run_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Load runs; write the figures (PNG + SVG), summary.md, summary.csv and report.html;
    return the tables (per run, then mean +- std over seeds when some runs differ only in it).

    All folders are loaded before anything is written, so a bad folder fails
    the whole call without leaving a half-written report behind.  Default
    output: ``./ssfl-report`` (see `DEFAULT_REPORT_DIR` for why not next to
    the runs).
    """
    if not run_paths:
        raise RunFolderError("no run folders given; pass one or more `ssfl run` output folders")
    runs = [load_run(p) for p in run_paths]
    target = Path(out_dir) if out_dir is not None else Path.cwd() / DEFAULT_REPORT_DIR
    target.mkdir(parents=True, exist_ok=True)
    tables = summary_table(runs)
    if _has_seed_groups(runs):
        tables += "\nMean ± std over seeds (runs whose configs differ only in the seed):\n\n"
        tables += group_table(runs)
    plots = plot_runs(runs, target)
    (target / "summary.md").write_text(_markdown_document(tables, plots), encoding="utf-8")
    (target / "summary.csv").write_text(summary_csv(runs), encoding="utf-8")
    (target / HTML_FILE).write_text(report_html(runs, plots), encoding="utf-8")
    return tables


def _markdown_document(tables: str, plots: Sequence[Path]) -> str:
    """summary.md: the tables followed by the PNG figures, linked relatively so the folder can
    be moved or attached to a PR as a whole."""
    images = "\n".join(f"![{FIGURE_TITLES.get(p.stem, p.stem.replace('_', ' '))}]({p.name})"
                       for p in plots if p.suffix == ".png")
    vector = (f"\nEvery figure is also an SVG of the same name; {HTML_FILE} holds the tables and "
              f"all figures in one self-contained page.\n" if plots else "")
    return f"# ssfl report\n\n{tables}\n{images}\n{vector}"
