"""An optimizer's update against the formula written out by hand (Lion; Page's, airbench's and Muon's are in
test_airbench.py and test_fidelity.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_speedrun.recipe.optim import OPTIMIZERS, Lion


def test_lion_steps_by_the_sign_of_its_interpolated_momentum_with_decoupled_decay() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 3))
    optimizer = Lion([{"params": [weight], "lr": 0.01}], betas=(0.9, 0.99), weight_decay=0.1)
    w, m = weight.detach().clone(), torch.zeros(5, 3)
    for _ in range(3):
        grad = torch.randn(5, 3)
        weight.grad = grad.clone()
        optimizer.step()
        update = torch.sign(0.9 * m + 0.1 * grad)
        w = w - 0.01 * (update + 0.1 * w)
        m = 0.99 * m + 0.01 * grad
        assert torch.allclose(weight.detach(), w, atol=1e-7)
        assert torch.allclose(optimizer.state[weight]["momentum_buffer"], m, atol=1e-7)


def test_lion_takes_the_lr_as_a_device_tensor_with_the_same_result() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(4, 4) for _ in range(4)]
    results = []
    for lr in (0.003, torch.tensor(0.003)):
        weight = nn.Parameter(torch.ones(4, 4))
        optimizer = Lion([{"params": [weight], "lr": lr}], betas=(0.9, 0.99), weight_decay=0.1)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        results.append(weight.detach().clone())
    assert torch.equal(*results)


def test_optim_lion_is_one_choice_built_from_its_yaml(compose_cfg) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cifar_speedrun.config.command_line import validate

    cfg = compose_cfg("optim=lion", "model.width=0.125")
    validate(cfg)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    net = instantiate(cfg.model)
    built = OPTIMIZERS[optim["builder"]][0](net, optim, 512, "cpu")
    assert isinstance(built.optimizer, Lion) and built.effective["lr"] == pytest.approx(1e-3)
    trained = [p for p in net.parameters() if p.requires_grad]
    assert [id(p) for p in built.optimizer.param_groups[0]["params"]] == [id(p) for p in trained]
