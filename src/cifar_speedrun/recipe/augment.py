"""The images on the training device: standardized per channel, padded once, augmented one vectorized batch
at a time (Page part 2: crop / flip / cutout as a few tensor ops, not per-image Python).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cifar_speedrun.errors import UserError

# Per-channel mean / std of the official CIFAR-10 train set on the 0-255 scale, as in Page's
# cifar10-fast (utils.py: cifar10_mean = (0.4914, 0.4822, 0.4465), cifar10_std = (0.2471, 0.2435, 0.2616),
# times 255).
PAGE_MEAN = (125.31, 122.95, 113.87)
PAGE_STD = (62.99, 62.09, 66.70)
# Device-side preprocessing and augmentation
# ----------------------------------------------------------------------------------------------------


def standardize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Pixels (N, C, H, W) on the 0-255 scale (uint8 or float) -> float32, zero mean / unit std per channel.

    The one place inputs are normalized: training and evaluation data (data.py, evaluate.py) and a
    model file's classifier (model_file.py), so all three see the same numbers.
    """
    mean_t = torch.as_tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() - mean_t) / std_t


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-255 scale) of uint8 images, in float64 for accuracy."""
    flat = images.double().transpose(0, 1).reshape(images.shape[1], -1)
    return flat.mean(dim=1).tolist(), flat.std(dim=1).tolist()


def pad_reflect(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Done once per run on the whole train set, so each batch only has to crop."""
    return F.pad(images, (pad, pad, pad, pad), mode="reflect") if pad > 0 else images


def crop_flip(padded: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              size: int) -> torch.Tensor:
    """Per-image crop of `size`x`size` at (top, left), mirrored where `flip`: one gather, no loop.

    Each output pixel's flat position in its padded image is row * width + column; mirroring the
    crop is the same as reading its columns right to left, so the flip costs nothing beyond
    reversing the column index.
    """
    batch, channels, height, width = padded.shape
    offsets = torch.arange(size, device=padded.device)
    rows = top[:, None] + offsets  # (B, size)
    cols = left[:, None] + offsets
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    pixels = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, size * size)
    flat = padded.reshape(batch, channels, height * width)
    return flat.gather(2, pixels.expand(batch, channels, size * size)).view(batch, channels, size, size)


