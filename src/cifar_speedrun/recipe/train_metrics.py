"""The training metrics and the NaN check, at a few device ops a step and no host sync.

A training step on a GPU must never wait for the device: every `.item()`, `float(t)` or `if t:`
stalls the host until the queue drains, and every op is a kernel launch. torchmetrics' MeanMetric and
MulticlassAccuracy cost ~30 ops a step and Lightning's `self.log` ~1 ms of Python; a flag that says
which step went NaN costs ~7 more ops. Here a step adds two sums on the device (the loss, the correct
predictions: five kernels) and nothing else:

  * the epoch's mean loss and accuracy come from the sums, read once at the epoch's end (summed over
    DDP ranks there);
  * a NaN or inf loss makes the loss sum non-finite for the rest of the epoch, so the NaN check
    watches the sum: every `check_every` steps it copies the sum to the host without waiting
    (`non_blocking` into pinned memory on CUDA) and reads the copy made at the previous check, long
    finished. A NaN is caught within two checks (and at the epoch's end at the latest), and the
    message names the window of steps it happened in.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class EpochMetrics:
    """Device-side sums of one epoch's training loss and correct predictions, and a NaN watch on them."""

    def __init__(self, check_every: int = 25) -> None:
        self.check_every = max(1, int(check_every))
        self.loss_sum: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.steps = 0
        self.images = 0
        self.epoch_first_step = 0
        self._host: torch.Tensor | None = None  # the loss sum, copied to the host at the last check
        self._host_view: Any = None  # a numpy view of it: reading it dispatches nothing
        self._event: Any = None
        self._copied_at: int | None = None  # the step (global) of the copy being waited for
        self.last_finite_step = 0  # the last step known to have a finite loss sum

    def start_epoch(self, device: torch.device, global_step: int) -> None:
        # The sums are zeroed in place after the first epoch: a captured step (step.py) adds into them.
        if self.loss_sum is None or self.loss_sum.device != device:
            self.loss_sum = torch.zeros((), device=device, dtype=torch.float32)
            self.correct = torch.zeros((), device=device, dtype=torch.int64)
        else:
            assert self.correct is not None
            self.loss_sum.zero_()
            self.correct.zero_()
        self.steps = self.images = 0
        self.epoch_first_step = self.last_finite_step = global_step
        self._copied_at = None
        if self._host is None or self._host.device.type != "cpu":
            pinned = device.type == "cuda"
            self._host = torch.zeros((), dtype=torch.float32, pin_memory=pinned)
            self._host_view = self._host.numpy()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One step's loss (the batch mean) and predictions: five kernels, no sync."""
        self.accumulate(loss, logits, labels)
        self.count(len(labels))

    @torch.no_grad()
    def accumulate(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The device half of `update`: the sums, which a captured step (step.py) replays."""
        assert self.loss_sum is not None and self.correct is not None
        self.loss_sum.add_(loss.detach())
        self.correct.add_((logits.argmax(dim=1) == labels).sum())

    def count(self, images: int) -> None:
        """The host half of `update`: one more step of `images` images."""
        self.steps += 1
        self.images += int(images)

    def sums(self) -> list[torch.Tensor]:
        """The device tensors a step adds into."""
        return [t for t in (self.loss_sum, self.correct) if t is not None]

    def check(self, global_step: int) -> tuple[int, int] | None:
        """Every `check_every` steps: the window (first step, last step) in which the loss stopped being
        finite, or None. Never waits for the device."""
        if global_step % self.check_every or self.loss_sum is None:
            return None
        bad = self._read_previous()
        if bad is not None:
            return bad
        assert self._host is not None
        self._host.copy_(self.loss_sum, non_blocking=self._host.is_pinned())
        if self.loss_sum.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._copied_at = global_step
        if not self.loss_sum.is_cuda:  # a CPU copy is done already: read it now
            return self._read_previous()
        return None

    def _read_previous(self) -> tuple[int, int] | None:
        if self._copied_at is None or (self._event is not None and not self._event.query()):
            return None
        value, copied_at, self._copied_at = float(self._host_view), self._copied_at, None
        if math.isfinite(value):
            self.last_finite_step = copied_at
            return None
        return self.last_finite_step + 1, copied_at

    def finish_epoch(self, reduce: Any = None) -> tuple[dict[str, float], tuple[int, int] | None]:
        """The epoch's mean loss and accuracy (summed over ranks by `reduce`, if given), and the window
        of a non-finite loss if there was one. Reads the device once: call it at the epoch's end."""
        assert self.loss_sum is not None and self.correct is not None
        counts = torch.stack([self.loss_sum.double(), self.correct.double(),
                              torch.tensor(float(self.steps), dtype=torch.float64, device=self.loss_sum.device),
                              torch.tensor(float(self.images), dtype=torch.float64, device=self.loss_sum.device)])
        if reduce is not None:
            counts = reduce(counts)
        loss_sum, correct, steps, images = counts.tolist()
        metrics = {"train_loss": loss_sum / max(1.0, steps), "train_acc": correct / max(1.0, images)}
        bad = None if math.isfinite(loss_sum) else (self.last_finite_step + 1, self.epoch_first_step + self.steps)
        return metrics, bad
