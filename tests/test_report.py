"""Tests for ssfl.report, on run folders written by hand.

Every expected figure below is computed by hand from the numbers in the
fixtures (1 MB = 10**6 bytes), so a change in how the report derives a column
shows up as a concrete wrong number.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ssfl.plotstyle import FALLBACK_COLORS, METHOD_STYLES, method_style
from ssfl.report import (
    RunFolderError,
    RunRecord,
    build_figures,
    display_names,
    group_runs,
    group_table,
    load_run,
    plot_runs,
    report,
    run_series,
    run_stats,
    summary_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FEDERATION = "\n[federation]\nnum_clients = 10\nclients_per_round = 2\n"


def _row(rnd, acc, down, up, cumulative, seconds, **extra):
    return {
        "round": rnd,
        "accuracy": acc,
        "test_loss": None if acc is None else 1.0 - acc,
        "train_loss": 1.5 / rnd,
        "bytes_down": down,
        "bytes_up": up,
        "bytes_cumulative": cumulative,
        "seconds": seconds,
        "lr": 0.1,
        **extra,
    }


def write_run(
    folder: Path,
    *,
    name: str | None,
    metrics: list[dict],
    summary: dict | None,
    config_extra: str = "",
) -> Path:
    folder.mkdir(parents=True)
    run_table = f'[run]\nname = "{name}"\nseed = 0\n' if name is not None else ""
    (folder / "config.toml").write_text(
        run_table + '\n[train]\nlr = 0.1\n' + config_extra, encoding="utf-8"
    )
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8"
    )
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def sparse_run(folder: Path, name: str | None = "sparse-a") -> Path:
    """Sparse run, 2 clients/round: 1.0 MB one-time (score upload + mask), then
    per round 2 x 100 kB down + 2 x 30 kB up = 0.26 MB.

    Accuracy 81.25 %, not evaluated, 78.75 %: best != final on purpose.
    """
    return write_run(
        folder,
        name=name,
        metrics=[
            _row(1, 0.8125, 200_000, 60_000, 1_260_000, 1.0, extra_key="ignored"),
            _row(2, None, 200_000, 60_000, 1_520_000, 1.5),
            _row(3, 0.7875, 200_000, 60_000, 1_780_000, 2.0),
        ],
        summary={
            "algorithm": "ssfl",
            "density": 0.1,
            "rounds": 3,
            "final_accuracy": 0.7875,
            "best_accuracy": 0.8125,
            "one_time_bytes": {"score_upload": 800_000, "mask_broadcast": 200_000},
            # per client, as the simulator writes it
            "bytes_per_round": {"down": 100_000, "up": 30_000},
            "dense_bytes_per_round": {"down": 1_000_000, "up": 1_000_000},
            "ratio_to_dense": 0.065,  # 130 kB / 2 MB
            "total_bytes": 1_780_000,
            "wall_seconds": 4.5,
        },
        config_extra=FEDERATION,
    )


def dense_run(folder: Path) -> Path:
    """Dense FedAvg baseline, 2 clients/round: 2 x 1 MB down + 2 x 1 MB up, no one-time cost."""
    return write_run(
        folder,
        name="dense",
        metrics=[
            _row(1, 0.90, 2_000_000, 2_000_000, 4_000_000, 25.0),
            _row(2, 0.92, 2_000_000, 2_000_000, 8_000_000, 25.0),
            _row(3, 0.915, 2_000_000, 2_000_000, 12_000_000, 25.0),
        ],
        summary={
            "algorithm": "fedavg",
            "density": 1.0,
            "rounds": 3,
            "final_accuracy": 0.915,
            "best_accuracy": 0.92,
            "one_time_bytes": {},
            "bytes_per_round": {"down": 1_000_000, "up": 1_000_000},
            "dense_bytes_per_round": {"down": 1_000_000, "up": 1_000_000},
            "ratio_to_dense": 1.0,
            "wall_seconds": 75.0,
        },
        config_extra=FEDERATION,
    )


def interrupted_run(folder: Path) -> Path:
    """No summary.json: stopped after round 2 of a planned longer run.

    One-time 0.5 MB; rounds move 0.12 MB and 0.13 MB (mean 0.125 MB).
    """
    return write_run(
        folder,
        name="sparse-c",
        metrics=[
            _row(1, None, 100_000, 20_000, 620_000, 2.0),
            _row(2, 0.40, 100_000, 30_000, 750_000, 2.5, eval_seconds=0.5),
        ],
        summary=None,
        config_extra=FEDERATION + '\n[algorithm]\nname = "ssfl"\ndensity = 0.05\n',
    )


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        sparse_run(tmp_path / "runs" / "a"),
        dense_run(tmp_path / "runs" / "b"),
        interrupted_run(tmp_path / "runs" / "c"),
    ]


def parse_table(table: str) -> dict[str, dict[str, str]]:
    """Markdown table -> {run cell: {header: cell}} (footnote lines ignored)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    header, rows = split[0], split[2:]
    assert all(len(r) == len(header) for r in rows), table
    return {r[0]: dict(zip(header, r)) for r in rows}


