"""airbench's pieces as switches: each one's mechanism, then the recipes composed (and mixed with Page's)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cifar_speedrun.config.command_line import validate
from cifar_speedrun.recipe.augment import AugmentConfig, AugmentedBatches
from cifar_speedrun.recipe.averaging import Lookahead
from cifar_speedrun.recipe.models import build
from cifar_speedrun.recipe.models.layers import BatchNorm, GhostBatchNorm, PatchWhitening
from cifar_speedrun.recipe.module import SpeedrunModule
from cifar_speedrun.recipe.optim import MuonSGD, airbench_scale, orthogonalize, read_optimizer
from cifar_speedrun.recipe.schedule import resolve_knots
from cifar_speedrun.recipe.tta import tta_logits

# By hand, airbench94 at width 1 (widths 64, 256, 256; every conv 3x3 without bias):
#   whitening bias 24 (the 24 filters are a frozen buffer)
#   block1: 24*64*9 + 64*64*9 = 50,688; block2: 64*256*9 + 256*256*9 = 737,280;
#   block3: 2 * 256*256*9 = 1,179,648; BN scale + bias 2*(64+64+256+256+256+256) = 2,304; head 256*10 = 2,560
AIRBENCH_PARAMETERS = 24 + 50_688 + 737_280 + 1_179_648 + 2_304 + 2_560


def test_airbench_net_layout_and_size() -> None:
    net = build("airbench94")
    assert sum(p.numel() for p in net.parameters()) == AIRBENCH_PARAMETERS
    assert isinstance(net.whiten, PatchWhitening) and net.whiten.out_channels == 24 and net.whiten.padding == 0
    assert list(dict(net.block1.named_children())) == ["conv1", "pool", "norm1", "act1", "conv2", "norm2", "act2"]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(24, 64), (64, 64), (64, 256), (256, 256),
                                                                (256, 256), (256, 256)]
    norms = [m for m in net.modules() if isinstance(m, BatchNorm)]
    assert all(n.eps == 1e-12 and n.momentum == pytest.approx(0.4) and not n.weight.requires_grad for n in norms)
    assert isinstance(net.whiten_act, nn.GELU) and net.linear.bias is None and net.scale.factor == pytest.approx(1 / 9)
    x = torch.randn(2, 3, 32, 32)
    spatial = []
    h = net.whiten_act(net.whiten(x))
    for block in (net.block1, net.block2, net.block3):
        h = block(h)
        spatial.append(h.shape[-1])
    assert spatial == [15, 7, 3] and net(x).shape == (2, 10)  # 32 -> 31 (2x2, no padding) -> 15 -> 7 -> 3
    small = build("airbench94", width=0.125)
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)][::2] == [8, 32, 32]


@pytest.mark.parametrize("net", [build("airbench94"), build("davidnet", width=0.25, dirac_init=True)],
                         ids=["airbench", "davidnet"])
def test_dirac_init_is_the_identity_on_the_first_channels(net: nn.Module) -> None:
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        x = torch.randn(2, conv.in_channels, 8, 8)
        out = F.conv2d(x, conv.weight, padding=conv.kernel_size[0] // 2)
        keep = min(conv.in_channels, conv.out_channels)
        assert torch.allclose(out[:, :keep], x[:, :keep], atol=1e-6)
        if conv.out_channels > conv.in_channels:
            assert not torch.allclose(conv.weight[conv.in_channels:], torch.zeros(1)), "the other filters are random"
    plain = build("davidnet", width=0.25).prep.conv  # off by default on DavidNet
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(F.conv2d(x, plain.weight, padding=1)[:, :3], x, atol=1e-3)


def test_airbench_whitening_has_both_signs_and_a_bias_frozen_after_its_epochs(real_data) -> None:
    from cifar_speedrun.recipe.augment import PAGE_MEAN, PAGE_STD, standardize

    white = build("airbench94", width=0.125).whiten
    white.fit_to_data(standardize(real_data.train_x[:2000], PAGE_MEAN, PAGE_STD))
    assert torch.allclose(white.weight[12:], -white.weight[:12])
    assert white.bias is not None and white.bias.shape == (24,) and white.bias_epochs == 3
    white.set_epoch(2)
    assert white.bias.requires_grad
    white.set_epoch(3)
    assert not white.bias.requires_grad


class _Batches:
    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def test_whitening_bias_trains_only_in_its_epochs(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("model=airbench94", "model.width=0.125", "model.whitening.bias_epochs=1", "optim=airbench_sgd",
                      "data.batch_size=32", "epochs=3")
    module = SpeedrunModule.from_config(cfg, batch_size=32, epochs=3)
    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seen.append(pl_module.net.whiten.bias.detach().clone())

    torch.manual_seed(0)
    data = _Batches([(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(3)])
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, callbacks=[Record()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert not torch.equal(seen[0], torch.zeros(24)), "trained in epoch 0"
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0]), "frozen from epoch 1 on"


# ---------------------------------------------------------------- alternating flip
def _images_that_show_their_flip(count: int) -> torch.Tensor:
    ramp = torch.arange(32, dtype=torch.float32).view(1, 1, 1, 32)  # increasing left to right
    return ramp.expand(count, 3, 32, 32).contiguous()


@pytest.mark.parametrize("resume", [False, True])
def test_alternating_flip_mirrors_each_image_on_alternate_epochs(resume: bool) -> None:
    count = 64
    images = _images_that_show_their_flip(count)
    labels = torch.arange(count)  # identifies each image after the shuffle

    def batches():
        return AugmentedBatches(images, labels, 16, AugmentConfig(cutout=False), seed=3, flip_mode="alternating")

    def flips(loader) -> dict[int, bool]:
        out = {}
        for x, y in loader:
            for image, label in zip(x, y, strict=True):
                out[int(label)] = bool(image[0, 0, 0] > image[0, 0, -1])  # decreasing: mirrored
        return out

    loader = batches()
    first = flips(loader)
    if resume:  # a resumed run continues the pattern from the saved state
        state = loader.state_dict()
        loader = batches()
        loader.load_state_dict(state)
    second, third = flips(loader), flips(loader)
    assert len(first) == count and 0.3 < sum(first.values()) / count < 0.7
    assert all(second[i] != first[i] for i in range(count)), "flipped in epoch 0 <=> unflipped in epoch 1"
    assert third == first


# ---------------------------------------------------------------- lookahead
class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.total_steps = 12
        self.after_step: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_lookahead_copies_the_average_back_with_its_decay_schedule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = _Batches([(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(6)])
    module = _Tiny()
    lookahead = Lookahead(decay_base=0.9, decay_pow=2.0, every_n_steps=2, start_epochs=1, use_buffers=True)
    weights_after_callback = []

    class Probe(L.Callback):  # runs after Lookahead (later in the list)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            weights_after_callback.append((trainer.global_step, pl_module.layer.weight.detach().clone()))

    raw = []

    class Raw(L.Callback):  # runs before Lookahead: the weights the optimizer produced
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            raw.append(pl_module.layer.weight.detach().clone())

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[Raw(), lookahead, Probe()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    # Epoch 0 (steps 1-6): no averaging. Epoch 1: updates at steps 8, 10, 12 (every 2, from epoch 1).
    assert all(torch.equal(w, raw[i]) for i, (_, w) in enumerate(weights_after_callback[:6]))
    average = raw[7].clone()  # step 8: the first update starts the average
    assert torch.equal(weights_after_callback[7][1], average)
    for step in (10, 12):
        decay = 0.9**2 * (step / 12) ** 2
        average = decay * average + (1 - decay) * raw[step - 1]
        assert torch.allclose(weights_after_callback[step - 1][1], average, atol=1e-6), step
    assert torch.equal(weights_after_callback[8][1], raw[8]), "between updates the weights move freely"
    assert torch.allclose(module.layer.weight, average, atol=1e-6), "the final weights are the average"


# ---------------------------------------------------------------- decoupled SGD and Muon
def test_airbench_decoupled_lr_and_weight_decay_match_its_numbers(compose_cfg) -> None:
    cfg = compose_cfg("experiment=airbench94", "model.width=0.125")
    module = SpeedrunModule.from_config(cfg, batch_size=1024, epochs=cfg.epochs)
    effective = module.optim.build(module.net, module.batch_size, "cpu").effective
    # airbench94.py: kilostep_scale = 1024 * (1 + 1 / (1 - 0.85)); lr = 11.5 / kilostep_scale;
    # wd = 0.0153 * 1024 / kilostep_scale; lr_biases = lr * 64
    assert airbench_scale(0.85) == pytest.approx(7850.6667, rel=1e-6)
    assert effective["lr_per_example"] == pytest.approx(1.46484e-3, rel=1e-4)
    assert effective["weight_decay_shrink_per_step"] == pytest.approx(1.99571e-3, rel=1e-4)
    assert effective["bias_lr_per_example"] == pytest.approx(0.09375, rel=1e-6)
    built = module.optim.build(module.net, module.batch_size, "cpu")
    groups = {g["name"]: g for g in built.optimizer.param_groups}
    for name, lr_example in (("weights", 11.5 / 7850.6667), ("biases", 64 * 11.5 / 7850.6667)):
        assert groups[name]["lr"] == pytest.approx(lr_example * 1024, rel=1e-5)
        assert groups[name]["lr"] * groups[name]["weight_decay"] == pytest.approx(1.99571e-3, rel=1e-4)
    assert any(p is module.net.whiten.bias for p in groups["weights"]["params"]), "airbench: 'norm' not in name"
    assert len(groups["biases"]["params"]) == 6  # the six BN biases


def test_our_mean_loss_step_equals_airbenchs_summed_loss_step(compose_cfg) -> None:
    """The same update as airbench's SGD(lr, weight_decay=wd/lr) on the summed loss."""
    cfg = compose_cfg("experiment=airbench94", "model.width=0.125")
    torch.manual_seed(0)
    ours = instantiate(cfg.model)
    theirs = instantiate(cfg.model)
    theirs.load_state_dict(ours.state_dict())
    batch = 32
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    module = SpeedrunModule.from_config(cfg, ours, batch_size=batch, epochs=cfg.epochs)
    optimizer = module.optim.build(ours, batch, "cpu").optimizer
    scale = airbench_scale(0.85)
    lr, wd = 11.5 / scale, 0.0153 * batch / scale
    norm_biases = [m.bias for m in theirs.modules() if isinstance(m, BatchNorm)]
    ids = {id(p) for p in norm_biases}
    others = [p for p in theirs.parameters() if p.requires_grad and id(p) not in ids]
    reference = torch.optim.SGD([{"params": norm_biases, "lr": lr * 64, "weight_decay": wd / (lr * 64)},
                                 {"params": others, "lr": lr, "weight_decay": wd / lr}], momentum=0.85, nesterov=True)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        optimizer.step()
        reference.zero_grad()
        F.cross_entropy(theirs(x), y, reduction="sum").backward()
        reference.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_orthogonalize_gives_singular_values_near_one() -> None:
    gradient = torch.randn(32, 24 * 9)
    values = torch.linalg.svdvals(orthogonalize(gradient, steps=5))
    assert values.min() > 0.5 and values.max() < 1.5  # Newton-Schulz quintic: roughly [0.7, 1.2]
    tall = torch.linalg.svdvals(orthogonalize(torch.randn(64, 16), steps=5))
    assert tall.min() > 0.5 and tall.max() < 1.5


