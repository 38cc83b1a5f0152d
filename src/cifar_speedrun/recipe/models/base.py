"""What every model family offers the rest of the code, and the settings every family reads alike.

A model family is one file in this package (davidnet.py, airbench.py, resnet18.py) holding

- a `Settings` class (a typed section, `ModelSettings` plus the family's own keys), and
- an `nn.Module` subclass of `ModelFamily` with `name` (the `model=<name>` choice, conf/model/<name>.yaml)
  and `settings_class`; its `__init__(**settings)` takes the yaml's keys.

Defining the class registers it (`FAMILIES`): the trainer, the model-file loader and the config check
find it there, by its `_target_`, and nowhere else. A file someone hands over is built only through
that table (model_file.build_model), never through an import path it names.

The hooks the training loop calls, the same for every family:

- `fit_to_data(images)`: once before training, with the standardized training images (patch whitening);
- `set_epoch(epoch)`: at the start of every training epoch (airbench's whitening bias trains 3 epochs);
- `parameter_roles()`: the parameters by role (filters, norm biases, whitening bias, head, other),
  which the optimizers (optim.py) give their learning rates.

Shared keys mean the same in every family (`width`, `activation`, `celu_alpha`, `logit_scale`,
`dirac_init`, `norm.*`, `whitening.*`); a key a family cannot honour is not in its Settings, so a trick
that sets it (trick=pool_before_norm on airbench94) is refused by name.
"""

from __future__ import annotations

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
    activation: Literal["relu", "celu", "gelu"]
    celu_alpha: float = Field(gt=0)
    logit_scale: float = Field(gt=0)
    dirac_init: bool
    norm: NormSettings
    whitening: WhiteningSettings

    def make_act(self) -> Callable[[], nn.Module]:
        return lambda: activation(self.activation, self.celu_alpha)


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


class ModelFamily(nn.Module):
    """The interface of a model family (see the module docstring). Subclasses set `name` and `settings_class`."""

    name: ClassVar[str]
    settings_class: ClassVar[type[ModelSettings]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            FAMILIES[cls.__name__] = cls

    @classmethod
    def read_settings(cls, settings: dict[str, Any]) -> Any:
        """The keyword arguments as this family's typed settings, or one UserError naming the key."""
        return check(cls.settings_class, plain(settings), "model")

    def fit_to_data(self, images: torch.Tensor) -> None:
        for layer in self.modules():
            if isinstance(layer, PatchWhitening):
                layer.fit_to_data(images)

    def set_epoch(self, epoch: int) -> None:
        for layer in self.modules():
            if isinstance(layer, PatchWhitening):
                layer.set_epoch(epoch)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter, by role: `filters` (conv weights), `norm_biases`, `norm_scales`, `whiten_bias`,
        `head` (the last linear layer), `other`. Frozen parameters are included: one may start training later."""
        groups: dict[str, list[nn.Parameter]] = {role: [] for role in
                                                 ("filters", "norm_biases", "norm_scales", "whiten_bias", "head",
                                                  "other")}
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        head_ids = {id(p) for p in linears[-1].parameters()} if linears else set()
        seen: set[int] = set()
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if id(param) in head_ids:
                    role = "head"
                elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                    role = "norm_biases" if name == "bias" else "norm_scales"
                elif isinstance(module, PatchWhitening):
                    role = "whiten_bias"
                elif isinstance(module, nn.Conv2d) and name == "weight":
                    role = "filters"
                else:
                    role = "other"
                groups[role].append(param)
        return groups


def target_of(cls: type) -> str:
    """The `_target_` a config names this class by: its import path."""
    return f"{cls.__module__}.{cls.__qualname__}"
