"""Fidelity to Page's recipe: whitening sample, ghost-BN eval statistics, schedules relative to the run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import omegaconf
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from omegaconf import OmegaConf
from torch import nn

from cifar_speedrun.config.command_line import validate
from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.augment import PAGE_MEAN, PAGE_STD, standardize
from cifar_speedrun.recipe.averaging import EMA
from cifar_speedrun.recipe.models import build_norm, build_whitening
from cifar_speedrun.recipe.models.layers import GhostBatchNorm, PatchWhitening
from cifar_speedrun.recipe.module import SpeedrunModule
from cifar_speedrun.recipe.schedule import PiecewiseLinear, resolve_knots

sys.path.insert(0, str(REPO / "benchmarks"))  # the ghost-BN benchmark's 'before' layer


# ---------------------------------------------------------------- whitening: a sample of every class
def test_whitening_sample_covers_every_class_of_class_sorted_data(real_data) -> None:
    labels = real_data.train_y
    # ImageFolder data is stored class by class: the first 10,000 are two classes.
    assert torch.bincount(labels[:10_000], minlength=10).tolist() == [5000, 5000] + [0] * 8
    index = PatchWhitening.sample_indices(len(labels), 10_000, seed=0)
    counts = torch.bincount(labels[index], minlength=10)
    assert len(index) == 10_000 and len(set(index.tolist())) == 10_000
    assert counts.min() > 800, counts.tolist()  # ~1,000 of each class
    assert torch.equal(index, PatchWhitening.sample_indices(len(labels), 10_000, seed=0)), "seeded"
    assert not torch.equal(index, PatchWhitening.sample_indices(len(labels), 10_000, seed=1))
    assert torch.equal(PatchWhitening.sample_indices(500, 10_000, seed=0), torch.arange(500)), "all when fewer"


def test_whitening_fitted_on_class_sorted_data_whitens_held_out_patches_of_all_classes(real_data) -> None:
    """Output covariance on held-out test images ≈ Λ/(Λ + eps) on the diagonal, small elsewhere.

    Fitted on a sample of every class the filters miss by < 0.1; fitted on the first images of the
    class-sorted train set (the old behaviour: all airplanes) they miss by > 0.2.
    """
    train = standardize(real_data.train_x, PAGE_MEAN, PAGE_STD)
    held_out = standardize(real_data.test_x[::5], PAGE_MEAN, PAGE_STD)  # 2,000 test images, every class

    def miss(white: PatchWhitening, fitted_on: torch.Tensor) -> tuple[float, float]:
        patches = PatchWhitening.patches(fitted_on, 3).double()
        eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / (len(patches) - 1))  # ascending, as the filters
        out = F.conv2d(held_out, white.weight).permute(1, 0, 2, 3).reshape(27, -1).double()
        covariance = out @ out.T / (out.shape[1] - 1)
        expected = torch.diag(eigenvalues / (eigenvalues + white.eps))
        off_diagonal = covariance - torch.diag(covariance.diagonal())
        return float((covariance - expected).abs().max()), float(off_diagonal.abs().max())

    white = build_whitening(max_images=4000, seed=0)
    white.fit_to_data(train)
    total, off = miss(white, train[PatchWhitening.sample_indices(len(train), 4000, seed=0)])
    assert total < 0.1 and off < 0.03, (total, off)
    first = build_whitening(max_images=4000)
    first.fit_to_data(train[:4000])  # what "the first 4,000" fits: one class
    assert miss(first, train[:4000])[0] > 0.2


def test_whitening_fit_is_the_same_on_every_rank(real_data) -> None:
    """Each DDP rank holds the whole train set and fits with the run's seed: identical filters."""
    images = standardize(real_data.train_x[:3000], PAGE_MEAN, PAGE_STD)
    first, second = build_whitening(max_images=1000, seed=3), build_whitening(max_images=1000, seed=3)
    first.fit_to_data(images)
    second.fit_to_data(images.clone())
    assert torch.equal(first.weight, second.weight)


# ---------------------------------------------------------------- ghost BN: eval statistics once, lazily
def _ghost_after_training(momentum: float = 1.0) -> tuple[GhostBatchNorm, torch.Tensor]:
    torch.manual_seed(1)
    bn = build_norm(3, kind="ghost", ghost_splits=4, momentum=momentum).train()
    x = torch.randn(64, 3, 4, 4) + torch.arange(64).view(64, 1, 1, 1) % 4  # splits differ in mean
    bn(x)
    return bn, x


def test_ghost_bn_training_step_does_no_eval_statistics_work() -> None:
    bn, _ = _ghost_after_training()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert not torch.equal(bn.split_running_mean, torch.zeros(12)), "the per-split statistics did move"


