"""What a run records about itself: honest training time (TrainTimer) and results.json (ResultsWriter).

The training clock excludes evaluation and waits for the device at both ends; results.json is written
after every evaluation and at the end (or failure) of the run, and names the code that ran.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cifar_speedrun.devices import device_name
from cifar_speedrun.operations import storage


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainTimer(Callback):
    """Training wall time with evaluation excluded, read only after the device has finished.

    The clock runs from each training epoch's start to the start of its evaluation (or the epoch's
    end), with a device synchronize at both ends: CUDA kernels run asynchronously, so without it the
    clock would stop before the work does. The fitting of data-dependent layers before training
    (patch whitening: `whitening_fit_seconds`, measured by the module) counts as training, as airbench counts
    its whitening init inside its timer. Each evaluation is timed apart (`eval_seconds`, with TTA),
    so airbench's total (whitening + training + the final TTA evaluation) is train_seconds plus the
    last evaluation's seconds. After each evaluation it records the test accuracy and the cumulative
    training seconds, and the first time the accuracy reaches `target_acc`.
    """

    def __init__(self, *, target_acc: float, monitor: str = "test/acc") -> None:
        self.target_acc = float(target_acc)
        self.monitor = monitor
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.time_to_target: float | None = None
        self.epoch_to_target: int | None = None
        self.epochs_completed = 0
        self._started: float | None = None
        self._seconds_at_epoch_start = 0.0
        self.whitening_fit_seconds = 0.0
        self.eval_seconds: float | None = None  # of the last evaluation
        self._eval_started: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run refits its layers, but that was counted the first time
            self.whitening_fit_seconds = float(getattr(pl_module, "whitening_fit_seconds", 0.0) or 0.0)
            self.train_seconds += self.whitening_fit_seconds

    def _start(self, module: L.LightningModule) -> None:
        _synchronize(module.device)
        self._started = time.perf_counter()

    def _stop(self, module: L.LightningModule) -> None:
        if self._started is not None:
            _synchronize(module.device)
            self.train_seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seconds_at_epoch_start = self.train_seconds
        self._start(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)
        _synchronize(pl_module.device)
        self._eval_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)
        self.epochs_completed += 1
        epoch_seconds = self.train_seconds - self._seconds_at_epoch_start
        for logger in trainer.loggers:  # plain floats: no device sync
            logger.log_metrics({"time/epoch_seconds": epoch_seconds, "time/train_seconds": self.train_seconds},
                               step=trainer.global_step)
        # The epoch's train metrics join its history entry now, before the checkpoint is saved
        # (checkpointing runs after these hooks), so a resumed run's history is complete too.
        summary = getattr(pl_module, "epoch_train_metrics", None)
        if callable(summary) and self.history and self.history[-1]["epoch"] == trainer.current_epoch + 1:
            self.history[-1].update(summary())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._eval_started is not None:
            _synchronize(pl_module.device)
            self.eval_seconds = time.perf_counter() - self._eval_started
            self._eval_started = None
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        accuracy = float(trainer.callback_metrics[self.monitor])
        entry = {"epoch": trainer.current_epoch + 1, "test_acc": accuracy, "train_seconds": self.train_seconds,
                 "eval_seconds": self.eval_seconds}
        for key in ("test/loss", "val/acc", "val/loss"):  # val/*: with data.val_split
            if key in trainer.callback_metrics:
                entry[key.replace("/", "_")] = float(trainer.callback_metrics[key])
        self.history.append(entry)
        if self.time_to_target is None and accuracy >= self.target_acc:
            self.time_to_target = self.train_seconds
            self.epoch_to_target = trainer.current_epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "history": self.history,
                "time_to_target": self.time_to_target, "epoch_to_target": self.epoch_to_target,
                "epochs_completed": self.epochs_completed, "whitening_fit_seconds": self.whitening_fit_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.history = list(state_dict["history"])
        self.time_to_target = state_dict["time_to_target"]
        self.epoch_to_target = state_dict["epoch_to_target"]
        self.epochs_completed = state_dict.get("epochs_completed", len(self.history))
        # checkpoints written before the rename call it fit_seconds
        self.whitening_fit_seconds = state_dict.get("whitening_fit_seconds", state_dict.get("fit_seconds", 0.0))


# The repository the running code comes from: results name the code that ran, wherever it was started.
CODE_DIR = os.path.dirname(os.path.abspath(__file__))


def git_commit(directory: str | os.PathLike[str] = CODE_DIR) -> str | None:
    """The commit checked out in the repository holding `directory` ('-dirty' with uncommitted
    changes to tracked files), or None outside a git checkout (an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """The code's commit, or the installed package's version when it does not run from a checkout."""
    commit = git_commit()
    if commit:
        return commit
    try:
        from importlib.metadata import version

        return f"cifar_speedrun {version('cifar_speedrun')} (installed, no git checkout)"
    except Exception:
        return "unknown"


# What a run leaves in its folder besides Hydra's own `.hydra/` (which the new run has already rewritten).
RUN_OUTPUTS = ("results.json", "model.pt", "checkpoints", "csv", "tensorboard", "wandb")
# Set-aside runs go to `earlier-<time>/` inside the folder; the report and the summaries skip those folders.
SET_ASIDE_PREFIX = "earlier-"


def set_aside_earlier_run(output_dir: str, continuing: bool) -> str | None:
    """What an earlier run left in this run's folder, moved into `earlier-<its start time>/` beside it.

    Everything that reads a folder (the multirun summary, the report, the search, eval.py of its model.pt,
    a resume of its last.ckpt) takes what is there for the run last started there, so it must be this
    run's from the start: a job that now fails before training would otherwise leave the earlier run's
    "ok", accuracy, model.pt and checkpoint standing under its own overrides. Kept, not deleted: nothing
    written is lost. A run that continues the folder's run (`continuing`: resume=true, or a checkpoint of
    this folder) keeps what it continues. Local folders only (a remote one is left as it is). Returns
    the folder the earlier run went to, or None when there was none.
    """
    if continuing or not storage.is_local(output_dir) or not os.path.exists(os.path.join(output_dir, "results.json")):
        return None
    try:
        started = storage.read_json(os.path.join(output_dir, "results.json")).get("started_at")
    except Exception:  # unreadable or not JSON: still an earlier run's, still kept
        started = None
    stamp = str(started or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    stamp = "".join(c for c in stamp if c.isalnum())[:15]  # 2026-01-02T03:04:05+00:00 -> 20260102T030405
    target = os.path.join(output_dir, f"{SET_ASIDE_PREFIX}{stamp}")
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(output_dir, f"{SET_ASIDE_PREFIX}{stamp}-{suffix}")
    os.makedirs(target)
    for name in RUN_OUTPUTS:
        if os.path.lexists(os.path.join(output_dir, name)):
            os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    return target


class ResultsWriter(Callback):
    """Writes `results.json` in the run's output dir, when the run ends or fails.

    The file is rewritten atomically after every evaluation too, so a run that dies (or is killed)
    still leaves the epochs it finished. Only global rank 0 writes.
    """

    def __init__(self, output_dir: str, filename: str = "results.json") -> None:
        self.path = storage.join(output_dir, filename)
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        # The code that trains is the code imported at the start: a checkout edited while the run goes on
        # (results written, docs changed) must not relabel it as '-dirty' or as another commit at the end.
        self._commit = code_version()
        self.result: dict[str, Any] | None = None  # the last record written
        self.write_error: Exception | None = None

    def _timer(self, trainer: L.Trainer) -> TrainTimer | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, TrainTimer)), None)

    def record(self, trainer: L.Trainer, module: L.LightningModule, status: str,
               error: str | None = None) -> dict[str, Any]:
        timer = self._timer(trainer)
        history = timer.history if timer else []
        run_config = dict(getattr(module, "hparams", {}).get("run_config") or {})
        result = {
            "status": status,
            "error": error,
            "test_acc": history[-1]["test_acc"] if history and not trainer.fast_dev_run else None,
            "val_acc": history[-1].get("val_acc") if history else None,
            "val_images": getattr(trainer.datamodule, "num_val_images", 0) if trainer.datamodule else 0,
            "train_seconds": timer.train_seconds if timer else None,
            "whitening_fit_seconds": timer.whitening_fit_seconds if timer else None,
            "eval_seconds": timer.eval_seconds if timer else None,
            "epochs": timer.epochs_completed if timer else None,
            "max_epochs": trainer.max_epochs,
            "target_acc": timer.target_acc if timer else None,
            "time_to_target": timer.time_to_target if timer else None,
            "epoch_to_target": timer.epoch_to_target if timer else None,
            "history": history,
            "seed": run_config.get("seed"),
            "tricks": run_config.get("tricks", []),
            "overrides": run_config.get("overrides", ""),
            "effective_optim": getattr(module, "effective", None),
            "warmup_seconds": getattr(module, "warmup_seconds", None),
            "step": module.train_step.summary() if getattr(module, "train_step", None) else {"mode": "eager"},
            "data_source": run_config.get("data_source"),
            # which bytes: the archive's hash (sources.source_identity); a resume on other data is refused
            "source_id": getattr(trainer.datamodule, "source_id", None) if trainer.datamodule else None,
            "run_keys": run_config.get("run_keys"),
            "wandb_group": run_config.get("wandb_group"),
            "device": device_name(module.device),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "versions": {"torch": torch.__version__, "lightning": L.__version__,
                         "python": platform.python_version()},
            "git_commit": self._commit,
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": run_config.get("config"),
        }
        for callback in trainer.callbacks:  # measurement callbacks (StepClock, op_count.StepOps) add their numbers
            entry = getattr(callback, "results_entry", None)
            if callable(entry):
                result.update(entry())
        if trainer.is_global_zero:
            storage.write_json_atomic(result, self.path)
        self.result = result
        return result

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.record(trainer, pl_module, "running")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # debug=fdr (fast_dev_run) trains and evaluates one batch: it ran, but it has no accuracy to report
        self.record(trainer, pl_module, "debug" if trainer.fast_dev_run else "ok")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from cifar_speedrun.errors import describe
        from cifar_speedrun.operations.interrupts import RunInterrupted

        status = "interrupted" if isinstance(exception, (KeyboardInterrupt, RunInterrupted)) else "failed"
        try:
            self.record(trainer, pl_module, status, describe(exception))
        except Exception as error:  # e.g. the disk is full: keep the original error; train.py says what the file holds
            self.write_error = error
