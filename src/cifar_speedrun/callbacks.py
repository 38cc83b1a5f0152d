"""Callbacks: honest training time, time-to-target, the lr, results.json, model.pt, and the EMA of the weights."""

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
from lightning.pytorch.callbacks import Callback, WeightAveraging
from pydantic import Field

from cifar_speedrun import storage
from cifar_speedrun.devices import device_name
from cifar_speedrun.typed_sections import Section, check


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainTimer(Callback):
    """Training wall time with evaluation excluded, read only after the device has finished.

    The clock runs from each training epoch's start to the start of its evaluation (or the epoch's
    end), with a device synchronize at both ends: CUDA kernels run asynchronously, so without it the
    clock would stop before the work does. The fitting of data-dependent layers before training
    (patch whitening: `fit_seconds`, measured by the module) counts as training, as airbench counts
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
        self.fit_seconds = 0.0
        self.eval_seconds: float | None = None  # of the last evaluation
        self._eval_started: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run refits its layers, but that was counted the first time
            self.fit_seconds = float(getattr(pl_module, "fit_seconds", 0.0) or 0.0)
            self.train_seconds += self.fit_seconds

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
                "epochs_completed": self.epochs_completed, "fit_seconds": self.fit_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.history = list(state_dict["history"])
        self.time_to_target = state_dict["time_to_target"]
        self.epoch_to_target = state_dict["epoch_to_target"]
        self.epochs_completed = state_dict.get("epochs_completed", len(self.history))
        self.fit_seconds = state_dict.get("fit_seconds", 0.0)


def kernel_table(events: Any, device: str, steps: int, top: int = 10) -> dict[str, Any]:
    """Device work per step by kernel name: launches per step and the `top` kernels by device time.

    What a profiled window ran on the device, so a recipe's time can be read kernel by kernel (which
    convolutions, norms and copies cost what) and its launches per step counted."""
    totals: dict[str, list[float]] = {}
    launches = 0
    for event in events:
        if not str(event.device_type()).endswith(device):
            continue
        launches += 1
        entry = totals.setdefault(event.name(), [0.0, 0])
        entry[0] += (event.end_ns() - event.start_ns()) / 1e6
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    total_ms = sum(ms for ms, _ in totals.values())
    return {"launches_per_step": launches / max(1, steps), "kernels": len(totals),
            "top": [{"name": name[:160], "ms_per_step": ms / max(1, steps), "calls_per_step": calls / max(1, steps),
                     "share": ms / total_ms if total_ms else None} for name, (ms, calls) in ranked[:top]]}


def busy_nanoseconds(events: Any, device: str) -> int:
    """Time during which at least one profiled event of `device` ran (overlaps counted once)."""
    spans = sorted((e.start_ns(), e.end_ns()) for e in events if str(e.device_type()).endswith(device))
    busy, end = 0, None
    for start, stop in spans:
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy


class StepClock(Callback):
    """Host and device milliseconds per training step: is the run host-bound or device-bound?

    At each training step's start it reads the host clock and records a CUDA event, without a
    synchronize; the events are read at each epoch's end, after the device has finished (the
    TrainTimer synchronizes there). Per step, host ms is the host's time from one step's start to
    the next, device ms the device's; each epoch's last step is left out (its interval holds the
    epoch's end and evaluation), and so are the first `skip_epochs` epochs (cuDNN autotune,
    allocator growth). When the host enqueues work faster than the device runs it, host ms < device
    ms (device-bound, as a speedrun should be); when host ms ~ device ms the device may be waiting.

    `profile_steps` > 0 also runs torch.profiler (device activity only) over that many steps of the
    second epoch and sums the device's kernel and copy time per step: `busy_fraction` = kernel time
    / wall time, well below 1 when the device waits for the host. Profiling slows the host a little,
    so use it in a run that is not reported. `keep_all` keeps every step's host ms in the summary.
    """

    def __init__(self, profile_steps: int = 0, profile_skip: int = 5, skip_epochs: int = 1,
                 keep_all: bool = False) -> None:
        self.profile_steps = int(profile_steps)
        self.profile_skip = int(profile_skip)
        self.skip_epochs = int(skip_epochs)
        self.keep_all = bool(keep_all)
        self._host: list[float] = []
        self._events: list[Any] = []
        self.host_ms: list[float] = []
        self.device_ms: list[float] = []
        self.profile: dict[str, Any] | None = None
        self._profiler: Any = None
        self._profile_started: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._host, self._events = [], []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.profile_steps > 0 and trainer.current_epoch == 1 and pl_module.device.type == "cuda":
            if batch_idx == self.profile_skip:
                self._start_profiler()
            elif batch_idx == self.profile_skip + self.profile_steps and self._profiler is not None:
                self._stop_profiler()
        if trainer.current_epoch < self.skip_epochs:
            return
        self._host.append(time.perf_counter())
        if pl_module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append(event)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._close()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def _close(self) -> None:
        if self._profiler is not None:  # the epoch was shorter than the window
            self._stop_profiler()
        host, events, self._host, self._events = self._host, self._events, [], []
        self.host_ms += [1000 * (b - a) for a, b in zip(host, host[1:], strict=False)]
        if len(events) > 1:
            events[-1].synchronize()
            self.device_ms += [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]

    def _start_profiler(self) -> None:
        try:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.__enter__()
            self._profile_started = time.perf_counter()
        except Exception as error:  # a measurement aid: never stop the run
            self._profiler = None
            self.profile = {"error": f"{type(error).__name__}: {error}"}

    def _stop_profiler(self) -> None:
        profiler, self._profiler = self._profiler, None
        try:
            torch.cuda.synchronize()
            wall = time.perf_counter() - (self._profile_started or 0.0)
            profiler.__exit__(None, None, None)
            events = profiler.profiler.kineto_results.events()
            busy_ns = busy_nanoseconds(events, "CUDA")
            steps = self.profile_steps
            self.profile = {"steps": steps, "wall_ms_per_step": 1000 * wall / steps,
                            "device_busy_ms_per_step": busy_ns / 1e6 / steps,
                            "busy_fraction": busy_ns / 1e9 / wall if wall > 0 else None,
                            **kernel_table(events, "CUDA", steps)}
        except Exception as error:
            self.profile = {"error": f"{type(error).__name__}: {error}"}

    def summary(self) -> dict[str, Any]:
        """Medians and means over the measured steps (a run too short to measure: none)."""

        def stats(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            ordered = sorted(values)
            return {"median": ordered[len(ordered) // 2], "mean": sum(values) / len(values)}

        out = {"steps": len(self.host_ms), "host_ms": stats(self.host_ms), "device_ms": stats(self.device_ms),
               "profile": self.profile}
        if self.keep_all:
            out["host_ms_all"] = list(self.host_ms)
        return out

    def results_entry(self) -> dict[str, Any]:
        """What results.json records of this callback."""
        return {"step_ms": self.summary()}


class LearningRateLogger(Callback):
    """The learning rate of every parameter group (lr/weights, lr/biases), every `every_n_steps` steps.

    Read from the optimizer's param_groups, which hold Python floats: unlike Lightning's
    LearningRateMonitor, which turns each value into a tensor on the device, it never waits on it.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps taken, this one included
        every = self.every_n_steps or trainer.log_every_n_steps
        if step != 1 and step % max(1, every):
            return
        values = {}
        rates = getattr(pl_module, "learning_rates", None)
        if callable(rates) and rates(step):  # the module's host-side schedule: its lrs may be device tensors
            values = {f"lr/{name}": float(lr) for name, lr in rates(step).items()}
        else:
            for optimizer in trainer.optimizers:
                for index, group in enumerate(optimizer.param_groups):
                    values[f"lr/{group.get('name') or f'group{index}'}"] = float(group["lr"])
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