# --------------------------------------------------------------------------- table


def test_table_values_computed_by_hand(runs: list[Path]) -> None:
    table = summary_table([load_run(p) for p in runs])
    rows = parse_table(table)
    assert list(rows) == ["sparse-a", "dense", "sparse-c (incomplete)"]

    a = rows["sparse-a"]
    assert (a["Algorithm"], a["Density"], a["Rounds"]) == ("ssfl", "0.1", "3")
    assert (a["Final acc (%)"], a["Best acc (%)"]) == ("78.75", "81.25")
    assert a["MB/round (down+up)"] == "0.26"  # 200_000 + 60_000 bytes, all clients
    assert a["Total MB (incl. one-time)"] == "1.78"  # 1.0 one-time + 3 * 0.26
    assert a["Ratio to dense (per round)"] == "0.065"
    assert a["Wall time"] == "4.5 s"

    b = rows["dense"]
    assert (b["Algorithm"], b["Density"], b["Rounds"]) == ("fedavg", "1", "3")
    assert (b["Final acc (%)"], b["Best acc (%)"]) == ("91.50", "92.00")
    assert b["MB/round (down+up)"] == "4.00"
    assert b["Total MB (incl. one-time)"] == "12.00"
    assert b["Ratio to dense (per round)"] == "1.000"
    assert b["Wall time"] == "1m 15s"


def test_incomplete_run_is_reported_from_metrics_and_flagged(runs: list[Path]) -> None:
    run = load_run(runs[2])
    assert run.summary is None and not run.complete
    table = summary_table([run])
    c = parse_table(table)["sparse-c (incomplete)"]
    # algorithm/density fall back to the config's [algorithm] table
    assert (c["Algorithm"], c["Density"], c["Rounds"]) == ("ssfl", "0.05", "2")
    assert (c["Final acc (%)"], c["Best acc (%)"]) == ("40.00", "40.00")
    assert c["MB/round (down+up)"] == "0.125"  # mean of 120_000 and 130_000
    assert c["Total MB (incl. one-time)"] == "0.75"  # last bytes_cumulative
    assert c["Ratio to dense (per round)"] == "—"  # needs summary.json
    assert c["Wall time"] == "5.0 s"  # 2.0 + 2.5 s rounds + 0.5 s evaluation
    assert "interrupted" in table  # footnote explains the flag


def test_unknowns_print_as_dash(tmp_path: Path) -> None:
    folder = write_run(
        tmp_path / "bare",
        name=None,  # no [run] name -> folder name
        metrics=[{"round": 1, "train_loss": 2.0}],
        summary=None,
    )
    row = parse_table(summary_table([load_run(folder)]))["bare (incomplete)"]
    assert row["Rounds"] == "1"
    for col in ("Algorithm", "Density", "Final acc (%)", "Best acc (%)",
                "MB/round (down+up)", "Total MB (incl. one-time)", "Ratio to dense (per round)",
                "Wall time"):
        assert row[col] == "—", col


def test_run_stats_numbers(runs: list[Path]) -> None:
    s = run_stats(load_run(runs[0]))
    assert s.mb_per_round == pytest.approx(0.26)
    assert s.total_mb == pytest.approx(1.78)
    assert s.final_accuracy == pytest.approx(0.7875)


def test_bytes_fall_back_to_summary_without_metrics_bytes(tmp_path: Path) -> None:
    folder = sparse_run(tmp_path / "a")
    byte_keys = {"bytes_down", "bytes_up", "bytes_cumulative"}
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    stripped = [{k: v for k, v in json.loads(line).items() if k not in byte_keys}
                for line in lines]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    stats = run_stats(load_run(folder))
    # per-client summary figures x [federation] clients_per_round = 2 x 130 kB
    assert stats.mb_per_round == pytest.approx(0.26)
    assert stats.total_mb == pytest.approx(1.78)  # summary.total_bytes


def test_duplicate_names_disambiguated_by_folder(tmp_path: Path) -> None:
    runs = [load_run(sparse_run(tmp_path / s, name="sweep")) for s in ("seed0", "seed1")]
    assert display_names(runs) == ["sweep [seed0]", "sweep [seed1]"]
    assert list(parse_table(summary_table(runs))) == ["sweep [seed0]", "sweep [seed1]"]
    # the same folder twice still gets distinct labels
    twice = [runs[0], runs[0]]
    assert len(set(display_names(twice))) == 2


