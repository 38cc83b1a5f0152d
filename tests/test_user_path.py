"""A user's path as they start it: W&B single run and multirun, start and end lines, eval, model file,
debug presets, multirun summary, the report's plot and comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import preloaded_python
import pytest
import torch
from conftest import REPO, TINY, run_train
from wandb_records import summarize

from cifar_speedrun.config.hydra_job import config_key, run_name
from cifar_speedrun.records import report as report_lib


def _wandb_run(folder: Path) -> dict:
    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(folder.rglob("*.wandb"))
    return summarize(files[0])


# ---------------------------------------------------------------- names and keys (unit)
def test_run_names_put_what_differs_first() -> None:
    bag = ["experiment=cpu_proxy", "data.source=image_folder", "trainer.enable_progress_bar=False",
           "stage=s3_celu_ghost_bn", "seed=1"]
    assert run_name(bag, 1) == "s3_celu_ghost_bn · cpu_proxy · seed 1 · data.source=image_folder"
    assert run_name(["+trick=[label_smoothing,celu]", "seed=0"], 0) == "+label_smoothing,celu · seed 0"
    assert run_name(["trick=[]"], 2) == "no tricks · seed 2"
    assert run_name([], 0) == "seed 0"
    long = run_name([f"optim.lr={i}" for i in range(30)], 0)
    assert len(long) == 64 and long.endswith("…")
    assert config_key("stage=s0_baseline seed=2 experiment=cpu_proxy") == "stage=s0_baseline experiment=cpu_proxy"


# ---------------------------------------------------------------- W&B, single run and multirun
@pytest.mark.slow
def test_single_run_logs_to_wandb_with_flat_keys_tags_lr_and_summary(tmp_path: Path, archive: str,
                                                                     cache_dir: str) -> None:
    """The README's own command, `python train.py logger=wandb`, outside a multirun."""
    run_dir = tmp_path / "run"
    result = run_train([*TINY, "logger=wandb", "+trick=label_smoothing", "tags=[paper,v2]",
                        f"hydra.run.dir={run_dir}"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    record = _wandb_run(run_dir)
    assert record["name"].startswith("+label_smoothing · seed 0 · ") and len(record["name"]) <= 64
    assert record["group"] == ""  # a single run has no group
    assert record["tags"] == ["label_smoothing", "paper", "v2"]
    config = record["config"]
    for key in ("experiment", "stage", "sweep", "tricks", "seed", "config_key", "params", "trick/label_smoothing",
                "trick/ema", "data", "model", "optim"):
        assert key in config, key
    assert json.loads(config["tricks"]) == "label_smoothing"
    assert json.loads(config["trick/label_smoothing"]) is True and json.loads(config["trick/ema"]) is False
    assert json.loads(config["params"]) > 1000 and json.loads(config["seed"]) == 0
    assert json.loads(config["data"])["batch_size"] == 128 and json.loads(config["model"])["width"] == 0.125
    assert "run_config" not in config and "_target_" not in json.dumps(config) and "paths" not in config
    assert "label_smoothing" in json.loads(config["config_key"])
    assert {"lr/weights", "time/epoch_seconds", "test/acc"} <= record["history_keys"]
    assert not any(key.startswith("final/") for key in record["history_keys"]), "final values are not history"
    results = json.loads((run_dir / "results.json").read_text())
    assert json.loads(record["summary"]["final/test_acc"]) == pytest.approx(results["test_acc"])
    assert "train/loss" in (run_dir / "csv" / "metrics.csv").read_text(), "README: every run writes csv/metrics.csv"


@pytest.mark.slow
def test_multirun_jobs_share_a_group_and_report_joins_it(tmp_path: Path, archive: str, cache_dir: str) -> None:
    sweep = tmp_path / "multi"
    result = run_train(["-m", *TINY, "logger=wandb", "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir,
                       archive)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _wandb_run(sweep / "0"), _wandb_run(sweep / "1")
    assert first["group"] == second["group"] == f"train-multirun-{sweep.name}"
    assert first["name"].startswith("seed 0 · trainer=cpu · ") and second["name"].startswith("seed 1 · ")
    assert json.loads(first["config"]["config_key"]) == json.loads(second["config"]["config_key"])
    assert "[multirun] 2 of 2 jobs ok" in result.stdout
    assert f"python -m cifar_speedrun.records.report {sweep}" in result.stdout
    # the report uploads into the same group, its offline files inside the multirun dir
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "cifar_speedrun.records.report", str(sweep), "--wandb"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "wandb").exists(), "no ./wandb in the working directory"
    report_runs = sorted(sweep.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(report_runs) == 1
    uploaded = summarize(report_runs[0])
    assert uploaded["group"] == first["group"]
    assert {"report/_type", "report_plot/_type"} <= uploaded["history_keys"]
    table_file = next(report_runs[0].parent.glob("files/media/table/report_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["#", "configuration", "n"] and len(table["data"]) == 1
    assert all(isinstance(cell, (int, float)) or cell is None for cell in table["data"][0][2:]), table["data"][0]


@pytest.mark.slow
def test_wandb_without_network_or_mode_fails_fast_and_keeps_results(tmp_path: Path, archive: str,
                                                                     cache_dir: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update({"CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "HOME": str(tmp_path),
                "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})  # nothing listens on port 9
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "logger=wandb",
                             f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}/logs"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert time.perf_counter() - start < 120
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "WANDB_MODE=offline" in errors[0] and "cannot reach 127.0.0.1" in errors[0]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    # no key at all: the same advice, before any network is tried
    del env["WANDB_API_KEY"]
    no_key = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "logger=wandb",
                             f"hydra.run.dir={tmp_path}/run2", f"paths.log_dir={tmp_path}/logs"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert no_key.returncode == 2 and "no W&B API key" in no_key.stderr and "WANDB_MODE=offline" in no_key.stderr


# ---------------------------------------------------------------- start and end lines, quiet console
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, archive: str, cache_dir: str):
    """One tiny run shared by the eval, model-file and console tests."""
    root = tmp_path_factory.mktemp("trained")
    result = run_train([*TINY, f"hydra.run.dir={root}/run"], root, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result


@pytest.mark.slow
def test_start_and_end_lines_say_what_ran(trained_run) -> None:
    run_dir, result = trained_run
    start = [line for line in result.stdout.splitlines() if line.startswith("[run] ")]
    assert len(start) == 1
    line = start[0]
    for part in ("DavidNet width 0.125 (", " parameters) · ", "train 512 / test 500 images",
                 "4 steps of 128 an epoch (0 images dropped each epoch)", "· 1 epochs · cpu (", "32-true",
                 "tricks: none", f"output: {run_dir}"):
        assert part in line, (part, line)
    results = json.loads((run_dir / "results.json").read_text())
    end = [line for line in result.stdout.splitlines() if line.startswith("[done] ")]
    assert end == [f"[done] test acc {100 * results['test_acc']:.2f}% · train {results['train_seconds']:.1f} s · "
                   f"results: {run_dir / 'results.json'}"]
    output = result.stdout + result.stderr
    assert "💡" not in output and "LeafSpec" not in output and "GPU available" not in output
    assert "it/s" not in output and "Epoch 0:" not in output, "no progress bar in a log file"


# ---------------------------------------------------------------- eval and the model file
def _eval(args: list[str], cwd: Path, archive: str, cache_dir: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir}
    return preloaded_python.run([sys.executable, str(REPO / "eval.py"), "data.source=image_folder", *args,
                                 f"paths.log_dir={cwd}/logs"], cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_eval_from_a_checkpoint_reproduces_the_runs_accuracy(trained_run, tmp_path: Path, archive: str,
                                                             cache_dir: str) -> None:
    run_dir, _ = trained_run
    trained = json.loads((run_dir / "results.json").read_text())
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    plain = _eval([f"ckpt_path={checkpoint}", "data.test_subset=500", f"hydra.run.dir={tmp_path}/e1"],
                  tmp_path, archive, cache_dir)
    assert plain.returncode == 0, plain.stderr[-3000:]
    evaluated = json.loads((tmp_path / "e1" / "results.json").read_text())
    assert evaluated["test_acc"] == pytest.approx(trained["test_acc"], abs=1e-6)  # torchmetrics keeps fp32
    assert evaluated["test_images"] == 500 and evaluated["tta"].get("flip") is False
    assert "[eval] test acc" in plain.stdout and not (run_dir / "eval").exists()
    with_tta = _eval([f"ckpt_path={checkpoint}", "+trick=tta", "data.test_subset=500",
                      f"hydra.run.dir={tmp_path}/e2"], tmp_path, archive, cache_dir)
    assert with_tta.returncode == 0, with_tta.stderr[-3000:]
    assert json.loads((tmp_path / "e2" / "results.json").read_text())["tta"]["flip"] is True
    from_model_file = _eval([f"ckpt_path={run_dir / 'model.pt'}", "data.test_subset=500",
                             f"hydra.run.dir={tmp_path}/e3"], tmp_path, archive, cache_dir)
    assert from_model_file.returncode == 0, from_model_file.stderr[-3000:]
    assert json.loads((tmp_path / "e3" / "results.json").read_text())["test_acc"] == pytest.approx(
        trained["test_acc"], abs=1e-6)
    wrong_trick = _eval([f"ckpt_path={checkpoint}", "+trick=ema", f"hydra.run.dir={tmp_path}/e4"], tmp_path,
                        archive, cache_dir)
    assert wrong_trick.returncode == 2 and "changes training, not evaluation" in wrong_trick.stderr


@pytest.mark.slow
def test_a_finished_checkpoint_is_refused_for_training(trained_run, tmp_path: Path, archive: str,
                                                       cache_dir: str) -> None:
    run_dir, _ = trained_run
    result = run_train([*TINY, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}/r"],
                       tmp_path, cache_dir, archive)
    assert result.returncode == 2 and "already trained 1 epochs" in result.stderr and "eval.py" in result.stderr


@pytest.mark.slow
def test_model_file_loads_and_classifies(trained_run, real_data, tmp_path: Path) -> None:
    from PIL import Image

    from cifar_speedrun.operations.sources import select_subset
    from cifar_speedrun.records.model_file import load_model

    run_dir, _ = trained_run
    model = load_model(str(run_dir / "model.pt"))
    index = select_subset(real_data.test_y, 500, "per_class", 0)  # the run's data.test_subset=500
    images, labels = real_data.test_x[index], real_data.test_y[index]
    names = model.classify(images)
    accuracy = sum(name == model.classes[int(label)] for name, label in zip(names, labels, strict=True)) / 500
    trained = json.loads((run_dir / "results.json").read_text())
    assert accuracy == pytest.approx(trained["test_acc"], abs=1e-6)
    files = []
    for i in range(3):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path)
        files.append(str(path))
    assert model.classify(files) == names[:3]
    assert model(images[:4]).shape == (4, 10) and model.about["test_acc"] == pytest.approx(trained["test_acc"])


def test_model_file_refuses_a_foreign_class(tmp_path: Path) -> None:
    from cifar_speedrun.errors import UserError
    from cifar_speedrun.records.model_file import FORMAT, load_model

    torch.save({"format": FORMAT, "model_config": {"_target_": "os.system", "command": "echo owned"},
                "state_dict": {}, "mean": [0, 0, 0], "std": [1, 1, 1], "classes": ["a", "b"]}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not one of this project's model families"):
        load_model(str(tmp_path / "evil.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a cifar_speedrun model file"):
        load_model(str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------- debug presets, multirun summary
@pytest.mark.slow
def test_debug_smoke_runs_apart_from_real_results(tmp_path: Path, archive: str, cache_dir: str) -> None:
    result = run_train(["debug=smoke", "data.source=image_folder", "trainer=cpu"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "logs" / "debug" / "runs").glob("*/results.json"))
    assert len(runs) == 1 and not (tmp_path / "logs" / "train").exists()
    results = json.loads(runs[0].read_text())
    assert results["status"] == "ok" and results["epochs"] == 3 and results["config"]["model"]["width"] == 0.125
    assert not (runs[0].parent / "csv").exists(), "no logger"
    fdr = run_train(["debug=fdr", "data.source=image_folder", "trainer=cpu", "model.width=0.125",
                     "experiment=page_final"], tmp_path, cache_dir, archive)
    assert fdr.returncode == 0, fdr.stderr[-3000:]
    run_line = next(line for line in fdr.stdout.splitlines() if line.startswith("[run]"))
    assert "1 training batch of 512 and 1 evaluation batch" in run_line and "not the configured 10 epochs" in run_line
    done = next(line for line in fdr.stdout.splitlines() if line.startswith("[done]"))
    assert "ran without error" in done and "test acc" not in done, done
    records = [json.loads(p.read_text()) for p in (tmp_path / "logs" / "debug" / "runs").glob("*/results.json")]
    assert [r["test_acc"] for r in records if r["status"] == "debug"] == [None], "one batch: no accuracy to average"


@pytest.mark.slow
def test_multirun_says_how_many_jobs_failed(tmp_path: Path, archive: str, cache_dir: str) -> None:
    some = run_train(["-m", *TINY, "optim.lr=0.4,1e30", f"hydra.sweep.dir={tmp_path}/some"], tmp_path, cache_dir,
                     archive)
    assert some.returncode == 0
    assert "[multirun] 1 of 2 jobs ok, 1 of 2 jobs failed:" in some.stdout
    assert "job 1: failed (FloatingPointError: loss became NaN/inf" in some.stdout
    table = [line for line in some.stdout.splitlines() if line.startswith("|")]  # the report's table, printed
    assert len(table) >= 3 and "optim.lr=0.4" in "\n".join(table), some.stdout[-3000:]
    assert some.stdout.index(table[0]) < some.stdout.index("[multirun] 1 of 2 jobs ok"), "the table, then the summary"
    everything = run_train(["-m", *TINY, "optim.lr=1e30", f"hydra.sweep.dir={tmp_path}/all"], tmp_path, cache_dir,
                           archive)
    assert everything.returncode == 1 and "0 of 1 jobs ok, 1 of 1 jobs failed" in everything.stdout


# ---------------------------------------------------------------- the report's plot and comparison
def _rows(count: int) -> list[report_lib.Row]:
    rows = []
    for i in range(count):
        row = report_lib.Row(f"experiment=cpu_proxy stage=s{i}_x")
        for seed, acc in enumerate((0.999, 0.95, 0.9)):
            row.runs.append(report_lib.Run(Path("x"), i * 3 + seed, "ok", row.config, acc, 10.0 - i, None, 0.94,
                                           seed, None))
        rows.append(row)
    return rows


def test_plot_of_eight_stages_is_clipped_to_percentages(tmp_path: Path) -> None:
    low, high = report_lib.plot(_rows(8), tmp_path / "plot.png")
    assert 0 <= low < high <= 100  # the CI of (99.9, 95, 90) reaches past 100
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_compare_says_in_words_whether_the_difference_is_significant() -> None:
    rows = _rows(2)
    rows[1].runs = [report_lib.Run(Path("x"), 9 + s, "ok", rows[1].config, a, 5.0, None, 0.94, s, None)
                    for s, a in enumerate((0.5, 0.51, 0.52))]
    text = report_lib.compare(rows, "1", "2")
    assert text.startswith("Row 1 (stage=s0_x: 94.97%, n=3) vs row 2 (stage=s1_x: 51.00%, n=3)")
    assert "significant at the 5% level" in text and "not significant" not in text
    same = report_lib.compare(_rows(2), "1", "2")
    assert "not significant at the 5% level" in same


# ---------------------------------------------------------------- make test stops on Ctrl-C and SIGTERM
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
@pytest.mark.parametrize("where", ["inside a run", "outside a run"])
def test_a_signal_stops_the_test_suite_with_its_summary(signum: int, where: str, tmp_path: Path) -> None:
    """`make test` is pytest: a signal must stop it with pytest's own summary, also while a test runs train.py's
    main() in-process (whose handlers turn the signal into the run's clean exit) and after such a test."""
    ready = tmp_path / "ready"
    selected = "a_run_that_handles or after_it" if where == "inside a run" else "between_tests"
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
         str(REPO / "tests" / "signal_probe.py"), "-k", selected],
        cwd=REPO, env={**os.environ, "SIGNAL_PROBE_READY": str(ready)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        # as from a terminal: a shell's background job (CI's) ignores SIGINT, and children would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    child.send_signal(signum)
    out, _ = child.communicate(timeout=60)
    assert child.returncode != 0, out
    assert ready.read_text() in ("ready", "waiting"), "no test runs after the signal"
    import re

    assert re.search(r"^\d+ (passed|deselected).* in [\d.]+s", out, re.MULTILINE), out[-2000:]  # pytest's summary
    name = signal.Signals(signum).name
    assert f"interrupted by {name}" in out or "KeyboardInterrupt" in out, out[-2000:]  # Ctrl-C between tests: pytest's


def test_epochs_given_to_a_stage_says_it_replaces_the_rows_own(tmp_path: Path, monkeypatch, capsys) -> None:
    """`epochs=` beside a stage (or a stage sweep) replaces each row's own epochs: the run says so."""
    from test_faults import _main

    from cifar_speedrun import train as train_lib

    printed: list[str] = []
    monkeypatch.setattr(train_lib, "_fit", lambda cfg, run: (train_lib._say_if_epochs_replace_a_rows(cfg), {})[1])
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
    code, stderr = _main([*TINY, "stage=s3_celu_ghost_bn", f"hydra.run.dir={tmp_path}/run"], monkeypatch, capsys)
    assert code == 0, stderr
    assert any("epochs=1 from the command line replaces the 18 epochs stage=s3_celu_ghost_bn trains" in line
               for line in printed), printed
    printed.clear()
    without_epochs = [a for a in TINY if not a.startswith(("epochs=", "optim.schedule"))]
    code, stderr = _main([*without_epochs, "stage=s3_celu_ghost_bn", f"hydra.run.dir={tmp_path}/run2"], monkeypatch,
                         capsys)
    assert code == 0 and not any("replaces" in line for line in printed), printed
