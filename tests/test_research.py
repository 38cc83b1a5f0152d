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
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_train

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


SEARCH_BASE = ["-m", "hparams_search=proxy", "trainer=cpu", "data.source=image_folder", "model.width=0.03",
               "data.subset=640", "data.batch_size=64", "data.val_split=100", "data.test_subset=100",
               "trainer.enable_progress_bar=false"]
SEARCH = [*SEARCH_BASE, "hydra.sweeper.params.epochs='choice(1,-1)'"]
# One epoch for every trial, epochs out of the search (the spelling the refusal of `epochs=1` alone names),
# and a dotted searched key overridden from the command line.
FIXED_EPOCHS = [*SEARCH_BASE, "~hydra.sweeper.params.epochs", "epochs=1",
                'hydra.sweeper.params.optim.lr="float(0.05, 0.5, log)"']


def _history(sweep: Path) -> list[dict]:
    return json.loads((sweep / "search.json").read_text())["history"]


def _one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal's single `error:` line (exit 2, no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.mark.slow
def test_a_search_judges_on_validation_records_failures_resumes_and_prints_the_command(
        tmp_path: Path, archive: str, cache_dir: str) -> None:
    sweep = tmp_path / "search"
    # epochs=-1 fails (trials 0, 1 and 5 draw it): two failures in a row do not stop a 3-trial search.
    first = run_train([*SEARCH, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir,
                      archive)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((sweep / "search.json").read_text())
    states = {entry["trial"]: entry["state"] for entry in summary["history"]}
    assert list(states.values()).count("COMPLETE") == 3, "n_trials counts completed trials"
    failed = [number for number, state in states.items() if state == "FAIL"]
    assert failed and sorted(summary["failed"]) == sorted(map(str, failed)), "every failure counted"
    assert all("must be" in summary["failed"][str(number)] for number in failed), "the failure's reason is kept"
    assert f"; {len(failed)} failed." in first.stdout
    values = {entry["trial"]: entry["value"] for entry in summary["history"] if entry["state"] == "COMPLETE"}
    for number, value in values.items():  # the objective is each trial's own validation accuracy
        assert value == json.loads((sweep / str(number) / "results.json").read_text())["val_acc"]
    best = max(values, key=values.get)
    assert summary["best_trial"] == best and "[search] best of" in first.stdout
    command = summary["best_command"]
    assert command in first.stdout and command.startswith("python train.py ")
    assert "hparams_search" not in command and "data.val_split" not in command, "the final run trains on all"
    assert all(f"{key}=" in command for key in summary["best_params"])
    # Resumed: the same command with more trials runs only the missing ones, into the same study.
    again = run_train([*SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir,
                      archive)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((sweep / "search.json").read_text())
    assert resumed["complete"] == 4 and resumed["history"][:len(states)] == summary["history"]
    assert sorted(int(p.name) for p in sweep.iterdir() if p.is_dir()) == list(range(resumed["trials"]))
    # The report reads a search like any multirun, with a validation column.
    text = report_lib.report(sweep)
    assert "val acc %" in text and "Resolution:" in text and (sweep / "report-curves.png").is_file()


@pytest.mark.slow
def test_a_resumed_search_draws_what_an_uninterrupted_one_draws_and_keeps_its_configuration(
        tmp_path: Path, archive: str, cache_dir: str) -> None:
    one_go, resumed = tmp_path / "one_go", tmp_path / "resumed"
    for sweep, counts in ((one_go, [4]), (resumed, [2, 4])):
        for n_trials in counts:
            result = run_train([*FIXED_EPOCHS, f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={sweep}"],
                               tmp_path, cache_dir, archive)
            assert result.returncode == 0, result.stderr[-3000:]
    drawn = [entry["params"] for entry in _history(resumed)]
    assert drawn == [entry["params"] for entry in _history(one_go)], "each trial's seed is (study seed, trial)"
    assert len({json.dumps(params, sort_keys=True) for params in drawn}) == 4, "no trial's parameters repeated"
    assert all("epochs" not in params and 0.05 <= params["optim.lr"] <= 0.5 for params in drawn)
    # The study refuses a resume that would measure something else, naming what differs; nothing runs.
    for changed, named in ((["model.width=0.06", "data.subset=1280"], ["model.width 0.03 (now 0.06)",
                                                                      "data.subset 640 (now 1280)"]),
                           (["data.val_split=200"], ["data.val_split 100 (now 200)"]),
                           (["epochs=2"], ["epochs 1 (now 2)"]),
                           (['hydra.sweeper.params.optim.lr="float(0.1, 0.5, log)"'], ["search optim.lr"])):
        refused = run_train([*FIXED_EPOCHS, *changed, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={resumed}"],
                            tmp_path, cache_dir, archive)
        error = _one_error(refused)
        assert "started with another configuration" in error and all(name in error for name in named), error
    assert len(_history(resumed)) == 4 and not (resumed / "4").exists()


def _start_search(args: list[str], cwd: Path, archive: str, cache_dir: str) -> subprocess.Popen[str]:
    """train.py started as run_train starts it, in its own process group, to be killed."""
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={cwd}/logs",
                             "hydra.job.chdir=false"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)


@pytest.mark.slow
def test_a_trial_killed_mid_run_is_run_again_on_resume(tmp_path: Path, archive: str, cache_dir: str) -> None:
    import optuna

    sweep = tmp_path / "search"
    args = [*FIXED_EPOCHS, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
    process = _start_search(args, tmp_path, archive, cache_dir)
    try:
        while process.poll() is None and not (sweep / "1" / ".hydra").exists():  # trial 1 has started
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    study = optuna.load_study(study_name="proxy", storage=f"sqlite:///{sweep / 'search.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "RUNNING"], "killed during trial 1"
    killed = study.get_trials()[1].params
    again = run_train(args, tmp_path, cache_dir, archive)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((sweep / "search.json").read_text())
    assert summary["complete"] == 2 and summary["failed"] == {} and summary["interrupted"] == [1]
    assert [entry["state"] for entry in summary["history"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert summary["history"][2]["rerun_of"] == 1 and summary["history"][2]["params"] == killed
    assert "1 interrupted and run again" in again.stdout
    assert (sweep / "1.before-1" / ".hydra").is_dir() and not (sweep / "1").exists(), "the lost trial's folder aside"
    from cifar_speedrun.records.report import load_runs

    assert sorted(run.job for run in load_runs(sweep)) == [0, 2], "the report counts the rerun, not the lost trial"


@pytest.mark.slow
def test_a_failing_trial_fails_even_where_an_older_record_says_ok(tmp_path: Path, archive: str,
                                                                  cache_dir: str) -> None:
    sweep = tmp_path / "search"
    (sweep / "0").mkdir(parents=True)
    older = {"status": "ok", "val_acc": 0.99, "test_acc": 0.99, "history": []}
    (sweep / "0" / "results.json").write_text(json.dumps(older))
    result = run_train([*SEARCH_BASE, "~hydra.sweeper.params.epochs", "epochs=-1", "hydra.sweeper.n_trials=2",
                        f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir, archive)
    assert result.returncode == 1, "every trial failed: a run failure"
    summary = json.loads((sweep / "search.json").read_text())
    assert [(e["state"], e["value"]) for e in summary["history"]] == [("FAIL", None), ("FAIL", None)]
    assert sorted(summary["failed"]) == ["0", "1"] and summary["complete"] == 0
    assert "no trial finished (2 failed" in result.stdout, "the search stops after n_trials failures in a row"
    assert json.loads((sweep / "0.before-1" / "results.json").read_text()) == older, "nothing written is lost"
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(("args", "says"), [
    (["hydra.sweeper.n_trials=-3"], "hydra.sweeper.n_trials=-3 must be a whole number >= 1"),
    (['hydra.sweeper.params.epochs="int(5,1)"'], "is empty (low 5 > high 1): give the lower bound first, int(1, 5)"),
    (['hydra.sweeper.params.optim.lr="float(0, 1, log)"'], "a log range needs low > 0"),
    (["hydra.sweeper.params.epochs=int(3,4)"], "quote the spec"),
    (["optim.lr=0.3"], "optim.lr is searched"),
    (['hydra.sweeper.params.data.cutout_size="int(4,12)"'], "is not searched yet"),
    (['+hydra.sweeper.params.optim.lrr="float(0.1,0.5)"'], "did you mean hydra.sweeper.params.optim.lr?"),
    (["seed=0,1"], "a search runs one job per trial"),
    (['hydra.sweeper.params.optim.lr="float(nan, 1)"'], "low and high must be finite numbers"),
    (['hydra.sweeper.params.optim.lr="float(1, inf)"'], "low and high must be finite numbers"),
    (["hydra.sweeper.n_trials=abc"], "hydra.sweeper.n_trials=abc cannot be set: Value 'abc' of type 'str' could not "
                                     "be converted to Integer"),
])
def test_a_mistake_in_the_search_settings_is_one_line(tmp_path: Path, archive: str, cache_dir: str,
                                                      args: list[str], says: str) -> None:
    sweep = tmp_path / "s"
    error = _one_error(run_train([*SEARCH, *args, f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir, archive))
    assert says in error, error
    assert not (sweep / "0").exists() and not (sweep / "search.db").exists(), "nothing ran, nothing was written"
    hinted = re.findall(r"'([^']*)'", error.split(says, 1)[1])
    if hinted:  # the spelling the line names is taken: the next mistake (a searched key given) is what is said
        fixed = [arg for arg in args if arg.lstrip("+").split("=", 1)[0] != hinted[0].lstrip("+").split("=", 1)[0]]
        then = run_train([*SEARCH, *fixed, *shlex.split(f"'{hinted[0]}'"), "optim.lr=0.3",
                          f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir, archive)
        assert "optim.lr is searched" in _one_error(then)


def _read_only(path: Path) -> None:
    """Unwritable even for root: the immutable flag where the filesystem has it, else no write permission."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: nothing is read-only to root here")
    else:
        path.chmod(0o444)
        path.parent.chmod(0o555)


def _writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.parent.chmod(0o755)
        path.chmod(0o644)


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "read_only", "link"])
def test_a_search_db_that_is_not_a_usable_study_is_refused_untouched(tmp_path: Path, archive: str,
                                                                     cache_dir: str, kind: str) -> None:
    import optuna

    sweep = tmp_path / "s"
    sweep.mkdir()
    db = sweep / "search.db"
    if kind == "corrupt":
        db.write_bytes(b"not a database, some notes " * 100)
    elif kind == "foreign":
        with sqlite3.connect(db) as connection:
            connection.execute("CREATE TABLE people (name TEXT)")
            connection.execute("INSERT INTO people VALUES ('ada')")
    elif kind == "link":  # a link, even to a usable study, is refused by name: no search makes one
        target = tmp_path / "elsewhere.db"
        optuna.create_study(study_name="proxy", storage=f"sqlite:///{target}", direction="maximize")
        db.symlink_to(target)
    else:
        optuna.create_study(study_name="proxy", storage=f"sqlite:///{db}", direction="maximize")
        _read_only(db)
    before = db.read_bytes()
    try:
        error = _one_error(run_train([*SEARCH, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}"], tmp_path,
                                     cache_dir, archive))
    finally:
        if kind == "read_only":
            _writable_again(db)
    assert {"corrupt": "is not a readable search study", "foreign": "not a search's study (no Optuna tables",
            "read_only": "cannot be written", "link": "is a link"}[kind] in error and str(db) in error, error
    assert "hydra.sweep.dir" in error
    assert db.read_bytes() == before and not (sweep / "0").exists(), "refused before anything was written"


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


def test_a_study_measured_on_other_data_is_another_configuration(compose_cfg, tmp_path: Path) -> None:
    """data.path is where the data is (left out), but the data's content is part of what a trial measures: a
    resume with another archive is refused like any other changed setting."""
    from test_faults import _tiny_dataset

    from hydra_plugins.cifar_speedrun_search import study as study_lib

    cfg = compose_cfg("hparams_search=proxy", "data.source=image_folder", "data.val_split=500")
    spec = study_lib.parse_search(cfg.hydra.sweeper)
    here = study_lib.measured_configuration(cfg, spec)
    cfg.data.path = str(_tiny_dataset(tmp_path / "other"))
    there = study_lib.measured_configuration(cfg, spec)
    assert study_lib.describe_difference(here, there).startswith("data (its content) image_folder-")
