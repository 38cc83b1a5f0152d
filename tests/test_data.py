"""The data pipeline: loading and caching, standardization, and the device-side augmentation."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cifar_speedrun.errors import UserError
from cifar_speedrun.operations import sources as sources_lib
from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import load_cifar10_uint8, select_subset
from cifar_speedrun.recipe import augment as augment_lib
from cifar_speedrun.recipe.augment import (
    AugmentConfig,
    AugmentedBatches,
    augment_batch,
    crop_flip,
    cutout_,
    pad_reflect,
    standardize,
)


# ---------------------------------------------------------------- augmentation properties
def _padded(batch: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


def test_crop_is_a_window_of_the_padded_image() -> None:
    padded = _padded()
    top = torch.randint(0, 9, (16,))
    left = torch.randint(0, 9, (16,))
    crops = crop_flip(padded, top, left, torch.zeros(16, dtype=torch.bool), 32)
    assert crops.shape == (16, 3, 32, 32)
    for i in range(16):
        t, left_i = int(top[i]), int(left[i])
        assert torch.equal(crops[i], padded[i, :, t:t + 32, left_i:left_i + 32])


def test_random_crops_stay_inside_the_padded_image() -> None:
    # Every pixel of every crop is a pixel of its own padded image, at offsets within 0..8.
    padded = torch.arange(40 * 40, dtype=torch.float32).view(1, 1, 40, 40).repeat(64, 3, 1, 1)
    out = augment_batch(padded, torch.Generator().manual_seed(1), AugmentConfig(flip=False, cutout=False))
    rows, cols = out[:, 0] // 40, out[:, 0] % 40
    assert rows.min() >= 0 and rows.max() <= 39 and cols.min() >= 0 and cols.max() <= 39
    top, left = rows[:, 0, 0], cols[:, 0, 0]
    assert top.max() <= 8 and left.max() <= 8
    assert torch.equal(rows, top[:, None, None] + torch.arange(32)[None, :, None].expand(64, 32, 32))
    assert len(set(top.tolist())) > 1, "offsets are random"


def test_flip_is_a_true_mirror() -> None:
    padded = _padded()
    top = torch.full((16,), 3)
    left = torch.full((16,), 5)
    plain = crop_flip(padded, top, left, torch.zeros(16, dtype=torch.bool), 32)
    flipped = crop_flip(padded, top, left, torch.ones(16, dtype=torch.bool), 32)
    assert torch.equal(flipped, plain.flip(-1))


def test_flip_happens_about_half_the_time() -> None:
    padded = torch.arange(40, dtype=torch.float32).view(1, 1, 1, 40).expand(2000, 3, 40, 40).contiguous()
    out = augment_batch(padded, torch.Generator().manual_seed(2), AugmentConfig(cutout=False))
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).float().mean().item()
    assert 0.45 < flipped < 0.55


@pytest.mark.parametrize("top,left", [(10, 12), (-3, 5), (28, 29), (-7, -7), (0, 24)])
def test_cutout_zeroes_exactly_the_clipped_square(top: int, left: int) -> None:
    images = torch.randn(1, 3, 32, 32).abs() + 1  # no zeros to start with
    out = cutout_(images.clone(), torch.tensor([top]), torch.tensor([left]), 8)
    expected = images.clone()
    expected[:, :, max(top, 0):max(top + 8, 0), max(left, 0):max(left + 8, 0)] = 0
    assert torch.equal(out, expected)


def test_cutout_square_may_leave_the_image_and_is_clipped() -> None:
    images = torch.ones(4000, 3, 32, 32)
    padded = pad_reflect(images, 4)
    out = augment_batch(padded, torch.Generator().manual_seed(3), AugmentConfig())
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 64 and zeros.min() < 64  # full squares inside, clipped ones at the border
    assert (zeros > 0).all()  # the centre is always inside: every image loses something
    inside = augment_batch(padded, torch.Generator().manual_seed(3), AugmentConfig(cutout_inside=True))
    assert ((inside[:, 0] == 0).sum(dim=(1, 2)) == 64).all()


def test_same_seed_same_batches_and_new_order_each_epoch() -> None:
    images = pad_reflect(torch.randn(256, 3, 32, 32), 4)
    labels = torch.arange(256)

    def epochs(seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        batches = AugmentedBatches(images, labels, 64, AugmentConfig(), seed)
        return [list(batches) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    for (x1, y1), (x2, y2) in zip(first[0] + first[1], again[0] + again[1], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0][1], other[0][0][1])
    assert not torch.equal(first[0][0][1], first[1][0][1]), "a fresh permutation each epoch"


def test_drop_last_and_len() -> None:
    batches = AugmentedBatches(pad_reflect(torch.randn(300, 3, 32, 32), 4), torch.arange(300), 64,
                               AugmentConfig(), 0)
    out = list(batches)
    assert len(batches) == 4 == len(out)
    assert all(len(y) == 64 for _, y in out)
    seen = torch.cat([y for _, y in out])
    assert len(set(seen.tolist())) == 256, "no image twice within an epoch"


# ---------------------------------------------------------------- real data: load, cache, standardize
def test_real_data_shapes_and_labels(real_data) -> None:
    assert real_data.train_x.shape == (50_000, 3, 32, 32) and real_data.train_x.dtype == torch.uint8
    assert real_data.test_x.shape == (10_000, 3, 32, 32)
    assert torch.equal(torch.bincount(real_data.train_y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(real_data.test_y), torch.full((10,), 1000))


def test_standardized_train_set_has_zero_mean_unit_std(real_data) -> None:
    x = standardize(real_data.train_x, augment_lib.PAGE_MEAN, augment_lib.PAGE_STD)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    # Page's statistics are the official release's; this JPEG copy differs by < 1% (shared/README.md).
    assert torch.allclose(mean, torch.zeros(3), atol=0.01), mean
    assert torch.allclose(std, torch.ones(3), atol=0.02), std
    own_mean, own_std = augment_lib.channel_stats(real_data.train_x)
    x = standardize(real_data.train_x, own_mean, own_std)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_second_load_reads_the_cache_not_the_images(real_data, archive, cache_dir, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(sources_lib, "_load_image_folder", fail)
    again = load_cifar10_uint8("image_folder", None, archive, cache_dir)
    assert torch.equal(again.train_x[:100], real_data.train_x[:100])
    assert not [name for name in os.listdir(cache_dir) if ".tmp-" in name], "no temporary files left"


def test_datamodule_setup_pads_and_subsets(archive, cache_dir, real_data, compose_cfg) -> None:
    dm = instantiate(compose_cfg("data.source=image_folder", f"data.path={archive}", f"paths.cache_dir={cache_dir}",
                                 "data.batch_size=100", "data.subset=1000", "data.test_subset=200").data)
    dm.setup("fit")
    batches = dm.train_dataloader()
    assert len(batches) == 10 and batches.images.shape == (1000, 3, 40, 40)
    assert torch.equal(torch.bincount(batches.labels), torch.full((10,), 100))
    x, y = next(iter(batches))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
    assert sum(len(y) for _, y in dm.val_dataloader()) == 200


def test_subset_modes() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    per_class = select_subset(labels, 100)
    assert torch.equal(torch.bincount(labels[per_class]), torch.full((10,), 10))
    assert torch.equal(per_class[:10], torch.arange(10))  # the first of each class
    random = select_subset(labels, 100, "random", seed=0)
    assert len(random) == 100 and torch.equal(random, select_subset(labels, 100, "random", seed=0))
    assert not torch.equal(random, select_subset(labels, 100, "random", seed=1))
    with pytest.raises(UserError):
        select_subset(labels, 0)


# ---------------------------------------------------------------- bad data gives one clear line
def _image_folder(root: Path, classes=CIFAR10_CLASSES, size=(32, 32), mode="RGB", per_class=2) -> Path:
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new(mode, size, color=i * 40).save(folder / f"{i}.png")
    return root


def test_small_image_folder_and_archive_load(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "cifar")
    loaded = load_cifar10_uint8("image_folder", None, str(folder), str(tmp_path / "cache"))
    assert loaded.train_x.shape == (20, 3, 32, 32) and loaded.train_y.tolist() == sorted(loaded.train_y.tolist())
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar10")  # one top-level folder inside, as archives often have
    from_archive = load_cifar10_uint8("image_folder", None, str(archive), str(tmp_path / "cache2"))
    assert torch.equal(from_archive.train_x, loaded.train_x)
    assert not [p for p in (tmp_path / "cache2").iterdir() if p.is_dir()], "extracted files cleaned up"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: root / "missing.tar.gz", "not found"),
        (lambda root: _image_folder(root / "c", classes=CIFAR10_CLASSES[:9]), "expected CIFAR-10's 10 classes"),
        (lambda root: _image_folder(root / "c", size=(28, 28)), "must be 32x32 RGB"),
        (lambda root: _image_folder(root / "c", mode="L"), "must be 32x32 RGB"),
    ],
)
def test_bad_dataset_is_one_clear_line(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(UserError) as info:
        load_cifar10_uint8("image_folder", None, str(make(tmp_path)), str(tmp_path / "cache"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_corrupt_image_and_archive(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "c")
    (folder / "train" / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="corrupt image"):
        load_cifar10_uint8("image_folder", None, str(folder), str(tmp_path / "cache"))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="could not extract"):
        load_cifar10_uint8("image_folder", None, str(bad), str(tmp_path / "cache"))


def test_unreadable_cache_is_rebuilt(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "c")
    cache = tmp_path / "cache"
    first = load_cifar10_uint8("image_folder", None, str(folder), str(cache))
    (cache_file := next(cache.glob("*.pt"))).write_bytes(b"truncated")
    again = load_cifar10_uint8("image_folder", None, str(folder), str(cache))
    assert torch.equal(first.train_x, again.train_x) and cache_file.stat().st_size > 100


def test_torchvision_source_without_network_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(UserError, match="data.source=image_folder"):
        load_cifar10_uint8("torchvision", str(tmp_path), None, str(tmp_path / "cache"))


