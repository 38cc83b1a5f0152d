"""Scale-out and faults: DDP, submitit sweeps, fsspec paths, resume after SIGKILL, NaN, bad input, determinism."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from conftest import REPO, TINY, run_train
from hydra.core.global_hydra import GlobalHydra

from cifar_speedrun import train as train_lib

# Three short epochs on 512 real images: long enough to kill in the middle, short enough for CI.
THREE_EPOCHS = [o for o in TINY if not o.startswith(("epochs=", "optim.schedule", "data.subset"))] + [
    "epochs=3", "optim.schedule.epochs=[0,1,3]", "data.subset=2048"]


def _metrics(results: dict) -> list:
    return [(h["epoch"], h["test_acc"], h.get("train_loss"), h.get("train_acc")) for h in results["history"]]


# ---------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes_shard_the_data(tmp_path: Path, archive: str, cache_dir: str, real_data) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_probe.py"), str(tmp_path), archive, cache_dir],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    per_rank_batch, per_rank_images = 64, 500  # global batch 128 over 2 ranks; 1000 images
    steps = per_rank_images // per_rank_batch
    for epoch in range(2):
        first, second = (set(r["epochs"][epoch]) for r in ranks)
        assert len(first) == len(second) == steps * per_rank_batch
        assert not first & second, "ranks draw disjoint images"
        assert (first | second) <= set(range(1000))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1], "a new shared permutation each epoch"
    assert [r["test_images_on_rank"] for r in ranks] == [250, 250]  # test set split too
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["status"] == "ok"
    assert results["test_acc"] == pytest.approx(ranks[0]["test_acc"]) == pytest.approx(ranks[1]["test_acc"])
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        logged = [row["test/acc"] for row in csv.DictReader(handle) if row.get("test/acc")]
    assert float(logged[-1]) == pytest.approx(results["test_acc"])


# ---------------------------------------------------------------- submitit
@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path: Path, archive: str, cache_dir: str) -> None:
    sweep = tmp_path / "multi"
    result = run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                        "hydra.launcher.cpus_per_task=1", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"],
                       tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["seed"] for r in results] == [0, 1] and all(r["status"] == "ok" for r in results)
    assert (sweep / ".submitit").is_dir()


# ---------------------------------------------------------------- fsspec paths
def test_memory_filesystem_for_cache_results_and_checkpoints(compose_cfg, archive: str, cache_dir: str,
                                                              real_data, capsys) -> None:
    from omegaconf import open_dict

    fs = fsspec.filesystem("memory")
    for local in Path(cache_dir).glob("*.pt"):  # the decoded cache, read back through fsspec
        fs.pipe_file(f"/cache/{local.name}", local.read_bytes())
    cfg = compose_cfg(*TINY, "epochs=1")
    with open_dict(cfg):
        cfg.paths.output_dir = "memory://runs/one"
        cfg.paths.checkpoint_dir = "memory://runs/one/checkpoints"
        cfg.paths.cache_dir = "memory://cache"
        cfg.data.cache_dir = "memory://cache"
        cfg.logger = None
        del cfg["hydra"]
    result = train_lib.train(cfg)
    assert result["status"] == "ok"
    assert json.loads(fs.cat("/runs/one/results.json"))["test_acc"] == result["test_acc"]
    assert fs.exists("/runs/one/checkpoints/last.ckpt")
    assert "loaded cached CIFAR-10" in capsys.readouterr().out, "uint8 cache read through fsspec"
    assert not [p for p in fs.find("/") if ".tmp-" in p], "no temporary files left"


# ---------------------------------------------------------------- resume after SIGKILL, determinism
@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path, archive: str, cache_dir: str) -> None:
    """CPU kernels are deterministic for a fixed thread count, and every random draw comes from
    seeded generators whose states are checkpointed, so the resumed run must match exactly; we
    allow 1e-6 on losses only for float formatting, and compare accuracies exactly."""
    reference = run_train([*THREE_EPOCHS, f"hydra.run.dir={tmp_path}/a"], tmp_path, cache_dir, archive)
    again = run_train([*THREE_EPOCHS, f"hydra.run.dir={tmp_path}/b"], tmp_path, cache_dir, archive)
    assert reference.returncode == 0 and again.returncode == 0, reference.stderr[-2000:]
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert _metrics(first) == _metrics(second), "same seed on CPU => identical metrics"

    run_dir = tmp_path / "c"
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *THREE_EPOCHS, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    size = -1
    while process.poll() is None and checkpoint.stat().st_size != size:  # until epoch 1's file is complete
        size = checkpoint.stat().st_size
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = json.loads((run_dir / "results.json").read_text())
    assert interrupted["status"] == "running" and len(interrupted["history"]) < 3, "killed mid-run"
    resumed = run_train([*THREE_EPOCHS, f"hydra.run.dir={run_dir}", "resume=true"], tmp_path, cache_dir, archive)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "ok" and final["epochs"] == 3
    for got, want in zip(_metrics(final), _metrics(first), strict=True):
        assert got[:2] == want[:2]
        assert got[2] == pytest.approx(want[2], abs=1e-6) and got[3] == pytest.approx(want[3], abs=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_results(tmp_path: Path, archive: str, cache_dir: str) -> None:
    result = run_train([*TINY, "optim.lr=1e30", f"hydra.run.dir={tmp_path}/run"], tmp_path, cache_dir, archive)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NaN/inf at step" in lines[0] and "lr 1e+30" in lines[0]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "NaN" in results["error"]


# ---------------------------------------------------------------- bad input: one line, non-zero exit, no traceback
def _corrupt_archive(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(64))
    return str(path)


BAD_INPUTS = [
    # (name, overrides, expected part of the message)
    ("unknown trick", ["+trick=label_smoothin"], "unknown trick 'label_smoothin'; available:"),
    ("unknown experiment", ["experiment=page_finale"], "unknown experiment 'page_finale'"),
    ("unknown logger", ["logger=wandbb"], "unknown logger 'wandbb'"),
    ("typo in a key", ["optim.lrr=0.1"], "unknown key optim.lrr: did you mean optim.lr=0.1?"),
    ("a trick that does not apply", ["model=resnet18", "+trick=pool_before_norm"],
     "trick=pool_before_norm sets model.pool_before_norm, which this configuration does not have"),
    ("wrong type", ["data.batch_size=abc"], "data.batch_size='abc' must be a positive integer"),
    ("negative batch size", ["data.batch_size=-512"], "data.batch_size=-512 must be a positive integer"),
    ("batch not divisible by world size", ["trainer=ddp", "data.batch_size=511"], "not divisible by the 2 devices"),
    ("batch not divisible by ghost splits", ["+trick=ghost_bn", "data.batch_size=200"], "divisible by 16"),
    ("missing dataset", ["data.path=/nonexistent/cifar.tar.gz"], "CIFAR-10 not found at data.path="),
    ("corrupt dataset", ["data.path={corrupt}", "paths.cache_dir={tmp}/cache"], "could not extract"),
    ("unwritable output dir", ["hydra.run.dir=/proc/forbidden/run"], "cannot use hydra.run.dir=/proc/forbidden/run"),
    ("schedule out of order", ["optim.schedule.epochs=[0,5,3]"], "are out of order"),
    ("width <= 0", ["model.width=0"], "model.width=0 must be a number > 0"),
    ("momentum >= 1", ["optim.momentum=1.0"], "optim.momentum=1.0 must be a number in [0, 1)"),
    ("label smoothing >= 1", ["loss.label_smoothing=1.5"], "loss.label_smoothing=1.5 must be a number in [0, 1)"),
    ("unknown data source", ["data.source=kaggle"], "data.source='kaggle' is not known"),
    ("subset smaller than a batch", ["data.subset=100"], "smaller than data.batch_size=512"),
    ("schedule longer than the run", ["epochs=3", "optim.schedule.epochs=[0,5,24]"],
     "ends at 24 but the run has epochs=3"),
    ("max_epochs that differs from epochs", ["trainer.max_epochs=5"],
     "trainer.max_epochs=5 differs from epochs=24: set epochs=5"),
    ("schedule knot that is not arithmetic in epochs", ["optim.schedule.epochs=[0,epoch/5,epochs]"],
     "knot 'epoch/5' is not a number or an expression in `epochs`"),
    ("too few epochs for the final recipe's knots", ["experiment=page_final", "epochs=2"],
     "at epochs=2 gives [0.0, 0.4, 0.0]"),
    ("missing checkpoint", ["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt does not exist"),
    ("resume without a checkpoint", ["resume=true"], "resume=true but there is no"),
    ("image_folder without a path", ["data.path=null"], "needs data.path="),
]


@pytest.mark.parametrize("name,overrides,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line(name, overrides, message, tmp_path: Path, archive: str, cache_dir: str,
                               monkeypatch, capsys) -> None:
    overrides = [o.format(corrupt=_corrupt_archive(tmp_path) if "{corrupt}" in o else "", tmp=tmp_path)
                 for o in overrides]
    base = ["trainer=cpu", "data.source=image_folder", f"data.path={archive}", f"paths.cache_dir={cache_dir}",
            "model.width=0.125", "trainer.enable_progress_bar=false", "logger=none"]
    run_dir = [] if any(o.startswith("hydra.run.dir") for o in overrides) else [f"hydra.run.dir={tmp_path}/run"]
    monkeypatch.setattr(sys, "argv", ["train.py", *base, *overrides, *run_dir])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        train_lib.main()
    GlobalHydra.instance().clear()
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[", "Using", "GPU", "TPU"))]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_input_table_in_docs_lists_every_case() -> None:
    operations = (REPO / "docs" / "operations.md").read_text()
    for name, _, _ in BAD_INPUTS:
        assert f"| {name} |" in operations, name


@pytest.mark.slow
def test_debug_flag_shows_the_traceback(tmp_path: Path, archive: str, cache_dir: str) -> None:
    result = run_train(["--debug", *TINY, "model.width=0"], tmp_path, cache_dir, archive)
    assert result.returncode != 0 and "Traceback" in result.stderr


