"""Checks that need a CUDA device; skipped on CPU-only machines (CI)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_speedrun.data import Cifar10DataModule
from cifar_speedrun.module import SpeedrunModule

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_step_makes_no_host_sync(compose_cfg, archive, cache_dir) -> None:
    """Augment, forward, loss, metrics, backward, fused SGD: nothing reads a value back to the host."""
    cfg = compose_cfg("experiment=page_final", "trainer.precision=bf16-mixed", "trick=[channels_last]")
    dm = Cifar10DataModule(source="image_folder", path=archive, cache_dir=cache_dir, subset=2048,
                           half_precision=True, channels_last=True)
    dm._device = lambda: torch.device("cuda")  # no trainer attached: put the data on the GPU directly
    dm.setup("fit")
    net = instantiate(cfg.model).cuda()
    module = SpeedrunModule(net, OmegaConf.to_container(cfg.optim, resolve=True), 512, 0.2,
                            channels_last=True, nan_check_every=10**9, epochs=cfg.epochs).cuda()
    for layer in net.modules():
        if hasattr(layer, "fit_to_data"):
            layer.fit_to_data(dm.train_images)
    optimizer = torch.optim.SGD(module.parameter_groups(), momentum=0.9, nesterov=True, fused=True)
    batches = iter(dm.train_dataloader())
    x, y = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            x, y = next(batches)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = module.net(x)
            loss = module.loss(logits, y)
            module.train_loss.update(loss.detach())
            module.train_acc.update(logits.detach(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
