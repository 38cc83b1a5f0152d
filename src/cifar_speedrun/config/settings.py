"""The typed sections of conf/train.yaml and conf/eval.yaml, and the rules that tie keys together.

Every key a run reads has a field here (or in its model family's / optimizer's settings: models/,
optim.py), with its type, range and a hint; its default is in the yaml. `check_train(cfg)` refuses,
before any data is loaded, an unknown key (with the nearest known one), a bad value, and an impossible
combination (a schedule that outlasts the run, a batch that ghost BN cannot split, ...), each in one
line naming the fix (typed_sections.py says how the lines are made).

Nodes built from a `_target_` that is not ours (Lightning's Trainer, callbacks, loggers) are checked
against the target's own signature, so an argument that does not exist is caught too.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cifar_speedrun.conf_files import keys_set_by_trick
from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.models import FAMILIES, ModelSettings, family_for, target_of
from cifar_speedrun.recipe.optim import OPTIMIZERS, OptimizerSettings
from cifar_speedrun.recipe.tta import TTASettings
from cifar_speedrun.typed_sections import MAX_SEED, Section, check, plain, unknown_key

PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
Precision = Literal["32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 32, 16, 64]


class DataSettings(Section):
    target: Literal["cifar_speedrun.recipe.data.Cifar10DataModule"] = Field(alias="_target_")
    source: Literal["torchvision", "image_folder"] = Field(
        description="torchvision downloads the official release; image_folder reads data.path")
    root: str | None
    path: str | None
    cache_dir: str | None
    batch_size: int = Field(ge=1, description="Page uses data.batch_size=512")
    eval_batch_size: int = Field(ge=1, description="e.g. data.eval_batch_size=1000")
    subset: Annotated[int, Field(ge=1)] | None = Field(description="a number of training images, or null for all")
    subset_mode: Literal["per_class", "random"]
    test_subset: Annotated[int, Field(ge=1)] | None
    val_split: int = Field(ge=0, description="training images held out for validation, e.g. 5000; 0: none (Page)")
    normalize: Literal["page", "computed"]
    translate: int = Field(ge=0, le=16, description="Page: 4, airbench: 2")
    flip_mode: Literal["random", "alternating"] = Field(description="alternating: trick=alternating_flip (airbench)")
    crop_size: int = Field(ge=1, le=32, description="CIFAR-10 images are 32x32")
    flip: bool
    cutout: bool
    cutout_size: int = Field(ge=1, le=32, description="Page: 8 (5 from the whitening row on)")
    cutout_inside: bool
    half_precision: bool
    channels_last: bool
    seed: int = Field(ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _fits(self) -> DataSettings:
        if self.source == "image_folder" and not self.path:
            raise UserError("data.source=image_folder needs data.path=/path/to/cifar10.tar.gz (or export "
                            "CIFAR10_ARCHIVE)")
        if self.crop_size > 32 + 2 * self.translate:
            raise UserError(f"data.crop_size={self.crop_size} is larger than the {32 + 2 * self.translate}px padded "
                            f"image (32 + 2 x data.translate={self.translate}): lower data.crop_size or raise "
                            "data.translate")
        if self.cutout and self.cutout_size >= self.crop_size:
            raise UserError(f"data.cutout_size={self.cutout_size} would blank the whole {self.crop_size}px crop: use "
                            "a smaller square (Page: 8, then 5) or data.cutout=false")
        return self


class PathSettings(Section):
    root_dir: str | None
    data_dir: str | None
    log_dir: str | None
    cache_dir: str | None
    output_dir: str | None
    checkpoint_dir: str | None


class LossSettings(Section):
    label_smoothing: float = Field(ge=0, lt=1, description="Page uses 0.2")


class CompileSettings(Section):
    enabled: bool
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        description="torch.compile's modes")


class StepSettings(Section):
    """How the training step runs (step.py): op by op, or captured whole as one CUDA graph."""

    mode: Literal["eager", "graph", "auto"] = Field(description="auto: graph on one CUDA device, else eager")


_SIGNATURES: dict[str, set[str] | None] = {}


def _parameters(target: str, key: str) -> set[str] | None:
    """The keyword parameters of the class or function `target` names (None: it takes **kwargs)."""
    if target not in _SIGNATURES:
        module_name, _, attribute = target.rpartition(".")
        try:
            built: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError):
            raise UserError(f"{key}._target_={target!r} cannot be imported: check the class path") from None
        # A class that only forwards (*args, **kwargs) to its parent (ResumableCSVLogger -> CSVLogger) takes
        # the parent's arguments; one with named arguments and **kwargs (WandbLogger: wandb.init's) takes any.
        classes = [c for c in built.__mro__ if "__init__" in vars(c)] if isinstance(built, type) else [built]
        names: set[str] | None = None
        for candidate in classes:
            parameters = [p for n, p in inspect.signature(candidate).parameters.items() if n != "self"]
            kinds = {p.kind for p in parameters}
            if kinds == {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
                continue  # pure forwarding
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                names = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}
            break
        _SIGNATURES[target] = names
    return _SIGNATURES[target]


def check_built(key: str, node: Any) -> None:
    """A node built from its `_target_` (a Lightning class, a callback): every key is one of its arguments."""
    if not isinstance(node, dict):
        raise UserError(f"{key}={node!r} must be a group of settings with a _target_")
    target = node.get("_target_")
    if not isinstance(target, str):
        raise UserError(f"{key} has no _target_: it must name the class to build")
    parameters = _parameters(target, key)
    for name in node:
        if name.startswith("_") and name.endswith("_"):
            continue
        if parameters is not None and name not in parameters:
            raise unknown_key(f"{key}.{name}", name, {p: None for p in parameters},
                              f"{target.rsplit('.', 1)[-1]} has no argument {name!r}")


def _built_group(key: str, group: Any) -> Any:
    """callbacks / logger: name -> a built node, or null (a callback switched off)."""
    if group is None:
        return None
    if not isinstance(group, dict):
        raise UserError(f"{key}={group!r} must be a group of named settings")
    for name, node in group.items():
        if node is not None:
            check_built(f"{key}.{name}", node)
    return group


# Lightning arguments that would stop a run before or after its `epochs` (refused by name). Not
# fast_dev_run: debug=fdr's one-batch check of the whole pipeline, which records no results.
RUN_LENGTH_KEYS = ("max_steps", "min_steps", "min_epochs", "max_time", "limit_train_batches")


class TrainerSettings(Section):
    """The Trainer keys the project relies on, typed; any other must be an argument of the `_target_` class."""

    model_config = ConfigDict(extra="allow")

    target: str = Field(alias="_target_")
    max_epochs: int = Field(ge=1)
    precision: Precision = Field(description="trick=mixed_precision picks 16-mixed on CUDA")
    devices: Any
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = Field(description="CUDA or the CPU")
    check_val_every_n_epoch: int = Field(ge=1)
    log_every_n_steps: int = Field(ge=1)
    enable_checkpointing: bool
    enable_model_summary: bool
    enable_progress_bar: bool
    use_distributed_sampler: bool
    benchmark: bool
    deterministic: bool | Literal["warn"]
    num_sanity_val_steps: int = Field(ge=-1, description="-1: the whole validation set, as Lightning")
    # Not in conf/trainer/ (Lightning's own default, 1, applies when absent): `trainer.num_nodes=2` adds it.
    num_nodes: Annotated[int, Field(ge=1)] | None = None

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ids = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        if not (count or value in ("auto", -1) or ids):
            raise UserError(f"trainer.devices={value!r} must be a number of devices, 'auto' or a list of device ids")
        if ids and len(set(value)) != len(value):
            raise UserError(f"trainer.devices={value!r} names a device twice: list each id once")
        return value

    @model_validator(mode="after")
    def _lightning_arguments(self) -> TrainerSettings:
        check_built("trainer", {"_target_": self.target, **(self.model_extra or {})})
        for key in RUN_LENGTH_KEYS:
            if (self.model_extra or {}).get(key) is not None:
                raise UserError(f"trainer.{key} is not taken: the run's length follows `epochs` (the LR schedule, "
                                "EMA and time-to-target with it); set epochs=N instead")
        for key, off in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
            value = (self.model_extra or {}).get(key, off)
            if value not in (off, 0, None) and not (key == "accumulate_grad_batches" and value == 1):
                raise UserError(f"trainer.{key}={value} is not taken: the training step is written out (module.py, "
                                "manual optimization, no host sync) without gradient clipping or accumulation; "
                                f"drop trainer.{key} (a larger batch: data.batch_size)")
        return self

    @property
    def world_size(self) -> int:
        """Processes in the run: the device count, or the ids listed; 'auto' / -1 count as one (unknown here)."""
        devices = self.devices if isinstance(self.devices, int) and self.devices > 0 else (
            len(self.devices) if isinstance(self.devices, list) else 1)
        return devices * (self.num_nodes or 1)


def _chosen_settings(value: Any, section: str, tag: str, table: dict[str, type[Section]], choice: str) -> Section:
    """A section whose settings class a value in it chooses: the model by `_target_` (models.FAMILIES), the
    optimizer by `builder` (optim.OPTIMIZERS). Checked as that class, or one line naming the known choices."""
    if isinstance(value, Section):
        return value
    if not isinstance(value, dict):
        raise UserError(f"{section}={value!r} must be a group of settings with a {tag} ({section}={choice}, ...)")
    chosen = value.get(tag)
    settings = table.get(chosen) if isinstance(chosen, str) else None
    if settings is None:
        known = ", ".join(sorted(table))
        raise UserError(f"{section}.{tag}={chosen!r} is not one of this project's; use {section}=<name> ({known})")
    return check(settings, {k: v for k, v in value.items() if k != "_target_"} if tag == "_target_" else value,
                 section)


def _family_settings(value: Any) -> Section:
    chosen = family_for(value.get("_target_")) if isinstance(value, dict) else None
    table = {target_of(family): family.settings_class for family in FAMILIES.values()}
    if chosen is not None:
        table[value["_target_"]] = chosen.settings_class
    return _chosen_settings(value, "model", "_target_", table, "davidnet")


def _optim_settings(value: Any) -> Section:
    return _chosen_settings(value, "optim", "builder", dict(OPTIMIZERS), "sgd")


class RunScalars(Section):
    """conf/train.yaml's own keys. Checked before the sections, because sections copy some of them by
    interpolation (`model.whitening.seed: ${seed}`, `trainer.max_epochs: ${ceil:${epochs}}`): a bad
    `seed=-1` is named as `seed`, not as the copy that fails first."""

    task_name: str
    applied_tricks: dict[str, str]
    seed: int = Field(ge=0, le=MAX_SEED, description="any integer in [0, 2^32 - 1]")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        description="W&B takes tags of 1 to 64 characters")
    cpu_mixed_precision: Literal["bf16-mixed", "32-true", "16-mixed"]
    epochs: float = Field(gt=0, description="e.g. epochs=24 (Page's baseline), 10 (his final), 9.9 (airbench)")
    target_acc: float = Field(ge=0, le=1)
    channels_last: bool
    nan_check_every: int = Field(ge=1)
    ckpt_path: str | None
    resume: bool


class TrainSettings(RunScalars):
    """conf/train.yaml, composed: what a training run reads."""

    data: DataSettings
    model: ModelSettings
    optim: OptimizerSettings
    trainer: TrainerSettings
    logger: Any
    callbacks: Any
    paths: PathSettings
    loss: LossSettings
    tta: TTASettings
    compile: CompileSettings
    step: StepSettings

    _model = field_validator("model", mode="before")(lambda cls, value: _family_settings(value))
    _optim = field_validator("optim", mode="before")(lambda cls, value: _optim_settings(value))
    _logger = field_validator("logger", mode="before")(lambda cls, value: _built_group("logger", value))
    _callbacks = field_validator("callbacks", mode="before")(lambda cls, value: _built_group("callbacks", value))

    @model_validator(mode="after")
    def _rules(self) -> TrainSettings:
        check_run_length(self)
        check_devices(self)
        check_step(self)
        return self


# torch.compile modes that record CUDA graphs of their own (cudagraph trees), which cannot be recorded
# inside the captured step.
_COMPILE_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_step(run: TrainSettings) -> None:
    """step.mode=graph where it can run: one device, no torch.compile mode that makes CUDA graphs itself."""
    if run.step.mode == "eager":
        return
    if run.compile.enabled and run.compile.mode in _COMPILE_GRAPH_MODES:
        raise UserError(f"step.mode={run.step.mode} captures the whole step in one CUDA graph, and compile.mode="
                        f"{run.compile.mode} records CUDA graphs of its own: use compile.mode=max-autotune-no-"
                        "cudagraphs (or default), or step.mode=eager")
    if run.step.mode == "graph" and run.trainer.world_size > 1:
        raise UserError(f"step.mode=graph runs on one device; with {run.trainer.world_size} devices use step.mode="
                        "eager (or auto, which picks eager there)")


def check_run_length(run: TrainSettings) -> None:
    """The run's length and its schedule agree: max_epochs is ceil(epochs); the knots lie inside the run."""
    from cifar_speedrun.recipe.schedule import check_schedule, resolve_knots

    epochs, max_epochs = run.epochs, run.trainer.max_epochs
    if max_epochs != math.ceil(epochs):
        raise UserError(
            f"trainer.max_epochs={max_epochs} differs from epochs={epochs:g}: set epochs={max_epochs} instead "
            "(the LR schedule and everything else that depends on the run's length follow `epochs`)"
        )
    schedule = run.optim.schedule
    written = list(schedule.epochs)
    knots = resolve_knots(written, epochs)
    try:
        check_schedule(knots, list(schedule.factors))
    except UserError as error:
        if written == knots:
            raise
        raise UserError(f"{error} (optim.schedule.epochs={written} at epochs={epochs:g} gives "
                        f"{[round(k, 4) for k in knots]}: raise epochs or give the knots)") from None
    if knots[0] < 0:
        raise UserError(f"optim.schedule.epochs={knots} starts before epoch 0")
    own = getattr(run.optim, "whiten_bias_schedule", None)  # muon: the whitening bias's own lr schedule
    if own is not None:
        try:
            check_schedule(resolve_knots(list(own.epochs), epochs), list(own.factors))
        except UserError as error:
            raise UserError(str(error).replace("optim.schedule", "optim.whiten_bias_schedule")) from None
    if knots[-1] > epochs:
        raise UserError(
            f"optim.schedule.epochs ends at {knots[-1]:g} but the run has epochs={epochs:g}: the schedule would be cut "
            f"off; set epochs={knots[-1]:g} or write the knots in `epochs` (e.g. [0,epochs/5,epochs])"
        )


