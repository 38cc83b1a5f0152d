"""The config's schema: every key a run reads, its type and range. Unknown keys and bad values are refused.

Hydra composes whatever it is given: `+optim.lrr=0.1` (the typo Hydra's own hint suggests) adds a key
nothing reads, `data.cutout_size=64` blanks every pixel, `optim.lr=nan` fails only at step 1. A run
that trains something other than what was asked, silently, is the worst outcome, so before any data is
loaded `check(cfg)` walks the composed config against this schema and refuses, in one line naming the
key and the fix: a key the schema does not know (with the nearest known key), a value of the wrong
type, a number out of range or not finite, a choice that does not exist. Nodes built with `_target_`
(the model, the trainer, callbacks, loggers) are checked against the target's own signature, so a
Lightning or model argument that does not exist is caught too. Cross-key rules (batch divisible by
devices, knots in order, ...) live in config.validate, which calls this first.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from cifar_speedrun.errors import UserError

# Seeds go to torch.manual_seed and numpy: both take unsigned 32-bit (numpy) / 64-bit values.
MAX_SEED = 2**32 - 1


class Spec:
    def check(self, key: str, value: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _fail(key: str, value: Any, what: str, hint: str = "") -> UserError:
    return UserError(f"{key}={value!r} must be {what}" + (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class Anything(Spec):
    def check(self, key: str, value: Any) -> None:
        return


@dataclass(frozen=True)
class Number(Spec):
    """An int (`integer=True`) or a real number, finite, within [low, high] (open ends as asked)."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""
    nullable: bool = False

    def describe(self) -> str:
        if self.integer and self.low == 1 and self.high is None:
            return "a positive integer"
        noun = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        return noun

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        what = self.describe() + (" (or null)" if self.nullable else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, value, what, self.hint)
        if self.integer and not isinstance(value, int):
            raise _fail(key, value, what, self.hint)
        if not math.isfinite(value):
            raise _fail(key, value, "a finite " + what.split(" ", 1)[1] if what.startswith("a ") else what, self.hint)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise _fail(key, value, what, self.hint)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise _fail(key, value, what, self.hint)


@dataclass(frozen=True)
class Boolean(Spec):
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, bool):
            raise _fail(key, value, "true or false" + (" (or null)" if self.nullable else ""))


@dataclass(frozen=True)
class Text(Spec):
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, str):
            raise _fail(key, value, "a string" + (" (or null)" if self.nullable else ""))


@dataclass(frozen=True)
class Choice(Spec):
    options: tuple[Any, ...]
    hint: str = ""

    def check(self, key: str, value: Any) -> None:
        if value not in self.options:
            shown = ", ".join(str(o) for o in self.options)
            raise UserError(f"{key}={value!r} is not known; use {shown}" + (f" ({self.hint})" if self.hint else ""))


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    min_length: int = 0

    def check(self, key: str, value: Any) -> None:
        if not isinstance(value, (list, tuple, ListConfig)):
            raise _fail(key, value, "a list, e.g. '[a,b]' (quoted on the command line)")
        if len(value) < self.min_length:
            raise _fail(key, list(value), f"a list of at least {self.min_length} items")
        for index, item in enumerate(value):
            self.item.check(f"{key}[{index}]", item)


@dataclass(frozen=True)
class OneOf(Spec):
    """The value satisfies one of the specs (e.g. trainer.devices: a count, 'auto' or a list of ids)."""

    specs: tuple[Spec, ...]
    what: str

    def check(self, key: str, value: Any) -> None:
        for spec in self.specs:
            try:
                spec.check(key, value)
                return
            except UserError:
                continue
        raise _fail(key, value, self.what)


@dataclass(frozen=True)
class Section(Spec):
    """A mapping with known keys. `open` accepts any further key (e.g. applied_tricks' names)."""

    fields: Mapping[str, Spec] = field(default_factory=dict)
    open: bool = False
    values: Spec | None = None  # for open sections: the spec of every value
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, (dict, DictConfig)):
            raise _fail(key, value, "a group of settings (key: value)")
        for name in _keys(value):
            child = f"{key}.{name}" if key else str(name)
            spec = self.fields.get(name)
            if spec is None:
                if self.open:
                    spec = self.values or Anything()
                else:
                    raise _unknown(child, name, self.fields)
            spec.check(child, _value(value, name))


