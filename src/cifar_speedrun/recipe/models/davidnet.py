"""DavidNet (Page's ResNet-9, "How to train your ResNet" part 4).

    prep    conv 3->64
    layer1  conv 64->128, max-pool 2, residual(conv 128->128, conv 128->128)
    layer2  conv 128->256, max-pool 2
    layer3  conv 256->512, max-pool 2, residual(conv 512->512, conv 512->512)
    head    global max-pool, linear 512->10 (no bias), logits * 0.125

Every conv is 3x3, stride 1, pad 1, no bias, followed by a norm and an activation. The knobs that
Page's tricks turn are settings (conf/model/davidnet.yaml): `activation` (relu / celu), `norm` (batch /
ghost, scale frozen or learned, computed in fp32), `pool_before_norm` (part 8: conv -> pool -> norm ->
act, so the norm and activation run on a quarter of the pixels), and `whitening` (a frozen
PCA-whitening conv on 3x3 patches in front of the prep layer).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from cifar_speedrun.recipe.models import base
from cifar_speedrun.recipe.models.base import ModelFamily, ModelSettings
from cifar_speedrun.recipe.models.layers import ConvBlock, Residual, Scale, dirac_init_

# Page part 4, final DavidNet: channel widths of prep, layer1, layer2, layer3.
BASE_CHANNELS = (64, 128, 256, 512)


class DavidNetSettings(ModelSettings, base.ActivationKeys, base.HeadKeys, base.DiracInitKeys, base.NormKeys,
                       base.WhiteningKeys):
    pool_before_norm: bool


class DavidNet(ModelFamily, nn.Sequential):
    """Page's ResNet-9; the keyword arguments are conf/model/davidnet.yaml's keys."""

    name = "davidnet"
    settings_class = DavidNetSettings
    roles = {"filters": ("*conv.weight",), "norm_biases": ("*norm.bias",), "norm_scales": ("*norm.weight",),
             "whiten_bias": ("prep.whiten.bias",), "head": ("linear.weight",)}

    def __init__(self, settings: DavidNetSettings | None = None, **keys: Any) -> None:
        s: DavidNetSettings = self.read_settings(settings, keys)
        make_norm, make_act = s.norm.factory(), s.make_act()
        c_prep, c1, c2, c3 = (max(1, round(c * s.width)) for c in BASE_CHANNELS)

        def block(c_in: int, c_out: int, pool: bool = False, kernel_size: int = 3) -> ConvBlock:
            return ConvBlock(c_in, c_out, pool, make_norm, make_act, s.pool_before_norm, kernel_size)

        if s.whitening.enabled:
            white = s.whitening.layer()
            # Page part 8: the whitened 27 channels feed a learned 1x1 conv to the prep width.
            prep: nn.Module = nn.Sequential(OrderedDict(whiten=white, block=block(white.out_channels, c_prep,
                                                                                  kernel_size=1)))
        else:
            prep = block(3, c_prep)
        super().__init__(OrderedDict(
            prep=prep,
            layer1=nn.Sequential(OrderedDict(block=block(c_prep, c1, pool=True),
                                             residual=Residual(nn.Sequential(block(c1, c1), block(c1, c1))))),
            layer2=block(c1, c2, pool=True),
            layer3=nn.Sequential(OrderedDict(block=block(c2, c3, pool=True),
                                             residual=Residual(nn.Sequential(block(c3, c3), block(c3, c3))))),
            pool=nn.AdaptiveMaxPool2d(1),
            flatten=nn.Flatten(),
            linear=nn.Linear(c3, s.num_classes, bias=False),
            scale=Scale(s.logit_scale),
        ))
        if s.dirac_init:
            dirac_init_(self)