def check_devices(run: TrainSettings) -> None:
    """What the machine and the devices allow: CUDA where asked, fp16 only on CUDA, batches that split."""
    import torch

    from cifar_speedrun.devices import on_cuda

    accelerator = run.trainer.accelerator
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but this machine has no CUDA device: use trainer=cpu "
                        "(or trainer.accelerator=auto)")
    precision = str(run.trainer.precision)
    if precision in ("16-mixed", "16") and not on_cuda(accelerator):
        raise UserError(f"trainer.precision={precision} is fp16 autocast, which needs CUDA (Lightning would run "
                        "bf16-mixed instead): on this machine use trainer.precision=bf16-mixed or 32-true, or "
                        "trick=mixed_precision, which picks the precision for the device")
    batch, world = run.data.batch_size, run.trainer.world_size
    if batch % world:
        raise UserError(f"data.batch_size={batch} is not divisible by the {world} devices: use a multiple of {world}")
    norm = getattr(run.model, "norm", None)  # a family may declare no norm keys (models/base.py)
    if norm is not None and norm.kind == "ghost" and (batch // world) % norm.ghost_splits:
        raise UserError(
            f"ghost_bn splits each batch into model.norm.ghost_splits={norm.ghost_splits}, but the per-device batch "
            f"is {batch // world}: use a batch size divisible by {norm.ghost_splits} (Page: 512 = 16 x 32)"
        )
    subset = run.data.subset
    if subset is not None and subset < batch:
        raise UserError(f"data.subset={subset} is smaller than data.batch_size={batch}: no full batch to train on; "
                        "lower data.batch_size or raise data.subset")


class EvalTTASettings(Section):
    flip: bool | None
    translate: bool | None
    reduce: Literal["logits", "log_softmax"] | None
    least_confident: Annotated[float, Field(gt=0, le=1)] | None


class EvalSettings(Section):
    """conf/eval.yaml, composed: what evaluating a model file or checkpoint reads."""

    data: DataSettings
    paths: PathSettings
    task_name: str
    ckpt_path: str | None
    tta: EvalTTASettings
    device: str
    precision: Literal[None, "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"]
    applied_tricks: dict[str, str]
    seed: int = Field(ge=0, le=MAX_SEED)
    channels_last: bool


def check_train(cfg: Any) -> TrainSettings:
    """The composed training config, typed; one UserError for the first mistake.

    A key nothing reads that a chosen trick set (trick=pool_before_norm on a net that has no such
    setting, trick=frozen_bn_scale's optim.bias_lr_factor with an optimizer that has no such factor)
    is refused naming the trick.
    """
    if hasattr(cfg, "get"):
        check(RunScalars, {key: plain(cfg.get(key), key) for key in RunScalars.model_fields if key in cfg})
    data = _without_hydra(plain(cfg))
    try:
        return check(TrainSettings, data)
    except UserError as error:
        key = str(error).removeprefix("unknown key ").split(" ", 1)[0].rstrip(":")
        set_by = {name: sorted(k for k in keys_set_by_trick(name) if k == key or k.startswith(key + "."))
                  for name in (data.get("applied_tricks") or {})}
        tricks = [name for name, keys in set_by.items() if keys]
        if not str(error).startswith("unknown key ") or not tricks:
            raise
        raise UserError(f"trick={tricks[0]} sets {', '.join(set_by[tricks[0]])}, which this configuration does not "
                        f"have (model {data['model'].get('_target_', '?').rsplit('.', 1)[-1]}, optim.builder "
                        f"{data['optim'].get('builder', '?').rsplit('.', 1)[-1]}): the trick does not apply here; "
                        "drop it") from None


def check_eval(cfg: Any) -> EvalSettings:
    return check(EvalSettings, _without_hydra(plain(cfg)))


def _without_hydra(data: Any) -> Any:
    """Hydra's own node (present when composed with return_hydra_config) is Hydra's to check."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if key != "hydra"}
    return data