@dataclass(frozen=True)
class Built(Spec):
    """A node instantiated from `_target_`: its keys must be the target's parameters.

    `fields` types some of them; `by_target` gives a fuller Section for known targets (our own
    classes), so their nested settings are checked as well.
    """

    fields: Mapping[str, Spec] = field(default_factory=dict)
    by_target: Mapping[str, Section] = field(default_factory=dict)
    nullable: bool = True

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not isinstance(value, (dict, DictConfig)):
            raise _fail(key, value, "a group of settings with a _target_")
        target = _value(value, "_target_")
        if not isinstance(target, str):
            raise UserError(f"{key} has no _target_: it must name the class to build")
        known = self.by_target.get(target)
        if known is not None:
            Section({"_target_": Text(), **known.fields}).check(key, value)
            return
        parameters = _parameters(target, key)
        for name in _keys(value):
            if name.startswith("_") and name.endswith("_"):
                continue
            if parameters is not None and name not in parameters:
                raise _unknown(f"{key}.{name}", name, {p: Anything() for p in parameters},
                               f"{target.rsplit('.', 1)[-1]} has no argument {name!r}")
            spec = self.fields.get(name)
            if spec is not None:
                spec.check(f"{key}.{name}", _value(value, name))


@dataclass(frozen=True)
class BuiltGroup(Spec):
    """A mapping of name -> built node or null (callbacks, loggers)."""

    item: Built

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, (dict, DictConfig)):
            raise _fail(key, value, "a group of named settings")
        for name in _keys(value):
            self.item.check(f"{key}.{name}", _value(value, name))


def _keys(node: Any) -> list[str]:
    return [str(k) for k in (node.keys() if isinstance(node, (dict, DictConfig)) else [])]


class _Unresolved:
    """A value that cannot be resolved yet (e.g. ${hydra:runtime.output_dir} before the job starts)."""


def _value(node: Any, name: str) -> Any:
    if isinstance(node, DictConfig):
        try:
            value = node[name]
        except (InterpolationResolutionError, MissingMandatoryValue, ValueError):
            return _Unresolved()
        if isinstance(value, (DictConfig, ListConfig)):
            return value
        return value
    return node[name]


def _unknown(key: str, name: str, known: Mapping[str, Any], reason: str = "") -> UserError:
    section = key.rsplit(".", 1)[0] if "." in key else "the config"
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    guess = f"did you mean {section}.{close[0]}? " if close and section != "the config" else (
        f"did you mean {close[0]}? " if close else "")
    listed = ", ".join(sorted(k for k in known if not (k.startswith("_") and k.endswith("_"))))
    return UserError(f"unknown key {key}{f' ({reason})' if reason else ''}: {guess}nothing reads it ({section} has: "
                     f"{listed}). It came from a `+key=value` override (Hydra adds keys without checking them: "
                     "drop the `+` to override an existing key) or from a trick meant for another model")


_SIGNATURES: dict[str, set[str] | None] = {}


def _parameters(target: str, key: str) -> set[str] | None:
    """The keyword parameters of the class or function `target` names (None: it takes **kwargs)."""
    if target not in _SIGNATURES:
        module_name, _, attribute = target.rpartition(".")
        try:
            built: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError):
            raise UserError(f"{key}._target_={target!r} cannot be imported: check the class path") from None
        signature = inspect.signature(built)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            _SIGNATURES[target] = None
        else:
            _SIGNATURES[target] = {name for name in signature.parameters if name != "self"}
    return _SIGNATURES[target]


def _checked(spec: Spec) -> Spec:
    """Skip values that cannot be resolved before the job starts (paths under ${hydra:...})."""

    class Skipping(Spec):
        def check(self, key: str, value: Any) -> None:
            if not isinstance(value, _Unresolved):
                spec.check(key, value)

    return Skipping()


# ------------------------------------------------------------------------------------------------
# The schema of conf/train.yaml and its groups
# ------------------------------------------------------------------------------------------------

POSITIVE = Number(integer=True, low=1)
PATH = _checked(Text(nullable=True))

