"""Tests for ssfl.report, on run folders written by hand.

Every expected figure below is computed by hand from the numbers in the
fixtures (1 MB = 10**6 bytes), so a change in how the report derives a column
shows up as a concrete wrong number.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from ssfl.report import (
    RunFolderError,
    build_figures,
    display_names,
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
    assert set(figures) == {"accuracy_vs_round.png", "accuracy_vs_bytes.png"}
    for fig in figures.values():
        lines = fig.axes[0].get_lines()
        assert [line.get_label() for line in lines] == ["sparse-a", "dense", "sparse-c"]
    by_round = figures["accuracy_vs_round.png"].axes[0].get_lines()[0]
    assert list(by_round.get_xdata()) == [1, 3]
    # 0.75 MB .. 12 MB spans > 10x -> log x axis
    assert figures["accuracy_vs_bytes.png"].axes[0].get_xscale() == "log"


def test_run_without_evaluation_gets_no_line(runs: list[Path], tmp_path: Path) -> None:
    never = write_run(tmp_path / "never", name="never",
                      metrics=[_row(1, None, 1, 1, 2, 0.1)], summary=None)
    figures = build_figures([load_run(runs[0]), load_run(never)])
    assert len(figures["accuracy_vs_round.png"].axes[0].get_lines()) == 1


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0


def test_plot_runs_writes_pngs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "nested"
    paths = plot_runs([load_run(p) for p in runs], out)
    assert [p.name for p in paths] == ["accuracy_vs_round.png", "accuracy_vs_bytes.png"]
    for path in paths:
        assert path.parent == out
        _assert_png(path)


# --------------------------------------------------------------------------- report()


def test_report_writes_all_outputs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = report(runs, out)
    assert table == summary_table([load_run(p) for p in runs])
    assert (out / "summary.md").read_text(encoding="utf-8").count("](accuracy_vs_") == 2
    assert table in (out / "summary.md").read_text(encoding="utf-8")
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        _assert_png(out / name)
    with (out / "summary.csv").open(newline="", encoding="utf-8") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["sparse-a"]["complete"] == "true"
    assert float(rows["sparse-a"]["total_mb"]) == pytest.approx(1.78)
    assert float(rows["dense"]["best_accuracy"]) == pytest.approx(0.92)
    assert rows["sparse-c"]["complete"] == "false"
    assert rows["sparse-c"]["ratio_to_dense"] == ""


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