def test_pipe_in_name_does_not_break_table(tmp_path: Path) -> None:
    run = load_run(sparse_run(tmp_path / "a", name="a|b"))
    assert r"a\|b" in summary_table([run])


# --------------------------------------------------------------------------- plots


def test_series_skip_unevaluated_rounds(runs: list[Path]) -> None:
    series = run_series([load_run(p) for p in runs])
    assert [s.label for s in series] == ["sparse-a", "dense", "sparse-c"]
    a, b, c = series
    assert a.rounds == [1, 3] and a.accuracy_pct == pytest.approx([81.25, 78.75])
    assert a.mb == pytest.approx([1.26, 1.78])
    assert b.mb == pytest.approx([4.0, 8.0, 12.0])
    assert c.rounds == [2] and c.mb == pytest.approx([0.75])


def test_figures_draw_one_line_per_run(runs: list[Path]) -> None:
    loaded = [load_run(p) for p in runs]
    figures = build_figures(loaded)
    # no personal_accuracy in the rows and no mask.json: those two figures are left out
    assert list(figures) == ["accuracy_vs_round", "train_loss_vs_round", "accuracy_vs_bytes"]
    labels = ["SSFL d=0.1", "FedAvg dense", "SSFL d=0.05 (incomplete)"]
    for fig in figures.values():
        ax = fig.axes[0]
        assert [line.get_label() for line in ax.get_lines()] == labels
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
        assert len(ax.collections) == 0  # one seed per setting: no band
    by_round = figures["accuracy_vs_round"].axes[0].get_lines()[0]
    assert list(by_round.get_xdata()) == [1, 3]
    assert list(by_round.get_ydata()) == pytest.approx([81.25, 78.75])
    loss = figures["train_loss_vs_round"].axes[0].get_lines()[0]
    assert list(loss.get_ydata()) == pytest.approx([1.5, 0.75, 0.5])  # every round, 1.5 / round
    # 0.75 MB .. 12 MB spans > 10x -> log x axis
    assert figures["accuracy_vs_bytes"].axes[0].get_xscale() == "log"


def test_run_without_evaluation_gets_no_line(runs: list[Path], tmp_path: Path) -> None:
    never = write_run(tmp_path / "never", name="never",
                      metrics=[_row(1, None, 1, 1, 2, 0.1)], summary=None)
    figures = build_figures([load_run(runs[0]), load_run(never)])
    assert len(figures["accuracy_vs_round"].axes[0].get_lines()) == 1


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0


def _assert_svg(data: bytes) -> ET.Element:
    root = ET.fromstring(data)  # raises on anything that is not well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(list(root.iter())) > 50  # axes, lines, text as paths: not an empty canvas
    return root


def test_plot_runs_writes_png_and_svg(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "nested"
    paths = plot_runs([load_run(p) for p in runs], out)
    stems = ["accuracy_vs_round", "train_loss_vs_round", "accuracy_vs_bytes"]
    assert [p.name for p in paths] == [f"{s}.{ext}" for s in stems for ext in ("png", "svg")]
    for path in paths:
        assert path.parent == out
        if path.suffix == ".png":
            _assert_png(path)
        else:
            _assert_svg(path.read_bytes())
    # no date in the SVGs (the same runs give the same files)
    assert all(b"<dc:date>" not in p.read_bytes() for p in paths if p.suffix == ".svg")


# --------------------------------------------------------------------------- style


def _line_colors(fig) -> dict[str, str]:
    """Legend label -> hex colour of what is drawn for it (lines, else bars)."""
    from matplotlib.colors import to_hex
    from matplotlib.container import BarContainer

    ax = fig.axes[0]
    colors = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
              if not line.get_label().startswith("_")}
    for container in ax.containers:
        if isinstance(container, BarContainer) and not container.get_label().startswith("_"):
            colors[container.get_label()] = to_hex(container.patches[0].get_facecolor())
    return colors


def _cielab(color: str) -> tuple[float, float, float]:
    """sRGB hex -> CIELAB (D65)."""
    from matplotlib.colors import to_rgb

    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(color))
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_every_builtin_method_has_its_own_colour_and_marker() -> None:
    from ssfl import algorithms

    builtin = {n for n in algorithms.names()
               if algorithms.get(n).__module__.startswith("ssfl.algorithms.")}
    assert set(METHOD_STYLES) == builtin  # (other tests register plugins in this process)
    colors = [s.color.lower() for s in METHOD_STYLES.values()]
    assert len(set(colors)) == len(colors) == 11
    # far apart to the eye, not just different strings: CIE76 distance in CIELAB (about 2.3 is
    # the smallest visible difference; over 20 reads as another colour)
    lab = [_cielab(c) for c in colors]
    assert min(math.dist(a, b) for i, a in enumerate(lab) for b in lab[i + 1:]) > 20
    markers = [s.marker for s in METHOD_STYLES.values()]
    assert len(set(markers)) == len(markers)
    assert len({s.label for s in METHOD_STYLES.values()}) == 11
    # the same object every time it is asked for
    assert all(method_style(m) is METHOD_STYLES[m] for m in METHOD_STYLES)


