"""CIFAR-10 from its source to uint8 tensors: torchvision's pickles or an ImageFolder (folder or archive),
decoded once and cached per source in `cache_dir`; the class-balanced subsets of it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_speedrun.errors import UserError
from cifar_speedrun.operations import storage
from cifar_speedrun.operations.layout import CIFAR10_CLASSES, IMAGE_EXTENSIONS

# Decoding 60,000 JPEGs takes ~30 s: say how far it is, a line every this many images.
PROGRESS_EVERY = 10_000
# Bump when the cache file layout changes, so old caches are rebuilt instead of misread. 2: each split's
# shapes, dtypes and sha256 are stored beside its tensors and checked on every load.
CACHE_FORMAT = 2
SPLIT_TENSORS = ("train_x", "train_y", "test_x", "test_y")


@dataclass
class Cifar10Uint8:
    """The dataset as decoded once: uint8 images (N, 3, 32, 32) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source_id: str

    def as_dict(self) -> dict[str, Any]:
        """What the cache file holds: the tensors, and what they must be (shapes, dtypes, checksums).

        torch.load does not check the zip's CRCs, so a cache rewritten by hand or damaged on disk
        would load as if it were right; the stored description lets every load prove its content.
        """
        tensors = {key: getattr(self, key) for key in SPLIT_TENSORS}
        return {
            "format": CACHE_FORMAT,
            "source_id": self.source_id,
            **tensors,
            "shapes": {key: list(value.shape) for key, value in tensors.items()},
            "dtypes": {key: str(value.dtype) for key, value in tensors.items()},
            "sha256": {split: split_checksum(tensors[f"{split}_x"], tensors[f"{split}_y"])
                       for split in ("train", "test")},
        }