def test_muon_updates_only_the_conv_filters_and_sgd_the_rest(compose_cfg) -> None:
    cfg = compose_cfg("experiment=airbench94_muon", "model.width=0.125")
    torch.manual_seed(0)
    net = instantiate(cfg.model)
    module = SpeedrunModule.from_config(cfg, net, batch_size=64, epochs=cfg.epochs)
    optimizer = module.optim.build(net, 64, "cpu").optimizer
    assert isinstance(optimizer, MuonSGD)
    groups = {g["name"]: g for g in optimizer.param_groups}
    conv_weights = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in groups["filters"]["params"]} == {id(p) for p in conv_weights}
    assert groups["filters"]["muon"] and not any(groups[n]["muon"] for n in ("whiten_bias", "biases", "head"))
    assert [id(p) for p in groups["head"]["params"]] == [id(net.linear.weight)]
    assert [id(p) for p in groups["whiten_bias"]["params"]] == [id(net.whiten.bias)]
    assert groups["whiten_bias"]["lr"] == pytest.approx(0.053 * 64)
    assert groups["biases"]["lr"] == pytest.approx(0.053 * (32 / 256) * 64)  # head width 32 of airbench's 256
    assert groups["head"]["lr"] == pytest.approx(0.67 * (32 / 256) * 64)
    assert groups["head"]["lr"] * groups["head"]["weight_decay"] == pytest.approx(2e-6 * 64)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    F.cross_entropy(net(x), y).backward()
    conv = net.block1.conv1.weight
    expected_start = before["block1.conv1.weight"] * math.sqrt(conv.size(0)) / before["block1.conv1.weight"].norm()
    direction = orthogonalize(conv.grad.reshape(conv.size(0), -1), 3).view_as(conv)  # first step: buffer = grad
    nesterov = orthogonalize((conv.grad * (1 + 0.6)).reshape(conv.size(0), -1), 3).view_as(conv)
    optimizer.step()
    assert torch.allclose(conv, expected_start - 0.24 * nesterov, atol=1e-5)
    assert not torch.allclose(direction, torch.zeros(1))
    assert all(torch.equal(dict(net.named_parameters())[name], before[name]) for name in frozen), "frozen stay"
    assert not torch.equal(net.linear.weight, before["linear.weight"]) and not torch.equal(net.block2.norm1.bias,
                                                                                          before["block2.norm1.bias"])