def test_plugin_methods_get_a_stable_style_of_their_own() -> None:
    style = method_style("my_plugin_method")
    assert style is method_style("my_plugin_method")
    assert style.color in FALLBACK_COLORS
    assert style.color not in {s.color for s in METHOD_STYLES.values()}
    # derived from the name alone, not from Python's per-process string hash
    code = ("from ssfl.plotstyle import method_style as m; s = m('my_plugin_method'); "
            "print(s.color, s.marker)")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        assert out.split() == [style.color, style.marker]


def sweep(tmp_path: Path) -> list[RunRecord]:
    """SSFL at two densities, FedAvg, SparsyFed and a plugin method; seeds 0-2 for SSFL 0.1."""
    out = []
    for algorithm, density, seeds in (("ssfl", 0.1, (0, 1, 2)), ("ssfl", 0.5, (0,)),
                                      ("fedavg", 1.0, (0,)), ("sparsyfed", 0.1, (0,)),
                                      ("my_plugin", 0.1, (0,))):
        for seed in seeds:
            out.append(load_run(method_run(tmp_path / f"{algorithm}-{density}-{seed}",
                                           algorithm, density, seed)))
    return out


def method_run(folder: Path, algorithm: str, density: float, seed: int,
               accuracies: tuple[float, ...] | None = None, lr: float = 0.1) -> Path:
    """A finished run with a full config (as `ssfl run` writes it), per-round personal
    accuracy and a mask.json whose set-up and final masks differ."""
    accuracies = accuracies or (0.2 + seed / 100, 0.4 + seed / 100, 0.5 + density / 10)
    rows = [_row(r, a, 1000 * density, 1000 * density, 100_000 * density * r, 1.0,
                 personal_accuracy=a + 0.1) for r, a in enumerate(accuracies, start=1)]
    path = write_run(
        folder, name="ssfl", metrics=rows,
        summary={"algorithm": algorithm, "density": density, "dataset": "cifar10",
                 "model": "small_cnn", "seed": seed, "final_accuracy": accuracies[-1]},
        config_extra=(f'\n[algorithm]\nname = "{algorithm}"\ndensity = {density}\n'
                      '[data]\ndataset = "cifar10"\npartition = "balanced_dirichlet"\n'
                      'alpha = 0.3\n[model]\nname = "small_cnn"\n' + FEDERATION),
    )
    config = path / "config.toml"
    config.write_text(config.read_text().replace("seed = 0", f"seed = {seed}")
                      .replace("lr = 0.1", f"lr = {lr}"))
    (path / "mask.json").write_text(json.dumps({
        "density": density, "per_layer": {"conv1.weight": 1.0, "fc.weight": 0.0},
        "final": {"density": density, "per_layer": {"conv1.weight": min(1.0, 2 * density),
                                                    "fc.weight": density / 2 + seed / 100}},
    }))
    return path


def test_a_method_has_the_same_colour_in_every_figure(tmp_path: Path) -> None:
    runs = sweep(tmp_path)
    figures = build_figures(runs)
    assert list(figures) == ["accuracy_vs_round", "train_loss_vs_round",
                             "personal_accuracy_vs_round", "accuracy_vs_bytes", "layer_density"]
    expected = {"SSFL d=0.1 (n=3)": METHOD_STYLES["ssfl"].color,
                "SSFL d=0.5": METHOD_STYLES["ssfl"].color,
                "FedAvg dense": METHOD_STYLES["fedavg"].color,
                "SparsyFed d=0.1": METHOD_STYLES["sparsyfed"].color,
                "my_plugin d=0.1": method_style("my_plugin").color}
    for name, fig in figures.items():
        assert _line_colors(fig) == {k: v.lower() for k, v in expected.items()}, name
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend == list(expected), name
    # the same method at two densities: same colour and marker, another line style
    by_label = {line.get_label(): line for line in figures["accuracy_vs_round"].axes[0].get_lines()}
    dense_ssfl, sparse_ssfl = by_label["SSFL d=0.5"], by_label["SSFL d=0.1 (n=3)"]
    assert dense_ssfl.get_marker() == sparse_ssfl.get_marker() == METHOD_STYLES["ssfl"].marker
    assert dense_ssfl.get_linestyle() != sparse_ssfl.get_linestyle()