DATA = Section({
    "_target_": Text(),
    "source": Choice(("torchvision", "image_folder"), "torchvision downloads the official release; image_folder "
                     "reads data.path"),
    "root": PATH,
    "path": PATH,
    "cache_dir": PATH,
    "batch_size": Number(integer=True, low=1, hint="Page uses data.batch_size=512"),
    "eval_batch_size": Number(integer=True, low=1, hint="e.g. data.eval_batch_size=1000"),
    "subset": Number(integer=True, low=1, nullable=True, hint="a number of training images, or null for all"),
    "subset_mode": Choice(("per_class", "random")),
    "test_subset": Number(integer=True, low=1, nullable=True),
    "normalize": Choice(("page", "computed")),
    "translate": Number(integer=True, low=0, high=16, hint="Page: 4, airbench: 2"),
    "flip_mode": Choice(("random", "alternating"), "alternating: trick=alternating_flip (airbench)"),
    "crop_size": Number(integer=True, low=1, high=32, hint="CIFAR-10 images are 32x32"),
    "flip": Boolean(),
    "cutout": Boolean(),
    "cutout_size": Number(integer=True, low=1, high=32, hint="Page: 8 (5 from the whitening row on)"),
    "cutout_inside": Boolean(),
    "half_precision": Boolean(),
    "channels_last": Boolean(),
    "seed": Number(integer=True, low=0, high=MAX_SEED),
})

NORM = Section({
    "kind": Choice(("batch", "ghost")),
    "ghost_splits": Number(integer=True, low=1, hint="Page: 16 splits of 512"),
    "eps": Number(low=0, low_open=True),
    "momentum": Number(low=0, high=1),
    "scale_init": Number(),
    "freeze_scale": Boolean(),
    "float32": Boolean(),
})

WHITENING = Section({
    "enabled": Boolean(),
    "kernel_size": Number(integer=True, low=1, high=7),
    "eps": Number(low=0, low_open=True),
    "padding": Number(integer=True, low=0, high=3),
    "max_images": Number(integer=True, low=1),
    "seed": Number(integer=True, low=0, high=MAX_SEED),
    "centered": Boolean(),
    "both_signs": Boolean(),
    "bias": Boolean(),
    "bias_epochs": Number(integer=True, low=0, nullable=True),
})

DAVIDNET = Section({
    "width": Number(low=0, low_open=True, hint="1.0 is DavidNet; 0.125 for CPU runs"),
    "num_classes": Choice((10,), "CIFAR-10 has 10 classes"),
    "activation": Choice(("relu", "celu")),
    "celu_alpha": Number(low=0, low_open=True),
    "pool_before_norm": Boolean(),
    "logit_scale": Number(low=0, low_open=True),
    "dirac_init": Boolean(),
    "norm": NORM,
    "whitening": WHITENING,
})

AIRBENCH = Section({
    "width": Number(low=0, low_open=True, hint="1.0 is airbench94; 0.125 for CPU runs"),
    "widths": ListOf(Number(integer=True, low=1), min_length=1),
    "num_classes": Choice((10,), "CIFAR-10 has 10 classes"),
    "activation": Choice(("gelu", "relu", "celu")),
    "celu_alpha": Number(low=0, low_open=True),
    "logit_scale": Number(low=0, low_open=True, nullable=True),
    "dirac_init": Boolean(),
    "unit_head_init": Boolean(),
    "norm": NORM,
    "whitening": WHITENING,
})


@dataclass(frozen=True)
class Keyed(Spec):
    """A section whose keys depend on one of its values (the optimizer's `builder`)."""

    key: str
    sections: Mapping[str, Section]

    def check(self, key: str, value: Any) -> None:
        if not isinstance(value, (dict, DictConfig)):
            raise _fail(key, value, "a group of settings")
        choice = _value(value, self.key)
        section = self.sections.get(choice)
        if section is None:
            known = ", ".join(self.sections)
            raise UserError(f"{key}.{self.key}={choice!r} is not known; use {known}")
        section.check(key, value)

SCHEDULE = Section({
    "epochs": ListOf(OneOf((Number(), Text()), "a number or an expression in epochs"), min_length=2),
    "factors": ListOf(Number(low=0), min_length=2),
})

OPTIM = Section({
    "builder": Text(),
    "lr": Number(low=0, hint="Page's peak: 0.4 (baseline), 1.0 (final)"),
    "weight_decay": Number(low=0, hint="Page: 5e-4"),
    "momentum": Number(low=0, high=1, high_open=True, hint="Page uses 0.9"),
    "nesterov": Boolean(),
    "fused": Boolean(),
    "schedule": SCHEDULE,
    "bias_lr_factor": Number(low=0),
    "bias_wd_factor": Number(low=0),
    "hold_invariant": Boolean(),
    "reference_batch_size": POSITIVE,
    "reference_momentum": Number(low=0, high=1, high_open=True),
})

