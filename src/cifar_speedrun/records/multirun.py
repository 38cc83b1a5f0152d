"""The end of a multirun: how many of its jobs failed, its table of mean ± CI over seeds, and the command
that writes the report (table, CSV, plot).

A failed job records itself (results.json with status 'failed') and the sweep goes on, so without a
summary a sweep of 24 jobs with 3 failures ends looking like a success. Registered as a Hydra
callback (conf/hydra/default.yaml); it reads the results.json of the jobs this multirun started, so
it works with every launcher, local or submitit. When every job failed it exits non-zero.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def job_outcomes(sweep_dir: Path, since: float = 0.0) -> list[tuple[str, str, str | None]]:
    """(job folder, status, error) of every job under `sweep_dir` whose config was written after `since`."""
    outcomes = []
    for config in sorted(sweep_dir.rglob(".hydra/config.yaml")):
        if config.stat().st_mtime < since:
            continue  # a job of an earlier multirun into the same folder
        job = config.parent.parent
        results = job / "results.json"
        try:
            if results.stat().st_mtime < since:  # train() sets an earlier record aside; this one never started
                status, error = "no results.json of this run", "the folder's results.json is an earlier run's"
            else:
                record = json.loads(results.read_text())
                status, error = str(record.get("status")), record.get("error")
        except (OSError, ValueError, AttributeError):
            status, error = "no results.json", None
        outcomes.append((str(job.relative_to(sweep_dir)) or ".", status, error))
    return outcomes


def summary_lines(sweep_dir: Path, outcomes: list[tuple[str, str, str | None]]) -> list[str]:
    failed = [(job, status, error) for job, status, error in outcomes if status not in ("ok", "debug")]
    lines = [f"[multirun] {len(outcomes) - len(failed)} of {len(outcomes)} jobs ok"
             + (f", {len(failed)} of {len(outcomes)} jobs failed:" if failed else "")]
    lines += [f"  job {job}: {status}{f' ({error})' if error else ''}" for job, status, error in failed]
    lines.append(f"[multirun] report (table, CSV, plot): python -m cifar_speedrun.records.report {sweep_dir}")
    return lines


def table_lines(sweep_dir: Path, jobs: list[str]) -> list[str]:
    """The report's table of the jobs this multirun ran (`jobs`, folders under `sweep_dir`: not an earlier
    multirun's jobs in the same folder), as report.md would hold it; a folder the report cannot read gives
    its one-line reason instead (the summary below says what each job did)."""
    from cifar_speedrun.records.report import ReportError, multirun_table

    try:
        return multirun_table(sweep_dir, [sweep_dir / job for job in jobs]).rstrip().splitlines()
    except ReportError as error:
        return [f"[multirun] no table: {error}"]


class MultirunSummary(Callback):
    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have coarse resolution on some filesystems

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        outcomes = job_outcomes(sweep_dir, self.started)
        table = table_lines(sweep_dir, [job for job, _, _ in outcomes]) if outcomes else []
        for line in [*table, *summary_lines(sweep_dir, outcomes)]:
            print(line, flush=True)
        if outcomes and all(status not in ("ok", "debug") for _, status, _ in outcomes):
            raise SystemExit(1)
