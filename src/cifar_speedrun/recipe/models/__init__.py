"""The model families: one file each, one interface (base.py), found by name in one table.

`FAMILIES` holds the classes by class name, and `family_for` finds the one a config's or a model file's
`_target_` names. It is filled by defining the classes, and every module of this package is imported
here, so a new family is a new file in this folder plus its conf/model/<name>.yaml: nothing else lists
the families.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from cifar_speedrun.conf_files import CONF_DIR
from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.models.base import FAMILIES, ModelFamily, ModelSettings, family_for, target_of
from cifar_speedrun.recipe.models.layers import count_parameters
from cifar_speedrun.typed_sections import check

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

CONF_MODEL_DIR = CONF_DIR / "model"


def by_name(name: str) -> type[ModelFamily]:
    """The family `model=<name>` chooses."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    known = sorted({family.name for family in FAMILIES.values()})
    raise UserError(f"model={name!r} is not a model family; use {', '.join(known)}")


def build_from_settings(settings: ModelSettings) -> ModelFamily:
    """The net of a family's typed settings (as check_train made them): each family has its own class."""
    for family in FAMILIES.values():
        if type(settings) is family.settings_class:
            return family(settings)
    raise TypeError(f"{type(settings).__name__} is no family's settings class")


def default_settings(name: str, seed: int = 0) -> dict[str, Any]:
    """conf/model/<name>.yaml's settings (its `${seed}` as `seed`): the one place a family's defaults live."""
    from omegaconf import OmegaConf

    by_name(name)  # one line for an unknown family, before looking for its yaml
    node = OmegaConf.load(CONF_MODEL_DIR / f"{name}.yaml")
    resolved = OmegaConf.to_container(OmegaConf.merge({"seed": seed, "model": node}), resolve=True)
    settings = dict(resolved["model"])  # type: ignore[index]
    settings.pop("_target_", None)
    return settings


def build(name: str, **overrides: Any) -> nn.Module:
    """A family's net with its yaml defaults and `overrides` (nested sections merge): for tests and scripts."""
    settings = default_settings(name)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return by_name(name)(**settings)


def build_norm(channels: int, family: str = "davidnet", **overrides: Any) -> nn.Module:
    """One norm layer with `family`'s yaml norm settings and `overrides` (e.g. kind="ghost", ghost_splits=4)."""
    from cifar_speedrun.recipe.models.base import NormSettings

    return check(NormSettings, {**default_settings(family)["norm"], **overrides}, "model.norm").factory()(channels)


def build_whitening(family: str = "davidnet", **overrides: Any) -> nn.Module:
    """A PatchWhitening layer with `family`'s yaml whitening settings and `overrides`."""
    from cifar_speedrun.recipe.models.base import WhiteningSettings

    return check(WhiteningSettings, {**default_settings(family)["whitening"], **overrides}, "model.whitening").layer()


__all__ = ["FAMILIES", "ModelFamily", "ModelSettings", "build", "build_from_settings", "build_norm", "build_whitening",
           "by_name",
           "count_parameters", "default_settings", "family_for", "target_of"]
