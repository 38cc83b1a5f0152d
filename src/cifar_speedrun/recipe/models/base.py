"""What every model family offers the rest of the code, and the settings every family reads alike.

A model family is one file in this package (davidnet.py, airbench.py, resnet18.py) holding

- a `Settings` class: `ModelSettings` (width, num_classes), the shared key groups below it uses, and its
  own keys; and
- an `nn.Module` subclass of `ModelFamily` with `name` (the `model=<name>` choice, conf/model/<name>.yaml),
  `settings_class` and `roles`; its `__init__` takes that settings object (as the config check typed it)
  or the yaml's keys (checked there, once).

Defining the class registers it (`FAMILIES`): the trainer, the model-file loader and the config check
find it there, by its `_target_`, and nowhere else. A file someone hands over is built only through
that table (model_file.build_model), never through an import path it names.

The hooks the training loop calls, the same for every family:

- `fit_to_data(images)`: once before training, with the standardized training images (patch whitening);
- `set_epoch(epoch)`: at the start of every training epoch (airbench's whitening bias trains 3 epochs);
- `parameter_roles()`: the parameters by role (filters, norm biases, norm scales, whitening bias, head,
  other), which the optimizers (optim.py) give their learning rates. The family declares them in `roles`,
  by parameter name; a parameter no pattern (or two) claims stops the build, so a new layer cannot
  silently miss its learning-rate factor.

Shared keys mean the same in every family, and a family declares the groups it honours by listing
their sections among its Settings' bases: `ActivationKeys` (activation, celu_alpha), `HeadKeys`
(logit_scale), `DiracInitKeys` (dirac_init), `NormKeys` (norm.*), `WhiteningKeys` (whitening.*). A key
a family does not declare is an unknown key for it, so a trick that sets one (trick=pool_before_norm
on airbench94, trick=whitening on a family without whitening) is refused by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from cifar_speedrun.recipe.models.layers import BatchNorm, GhostBatchNorm, PatchWhitening, activation
from cifar_speedrun.typed_sections import MAX_SEED, Section, check, plain


class NormSettings(Section):
    kind: Literal["batch", "ghost"] = Field(description="ghost: trick=ghost_bn")
    ghost_splits: int = Field(ge=1, description="Page: 16 splits of 512")
    eps: float = Field(gt=0)
    momentum: float = Field(ge=0, le=1)
    scale_init: float
    freeze_scale: bool
    float32: bool

    def factory(self) -> Callable[[int], nn.Module]:
        """`make_norm(channels)`: batch norm or ghost batch norm with these settings."""
        common = {"eps": self.eps, "momentum": self.momentum, "scale_init": self.scale_init,
                  "freeze_scale": self.freeze_scale, "float32": self.float32}
        if self.kind == "ghost":
            return lambda c: GhostBatchNorm(c, splits=self.ghost_splits, **common)
        return lambda c: BatchNorm(c, **common)


class WhiteningSettings(Section):
    enabled: bool
    kernel_size: int = Field(ge=1, le=7)
    eps: float = Field(gt=0)
    padding: int = Field(ge=0, le=3)
    max_images: int = Field(ge=1)
    seed: int = Field(ge=0, le=MAX_SEED)
    centered: bool
    both_signs: bool
    bias: bool
    bias_epochs: Annotated[int, Field(ge=0)] | None

    def layer(self) -> PatchWhitening:
        return PatchWhitening(**self.model_dump(exclude={"enabled"}))


class ModelSettings(Section):
    """The keys every family reads, with one meaning each."""

    width: float = Field(gt=0, description="1.0 is the published net; 0.125 for CPU runs")
    num_classes: Literal[10] = Field(description="CIFAR-10 has 10 classes")


# The shared key groups: a family's Settings lists those it honours among its bases.
class ActivationKeys(Section):
    activation: Literal["relu", "celu", "gelu"]
    celu_alpha: float = Field(gt=0)

    def make_act(self) -> Callable[[], nn.Module]:
        return lambda: activation(self.activation, self.celu_alpha)


class HeadKeys(Section):
    logit_scale: float = Field(gt=0)


class DiracInitKeys(Section):
    dirac_init: bool


class NormKeys(Section):
    norm: NormSettings


class WhiteningKeys(Section):
    whitening: WhiteningSettings


# Class name -> family: filled by defining the classes (ModelFamily.__init_subclass__).
FAMILIES: dict[str, type[ModelFamily]] = {}


def family_for(target: Any) -> type[ModelFamily] | None:
    """The family a config or a model file names by its `_target_`, or None.

    A target names one of this package's families by its class (`...DavidNet`), wherever in this
    package the file's layout put it (model files written before the recipe/ subpackage say
    `cifar_speedrun.models.davidnet.DavidNet`, earlier ones `cifar_speedrun.model.DavidNet`): the
    allow-list is the families' class names, and nothing the target names is ever imported.
    """
    if not isinstance(target, str) or not target.startswith("cifar_speedrun."):
        return None
    return FAMILIES.get(target.rsplit(".", 1)[-1])


# The roles the optimizers know (optim.py), in the order parameter_roles() lists them.
ROLES = ("filters", "norm_biases", "norm_scales", "whiten_bias", "head", "other")


class ModelFamily(nn.Module):
    """The interface of a model family (see the module docstring).

    Subclasses set `name`, `settings_class` (their own class: one settings class, one family) and
    `roles`: role -> fnmatch patterns over `named_parameters()` names, each parameter claimed by exactly
    one role (an instance may narrow them in `__init__`, e.g. for a layer a setting swaps)."""

    name: ClassVar[str]
    settings_class: ClassVar[type[ModelSettings]]
    roles: ClassVar[dict[str, tuple[str, ...]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            unknown = set(cls.roles) - set(ROLES)
            if unknown:
                raise TypeError(f"{cls.__name__}.roles names {sorted(unknown)}: the roles are {ROLES}")
            FAMILIES[cls.__name__] = cls

    @classmethod
    def read_settings(cls, settings: ModelSettings | None, keys: dict[str, Any]) -> Any:
        """This family's typed settings: the object the config check made, as it is, or the keyword
        arguments (a test's, a model file's) checked once, with one UserError naming the key."""
        if settings is not None:
            if keys or not isinstance(settings, cls.settings_class):
                raise TypeError(f"{cls.__name__} takes a {cls.settings_class.__name__} or the yaml's keys, not both")
            return settings
        return check(cls.settings_class, plain(keys), "model")

    def fit_to_data(self, images: torch.Tensor) -> None:
        for layer in self.modules():
            if isinstance(layer, PatchWhitening):
                layer.fit_to_data(images)

    def set_epoch(self, epoch: int) -> None:
        for layer in self.modules():
            if isinstance(layer, PatchWhitening):
                layer.set_epoch(epoch)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter, by the role `roles` declares for its name (ROLES lists them). Frozen parameters
        are included: one may start training later. A parameter no role claims, or two claim, is a
        family's mistake and stops here (ValueError) rather than train with the wrong learning rate."""
        groups: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
        for name, param in self.named_parameters():
            claimed = [role for role, patterns in self.roles.items()
                       if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
            if len(claimed) != 1:
                raise ValueError(f"{type(self).__name__}.roles gives its parameter {name!r} "
                                 f"{'no role' if not claimed else f'{len(claimed)} roles {claimed}'}: "
                                 "declare exactly one for it")
            groups[claimed[0]].append(param)
        return groups


def target_of(cls: type) -> str:
    """The `_target_` a config names this class by: its import path."""
    return f"{cls.__module__}.{cls.__qualname__}"
