"""A CSV logger that a resumed run appends to, instead of deleting what the run logged before.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts, so resuming an interrupted
run (or a finished one, by mistake) loses the metrics of every epoch before the interruption. This
one keeps the file: a resumed run keeps the rows up to its checkpoint's step (later rows were logged
by steps that are about to be trained again) and appends from there; a fresh run starts a fresh file.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; the logger decides instead
        return


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments, same files), kept across a resume."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_through: int | None = None

    def keep_through_step(self, step: int | None) -> None:
        """Resuming from a checkpoint at `step`: keep metrics.csv's rows up to it. None: start fresh."""
        self._keep_through = step

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is not None:
            return self._experiment
        os.makedirs(self.root_dir, exist_ok=True)
        writer = _KeepingWriter(log_dir=self.log_dir)
        path = writer.metrics_file_path
        if os.path.isfile(path):
            if self._keep_through is None:
                os.remove(path)
            else:
                _trim(path, self._keep_through)
                with open(path, newline="") as handle:
                    writer.metrics_keys = list(csv.DictReader(handle).fieldnames or [])
        self._experiment = writer
        return writer


def _trim(path: str, step: int) -> None:
    """Drop the rows logged after `step` (rewritten atomically beside the file)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = [row for row in reader if not row.get("step") or int(float(row["step"])) <= step]
    temp = f"{path}.trim"
    with open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, path)
