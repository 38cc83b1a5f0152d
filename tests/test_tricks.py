"""Each trick tested by its mechanism, then all of them composed together."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY, run_train
from hydra.utils import instantiate
from torch import nn

from cifar_speedrun.conf_files import evaluation_tricks, trick_names
from cifar_speedrun.config.command_line import available_options, check_group_overrides, validate
from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.averaging import EMA
from cifar_speedrun.recipe.models import build as build_net
from cifar_speedrun.recipe.models import build_norm, build_whitening
from cifar_speedrun.recipe.models.layers import BatchNorm, PatchWhitening
from cifar_speedrun.recipe.module import SpeedrunModule
from cifar_speedrun.recipe.optim import effective_hyperparameters
from cifar_speedrun.recipe.schedule import resolve_knots
from cifar_speedrun.recipe.tta import tta_logits

PAGE_TRICKS = ["mixed_precision", "pool_before_norm", "label_smoothing", "celu", "ghost_bn", "frozen_bn_scale",
               "whitening", "ema", "tta"]
ALL_TRICKS = trick_names()  # conf/trick/*.yaml: a new trick file joins every parametrized test below


def build(cfg) -> SpeedrunModule:
    net = instantiate(cfg.model)
    return SpeedrunModule.from_config(cfg, net)


def test_every_trick_file_is_an_option_and_documented() -> None:
    assert set(ALL_TRICKS) == set(available_options("trick")) and set(PAGE_TRICKS) < set(ALL_TRICKS)
    readme, tricks_doc = (REPO / "README.md").read_text(), (REPO / "docs" / "tricks.md").read_text()
    missing = [name for name in ALL_TRICKS if f"`{name}`" not in readme or f"`{name}`" not in tricks_doc]
    assert not missing, f"tricks without a row in README.md's table or docs/tricks.md: {missing}"


def test_tta_on_the_least_confident_images_only_changes_those() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain, full = net(x), tta_logits(net, x, flip=True)
        every = tta_logits(net, x, flip=True, least_confident=1.0)
        quarter = tta_logits(net, x, flip=True, least_confident=0.25)
    assert torch.allclose(every, full, atol=1e-6), "a fraction of 1 is flip TTA on every image"
    unsure = F.softmax(plain, dim=1).amax(dim=1).topk(2, largest=False).indices  # 25% of 8
    changed = (~torch.isclose(quarter, plain, atol=1e-7)).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= set(unsure.tolist())
    assert torch.allclose(quarter[unsure], full[unsure], atol=1e-6)
    assert "tta_least_confident" in evaluation_tricks(), "eval.py takes it: it sets tta.* keys only"


# ---------------------------------------------------------------- label smoothing
def test_label_smoothing_loss_equals_the_formula(compose_cfg) -> None:
    module = build(compose_cfg("+trick=label_smoothing", "model.width=0.125"))
    assert module.label_smoothing == 0.2
    logits, labels = torch.randn(64, 10), torch.randint(0, 10, (64,))
    log_p = F.log_softmax(logits, dim=1)
    nll = -log_p[torch.arange(64), labels].mean()
    expected = 0.8 * nll + 0.2 * (-log_p.mean(dim=1)).mean()  # (1-a) NLL + a * mean_k(-log p_k)
    assert torch.allclose(module.loss(logits, labels), expected, atol=1e-6)


# ---------------------------------------------------------------- CELU
def test_celu_replaces_every_relu(compose_cfg) -> None:
    net = instantiate(compose_cfg("+trick=celu").model)
    celus = [m for m in net.modules() if isinstance(m, nn.CELU)]
    assert len(celus) == 8 and not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert celus[0].alpha == 0.075  # Page's alpha; frozen_bn_scale makes it 0.3
    both = instantiate(compose_cfg("trick=[celu,frozen_bn_scale]").model)
    assert next(m for m in both.modules() if isinstance(m, nn.CELU)).alpha == 0.3


# ---------------------------------------------------------------- ghost batch norm
def test_ghost_bn_normalizes_each_split_with_its_own_statistics() -> None:
    torch.manual_seed(0)
    splits, channels = 4, 3
    bn = build_norm(channels, kind="ghost", ghost_splits=splits).train()
    x = torch.randn(32, channels, 5, 5) * torch.arange(1, 33).view(32, 1, 1, 1)  # splits differ a lot
    out = bn(x)
    means = []
    for k in range(splits):
        part = x[k::splits]  # split k: images k, k+s, k+2s, ...
        reference = F.batch_norm(part, None, None, training=True, eps=bn.eps)
        assert torch.allclose(out[k::splits], reference, atol=1e-5)
        means.append(part.mean(dim=(0, 2, 3)))
    assert not torch.allclose(means[0], means[1]), "splits have different batch statistics"
    # whole-batch BN would normalize differently
    assert not torch.allclose(out, F.batch_norm(x, None, None, training=True))


def test_ghost_bn_with_indivisible_batch_is_refused_before_training(compose_cfg) -> None:
    with pytest.raises(UserError, match="divisible by 16"):
        validate(compose_cfg("+trick=ghost_bn", "data.batch_size=500"))
    validate(compose_cfg("+trick=ghost_bn", "data.batch_size=512"))


# ---------------------------------------------------------------- frozen BN scales
def test_frozen_scales_stay_fixed_while_biases_learn(compose_cfg) -> None:
    cfg = compose_cfg("+trick=frozen_bn_scale", "model.width=0.125")
    module = build(cfg)
    norms = [m for m in module.net.modules() if isinstance(m, BatchNorm)]
    scales = [n.weight.detach().clone() for n in norms]
    biases = [n.bias.detach().clone() for n in norms]
    groups = module.optim.build(module.net, module.batch_size, "cpu").optimizer.param_groups
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    weights_group, bias_group = groups
    assert bias_group["lr"] == pytest.approx(64 * weights_group["lr"])
    assert bias_group["weight_decay"] == pytest.approx(weights_group["weight_decay"] / 64)
    assert module.net.scale.factor == 0.0625
    module.net.train()
    loss = module.loss(module.net(torch.randn(32, 3, 32, 32)), torch.randint(0, 10, (32,)))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(n.weight, s) and (n.weight == 1.0).all() for n, s in zip(norms, scales, strict=True))
    assert all(not n.weight.requires_grad for n in norms)
    assert any(not torch.equal(n.bias, b) for n, b in zip(norms, biases, strict=True))


# ---------------------------------------------------------------- whitening
def test_whitening_filters_make_patch_covariance_identity(real_data) -> None:
    from cifar_speedrun.recipe.augment import PAGE_MEAN, PAGE_STD, standardize

    images = standardize(real_data.train_x[:2000], PAGE_MEAN, PAGE_STD)
    white = build_whitening(eps=1e-8)
    white.fit_to_data(images)
    out = F.conv2d(images, white.weight)  # valid patches only: each output pixel is one 3x3 patch
    flat = out.permute(1, 0, 2, 3).reshape(27, -1).double()
    second_moment = flat @ flat.T / (flat.shape[1] - 1)
    assert torch.allclose(second_moment, torch.eye(27, dtype=torch.float64), atol=1e-3)
    # with Page's eps = 1e-2 the small-eigenvalue directions are damped, never amplified beyond 1
    page = build_whitening()
    page.fit_to_data(images)
    flat = F.conv2d(images, page.weight).permute(1, 0, 2, 3).reshape(27, -1).double()
    diagonal = (flat @ flat.T / (flat.shape[1] - 1)).diagonal()
    assert (diagonal <= 1.0 + 1e-3).all() and diagonal.max() > 0.99


def test_whitening_is_fitted_before_training_and_frozen(compose_cfg) -> None:
    module = build(compose_cfg("+trick=whitening", "model.width=0.125"))
    white = module.net.prep.whiten
    assert isinstance(white, PatchWhitening) and module.net.prep.block.conv.kernel_size == (1, 1)
    assert not any(p is white.weight for p in module.parameters()), "whitening filters are not trained"


# ---------------------------------------------------------------- EMA
class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.layer(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.seen.append(self.layer.weight.detach().clone())  # weights after each optimizer step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Batches:
    """A plain iterable of batches (Lightning would wrap a list in a DataLoader)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def test_ema_weights_equal_the_closed_form_average(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = _Batches([(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(12)])
    module = _Tiny()
    ema = EMA(momentum=0.9, every_n_steps=3, use_buffers=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=12, callbacks=[ema], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    decay = 0.9**3  # momentum per batch, applied every 3 batches
    updates = [module.seen[i] for i in (2, 5, 8, 11)]  # after optimizer steps 3, 6, 9, 12
    expected = updates[0]
    for weights in updates[1:]:
        expected = decay * expected + (1 - decay) * weights
    # closed form: d^(k-1) w_1 + sum_j (1-d) d^(k-j) w_j
    k = len(updates)
    closed = decay ** (k - 1) * updates[0] + sum((1 - decay) * decay ** (k - j) * updates[j - 1]
                                                 for j in range(2, k + 1))
    assert torch.allclose(expected, closed)
    assert torch.allclose(module.layer.weight, closed, atol=1e-6), "the model ends with the EMA weights"
    assert not torch.allclose(module.seen[-1], closed)


def test_ema_trick_adds_the_callback(compose_cfg) -> None:
    cfg = compose_cfg("+trick=ema")
    callback = instantiate(cfg.callbacks.ema)
    assert isinstance(callback, EMA) and callback.decay == pytest.approx(0.99**5)


# ---------------------------------------------------------------- TTA
def test_tta_is_the_mean_over_the_flipped_pair_and_flip_invariant() -> None:
    net = build_net("davidnet", width=0.125).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = tta_logits(net, x, flip=True)
        assert torch.allclose(out, (net(x) + net(x.flip(-1))) / 2, atol=1e-6)
        assert torch.allclose(tta_logits(net, x.flip(-1), flip=True), out, atol=1e-5)
        assert torch.allclose(tta_logits(net, x), net(x))
        assert tta_logits(net, x, flip=True, translate=True).shape == (6, 10)
        log_mean = tta_logits(net, x, flip=True, reduce="log_softmax")
        expected = (F.log_softmax(net(x), 1) + F.log_softmax(net(x.flip(-1)), 1)) / 2
        assert torch.allclose(log_mean, expected, atol=1e-5)


# ---------------------------------------------------------------- pool before norm, precision, layout
def test_pool_before_norm_layer_order(compose_cfg) -> None:
    net = instantiate(compose_cfg("+trick=pool_before_norm").model)
    assert list(dict(net.layer2.named_children())) == ["conv", "pool", "norm", "act"]
    assert list(dict(net.layer1.block.named_children())) == ["conv", "pool", "norm", "act"]
    assert list(dict(net.prep.named_children())) == ["conv", "norm", "act"]  # prep has no pool


def test_mixed_precision_sets_trainer_precision_and_fp32_norm(compose_cfg) -> None:
    cfg = compose_cfg("+trick=mixed_precision", "trainer=cpu")
    assert cfg.trainer.precision == "bf16-mixed"
    assert compose_cfg("+trick=mixed_precision", "trainer.accelerator=gpu").trainer.precision == "16-mixed"
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.precision == "bf16-mixed"
    net = instantiate(cfg.model)
    norm = net.prep.norm
    assert norm.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(torch.randn(4, 64, 8, 8).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert cfg.data.half_precision  # fp16 dataset on CUDA (kept fp32 on CPU)


def test_channels_last_and_compile_flags(compose_cfg) -> None:
    module = build(compose_cfg("trick=[channels_last,compile]", "model.width=0.125"))
    assert module.net.layer2.conv.weight.is_contiguous(memory_format=torch.channels_last)
    module.setup("fit")
    assert getattr(module.net, "_compiled_call_impl", None) is not None


def test_cutout_toggle(compose_cfg) -> None:
    from cifar_speedrun.recipe.augment import AugmentConfig, augment_batch

    cfg = compose_cfg("data.cutout=false")
    assert cfg.data.cutout is False
    images = torch.ones(256, 3, 40, 40)
    out = augment_batch(images, torch.Generator().manual_seed(0), AugmentConfig(cutout=cfg.data.cutout))
    assert (out != 0).all()


# ---------------------------------------------------------------- Page's invariant hyperparameters
def test_hold_invariant_rescales_lr_and_weight_decay() -> None:
    optim = {"lr": 0.4, "weight_decay": 5e-4, "momentum": 0.9, "hold_invariant": True,
             "reference_batch_size": 512, "reference_momentum": 0.9}
    optim = SimpleNamespace(**optim)
    base = effective_hyperparameters(optim, 512)
    assert base["lr"] == pytest.approx(0.4) and base["weight_decay"] == pytest.approx(5e-4)
    half = effective_hyperparameters(optim, 256)
    # λ/N fixed: 0.4/512 = lr/256 -> lr = 0.2; λα fixed: 0.4 * 5e-4 = 0.2 * wd -> wd = 1e-3
    assert half["lr"] == pytest.approx(0.2) and half["weight_decay"] == pytest.approx(1e-3)
    assert half["lr_per_example"] == pytest.approx(base["lr_per_example"])
    low_momentum = effective_hyperparameters(SimpleNamespace(**{**vars(optim), "momentum": 0.8}), 512)
    # λ/(1-ρ) fixed: 0.4/0.1 = lr/0.2 -> lr = 0.8; λα fixed -> wd = 2.5e-4
    assert low_momentum["lr"] == pytest.approx(0.8) and low_momentum["weight_decay"] == pytest.approx(2.5e-4)
    for key in ("lr_per_example_over_1_minus_momentum", "lr_times_weight_decay"):
        assert low_momentum[key] == pytest.approx(base[key]) and half[key] == pytest.approx(base[key])
    off = effective_hyperparameters(SimpleNamespace(**{**vars(optim), "hold_invariant": False}), 256)
    assert off["lr"] == 0.4 and off["weight_decay"] == 5e-4


# ---------------------------------------------------------------- composition
@pytest.mark.parametrize("tricks", [[t] for t in ALL_TRICKS if t != "compile"] + [PAGE_TRICKS])
def test_tricks_compose_build_and_train_a_step(compose_cfg, tricks: list[str]) -> None:
    cfg = compose_cfg(f"trick=[{','.join(tricks)}]", "model.width=0.125", "trainer=cpu", "data.batch_size=64",
                      "model.norm.ghost_splits=4")
    validate(cfg)
    assert list(cfg.applied_tricks) == tricks
    module = build(cfg)
    for layer in module.net.modules():
        if isinstance(layer, PatchWhitening):
            layer.fit_to_data(torch.randn(64, 3, 32, 32))
    module.net.train()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    loss = module.loss(module.net(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("callbacks", "trainer"):
        assert cfg[name] is not None


@pytest.mark.parametrize("experiment", ["page_baseline", "page_final", "cpu_proxy"])
def test_experiments_compose(compose_cfg, experiment: str) -> None:
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    if experiment == "page_final":
        assert cfg.epochs == 10 and cfg.optim.lr == 1.0 and cfg.data.batch_size == 512
        assert resolve_knots(list(cfg.optim.schedule.epochs), cfg.epochs) == [0, 2, 8]
        assert list(cfg.optim.schedule.factors) == [0, 1, 0.1]
        assert set(cfg.applied_tricks) == set(PAGE_TRICKS)
        assert cfg.data.cutout is False
    if experiment == "page_baseline":
        assert cfg.epochs == 24 and list(cfg.applied_tricks) == ["mixed_precision"]  # Page's baseline is fp16
    if experiment == "cpu_proxy":
        assert cfg.model.width == 0.125 and cfg.trainer.accelerator == "cpu" and cfg.data.subset is None


def test_sweeps_name_existing_stages(compose_cfg) -> None:
    for sweep in ("bag_of_tricks", "leave_one_out"):
        params = compose_cfg(f"sweep={sweep}").hydra.sweeper.params
        for stage in str(params.stage).split(","):
            cfg = compose_cfg(f"stage={stage.strip()}")
            validate(cfg)
    stages = str(compose_cfg("sweep=bag_of_tricks").hydra.sweeper.params.stage).split(",")
    counts = [len(compose_cfg(f"stage={s}").applied_tricks) for s in stages]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 9  # cumulative from fp16 on


# ---------------------------------------------------------------- errors
def test_unknown_trick_is_one_line_listing_the_tricks() -> None:
    with pytest.raises(UserError) as info:
        check_group_overrides(["+trick=[label_smoothing,celux]"])
    message = str(info.value)
    assert "celux" in message and "label_smoothing" in message and "\n" not in message
    check_group_overrides(["trick=[],[celu],[celu,tta]", "+trick=ema", "experiment=cpu_proxy", "seed=1,2"])


@pytest.mark.slow
def test_unknown_trick_from_the_command_line(tmp_path: Path, archive: str, cache_dir: str) -> None:
    result = run_train(["+trick=labelsmoothing"], tmp_path, cache_dir, archive)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: unknown trick 'labelsmoothing'; available: {', '.join(sorted(ALL_TRICKS))}"]


@pytest.mark.slow
def test_multirun_grid_of_two_jobs(tmp_path: Path, archive: str, cache_dir: str) -> None:
    result = run_train(["-m", *TINY, "trick=[],[label_smoothing,celu]",
                        f"hydra.sweep.dir={tmp_path}/multi"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads((tmp_path / "multi" / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["tricks"] for r in results] == [[], ["label_smoothing", "celu"]]
    assert all(r["status"] == "ok" and r["test_acc"] is not None for r in results)


def test_leave_one_out_sweep_expands_to_all_and_each_minus_one(compose_cfg) -> None:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose_cfg("sweep=leave_one_out").hydra.sweeper.params
    overrides = [f"{key}={value}" for key, value in params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    tricks = {next(o for o in job if o.startswith("trick=")) for job in jobs}
    full = set(PAGE_TRICKS)
    lists = [set(t[len("trick=["):-1].split(",")) for t in tricks]
    assert len(jobs) == 30 and len(lists) == 10
    assert full in lists and sorted(len(full - s) for s in lists) == [0] + [1] * 9
    assert {next(iter(full - s)) for s in lists if s != full} == full
