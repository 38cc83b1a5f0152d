"""Host and device milliseconds per training step, and a profile of the device's kernels (benchmarks only).

A Lightning callback the GPU benchmarks add to a run (gpu_speedrun.py, step_cost.py): is the run
host-bound or device-bound, and which kernels take the device's time.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


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