def test_ghost_bn_eval_statistics_are_the_mean_over_splits() -> None:
    bn, x = _ghost_after_training()  # momentum 1: split running stats = this batch's split stats
    splits = [x[k::4] for k in range(4)]  # split k: images k, k+4, ...
    mean = torch.stack([s.mean(dim=(0, 2, 3)) for s in splits]).mean(0)
    var = torch.stack([s.var(dim=(0, 2, 3)) for s in splits]).mean(0)  # unbiased, as F.batch_norm keeps
    bn.eval()
    out = bn(x)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, atol=1e-4)
    assert torch.allclose(out, F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps), atol=1e-5)
    # not the whole batch's variance: the variance of the split means is left out, as in cifar10-fast
    assert (x.var(dim=(0, 2, 3)) - bn.running_var).min() > 0.1


def test_ghost_bn_eval_follows_buffers_copied_in_from_outside() -> None:
    """WeightAveraging copies averaged buffers into the model with .data.copy_: eval must use them."""
    bn, x = _ghost_after_training()
    bn.eval()
    bn(x)
    combined = bn.running_mean.clone()
    bn.split_running_mean.data.copy_(bn.split_running_mean + 10.0)
    with torch.inference_mode():  # as Lightning evaluates
        bn(x)
    assert torch.allclose(bn.running_mean, combined + 10.0)


def test_ghost_bn_eval_equals_the_per_step_recombination() -> None:
    """The benchmark's 'before' (recombined after every training step) evaluates identically."""
    from ghost_bn_step import EagerGhostBatchNorm

    torch.manual_seed(0)
    settings = {"splits": 4, "eps": 1e-5, "momentum": 0.1, "scale_init": 1.0, "freeze_scale": False, "float32": False}
    lazy, eager = GhostBatchNorm(5, **settings), EagerGhostBatchNorm(5, **settings)
    eager.load_state_dict(lazy.state_dict())
    for _ in range(7):
        x = torch.randn(32, 5, 6, 6) * 2 + 1
        assert torch.equal(lazy.train()(x), eager.train()(x))
    probe = torch.randn(8, 5, 6, 6)
    assert torch.allclose(lazy.eval()(probe), eager.eval()(probe), atol=1e-6)
    assert torch.allclose(lazy.running_var, eager.running_var, atol=1e-7)


def test_ghost_bn_statistics_survive_a_checkpoint_round_trip() -> None:
    bn, x = _ghost_after_training()
    fresh = build_norm(3, kind="ghost", ghost_splits=4)
    fresh.load_state_dict(bn.state_dict())  # saved after training: running_mean still the initial zeros
    assert torch.allclose(fresh.eval()(x), bn.eval()(x), atol=1e-6)