def test_titles_name_the_data_set_and_model(tmp_path: Path) -> None:
    for fig in build_figures(sweep(tmp_path)).values():
        text = " ".join([fig.get_suptitle(), fig.axes[0].get_title()])
        assert "CIFAR-10" in text and "small CNN" in text
        assert "balanced Dirichlet α=0.3" in text and "10 clients (2 per round)" in text


def test_round_ticks_are_integers(runs: list[Path]) -> None:
    figures = build_figures([load_run(p) for p in runs])
    for name in ("accuracy_vs_round", "train_loss_vs_round"):
        fig = figures[name]
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi]
        labels = [t.label1.get_text() for t in shown]
        assert len(labels) >= 2 and all(re.fullmatch(r"-?\d+", x) for x in labels), labels
        assert all(float(t.get_loc()).is_integer() for t in shown)


def _visible_tick_labels(ax, which: str):
    ticks = ax.xaxis.get_major_ticks() if which == "major" else ax.xaxis.get_minor_ticks()
    lo, hi = sorted(ax.get_xlim())
    return [t.label1 for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_visible()]


@pytest.mark.parametrize("span", [(0.75, 12.0), (3.0, 40_000.0), (300.0, 900.0)])
def test_log_bytes_axis_has_one_readable_set_of_labels(tmp_path: Path, span) -> None:
    lo, hi = span
    runs = [load_run(write_run(tmp_path / f"r{i}", name=f"r{i}", summary=None,
                               metrics=[_row(1, 0.5, 1, 1, mb * 1e6, 1.0)]))
            for i, mb in enumerate((lo, hi, hi / 2 if hi > 10 * lo else lo * 1.1))]
    fig = build_figures(runs)["accuracy_vs_bytes"]
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    major = [t for t in _visible_tick_labels(ax, "major") if t.get_text()]
    texts = [t.get_text() for t in major]
    assert len(texts) >= 2 and len(set(texts)) == len(texts), texts
    assert all(re.fullmatch(r"[\d,.]+", x) for x in texts), texts  # plain numbers, no 10^k
    assert not [t.get_text() for t in _visible_tick_labels(ax, "minor") if t.get_text()]
    boxes = sorted((t.get_window_extent(renderer) for t in major), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), texts  # no overlap


def test_seeds_of_one_setting_are_one_line_with_a_band(tmp_path: Path) -> None:
    accuracies = [(0.2, 0.4, 0.6), (0.3, 0.5, 0.7), (0.4, 0.6, 0.8)]
    runs = [load_run(method_run(tmp_path / f"s{seed}", "ssfl", 0.1, seed, acc))
            for seed, acc in enumerate(accuracies)]
    (group,) = group_runs(runs)
    assert group.n == 3 and group.seeds == (0, 1, 2) and group.label == "SSFL d=0.1 (n=3)"
    ax = build_figures(runs)["accuracy_vs_round"].axes[0]
    (line,) = ax.get_lines()
    assert line.get_label() == "SSFL d=0.1 (n=3)"
    assert list(line.get_ydata()) == pytest.approx([30.0, 50.0, 70.0])  # mean over seeds
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(20.0) and max(ys) == pytest.approx(80.0)  # mean +- std 10
    table = group_table(runs)
    assert "| SSFL d=0.1 (n=3) | 3 | 0, 1, 2 | 70.00 ± 10.00 |" in table


def test_only_seed_differences_group_runs(tmp_path: Path) -> None:
    runs = [load_run(method_run(tmp_path / "a", "ssfl", 0.1, 0)),
            load_run(method_run(tmp_path / "b", "ssfl", 0.1, 1, lr=0.05)),
            load_run(method_run(tmp_path / "c", "ssfl", 0.1, 0))]  # seed 0 again
    groups = group_runs(runs)
    assert [g.n for g in groups] == [1, 1, 1]  # another lr, and a repeated seed
    labels = [g.label for g in groups]
    assert len(set(labels)) == 3 and all(x.startswith("SSFL d=0.1") for x in labels)
    assert "train.lr=0.05" in labels[1]
    assert "[a]" in labels[0] and "[c]" in labels[2]  # same setting and seed: named by folder
    ax = build_figures(runs)["accuracy_vs_round"].axes[0]
    assert len(ax.get_lines()) == 3 and len(ax.collections) == 0