def split_checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 over one split's images and labels as stored (shape, dtype and bytes): ~0.3 s for CIFAR-10.

    Shapes and dtypes are hashed too, so the same bytes read as another layout do not match.
    """
    digest = hashlib.sha256()
    for tensor in (images, labels):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype.str}{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def cache_problem(blob: Any, source_id: str) -> str | None:
    """Why a loaded cache file must not be used (a few words, one line), or None when it proves its content.

    Checked in order of cost: the layout version and source, each tensor's type, dtype and shape (against
    CIFAR's (N, 3, 32, 32) uint8 images and N int64 labels, and against the shapes stored when it was
    written), the label range 0..9, then each split's sha256. Without this a cache whose labels were
    rewritten trains on wrong labels without a word, and one of the wrong shape fails deep in training.
    """
    if not isinstance(blob, dict):
        return f"it holds a {type(blob).__name__}, not a cache"
    if blob.get("format") != CACHE_FORMAT:
        return f"its layout is format {blob.get('format')!r}, not {CACHE_FORMAT}"
    if blob.get("source_id") != source_id:
        return f"it holds {blob.get('source_id')!r}, not {source_id}"
    shapes, dtypes, sums = blob.get("shapes"), blob.get("dtypes"), blob.get("sha256")
    if not (isinstance(shapes, dict) and isinstance(dtypes, dict) and isinstance(sums, dict)):
        return "it records no shapes, dtypes or checksums (written before they were kept)"
    expected_dtype = {"x": torch.uint8, "y": torch.int64}
    for key in SPLIT_TENSORS:
        value = blob.get(key)
        if not isinstance(value, torch.Tensor):
            return f"{key} is {type(value).__name__}, not a tensor"
        if value.dtype != expected_dtype[key[-1]] or str(value.dtype) != dtypes.get(key):
            return f"{key} is {value.dtype}, expected {expected_dtype[key[-1]]} (recorded {dtypes.get(key)})"
        if list(value.shape) != shapes.get(key):
            return f"{key} has shape {tuple(value.shape)}, recorded {shapes.get(key)}"
    for split in ("train", "test"):
        x, y = blob[f"{split}_x"], blob[f"{split}_y"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32) or y.ndim != 1 or len(x) != len(y) or not len(y):
            return (f"{split} has images {tuple(x.shape)} and labels {tuple(y.shape)}; expected (N, 3, 32, 32) "
                    "and (N,)")
        if int(y.min()) < 0 or int(y.max()) > 9:
            return f"{split} labels fall outside 0..9 ({int(y.min())}..{int(y.max())})"
    for split in ("train", "test"):
        if split_checksum(blob[f"{split}_x"], blob[f"{split}_y"]) != sums.get(split):
            return f"the {split} images or labels do not match their sha256"
    return None


# The held-out validation images are a function of the training labels and data.val_split alone: the same
# in every run (any seed, data.subset, data.subset_mode), so runs are compared on the same images and no
# run trains on another run's validation images. This seed only picks them.
VALIDATION_SEED = 20240611


def validation_split(labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest, validation): indices into the whole training set; `size` images held out, size/10 of each
    class, drawn uniformly within each class with a fixed seed (`VALIDATION_SEED`), both sorted.

    Class-balanced so a small split still measures every class; fixed by the data alone so a
    hyperparameter search judges every trial on the same images. Called on all the training labels,
    before any subset is drawn (`split_training_set`): the subset comes from the rest.
    """
    if size >= len(labels):
        raise UserError(f"data.val_split={size} would hold out all {len(labels)} training images: use fewer "
                        "(e.g. data.val_split=5000 of 50,000)")
    num_classes = int(labels.max()) + 1
    per_class = [size // num_classes + (1 if c < size % num_classes else 0) for c in range(num_classes)]
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    held = []
    for c, count in enumerate(per_class):
        members = torch.nonzero(labels == c).flatten()
        if count >= len(members):
            raise UserError(f"data.val_split={size} asks {count} images of class {c}, which has {len(members)} "
                            "training images: lower data.val_split")
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    validation = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[validation] = False
    return torch.nonzero(keep).flatten(), validation


def split_training_set(labels: torch.Tensor, subset: int | None, subset_mode: str, seed: int,
                       val_split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation): indices into the whole training set for one run.

    The validation images are held out of all the training images first (`validation_split`: fixed by
    the data), then `data.subset` images are drawn from the rest (per class or seeded), so no run's
    training images are any run's validation images. Without data.val_split the validation is empty.
    """
    rest, validation = (validation_split(labels, val_split) if val_split
                        else (torch.arange(len(labels)), torch.empty(0, dtype=torch.long)))
    if subset:
        if val_split and not 0 < subset <= len(rest):
            raise UserError(f"data.subset={subset} must be between 1 and {len(rest)} (the training images left "
                            f"after data.val_split={val_split}): lower data.subset or data.val_split")
        rest = rest[select_subset(labels[rest], int(subset), subset_mode, seed)]
    return rest, validation


# ----------------------------------------------------------------------------------------------------
# Loading: source -> uint8 tensors, with a cache keyed by the source's identity
# ----------------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# An archive's digest per (path, inode, size, mtime): resume checks the data before training and the data
# module hashes it again; the second time costs nothing. Folders are read again (their files may change).
_ARCHIVE_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _archive_digest(location: Path) -> str:
    info = location.stat()
    key = (str(location.resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _ARCHIVE_DIGESTS:
        _ARCHIVE_DIGESTS[key] = _sha256_file(location)
    return _ARCHIVE_DIGESTS[key]


def source_identity(source: str, path: str | None) -> str:
    """A short key naming exactly which data a cache file holds, from the content, not the path: a copy of
    an archive elsewhere is the same data; another archive at the same path is not. Checkpoints record it,
    so a resume on other data is refused (records/resume.py)."""
    if source == "torchvision":
        # The official release is one fixed file (torchvision checks its md5), wherever it is stored.
        return "torchvision-official"
    if source == "image_folder":
        location = _existing_image_folder(path)
        if location.is_file():
            from cifar_speedrun.operations.archive import check_archive_size

            check_archive_size(location)
        fingerprint = _archive_digest(location) if location.is_file() else _directory_fingerprint(location)
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
            from cifar_speedrun.operations.archive import safe_extract

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
            from cifar_speedrun.operations.interrupts import deferred

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
            problem = cache_problem(blob, source_id)
        except Exception as error:  # a truncated or foreign file: rebuild it rather than fail
            problem = f"unreadable: {type(error).__name__}"
        if problem is None:
            data = Cifar10Uint8(**{key: blob[key] for key in SPLIT_TENSORS}, source_id=source_id)
            if verbose:
                print(f"[data] loaded cached CIFAR-10 ({source_id}) from {target}, checked "
                      f"in {time.perf_counter() - start:.2f}s")
            return data
        # The cache is derived data: rebuilding it from the source is always right, and says so.
        print(f"[data] cache {target} is corrupt ({problem}): rebuilding it from the source", flush=True)
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
