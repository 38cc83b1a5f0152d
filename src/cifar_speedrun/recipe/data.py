"""CIFAR-10 kept whole on the training device and augmented there, one vectorized batch at a time.

Page (part 2 of "How to train your ResNet") found the data loader, not the GPU, to be the bottleneck:
the fix is to decode once, keep the 50k images as one tensor on the device, and do crop / flip /
cutout per batch with a few tensor ops instead of per-image Python. The DataModule here ties it together:

  source (torchvision pickles or an ImageFolder of images)                                  sources.py
    -> uint8 tensors (N, 3, 32, 32), cached once per source in `cache_dir`                  sources.py
    -> on `setup`: moved to the device, standardized per channel, train images reflect-padded by
       `translate` px (Page: 4, airbench: 2), so a random 32x32 crop is a random shift      augment.py
    -> `AugmentedBatches`: per epoch a fresh `torch.randperm`, per batch crop + flip + cutout augment.py
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from cifar_speedrun.errors import UserError
from cifar_speedrun.operations.sources import Cifar10Uint8, load_cifar10_uint8, select_subset, split_training_set
from cifar_speedrun.recipe.augment import (
    PAGE_MEAN,
    PAGE_STD,
    AugmentConfig,
    AugmentedBatches,
    EvalBatches,
    channel_stats,
    pad_reflect,
    standardize,
)

# LightningDataModule
# ----------------------------------------------------------------------------------------------------


class Cifar10DataModule(L.LightningDataModule):
    """Owns the device-resident tensors and hands Lightning the batch iterators."""

    def __init__(
        self,
        *,
        source: str,
        root: str | None,
        path: str | None,
        cache_dir: str,
        batch_size: int,
        eval_batch_size: int,
        subset: int | None,
        subset_mode: str,
        test_subset: int | None,
        val_split: int,
        normalize: str,
        translate: int,
        crop_size: int,
        flip: bool,
        flip_mode: str,
        cutout: bool,
        cutout_size: int,
        cutout_inside: bool,
        half_precision: bool,
        channels_last: bool,
        seed: int,
    ) -> None:
        """The keys of conf/data/cifar10.yaml, typed and checked there (settings.DataSettings): no defaults here."""
        super().__init__()
        self.source, self.root, self.path, self.cache_dir = source, root, path, cache_dir
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.subset, self.subset_mode, self.test_subset = subset, subset_mode, test_subset
        self.val_split = int(val_split)
        self._val: EvalBatches | None = None
        self.num_val_images = 0
        self.normalize, self.translate, self.flip_mode = normalize, translate, flip_mode
        self.augment = AugmentConfig(crop_size, flip, cutout, cutout_size, cutout_inside)
        self.half_precision, self.channels_last, self.seed = half_precision, channels_last, seed
        self.mean: list[float] = list(PAGE_MEAN)
        self.std: list[float] = list(PAGE_STD)
        self.train_images: torch.Tensor | None = None  # standardized, unpadded: for whitening etc.
        self._train_batches: AugmentedBatches | None = None
        self.num_train_images = self.num_test_images = 0  # known after setup
        self._pending_state: dict[str, Any] | None = None
        self._uint8: Cifar10Uint8 | None = None
        self._source_id: str | None = None  # kept after the host copy is dropped
        # Indices into the whole training set, known after setup: what this run trains on and validates on.
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None

    def load_uint8(self) -> Cifar10Uint8:
        if self._uint8 is None:
            self._uint8 = load_cifar10_uint8(self.source, self.root, self.path, self.cache_dir)
        return self._uint8

    def prepare_data(self) -> None:
        self.load_uint8()  # builds the cache once, on one process

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        if self._train_batches is not None:
            return
        data = self.load_uint8()
        self._source_id = data.source_id
        self._uint8 = None  # the host copy is not needed once the tensors are on the device
        # Validation first (fixed by the data), then the subset from the rest: see split_training_set.
        self.train_indices, self.val_indices = split_training_set(
            data.train_y, self.subset, self.subset_mode, self.seed, self.val_split)
        train_x, train_y = data.train_x, data.train_y
        if len(self.train_indices) < len(train_y):  # a subset or a split (all of them: used as they are)
            train_x, train_y = train_x[self.train_indices], train_y[self.train_indices]
        val_x, val_y = data.train_x[self.val_indices], data.train_y[self.val_indices]  # evaluated every epoch
        test_x, test_y = data.test_x, data.test_y
        if self.test_subset:
            index = select_subset(test_y, int(self.test_subset), "per_class", self.seed, "data.test_subset")
            test_x, test_y = test_x[index], test_y[index]
        if self.normalize == "computed":
            self.mean, self.std = channel_stats(data.train_x)
        self.num_train_images, self.num_test_images = len(train_y), len(test_y)
        device = self._device()
        # Half precision only where it pays: CUDA (tensor cores); the CPU path keeps fp32 inputs.
        dtype = torch.float16 if self.half_precision and device.type == "cuda" else torch.float32
        train = standardize(train_x.to(device), self.mean, self.std)
        self.train_images = train
        padded = pad_reflect(train, self.translate).to(dtype)
        test = standardize(test_x.to(device), self.mean, self.std).to(dtype)
        rank = getattr(self.trainer, "global_rank", 0) if getattr(self, "trainer", None) else 0
        world = getattr(self.trainer, "world_size", 1) if getattr(self, "trainer", None) else 1
        if self.batch_size % world:
            raise UserError(
                f"data.batch_size={self.batch_size} is not divisible by the {world} devices; "
                f"use a multiple of {world}"
            )
        per_rank_batch = self.batch_size // world
        if len(train_y) // world < per_rank_batch:
            raise UserError(
                f"data.batch_size={self.batch_size} is larger than the {len(train_y)} training images "
                "(no full batch to train on): lower data.batch_size or data.val_split, or raise data.subset"
            )
        self._train_batches = AugmentedBatches(
            padded, train_y.to(device), per_rank_batch, self.augment, self.seed, rank, world, self.channels_last,
            self.flip_mode
        )
        self._test = EvalBatches(test, test_y.to(device), self.eval_batch_size, self.channels_last, rank, world)
        if self.val_split:
            val = standardize(val_x.to(device), self.mean, self.std).to(dtype)
            self._val = EvalBatches(val, val_y.to(device), self.eval_batch_size, self.channels_last, rank, world)
            self.num_val_images = len(val_y)
        if self._pending_state is not None:
            self._train_batches.load_state_dict(self._pending_state)
            self._pending_state = None

    def train_dataloader(self) -> AugmentedBatches:
        assert self._train_batches is not None, "call setup() first"
        return self._train_batches

    def val_dataloader(self) -> EvalBatches | list[EvalBatches]:
        """The test set, and the held-out validation images when data.val_split > 0 (dataloader 1)."""
        return self._test if self._val is None else [self._test, self._val]

    def test_dataloader(self) -> EvalBatches:
        return self._test

    @property
    def source_id(self) -> str | None:
        """Which data this is (sources.source_identity), once loaded: recorded in checkpoints and model.pt."""
        return self._uint8.source_id if self._uint8 is not None else self._source_id

    def state_dict(self) -> dict[str, Any]:
        # The generators' states make a resumed run draw the same batches as an uninterrupted one.
        state = self._train_batches.state_dict() if self._train_batches is not None else {}
        return {**state, "source_id": self.source_id} if state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._train_batches is not None:
            self._train_batches.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict
