"""Research you can trust (issue 20): a held-out validation split, a search judged on it, what the report can
resolve, and learning curves.

The validation split is checked for what it promises (class-balanced, the same images in every run,
disjoint from what is trained, evaluated every epoch into every record); the search runs for real, as a
user starts it, with a failing trial and a resume; the report's resolution is checked against numbers
computed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_train

from cifar_speedrun.config.command_line import validate
from cifar_speedrun.errors import UserError
from cifar_speedrun.operations.sources import validation_split
from cifar_speedrun.records import report as report_lib


def test_the_validation_split_is_class_balanced_fixed_and_disjoint() -> None:
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    keep, held = validation_split(labels, 200)
    assert torch.equal(torch.bincount(labels[held], minlength=10), torch.full((10,), 20))
    assert len(keep) == 800 and not set(keep.tolist()) & set(held.tolist())
    again_keep, again_held = validation_split(labels, 200)
    assert torch.equal(held, again_held) and torch.equal(keep, again_keep), "the same images in every run"
    assert not torch.equal(held, torch.sort(torch.cat([torch.nonzero(labels == c).flatten()[:20]
                                                       for c in range(10)])).values), "drawn, not the first ones"
    with pytest.raises(UserError, match="data.val_split=1000 would hold out all 1000"):
        validation_split(labels, 1000)


def test_val_split_is_a_typed_key(compose_cfg) -> None:
    with pytest.raises(UserError, match="data.val_split=-5 must be an integer >= 0"):
        validate(compose_cfg("data.val_split=-5"))
    validate(compose_cfg("data.val_split=5000"))


@pytest.mark.slow
def test_a_run_with_a_validation_split_records_val_beside_test_everywhere(tmp_path: Path, archive: str,
                                                                         cache_dir: str) -> None:
    run = tmp_path / "run"
    result = run_train(["trainer=cpu", "data.source=image_folder", "model.width=0.125", "data.subset=1024",
                        "data.batch_size=128", "data.val_split=200", "data.test_subset=300", "epochs=2",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val 200 (held out)" in result.stdout and "train 1,024" in result.stdout, "data.subset from the rest"
    record = json.loads((run / "results.json").read_text())
    assert record["val_images"] == 200 and 0 <= record["val_acc"] <= 1
    assert all("val_acc" in entry and "val_loss" in entry and "test_acc" in entry for entry in record["history"])
    assert record["val_acc"] == record["history"][-1]["val_acc"]
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc", "val/loss", "test/acc"} <= set(header), "every logger gets val/*, not val/acc/dataloader_idx_1"


SEARCH = ["-m", "hparams_search=proxy", "trainer=cpu", "data.source=image_folder", "model.width=0.03",
          "data.subset=640", "data.batch_size=64", "data.val_split=100", "data.test_subset=100",
          "trainer.enable_progress_bar=false", "hydra.sweeper.params.epochs='choice(1,-1)'"]


@pytest.mark.slow
def test_a_search_judges_on_validation_records_failures_resumes_and_prints_the_command(
        tmp_path: Path, archive: str, cache_dir: str) -> None:
    sweep = tmp_path / "search"
    first = run_train([*SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir,
                      archive)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((sweep / "search.json").read_text())
    states = {entry["trial"]: entry["state"] for entry in summary["history"]}
    assert len(states) == 4 and "FAIL" in states.values() and "COMPLETE" in states.values()
    failed = [number for number, state in states.items() if state == "FAIL"]
    assert all("must be" in summary["failed"][str(number)] for number in failed), "the failure's reason is kept"
    values = {entry["trial"]: entry["value"] for entry in summary["history"] if entry["state"] == "COMPLETE"}
    for number, value in values.items():  # the objective is each trial's own validation accuracy
        assert value == json.loads((sweep / str(number) / "results.json").read_text())["val_acc"]
    best = max(values, key=values.get)
    assert summary["best_trial"] == best and "[search] best of" in first.stdout
    command = summary["best_command"]
    assert command in first.stdout and command.startswith("python train.py ")
    assert "hparams_search" not in command and "data.val_split" not in command, "the final run trains on all"
    assert all(f"{key}=" in command for key in summary["best_params"])
    # Resumed: the same command with more trials runs only the missing one, into the same study.
    again = run_train([*SEARCH, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir,
                      archive)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((sweep / "search.json").read_text())["trials"] == 5
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3", "4"]
    # The report reads a search like any multirun, with a validation column.
    text = report_lib.report(sweep)
    assert "val acc %" in text and "Resolution:" in text and (sweep / "report-curves.png").is_file()


def test_a_search_without_a_validation_split_is_refused(tmp_path: Path, archive: str, cache_dir: str) -> None:
    result = run_train([*SEARCH, "data.val_split=0", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/s"],
                       tmp_path, cache_dir, archive)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "data.val_split=0 holds nothing out" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "0").exists(), "no trial ran"


def test_resolution_matches_a_hand_computation() -> None:
    # sd 0.25 points in both rows, n = 3 each: Welch dof = 4, t(0.975, 4) = 2.7764,
    # half-width = 2.7764 * sqrt(2 * 0.0025^2 / 3) = 0.0056670.
    assert report_lib.difference_half_width(0.0025, 3, 0.0025, 3) == pytest.approx(0.0056670, rel=1e-4)
    # 0.2 points at sd 0.25: the smallest n with t(0.975, 2n - 2) * 0.0025 * sqrt(2 / n) <= 0.002 is 14
    # (n = 13: 2.0639 * 0.0025 * 0.39223 = 0.0020238 > 0.002; n = 14: 2.0555 * 0.0025 * 0.37796 = 0.0019422).
    assert report_lib.seeds_needed(0.0025) == 14
    assert report_lib.seeds_needed(math.nan) is None


def _row(config: str, accuracies: list[float], history: bool = False) -> report_lib.Row:
    runs = [report_lib.Run(Path("x"), i, "ok", config, acc, 10.0, None, 0.94, i, None,
                           history=[{"epoch": 1, "test_acc": acc - 0.1}, {"epoch": 2, "test_acc": acc}]
                           if history else [])
            for i, acc in enumerate(accuracies)]
    return report_lib.Row(config, runs)


def test_compare_says_in_words_whether_more_seeds_are_needed() -> None:
    rows = [_row("a=1", [0.900, 0.903, 0.897]), _row("a=2", [0.901, 0.904, 0.899])]
    text = report_lib.compare(rows, "1", "2")
    assert "not significant" in text and "more seeds are needed" in text and "per row would resolve" in text
    rows = [_row("a=1", [0.900, 0.901, 0.899]), _row("a=2", [0.910, 0.911, 0.909])]
    text = report_lib.compare(rows, "1", "2")
    assert "significant at the 5% level: the difference is resolved" in text
    assert "Resolution: with n = 3 seeds" in report_lib.power_line(rows)
    # Unequal spreads at n = 2 (Page's s1 and s2 rows on the proxy): the equal-sd plan says n = 2 would do,
    # yet these two seeds do not resolve it (Welch, 1.1 degrees of freedom): never ask for the n in hand.
    rows = [_row("s1", [0.8353, 0.8347]), _row("s2", [0.8213, 0.8250])]
    text = report_lib.compare(rows, "1", "2")
    assert "not significant" in text and "about n = 3 per row would resolve 1.18 points" in text


def test_learning_curves_are_drawn_for_ten_rows(tmp_path: Path) -> None:
    rows = [_row(f"a={i}", [0.5 + i / 100, 0.51 + i / 100], history=True) for i in range(10)]
    epochs, means, bands = report_lib.curves(rows[0], "test_acc")
    assert epochs == [1, 2] and means[1] == pytest.approx(0.505) and bands[1] > 0
    report_lib.plot_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