def test_layer_density_bars_come_from_the_final_mask(tmp_path: Path) -> None:
    runs = [load_run(method_run(tmp_path / f"s{seed}", "ssfl", 0.1, seed)) for seed in (0, 2)]
    from matplotlib.container import BarContainer

    ax = build_figures(runs)["layer_density"].axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    heights = [p.get_height() for p in bars.patches]
    # mean over the seeds of the "final" per-layer densities: 0.2, then (0.05 + 0.07) / 2
    assert heights == pytest.approx([0.2, 0.06])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "fc"]
    assert bars.errorbar is not None  # two seeds: a std error bar
    assert bars.get_label() == "SSFL d=0.1 (n=2)"


def test_interrupted_run_shows_its_set_up_mask(tmp_path: Path) -> None:
    folder = method_run(tmp_path / "cut", "ssfl", 0.1, 0)
    (folder / "summary.json").unlink()
    (folder / "mask.json").write_text(json.dumps({"per_layer": {"a.weight": 0.3}}))
    ax = build_figures([load_run(folder)])["layer_density"].axes[0]
    (bars,) = ax.containers  # one run: no error bars
    assert [p.get_height() for p in bars.patches] == pytest.approx([0.3])


def test_malformed_mask_json_is_an_error(tmp_path: Path) -> None:
    folder = method_run(tmp_path / "a", "ssfl", 0.1, 0)
    (folder / "mask.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match="mask.json.*per-layer"):
        load_run(folder)


def test_benchmark_figures_use_the_same_style_table(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/comparison.py draws the docs' figures with ssfl.plotstyle: a method has the
    report's colour in each of them, and the density axis has one set of plain labels."""
    import importlib.util

    from matplotlib.colors import to_hex
    from matplotlib.container import BarContainer

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "comparison.py"
    spec = importlib.util.spec_from_file_location("comparison_plots", bench)
    comparison = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "comparison_plots", comparison)  # for its dataclasses
    spec.loader.exec_module(comparison)
    drawn = []
    finish = comparison._finish

    def keep(fig, ax, path, **kw):
        drawn.append(fig)
        finish(fig, ax, path, **kw)

    monkeypatch.setattr(comparison, "_finish", keep)
    rows = []
    for algorithm, densities in (("fedavg", [1.0]), ("ssfl", [0.05, 0.1, 0.2, 0.5]),
                                 ("sparsyfed", [0.05, 0.1, 0.2, 0.5])):
        for d in densities:
            for seed in (0, 1):
                rows.append({"name": f"{algorithm}-{d}-{seed}", "algorithm": algorithm,
                             "target_density": d, "split": "bdir0.3", "seed": seed,
                             "final_accuracy": 0.3 + d / 10 + seed / 100,
                             "total_bytes": 1e8 * d, "curve": [[10, 0.2], [20, 0.3 + seed / 50]]})
    densities = [0.05, 0.1, 0.2, 0.5]
    comparison.plot_accuracy_vs_density(rows, densities, tmp_path / "d.png", "CIFAR-10, small CNN")
    comparison.plot_accuracy_vs_bytes(rows, densities, tmp_path / "b.png", "CIFAR-10, small CNN")
    comparison.plot_accuracy_vs_round(rows, 0.1, tmp_path / "r.png", "CIFAR-10, small CNN")
    comparison.plot_noniid(rows, ["bdir0.3"], tmp_path / "n.png", "CIFAR-10, small CNN")
    assert len(drawn) == 4 and all((tmp_path / f"{n}.png").is_file() for n in "dbrn")
    for fig in drawn:
        ax = fig.axes[0]
        handles, labels = ax.get_legend_handles_labels()
        if not labels:  # the bar chart's legend is the figure's
            handles, labels = fig.legends[0].legend_handles, [
                t.get_text() for t in fig.legends[0].get_texts()]
        colors = {}
        for handle, label in zip(handles, labels):
            artist = handle.patches[0] if isinstance(handle, BarContainer) else handle
            artist = artist[0] if isinstance(artist, tuple) else artist
            color = (artist.get_facecolor() if hasattr(artist, "get_height")
                     else artist.get_color())
            colors[label] = to_hex(color)
        assert colors["SSFL"] == METHOD_STYLES["ssfl"].color.lower()
        assert colors["SparsyFed"] == METHOD_STYLES["sparsyfed"].color.lower()
        assert colors["FedAvg (dense)"] == METHOD_STYLES["fedavg"].color.lower()
        assert "CIFAR-10, small CNN" in ax.get_title()
    density_ax = drawn[0].axes[0]
    drawn[0].canvas.draw()
    assert [t.get_text() for t in _visible_tick_labels(density_ax, "major")] == [
        "0.05", "0.1", "0.2", "0.5"]
    assert not [t.get_text() for t in _visible_tick_labels(density_ax, "minor") if t.get_text()]
    round_ax = drawn[2].axes[0]
    assert len(round_ax.collections) == 3  # a band per method: two seeds each


# --------------------------------------------------------------------------- report()


def test_report_writes_all_outputs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = report(runs, out)
    assert table == summary_table([load_run(p) for p in runs])  # no seed groups here
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert table in md
    assert re.findall(r"\]\((\w+\.png)\)", md) == [
        "accuracy_vs_round.png", "train_loss_vs_round.png", "accuracy_vs_bytes.png"]
    for stem in ("accuracy_vs_round", "train_loss_vs_round", "accuracy_vs_bytes"):
        _assert_png(out / f"{stem}.png")
        _assert_svg((out / f"{stem}.svg").read_bytes())
    assert (out / "report.html").is_file()
    with (out / "summary.csv").open(newline="", encoding="utf-8") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["sparse-a"]["complete"] == "true"
    assert float(rows["sparse-a"]["total_mb"]) == pytest.approx(1.78)
    assert float(rows["dense"]["best_accuracy"]) == pytest.approx(0.92)
    assert rows["sparse-c"]["complete"] == "false"
    assert rows["sparse-c"]["ratio_to_dense"] == ""


def test_report_adds_the_seed_table_when_seeds_repeat_a_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ssfl.report.plot_runs", lambda runs, out_dir: [])  # tables only
    folders = [method_run(tmp_path / f"s{seed}", "ssfl", 0.1, seed) for seed in (0, 1)]
    text = report(folders, tmp_path / "out")
    assert text in (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "Mean ± std over seeds" in text and "| SSFL d=0.1 (n=2) | 2 | 0, 1 |" in text


def _embedded_images(page: str) -> list[tuple[str, bytes]]:
    return [(mime, base64.b64decode(data)) for mime, data in
            re.findall(r'<img alt="[^"]*" src="data:(image/[\w+]+);base64,([A-Za-z0-9+/=]+)"',
                       page)]


@pytest.fixture
def html_report(tmp_path: Path) -> Path:
    """A report of a small sweep (seed group, two densities, every figure) and an interrupted
    run, as `ssfl report` writes it."""
    folders = [method_run(tmp_path / "runs" / f"ssfl-{seed}", "ssfl", 0.1, seed)
               for seed in (0, 1, 2)]
    folders += [method_run(tmp_path / "runs" / "fedavg", "fedavg", 1.0, 0),
                interrupted_run(tmp_path / "runs" / "cut")]
    out = tmp_path / "report"
    report(folders, out)
    return out / "report.html"


def test_html_page_is_self_contained_and_embeds_every_figure(html_report: Path) -> None:
    page = html_report.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page, re.IGNORECASE)  # nothing to fetch
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    svgs = sorted(p.stem for p in html_report.parent.glob("*.svg"))
    assert len(svgs) == 5
    for stem in svgs:
        assert f'<figure class="report-figure" id="{stem}">' in page
    images = _embedded_images(page)
    assert [mime for mime, _ in images] == ["image/svg+xml"] * len(svgs)
    on_disk = {(html_report.parent / f"{s}.svg").read_bytes() for s in svgs}
    assert {data for _, data in images} == on_disk
    for _, data in images:
        root = _assert_svg(data)
        for element in root.iter():  # the SVGs themselves load nothing either
            for key, value in element.attrib.items():
                if key.endswith("href"):
                    assert value.startswith("#"), (key, value)
    assert '<table id="runs-table">' in page and '<table id="groups-table">' in page
    assert "SSFL d=0.1 (n=3)" in page and "(incomplete)" in page


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome",
                                   "google-chrome-stable") if (path := shutil.which(name))), None)


