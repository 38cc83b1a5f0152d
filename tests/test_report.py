"""The report: statistics against hand-computed values, then real multiruns (with a failure and W&B)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_train
from PIL import Image
from scipy import stats
from wandb_records import summarize

from cifar_speedrun.records import report as report_lib
from cifar_speedrun.records.run_records import spreadsheet_cell

SRC = Path(__file__).resolve().parents[1] / "src"


def _write(root: Path, job: int, overrides: str, seed: int, acc: float | None, seconds: float = 10.0,
           status: str = "ok", ttt: float | None = None, error: str | None = None) -> None:
    folder = root / str(job)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "status": status, "test_acc": acc, "train_seconds": seconds, "time_to_target": ttt, "target_acc": 0.94,
        "seed": seed, "overrides": f"{overrides} seed={seed}".strip(), "error": error}))


@pytest.fixture()
def fixture_dir(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    for job, (acc, secs, ttt) in enumerate([(0.90, 10.0, None), (0.92, 12.0, None), (0.94, 11.0, 9.0)]):
        _write(root, job, "experiment=cpu_proxy trick=[]", job, acc, secs, ttt=ttt)
    for job, acc in enumerate([0.95, 0.96, 0.97], start=3):
        _write(root, job, "experiment=cpu_proxy trick=[tta]", job, acc, 20.0, ttt=15.0 + job)
    _write(root, 6, "experiment=cpu_proxy trick=[tta]", 6, 0.1, status="failed", error="FloatingPointError: NaN")
    return root


def test_statistics_match_hand_computed_values(fixture_dir: Path) -> None:
    rows = report_lib.group_runs(report_lib.load_runs(fixture_dir))
    base, tta = rows
    assert base.config == "experiment=cpu_proxy trick=[]" and base.n == 3
    assert base.mean == pytest.approx(0.92)
    assert base.std == pytest.approx(0.02)  # sqrt(((-.02)^2 + 0 + .02^2) / 2)
    # t(0.975, dof 2) = 4.302652729911275; half-width = 4.3027 * 0.02 / sqrt(3)
    assert base.ci95 == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    assert base.fraction_reaching_target == pytest.approx(1 / 3)
    assert base.median_train_seconds == 11.0 and base.median_time_to_target == 9.0
    assert tta.n == 3 and len(tta.failed) == 1 and tta.mean == pytest.approx(0.96)
    # Welch by hand: se^2 = .0004/3 + .0001/3; t = -.04 / se; dof = se^4 / ((.0004/3)^2/2 + (.0001/3)^2/2)
    t, dof, p = report_lib.welch_t_test(base.accuracies, tta.accuracies)
    se2 = 0.0004 / 3 + 0.0001 / 3
    assert t == pytest.approx(-0.04 / math.sqrt(se2))
    assert dof == pytest.approx(se2**2 / ((0.0004 / 3) ** 2 / 2 + (0.0001 / 3) ** 2 / 2))
    assert p == pytest.approx(0.05479, abs=1e-5)  # two-sided, t = -3.098, dof = 2.94
    assert p == pytest.approx(stats.ttest_ind(base.accuracies, tta.accuracies, equal_var=False).pvalue)


def test_report_writes_table_csv_plot_and_lists_failures(fixture_dir: Path) -> None:
    assert report_lib.main([str(fixture_dir), "--compare", "1", "trick=[tta]"]) == 0
    text = (fixture_dir / "report.md").read_text()
    assert "| 1 | trick=[] | 3 | 92.00 | 2.00 | 4.97 | 33% | 11.0 | 9.0 | 0 |" in text
    assert "| 2 | trick=[tta] | 3 | 96.00 | 1.00 |" in text
    assert "## Failed runs" in text and "job 6" in text and "FloatingPointError: NaN" in text
    assert "Welch t = -3.098" in text and "p = 0.05479: not significant at the 5% level" in text
    with open(fixture_dir / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["n"] for r in rows] == ["3", "3"] and float(rows[0]["mean_acc"]) == pytest.approx(0.92)
    with Image.open(fixture_dir / "report.png") as image:
        image.verify()


def test_per_run_csv_round_trip_rebuilds_the_same_table(fixture_dir: Path, tmp_path: Path) -> None:
    """report --export-runs writes one row per run; report <csv> rebuilds the identical table from it."""
    runs_csv = tmp_path / "results" / "runs.csv"
    assert report_lib.main([str(fixture_dir), "--export-runs", str(runs_csv)]) == 0
    with open(runs_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and list(rows[0]) == report_lib.RUN_COLUMNS
    assert rows[0]["configuration"] == "experiment=cpu_proxy trick=[]" and rows[0]["seed"] == "0"
    assert rows[6]["status"] == "failed" and "NaN" in rows[6]["error"]
    from_dir = (fixture_dir / "report.md").read_text()
    assert report_lib.main([str(runs_csv)]) == 0
    from_csv = (tmp_path / "results" / "runs-report.md").read_text()
    table = [line for line in from_dir.splitlines() if line.startswith("|")]
    assert table == [line for line in from_csv.splitlines() if line.startswith("|")]
    assert (tmp_path / "results" / "runs-report.png").is_file()


def test_several_multirun_dirs_merge_in_the_order_given(tmp_path: Path) -> None:
    """One multirun per row of a table (each small enough to run alone), reported together."""
    first, second = tmp_path / "s7", tmp_path / "s0"
    for job, acc in enumerate([0.80, 0.81]):
        _write(first, job, "experiment=cpu_proxy stage=s7_tta", job, acc)
    for job, acc in enumerate([0.78, 0.79, 0.80]):
        _write(second, job, "experiment=cpu_proxy stage=s0_baseline", job, acc)
    text = report_lib.report([second, first], out=tmp_path / "both")
    rows = [line for line in text.splitlines() if "| stage=" in line]
    assert rows[0].startswith("| 1 | stage=s0_baseline | 3 | 79.00")
    assert rows[1].startswith("| 2 | stage=s7_tta | 2 | 80.50")
    assert (tmp_path / "both" / "report.md").is_file() and not (second / "report.md").exists()


def test_report_names_the_data_width_and_commit(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    _write(root, 0, "stage=s0_baseline", 0, 0.8)
    result = json.loads((root / "0" / "results.json").read_text())
    result.update({"data_source": "CIFAR-10 image_folder x.tar.gz", "git_commit": "abc123",
                   "device": "cpu (x86_64, 2 threads)", "config": {"model": {"width": 0.125}}})
    (root / "0" / "results.json").write_text(json.dumps(result))
    text = report_lib.report(root)
    assert ("Data: CIFAR-10 image_folder x.tar.gz. Width: 0.125. Device: cpu (x86_64, 2 threads). "
            "Commit: abc123.") in text


def test_report_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert report_lib.main([str(tmp_path / "nowhere")]) == 2
    assert report_lib.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no results.json" in err and len(err.splitlines()) == 2  # one line per refusal


def test_report_errors_are_one_line_from_the_command_line(tmp_path: Path) -> None:
    """As a user starts it: a refused CSV is one `error:` line naming the row, column and fix, exit 2."""
    bad = tmp_path / "runs.csv"
    bad.write_text(",".join(report_lib.RUN_COLUMNS) + "\n"
                   "a=1,0,ok,0.9,10.0,,0.94,10,0.125,d,cpu,c,0,,\n"
                   "a=1,1,ok,7,10.0,,0.94,10,0.125,d,cpu,c,1,,\n")
    done = subprocess.run([sys.executable, "-m", "cifar_speedrun.records.report", str(bad)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{bad}, row 2 (line 3), column test_acc: test_acc='7' is out of range" in lines[0]
    assert "0.94, not 94" in lines[0] and "--export-runs" in lines[0]
    assert not list(tmp_path.glob("runs-report*")), "nothing is written for a refused input"


# ================================================================ hostile or broken inputs, each class
HOSTILE = ["=cmd|' /C calc'!A0", "+trick=x", "-2+3+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0",
           "\t=1+1", "\r=1+1", "'=already quoted"]


def test_exported_cells_never_start_a_formula_and_read_back_exactly(tmp_path: Path) -> None:
    """Every CSV the report writes (runs CSV, report.csv) goes through one spreadsheet-safe writer."""
    root = tmp_path / "multirun"
    for job, hostile in enumerate(HOSTILE):
        _write(root, job, f"{hostile} tags=[{hostile}]", job, 0.9 - job / 100, error=hostile, status="failed"
               if job == 0 else "ok")
        result = json.loads((root / str(job) / "results.json").read_text())
        result.update({"device": hostile, "data_source": hostile, "git_commit": "-abc"})
        (root / str(job) / "results.json").write_text(json.dumps(result))
    runs_csv = tmp_path / "runs.csv"
    assert report_lib.main([str(root), "--export-runs", str(runs_csv)]) == 0
    for written in (runs_csv, root / "report.csv"):
        with open(written, newline="") as handle:
            cells = [cell for row in csv.reader(handle) for cell in row]
        assert cells, written
        for cell in cells:
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r") or _is_number(cell), (written, cell)
        assert any(cell.startswith("'=cmd|") for cell in cells)  # neutralised, not dropped
    with open(runs_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["error"] == "'=cmd|' /C calc'!A0" and rows[6]["error"] == "''=already quoted"
    # read back: the report's own quote is taken off again, so the table and the runs are the same
    again = report_lib.load_runs_csv(runs_csv)
    original = report_lib.load_runs(root)
    assert [r.config_key for r in again] == [r.config_key for r in original]
    assert [r.error for r in again] == HOSTILE
    assert [r.device for r in again] == HOSTILE
    assert spreadsheet_cell(-0.5) == -0.5 and spreadsheet_cell("-0.5") == "-0.5"  # numbers stay numbers
    assert spreadsheet_cell("-1e-3") == "-1e-3" and spreadsheet_cell("-inf") == "'-inf"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _runs_csv(tmp_path: Path, header: str, *rows: str) -> Path:
    path = tmp_path / "runs.csv"
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


GOOD_HEADER = ",".join(report_lib.RUN_COLUMNS)
GOOD_ROW = {"configuration": "a=1", "seed": "0", "status": "ok", "test_acc": "0.9", "train_seconds": "10.0",
            "time_to_target": "", "target_acc": "0.94", "epochs": "10", "width": "0.125", "data": "d",
            "device": "cpu", "commit": "c", "job": "0", "error": "", "val_acc": ""}


def _row(**changes: str) -> str:
    cells = {**GOOD_ROW, **changes}
    return ",".join(cells[name] for name in report_lib.RUN_COLUMNS)


def _refusal(path: Path, capsys) -> str:
    assert report_lib.main([str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured.err
    assert not list(path.parent.glob("runs-report*")), "nothing is written for a refused input"
    return lines[0]


@pytest.mark.parametrize(("column", "value", "says"), [
    ("test_acc", "-5", "must be a number in [0, 1]"), ("test_acc", "7", "must be a number in [0, 1]"),
    ("val_acc", "1.5", "must be a number in [0, 1]"), ("target_acc", "94", "0.94, not 94"),
    ("train_seconds", "-1", "must be a number >= 0"), ("time_to_target", "-3", "must be a number >= 0"),
    ("seed", "-1", "must be an integer in [0, 4294967295]"), ("width", "0", "must be a number > 0"),
    ("epochs", "-2", "must be an integer >= 0"),
])
def test_out_of_range_values_are_refused(tmp_path: Path, capsys, column: str, value: str, says: str) -> None:
    line = _refusal(_runs_csv(tmp_path, GOOD_HEADER, _row(), _row(**{column: value})), capsys)
    assert f"row 2 (line 3), column {column}: {column}={value!r} is out of range" in line and says in line


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "NaN", "nan"])
@pytest.mark.parametrize("column", ["test_acc", "train_seconds"])
def test_non_finite_values_are_refused(tmp_path: Path, capsys, column: str, value: str) -> None:
    line = _refusal(_runs_csv(tmp_path, GOOD_HEADER, _row(**{column: value})), capsys)
    assert f"row 1 (line 2), column {column}: {column}={value!r} is not a finite number" in line


@pytest.mark.parametrize(("column", "value", "says"), [
    ("test_acc", "abc", "is not a finite number"), ("test_acc", "true", "is not a finite number"),
    ("seed", "1.5", "is not an integer"), ("seed", "x", "is not an integer"), ("epochs", "ten", "is not an integer"),
    ("job", "0.5", "is not an integer"), ("status", "done", "is not a status the report knows: use ok, running"),
    ("test_acc", "", "is empty, but a run with status ok has it"),
    ("seed", "", "is empty, but a run with status ok has it"),
])
def test_wrong_types_are_refused(tmp_path: Path, capsys, column: str, value: str, says: str) -> None:
    line = _refusal(_runs_csv(tmp_path, GOOD_HEADER, _row(**{column: value})), capsys)
    assert f"column {column}: {column}={value!r} {says}" in line


def test_missing_unknown_and_misshapen_columns_are_refused(tmp_path: Path, capsys) -> None:
    line = _refusal(_runs_csv(tmp_path, "configuration,seed", "a=1,0"), capsys)
    assert "lacks the columns status, test_acc, train_seconds, time_to_target, target_acc" in line
    line = _refusal(_runs_csv(tmp_path, GOOD_HEADER + ",val_accuracy", _row() + ",0.9"), capsys)
    assert "unknown column 'val_accuracy' (did you mean val_acc?)" in line
    line = _refusal(_runs_csv(tmp_path, GOOD_HEADER + ",seed", _row() + ",0"), capsys)
    assert "the column 'seed' appears twice" in line
    line = _refusal(_runs_csv(tmp_path, GOOD_HEADER, _row(), _row() + ",extra"), capsys)
    assert "row 2 (line 3) has 16 cells, the header 15" in line
    line = _refusal(_runs_csv(tmp_path, ""), capsys)
    assert "is empty" in line


def test_results_json_gets_the_same_checks(tmp_path: Path) -> None:
    """A bad results.json is listed (the sweep's other runs still report), never averaged in."""
    root = tmp_path / "multi"
    _write(root, 0, "a=1", 0, 0.9)
    _write(root, 1, "a=1", 1, 7.0)
    _write(root, 2, "a=1", 2, -5.0)
    (root / "3").mkdir()
    (root / "3" / "results.json").write_text('{"status": "ok", "test_acc": 0.9, "train_seconds": Infinity, '
                                             '"seed": 3, "overrides": "a=1 seed=3"}')
    (root / "4").mkdir()
    (root / "4" / "results.json").write_text('{"status": "ok", "test_acc": NaN, "train_seconds": 1, '
                                             '"seed": 4, "overrides": "a=1 seed=4"}')
    _write(root, 5, "a=1", 5, 0.9)
    result = json.loads((root / "5" / "results.json").read_text())
    (root / "5" / "results.json").write_text(json.dumps({**result, "seed": "5"}))
    text = report_lib.report(root)
    rows = report_lib.group_runs(report_lib.load_runs(root))
    assert rows[0].config == "a=1" and rows[0].n == 1 and rows[0].mean == pytest.approx(0.9)
    assert "6 runs, 1 ok, 5 failed" in text
    assert "test_acc=7.0 is out of range" in text and "test_acc=-5.0 is out of range" in text
    assert "train_seconds=inf is not a finite number" in text and "test_acc=nan is not a finite number" in text
    assert "seed='5' is not an integer" in text


# ================================================================ running runs
def test_running_runs_are_listed_as_running_and_in_no_mean(tmp_path: Path, capsys) -> None:
    root = tmp_path / "multi"
    _write(root, 0, "a=1", 0, 0.90)
    _write(root, 1, "a=1", 1, 0.92)
    _write(root, 2, "a=1", 2, 0.10, status="running")
    result = json.loads((root / "2" / "results.json").read_text())
    (root / "2" / "results.json").write_text(json.dumps({**result, "epochs": 3}))
    text = report_lib.report(root, export_runs=tmp_path / "runs.csv")
    rows = report_lib.group_runs(report_lib.load_runs(root))
    assert rows[0].n == 2 and rows[0].mean == pytest.approx(0.91) and len(rows[0].running) == 1
    assert "3 runs, 2 ok, 0 failed, 1 still running (in no mean)." in text
    assert "| 1 | a=1 | 2 | 91.00 |" in text
    assert "## Failed runs" not in text and "None" not in text
    assert "## Still running" in text and "- job 2 (a=1, seed 2): running, 3 epochs done when last written" in text
    again = report_lib.group_runs(report_lib.load_runs_csv(tmp_path / "runs.csv"))
    assert len(again[0].running) == 1 and again[0].n == 2  # the CSV keeps the status


def test_a_failed_run_without_an_error_line_says_no_none(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    _write(root, 0, "a=1", 0, 0.9)
    _write(root, 1, "a=1", 1, None, status="interrupted")
    text = report_lib.report(root)
    assert "- job 1 (a=1, seed 1): interrupted\n" in text and "None" not in text


# ================================================================ plots
def _png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def test_time_plot_says_when_times_come_from_a_cpu_or_mixed_devices(tmp_path: Path) -> None:
    def sweep(name: str, devices: list[str | None]) -> Path:
        root = tmp_path / name
        for job, device in enumerate(devices):
            _write(root, job, "a=1", job, 0.9 + job / 100)
            result = json.loads((root / str(job) / "results.json").read_text())
            (root / str(job) / "results.json").write_text(json.dumps({**result, "device": device}))
        report_lib.report(root)
        return root

    gpu = sweep("gpu", ["NVIDIA H200", "NVIDIA H200"])
    assert _png_text(gpu / "report.png")["Description"] == "" and "Times:" not in (gpu / "report.md").read_text()
    cpu = sweep("cpu", ["cpu (x86_64, 2 threads)"] * 2)
    note = _png_text(cpu / "report.png")["Description"]
    assert "times come from a CPU (cpu (x86_64, 2 threads)) whose cores may be shared" in note
    assert f"Times: {note}." in (cpu / "report.md").read_text()
    mixed = sweep("mixed", ["NVIDIA H200", "cpu (x86_64, 1 threads)"])
    assert "times come from mixed devices (NVIDIA H200; cpu (x86_64, 1 threads))" in \
        _png_text(mixed / "report.png")["Description"]
    unknown = sweep("unknown", [None, None])
    assert "no device is recorded" in _png_text(unknown / "report.png")["Description"]


def test_learning_curves_show_bands_and_the_train_loss_from_metrics_csv(tmp_path: Path) -> None:
    """A proxy evaluates once (one accuracy point, a CI error bar) but logs train/loss every epoch."""
    root = tmp_path / "multi"
    for seed in range(3):
        _write(root, seed, "a=1", seed, 0.80 + seed / 100)
        result = json.loads((root / str(seed) / "results.json").read_text())
        result["history"] = [{"epoch": 3, "test_acc": 0.80 + seed / 100, "test_loss": 0.6, "train_loss": 9.0}]
        (root / str(seed) / "results.json").write_text(json.dumps(result))
        (root / str(seed) / "csv").mkdir()
        (root / str(seed) / "csv" / "metrics.csv").write_text(
            "epoch,step,lr/head,train/loss,test/acc\n,1,0.1,,\n"
            + "".join(f"{epoch},{10 * epoch + 9},,{2.0 - epoch / 2 + seed / 10},\n" for epoch in range(3))
            + f"2,29,,,{0.8 + seed / 100}\n")
    runs = report_lib.load_runs(root)
    assert runs[1].epoch_train_loss == {1: pytest.approx(2.1), 2: pytest.approx(1.6), 3: pytest.approx(1.1)}
    row = report_lib.group_runs(runs)[0]
    epochs, means, bands = report_lib.curves(row, "train_loss")
    assert epochs == [1, 2, 3] and means == pytest.approx([2.1, 1.6, 1.1]) and all(b > 0 for b in bands)
    assert report_lib.curves(row, "test_acc")[0] == [3]
    drawn = report_lib.plot_curves([row], tmp_path / "curves.png")
    assert (1, "train_loss", 3, True) in drawn and (1, "test_acc", 1, True) in drawn and (1, "test_loss", 1, True) \
        in drawn
    report_lib.report(root)
    assert (root / "report-curves.png").stat().st_size > 10_000
    # without the CSV logger: the history's train_loss (evaluated epochs only)
    for seed in range(3):
        (root / str(seed) / "csv" / "metrics.csv").unlink()
    assert report_lib.load_runs(root)[0].epoch_train_loss == {3: 9.0}


# ================================================================ for the end of a multirun
def test_multirun_table_returns_the_report_text_and_writes_nothing(fixture_dir: Path, tmp_path: Path) -> None:
    text = report_lib.multirun_table(fixture_dir)
    assert "| 1 | trick=[] | 3 | 92.00 | 2.00 | 4.97 | 33% | 11.0 | 9.0 | 0 |" in text and "## Failed runs" in text
    assert not (fixture_dir / "report.md").exists() and not (fixture_dir / "report.csv").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(report_lib.ReportError, match="no results.json under"):
        report_lib.multirun_table(tmp_path / "empty")
    with pytest.raises(report_lib.ReportError, match="is not a directory"):
        report_lib.multirun_table(tmp_path / "nowhere")


@pytest.mark.slow
def test_real_multirun_two_configs_two_seeds_then_report(tmp_path: Path, archive: str, cache_dir: str) -> None:
    sweep = tmp_path / "multi"
    result = run_train(["-m", *TINY, "trick=[],[label_smoothing]", "seed=0,1", f"hydra.sweep.dir={sweep}"],
                       tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report_lib.main([str(sweep), "--compare", "1", "2"]) == 0
    rows = report_lib.group_runs(report_lib.load_runs(sweep))
    assert len(rows) == 2 and [row.n for row in rows] == [2, 2]
    assert "trick=[]" in rows[0].config and "label_smoothing" in rows[1].config  # the sweep's order
    with open(sweep / "report.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    with Image.open(sweep / "report.png") as image:
        assert image.size[0] > 100
    first = json.loads((sweep / "0" / "results.json").read_text())
    assert first["history"] and "train_seconds" in first["history"][0] and first["target_acc"] == 0.94
    assert "time_to_target" in first and first["overrides"]


@pytest.mark.slow
def test_failing_job_is_recorded_and_sweep_goes_on_with_wandb(tmp_path: Path, archive: str, cache_dir: str) -> None:
    sweep = tmp_path / "multi"
    result = run_train(["-m", *TINY, "logger=wandb", "+trick=label_smoothing", "optim.lr=0.4,1e30",
                        f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    ok, failed = (json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1))
    assert ok["status"] == "ok" and failed["status"] == "failed"
    assert "NaN" in failed["error"] and "lr 1e+30" in failed["error"]
    text = report_lib.report(sweep)
    assert "## Failed runs" in text and "- job 1 (" in text and "lr 1e+30" in text
    assert "| 1 | " in text  # the ok configuration still has its row with n = 1
    # W&B (offline): one run per job, sharing the multirun's group, tagged with the tricks
    runs = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    first, second = summarize(runs[0]), summarize(runs[1])
    assert first["group"] == second["group"] == f"train-multirun-{sweep.name}"
    assert first["tags"] == ["label_smoothing"]
    assert "run_config" not in first["config"] and "optim" in first["config"] and "config_key" in first["config"]
    assert "test/acc" in first["history_keys"] and "final/test_acc" in first["summary"]
