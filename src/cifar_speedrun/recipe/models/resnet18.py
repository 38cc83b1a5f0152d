"""The CIFAR ResNet-18 most papers use as their baseline (He et al. 2016, in the CIFAR form of
kuangliu/pytorch-cifar and of the papers that cite it).

    stem    conv 3x3 3->64, BN, act                        (no 7x7 conv, no max-pool: 32x32 inputs)
    stage1  2 basic blocks,  64 channels, stride 1          32x32
    stage2  2 basic blocks, 128 channels, stride 2          16x16
    stage3  2 basic blocks, 256 channels, stride 2           8x8
    stage4  2 basic blocks, 512 channels, stride 2           4x4
    head    global average pool, linear 512->10 (with bias), logits x logit_scale (1: none)

A basic block is conv 3x3 (stride s) -> BN -> act -> conv 3x3 -> BN, added to the shortcut (the input,
or a 1x1 conv with stride s and BN where the shape changes), then act. 11,173,962 parameters at
width 1 (tests/test_resnet18.py counts them by hand). The shared settings mean what they mean for
the other families: `width` scales every stage, `norm` (ghost_bn, frozen_bn_scale), `activation`
(celu), `dirac_init`, and `whitening` puts Page's frozen patch-whitening conv and a learned 1x1 conv
in place of the 3x3 stem conv.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cifar_speedrun.recipe.models import base
from cifar_speedrun.recipe.models.base import ModelFamily, ModelSettings
from cifar_speedrun.recipe.models.layers import ConvBlock, Scale, dirac_init_

# He et al. 2016, section 4.1 / kuangliu's ResNet18: widths of the four stages, two blocks each.
STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, make_norm: Callable[[int], nn.Module],
                 make_act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1, self.act1 = make_norm(c_out), make_act()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2, self.act2 = make_norm(c_out), make_act()
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm=make_norm(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet18Settings(ModelSettings, base.ActivationKeys, base.HeadKeys, base.DiracInitKeys, base.NormKeys,
                       base.WhiteningKeys):
    """Only the shared keys: the net itself is fixed (He et al.)."""


class ResNet18(ModelFamily, nn.Sequential):
    """CIFAR ResNet-18; the keyword arguments are conf/model/resnet18.yaml's keys."""

    name = "resnet18"
    settings_class = ResNet18Settings
    roles = {"filters": ("*conv*.weight",), "norm_biases": ("*norm*.bias",), "norm_scales": ("*norm*.weight",),
             "whiten_bias": ("stem.whiten.bias",), "head": ("linear.weight", "linear.bias")}

    def __init__(self, settings: ResNet18Settings | None = None, **keys: Any) -> None:
        s: ResNet18Settings = self.read_settings(settings, keys)
        make_norm, make_act = s.norm.factory(), s.make_act()
        channels = [max(1, round(c * s.width)) for c in STAGE_CHANNELS]
        if s.whitening.enabled:
            white = s.whitening.layer()
            stem: nn.Module = nn.Sequential(OrderedDict(
                whiten=white, block=ConvBlock(white.out_channels, channels[0], False, make_norm, make_act, False, 1)))
        else:
            stem = ConvBlock(3, channels[0], False, make_norm, make_act, False)
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        previous = channels[0]
        for index, c in enumerate(channels, start=1):
            blocks = [BasicBlock(previous if b == 0 else c, c, 2 if (b == 0 and index > 1) else 1, make_norm, make_act)
                      for b in range(BLOCKS_PER_STAGE)]
            layers[f"stage{index}"] = nn.Sequential(*blocks)
            previous = c
        layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                      linear=nn.Linear(previous, s.num_classes), scale=Scale(s.logit_scale))
        super().__init__(layers)
        if s.dirac_init:
            dirac_init_(self)