@pytest.mark.slow
def test_html_page_renders_in_a_real_browser(html_report: Path, tmp_path: Path) -> None:
    """Headless Chromium: the page loads without a console message (a blocked resource, a
    script error), every figure decodes and renders, and the screenshot is not blank."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium) to load report.html")
    np = pytest.importorskip("numpy")
    from PIL import Image

    url = html_report.resolve().as_uri()
    flags = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    figures = len(list(html_report.parent.glob("*.svg")))
    # set by the page's own load handler: every <img> decoded with a non-zero size
    assert f'data-figures-rendered="{figures}/{figures}"' in dom.stdout
    assert dom.stdout.count('class="report-figure"') == figures
    assert '<table id="runs-table">' in dom.stdout and '<table id="groups-table">' in dom.stdout

    # The whole page in one screenshot, then every figure's own box in it (CSS px = pixels).
    height = int(re.search(r'data-page-height="(\d+)"', dom.stdout).group(1))
    boxes = [tuple(int(v) for v in box.split(","))
             for box in re.findall(r'data-box="([\d,]+)"', dom.stdout)]
    assert len(boxes) == figures
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--force-device-scale-factor=1", f"--window-size=1280,{height}",
                    f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (height, 1280)
    assert pixels.std() > 20  # text, tables and curves, not a blank page
    for x, y, w, h in boxes:
        assert w > 600 and h > 250
        crop = pixels[y:y + h, x:x + w]
        assert crop.std() > 20, (x, y, w, h)  # axes, curves and labels drawn, not blank
        assert (crop < 128).mean() > 0.01


def test_report_default_out_dir_is_cwd(runs: list[Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # rendering is covered above; stub it so this test stays fast
    monkeypatch.setattr("ssfl.report.plot_runs", lambda runs, out_dir: [])
    report([str(p) for p in runs[:1]])
    assert (tmp_path / "ssfl-report" / "summary.md").is_file()


def test_report_bad_folder_writes_nothing(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RunFolderError):
        report([runs[0], tmp_path / "missing"], out)
    assert not out.exists()


def test_report_needs_runs() -> None:
    with pytest.raises(RunFolderError, match="no run folders"):
        report([])


# --------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="does not exist") as info:
        load_run(tmp_path / "nope")
    assert "nope" in str(info.value)


def test_folder_of_runs_gets_a_hint(runs: list[Path]) -> None:
    with pytest.raises(RunFolderError, match="metrics.jsonl") as info:
        load_run(runs[0].parent)
    assert "subfolders" in str(info.value)


def test_file_instead_of_folder(runs: list[Path]) -> None:
    with pytest.raises(RunFolderError, match="is a file"):
        load_run(runs[0] / "metrics.jsonl")


def test_malformed_metrics_line_names_line_number(runs: list[Path]) -> None:
    metrics = runs[1] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]  # truncated JSON on line 2
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFolderError, match=r"line 2\b") as info:
        load_run(runs[1])
    assert "metrics.jsonl" in str(info.value)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("[1, 2]", "JSON object"), ('{"accuracy": 0.5}', "round"), ('{"round": "1"}', "round")],
)
def test_metrics_line_must_be_object_with_round(tmp_path: Path, bad: str, reason: str) -> None:
    folder = sparse_run(tmp_path / "a")
    metrics = folder / "metrics.jsonl"
    metrics.write_text(bad + "\n" + metrics.read_text())
    with pytest.raises(RunFolderError, match=f"line 1: .*{reason}"):
        load_run(folder)


def test_truncated_last_line_of_interrupted_run_is_skipped(runs: list[Path]) -> None:
    metrics = runs[2] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "accur')  # killed mid-write
    with pytest.warns(UserWarning, match="line 3"):
        run = load_run(runs[2])
    assert [r["round"] for r in run.metrics] == [1, 2]


def test_truncated_last_line_of_finished_run_is_an_error(runs: list[Path]) -> None:
    metrics = runs[0] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 4, "accur')
    with pytest.raises(RunFolderError, match="line 4"):
        load_run(runs[0])


def test_malformed_summary_and_config(runs: list[Path]) -> None:
    (runs[0] / "summary.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="summary.json"):
        load_run(runs[0])
    (runs[1] / "config.toml").write_text("[run\nname = ")
    with pytest.raises(RunFolderError, match="config.toml"):
        load_run(runs[1])


def test_blank_lines_and_missing_config_are_fine(tmp_path: Path) -> None:
    folder = sparse_run(tmp_path / "plain-folder", name=None)
    (folder / "config.toml").unlink()
    metrics = folder / "metrics.jsonl"
    metrics.write_text("\n" + metrics.read_text().replace("\n", "\n\n"))
    run = load_run(folder)
    assert run.name == "plain-folder" and run.config == {}
    assert len(run.metrics) == 3


def test_personal_accuracy_is_reported_beside_global(tmp_path: Path) -> None:
    rows = [_row(1, 0.5, 10, 10, 20, 1.0, personal_accuracy=0.75),
            _row(2, None, 10, 10, 40, 1.0),
            _row(3, 0.6, 10, 10, 60, 1.0, personal_accuracy=0.875)]
    finished = write_run(tmp_path / "done", name="done", metrics=rows,
                         summary={"final_accuracy": 0.6, "final_personal_accuracy": 0.9})
    interrupted = write_run(tmp_path / "cut", name="cut", metrics=rows, summary=None)
    table = parse_table(summary_table([load_run(finished), load_run(interrupted)]))
    assert table["done"]["Final acc (%)"] == "60.00"
    assert table["done"]["Personal acc (%)"] == "90.00"  # the summary's figure wins
    cut = next(v for k, v in table.items() if k.startswith("cut"))
    assert cut["Personal acc (%)"] == "87.50"  # else the last evaluated round's
