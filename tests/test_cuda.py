"""Checks that need a CUDA device; skipped on CPU-only machines (CI). benchmarks/gpu_speedrun.sh runs them.

PyTorch's sync debug mode raises on any operation that makes the host wait for the GPU; it is
switched on for the whole of each training step (from the step's start to the end of every
callback's per-step hook) of real `train()` runs, fp16 (GradScaler) and bf16 alike, with the step
launched op by op (step.mode=eager) and replayed as one CUDA graph (step.mode=graph).

The captured step (step.TrainStep) is checked against the same step run uncaptured, from the same
weights on the same batches, for every recipe and precision: a replay computes what the eager body
computes (tests/test_graph_step.py checks, on the CPU, that the body computes what the op-by-op
Lightning step computes).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from cifar_speedrun.recipe.optim import read_optimizer
from cifar_speedrun.recipe.step import LearningRates, TrainStep, autocast_dtype
from cifar_speedrun.recipe.train_metrics import EpochMetrics
from cifar_speedrun.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class SyncGuard(L.Callback):
    """Raise on any host sync inside a training step (after the first epoch's warm-up)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch >= 1:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.get_sync_debug_mode():
            self.steps += 1
        torch.cuda.set_sync_debug_mode(0)

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def results_entry(self) -> dict[str, int]:
        return {"sync_guarded_steps": self.steps}


@pytest.mark.parametrize("experiment,precision,mode", [
    ("page_final", "16-mixed", "eager"), ("page_final", "bf16-mixed", "eager"), ("airbench94", "16-mixed", "eager"),
    ("airbench94_muon", "16-mixed", "eager"), ("airbench94_muon", "bf16-mixed", "eager"),
    ("page_final", "bf16-mixed", "graph"), ("page_final", "16-mixed", "graph"), ("airbench94", "bf16-mixed", "graph"),
    ("airbench94_muon", "bf16-mixed", "graph"), ("airbench94_muon", "16-mixed", "graph")])
def test_training_steps_make_no_host_sync_on_cuda(experiment: str, precision: str, mode: str, compose_cfg) -> None:
    cfg = compose_cfg(f"experiment={experiment}", "data.source=image_folder", f"trainer.precision={precision}",
                      "model.width=0.25", "data.subset=8192", "data.batch_size=512", "data.test_subset=1000",
                      "epochs=4", "trainer.enable_progress_bar=false", "callbacks.checkpoint=null", "logger=none",
                      f"step.mode={mode}")
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.callbacks.sync_guard = {"_target_": "test_cuda.SyncGuard"}
    try:
        result = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result["status"] == "ok" and result["sync_guarded_steps"] >= 20
    if mode == "graph":  # airbench's whitening bias stops training after epoch 3: captured again
        expected = 2 if experiment == "airbench94" else 1
        assert result["step"] == {"mode": "graph", "captured": True, "captures": expected}, result["step"]


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ||a - b|| / ||a|| over the floating-point tensors, and its name."""
    worst = (0.0, "")
    for key, value in a.items():
        if value.is_floating_point():
            diff = ((value.double() - b[key].double()).norm() / value.double().norm().clamp_min(1e-30)).item()
            worst = max(worst, (diff, key))
    return worst


# Rounding the captured and uncaptured runs may differ by (atomic adds in some backward kernels): fp32
# arithmetic lands far under 1e-5 after a few steps; half precision's ~3 significant digits, 2e-3.
TOLERANCE = {"32-true": 1e-5, "bf16-mixed": 2e-3, "16-mixed": 2e-3}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("experiment", ["page_final", "airbench94", "airbench94_muon"])
def test_a_replayed_step_computes_what_the_step_computes_uncaptured(experiment: str, precision: str,
                                                                     compose_cfg) -> None:
    cfg = compose_cfg(f"experiment={experiment}", "model.width=0.25")
    device = torch.device("cuda")
    torch.manual_seed(0)
    net = instantiate(cfg.model).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    batch = 256
    batches = [(torch.randn(batch, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format),
        torch.randint(0, 10, (batch,), device=device)) for _ in range(8)]
    net.fit_to_data(batches[0][0])
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    settings = read_optimizer(optim)
    runs = []
    for capture in (False, True):
        copy_ = copy.deepcopy(net)
        built = settings.build(copy_, batch, "cuda", tensor_lr=True)
        # A rising lr, different per group and per step: a step that read the wrong row would show.
        rates = LearningRates([lambda k, base=float(g["lr"]): base * (k + 1) / 16
                               for g in built.optimizer.param_groups], 16, device)
        rates.bind(built.optimizer, 0)
        metrics = EpochMetrics()
        metrics.start_epoch(device, 0)
        scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None

        def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), labels, label_smoothing=float(cfg.loss.label_smoothing))

        step = TrainStep(copy_, loss, built.optimizer, rates, metrics, scaler=scaler,
                         autocast=autocast_dtype(precision), capture=capture)
        for index, (x, y) in enumerate(batches):
            if index == 4 and experiment == "airbench94":  # the whitening bias stops training: captured again
                copy_.whiten.bias.requires_grad_(False)
            if capture and index > 0:  # a replay (and the batch copies) never waits for the device
                torch.cuda.set_sync_debug_mode("error")
            try:
                step(x, y)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        runs.append((copy_.state_dict(), metrics.loss_sum.item(), metrics.correct.item(), int(rates.counter.item()),
                     step.captures))
    (eager, eager_loss, eager_correct, eager_count, _), (graph, graph_loss, graph_correct, graph_count, captures) = runs
    assert eager_count == graph_count == len(batches)
    assert captures == (2 if experiment == "airbench94" else 1)
    difference, name = _relative_difference(eager, graph)
    print(f"{experiment} {precision}: largest relative difference {difference:.2e} ({name}); loss sums "
          f"{eager_loss:.6f} / {graph_loss:.6f}; correct {eager_correct} / {graph_correct}")
    assert difference <= TOLERANCE[precision], (name, difference)
    assert graph_loss == pytest.approx(eager_loss, rel=10 * TOLERANCE[precision])
