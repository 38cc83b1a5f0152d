"""Keller Jordan's `airbench` package (PyPI 0.1.8) as the peer: run on the same GPU and the same images.

The project's airbench94 recipe is a re-implementation; the peer is the original, unmodified, so a
ratio of times (and a difference of accuracies) says what the project's structure (Lightning, Hydra,
callbacks, switches) costs against the author's own code on the same machine. To be a fair peer it
must train on exactly the images the project trains on: those come from the project's own decoded
uint8 cache (here the lossy JPEG copy of CIFAR-10), written in airbench's file layout, so both sides
read the same pixels and labels and neither downloads anything.

airbench's `train94()` reads `cifar10/train.pt` and `cifar10/test.pt` relative to the working
directory, returns only the model and prints a table; its last row (epoch `eval`) holds the TTA test
accuracy and airbench's own timer (whitening init + training + the final TTA evaluation, CUDA events).
So a run here changes into the export folder, captures what airbench prints, and parses that row.

    python benchmarks/airbench_peer.py --export DIR [--official] [--no-check]

writes DIR/cifar10/{train,test}.pt from $CIFAR10_ARCHIVE (through the project's cache,
$CIFAR_SPEEDRUN_CACHE) and checks them with airbench's own CifarLoader on the CPU. Training needs
CUDA; `benchmarks/gpu_speedrun.py --peer` runs the peer side by side with the project.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import _common
import torch

from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import Cifar10Uint8, load_cifar10_uint8

PACKAGE = "airbench"
VERSION = "0.1.8"
INSTALL_HINT = "pip install airbench==0.1.8 (or pip install -e '.[bench]')"
# train94() builds its loaders with this relative path, so the files must sit in <folder>/cifar10/.
DATA_FOLDER = "cifar10"
# airbench's table (utils.logging_columns_list, stripped); its header names the columns when present.
COLUMNS = ("run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")
# The seed of the full warm-up run, as the project's warm-up runs use seed=1000: not one of the reported seeds.
WARMUP_SEED = 1000


class PeerUnavailable(ImportError):
    """airbench is not importable: the message says how to install it."""


class PeerOutputError(ValueError):
    """airbench's printed table could not be read; the message holds the captured text."""


def require_airbench() -> ModuleType:
    """Import airbench, or fail with one line naming the install command.

    Importing airbench sets `torch.backends.cudnn.benchmark = True` for the whole process (each
    lib_airbench9x module does it at import); the flag is put back, so importing the peer changes
    nothing for the project's runs. The peer's own runs turn it on (see `_cudnn_benchmark`).
    """
    flag = torch.backends.cudnn.benchmark
    try:
        import airbench
    except ImportError as error:
        raise PeerUnavailable(f"--peer needs the airbench package, which is not installed: {INSTALL_HINT}") from error
    finally:
        torch.backends.cudnn.benchmark = flag
    return airbench


