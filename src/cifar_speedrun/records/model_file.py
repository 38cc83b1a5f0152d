"""A trained model in one file: weights, the model config that builds them, normalization, classes, TTA.

Written at the end of every fit as `<run>/model.pt` (callbacks.ModelFileWriter). It holds only
tensors and plain values, so it loads with `torch.load(weights_only=True)`, never running code from
the file. Use it without Hydra or Lightning:

    from cifar_speedrun.records.model_file import load_model
    model = load_model("logs/train/runs/<time>/model.pt")
    model.classify(["cat.png", "ship.jpg"])          # -> ['cat', 'ship']
    model(uint8_images)                               # (N, 3, 32, 32) uint8, or float in [0, 1] -> logits
    model.topk(["cat.png"], k=3)                      # -> [[("cat", 0.91), ("dog", 0.05), ...]]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from cifar_speedrun.errors import UserError
from cifar_speedrun.operations import storage
from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.recipe.augment import standardize
from cifar_speedrun.records.results import TrainTimer

FORMAT = "cifar_speedrun.model/1"
# The data settings a run records (model.pt's "data", a checkpoint's config), which eval.py takes
# from it unless the command line gives them: what the run was evaluated on, and in which layout
# (fp16 test images on CUDA, channels_last) its numbers came out. Not `root`: torchvision's download
# folder is the evaluator's own (data.root), never a folder a file names.
DATA_FROM_RUN = ("source", "path", "test_subset", "normalize", "half_precision", "channels_last")


def save_model_file(path: str, net: nn.Module, model_config: dict[str, Any], mean: Sequence[float],
                    std: Sequence[float], classes: Sequence[str], tta: dict[str, Any] | None = None,
                    about: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                    precision: str | None = None) -> None:
    """`data`: the run's data settings (DATA_FROM_RUN) and `precision` its trainer's, so that eval.py
    evaluates on what the run evaluated on, as it did, without being told."""
    state = {key: value.detach().cpu().clone() for key, value in net.state_dict().items()}
    storage.save_tensors_atomic({
        "format": FORMAT,
        "model_config": dict(model_config),
        "state_dict": state,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "classes": list(classes),
        "tta": dict(tta or {}),
        "about": dict(about or {}),
        "data": dict(data or {}),
        "precision": precision,
    }, path)


class Classifier(nn.Module):
    """The trained network with its input normalization and test-time augmentation, for inference.

    Takes images as (N, 3, 32, 32) or one (3, 32, 32): uint8 on the 0-255 scale (CIFAR-10's own
    form), or floating point in [0, 1] (what torchvision's ToTensor gives), which is scaled by 255.
    Anything else (floats outside [0, 1], channels last, another size) is refused with the fix: a
    silent guess would give confident nonsense.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], classes: Sequence[str],
                 tta: dict[str, Any] | None = None, about: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.classes = list(classes)
        self.tta = dict(tta or {})
        self.about = dict(about or {})

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) float pixels on the 0-255 scale, on the model's device."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor (N, 3, 32, 32), not {type(images).__name__}; for files or "
                            "PIL images use classify()")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            hint = " (channels last: use images.permute(0, 3, 1, 2))" if images.shape[-1:] == (3,) else ""
            raise ValueError(f"images must be (N, 3, 32, 32) or (3, 32, 32), got {tuple(images.shape)}{hint}")
        if images.dtype == torch.uint8:
            return images.to(self.mean.device).float()
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 (0-255) or floating point in [0, 1], got {images.dtype}")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"float images must be in [0, 1] (torchvision's ToTensor), got values in [{low:.3g}, "
                             f"{high:.3g}]: pass uint8 for the 0-255 scale, and do not normalize them yourself "
                             "(the model applies its own mean and std)")
        return images.to(self.mean.device).float() * 255.0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (uint8 0-255, or float in [0, 1]) -> logits (N, classes), with TTA as trained."""
        from cifar_speedrun.recipe.tta import tta_logits

        x = standardize(self._pixels(images), self.mean, self.std)
        return tta_logits(self.net, x, bool(self.tta.get("flip", False)), bool(self.tta.get("translate", False)),
                          str(self.tta.get("reduce", "logits")), self.tta.get("least_confident"))

    def probabilities(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """Class probabilities (N, classes): the softmax of the logits."""
        return torch.softmax(self.forward(self._as_batch(images)), dim=1)

    def topk(self, images: torch.Tensor | Sequence[Any], k: int = 3) -> list[list[tuple[str, float]]]:
        """The k likeliest classes of each image, as (name, probability) pairs, likeliest first."""
        values, indices = self.probabilities(images).topk(min(int(k), len(self.classes)), dim=1)
        return [[(self.classes[int(i)], float(v)) for v, i in zip(row_v, row_i, strict=True)]
                for row_v, row_i in zip(values, indices, strict=True)]

    def classify(self, images: torch.Tensor | Sequence[Any]) -> list[str]:
        """Class names for a batch (uint8 or [0, 1] float), or for image files / PIL images (resized to 32x32)."""
        return [self.classes[int(i)] for i in self.forward(self._as_batch(images)).argmax(dim=1)]

    def _as_batch(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        return images if isinstance(images, torch.Tensor) else self.to_batch(images)

    @staticmethod
    def to_batch(images: Sequence[Any]) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        arrays = []
        for image in images:
            picture = image if isinstance(image, Image.Image) else Image.open(Path(image))
            picture = picture.convert("RGB")
            if picture.size != (32, 32):
                picture = picture.resize((32, 32), Image.BILINEAR)
            arrays.append(np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(arrays))


# Argument values a model file may hold: plain data only (no tensors, no objects, no callables),
# within sizes a real config never reaches (DavidNet's and AirbenchNet's hold ~30 values, 2 deep).
_PLAIN = (type(None), bool, int, float, str)
MAX_SETTINGS = 200
MAX_DEPTH = 4
MAX_TEXT = 200
# The largest network a file may describe: 20x DavidNet at width 1 (6.57M parameters), more than
# DavidNet at width 4 (105M); a file's own weights must fit it exactly anyway.
MAX_PARAMETERS = 20 * 6_573_120
# What train.py records, so a file holding anything else is refused before use.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "16-true", "bf16-true", "64-true", "64")


class _Budget:
    def __init__(self, source: str) -> None:
        self.source, self.left = source, MAX_SETTINGS

    def spend(self, where: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise UserError(f"{self.source}: its model config holds more than {MAX_SETTINGS} values (at {where}), "
                            "which no model family takes: refusing to build it")


def _plain_data(value: Any, where: str, source: str, budget: _Budget | None = None, depth: int = 0) -> Any:
    """`value` if it is plain data (None, bool, int, float, short text, and lists / text-keyed dicts of them)
    with no Hydra key (`_target_`, `_args_`, `_partial_`, ...) anywhere inside, within the size limits;
    else one UserError."""
    budget = budget or _Budget(source)
    budget.spend(where)
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise UserError(f"{source}: model setting {where} is {len(value):,} characters of text: refusing to build it")
    if isinstance(value, _PLAIN):
        return value
    if depth >= MAX_DEPTH:
        raise UserError(f"{source}: model setting {where} is nested deeper than {MAX_DEPTH}: refusing to build it")
    if isinstance(value, (list, tuple)):
        return [_plain_data(item, f"{where}[{index}]", source, budget, depth + 1) for index, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_"):
                raise UserError(f"{source}: model setting {where}.{key} is not a plain setting (a Hydra key such as "
                                "_target_ or _partial_, or a non-text key): refusing to build it")
            out[key] = _plain_data(item, f"{where}.{key}", source, budget, depth + 1)
        return out
    raise UserError(f"{source}: model setting {where} holds a {type(value).__name__}, not plain data: refusing to "
                    "build it")


def _shapes(state_dict: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def build_model(config: Any, source: str, state_dict: dict[str, Any] | None = None) -> nn.Module:
    """The network a file describes, built only from the project's model families and plain settings.

    `config` is a model config read from a file someone handed over (model.pt's, or the config a
    checkpoint stores). Its `_target_` must name one of `models.FAMILIES` (models.family_for); every other
    key must be a key of that family's typed settings and hold plain data. The class is called directly: no
    Hydra `instantiate`, no import of any path the file names, no interpolation. It is first built
    on PyTorch's meta device (no memory), where its size is checked against `MAX_PARAMETERS` and,
    given `state_dict`, its every tensor's shape against the file's own weights: a file cannot make
    this allocate more than the weights it carries. Anything else is refused in one line naming `source`.
    """
    from cifar_speedrun.recipe.models import FAMILIES, family_for

    if not isinstance(config, dict):
        raise UserError(f"{source} holds no model config (found a {type(config).__name__}): give a model.pt or "
                        "last.ckpt written by this project's train.py")
    target = config.get("_target_")
    family = family_for(target)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"{source} names the model {str(target)[:80]!r}, which is not one of this project's model "
                        f"families ({known}): refusing to build it")
    accepted = {info.alias or name for name, info in family.settings_class.model_fields.items()}
    settings = {}
    budget = _Budget(source)
    for key, value in config.items():
        if key == "_target_":
            continue
        if not isinstance(key, str) or key not in accepted:
            raise UserError(f"{source}: {str(key)[:40]!r} is not a setting of {family.__name__} (it takes "
                            f"{', '.join(sorted(accepted))}): refusing to build it")
        settings[key] = _plain_data(value, f"model.{key}", source, budget, 1)
    try:
        with torch.device("meta"):
            probe = family(**settings)
    except UserError as error:
        raise UserError(f"{source}: its model settings do not build the model family {family.__name__} ({error}): "
                        "the file was edited or is not from train.py") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError, KeyError, AttributeError) as error:
        reason = " ".join(str(error).split())[:120]  # one line, whatever the error's text
        raise UserError(f"{source}: its model settings do not build the model family {family.__name__} "
                        f"({type(error).__name__}: {reason}): the file was edited or is not from train.py") from None
    size = sum(t.numel() for t in probe.state_dict().values())
    if size > MAX_PARAMETERS:
        raise UserError(f"{source} describes a {family.__name__} of {size:,} values, more than {MAX_PARAMETERS:,}: "
                        "refusing to build it")
    if state_dict is not None:
        _check_fits(_shapes(probe.state_dict()), state_dict, source)
    return family(**settings)


def _check_fits(expected: dict[str, tuple[int, ...]], state_dict: Any, source: str) -> None:
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{source} holds no weights (a state_dict of tensors): give a model.pt or last.ckpt written "
                        "by train.py")
    found = _shapes(state_dict)
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
        detail = (f"size mismatch for {wrong[0]}: {found[wrong[0]]} in the file, {expected[wrong[0]]} in the model"
                  if wrong else f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}")
        raise UserError(f"{source}: its weights do not fit the model its stored config describes ({detail}): the "
                        "file was edited or mixed from two runs; use the run's own model.pt or last.ckpt")


def load_weights(net: nn.Module, state_dict: Any, source: str) -> None:
    """Load a file's weights into `net`, refusing in one line weights that are not finite or do not fit.

    A run that diverged leaves NaN weights, which evaluate to 10% (a constant class) without any
    error; a file whose stored config and weights disagree (edited, or mixed from two runs) would
    fail deep inside PyTorch with a wall of size mismatches.
    """
    _check_fits(_shapes(net.state_dict()), state_dict, source)
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{source}: the weights are not finite (NaN or inf in {key}): the run diverged; evaluate "
                            "an earlier checkpoint, or retrain with a lower optim.lr")
    net.load_state_dict(state_dict)


def _fail_field(source: str, field: str, value: Any, what: str) -> UserError:
    return UserError(f"{source}: its {field} is {str(value)[:60]!r}, not {what}: the file was edited or is not "
                     "from train.py")


def check_record(record: dict[str, Any], source: str) -> None:
    """The fields besides the model that eval.py and load_model use, checked as data before use:
    mean/std (3 finite numbers, std > 0), classes, TTA, data settings, precision."""
    import math

    data = record.get("data") or {}
    for name in ("mean", "std"):
        value = record.get(name)
        if value is None and isinstance(data, dict) and data.get("normalize") == "computed":
            continue  # the run's own train-set statistics, computed again from the same data
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                or (name == "std" and not all(v > 0 for v in value))):
            raise _fail_field(source, name, value, "3 finite numbers" + (" > 0" if name == "std" else ""))
    classes = record.get("classes", ["-"] * 10)
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise _fail_field(source, "classes", classes, "a list of class names")
    tta = record.get("tta") or {}
    if not isinstance(tta, dict) or not set(tta) <= {"flip", "translate", "reduce", "least_confident"}:
        raise _fail_field(source, "tta", tta, "settings flip / translate / reduce / least_confident")
    fraction = tta.get("least_confident")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise _fail_field(source, "tta.least_confident", fraction, "a fraction in (0, 1] or null")
    for name in ("flip", "translate"):
        if tta.get(name) is not None and not isinstance(tta[name], bool):
            raise _fail_field(source, f"tta.{name}", tta[name], "true or false")
    if tta.get("reduce") not in (None, "logits", "log_softmax"):
        raise _fail_field(source, "tta.reduce", tta["reduce"], "logits or log_softmax")
    if not isinstance(data, dict):
        raise _fail_field(source, "data", data, "data settings")
    checks = {"source": lambda v: v in ("torchvision", "image_folder"),
              "root": lambda v: v is None or isinstance(v, str), "path": lambda v: v is None or isinstance(v, str),
              "test_subset": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
              "normalize": lambda v: v in ("page", "computed"), "half_precision": lambda v: isinstance(v, bool),
              "channels_last": lambda v: isinstance(v, bool), "source_id": lambda v: isinstance(v, str)}
    for key, value in data.items():
        if key not in checks or not checks[key](value):
            raise _fail_field(source, f"data.{key}", value, "a data setting train.py records")
    if record.get("precision") is not None and record["precision"] not in PRECISIONS:
        raise _fail_field(source, "precision", record["precision"], f"one of {', '.join(PRECISIONS)}")


def is_model_file(blob: Any) -> bool:
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def load_model(path: str, device: str | torch.device = "cpu") -> Classifier:
    """Build the network from the file's own config and load its weights; nothing else is needed."""
    blob = storage.load_data_file(path, "model file {path} does not exist: it is written as <run dir>/model.pt",
                                  "{path} is not a cifar_speedrun model file ({error}): give the model.pt written at "
                                  "the end of a run")
    if not is_model_file(blob):
        raise UserError(f"{path} is not a cifar_speedrun model file: give the model.pt written at the end of a run")
    check_record(blob, path)
    net = build_model(blob.get("model_config"), path, blob.get("state_dict"))
    load_weights(net, blob["state_dict"], path)
    classifier = Classifier(net, blob["mean"], blob["std"], blob["classes"], blob.get("tta"), blob.get("about"))
    return classifier.to(device)