class ModelFileWriter(Callback):
    """At the end of fit, `model.pt`: the trained network, self-contained (model_file.py says how to use it).

    Written after the EMA callback has copied the averaged weights in, so it holds what was evaluated.
    """

    def __init__(self, output_dir: str, filename: str = "model.pt") -> None:
        self.path = storage.join(output_dir, filename)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from cifar_speedrun.model_file import DATA_FROM_RUN, save_model_file
        from cifar_speedrun.sources import CIFAR10_CLASSES

        if not trainer.is_global_zero:
            return
        run_config = dict(pl_module.hparams.get("run_config") or {})
        model_config = (run_config.get("config") or {}).get("model")
        datamodule = trainer.datamodule
        if model_config is None or datamodule is None:
            return
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, TrainTimer)), None)
        about = {"test_acc": timer.history[-1]["test_acc"] if timer and timer.history else None,
                 "epochs": trainer.current_epoch, "seed": run_config.get("seed"),
                 "tricks": run_config.get("tricks", []), "data": run_config.get("data_source")}
        data_config = (run_config.get("config") or {}).get("data") or {}
        data = {key: data_config.get(key) for key in DATA_FROM_RUN if key in data_config}
        if getattr(datamodule, "source_id", None):
            data["source_id"] = datamodule.source_id
        save_model_file(self.path, pl_module.net, model_config, datamodule.mean, datamodule.std, CIFAR10_CLASSES,
                        getattr(pl_module, "tta", None), about, data, str(trainer.precision))


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
            "test_acc": history[-1]["test_acc"] if history else None,
            "val_acc": history[-1].get("val_acc") if history else None,
            "val_images": getattr(trainer.datamodule, "num_val_images", 0) if trainer.datamodule else 0,
            "train_seconds": timer.train_seconds if timer else None,
            "fit_seconds": timer.fit_seconds if timer else None,
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
        self.record(trainer, pl_module, "ok")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from cifar_speedrun.errors import describe
        from cifar_speedrun.interrupts import RunInterrupted

        status = "interrupted" if isinstance(exception, (KeyboardInterrupt, RunInterrupted)) else "failed"
        try:
            self.record(trainer, pl_module, status, describe(exception))
        except Exception as error:  # e.g. the disk is full: keep the original error; train.py says what the file holds
            self.write_error = error