@pytest.mark.parametrize("width,reference,factor", [(1.0, 256, 1.0), (0.125, 256, 0.125), (0.5, 256, 0.5),
                                                     (0.125, None, 1.0)])
def test_the_muon_head_and_bn_bias_lrs_keep_airbenchs_steps_at_any_width(compose_cfg, width, reference,
                                                                         factor) -> None:
    """The head divides its logits by its feature count d, so the head's and the BN biases' gradients scale
    as 1/d and their lrs as d (x1 at airbench's width); the whitening bias and the Muon filters keep theirs."""
    cfg = compose_cfg("experiment=airbench94_muon", f"model.width={width}",
                      f"optim.width_reference_features={'null' if reference is None else reference}")
    net = instantiate(cfg.model)
    assert net.linear.in_features == round(256 * width)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    built = read_optimizer(optim).build(net, 100, "cpu")
    head = next(g for g in built.optimizer.param_groups if g["name"] == "head")
    assert head["lr"] == pytest.approx(0.67 * factor * 100)
    assert head["lr"] * head["weight_decay"] == pytest.approx(2e-6 * 100)  # the shrink does not scale
    assert built.effective["head_lr_per_example"] == pytest.approx(0.67 * factor)
    groups = {g["name"]: g for g in built.optimizer.param_groups}
    assert groups["biases"]["lr"] == pytest.approx(0.053 * factor * 100)
    assert groups["biases"]["lr"] * groups["biases"]["weight_decay"] == pytest.approx(2e-6 * 100)
    assert groups["whiten_bias"]["lr"] == pytest.approx(0.053 * 100)
    assert groups["filters"]["lr"] == pytest.approx(0.24)
    assert built.effective["width_factor"] == pytest.approx(factor)


