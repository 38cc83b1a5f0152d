"""Device-side batch augmentation vs torchvision's per-image transforms through a DataLoader.

Same augmentation on both sides: random 32x32 crop of the 4-px reflect-padded image, horizontal flip
with p = 0.5, one 8x8 cutout, on standardized images. (a) ours: `augment_batch` on the padded tensor,
a batch at a time; (b) torchvision: RandomCrop(32, padding=4, padding_mode="reflect"),
RandomHorizontalFlip, a cutout transform, per image, in a DataLoader with worker processes.
Prints images/s of each and the ratio a/b. Target on a 2-core CPU: >= 20x.

    python benchmarks/augment_throughput.py [--images 20000] [--batch 512] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import _common
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar_speedrun.operations.sources import load_cifar10_uint8
from cifar_speedrun.recipe.augment import PAGE_MEAN, PAGE_STD, AugmentConfig, augment_batch, pad_reflect, standardize


class Cutout:
    """One size x size square zeroed per image, centre uniform over the image (clipped)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, left = max(cy - self.size // 2, 0), max(cx - self.size // 2, 0)
        image = image.clone()
        image[:, top:cy + self.size // 2, left:cx + self.size // 2] = 0
        return image


class TransformedImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            Cutout(8),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def ours(images: torch.Tensor, batch: int, repeats: int) -> float:
    padded = pad_reflect(images, 4)
    generator = torch.Generator(device=images.device).manual_seed(0)
    config = AugmentConfig()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        order = torch.randperm(len(padded), device=images.device, generator=generator)
        for i in range(0, len(order) - batch + 1, batch):
            augment_batch(padded.index_select(0, order[i:i + batch]), generator, config)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return (len(padded) // batch * batch) / best


def torchvision_loader(images: torch.Tensor, labels: torch.Tensor, batch: int, workers: int,
                       repeats: int) -> float:
    loader = DataLoader(TransformedImages(images, labels), batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    iter(loader)  # start workers outside the clock
    best = float("inf")
    for _ in range(repeats):  # best of `repeats` epochs, the same protocol as ours
        start = time.perf_counter()
        count = sum(len(y) for _, y in loader)
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    _common.keep_large_allocations_off_mmap()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images; the best counts")
    args = parser.parse_args()
    data = load_cifar10_uint8("image_folder", None, _common.archive_path(), "~/.cache/cifar_speedrun", verbose=False)
    images = standardize(data.train_x[: args.images], PAGE_MEAN, PAGE_STD)
    labels = data.train_y[: args.images]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = ours(images.to(device), args.batch, repeats=args.repeats)
    b = torchvision_loader(images, labels, args.batch, args.workers, repeats=args.repeats)
    print(f"augment_throughput: {args.images} images, batch {args.batch}, device {device}: ours {a:,.0f} img/s, "
          f"torchvision DataLoader ({args.workers} workers) {b:,.0f} img/s, ratio a/b = {a / b:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
