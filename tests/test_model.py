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


# ---------------------------------------------------------------- the family contract (models/base.py)
ROLE_CASES = [("davidnet", {}), ("davidnet", {"whitening": {"enabled": True, "bias": True}, "pool_before_norm": True}),
              ("davidnet", {"norm": {"kind": "ghost", "ghost_splits": 2}}), ("airbench94", {}),
              ("airbench94", {"whitening": {"enabled": False}}), ("resnet18", {}),
              ("resnet18", {"whitening": {"enabled": True, "bias": True}})]


@pytest.mark.parametrize("name,overrides", ROLE_CASES)
def test_every_parameter_has_the_role_its_family_declares(name: str, overrides: dict) -> None:
    """Roles come from the family's declaration by name, and they are what each layer is: every conv
    weight a filter, every BN bias a norm bias, the whitening bias (where it trains) its own role."""
    from cifar_speedrun.recipe.models.layers import PatchWhitening

    net = build(name, width=0.125, **overrides)
    roles = {id(p): role for role, params in net.parameter_roles().items() for p in params}
    assert set(roles) == {id(p) for p in net.parameters()}  # each parameter once
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    for module in net.modules():
        for attribute, param in module.named_parameters(recurse=False):
            expected = ("head" if any(param is p for p in head.parameters()) else
                        ("norm_biases" if attribute == "bias" else "norm_scales")
                        if isinstance(module, nn.modules.batchnorm._BatchNorm) else
                        "whiten_bias" if isinstance(module, PatchWhitening) else
                        "filters" if isinstance(module, nn.Conv2d) and attribute == "weight" else "other")
            assert roles[id(param)] == expected, (name, overrides, attribute, type(module).__name__)


def test_a_parameter_no_role_claims_stops_the_build_of_the_optimizer() -> None:
    """A layer added without a role (a GroupNorm here) would train with the wrong lr factor: refused."""
    from cifar_speedrun.recipe.optim import read_optimizer

    net = build("davidnet", width=0.125)
    net.extra = nn.GroupNorm(2, 8)
    with pytest.raises(ValueError, match="parameter 'extra.weight' no role"):
        net.parameter_roles()
    page = {"builder": "page_sgd", "lr": 0.4, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": True,
            "fused": True, "bias_lr_factor": 1.0, "bias_wd_factor": 1.0, "hold_invariant": False,
            "reference_batch_size": 512, "reference_momentum": 0.9, "schedule": {"epochs": [0, 1], "factors": [1, 0]}}
    with pytest.raises(ValueError, match="no role"):
        read_optimizer(page).build(net, 8, "cpu")


def test_a_family_refuses_the_shared_keys_it_does_not_declare(compose_cfg) -> None:
    """A family lists the shared key groups it honours (its Settings' bases); a key of another group,
    and a trick that sets one, is refused in one line naming it."""
    from cifar_speedrun.config.command_line import validate
    from cifar_speedrun.recipe.models.base import FAMILIES, ActivationKeys, ModelFamily, ModelSettings

    class PlainSettings(ModelSettings, ActivationKeys):
        pass

    class PlainNet(ModelFamily, nn.Sequential):
        name = "plain_test_net"
        settings_class = PlainSettings
        roles = {"head": ("1.*",)}

        def __init__(self, settings: PlainSettings | None = None, **keys) -> None:
            s = self.read_settings(settings, keys)
            super().__init__(nn.Flatten(), nn.Linear(3 * 32 * 32, s.num_classes))

    try:
        keys = {"width": 1.0, "num_classes": 10, "activation": "relu", "celu_alpha": 0.075}
        assert len(PlainNet(**keys).parameter_roles()["head"]) == 2  # the Linear's weight and bias
        with pytest.raises(UserError, match="unknown key model.whitening"):
            PlainNet(**keys, whitening={"enabled": True})
        target = "cifar_speedrun.recipe.models.plain.PlainNet"  # found by its class name (family_for)
        cfg = compose_cfg(f"model._target_={target}", "~model.norm", "~model.whitening", "~model.dirac_init",
                          "~model.logit_scale", "~model.pool_before_norm")
        run = validate(cfg)
        assert isinstance(run.model, PlainSettings) and not hasattr(run.model, "norm")
        with pytest.raises(UserError, match="^trick=whitening sets model.whitening.enabled, which this configuration "
                                            "does not have .*drop it$"):
            validate(compose_cfg(f"model._target_={target}", "~model.norm", "~model.dirac_init", "~model.logit_scale",
                                 "~model.pool_before_norm", "+trick=whitening"))
    finally:
        FAMILIES.pop("PlainNet", None)