AIRBENCH_SGD = Section({
    "builder": Text(),
    "lr_per_1024": Number(low=0, hint="airbench94: 11.5"),
    "weight_decay_per_1024": Number(low=0, hint="airbench94: 0.0153"),
    "bias_scaler": Number(low=0, hint="airbench94: 64"),
    "momentum": Number(low=0, high=1, high_open=True, hint="airbench94: 0.85"),
    "nesterov": Boolean(),
    "fused": Boolean(),
    "schedule": SCHEDULE,
})

MUON = Section({
    "builder": Text(),
    "lr": Number(low=0, hint="airbench94_muon: 0.24"),
    "muon_momentum": Number(low=0, high=1, high_open=True),
    "ns_steps": Number(integer=True, low=1, high=20),
    "renormalize": Boolean(),
    "momentum": Number(low=0, high=1, high_open=True),
    "nesterov": Boolean(),
    "bias_lr": Number(low=0),
    "head_lr": Number(low=0),
    "width_reference_features": Number(low=1, nullable=True),
    "weight_decay_per_example": Number(low=0),
    "whiten_bias_schedule": Section({"epochs": SCHEDULE.fields["epochs"], "factors": SCHEDULE.fields["factors"]},
                                    nullable=True),
    "schedule": SCHEDULE,
})

OPTIMIZERS = Keyed("builder", {
    "cifar_speedrun.optim.page_sgd": OPTIM,
    "cifar_speedrun.optim.airbench_sgd": AIRBENCH_SGD,
    "cifar_speedrun.optim.muon_sgd": MUON,
})

TRAINER = Built(fields={
    "max_epochs": POSITIVE,
    "precision": Choice(("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 32, 16, 64),
                        "trick=mixed_precision picks 16-mixed on CUDA"),
    "devices": OneOf((POSITIVE, Choice(("auto", -1)), ListOf(Number(integer=True, low=0))),
                     "a number of devices, 'auto' or a list of device ids"),
    "num_nodes": POSITIVE,
    "check_val_every_n_epoch": POSITIVE,
    "log_every_n_steps": POSITIVE,
}, nullable=False)

TOP_LEVEL = Section({
    "data": DATA,
    "model": Built(by_target={"cifar_speedrun.model.DavidNet": DAVIDNET,
                              "cifar_speedrun.model.AirbenchNet": AIRBENCH}, nullable=False),
    "optim": OPTIMIZERS,
    "trainer": TRAINER,
    "logger": BuiltGroup(Built()),
    "callbacks": BuiltGroup(Built()),
    "paths": Section({name: PATH for name in ("root_dir", "data_dir", "log_dir", "cache_dir", "output_dir",
                                              "checkpoint_dir")}),
    "hydra": Anything(),
    "task_name": Text(),
    "applied_tricks": Section(open=True, values=Text()),
    "seed": Number(integer=True, low=0, high=MAX_SEED, hint="any integer in [0, 2^32 - 1]"),
    "tags": ListOf(Text()),
    "cpu_mixed_precision": Choice(("bf16-mixed", "32-true", "16-mixed")),
    "epochs": Number(low=0, low_open=True, hint="e.g. epochs=24 (Page's baseline), 10 (his final), 9.9 (airbench)"),
    "target_acc": Number(low=0, high=1),
    "loss": Section({"label_smoothing": Number(low=0, high=1, high_open=True, hint="Page uses 0.2")}),
    "tta": Section({"flip": Boolean(), "translate": Boolean(), "reduce": Choice(("logits", "log_softmax"))}),
    "compile": Section({"enabled": Boolean(),
                        "mode": Choice(("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                                       "torch.compile's modes")}),
    "channels_last": Boolean(),
    "nan_check_every": POSITIVE,
    "ckpt_path": PATH,
    "resume": Boolean(),
})


# conf/eval.yaml: evaluate a trained model (evaluate.py).
EVAL = Section({
    "data": DATA,
    "paths": TOP_LEVEL.fields["paths"],
    "hydra": Anything(),
    "task_name": Text(),
    "ckpt_path": _checked(Text(nullable=True)),
    "tta": Section({"flip": Boolean(nullable=True), "translate": Boolean(nullable=True),
                    "reduce": Choice((None, "logits", "log_softmax"))}),
    "device": Text(),
    "precision": Choice((None, "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")),
    "applied_tricks": Section(open=True, values=Text()),
    "seed": Number(integer=True, low=0, high=MAX_SEED),
    "channels_last": Boolean(),
})


def check(cfg: DictConfig, schema: Section = TOP_LEVEL) -> None:
    """Refuse unknown keys and bad values anywhere in `cfg` (one UserError naming the key and the fix)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    schema.check("", cfg)
