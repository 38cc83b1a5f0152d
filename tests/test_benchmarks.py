"""The benchmarks run end to end (tiny settings). They print timings; nothing here asserts a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import preloaded_python
import pytest
import torch
from conftest import REPO

from cifar_speedrun.operations.layout import CIFAR10_CLASSES


def _run(args: list[str], archive: str, cache_dir: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
    return preloaded_python.run([sys.executable, *args], cwd=REPO, env=env, timeout=900)


@pytest.mark.slow
def test_gpu_speedrun_smoke_runs_recipes_side_by_side_on_cpu(tmp_path: Path, archive: str, cache_dir: str,
                                                              real_data) -> None:
    # Two recipes, two seeds each (airbench94_muon's step is covered by step_cost below; CI time is kept).
    # --peer: on the CPU the airbench peer only exports the same data and checks it with airbench's loader.
    # The step captured as a graph (graph-ready on a CPU) with its seeds, the eager step's profiled warm-up run
    # beside it, and page_final's layout chosen by a probe of both.
    result = _run(["benchmarks/gpu_speedrun.py", "--smoke", "--seeds", "2", "--experiments", "page_final",
                   "airbench94", "--out", str(tmp_path), "--peer", "--step-modes", "graph", "eager",
                   "--baseline-seeds", "0", "--probe", "page_final", "channels_last=true", "channels_last=false"],
                  archive, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_speedrun.json").read_text())
    peer = report["peer"]
    assert peer["package"] == "airbench" and peer["version"] == "0.1.8"
    assert peer["skipped"] == ("needs CUDA" if not torch.cuda.is_available() else "--smoke: export and check only")
    assert peer["check"] == {"train": 50_000, "test": 10_000, "classes": list(CIFAR10_CLASSES)}
    assert peer["data"]["source_id"] == real_data.source_id, "the project's own cache, the same images"
    exported = tmp_path / "runs" / "airbench-peer" / "cifar10"
    assert Path(peer["data"]["folder"]) == exported and "runs" not in peer
    assert torch.equal(torch.load(exported / "test.pt", weights_only=True)["labels"], real_data.test_y)
    assert "airbench 0.1.8 (peer): exported 50000 + 10000 images" in result.stdout
    assert all("ratio_to_peer" not in row for row in report["summary"].values()), "no peer runs, no ratio"
    assert len(report["runs"]) == 4 and {r["seed"] for r in report["runs"]} == {0, 1}
    assert set(report["summary"]) == {"page_final 32-true step=graph", "airbench94 32-true step=graph"}
    assert all(s["n"] == 2 for s in report["summary"].values())
    assert all(r["eval_seconds"] > 0 and r["whitening_fit_seconds"] is not None for r in report["runs"])
    assert all(r["step"] == {"mode": "graph", "captured": False, "captures": 0} for r in report["runs"])
    assert "(95% CI)" in result.stdout and "by airbench's rules" in result.stdout
    assert all(r["step_ms"]["host_ms"]["median"] > 0 for r in report["runs"]), "host ms/step of every run"
    assert set(report["warmups"]) == {"page_final step=graph", "page_final step=eager", "airbench94 step=graph",
                                      "airbench94 step=eager"}
    assert report["warmups"]["airbench94 step=eager"]["step"] == {"mode": "eager"}
    probe = report["probes"]["page_final step=graph"]
    assert [t["overrides"] for t in probe["tried"]] == [["channels_last=true"], ["channels_last=false"]]
    assert probe["chosen"] == min(probe["tried"], key=lambda t: t["device_ms_per_step"])["overrides"]
    assert report["summary"]["page_final 32-true step=graph"]["overrides"][-1] == probe["chosen"][0]
    page = json.loads((tmp_path / "runs" / "page_final-step=graph-32-true-seed0" / "results.json").read_text())
    assert set(page["tricks"]) >= {"ghost_bn", "whitening", "ema", "tta"}
    airbench = json.loads((tmp_path / "runs" / "airbench94-step=graph-32-true-seed0" / "results.json").read_text())
    assert {"alternating_flip", "lookahead"} <= set(airbench["tricks"])
    assert airbench["config"]["model"]["_target_"].endswith("AirbenchNet")


@pytest.mark.slow
def test_gpu_leave_one_out_writes_every_row_seed_major_and_completes_a_cut_run(tmp_path: Path, archive: str,
                                                                               cache_dir: str, real_data) -> None:
    from cifar_speedrun.records.report import load_runs_csv

    csv = tmp_path / "loo.csv"
    first = _run(["benchmarks/gpu_leave_one_out.py", "--smoke", "--seeds", "0", "--rows", "0", "--csv", str(csv)],
                 archive, cache_dir)  # a first call that did one run
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(load_runs_csv(csv)) == 1
    cut = _run(["benchmarks/gpu_leave_one_out.py", "--smoke", "--seeds", "0", "1", "--rows", "0", "8",
                "--csv", str(csv), "--budget-seconds", "0.001"], archive, cache_dir)
    assert cut.returncode == 0 and "budget of 0s reached after 0 runs; rerun to complete" in cut.stdout
    second = _run(["benchmarks/gpu_leave_one_out.py", "--smoke", "--seeds", "0", "1", "--rows", "0", "8",
                   "--csv", str(csv)], archive, cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = load_runs_csv(csv)
    assert [(int(r.seed), "ema," in r.config_key) for r in runs] == [(0, True), (0, False), (1, True), (1, False)]
    assert all(r.status == "ok" and r.config_key.endswith("step.mode=graph") for r in runs)
    assert "ema left out, seed 0" in second.stdout and "none left out, seed 0" not in second.stdout


@pytest.mark.slow
def test_cpu_benchmarks_print_their_ratios(archive: str, cache_dir: str, real_data, monkeypatch) -> None:
    loop = _run(["benchmarks/loop_overhead.py", "--width", "0.125", "--subset", "1024", "--epochs", "2",
                 "--repeats", "1"], archive, cache_dir)
    assert loop.returncode == 0, loop.stderr[-3000:]
    assert "ratio a/b = " in loop.stdout
    augment = _run(["benchmarks/augment_throughput.py", "--images", "2048", "--workers", "1", "--repeats", "1"],
                   archive, cache_dir)
    assert augment.returncode == 0, augment.stderr[-3000:]
    assert "ratio a/b = " in augment.stdout


@pytest.mark.slow
def test_muon_width_probe_measures_the_head_s_one_over_d_in_the_bias_gradients(archive: str, cache_dir: str,
                                                                               real_data) -> None:
    """The mechanism behind optim.width_reference_features, measured as the probe measures it: at
    initialization the BN-bias (and head) gradients grow as the width shrinks, the whitening bias's do not."""

    def rms(width: float) -> dict[str, float]:
        result = _run(["benchmarks/muon_width_probe.py", "--init-grads", f"model.width={width}",
                       "data.subset=2000", "data.batch_size=500"], archive, cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        numbers = result.stdout.strip().splitlines()[-1].split("RMS gradient at init ")[1]
        return {name: float(value) for name, value in (part.split() for part in numbers.split(", "))}

    narrow, wide = rms(0.125), rms(0.5)
    assert narrow["biases"] > 2.5 * wide["biases"] and narrow["head"] > 2.5 * wide["head"]  # d is 4x smaller
    assert 0.5 < narrow["whiten_bias"] / wide["whiten_bias"] < 2.0
    steps = _run(["benchmarks/muon_width_probe.py", "--steps", "3", "--every", "1", "model.width=0.125",
                  "data.subset=2000", "data.batch_size=500"], archive, cache_dir)
    assert steps.returncode == 0, steps.stderr[-3000:]
    rows = [line.split() for line in steps.stdout.splitlines() if line[:4].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [0, 1, 2] and all(len(row) == 9 for row in rows)


@pytest.mark.slow
def test_step_cost_counts_no_sync_and_few_ops_beyond_the_recipe(tmp_path: Path, archive: str, cache_dir: str,
                                                                real_data) -> None:
    """Counts may be asserted (times may not): no host sync in a step, and at most 1.25x the ops of the
    same recipe written as a plain loop (issue 18)."""
    out = tmp_path / "step_cost.json"
    # One recipe (Muon's, the most ops): test_step.py counts the syncs of every recipe; CI time is kept.
    result = _run(["benchmarks/step_cost.py", "--repeats", "1", "--experiments", "airbench94_muon",
                   "--json", str(out)], archive, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "host ms/step median" in result.stdout and "ops the project adds per step" in result.stdout
    for row in json.loads(out.read_text()):
        project, recipe = row["project"], row["recipe"]
        assert project["syncs"] == 0 and recipe["syncs"] == 0, row["experiment"]
        assert project["ops"] <= 1.25 * recipe["ops"], (row["experiment"], project["ops"], recipe["ops"])
        assert project["steps"] == recipe["steps"] > 100


@pytest.mark.slow
def test_bn_recalibration_replaces_the_saved_statistics_entirely(tmp_path: Path, archive: str, cache_dir: str,
                                                                  real_data) -> None:
    """End to end, as a user runs it: a model.pt whose BN statistics are wrecked (ghost BN's per-split ones too)
    scores lower as saved, and after re-estimation exactly what the intact model scores after re-estimation."""
    import csv

    import torch
    from conftest import TINY, run_train

    trained = run_train([*TINY, "+trick=ghost_bn", "model.norm.ghost_splits=4", f"hydra.run.dir={tmp_path}/run"],
                        tmp_path, cache_dir, archive)
    assert trained.returncode == 0, trained.stderr[-3000:]
    intact = tmp_path / "run" / "model.pt"
    blob = torch.load(intact, weights_only=True)
    wrecked_keys = [key for key in blob["state_dict"] if "running_mean" in key or "running_var" in key]
    assert any(key.endswith("split_running_var") for key in wrecked_keys), "the run used ghost BN"
    for key in wrecked_keys:
        blob["state_dict"][key] = blob["state_dict"][key] + 5.0 if "mean" in key else blob["state_dict"][key] * 50.0
    wrecked = tmp_path / "wrecked.pt"
    torch.save(blob, wrecked)

    out = tmp_path / "bn.csv"
    result = _run(["benchmarks/bn_recalibration.py", str(intact), str(wrecked), "--images", "1024", "--batch", "128",
                   "--path", archive, "--cache-dir", cache_dir, "--csv", str(out)], archive, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(row["run"]).name: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"model.pt", "wrecked.pt"} and "re-estimated" in result.stdout
    wrecked_row = rows["wrecked.pt"]
    as_saved, after = float(wrecked_row["test_acc_as_saved"]), float(wrecked_row["test_acc_bn_reestimated"])
    intact_as_saved = float(rows["model.pt"]["test_acc_as_saved"])
    # The wrecked statistics cost accuracy (a 1-epoch model is weak, so the gap is a few points) ...
    assert as_saved < min(intact_as_saved, after) - 2, rows
    # ... and re-estimating replaces them whole: the wrecked and the intact file end identical.
    assert after == float(rows["model.pt"]["test_acc_bn_reestimated"]), rows
    assert rows["model.pt"]["tricks"].split().count("ghost_bn") == 1 and rows["model.pt"]["images"] == "1024"


def test_bn_recalibration_sets_each_statistic_to_the_plain_mean_over_batches() -> None:
    """recalibrate() against a direct computation: stock BN's running mean/var become the mean over the
    batches of each batch's mean and unbiased variance (nothing saved survives, no moving average), and
    ghost BN's per-split statistics the mean over batches of what one pass on that batch alone gives."""
    import copy
    import importlib

    import torch
    from torch import nn

    from cifar_speedrun.recipe.models.layers import GhostBatchNorm

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        recalibrate = importlib.import_module("bn_recalibration").recalibrate
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 4, 4) * (k + 1) + k for k in range(3)]  # batches that differ, so order shows
    images = torch.cat(batches)

    plain = nn.Sequential(nn.BatchNorm2d(3))
    plain[0].running_mean.fill_(7.0)
    plain[0].running_var.fill_(9.0)
    assert recalibrate(plain, images, batch=8) == 1
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches])
    torch.testing.assert_close(plain[0].running_mean, means.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(plain[0].running_var, variances.mean(0), rtol=0, atol=1e-5)
    assert not plain.training, "left in eval mode"

    ghost = GhostBatchNorm(3, splits=2, eps=1e-5, momentum=0.1, scale_init=1.0, freeze_scale=False, float32=False)
    one_pass = []
    for batch_images in batches:
        alone = copy.deepcopy(ghost).train()
        alone.momentum = 1.0
        with torch.no_grad():
            alone(batch_images)
        one_pass.append((alone.split_running_mean.clone(), alone.split_running_var.clone()))
    ghost.split_running_mean.fill_(7.0)
    ghost.split_running_var.fill_(9.0)
    assert recalibrate(nn.Sequential(ghost), images, batch=8) == 1
    torch.testing.assert_close(ghost.split_running_mean, torch.stack([m for m, _ in one_pass]).mean(0),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(ghost.split_running_var, torch.stack([v for _, v in one_pass]).mean(0),
                               rtol=0, atol=1e-5)
