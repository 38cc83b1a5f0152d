"""Is a run's test accuracy held back by its BatchNorm running statistics? Re-estimate them and see.

The leave-one-out on the proxy (docs/results.md) has a no-EMA run at 72.31% whose two sibling seeds
score about 80%. This script takes saved models (`<run>/model.pt`), evaluates each on the whole
test set (10,000 images, whatever `data.test_subset` the run had) as saved, then re-estimates every
BN layer's running mean and variance from un-augmented training images (train-mode forward passes
over shuffled batches of `--batch` images, ghost BN split as in training; each layer's statistics
are the plain mean over batches, not a moving average) and evaluates again. A large jump says the
statistics, not the weights, were off; a run with EMA, whose averaged statistics match its averaged
weights, should move less. Both numbers are without TTA, so they sit below a TTA run's own
results.json. Neither the model file nor the run is changed.

    python benchmarks/bn_recalibration.py <run>/model.pt [<run2>/model.pt ...]

It is a diagnostic, not a timing: it prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from _common import archive_path

from cifar_speedrun.operations.sources import load_cifar10_uint8
from cifar_speedrun.records.model_file import load_model


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Eval-mode top-1 accuracy in percent (`net`: the model file's Classifier, which normalizes uint8 images)."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            correct += int((net(images[start:start + batch]).argmax(1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(images)


def recalibrate(net: torch.nn.Module, images: torch.Tensor, batch: int) -> int:
    """Replace each BN layer's running statistics by their mean over the batches of `images`; the layer count.

    Momentum 1/(k+1) at batch k makes PyTorch's running update an exact running mean of the per-batch
    statistics, for the stock BatchNorm and for our ghost BN (which passes its momentum on to its
    per-split statistics); momentum 1 at batch 0 overwrites the saved statistics, so none survive.
    """
    layers = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    net.train()
    with torch.no_grad():
        for k, start in enumerate(range(0, len(images) - batch + 1, batch)):
            for layer in layers:
                layer.momentum = 1.0 / (k + 1)
            net(images[start:start + batch])
    net.eval()
    return len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("models", nargs="+", help="model.pt files written by train.py")
    parser.add_argument("--images", type=int, default=10_000, help="training images to re-estimate from")
    parser.add_argument("--batch", type=int, default=512, help="batch size of the train-mode passes, Page's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle that picks the images")
    parser.add_argument("--source", default="image_folder", help="data.source of the runs")
    parser.add_argument("--path", default=None, help="data.path; None: $CIFAR10_ARCHIVE or ../shared's copy")
    parser.add_argument("--cache-dir", default=os.environ.get("CIFAR_SPEEDRUN_CACHE", "~/.cache/cifar_speedrun"),
                        help="paths.cache_dir, from $CIFAR_SPEEDRUN_CACHE as in conf/paths")
    parser.add_argument("--csv", default=None, help="also write one row per model to this CSV")
    args = parser.parse_args()

    data = load_cifar10_uint8(args.source, "data", args.path or archive_path(), os.path.expanduser(args.cache_dir))
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(args.seed))
    usable = args.images // args.batch * args.batch  # whole batches: ghost BN needs batch % splits == 0
    pick = order[:usable]
    print(f"re-estimating from {usable:,} shuffled training images in batches of {args.batch} (seed {args.seed}); "
          f"test accuracy on all {len(data.test_y):,} test images, without TTA")
    rows: list[dict[str, object]] = []
    for path in args.models:
        model = load_model(path)
        model.tta = {}  # the network alone: the file's own normalization, no test-time augmentation
        before = accuracy(model, data.test_x, data.test_y, args.batch)
        layers = recalibrate(model, data.train_x[pick], args.batch)
        after = accuracy(model, data.test_x, data.test_y, args.batch)
        print(f"{path}: as saved {before:.2f}% -> BN statistics re-estimated {after:.2f}% "
              f"({after - before:+.2f} points, {layers} BN layers)")
        rows.append({"run": path, "tricks": " ".join(model.about.get("tricks") or []),
                     "seed": model.about.get("seed"), "test_acc_as_saved": f"{before:.2f}",
                     "test_acc_bn_reestimated": f"{after:.2f}", "images": usable, "batch": args.batch,
                     "shuffle_seed": args.seed})
    if args.csv:
        with open(args.csv, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
