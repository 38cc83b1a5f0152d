"""A trained model in one file: weights, the model config that builds them, normalization, classes, TTA.

Written at the end of every fit as `<run>/model.pt` (callbacks.ModelFileWriter). It holds only
tensors and plain values, so it loads with `torch.load(weights_only=True)`, never running code from
the file. Use it without Hydra or Lightning:

    from cifar_speedrun.model_file import load_model
    model = load_model("logs/train/runs/<time>/model.pt")
    model.classify(["cat.png", "ship.jpg"])          # -> ['cat', 'ship']
    model(uint8_images)                               # (N, 3, 32, 32) uint8 -> logits (N, 10)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_speedrun import storage
from cifar_speedrun.errors import UserError

FORMAT = "cifar_speedrun.model/1"


def save_model_file(path: str, net: nn.Module, model_config: dict[str, Any], mean: Sequence[float],
                    std: Sequence[float], classes: Sequence[str], tta: dict[str, Any] | None = None,
                    about: dict[str, Any] | None = None) -> None:
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
    }, path)


class Classifier(nn.Module):
    """The trained network with its input normalization and test-time augmentation, for inference."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], classes: Sequence[str],
                 tta: dict[str, Any] | None = None, about: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.classes = list(classes)
        self.tta = dict(tta or {})
        self.about = dict(about or {})

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, 32, 32) on the 0-255 scale -> logits (N, classes), TTA as trained."""
        from cifar_speedrun.module import tta_logits

        x = (images.to(self.mean.device).float() - self.mean) / self.std
        return tta_logits(self.net, x, bool(self.tta.get("flip", False)), bool(self.tta.get("translate", False)),
                          str(self.tta.get("reduce", "logits")))

    def classify(self, images: torch.Tensor | Sequence[Any]) -> list[str]:
        """Class names for a uint8 batch, or for image files / PIL images (resized to 32x32 if needed)."""
        batch = images if isinstance(images, torch.Tensor) else self.to_batch(images)
        return [self.classes[int(i)] for i in self.forward(batch).argmax(dim=1)]

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


def checked_model_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """A model config read from a file may only build this project's networks: its `_target_` names
    a class of cifar_speedrun.model and nothing inside it names another callable."""
    target = str(config.get("_target_", ""))

    def nested_targets(node: Any) -> bool:
        if isinstance(node, dict):
            return any(key == "_target_" or nested_targets(value) for key, value in node.items())
        return isinstance(node, list) and any(nested_targets(value) for value in node)

    inner = {key: value for key, value in config.items() if key != "_target_"}
    if not target.startswith("cifar_speedrun.model.") or nested_targets(inner):
        raise UserError(f"{source} names a model class {target!r} outside cifar_speedrun.model: refusing to build it")
    return config


def is_model_file(blob: Any) -> bool:
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def load_model(path: str, device: str | torch.device = "cpu") -> Classifier:
    """Build the network from the file's own config and load its weights; nothing else is needed."""
    from hydra.utils import instantiate

    try:
        blob = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist: it is written as <run dir>/model.pt") from None
    except Exception as error:
        raise UserError(f"{path} is not a cifar_speedrun model file ({type(error).__name__}): give the "
                        "model.pt written at the end of a run") from None
    if not is_model_file(blob):
        raise UserError(f"{path} is not a cifar_speedrun model file: give the model.pt written at the end of a run")
    net = instantiate(checked_model_config(blob["model_config"], path))
    net.load_state_dict(blob["state_dict"])
    classifier = Classifier(net, blob["mean"], blob["std"], blob["classes"], blob.get("tta"), blob.get("about"))
    return classifier.to(device)
