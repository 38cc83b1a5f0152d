"""An optimizer's update against the formula written out by hand (Lion; Page's, airbench's and Muon's are in
test_airbench.py and test_fidelity.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_speedrun.recipe.optim import Lion, read_optimizer


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
    built = read_optimizer(optim).build(net, 512, "cpu")
    assert isinstance(built.optimizer, Lion) and built.effective["lr"] == pytest.approx(1e-3)
    trained = [p for p in net.parameters() if p.requires_grad]
    assert [id(p) for p in built.optimizer.param_groups[0]["params"]] == [id(p) for p in trained]


# ---------------------------------------------------------------- one path from the config to the optimizer
def test_every_optimizer_is_registered_by_declaring_its_settings_class() -> None:
    """OPTIMIZERS is filled by the classes themselves, one per conf/optim/*.yaml builder."""
    from omegaconf import OmegaConf

    from cifar_speedrun.conf_files import CONF_DIR
    from cifar_speedrun.recipe.optim import OPTIMIZERS, OptimizerSettings

    builders = {OmegaConf.load(path).builder for path in (CONF_DIR / "optim").glob("*.yaml")}
    assert builders == set(OPTIMIZERS)
    assert all(issubclass(cls, OptimizerSettings) and "build" in vars(cls) for cls in OPTIMIZERS.values())


def test_the_run_uses_the_settings_the_config_check_made_and_builds_its_optimizer_once(compose_cfg, monkeypatch,
                                                                                        tmp_path) -> None:
    """train.py hands the module the typed config check_train returned: the optimizer and TTA are those
    objects (a number changed in them is the number used), the net is built from the model section, and the
    optimizer is built once, when the Trainer asks for it; nothing is built to learn its numbers before."""
    import lightning as L
    from hydra.utils import instantiate

    from cifar_speedrun.config.command_line import validate
    from cifar_speedrun.recipe.module import SpeedrunModule
    from cifar_speedrun.recipe.optim import PageSGDSettings

    cfg = compose_cfg("trainer=cpu", "data.source=image_folder", "model.width=0.125", "data.subset=512", "epochs=1",
                      "data.batch_size=256", "data.test_subset=256")
    run = validate(cfg)
    run = run.model_copy(update={"optim": run.optim.model_copy(update={"lr": 0.123})})
    builds = []
    original = PageSGDSettings.build
    monkeypatch.setattr(PageSGDSettings, "build", lambda self, *a, **k: builds.append(self) or original(self, *a, **k))
    module = SpeedrunModule.from_config(cfg, run=run)
    assert module.optim is run.optim and module.tta is run.tta and module.effective == {} and not builds
    assert type(module.net).settings_class is type(run.model)
    datamodule = instantiate(cfg.data)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    assert builds == [run.optim]
    assert module.effective["lr"] == pytest.approx(0.123)
    weights = next(g for g in module.optimizers().optimizer.param_groups if g["name"] == "weights")
    assert weights["initial_lr"] == pytest.approx(0.123)  # LambdaLR's base lr: the checked number
