"""Count what a training step asks of the device, on any machine: aten ops (kernel launches on a GPU)
and host syncs (ops that make the host wait for the device), with a TorchDispatchMode.

On a GPU the host only enqueues work; it must read a value back (`.item()`, `bool(t)`, `int(t)`,
`if t:`, a shape that depends on data) to wait, and every op is a kernel launch. Both can be counted
on the CPU, where the same Python runs the same ops: `OpCounter` sees every aten op dispatched while
it is active. `StepOps` is a Lightning callback that counts them per training step (from one
step's start to the next's, so the batch fetch and every callback's per-step hook are included; the
last step of each epoch, whose interval holds the epoch's end and evaluation, is left out).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device value back to the host, or whose output shape depends on the data (so the
# host must wait for the device to know it): what `.item()`, `bool()`, `int()`, `float()`,
# `if tensor:` and boolean-mask indexing dispatch to.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.nonzero_static",
    "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.bincount", "aten.histc", "aten.masked_scatter", "aten.allclose",
})


def _op_name(func: Any) -> str:
    """'aten.add_' for aten.add_.Tensor (the overload does not matter here)."""
    packet = getattr(func, "overloadpacket", func)
    return f"aten.{getattr(packet, '__name__', str(packet))}"


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
        return True  # the output size is the sum of the repeats, read back
    if name in ("aten.index", "aten.index_put", "aten.index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))
    return False


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name, and the host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        name = _op_name(func)
        self.ops[name] += 1
        if _is_sync(name, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(self.ops.values())


class StepOps(L.Callback):
    """Per training step: the aten ops and host syncs from its start to the next step's start.

    `skip_epochs`: epochs left out at the start (first-step allocations, lazy set-up). Steps whose
    interval holds an epoch's end are left out. `per_step` holds one (ops, syncs) pair per step.
    """

    def __init__(self, skip_epochs: int = 0) -> None:
        self.skip_epochs = int(skip_epochs)
        self.per_step: list[tuple[Counter[str], Counter[str]]] = []
        self._counter: OpCounter | None = None

    def _stop(self, keep: bool) -> None:
        if self._counter is None:
            return
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        if keep:
            self.per_step.append((counter.ops, counter.syncs))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._stop(keep=True)
        if trainer.current_epoch >= self.skip_epochs:
            self._counter = OpCounter()
            self._counter.__enter__()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(keep=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(keep=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop(keep=False)

    def results_entry(self) -> dict[str, Any]:
        """What results.json records of this callback."""
        return {"step_ops": self.summary()}

    def summary(self) -> dict[str, Any]:
        """Steps counted, mean ops per step, syncs per step by op, and the steps that synced."""
        steps = len(self.per_step)
        ops: Counter[str] = Counter()
        syncs: Counter[str] = Counter()
        for step_ops, step_syncs in self.per_step:
            ops.update(step_ops)
            syncs.update(step_syncs)
        return {"steps": steps, "ops_per_step": sum(ops.values()) / max(1, steps),
                "ops": {name: count / max(1, steps) for name, count in ops.most_common()},
                "syncs_per_step": sum(syncs.values()) / max(1, steps),
                "syncs": dict(syncs), "steps_with_syncs": sum(1 for _, s in self.per_step if s)}
