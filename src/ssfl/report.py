"""Summaries and plots for finished (or interrupted) `ssfl run` folders.

The point of sparse federated learning is a trade-off: accuracy against bytes
on the wire.  This module turns run folders into the two views that make that
trade-off visible -- a Markdown/CSV table and accuracy-vs-round /
accuracy-vs-bytes plots -- without importing torch or any of the training code,
so a report can be built on a laptop from folders copied off a GPU machine.

A run folder holds ``config.toml``, ``metrics.jsonl`` (one JSON object per
completed round) and, once the run finished, ``summary.json``.  A folder
without ``summary.json`` is an interrupted run: it is still reported, from what
``metrics.jsonl`` holds, and flagged as incomplete.

Units: MB means 10**6 bytes (what network tools and papers usually quote).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tomllib
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # matplotlib is imported lazily: loading runs must not need it
    from matplotlib.figure import Figure

__all__ = [
    "RunFolderError",
    "RunRecord",
    "RunStats",
    "RunSeries",
    "load_run",
    "display_names",
    "run_stats",
    "run_series",
    "build_figures",
    "summary_table",
    "summary_csv",
    "plot_runs",
    "report",
    "DEFAULT_REPORT_DIR",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

#: Where `report` writes when no output folder is given, relative to the
#: current directory.  Deliberately *not* next to the run folders: a report
#: folder inside ``runs/`` would be picked up by ``ssfl report runs/*`` next time.
DEFAULT_REPORT_DIR = "ssfl-report"

ACCURACY_VS_ROUND_PNG = "accuracy_vs_round.png"
ACCURACY_VS_BYTES_PNG = "accuracy_vs_bytes.png"

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
    interrupted before the simulator could write it.
    """

    path: Path
    name: str
    config: dict
    metrics: list[dict]
    summary: dict | None

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
    ``config.toml`` is optional -- it only supplies the display name -- and
    ``summary.json`` is optional because interrupted runs lack it.  Files that
    exist but are malformed are always an error: silently skipping them would
    produce a report that looks right and is not.
    """
    folder = Path(path)
    _check_folder(folder)
    config = _read_config(folder / CONFIG_FILE)
    summary = _read_summary(folder / SUMMARY_FILE)
    metrics = _read_metrics(folder / METRICS_FILE, run_finished=summary is not None)
    return RunRecord(
        path=folder,
        name=_run_name(config, folder),
        config=config,
        metrics=metrics,
        summary=summary,
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


def _read_summary(file: Path) -> dict | None:
    """Parse summary.json; None if absent (interrupted run)."""
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(
            f"{str(file)!r} is not valid JSON ({exc}); delete it to report the "
            f"run from {METRICS_FILE} alone (it will be marked incomplete)"
        ) from exc
    if not isinstance(data, dict):
        raise RunFolderError(
            f"{str(file)!r} must hold a JSON object, found {type(data).__name__}; "
            f"delete it to report the run from {METRICS_FILE} alone"
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


def build_figures(runs: Sequence[RunRecord]) -> dict[str, "Figure"]:
    """The two report figures, keyed by their PNG file name, not yet saved.

    Separate from `plot_runs` so notebooks can restyle them and tests can
    inspect what was drawn (e.g. count lines) without decoding PNGs.
    """
    series = run_series(runs)
    return {
        ACCURACY_VS_ROUND_PNG: _accuracy_figure(
            [(s.label, s.rounds, s.accuracy_pct) for s in series],
            xlabel="Round",
            title="Test accuracy per round",
        ),
        ACCURACY_VS_BYTES_PNG: _accuracy_figure(
            [(s.label, s.mb, s.mb_accuracy_pct) for s in series],
            xlabel="Cumulative communication, down + up incl. one-time (MB)",
            title="Test accuracy vs. bytes communicated",
            log_x_if_wide=True,
        ),
    }


def plot_runs(runs: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Write accuracy-vs-round and accuracy-vs-bytes PNGs; return their paths.

    Figures are rendered with the Agg canvas (see `_accuracy_figure`), so
    this works headless and never touches the session's pyplot backend.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, fig in build_figures(runs).items():
        path = out_dir / filename
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def _accuracy_figure(
    lines: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    title: str,
    log_x_if_wide: bool = False,
) -> "Figure":
    """One line per non-empty series (runs never evaluated get no line).

    Built on `matplotlib.figure.Figure` + the Agg canvas rather than pyplot:
    that is the Agg backend without calling ``matplotlib.use`` (which would
    change the backend of a user's notebook), and nothing is registered in
    pyplot's global figure list, so repeated calls do not leak figures.

    With ``log_x_if_wide`` the x axis goes logarithmic when the data spans
    more than a factor of 10 -- typical when a sparse run is compared with a
    dense one, which would otherwise squash the sparse curve against the axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = [(label, x, y) for label, x, y in lines if len(x) > 0]
    for label, x, y in drawn:
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=label)
    if drawn:
        ax.legend(fontsize="small")
        xs = [v for _, x, _ in drawn for v in x]
        if log_x_if_wide and min(xs) > 0 and max(xs) > 10 * min(xs):
            ax.set_xscale("log")
            # plain numbers ("0.5", "10") instead of powers of ten: readers compare MB
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    else:
        ax.text(0.5, 0.5, "no evaluated rounds", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def report(
    run_paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Load runs, write plots + summary.md + summary.csv, return the table.

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
    table = summary_table(runs)
    plots = plot_runs(runs, target)
    (target / "summary.md").write_text(_markdown_document(table, plots), encoding="utf-8")
    (target / "summary.csv").write_text(summary_csv(runs), encoding="utf-8")
    return table


def _markdown_document(table: str, plots: Sequence[Path]) -> str:
    """summary.md: the table followed by the plots, linked relatively so the
    folder can be moved or attached to a PR as a whole."""
    images = "\n".join(f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots)
    return f"# ssfl report\n\n{table}\n{images}\n"