class _GuardedAveraging(WeightAveraging):
    """Lightning's WeightAveraging with its update done here: no host sync, a few foreach kernels.

    Lightning's callback updates through torch's AveragedModel.update_parameters, which tests
    `n_averaged == 0` on the device every update (a host sync on a GPU) and detaches every tensor
    one by one. Here the number of updates is counted on the host (`updates`, kept in checkpoints),
    the first update copies the weights and later ones apply `average_step` to the floating-point
    tensors, all in `torch._foreach_*` calls under no_grad; `n_averaged` is advanced on the device
    for torch's bookkeeping without being read.

    It also leaves the model alone until the average holds an update: Lightning creates the
    averaged copy when fit starts (the initial weights), swaps it in for every evaluation and copies
    it over the model at the end, even when no update has happened yet: a short run, or an average
    that starts after some epochs (lookahead), would be evaluated and saved with its initial weights.
    """

    _swapped = False
    updates = 0
    # Set by a module whose training step calls `after_optimizer_step` itself (module.SpeedrunModule);
    # with any other LightningModule the callback runs it from on_train_batch_end.
    driven_by_step = False
    _pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None

    def average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        """averaged <- f(averaged, current) for the floating-point tensors (the subclass's rule)."""
        raise NotImplementedError

    def _tensor_pairs(self, pl_module: L.LightningModule) -> tuple[list[torch.Tensor], ...]:
        """(averaged floats, current floats, averaged others, current others), gathered once."""
        if self._pairs is None:
            assert self._average_model is not None
            averaged = list(self._average_model.module.parameters())
            current = list(pl_module.parameters())
            if self._use_buffers:
                averaged += list(self._average_model.module.buffers())
                current += list(pl_module.buffers())
            floats = [i for i, t in enumerate(averaged) if t.is_floating_point()]
            others = [i for i in range(len(averaged)) if i not in set(floats)]
            self._pairs = ([averaged[i] for i in floats], [current[i] for i in floats],
                           [averaged[i] for i in others], [current[i] for i in others])
        return self._pairs

    @torch.no_grad()
    def update_average(self, pl_module: L.LightningModule) -> None:
        averaged, current, averaged_other, current_other = self._tensor_pairs(pl_module)
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            self.average_step(averaged, current)
        if averaged_other:
            torch._foreach_copy_(averaged_other, current_other)  # integer buffers (BN's batch count) follow
        assert self._average_model is not None
        self._average_model.n_averaged.add_(1)
        self.updates += 1

    @torch.no_grad()
    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        averaged, current, averaged_other, current_other = self._tensor_pairs(pl_module)
        torch._foreach_copy_(current, averaged)
        if averaged_other:
            torch._foreach_copy_(current_other, averaged_other)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._pairs = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.driven_by_step:
            self.after_optimizer_step(trainer, pl_module)

    def after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The average's part of a training step, right after the optimizer step (every few steps)."""
        step_idx = trainer.global_step - 1  # Lightning's convention: 0-based index of the step just taken
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update_average(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self.update_average(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def _has_average(self) -> bool:
        return self._average_model is not None and self.updates > 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.updates = int(state_dict.get("updates", 0))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._has_average()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's `state_dict` is what the run evaluates at this point.

        Lightning writes the average there unconditionally, so before the first update (a run shorter
        than the averaging's start) eval.py of `last.ckpt` scored the initial weights. Without an
        update the current weights stay in `state_dict`; the averaging state (no update yet) is kept
        beside them, so a resumed run starts its average as this one would have.
        """
        if self._has_average() or self._average_model is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        average_state = self._average_model.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["averaging_state"] = {name: value for name, value in average_state.items()
                                         if not name.startswith("module.")}


class EMASettings(Section):
    """callbacks.ema (trick=ema): a callback has no section in settings.py, so its own is declared here."""

    momentum: float = Field(ge=0, lt=1, description="Page: 0.99 per step")
    every_n_steps: int = Field(ge=1, description="Page: 5")
    use_buffers: bool


class LookaheadSettings(Section):
    """callbacks.lookahead (trick=lookahead), with airbench94's values as the hints."""

    decay_base: float = Field(ge=0, lt=1, description="airbench94: 0.95")
    decay_pow: float = Field(ge=0, description="airbench94: 3")
    every_n_steps: int = Field(ge=1, description="airbench94: 5")
    start_epochs: int = Field(ge=0, description="airbench94: 3")
    use_buffers: bool


class EMA(_GuardedAveraging):
    """Exponential moving average of the weights, evaluated in place of the raw weights (Page part 8).

    Built on Lightning's WeightAveraging (torch AveragedModel underneath). Page's EMA has momentum
    0.99 per batch but updates only every 5 batches, so each update uses decay = 0.99**5
    (cifar10-fast update_ema: rho = momentum**update_freq): average <- decay * average + (1 - decay) *
    current, in one foreach kernel. The first update copies the weights (Page starts from a copy of
    the initial weights; after a few updates the difference is gone). With `use_buffers` (default) the
    BN running statistics are averaged the same way, as Page averages the whole state_dict, so the
    averaged network is evaluated with statistics that match its weights. Each evaluation swaps the
    averaged weights in and back out; at the end of training they are copied into the model, so the
    final test accuracy and any saved model are the EMA's.
    """

    def __init__(self, *, momentum: float, every_n_steps: int, use_buffers: bool = True) -> None:
        settings = check(EMASettings, {"momentum": momentum, "every_n_steps": every_n_steps,
                                       "use_buffers": use_buffers}, "callbacks.ema")
        self.momentum, self.every_n_steps = settings.momentum, settings.every_n_steps
        self.decay = self.momentum**self.every_n_steps
        super().__init__(use_buffers=use_buffers)

    def average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0


class Lookahead(_GuardedAveraging):
    """airbench's Lookahead: an average of the weights that is copied back into the network.

    From epoch `start_epochs` on, every `every_n_steps` steps: average <- lerp(average, weights, 1 - decay),
    then weights <- average; and at every epoch end weights <- average. The decay grows over the run,
    decay = decay_base**every_n_steps * (step / total_steps)**decay_pow (airbench94: 0.95**5 x
    (step/total)^3), so early updates barely average and late ones average strongly; the first
    update only starts the average. The final weights are the averaged ones. BN statistics are
    averaged with the weights. Built on the same Lightning/torch averaging as `EMA`.
    """

    def __init__(self, *, decay_base: float, decay_pow: float, every_n_steps: int, start_epochs: int,
                 use_buffers: bool = True) -> None:
        settings = check(LookaheadSettings, {"decay_base": decay_base, "decay_pow": decay_pow,
                                             "every_n_steps": every_n_steps, "start_epochs": start_epochs,
                                             "use_buffers": use_buffers}, "callbacks.lookahead")
        self.decay_base, self.decay_pow = settings.decay_base, settings.decay_pow
        self.every_n_steps, self.start_epochs = settings.every_n_steps, settings.start_epochs
        self.decay = 0.0  # the decay of the next update
        self._epoch = 0
        super().__init__(use_buffers=use_buffers)

    def average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def decay_at(self, step: int, total_steps: int) -> float:
        return self.decay_base**self.every_n_steps * (step / max(1, total_steps)) ** self.decay_pow

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (step_idx is not None and self._epoch >= self.start_epochs
                and (step_idx + 1) % self.every_n_steps == 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = getattr(pl_module, "total_steps", None) or trainer.estimated_stepping_batches
        self.decay = self.decay_at(trainer.global_step, int(total))
        before = self._latest_update_step
        super().after_optimizer_step(trainer, pl_module)
        if self._latest_update_step != before:
            self._copy_average_to_current(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._has_average():
            self._copy_average_to_current(pl_module)
