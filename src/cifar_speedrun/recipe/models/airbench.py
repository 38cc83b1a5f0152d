"""Keller Jordan's airbench94 network (cifar10-airbench, airbench94.py; arXiv 2404.00498).

    whiten  2x2 patch-whitening conv, 24 channels (both signs of the 12 filters), a bias, GELU
    block1  conv 24->64, max-pool 2, BN, GELU, conv 64->64, BN, GELU
    block2  conv 64->256, max-pool 2, BN, GELU, conv 256->256, BN, GELU
    block3  conv 256->256, max-pool 2, BN, GELU, conv 256->256, BN, GELU
    head    max-pool over the remaining 3x3, linear 256->10 without bias, logits x 1/9

No residual connections: the convs start as identities on their first input channels instead
(`dirac_init`). BN scales are frozen at 1 and its statistics use momentum 0.6 in airbench's
convention (PyTorch's 0.4), eps 1e-12: all in conf/model/airbench94.yaml. `width` scales the block
widths; `norm` and `activation` take the same settings as DavidNet's, so Page's tricks (ghost_bn,
celu, ...) apply to this net too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from cifar_speedrun.recipe.models import base
from cifar_speedrun.recipe.models.base import ModelFamily, ModelSettings
from cifar_speedrun.recipe.models.layers import Scale, dirac_init_


class AirbenchSettings(ModelSettings, base.ActivationKeys, base.HeadKeys, base.DiracInitKeys, base.NormKeys,
                       base.WhiteningKeys):
    widths: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, max_length=4, description="each block halves the image: 31 px allows 4 (airbench: 3)")
    # null: logits divided by the feature count (airbench94_muon's `head(x) / x.size(-1)`).
    logit_scale: Annotated[float, Field(gt=0)] | None  # type: ignore[assignment]
    unit_head_init: bool


class AirbenchNet(ModelFamily, nn.Sequential):
    """airbench94's net; the keyword arguments are conf/model/airbench94.yaml's keys."""

    name = "airbench94"
    settings_class = AirbenchSettings
    roles = {"filters": ("block*.conv*.weight",), "norm_biases": ("block*.norm*.bias",),
             "norm_scales": ("block*.norm*.weight",), "whiten_bias": ("whiten.bias",), "head": ("linear.weight",)}

    def __init__(self, settings: AirbenchSettings | None = None, **keys: Any) -> None:
        s: AirbenchSettings = self.read_settings(settings, keys)
        make_norm, make_act = s.norm.factory(), s.make_act()
        if s.whitening.enabled:
            stem: nn.Module = s.whitening.layer()
            stem_channels = stem.out_channels
        else:  # a learned conv of the same shape in its place: its weight a filter, its bias an ordinary one
            kernel = s.whitening.kernel_size
            stem_channels = (2 if s.whitening.both_signs else 1) * 3 * kernel * kernel
            stem = nn.Conv2d(3, stem_channels, kernel, padding=s.whitening.padding, bias=True)
            roles = {**self.roles, "filters": (*self.roles["filters"], "whiten.weight"), "whiten_bias": (),
                     "other": ("whiten.bias",)}
        channels = [max(1, round(c * s.width)) for c in s.widths]

        def group(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(OrderedDict(
                conv1=nn.Conv2d(c_in, c_out, 3, padding="same", bias=False), pool=nn.MaxPool2d(2),
                norm1=make_norm(c_out), act1=make_act(),
                conv2=nn.Conv2d(c_out, c_out, 3, padding="same", bias=False), norm2=make_norm(c_out),
                act2=make_act(),
            ))

        blocks: OrderedDict[str, nn.Module] = OrderedDict(whiten=stem, whiten_act=make_act())
        previous = stem_channels
        for index, c in enumerate(channels, start=1):
            blocks[f"block{index}"] = group(previous, c)
            previous = c
        head = nn.Linear(previous, s.num_classes, bias=False)
        if s.unit_head_init:  # airbench94_muon: unit-std head weights, logits divided by the feature count
            with torch.no_grad():
                head.weight.mul_(1 / head.weight.std())
        scale = 1.0 / previous if s.logit_scale is None else float(s.logit_scale)
        blocks.update(pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(), linear=head, scale=Scale(scale))
        super().__init__(blocks)
        if not s.whitening.enabled:
            self.roles = roles
        if s.dirac_init:
            dirac_init_(self)