class _GhostNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), build_norm(4, kind="ghost", ghost_splits=4),
                                 nn.Flatten(),
                                 nn.Linear(4 * 8 * 8, 2))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ghost_bn_with_ema_evaluates_the_averaged_split_statistics(tmp_path: Path) -> None:
    """EMA swaps averaged buffers in before evaluation; the eval statistics come from those."""
    torch.manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8) * 3 + 2, torch.randint(0, 2, (16,))) for _ in range(10)]

    class Batches(list):
        pass

    module = _GhostNet()
    ema = EMA(momentum=0.5, every_n_steps=2, use_buffers=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(module, Batches(batches), Batches(batches[:2]))
    bn = module.net[1]  # the model now holds the EMA weights and buffers
    module.eval()
    module.net(batches[0][0])
    assert torch.allclose(bn.running_mean, bn.split_running_mean.view(4, 4).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, bn.split_running_var.view(4, 4).mean(0), atol=1e-6)


# ---------------------------------------------------------------- schedules relative to the run
def test_knots_are_numbers_or_arithmetic_in_epochs() -> None:
    assert resolve_knots([0, "epochs/5", "epochs - 2"], 10) == [0.0, 2.0, 8.0]
    assert resolve_knots([0, "epochs*5/24", "epochs"], 24) == [0.0, 5.0, 24.0]
    assert resolve_knots([0, 1.5, "(epochs-1)*0.5", "-1 + epochs"], 9) == [0.0, 1.5, 4.0, 8.0]


@pytest.mark.parametrize("knot", ["epoch/5", "__import__('os').getcwd()", "epochs**2", "[1]", "epochs/0", "True"])
def test_bad_knots_are_refused_with_the_key(knot: str) -> None:
    with pytest.raises(UserError, match="optim.schedule.epochs"):
        resolve_knots([0, knot], 10)


# Page's knots in cifar10-fast's bag_of_tricks, row by row (epochs, knots).
PAGE_KNOTS = {
    "s0_baseline": (24, [0, 5, 24]),
    "s1_pool_before_norm": (25, [0, 5, 25]),
    "s2_label_smoothing": (23, [0, 4.6, 23]),
    "s3_celu_ghost_bn": (18, [0, 3.6, 18]),
    "s4_frozen_bn_scale": (17, [0, 3.4, 17]),
    "s5_whitening": (14, [0, 2.8, 14]),
    "s6_ema": (13, [0, 2.6, 11]),
    "s7_tta": (10, [0, 2, 8]),
}


@pytest.mark.parametrize("stage", list(PAGE_KNOTS))
def test_every_stage_keeps_pages_exact_knots(compose_cfg, stage: str) -> None:
    cfg = compose_cfg(f"stage={stage}")
    epochs, knots = PAGE_KNOTS[stage]
    assert cfg.epochs == epochs and cfg.trainer.max_epochs == epochs
    assert resolve_knots(list(cfg.optim.schedule.epochs), cfg.epochs) == pytest.approx(knots, abs=1e-12)


@pytest.mark.parametrize("overrides,knots", [
    (["epochs=12"], [0, 2.5, 12]),  # the baseline's shape, 5/24 warm-up
    (["experiment=page_final", "epochs=5"], [0, 1, 3]),  # [0, epochs/5, epochs - 2]
    (["experiment=page_baseline", "epochs=48"], [0, 10, 48]),
    (["epochs=6", "optim.schedule.epochs=[0,1,3]"], [0, 1, 3]),  # absolute knots stay absolute
    (["epochs=6", "optim.schedule.epochs=[0,epochs/3,epochs]"], [0, 2, 6]),  # from the command line
])
def test_epochs_alone_gives_a_schedule_over_the_whole_run(compose_cfg, overrides, knots) -> None:
    cfg = compose_cfg(*overrides)
    validate(cfg)
    assert cfg.trainer.max_epochs == cfg.epochs
    module = SpeedrunModule.from_config(cfg, nn.Linear(2, 2), batch_size=512, epochs=cfg.epochs)
    assert module.schedule_knots == pytest.approx(knots)
    # The schedule reaches its last value by the end of the run, never stopped while the lr rises.
    schedule = PiecewiseLinear(module.schedule_knots, list(cfg.optim.schedule.factors), 97)
    assert schedule(cfg.epochs * 97 - 1) == pytest.approx(float(cfg.optim.schedule.factors[-1]))


def test_max_epochs_that_differs_from_epochs_is_refused(compose_cfg) -> None:
    with pytest.raises(UserError, match=r"trainer.max_epochs=5 differs from epochs=24: set epochs=5"):
        validate(compose_cfg("trainer.max_epochs=5"))


def test_string_knots_need_the_runs_epochs(compose_cfg) -> None:
    optim = OmegaConf.to_container(compose_cfg().optim, resolve=True)
    optim["schedule"] = {"epochs": [0, "epochs/5", "epochs"], "factors": [0, 1, 0]}
    with pytest.raises(UserError, match="give the run's epochs"):
        SpeedrunModule.from_config(compose_cfg(), nn.Linear(2, 2), optim=optim, epochs=None)
    module = SpeedrunModule.from_config(compose_cfg(), nn.Linear(2, 2), optim=optim, epochs=10)
    assert module.schedule_knots == [0, 2, 10]


# ---------------------------------------------------------------- the CPU proxy keeps Page's steps
def test_cpu_proxy_keeps_the_full_training_set_and_the_recipe(compose_cfg) -> None:
    cfg = compose_cfg("experiment=cpu_proxy")
    validate(cfg)
    assert cfg.data.source == "torchvision", "the proxy does not force a data source"
    assert cfg.data.subset is None and cfg.data.batch_size == 512  # 50,000 // 512 = 97 steps an epoch
    assert cfg.model.width == 0.125 and cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.check_val_every_n_epoch == cfg.epochs == 24, "one evaluation, at the end"
    final = compose_cfg("experiment=cpu_proxy", "stage=s7_tta")
    assert final.epochs == 10 and final.trainer.check_val_every_n_epoch == 10
    assert final.trainer.precision == "32-true", "fp32 on a CPU without bf16 units"
    assert math.isclose(final.optim.lr, 1.0) and list(final.optim.schedule.epochs) == [0, "epochs/5", "epochs - 2"]
    assert compose_cfg("experiment=cpu_proxy", "data.source=image_folder").data.source == "image_folder"
    # a trick after the experiment (the leave-one-out sweep's lists) keeps the proxy in fp32
    assert compose_cfg("experiment=cpu_proxy", "+trick=mixed_precision").trainer.precision == "32-true"
    assert compose_cfg("+trick=mixed_precision", "trainer=cpu").trainer.precision == "bf16-mixed"


def test_page_final_on_the_proxy_is_the_s7_row(compose_cfg) -> None:
    """docs/results.md's recipes table takes page_final's proxy runs from the s7 row of Page's table: one config."""

    def job(*overrides: str) -> dict:
        cfg = compose_cfg(*overrides)
        with omegaconf.open_dict(cfg):
            del cfg["hydra"]  # where the run writes, not what it trains
        job = OmegaConf.to_container(cfg, resolve=True)
        del job["task_name"], job["paths"]
        return job

    page_final, s7 = job("experiment=page_final", "proxy=cpu"), job("experiment=cpu_proxy", "stage=s7_tta")
    assert page_final == s7
    assert page_final["model"]["width"] == 0.125 and page_final["epochs"] == 10