def airbench_version() -> str:
    """The installed airbench's version (its distribution metadata; the package has no __version__)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return getattr(require_airbench(), "__version__", "unknown")


# ------------------------------------------------------------------------------------------------ data


def load_project_data(overrides: list[str], scratch_dir: str | None = None) -> Cifar10Uint8:
    """The decoded uint8 CIFAR-10 the project's runs with these overrides read (the same cache file).

    The location is composed through the project's own config (data.source, data.root, data.path,
    data.cache_dir, i.e. $CIFAR10_ARCHIVE and $CIFAR_SPEEDRUN_CACHE), as evaluate.py does, so the
    peer cannot end up on other data than the project's runs.
    """
    cfg = _common.compose_config(overrides, output_dir=scratch_dir or os.getcwd())
    data_cfg = cfg.data
    return load_cifar10_uint8(str(data_cfg.source), data_cfg.root, data_cfg.path, str(data_cfg.cache_dir))


def _airbench_blob(images: torch.Tensor, labels: torch.Tensor, split: str) -> dict[str, Any]:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"{split} images have shape {tuple(images.shape)} {images.dtype}; expected (N, 3, 32, 32) "
                         "uint8")
    if len(images) != len(labels) or int(labels.min()) < 0 or int(labels.max()) >= len(CIFAR10_CLASSES):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels, or labels outside 0..9")
    # NHWC, as torchvision's CIFAR10.data and airbench's downloaded files are; contiguous, so the file
    # holds exactly these bytes; labels int64 (a clone: never a view of a larger storage).
    return {"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels.to(torch.int64).clone(),
            "classes": list(CIFAR10_CLASSES)}


def export_uint8(data: Cifar10Uint8, folder: str | os.PathLike[str]) -> Path:
    """Write `<folder>/cifar10/train.pt` and `test.pt` in airbench's layout; return `<folder>/cifar10`.

    Each file is written to a temporary name and renamed: CifarLoader downloads only when a file is
    missing and would fail on a truncated one, so a killed export must leave nothing half-written.
    """
    target = Path(folder) / DATA_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        blob = _airbench_blob(getattr(data, f"{split}_x"), getattr(data, f"{split}_y"), split)
        temporary = target / f".{split}.pt.tmp-{os.getpid()}"
        torch.save(blob, temporary)
        os.replace(temporary, target / f"{split}.pt")
    return target


def _require_files(folder: Path) -> Path:
    """Fail here rather than let CifarLoader start a download (which a GPU machine cannot do)."""
    target = folder / DATA_FOLDER
    missing = [name for name in ("train.pt", "test.pt") if not (target / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{target} lacks {', '.join(missing)}: export the data first (export_uint8)")
    return target


def check_with_airbench_loader(folder: str | os.PathLike[str], data: Cifar10Uint8, every: int = 50) -> dict[str, Any]:
    """Read the export back with airbench's own CifarLoader on the CPU and compare it with `data`.

    CifarLoader is what train94 reads with, so this checks the files as the peer sees them: length,
    labels, classes, and every `every`-th image (CifarLoader keeps images as fp16 x/255 in NCHW;
    x/255 in fp16 times 255 is within 0.07 of x for every uint8 x, so rounding gives x back exactly).
    """
    airbench = require_airbench()
    target = _require_files(Path(folder))
    counts: dict[str, Any] = {}
    for split, train in (("train", True), ("test", False)):
        loader = airbench.CifarLoader(str(target), train=train, gpu="cpu")
        images, labels = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        problems = []
        if len(loader.images) != len(labels):
            problems.append(f"{len(loader.images)} images, expected {len(labels)}")
        elif not torch.equal(loader.labels, labels.to(torch.int64)):
            problems.append("labels differ")
        elif not torch.equal((loader.images[::every].float() * 255).round().to(torch.uint8), images[::every]):
            problems.append("images differ")
        if list(loader.classes) != list(CIFAR10_CLASSES):
            problems.append(f"classes {list(loader.classes)}")
        if problems:
            raise RuntimeError(f"airbench's CifarLoader reads {target / (split + '.pt')} wrongly: "
                               + "; ".join(problems))
        counts[split] = len(loader.images)
    counts["classes"] = list(CIFAR10_CLASSES)
    return counts


# --------------------------------------------------------------------------------------------- parsing


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of airbench's printed table(s), each as {column: cell text} (blank cells are '').

    Lines that are not table rows (rules of dashes, anything else printed) are skipped; a header row
    names the columns for the rows after it, so a reordered table is still read right.
    """
    columns: tuple[str, ...] = COLUMNS
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if len(line) < 2 or not (line.startswith("|") and line.endswith("|")):
            continue
        cells = tuple(cell.strip() for cell in line[1:-1].split("|"))
        if "epoch" in cells and "tta_val_acc" in cells:
            columns = cells
            continue
        if len(cells) == len(columns):
            rows.append(dict(zip(columns, cells, strict=True)))
    return rows


def parse_result(text: str) -> dict[str, Any]:
    """The last run's final row: {"tta_val_acc", "total_seconds", "val_acc" (last epoch, no TTA), "epochs"}.

    Raises PeerOutputError, with the whole text, when there is no `eval` row or its numbers do not
    read: a silent zero would enter the comparison as a measurement.
    """
    rows = parse_table(text)
    finals = [i for i, row in enumerate(rows) if row.get("epoch") == "eval"]
    if not finals:
        raise PeerOutputError(f"no final 'eval' row in airbench's output:\n{text}")
    last = finals[-1]
    row = rows[last]
    try:
        tta_val_acc = float(row["tta_val_acc"])
        total_seconds = float(row["total_time_seconds"])
    except (KeyError, ValueError) as error:
        raise PeerOutputError(f"airbench's 'eval' row {row} lacks tta_val_acc or total_time_seconds:\n"
                              f"{text}") from error
    if not (0.0 <= tta_val_acc <= 1.0 and total_seconds > 0):
        raise PeerOutputError(f"airbench's 'eval' row {row} is out of range:\n{text}")
    first = finals[-2] + 1 if len(finals) > 1 else 0
    epoch_rows = [r for r in rows[first:last] if r.get("epoch", "").isdigit()]
    # train() prints the eval row from its locals(), which still hold the last epoch's val_acc; take
    # the last epoch row's otherwise.
    val_text = row.get("val_acc") or next((r["val_acc"] for r in reversed(epoch_rows) if r.get("val_acc")), "")
    return {"tta_val_acc": tta_val_acc, "total_seconds": total_seconds,
            "val_acc": float(val_text) if val_text else None, "epochs": len(epoch_rows)}


