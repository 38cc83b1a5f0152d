"""CIFAR-10 kept whole on the training device and augmented there, one vectorized batch at a time.

Page (part 2 of "How to train your ResNet") found the data loader, not the GPU, to be the bottleneck:
the fix is to decode once, keep the 50k images as one tensor on the device, and do crop / flip /
cutout per batch with a few tensor ops instead of per-image Python. That is what this file does:

  source (torchvision pickles or an ImageFolder of images)
    -> uint8 tensors (N, 3, 32, 32), cached once per source in `cache_dir`
    -> on `setup`: moved to the device, standardized per channel, train images reflect-padded by
       `translate` px (Page: 4, airbench: 2), so a random 32x32 crop is a random shift
    -> `AugmentedBatches`: per epoch a fresh `torch.randperm`, per batch crop + flip + cutout.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from cifar_speedrun import storage
from cifar_speedrun.errors import UserError

# CIFAR-10's official label order (torchvision.datasets.CIFAR10.classes); alphabetical, so an
# ImageFolder of these class names gets the official indices.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# Per-channel mean / std of the official CIFAR-10 train set on the 0-255 scale, as in Page's
# cifar10-fast (utils.py: cifar10_mean = (0.4914, 0.4822, 0.4465), cifar10_std = (0.2471, 0.2435, 0.2616),
# times 255).
PAGE_MEAN = (125.31, 122.95, 113.87)
PAGE_STD = (62.99, 62.09, 66.70)
# Decoding 60,000 JPEGs takes ~30 s: say how far it is, a line every this many images.
PROGRESS_EVERY = 10_000
# Bump when the cache file layout changes, so old caches are rebuilt instead of misread.
CACHE_FORMAT = 1


@dataclass
class Cifar10Uint8:
    """The dataset as decoded once: uint8 images (N, 3, 32, 32) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source_id: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "source_id": self.source_id,
            "train_x": self.train_x,
            "train_y": self.train_y,
            "test_x": self.test_x,
            "test_y": self.test_y,
        }


# ----------------------------------------------------------------------------------------------------
# Loading: source -> uint8 tensors, with a cache keyed by the source's identity
# ----------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# What torchvision's ImageFolder accepts as images; anything else in a class folder is skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Files that file managers leave in folders (macOS, Windows): never images, skipped silently but counted.
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")


@dataclass
class SkippedFiles:
    """What a split folder held besides images: system/hidden/non-image files, and links that lead nowhere."""

    other: int = 0
    broken_links: int = 0

    def describe(self) -> str:
        parts = []
        if self.other:
            parts.append(f"{self.other} hidden or non-image files (.DS_Store, Thumbs.db, ._*, ...)")
        if self.broken_links:
            parts.append(f"{self.broken_links} broken or looping symlinks")
        return " and ".join(parts)


def image_files(split_dir: Path) -> tuple[list[list[Path]], SkippedFiles]:
    """The image files of each CIFAR-10 class folder under `split_dir` (sorted), and what was skipped.

    Hidden files (`.DS_Store`, macOS's `._*`), `Thumbs.db`/`desktop.ini` and files without an image
    extension are skipped, as ImageFolder does; symlinked folders and files are followed, and links
    that lead nowhere (dangling, or a loop) are skipped and counted. A class folder without images is
    refused: training on 9 classes would report a number for the wrong task.
    """
    per_class: list[list[Path]] = []
    skipped = SkippedFiles()
    for name in CIFAR10_CLASSES:
        files = []
        for entry in sorted((split_dir / name).iterdir()):
            if entry.is_symlink() and not entry.exists():  # dangling, or a loop (exists() is False for both)
                skipped.broken_links += 1
                continue
            if not entry.is_file():
                continue
            lower = entry.name.lower()
            if entry.name.startswith(".") or lower in _SYSTEM_FILES or not lower.endswith(IMAGE_EXTENSIONS):
                skipped.other += 1
                continue
            files.append(entry)
        if not files:
            raise UserError(f"class folder {split_dir / name} holds no images: a CIFAR-10 dataset needs images of "
                            "all 10 classes in train/ and test/")
        per_class.append(files)
    return per_class, skipped


