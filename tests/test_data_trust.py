"""Data a run can trust, one class of fault at a time, each through the mechanism that covers it.

Classes: a decoded cache whose content is not what was decoded (torch.load does not check the zip's
CRCs), a resume on other data than the checkpoint was trained on, and validation images that move with
the run's seed or subset (or overlap another run's training images).
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_train
from hydra.utils import instantiate
from PIL import Image

from cifar_speedrun.errors import UserError
from cifar_speedrun.operations import sources as sources_lib
from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import load_cifar10_uint8, source_identity, split_training_set
from cifar_speedrun.records import resume as resume_lib


def _image_folder(root: Path, per_class: int = 3) -> Path:
    """A tiny CIFAR-shaped dataset: distinct images, so a wrong label or image changes the checksum."""
    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), color=(label * 20, i * 50, 7)).save(folder / f"{i}.png")
    return root


# ================================================================ the cache proves its content
def _cached(tmp_path: Path) -> tuple[Path, Path, sources_lib.Cifar10Uint8]:
    folder = _image_folder(tmp_path / "c")
    cache = tmp_path / "cache"
    first = load_cifar10_uint8("image_folder", None, str(folder), str(cache), verbose=False)
    return folder, next(cache.glob("*.pt")), first


def _rewrite(cache_file: Path, change) -> None:
    blob = torch.load(cache_file, weights_only=True)
    change(blob)
    torch.save(blob, cache_file)


def _reseal(blob: dict) -> None:
    """What a careful forger does: record the new shapes and checksums too."""
    blob["shapes"] = {key: list(blob[key].shape) for key in sources_lib.SPLIT_TENSORS}
    blob["sha256"] = {split: sources_lib.split_checksum(blob[f"{split}_x"], blob[f"{split}_y"])
                      for split in ("train", "test")}


def _shifted_labels(blob: dict) -> None:
    blob["train_y"] = (blob["train_y"] + 1) % 10  # the old checksum kept


def _cropped_images(blob: dict) -> None:
    blob["train_x"] = blob["train_x"][:, :, :16, :16].contiguous()
    _reseal(blob)


def _one_image_fewer(blob: dict) -> None:
    blob["train_x"] = blob["train_x"][:-1].clone()  # the recorded shapes kept


def _labels_out_of_range(blob: dict) -> None:
    blob["test_y"] = blob["test_y"] + 10
    _reseal(blob)


def _float_images(blob: dict) -> None:
    blob["test_x"] = blob["test_x"].float()
    blob["dtypes"]["test_x"] = "torch.float32"
    _reseal(blob)


def _written_before_checksums(blob: dict) -> None:
    for key in ("shapes", "dtypes", "sha256"):
        del blob[key]


@pytest.mark.parametrize("change,reason", [
    (_shifted_labels, "do not match their sha256"),
    (_cropped_images, "expected (N, 3, 32, 32)"),
    (_one_image_fewer, "train_x has shape (29, 3, 32, 32), recorded [30, 3, 32, 32]"),
    (_labels_out_of_range, "test labels fall outside 0..9"),
    (_float_images, "test_x is torch.float32, expected torch.uint8"),
    (_written_before_checksums, "records no shapes, dtypes or checksums"),
], ids=["labels (y+1)%10 with the old checksum", "wrong shapes, resealed", "wrong count", "labels out of range",
        "wrong dtype", "old format without checksums"])
def test_a_cache_that_is_not_what_was_decoded_is_rebuilt_with_one_line(tmp_path: Path, capsys, change,
                                                                       reason: str) -> None:
    folder, cache_file, first = _cached(tmp_path)
    _rewrite(cache_file, change)
    capsys.readouterr()
    again = load_cifar10_uint8("image_folder", None, str(folder), str(tmp_path / "cache"), verbose=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if "corrupt" in line]
    assert len(lines) == 1 and str(cache_file) in lines[0] and reason in lines[0], lines
    assert "rebuilding it from the source" in lines[0]
    for key in sources_lib.SPLIT_TENSORS:
        assert torch.equal(getattr(again, key), getattr(first, key)), key
    assert sources_lib.cache_problem(torch.load(cache_file, weights_only=True), first.source_id) is None, "rebuilt"


def test_a_sound_cache_loads_checked_without_decoding(tmp_path: Path, capsys, monkeypatch) -> None:
    folder, cache_file, first = _cached(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(sources_lib, "_load_image_folder", fail)
    again = load_cifar10_uint8("image_folder", None, str(folder), str(tmp_path / "cache"))
    assert "loaded cached CIFAR-10" in capsys.readouterr().out
    assert torch.equal(again.train_y, first.train_y)


def test_an_older_cache_version_is_left_alone_and_not_read(tmp_path: Path, capsys) -> None:
    """A v1 file (no checksums) of the same source is another file name: never read, never deleted
    (another checkout's older code may still use it)."""
    folder = _image_folder(tmp_path / "c")
    cache = tmp_path / "cache"
    source_id = source_identity("image_folder", str(folder))
    old = cache / f"cifar10-{source_id}-v1.pt"
    cache.mkdir()
    torch.save({"format": 1, "source_id": source_id, "train_x": torch.zeros(1)}, old)
    data = load_cifar10_uint8("image_folder", None, str(folder), str(cache))
    assert data.train_x.shape == (30, 3, 32, 32) and old.exists()
    assert "decoded CIFAR-10" in capsys.readouterr().out


def test_the_real_cache_proves_its_content(real_data, archive: str, cache_dir: str) -> None:
    blob = torch.load(sources_lib.cache_file(cache_dir, real_data.source_id), weights_only=True)
    assert sources_lib.cache_problem(blob, real_data.source_id) is None
    assert blob["shapes"]["train_x"] == [50_000, 3, 32, 32] and blob["dtypes"]["train_y"] == "torch.int64"


# ================================================================ resume refuses other data
def _checkpoint(source_id: str, path: str) -> dict:
    return {"Cifar10DataModule": {"source_id": source_id},
            "hyper_parameters": {"run_config": {"config": {"data": {"source": "image_folder", "path": path}}}}}


def test_resume_compares_the_data_content_not_its_path(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "c")
    source_id = source_identity("image_folder", str(folder))
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    resume_lib.check_same_data(_checkpoint(source_id, str(folder)),
                               {"data": {"source": "image_folder", "path": str(copy)}}, "last.ckpt")
    with pytest.raises(UserError) as info:
        resume_lib.check_same_data(_checkpoint(source_id, str(folder)),
                                   {"data": {"source": "torchvision", "path": None}}, "last.ckpt")
    message = str(info.value)
    assert source_id in message and "torchvision-official" in message and "\n" not in message
    # A checkpoint written before the identity was recorded cannot be compared: it is let through.
    resume_lib.check_same_data({}, {"data": {"source": "torchvision"}}, "last.ckpt")


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    names = ["results.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "csv/metrics.csv", "checkpoints/last.ckpt"]
    return {name: (run_dir / name).read_bytes() for name in names if (run_dir / name).exists()}


@pytest.mark.slow
def test_resume_on_another_archive_is_refused_and_on_a_copy_continues(tmp_path: Path, archive: str,
                                                                      cache_dir: str) -> None:
    run_dir = tmp_path / "run"
    first = run_train([*TINY, f"hydra.run.dir={run_dir}"], tmp_path, cache_dir, archive)  # 1 epoch; resumed to 2
    assert first.returncode == 0, first.stderr[-3000:]
    trained_on = json.loads((run_dir / "results.json").read_text())["source_id"]
    assert trained_on == source_identity("image_folder", archive)

    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tar:
        tar.add(_image_folder(tmp_path / "small"), arcname="cifar10")
    before = _snapshot(run_dir)
    refused = run_train([f"hydra.run.dir={run_dir}", "resume=true", "epochs=2"], tmp_path, cache_dir, str(other))
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    other_id = source_identity("image_folder", str(other))
    assert trained_on in errors[0] and other_id in errors[0] and f"data.path={archive}" in errors[0]
    assert _snapshot(run_dir) == before, "a refused resume writes nothing"

    copy = Path(shutil.copy(archive, tmp_path / "copy-of-cifar10.tar.gz"))
    resumed = run_train([f"hydra.run.dir={run_dir}", "resume=true", "epochs=2"], tmp_path, cache_dir, str(copy))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 2 and record["source_id"] == trained_on


# ================================================================ validation images fixed by the data alone
def test_validation_images_are_the_same_in_every_run_and_never_trained_on(real_data) -> None:
    labels = real_data.train_y
    runs = [(subset, mode, seed) for subset in (None, 1000, 30_000) for mode in ("per_class", "random")
            for seed in (0, 1)]
    validations, trained = [], set()
    for subset, mode, seed in runs:
        train, validation = split_training_set(labels, subset, mode, seed, 2000)
        validations.append(validation)
        trained |= set(train.tolist())
        assert len(train) == (subset or 48_000) and len(set(train.tolist())) == len(train)
    assert all(torch.equal(validation, validations[0]) for validation in validations), "the same in every run"
    assert not trained & set(validations[0].tolist()), "no run trains on a validation image"
    assert torch.equal(torch.bincount(labels[validations[0]]), torch.full((10,), 200))
    bigger = split_training_set(labels, None, "per_class", 0, 5000)[1]
    assert set(validations[0].tolist()) <= set(bigger.tolist()), "a larger split holds the smaller one out too"
    random_a = split_training_set(labels, 1000, "random", 0, 2000)[0]
    assert not torch.equal(random_a, split_training_set(labels, 1000, "random", 1, 2000)[0]), "seeds still differ"


def test_a_subset_larger_than_what_is_left_is_one_line() -> None:
    labels = torch.arange(10).repeat_interleave(100)
    with pytest.raises(UserError, match=r"data.subset=950 must be between 1 and 900 .*data.val_split=100"):
        split_training_set(labels, 950, "per_class", 0, 100)


def test_the_data_module_holds_out_the_same_images_for_any_seed(archive: str, cache_dir: str, compose_cfg) -> None:
    held = []
    for seed, mode in ((0, "per_class"), (1, "random")):
        dm = instantiate(compose_cfg("data.source=image_folder", f"seed={seed}", f"data.subset_mode={mode}",
                                     "data.subset=1000", "data.val_split=500", "data.batch_size=100",
                                     "data.test_subset=100").data)
        dm.setup("fit")
        assert dm.num_train_images == 1000 and dm.num_val_images == 500
        assert not set(dm.train_indices.tolist()) & set(dm.val_indices.tolist())
        held.append(dm.val_indices)
    assert torch.equal(held[0], held[1])