def test_the_whitening_bias_has_its_own_lr_schedule_in_the_muon_recipe(compose_cfg) -> None:
    cfg = compose_cfg("experiment=airbench94_muon", "model.width=0.125")
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    assert resolve_knots(optim["whiten_bias_schedule"]["epochs"], 8) == [0, 3]
    assert resolve_knots(optim["schedule"]["epochs"], 8) == [0, 8] and optim["schedule"]["factors"] == [1.0, 0.0]


# ---------------------------------------------------------------- fractional epochs, TTA, composition
def test_a_fractional_run_stops_inside_its_last_epoch(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("model=airbench94", "model.width=0.125", "optim=airbench_sgd", "epochs=1.5")
    validate(cfg)
    assert cfg.trainer.max_epochs == 2
    module = SpeedrunModule.from_config(cfg, batch_size=16, epochs=1.5)
    torch.manual_seed(0)
    data = _Batches([(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(4)])
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert module.total_steps == 6 and trainer.global_step == 6  # ceil(1.5 x 4)
    assert module.schedule.at_epoch(1.5) == pytest.approx(0.07)
    assert module.schedule.at_epoch(1.5 * 0.23) == pytest.approx(1.0)


def test_tta_level_two_weights_the_views_as_airbench() -> None:
    net = build("airbench94", width=0.125).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :32, :32], padded[..., 2:, 2:]]
        plain = (net(x) + net(x.flip(-1))) / 2
        moved = sum(net(v) + net(v.flip(-1)) for v in shifted) / 4
        assert torch.allclose(tta_logits(net, x, flip=True, translate=True), 0.5 * plain + 0.5 * moved, atol=1e-5)
        assert torch.allclose(tta_logits(net, x, flip=True), plain, atol=1e-6)  # Page's: the mean of two