def _directory_fingerprint(path: Path) -> str:
    """A digest of exactly the bytes the decoder will read: every image of both splits, by relative path.

    Reading them (60,000 small files) takes about a second with a warm page cache; names, sizes and
    times alone would let two folders that differ only behind symlinks share one cache.
    """
    digest = hashlib.blake2b(digest_size=32)
    for split in ("train", "test"):
        split_dir = path / split
        if not split_dir.is_dir():
            raise UserError(f"{split_dir} is missing: an image_folder dataset needs train/<class>/* and "
                            "test/<class>/* (torchvision ImageFolder layout)")
        _check_classes(split_dir)
        per_class, _ = image_files(split_dir)
        for files in per_class:
            for file in files:
                data = file.read_bytes()
                digest.update(f"{split}/{file.parent.name}/{file.name}|{len(data)}\n".encode())
                digest.update(data)
    return digest.hexdigest()


def source_identity(source: str, path: str | None) -> str:
    """A short key naming exactly which data a cache file holds."""
    if source == "torchvision":
        # The official release is one fixed file (torchvision checks its md5), wherever it is stored.
        return "torchvision-official"
    if source == "image_folder":
        location = _existing_image_folder(path)
        if location.is_file():
            from cifar_speedrun.archive import check_archive_size

            check_archive_size(location)
        fingerprint = _sha256_file(location) if location.is_file() else _directory_fingerprint(location)
        return f"image_folder-{fingerprint[:16]}"
    raise UserError(f"data.source={source!r} is not a data source; use data.source=torchvision or image_folder")


def _existing_image_folder(path: str | None) -> Path:
    if not path:
        raise UserError(
            "data.source=image_folder needs data.path: set data.path=/path/to/cifar10.tar.gz "
            "(or a folder with train/ and test/), or export CIFAR10_ARCHIVE"
        )
    location = Path(os.path.expanduser(str(path)))
    if not location.exists():
        raise UserError(
            f"CIFAR-10 not found at data.path={location}: point data.path (or CIFAR10_ARCHIVE) at a .tar.gz "
            "or folder holding train/<class>/* and test/<class>/*"
        )
    return location


def _load_torchvision(root: str) -> dict[str, np.ndarray]:
    from torchvision.datasets import CIFAR10

    try:
        splits = {split: CIFAR10(root, train=(split == "train"), download=True) for split in ("train", "test")}
    except Exception as error:  # network errors, md5 mismatch, unwritable root: all need the same advice
        raise UserError(
            f"could not get CIFAR-10 into data.root={root} ({type(error).__name__}: {error}); check the "
            "network and that the folder is writable, or use data.source=image_folder data.path=<archive>"
        ) from error
    out: dict[str, np.ndarray] = {}
    for split, dataset in splits.items():
        out[f"{split}_x"] = np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        out[f"{split}_y"] = np.asarray(dataset.targets, dtype=np.int64)
    return out


def _check_classes(split_dir: Path) -> None:
    classes = tuple(sorted(entry.name for entry in split_dir.iterdir()
                           if entry.is_dir() and not entry.name.startswith(".")))
    if classes != CIFAR10_CLASSES:
        raise UserError(
            f"{split_dir} has class folders {list(classes)}, expected CIFAR-10's 10 classes "
            f"{list(CIFAR10_CLASSES)}: fix the folder names"
        )


def _decode_image_split(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    if not split_dir.is_dir():
        raise UserError(
            f"{split_dir} is missing: an image_folder dataset needs train/<class>/* and test/<class>/* "
            "(torchvision ImageFolder layout)"
        )
    _check_classes(split_dir)
    images: list[np.ndarray] = []
    labels: list[int] = []
    per_class, skipped = image_files(split_dir)
    if skipped.describe():
        print(f"[data] {split_dir.name}: skipped {skipped.describe()}, as torchvision's ImageFolder does",
              flush=True)
    total, start = sum(len(files) for files in per_class), time.perf_counter()
    for label, files in enumerate(per_class):
        for file in files:
            if len(images) % PROGRESS_EVERY == 0 and len(images):
                print(f"[data] decoding {split_dir.name}: {len(images):,} / {total:,} images "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            try:
                with Image.open(io.BytesIO(file.read_bytes())) as image:
                    if image.mode != "RGB" or image.size != (32, 32):  # from the header, before any decoding
                        raise UserError(
                            f"{file} is a {image.size[0]}x{image.size[1]} {image.mode} image; CIFAR-10 "
                            "images must be 32x32 RGB: replace the file or re-extract the dataset"
                        )
                    image.load()
                    images.append(np.asarray(image, dtype=np.uint8))
            except Image.DecompressionBombError as error:  # a header claiming billions of pixels
                raise UserError(f"{file} claims to be a huge image ({error}); CIFAR-10 images are 32x32: replace "
                                "the file") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
                raise UserError(
                    f"corrupt image {file} ({error}); re-create the dataset archive or delete the file"
                ) from None
            labels.append(label)
    if not images:
        raise UserError(f"{split_dir} holds no images")
    stacked = np.stack(images).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return np.ascontiguousarray(stacked), np.asarray(labels, dtype=np.int64)


def _load_image_folder(path: str, scratch_dir: Path) -> dict[str, np.ndarray]:
    """Decode a folder, or an archive extracted (safely) into a scratch folder that is always removed.

    The scratch folder is named `extract-<host>-<pid>-*`, so one left by a killed run is removed by the
    next (storage.remove_stale); an interruption or error here removes it at once.
    """
    location = _existing_image_folder(path)
    cleanup: Path | None = None
    try:
        if location.is_dir():
            top = location
        else:
            from cifar_speedrun.archive import safe_extract

            try:
                scratch_dir.mkdir(parents=True, exist_ok=True)
                storage.remove_stale(str(scratch_dir))
                cleanup = Path(tempfile.mkdtemp(prefix=f"extract-{storage.temp_tag()}", dir=scratch_dir))
                print(f"[data] first use of {location.name}: extracting and decoding it once into a uint8 cache",
                      flush=True)
                top = safe_extract(location, cleanup)  # the folder holding train/ and test/
            except OSError as error:
                named = storage.path_error(error, str(scratch_dir / "extract"))
                if named is None:
                    raise
                raise named from error
        try:
            train_x, train_y = _decode_image_split(top / "train")
            test_x, test_y = _decode_image_split(top / "test")
        except UserError as error:
            if cleanup is None:
                raise
            # Name places inside the archive, not the scratch folder, which is gone once this returns.
            raise UserError(str(error).replace(f"{cleanup}{os.sep}", f"{location.name}:").replace(
                str(cleanup), location.name)) from None
    finally:
        if cleanup is not None:
            from cifar_speedrun.interrupts import deferred

            with deferred():  # a second signal must not stop the removal halfway
                shutil.rmtree(cleanup, ignore_errors=True)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def cache_file(cache_dir: str, source_id: str) -> str:
    return storage.join(cache_dir, f"cifar10-{source_id}-v{CACHE_FORMAT}.pt")


def load_cifar10_uint8(
    source: str, root: str | None, path: str | None, cache_dir: str, verbose: bool = True
) -> Cifar10Uint8:
    """The whole dataset as uint8 tensors, decoded at most once per source and cache directory.

    A second call reads one `torch.save` file instead of re-parsing pickles or re-decoding 60k JPEGs.
    The cache is written to a temporary name and renamed, so an interrupted run leaves no broken file.
    """
    storage.remove_stale(cache_dir)  # temp files and extraction folders of runs that were killed
    source_id = source_identity(source, path)
    target = cache_file(cache_dir, source_id)
    start = time.perf_counter()
    if storage.exists(target):
        try:
            blob = storage.load_tensors(target)
            if blob.get("format") == CACHE_FORMAT and blob.get("source_id") == source_id:
                data = Cifar10Uint8(**{k: blob[k] for k in ("train_x", "train_y", "test_x", "test_y")},
                                    source_id=source_id)
                if verbose:
                    print(f"[data] loaded cached CIFAR-10 ({source_id}) from {target} "
                          f"in {time.perf_counter() - start:.2f}s")
                return data
        except Exception as error:  # a truncated or foreign file: rebuild it rather than fail
            print(f"[data] ignoring unreadable cache {target} ({type(error).__name__}); rebuilding it")
    if source == "torchvision":
        arrays = _load_torchvision(str(root))
    else:
        scratch = Path(os.path.expanduser(cache_dir)) if storage.is_local(cache_dir) else Path(tempfile.gettempdir())
        arrays = _load_image_folder(str(path), scratch)
    data = Cifar10Uint8(
        train_x=torch.from_numpy(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"]),
        test_x=torch.from_numpy(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"]),
        source_id=source_id,
    )
    _check_shapes(data)
    storage.save_tensors_atomic(data.as_dict(), target)
    if verbose:
        print(f"[data] decoded CIFAR-10 ({source_id}) in {time.perf_counter() - start:.2f}s; cached at {target}")
    return data


def _check_shapes(data: Cifar10Uint8) -> None:
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32) or len(x) != len(y):
            raise UserError(f"CIFAR-10 {split} split has shape {tuple(x.shape)}; expected (N, 3, 32, 32) uint8")
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise UserError(f"CIFAR-10 {split} labels fall outside 0..9: the dataset is not CIFAR-10")


def select_subset(labels: torch.Tensor, size: int, mode: str = "per_class", seed: int = 0,
                  key: str = "data.subset") -> torch.Tensor:
    """Indices of a subset: the first size/10 images of each class, or a seeded sample.

    `per_class` keeps the classes balanced, which matters for tiny subsets; `random` is a plain
    uniform sample without replacement. `key` names the setting in messages (data.test_subset).
    """
    if size <= 0 or size > len(labels):
        split = "test" if "test" in key else "train"
        raise UserError(f"{key}={size} must be between 1 and {len(labels)} (the {split} set size)")
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(labels), generator=generator)[:size].sort().values
    if mode != "per_class":
        raise UserError(f"data.subset_mode={mode!r} is not known; use per_class or random")
    num_classes = int(labels.max()) + 1
    per_class = [size // num_classes + (1 if c < size % num_classes else 0) for c in range(num_classes)]
    chosen = [torch.nonzero(labels == c).flatten()[:count] for c, count in enumerate(per_class)]
    return torch.cat(chosen).sort().values


# ----------------------------------------------------------------------------------------------------
# Device-side preprocessing and augmentation
# ----------------------------------------------------------------------------------------------------


def standardize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) on the 0-255 scale -> float32, zero mean / unit std per channel."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
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


def cutout(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Like `cutout_`, on a copy."""
    return cutout_(images.clone(), top, left, size)


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
# LightningDataModule
# ----------------------------------------------------------------------------------------------------


class Cifar10DataModule(L.LightningDataModule):
    """Owns the device-resident tensors and hands Lightning the batch iterators."""

    def __init__(
        self,
        source: str = "torchvision",
        root: str | None = None,
        path: str | None = None,
        cache_dir: str = "~/.cache/cifar_speedrun",
        batch_size: int = 512,
        eval_batch_size: int = 1000,
        subset: int | None = None,
        subset_mode: str = "per_class",
        test_subset: int | None = None,
        normalize: str = "page",
        translate: int = 4,
        crop_size: int = 32,
        flip: bool = True,
        flip_mode: str = "random",
        cutout: bool = True,
        cutout_size: int = 8,
        cutout_inside: bool = False,
        half_precision: bool = False,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size is None or int(batch_size) <= 0:
            raise UserError(f"data.batch_size={batch_size} must be a positive integer (Page uses 512)")
        if normalize not in ("page", "computed"):
            raise UserError(f"data.normalize={normalize!r} is not known; use page or computed")
        self.source, self.root, self.path, self.cache_dir = source, root, path, cache_dir
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.subset, self.subset_mode, self.test_subset = subset, subset_mode, test_subset
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
        train_x, train_y = data.train_x, data.train_y
        if self.subset:
            index = select_subset(train_y, int(self.subset), self.subset_mode, self.seed)
            train_x, train_y = train_x[index], train_y[index]
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
                "(no full batch to train on): lower data.batch_size or raise data.subset"
            )
        self._train_batches = AugmentedBatches(
            padded, train_y.to(device), per_rank_batch, self.augment, self.seed, rank, world, self.channels_last,
            self.flip_mode
        )
        self._test = EvalBatches(test, test_y.to(device), self.eval_batch_size, self.channels_last, rank, world)
        if self._pending_state is not None:
            self._train_batches.load_state_dict(self._pending_state)
            self._pending_state = None

    def train_dataloader(self) -> AugmentedBatches:
        assert self._train_batches is not None, "call setup() first"
        return self._train_batches

    def val_dataloader(self) -> EvalBatches:
        return self._test

    def test_dataloader(self) -> EvalBatches:
        return self._test

    @property
    def source_id(self) -> str | None:
        """Which data this is (data.source_identity), once loaded: recorded in checkpoints and model.pt."""
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