# --------------------------------------------------------------------------------------------- running


class _Tee(io.TextIOBase):
    """Write to several streams: airbench's table is captured for parsing and still shown live."""

    def __init__(self, *streams: io.TextIOBase) -> None:
        super().__init__()
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    """cudnn autotune on while the peer runs, as airbench sets it at import; the old value after."""
    flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = flag


def _call_in(folder: Path, fn: Callable[[], Any], echo: bool) -> tuple[str, float]:
    """fn() with `folder` as the working directory and stdout captured; (text, wall seconds).

    The working directory is put back whatever happens, so the caller's relative paths (its output
    folder) still mean what they meant. The model fn returns is dropped here, freeing its memory.
    """
    buffer = io.StringIO()
    previous = os.getcwd()
    start = time.perf_counter()
    try:
        os.chdir(folder)
        with _cudnn_benchmark(), contextlib.redirect_stdout(_Tee(buffer, sys.stdout) if echo else buffer):
            fn()
    except BaseException:
        if not echo:
            sys.stdout.write(buffer.getvalue())
        raise
    finally:
        os.chdir(previous)
    return buffer.getvalue(), time.perf_counter() - start


def run_one(folder: str | os.PathLike[str], seed: int, *, train_fn: Callable[[], Any] | None = None,
            echo: bool = True) -> dict[str, Any]:
    """One seeded airbench94 run on the exported data: {"seed", "tta_val_acc", "total_seconds", "val_acc", ...}.

    `torch.manual_seed(seed)` (CPU and every CUDA device) goes first, so a seed always gives the same
    shuffles and augmentations (cudnn autotune may still pick kernels that differ in the last bits).
    `wall_seconds` adds what airbench's timer leaves out (loading the files, the per-epoch evaluations).
    `train_fn` replaces airbench.train94 (tests on the CPU).
    """
    folder = Path(folder).resolve()
    _require_files(folder)
    fn = train_fn or require_airbench().train94
    torch.manual_seed(seed)
    text, wall = _call_in(folder, fn, echo)
    return {"seed": seed, **parse_result(text), "wall_seconds": wall}


def warm_up(folder: str | os.PathLike[str], mode: str = "full", *, echo: bool = True,
            warmup_fn: Callable[[], Any] | None = None, train_fn: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Warm up the device for the peer; not reported with the seeds.

    airbench.warmup94() (train94 with run=-1) fits the whitening layer (cuSOLVER's first eigh) and
    takes one training step at the real batch shape (cudnn autotune of the training convolutions);
    the evaluation shapes are autotuned in the first run's per-epoch evaluation, which its timer
    excludes. What it leaves to the first timed run is first use of the remaining kernels (lookahead,
    the frozen-whitening-bias backward, the TTA evaluation's pad/flip), each loaded lazily. mode
    "full" adds one whole seeded run after it (seed WARMUP_SEED): a few seconds, and its
    `total_seconds` against the seeds' median shows whether "step" alone would have sufficed.
    """
    if mode not in ("step", "full"):
        raise ValueError(f"warm-up mode {mode!r}: use 'step' (airbench.warmup94) or 'full'")
    folder = Path(folder).resolve()
    _require_files(folder)
    if warmup_fn is None:
        warmup_fn = require_airbench().warmup94
    _, step_seconds = _call_in(folder, warmup_fn, echo)
    result: dict[str, Any] = {"mode": mode, "step_wall_seconds": step_seconds}
    if mode == "full":
        result["run"] = run_one(folder, WARMUP_SEED, train_fn=train_fn, echo=echo)
    return result


def release_memory() -> None:
    """Hand the peer's cached CUDA blocks back before the project's runs, so they start alike."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, metavar="DIR", help="write DIR/cifar10/{train,test}.pt")
    parser.add_argument("--official", action="store_true",
                        help="the project's torchvision (official) source instead of $CIFAR10_ARCHIVE")
    parser.add_argument("--no-check", action="store_true", help="skip reading the files back with CifarLoader")
    args = parser.parse_args(argv)
    overrides = [] if args.official else ["data.source=image_folder", f"data.path={_common.archive_path()}"]
    data = load_project_data(overrides, scratch_dir=args.export)
    target = export_uint8(data, args.export)
    print(f"wrote {target / 'train.pt'} ({len(data.train_y)} images) and {target / 'test.pt'} "
          f"({len(data.test_y)}) from {data.source_id}")
    if not args.no_check:
        try:
            counts = check_with_airbench_loader(args.export, data)
        except PeerUnavailable as error:
            print(f"not checked: {error}")
        else:
            print(f"airbench's CifarLoader reads them: train {counts['train']}, test {counts['test']}, "
                  "labels, classes and sampled images as exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