@pytest.mark.parametrize("experiment", ["airbench94", "airbench94_muon"])
def test_airbench_experiments_carry_its_values(compose_cfg, experiment: str) -> None:
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    assert cfg.model._target_.endswith("AirbenchNet") and cfg.data.translate == 2 and cfg.data.cutout is False
    assert cfg.data.flip_mode == "alternating" and cfg.tta.flip and cfg.tta.translate
    assert cfg.loss.label_smoothing == 0.2 and cfg.channels_last
    if experiment == "airbench94":
        assert cfg.epochs == 9.9 and cfg.data.batch_size == 1024 and cfg.optim.lr_per_1024 == 11.5
        assert "lookahead" in cfg.callbacks and cfg.trainer.max_epochs == 10
    else:
        assert cfg.epochs == 8 and cfg.data.batch_size == 2000 and cfg.optim.lr == 0.24
        assert cfg.model.logit_scale is None and cfg.model.unit_head_init and "lookahead" not in cfg.callbacks


@pytest.mark.parametrize("overrides", [
    ["+trick=[alternating_flip,lookahead]"],
    ["model=airbench94", "+trick=ghost_bn"],
    ["experiment=airbench94", "+trick=[ghost_bn,celu]"],
    ["experiment=page_final", "+trick=[alternating_flip,dirac_init]"],
    ["experiment=airbench94", "proxy=cpu"],
], ids=lambda o: " ".join(o))
def test_pieces_of_both_recipes_mix_and_train_a_step(compose_cfg, overrides) -> None:
    cfg = compose_cfg(*overrides, "model.width=0.125", "data.batch_size=64", "model.norm.ghost_splits=4")
    validate(cfg)
    net = instantiate(cfg.model)
    module = SpeedrunModule.from_config(cfg, net, batch_size=64, epochs=cfg.epochs)
    for layer in net.modules():
        if isinstance(layer, PatchWhitening):
            layer.fit_to_data(torch.randn(64, 3, 32, 32))
    net.train()
    loss = module.loss(net(torch.randn(64, 3, 32, 32)), torch.randint(0, 10, (64,)))
    loss.backward()
    assert torch.isfinite(loss)
    if "+trick=ghost_bn" in overrides or any("ghost_bn" in o for o in overrides):
        assert any(isinstance(m, GhostBatchNorm) for m in net.modules())


def test_a_trick_for_another_model_is_refused(compose_cfg) -> None:
    from cifar_speedrun.errors import UserError

    with pytest.raises(UserError, match="trick=pool_before_norm sets model.pool_before_norm, which this configuration"):
        validate(compose_cfg("model=airbench94", "+trick=pool_before_norm"))
