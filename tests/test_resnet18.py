"""The third model family, model=resnet18: its size by hand, its layout, and every trick that applies to it.

Each trick is composed onto experiment=resnet18 the way a user writes it, checked (settings.py),
built, shown to change the net or the recipe the way it says, and trained for one step with the
project's optimizer; tricks that cannot apply (pool_before_norm: ResNet-18 pools by stride) are
refused by name. End-to-end runs of experiment=resnet18 are in test_step.py (no host sync, one
graph under compile) and test_trust.py (eval.py reproduces the run).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from cifar_speedrun.config.command_line import validate
from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.models import build, count_parameters
from cifar_speedrun.recipe.models.layers import GhostBatchNorm, PatchWhitening
from cifar_speedrun.recipe.models.resnet18 import BasicBlock, ResNet18
from cifar_speedrun.recipe.module import SpeedrunModule
from cifar_speedrun.recipe.optim import MuonSGD

# By hand, width 1 (3x3 convs and 1x1 shortcut convs without bias; BN: a scale and a bias per channel):
#   stem    3*64*9                                                  =      1,728
#   stage1  4 * 64*64*9                                             =    147,456
#   stage2  64*128*9 + 3 * 128*128*9 + shortcut 64*128              =    524,288
#   stage3  128*256*9 + 3 * 256*256*9 + shortcut 128*256            =  2,097,152
#   stage4  256*512*9 + 3 * 512*512*9 + shortcut 256*512            =  8,388,608
#   BN      2 * (64 + 4*64 + 5*128 + 5*256 + 5*512)                 =      9,600
#   linear  512*10 + 10                                             =      5,130
#   total                                                           = 11,173,962  (the "11.17 M" papers quote)
RESNET18_PARAMETERS = 1_728 + 147_456 + 524_288 + 2_097_152 + 8_388_608 + 9_600 + 5_130


def test_parameter_count_matches_hand_count() -> None:
    assert RESNET18_PARAMETERS == 11_173_962
    assert count_parameters(build("resnet18")) == RESNET18_PARAMETERS


def test_layout_stages_strides_and_head() -> None:
    net = build("resnet18")
    stages = [getattr(net, f"stage{i}") for i in range(1, 5)]
    assert [len(stage) for stage in stages] == [2, 2, 2, 2]
    assert all(isinstance(block, BasicBlock) for stage in stages for block in stage)
    assert [stage[0].conv1.stride for stage in stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert [stage[1].conv2.out_channels for stage in stages] == [64, 128, 256, 512]
    assert len(stages[0][0].shortcut) == 0 and all(len(stage[0].shortcut) == 2 for stage in stages[1:])
    assert net.stem.conv.kernel_size == (3, 3) and not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert isinstance(net.pool, nn.AdaptiveAvgPool2d) and net.linear.bias is not None
    small = build("resnet18", width=0.125).eval()
    x = torch.randn(3, 3, 32, 32)
    assert small(x).shape == (3, 10) and small.linear.in_features == 64
    features = nn.Sequential(*list(small.children())[:-1])(x)
    assert torch.allclose(small(x), features), "logit_scale 1: no scaling by default"


TINY = ["experiment=resnet18", "trainer=cpu", "model.width=0.0625", "data.batch_size=32"]


def _module(cfg) -> SpeedrunModule:
    net = instantiate(cfg.model)
    return SpeedrunModule.from_config(cfg, net)


def _one_step(module: SpeedrunModule) -> float:
    """One training step with the recipe's own optimizer on random images: finite loss, weights move."""
    torch.manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    module.net.fit_to_data(images)  # patch whitening, where the trick adds it
    built = module.optim.build(module.net, module.batch_size, "cpu")
    before = [p.detach().clone() for p in module.net.parameters() if p.requires_grad]
    module.net.train()
    loss = module.loss(module.net(images), labels)
    loss.backward()
    built.optimizer.step()
    after = [p.detach() for p in module.net.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the step moved nothing"
    return float(loss.detach())


def _conv_is_identity_on_first_channels(conv: nn.Conv2d) -> bool:
    k = conv.kernel_size[0]
    centre = conv.weight[: conv.in_channels, :, k // 2, k // 2]
    return torch.equal(centre, torch.eye(conv.in_channels)) and conv.weight[: conv.in_channels].abs().sum() == \
        conv.in_channels


def _bn_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# trick -> what it must change (on the composed config and the built net)
EFFECTS = {
    "label_smoothing": lambda cfg, net: cfg.loss.label_smoothing == 0.2,
    "ema": lambda cfg, net: cfg.callbacks.get("ema") is not None,
    "lookahead": lambda cfg, net: cfg.callbacks.get("lookahead") is not None,
    "tta": lambda cfg, net: cfg.tta.flip is True,
    "celu": lambda cfg, net: any(isinstance(m, nn.CELU) for m in net.modules())
    and not any(isinstance(m, nn.ReLU) for m in net.modules()),
    "ghost_bn": lambda cfg, net: all(isinstance(m, GhostBatchNorm) for m in _bn_layers(net)),
    "frozen_bn_scale": lambda cfg, net: all(not m.weight.requires_grad for m in _bn_layers(net))
    and math.isclose(net.scale.factor, 1 / 16),
    "whitening": lambda cfg, net: isinstance(getattr(net.stem, "whiten", None), PatchWhitening)
    and net.stem.block.conv.kernel_size == (1, 1),
    "dirac_init": lambda cfg, net: _conv_is_identity_on_first_channels(net.stage1[0].conv1),
    "mixed_precision": lambda cfg, net: cfg.trainer.precision == "bf16-mixed" and cfg.model.norm.float32,
    "compile": lambda cfg, net: cfg.compile.enabled,
    "channels_last": lambda cfg, net: cfg.channels_last,
    "alternating_flip": lambda cfg, net: cfg.data.flip_mode == "alternating",
}


@pytest.mark.parametrize("trick", list(EFFECTS))
def test_every_trick_that_applies_to_resnet18_changes_it_and_trains(trick: str, compose_cfg) -> None:
    cfg = compose_cfg(*TINY, f"+trick={trick}")
    validate(cfg)
    module = _module(cfg)
    assert isinstance(module.net, ResNet18)
    assert EFFECTS[trick](cfg, module.net), f"trick={trick} did not change the recipe"
    plain = compose_cfg(*TINY)
    if trick not in plain.applied_tricks:  # experiment=resnet18 is Page's baseline, mixed precision included
        assert not EFFECTS[trick](plain, instantiate(plain.model)), f"trick={trick} is on without it"
    assert math.isfinite(_one_step(module))


@pytest.mark.parametrize("optim", ["sgd", "muon", "lion"])
def test_resnet18_trains_with_each_optimizer(optim: str, compose_cfg) -> None:
    cfg = compose_cfg(*TINY, f"optim={optim}", "model.whitening.enabled=true", "model.whitening.bias=true")
    validate(cfg)
    module = _module(cfg)
    built = module.optim.build(module.net, module.batch_size, "cpu")
    if optim == "muon":
        groups = {group["name"]: group for group in built.optimizer.param_groups}
        assert isinstance(built.optimizer, MuonSGD) and groups["filters"]["muon"]
        # The shortcut 1x1 convs are filters too; the head (weight and bias) trains with SGD.
        shortcut = module.net.stage2[0].shortcut.conv.weight
        assert any(p is shortcut for p in groups["filters"]["params"])
        assert any(p is module.net.linear.bias for p in groups["head"]["params"])
    assert math.isfinite(_one_step(module))


def test_a_trick_that_cannot_apply_is_refused_by_name(compose_cfg) -> None:
    with pytest.raises(UserError, match="trick=pool_before_norm sets model.pool_before_norm, which this configuration"):
        validate(compose_cfg(*TINY, "+trick=pool_before_norm"))
    # frozen_bn_scale's BN-bias factors belong to Page's SGD: with another optimizer the trick is named.
    with pytest.raises(UserError, match="trick=frozen_bn_scale sets optim.bias_lr_factor.*airbench_sgd"):
        validate(compose_cfg("model=resnet18", "trainer=cpu", "optim=airbench_sgd", "+trick=frozen_bn_scale"))


def test_resnet18_settings_are_typed_like_every_family() -> None:
    with pytest.raises(UserError, match="model.width=0 must be a number > 0"):
        build("resnet18", width=0)
    with pytest.raises(UserError, match="model.activation='swish' is not known; use relu, celu, gelu"):
        build("resnet18", activation="swish")
    net = build("resnet18", width=0.125, activation="gelu")
    loss = F.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    assert math.isfinite(float(loss.detach()))
