"""The benchmarks run end to end (tiny settings). They print timings; nothing here asserts a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _run(args: list[str], archive: str, cache_dir: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_gpu_speedrun_smoke_runs_end_to_end_on_cpu(tmp_path: Path, archive: str, cache_dir: str, real_data) -> None:
    result = _run(["benchmarks/gpu_speedrun.py", "--smoke", "--seeds", "2", "--out", str(tmp_path)],
                  archive, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_speedrun.json").read_text())
    assert len(report["runs"]) == 2 and {r["seed"] for r in report["runs"]} == {0, 1}
    assert report["summary"]["32-true"]["n"] == 2 and "experiment=page_final" in report["overrides"]
    assert "mean" in result.stdout and "(95% CI)" in result.stdout
    results = json.loads((tmp_path / "32-true-seed0" / "results.json").read_text())
    assert set(results["tricks"]) >= {"ghost_bn", "whitening", "ema", "tta"}


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
