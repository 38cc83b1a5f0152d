"""The report: statistics against hand-computed values, then real multiruns (with a failure and W&B)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import TINY, run_train
from PIL import Image
from scipy import stats
from wandb_records import summarize

from cifar_speedrun.records import report as report_lib


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
    assert "no results.json" in capsys.readouterr().err


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
