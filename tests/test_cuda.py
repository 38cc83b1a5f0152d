"""Checks that need a CUDA device; skipped on CPU-only machines (CI). benchmarks/gpu_speedrun.sh runs them.

PyTorch's sync debug mode raises on any operation that makes the host wait for the GPU; it is
switched on for the whole of each training step (from the step's start to the end of every
callback's per-step hook) of real `train()` runs, fp16 (GradScaler) and bf16 alike.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import open_dict

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


@pytest.mark.parametrize("experiment,precision", [("page_final", "16-mixed"), ("page_final", "bf16-mixed"),
                                                  ("airbench94", "16-mixed"), ("airbench94_muon", "16-mixed"),
                                                  ("airbench94_muon", "bf16-mixed")])
def test_training_steps_make_no_host_sync_on_cuda(experiment: str, precision: str, compose_cfg) -> None:
    cfg = compose_cfg(f"experiment={experiment}", "data.source=image_folder", f"trainer.precision={precision}",
                      "model.width=0.25", "data.subset=8192", "data.batch_size=512", "data.test_subset=1000",
                      "epochs=3", "trainer.enable_progress_bar=false", "callbacks.checkpoint=null", "logger=none")
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.callbacks.sync_guard = {"_target_": "test_cuda.SyncGuard"}
    try:
        result = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result["status"] == "ok" and result["sync_guarded_steps"] >= 20