class ModelFileWriter(Callback):
    """At the end of fit, `model.pt`: the trained network, self-contained (model_file.py says how to use it).

    Written after the EMA callback has copied the averaged weights in, so it holds what was evaluated.
    """

    def __init__(self, output_dir: str, filename: str = "model.pt") -> None:
        self.path = storage.join(output_dir, filename)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:

        if not trainer.is_global_zero:
            return
        run_config = dict(pl_module.hparams.get("run_config") or {})
        model_config = (run_config.get("config") or {}).get("model")
        datamodule = trainer.datamodule
        if model_config is None or datamodule is None:
            return
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, TrainTimer)), None)
        about = {"test_acc": timer.history[-1]["test_acc"] if timer and timer.history else None,
                 "epochs": trainer.current_epoch, "seed": run_config.get("seed"),
                 "tricks": run_config.get("tricks", []), "data": run_config.get("data_source")}
        data_config = (run_config.get("config") or {}).get("data") or {}
        data = {key: data_config.get(key) for key in DATA_FROM_RUN if key in data_config}
        if getattr(datamodule, "source_id", None):
            data["source_id"] = datamodule.source_id
        save_model_file(self.path, pl_module.net, model_config, datamodule.mean, datamodule.std, CIFAR10_CLASSES,
                        getattr(pl_module, "tta", None), about, data, str(trainer.precision))
