"""Test-time augmentation: the network's outputs averaged over cheap symmetries of the test image."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cifar_speedrun.typed_sections import Section, check


class TTASettings(Section):
    """conf/train.yaml's `tta` section: which views the evaluation averages (tta_logits below)."""

    flip: bool
    translate: bool
    reduce: Literal["logits", "log_softmax"]
    least_confident: Annotated[float, Field(gt=0, le=1)] | None = Field(
        description="the fraction of each batch that gets the views, e.g. 0.25 (trick=tta_least_confident)")

    @classmethod
    def read(cls, value: Any) -> TTASettings:
        """A plain `tta` dict (a test's, a checkpoint's) as the typed section, checked once."""
        return value if isinstance(value, cls) else check(cls, value, "tta")

    def logits(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return tta_logits(net, images, self.flip, self.translate, self.reduce, self.least_confident)


def tta_logits(net: nn.Module, images: torch.Tensor, flip: bool = False, translate: bool = False,
               reduce: str = "logits", least_confident: float | None = None) -> torch.Tensor:
    """Average of the network's outputs over cheap symmetries of the test image.

    flip: the image and its horizontal mirror, averaged (Page part 8: cifar10-fast's forward_tta
    takes the mean of the views' logits). translate: airbench's TTA level 2, the untranslated views
    and the same views shifted by one pixel (reflect-padded) up-left and down-right, weighted as
    airbench94's `infer`: 0.5 x mean(untranslated) + 0.5 x mean(translated), so with flip the two
    untranslated views weigh 1/4 each and the four shifted ones 1/8. `reduce` chooses what is
    averaged: raw logits (both recipes), or log-softmax (log-probabilities).

    least_confident (trick=tta_least_confident): only that fraction of the batch, the images whose
    plain prediction has the lowest top softmax probability, get the views; the others keep the plain
    output. A confident prediction rarely changes under a mirror or a shift, so most of TTA's gain
    costs a fraction of its forward passes. All on the device: the choice is a top-k, not a host read.
    """
    if least_confident is not None and (flip or translate):
        plain = tta_logits(net, images, reduce=reduce)
        count = min(len(images), max(1, math.ceil(least_confident * len(images))))
        confidence = F.softmax(plain, dim=1).amax(dim=1)
        chosen = confidence.topk(count, largest=False).indices
        viewed = tta_logits(net, images.index_select(0, chosen), flip, translate, reduce)
        return plain.index_copy(0, chosen, viewed.to(plain.dtype))

    def outputs(views: list[torch.Tensor]) -> torch.Tensor:
        results = [net(view).float() for view in views]
        if reduce == "log_softmax":
            results = [F.log_softmax(out, dim=1) for out in results]
        elif reduce != "logits":
            raise ValueError(f"reduce={reduce!r}: logits or log_softmax")  # the config is typed: a caller bug
        return torch.stack(results).mean(dim=0)

    plain = [images, images.flip(-1)] if flip else [images]
    untranslated = outputs(plain)
    if not translate:
        return untranslated
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    height, width = images.shape[-2:]
    shifted = [padded[..., 0:height, 0:width], padded[..., 2:height + 2, 2:width + 2]]
    if flip:
        shifted += [view.flip(-1) for view in shifted]
    return 0.5 * untranslated + 0.5 * outputs(shifted)
