"""DavidNet's shape and size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.models import build
from cifar_speedrun.recipe.models.layers import count_parameters

# By hand, width 1.0 (3x3 convs without bias, BN has a scale and a bias per channel):
#   convs: 3*64*9 + 64*128*9 + 2*128*128*9 + 128*256*9 + 256*512*9 + 2*512*512*9 = 6,563,520
#   BN:    2 * (64 + 128 + 128 + 128 + 256 + 512 + 512 + 512)                    =     4,480
#   linear 512 -> 10 without bias                                                   =     5,120
#   total                                                                           = 6,573,120
DAVIDNET_PARAMETERS = 6_573_120


def test_parameter_count_matches_hand_count() -> None:
    assert count_parameters(build("davidnet")) == DAVIDNET_PARAMETERS


def test_output_shape_and_logit_scale() -> None:
    net = build("davidnet", width=0.25).eval()
    x = torch.randn(5, 3, 32, 32)
    logits = net(x)
    assert logits.shape == (5, 10)
    features = nn.Sequential(*list(net.children())[:-1])(x)  # everything but the final x0.125
    assert torch.allclose(logits, features * 0.125)


def test_architecture_layout() -> None:
    net = build("davidnet")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 64), (64, 128), (128, 128), (128, 128), (128, 256), (256, 512), (512, 512), (512, 512)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert net.linear.bias is None and net.linear.in_features == 512
    # default order: conv -> norm -> act -> pool
    assert list(dict(net.layer2.named_children())) == ["conv", "norm", "act", "pool"]
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 8


@pytest.mark.parametrize("width,channels", [(0.25, (16, 32, 64, 128)), (0.125, (8, 16, 32, 64))])
def test_width_multiplier(width: float, channels: tuple[int, ...]) -> None:
    net = build("davidnet", width=width)
    assert net.prep.conv.out_channels == channels[0] and net.linear.in_features == channels[3]


def test_bad_width_is_refused() -> None:
    with pytest.raises(UserError, match="model.width"):
        build("davidnet", width=0)


def test_a_family_is_found_by_its_class_within_this_package_and_nothing_named_is_imported() -> None:
    """Model files written before the recipe/ subpackage (and before models/) still name their family."""
    from cifar_speedrun.recipe.models import family_for
    from cifar_speedrun.recipe.models.davidnet import DavidNet

    for target in ("cifar_speedrun.recipe.models.davidnet.DavidNet", "cifar_speedrun.models.davidnet.DavidNet",
                   "cifar_speedrun.model.DavidNet"):
        assert family_for(target) is DavidNet
    for target in ("evil.DavidNet", "DavidNet", "cifar_speedrun.models.base.torch.save", "os.system", None, 3):
        assert family_for(target) is None