def cutout_(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """In place: zero one `size`x`size` square per image at (top, left), clipped at the border.

    Writes only the square's size*size pixels per image (one index_fill over the flat tensor), not
    a full-image mask: the positions that fall outside the image are redirected to a pixel of the
    same square that is inside it (its clamped centre), so they zero nothing extra.
    """
    batch, channels, height, width = images.shape
    offsets = torch.arange(size, device=images.device)
    rows = top[:, None] + offsets  # (B, size)
    cols = left[:, None] + offsets
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    centre = (top + size // 2).clamp(0, height - 1) * width + (left + size // 2).clamp(0, width - 1)
    pixels = torch.where(inside, rows[:, :, None] * width + cols[:, None, :], centre[:, None, None])
    planes = torch.arange(batch * channels, device=images.device).view(batch, channels, 1) * (height * width)
    images.view(-1).index_fill_(0, (planes + pixels.view(batch, 1, size * size)).view(-1), 0.0)
    return images


@dataclass
class AugmentConfig:
    crop_size: int = 32
    flip: bool = True
    cutout: bool = True
    cutout_size: int = 8  # Page part 8 / cifar10-fast: Cutout(8, 8)
    # False: the square's centre is uniform over the image and the square is clipped at the border
    # (DeVries & Taylor 2017). True: the square always lies inside the image, as cifar10-fast's
    # Cutout.options (x0 in range(W + 1 - w)).
    cutout_inside: bool = False


def augment_batch(padded: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig,
                  flip: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop, horizontal flip and cutout for one batch, all drawn on the device.

    `flip`: which images to mirror, when the caller decides (alternating flip); otherwise each image
    is mirrored with p = 0.5.
    """
    batch, _, height, width = padded.shape
    device = padded.device
    size = cfg.crop_size
    top = torch.randint(0, height - size + 1, (batch,), device=device, generator=generator)
    left = torch.randint(0, width - size + 1, (batch,), device=device, generator=generator)
    if flip is None:
        if cfg.flip:
            flip = torch.rand(batch, device=device, generator=generator) < 0.5
        else:
            flip = torch.zeros(batch, dtype=torch.bool, device=device)
    x = crop_flip(padded, top, left, flip, size)
    if cfg.cutout:
        square = cfg.cutout_size
        if cfg.cutout_inside:
            c_top = torch.randint(0, size - square + 1, (batch,), device=device, generator=generator)
            c_left = torch.randint(0, size - square + 1, (batch,), device=device, generator=generator)
        else:
            c_top = torch.randint(0, size, (batch,), device=device, generator=generator) - square // 2
            c_left = torch.randint(0, size, (batch,), device=device, generator=generator) - square // 2
        x = cutout_(x, c_top, c_left, square)  # x is this batch's own fresh tensor
    return x


class AugmentedBatches:
    """Training batches drawn from a device-resident tensor: a new permutation each epoch.

    `rank` / `world_size` give each DDP process its own disjoint slice of one shared permutation
    (the shared seed keeps the permutations equal across ranks), like DistributedSampler.

    `flip_mode="alternating"` (airbench, trick=alternating_flip): each image gets one random flip
    decision, drawn once from the seed, and epoch k uses it mirrored when k is odd, so an image
    flipped in one epoch is unflipped in the next: every image is seen both ways every two epochs,
    where independent coin flips leave a quarter of them one-sided over any two epochs. The epoch
    count is part of the state, so a resumed run continues the pattern.
    """

    def __init__(self, padded_images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 augment: AugmentConfig, seed: int, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, flip_mode: str = "random") -> None:
        self.images = padded_images
        self.labels = labels
        self.batch_size = batch_size
        self.augment = augment
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        device = padded_images.device
        self.order_generator = torch.Generator(device=device).manual_seed(seed)
        # Augmentation draws differ per rank (their images differ anyway); order draws must not.
        self.augment_generator = torch.Generator(device=device).manual_seed(seed * 1000 + 7919 + rank)
        self.last_indices: torch.Tensor | None = None  # kept for tests and DDP checks
        if flip_mode not in ("random", "alternating"):
            raise UserError(f"data.flip_mode={flip_mode!r} is not known; use random or alternating")
        self.flip_mode = flip_mode
        self.epoch = 0  # epochs started, for the alternating flip
        self.base_flip: torch.Tensor | None = None
        if flip_mode == "alternating" and augment.flip:
            draws = torch.Generator().manual_seed(seed * 1000 + 104729)  # on the CPU: the same on every device
            self.base_flip = (torch.rand(len(labels), generator=draws) < 0.5).to(device)

    def __len__(self) -> int:
        return (len(self.labels) // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), device=self.images.device, generator=self.order_generator)
        per_rank = len(self.labels) // self.world_size
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.last_indices = mine[: len(self) * self.batch_size]
        odd = self.epoch % 2 == 1
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = mine[start:start + self.batch_size]
            flip = None if self.base_flip is None else self.base_flip.index_select(0, index) ^ odd
            x = augment_batch(self.images.index_select(0, index), self.augment_generator, self.augment, flip)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order_generator.get_state(), "augment": self.augment_generator.get_state(),
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order_generator.set_state(state["order"].cpu())
        self.augment_generator.set_state(state["augment"].cpu())
        self.epoch = int(state.get("epoch", 0))


class EvalBatches:
    """Test batches in a fixed order, last partial batch kept: every test image counts once.

    Under DDP each rank takes a contiguous slice (the last rank the remainder), and the metrics'
    sync adds the ranks' counts, so the accuracy is over all test images exactly once.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 channels_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        share = math.ceil(len(labels) / world_size)
        mine = slice(rank * share, min((rank + 1) * share, len(labels)))
        self.images, self.labels, self.batch_size = images[mine], labels[mine], batch_size
        self.channels_last = channels_last

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            x = self.images[start:start + self.batch_size]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[start:start + self.batch_size]


# ----------------------------------------------------------------------------------------------------
