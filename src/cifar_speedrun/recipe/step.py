"""The training step as one unit the host launches once: forward, loss, backward, optimizer step, schedule.

On a GPU these small nets are host-bound when the step is launched op by op: a DavidNet step is some
600 kernels, and at 5-15 us of Python and dispatch each the host needs longer to enqueue them than
the device needs to run them (results/gpu_speedrun_h200*.json: device busy 40-76% of a step). So on
CUDA the whole step is recorded once as a CUDA graph and replayed: one launch per step, whatever the
net. What a replay cannot do is read a host value, so everything the step needs lives on the device:

  * the batch in static buffers (`images`, `labels`), filled by one copy each before the replay;
  * every parameter group's learning rate as a 0-d view of one device vector, refreshed inside the
    step from a table of the whole run's rates (`LearningRates`) indexed by a device step counter:
    no Python float changes between replays, so torch's fused SGD takes the lr as a tensor;
  * the epoch's loss and accuracy sums (train_metrics.EpochMetrics.accumulate), summed in place;
  * fp16's GradScaler with an optimizer that takes `grad_scale` / `found_inf` tensors (torch's fused
    SGD, optim.MuonSGD): its inf check, skip and scale update are device ops too;
  * the momentum buffers, created (as zeros: the same first step as torch's clone of the gradient)
    before the capture, so the graph never holds a first-step special case.

The captured body is `run()`, the same function that runs eagerly on a CPU (`capture=False`), so the
CPU tests check the graph-ready step's numbers against the op-by-op step (tests/test_graph_step.py)
and the CUDA tests check a replay against this body run eagerly (tests/test_cuda.py).

Before the capture the body runs a few times on a side stream (cuDNN autotuning, lazy optimizer and
scaler state, autograd's device threads) and every tensor it changed is put back, so the run is the
one an uncaptured step would give. When the set of trained parameters changes (airbench's whitening
bias stops training after 3 epochs) the step is captured again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# Warm-up iterations before a capture: PyTorch's whole-network capture example uses 3 (side-stream
# warm-up "for i in range(3)"), enough for cuDNN's autotuner and the lazy state above.
WARMUP_STEPS = 3


class LearningRates:
    """Every parameter group's learning rate at every step, as a device table read by a device counter.

    Row k holds the rates of the k-th optimizer step (0-based): `base_lr x factor(k)`, computed in
    Python's double precision and stored in fp32, the value torch's SGD kernels make of the same
    Python float a LambdaLR would have set. `load()` (before the optimizer step) copies row
    `counter` into `current`, whose elements the optimizer's groups use as their lr (0-d views);
    `advance()` counts the step. Both are device ops, so they belong inside the captured step.
    """

    def __init__(self, rates: Sequence[Callable[[int], float]], steps: int, device: torch.device) -> None:
        table = [[float(rate(step)) for rate in rates] for step in range(max(1, steps))]
        self.table = torch.tensor(table, dtype=torch.float32, device=device)
        self.last_row = self.table.shape[0] - 1
        self.current = self.table[0].clone()
        self.counter = torch.zeros((), dtype=torch.long, device=device)

    def bind(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Point the optimizer's groups at `current` and start counting at `step` (a resumed run's)."""
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] = self.current[index]
        self.counter.fill_(int(step))
        self.load()

    def load(self) -> None:
        row = self.table.index_select(0, self.counter.clamp(max=self.last_row).view(1))
        self.current.copy_(row.view(-1))

    def advance(self) -> None:
        self.counter.add_(1)


def create_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers for every parameter of a group with momentum, before any step.

    torch's SGD and MuonSGD create a buffer on a parameter's first step (SGD as a copy of the gradient);
    a buffer of zeros gives the same first step (0 * momentum + g = g, exactly) and keeps that special
    case out of a captured graph, which would otherwise replay it every step.
    """
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision string (None: no autocast)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


class TrainStep:
    """One training step with everything it needs on the device; captured as a CUDA graph when `capture`.

    `loss(logits, labels)` is the recipe's loss, `metrics` its EpochMetrics, `scaler` fp16's GradScaler
    (or None), `rates` the LearningRates bound to `optimizer`.
    """

    def __init__(self, net: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, rates: LearningRates, metrics: Any, *,
                 scaler: Any = None, autocast: torch.dtype | None = None, capture: bool = False) -> None:
        self.net, self.loss, self.optimizer, self.rates, self.metrics = net, loss, optimizer, rates, metrics
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.autocast = autocast
        self.capture = capture
        self.graph: Any = None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self._trained: tuple[bool, ...] = ()
        self.captures = 0  # how many times the step was captured (1, or 2 when the trained set changed)
        create_momentum_buffers(optimizer)

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The step, in the order of airbench's loop: forward, loss, backward, optimizer step, schedule."""
        device_type = images.device.type
        # cache_enabled=False: autocast's cache of cast weights cannot outlive a graph capture.
        with torch.autocast(device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=False):
            logits = self.net(images)
            loss = self.loss(logits, labels)
        self.metrics.accumulate(loss, logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self.rates.load()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # grad_scale / found_inf handed to the optimizer: no host read
            self.scaler.update()
        self.rates.advance()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.capture:
            self.run(images, labels)
            return
        trained = tuple(p.requires_grad for p in self.net.parameters())
        if self.graph is None or trained != self._trained or images.shape != self.images.shape:
            self._capture(images, labels, trained)
        assert self.images is not None and self.labels is not None
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()

    # ---------------------------------------------------------------- capture
    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step changes: weights, buffers, optimizer state, counters and sums."""
        tensors = list(self.net.parameters()) + list(self.net.buffers())
        for state in self.optimizer.state.values():
            tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        tensors += [self.rates.counter, *self.metrics.sums()]
        return [t for t in tensors if t is not None]

    def _capture(self, images: torch.Tensor, labels: torch.Tensor, trained: tuple[bool, ...]) -> None:
        # A capture synchronizes on purpose (once or twice a run): a sync guard on the steps
        # (tests/test_cuda.py) is paused for it, and counts the steps around it.
        guard = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            self._record(images, labels, trained)
        finally:
            torch.cuda.set_sync_debug_mode(guard)

    def _record(self, images: torch.Tensor, labels: torch.Tensor, trained: tuple[bool, ...]) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.images = images.clone(memory_format=torch.preserve_format)
        self.labels = labels.clone()
        state = self._state()
        saved = [t.detach().clone() for t in state]
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.run(self.images, self.labels)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # the warm-up steps never happened
            for tensor, value in zip(state, saved, strict=True):
                tensor.copy_(value)
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run(self.images, self.labels)
        self._trained = trained
        self.captures += 1

    def summary(self) -> dict[str, Any]:
        """What results.json records of the step."""
        return {"mode": "graph", "captured": self.capture, "captures": self.captures}
