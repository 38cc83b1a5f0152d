"""Fault injection, one class of bad input or fault at a time, each through the mechanism that covers it.

Classes: files a user is handed (archive traversal, foreign pickles, torn checkpoints), resume that
must lose nothing, signals and exit status, disk full, datasets that are not what they seem
(symlinks, empty classes, hidden files), settings out of range and keys nobody reads, report inputs.
Each case asserts the exit status, one clear line, no traceback, nothing lost, no leftovers.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import preloaded_python
import pytest
from conftest import REPO, TINY, run_train
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from cifar_speedrun import train as train_lib
from cifar_speedrun.config.command_line import validate
from cifar_speedrun.errors import UserError
from cifar_speedrun.operations import storage
from cifar_speedrun.operations.archive import safe_extract
from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import load_cifar10_uint8, source_identity
from cifar_speedrun.records import report as report_lib

THREE_EPOCHS = [o for o in TINY if not o.startswith(("epochs=", "optim.schedule", "data.subset"))] + [
    "epochs=3", "optim.schedule.epochs=[0,1,3]", "data.subset=2048"]


def _main(argv: list[str], monkeypatch, capsys, entry=None, program: str = "train.py") -> tuple[int, str]:
    """train.py's main() (or `entry`, e.g. eval.py's) in this process, as a user starts it: exit code, stderr."""
    monkeypatch.setattr(sys, "argv", [program, *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    try:
        (entry or train_lib.main)()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else (0 if exit_info.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def _tiny_dataset(root: Path, per_class: int = 2, seed: int = 0, test: bool = True) -> Path:
    """A CIFAR-10-shaped image folder: 10 class folders of `per_class` 32x32 PNGs per split."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test") if test else ("train",):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


# ================================================================ files a user is handed
def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        if member.isreg():
            member.size = len(data)
            bundle.addfile(member, io.BytesIO(data))
        else:
            bundle.addfile(member)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


UNSAFE_MEMBERS = [
    ("parent traversal", _member("../../escaped.txt"), "outside the extraction folder"),
    ("nested traversal", _member("cifar10/train/../../../escaped.txt"), "outside the extraction folder"),
    ("absolute path", _member("/tmp/cifar-speedrun-escaped.txt"), "outside the extraction folder"),
    ("symlink out", _member("cifar10/link", tarfile.SYMTYPE, "/etc"), "a link"),
    ("hard link", _member("cifar10/hard", tarfile.LNKTYPE, "../../etc/passwd"), "a link"),
    ("character device", _member("cifar10/dev", tarfile.CHRTYPE), "a device file"),
    ("FIFO", _member("cifar10/fifo", tarfile.FIFOTYPE), "a FIFO"),
]


@pytest.mark.parametrize("name,member,reason", UNSAFE_MEMBERS, ids=[m[0] for m in UNSAFE_MEMBERS])
def test_unsafe_archive_members_are_refused_and_nothing_escapes(name, member, reason, tmp_path: Path) -> None:
    archive = _tar_with(tmp_path / "handed.tar.gz", member)
    target = tmp_path / "deep" / "er" / "extract"
    with pytest.raises(UserError, match=reason) as info:
        safe_extract(archive, target)
    assert repr(member.name) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/cifar-speedrun-escaped.txt").exists()
    assert list(target.iterdir()) == [], "nothing was extracted"


def test_unsafe_zip_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "handed.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../escaped.txt", "x")
    with pytest.raises(UserError, match="'../escaped.txt' is a path outside"):
        safe_extract(archive, tmp_path / "extract")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.slow
def test_traversal_archive_through_train_py_is_one_line(tmp_path: Path, cache_dir: str) -> None:
    archive = _tar_with(tmp_path / "handed.tar.gz", _member("../../escaped.txt"))
    result = run_train([*TINY, f"data.path={archive}", f"paths.cache_dir={tmp_path}/cache",
                        f"hydra.run.dir={tmp_path}/run"], tmp_path, cache_dir, str(archive))
    assert result.returncode == 2
    assert "refusing to extract" in _one_error_line(result.stderr)
    assert not list(tmp_path.rglob("escaped.txt")) and not list((tmp_path / "cache").glob("extract-*"))


class _Payload:
    """A pickle that would create a file when unpickled (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _foreign_pickle(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran.txt"
    path = tmp_path / "handed.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "epoch": 0, "payload": _Payload(marker)}))
    return path, marker


def test_a_foreign_pickle_checkpoint_runs_no_code(tmp_path: Path) -> None:
    path, marker = _foreign_pickle(tmp_path)
    with pytest.raises(UserError) as info:
        storage.load_checkpoint(str(path))
    assert not marker.exists(), "unpickling ran code"
    message = str(info.value)
    assert "not a readable checkpoint" in message and "weights_only=False" not in message


@pytest.mark.slow
def test_a_foreign_pickle_through_train_and_eval_is_one_line(tmp_path: Path, archive: str, cache_dir: str) -> None:
    path, marker = _foreign_pickle(tmp_path)
    trained = run_train([*TINY, f"ckpt_path={path}", f"hydra.run.dir={tmp_path}/run"], tmp_path, cache_dir, archive)
    assert trained.returncode == 2 and "not a readable checkpoint" in _one_error_line(trained.stderr)
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir}
    evaluated = preloaded_python.run([sys.executable, str(REPO / "eval.py"), f"ckpt_path={path}",
                                      "data.source=image_folder", f"hydra.run.dir={tmp_path}/eval"], cwd=tmp_path,
                                     env=env, timeout=300)
    assert evaluated.returncode == 2 and "not a checkpoint or model file" in _one_error_line(evaluated.stderr)
    assert not marker.exists()
    assert "weights_only=False" not in trained.stderr + evaluated.stderr


def test_files_follow_the_users_umask(tmp_path: Path) -> None:
    script = ("import os, sys; os.umask(int(sys.argv[2], 8)); from cifar_speedrun.operations import storage; "
              "storage.write_json_atomic({'a': 1}, sys.argv[1]); "
              "storage.save_tensors_atomic({'x': 1}, sys.argv[1] + '.pt')")
    for mask, mode in (("002", 0o664), ("022", 0o644), ("077", 0o600)):
        target = tmp_path / f"results-{mask}.json"
        done = preloaded_python.run([sys.executable, "-c", script, str(target), mask], cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert target.stat().st_mode & 0o777 == mode, (mask, oct(target.stat().st_mode))
        assert Path(f"{target}.pt").stat().st_mode & 0o777 == mode


# ================================================================ nothing lost: resume, torn files, disk full
@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory, archive: str, cache_dir: str):
    """A 3-epoch run stopped by SIGTERM once epoch 1's checkpoint is written."""
    root = tmp_path_factory.mktemp("interrupted")
    run_dir = root / "run"
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *THREE_EPOCHS, f"hydra.run.dir={run_dir}",
                                f"paths.log_dir={root}/logs"], cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    return run_dir, process.returncode, stdout, stderr


@pytest.mark.slow
def test_sigterm_records_interrupted_says_how_to_resume_and_exits_143(interrupted_run) -> None:
    run_dir, code, _, stderr = interrupted_run
    assert code == 143
    line = _one_error_line(stderr)
    assert "interrupted by SIGTERM" in line and f"python train.py hydra.run.dir={run_dir} resume=true" in line
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and 1 <= len(results["history"]) < 3
    assert storage.load_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"))["epoch"] >= 0, "still valid"
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name], "no temporary files left"


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    names = ["results.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "csv/metrics.csv", "checkpoints/last.ckpt"]
    return {name: (run_dir / name).read_bytes() for name in names if (run_dir / name).exists()}


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", [
    (["model.width=0.25"], "resume=true continues the run in"),
    (["+trick=ema"], "would change what it trains"),
], ids=["other width", "other trick"])
def test_refused_resume_writes_nothing(interrupted_run, overrides, message, tmp_path: Path, archive: str,
                                       cache_dir: str) -> None:
    run_dir = interrupted_run[0]
    before = _snapshot(run_dir)
    result = run_train([f"hydra.run.dir={run_dir}", "resume=true", *overrides], tmp_path, cache_dir, archive)
    assert result.returncode == 2 and message in _one_error_line(result.stderr)
    assert _snapshot(run_dir) == before, "the run's files are untouched"


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_listing_the_keys(interrupted_run, tmp_path: Path, archive: str,
                                                                    cache_dir: str) -> None:
    run_dir = interrupted_run[0]
    result = run_train([*THREE_EPOCHS, "model.width=0.25", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                        f"hydra.run.dir={tmp_path}/new"], tmp_path, cache_dir, archive)
    assert result.returncode == 2
    assert "model.width: 0.125 -> 0.25" in _one_error_line(result.stderr)


@pytest.mark.slow
def test_torn_checkpoint_on_resume_is_one_line_naming_it(interrupted_run, tmp_path: Path, archive: str,
                                                         cache_dir: str) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(interrupted_run[0], copy)
    checkpoint = copy / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = _snapshot(copy)
    result = run_train([f"hydra.run.dir={copy}", "resume=true"], tmp_path, cache_dir, archive)
    assert result.returncode == 2 and str(checkpoint) in _one_error_line(result.stderr)
    assert _snapshot(copy) == before


@pytest.mark.slow
def test_resume_with_the_readme_command_continues_that_run_and_keeps_its_metrics(
        interrupted_run, tmp_path: Path, archive: str, cache_dir: str) -> None:
    """`hydra.run.dir=<dir> resume=true` alone (no original overrides) continues with the run's own config."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(interrupted_run[0], copy)
    saved_config = (copy / ".hydra" / "config.yaml").read_bytes()
    rows_before = (copy / "csv" / "metrics.csv").read_text().splitlines()
    history_before = json.loads((copy / "results.json").read_text())["history"]
    result = run_train([f"hydra.run.dir={copy}", "resume=true"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[resume] continuing" in result.stdout
    final = json.loads((copy / "results.json").read_text())
    assert final["status"] == "ok" and final["epochs"] == 3 and final["config"]["model"]["width"] == 0.125
    assert final["history"][: len(history_before)] == history_before, "earlier epochs kept"
    assert (copy / ".hydra" / "config.yaml").read_bytes() == saved_config, "the run's config is not rewritten"
    rows_after = (copy / "csv" / "metrics.csv").read_text().splitlines()
    kept = [row for row in rows_before[1:] if row]
    assert len(rows_after) > len(rows_before) and all(row in rows_after for row in kept[:2])
    epochs_logged = {row.split(",")[0] for row in rows_after[1:]}
    assert len(epochs_logged) >= 3, "every epoch's metrics are in metrics.csv"


@pytest.mark.slow
def test_resume_may_change_epochs_and_says_so(interrupted_run, tmp_path: Path, archive: str, cache_dir: str) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(interrupted_run[0], copy)
    result = run_train([f"hydra.run.dir={copy}", "resume=true", "epochs=4"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changed now: epochs=4 (was epochs=3)" in result.stdout
    assert json.loads((copy / "results.json").read_text())["epochs"] == 4


def test_disk_full_is_named_and_the_previous_file_survives(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "results.json"
    storage.write_json_atomic({"status": "running", "history": [1]}, str(target))

    def full(handle: int, data: bytes) -> None:
        os.close(handle)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_write_file", full)
    with pytest.raises(UserError, match=f"disk full at {tmp_path} \\(writing results.json\\)"):
        storage.write_json_atomic({"status": "failed"}, str(target))
    assert json.loads(target.read_text()) == {"status": "running", "history": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file left"


def test_disk_full_while_checkpointing_fails_the_run_with_a_message_that_matches_results(
        tmp_path: Path, archive: str, cache_dir: str, real_data, monkeypatch, capsys) -> None:
    real = storage._write_file

    def full_for_checkpoints(handle: int, data: bytes) -> None:
        if len(data) > 50_000:  # checkpoints; results.json stays small enough to be written
            os.close(handle)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(storage, "_write_file", full_for_checkpoints)
    monkeypatch.setenv("CIFAR10_ARCHIVE", archive)
    code, err = _main([*TINY, f"paths.cache_dir={cache_dir}", "logger=none", f"hydra.run.dir={tmp_path}/run"],
                      monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and f"disk full at {tmp_path}/run/checkpoints" in line
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "disk full" in results["error"]
    assert "status 'failed'" in line, "the message says what results.json says"
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp-" in p.name]


def test_disk_full_while_extracting_says_so_not_corrupt(tmp_path: Path, monkeypatch) -> None:
    dataset = _tiny_dataset(tmp_path / "src")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(dataset, arcname="cifar10")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", full)
    with pytest.raises(UserError, match="disk full at") as info:
        load_cifar10_uint8("image_folder", None, str(archive), str(tmp_path / "cache"), verbose=False)
    assert "corrupt" not in str(info.value)
    assert not list((tmp_path / "cache").glob("extract-*")), "the scratch folder is removed"


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = storage.HOST
        stale = [tmp_path / f"cifar10-x.pt.tmp-{host}-{dead.pid}-abc", tmp_path / f"extract-{host}-{dead.pid}-xyz"]
        kept = [tmp_path / f"cifar10-x.pt.tmp-{host}-{alive.pid}-abc", tmp_path / f"extract-otherhost-{dead.pid}-q",
                tmp_path / "cifar10-image_folder-abc-v1.pt"]
        stale[0].write_bytes(b"partial")
        stale[1].mkdir()
        (stale[1] / "train").mkdir()
        kept[0].write_bytes(b"partial")
        kept[1].mkdir()
        kept[2].write_bytes(b"cache")
        removed = storage.remove_stale(str(tmp_path))
        assert sorted(removed) == sorted(str(p) for p in stale)
        assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    finally:
        alive.kill()


# ================================================================ signals
@pytest.mark.slow
def test_sigint_exits_130_and_a_multirun_stops_on_sigterm(tmp_path: Path, archive: str, cache_dir: str) -> None:
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}

    def start(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={tmp_path}/logs"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(path: Path, process: subprocess.Popen) -> None:
        deadline = time.time() + 600
        while not path.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)

    single = start([*THREE_EPOCHS, f"hydra.run.dir={tmp_path}/single"])
    wait_for(tmp_path / "single" / "checkpoints" / "last.ckpt", single)
    single.send_signal(signal.SIGINT)
    _, stderr = single.communicate(timeout=300)
    assert single.returncode == 130 and "interrupted by SIGINT" in _one_error_line(stderr)
    assert json.loads((tmp_path / "single" / "results.json").read_text())["status"] == "interrupted"

    sweep = tmp_path / "sweep"
    multi = start(["-m", *THREE_EPOCHS, "seed=0,1,2", f"hydra.sweep.dir={sweep}"])
    wait_for(sweep / "0" / "checkpoints" / "last.ckpt", multi)
    multi.send_signal(signal.SIGTERM)
    _, stderr = multi.communicate(timeout=300)
    assert multi.returncode == 143 and "interrupted by SIGTERM" in _one_error_line(stderr)
    assert not (sweep / "1").exists() or not list((sweep / "1").iterdir()), "the multirun stopped"


@pytest.mark.slow
def test_sigterm_while_extracting_leaves_no_scratch_folder(tmp_path: Path, archive: str) -> None:
    cache = tmp_path / "fresh-cache"
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, f"paths.cache_dir={cache}",
                                f"hydra.run.dir={tmp_path}/run", f"paths.log_dir={tmp_path}/logs"], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(cache.glob("extract-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # mid-extraction or mid-decode
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143 and "interrupted by SIGTERM" in _one_error_line(stderr)
    assert not list(cache.glob("extract-*")) and not list(cache.glob("*.tmp-*")), "no leftovers"


# ================================================================ datasets that are not what they seem
def test_symlinked_datasets_do_not_share_a_cache(tmp_path: Path) -> None:
    first, second = _tiny_dataset(tmp_path / "x", seed=1), _tiny_dataset(tmp_path / "y", seed=2)
    views = []
    for name, real in (("a", first), ("b", second)):
        view = tmp_path / name
        view.mkdir()
        (view / "train").symlink_to(real / "train", target_is_directory=True)
        (view / "test").symlink_to(real / "test", target_is_directory=True)
        views.append(view)
    assert source_identity("image_folder", str(views[0])) != source_identity("image_folder", str(views[1]))
    a = load_cifar10_uint8("image_folder", None, str(views[0]), str(tmp_path / "cache"), verbose=False)
    b = load_cifar10_uint8("image_folder", None, str(views[1]), str(tmp_path / "cache"), verbose=False)
    assert not np.array_equal(a.train_x.numpy(), b.train_x.numpy()), "each view trains on its own images"


def test_an_edited_image_changes_the_cache_key(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "d")
    before = source_identity("image_folder", str(dataset))
    image = dataset / "train" / "cat" / "0.png"
    mtime = image.stat().st_mtime_ns
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(mtime, mtime))  # same name, same time: only the bytes differ
    assert source_identity("image_folder", str(dataset)) != before


def test_an_empty_class_folder_is_refused(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "d")
    for file in (dataset / "train" / "frog").iterdir():
        file.unlink()
    (dataset / "train" / "frog" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(UserError, match="class folder .*train/frog holds no images"):
        load_cifar10_uint8("image_folder", None, str(dataset), str(tmp_path / "cache"), verbose=False)


def test_hidden_and_non_image_files_are_skipped_with_one_line(tmp_path: Path, capsys) -> None:
    dataset = _tiny_dataset(tmp_path / "d")
    (dataset / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (dataset / "train" / "dog" / "._0.png").write_bytes(b"apple double")
    (dataset / "train" / "dog" / "Thumbs.db").write_bytes(b"\0")
    (dataset / "test" / "ship" / "notes.txt").write_text("hello")
    (dataset / "train" / ".hidden-folder").mkdir()
    data = load_cifar10_uint8("image_folder", None, str(dataset), str(tmp_path / "cache"))
    assert len(data.train_y) == 20 and len(data.test_y) == 20
    out = capsys.readouterr().out
    assert "train: skipped 3 hidden or non-image files" in out and "test: skipped 1 hidden" in out


def test_a_real_corrupt_image_is_refused(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "d")
    (dataset / "train" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError, match="corrupt image .*cat/0.png"):
        load_cifar10_uint8("image_folder", None, str(dataset), str(tmp_path / "cache"), verbose=False)


# ================================================================ settings out of range, keys nobody reads
OUT_OF_RANGE = [
    (["data.cutout_size=64"], "data.cutout_size=64 must be an integer in [1, 32]"),
    (["data.cutout_size=32", "data.cutout=true"], "would blank the whole 32px crop"),
    (["data.translate=-2"], "data.translate=-2 must be an integer in [0, 16]"),
    (["data.crop_size=40", "data.translate=0"], "must be an integer in [1, 32]"),
    (["data.crop_size=30", "data.translate=0", "data.cutout=false"], None),
    (["optim.lr=nan"], "optim.lr=nan must be a finite number >= 0"),
    (["optim.lr=inf"], "optim.lr=inf must be a finite number >= 0"),
    (["optim.weight_decay=-1e-4"], "optim.weight_decay=-0.0001 must be a number >= 0"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    (["seed=99999999999"], "seed=99999999999 must be an integer in [0, 4294967295]"),
    (["+trick=ghost_bn", "model.norm.ghost_splits=0"], "model.norm.ghost_splits=0 must be a positive integer"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be a positive integer"),
    (["tta.reduce=mean"], "tta.reduce='mean' is not known; use logits, log_softmax"),
    (["model.norm.kind=group"], "model.norm.kind='group' is not known; use batch, ghost"),
    (["optim.schedule.factors=[0,-1,0]"], "optim.schedule.factors[1]=-1 must be a number >= 0"),
    (["trainer.precision=8-mixed"], "trainer.precision='8-mixed' is not known"),
    (["model.width=1e9999"], "model.width=inf must be a finite number > 0"),
    # Found by the red team of the typed config (issue 19): each a class of its own.
    (["epochs=inf"], "epochs=inf must be a finite number > 0"),
    (["data.subset=0"], "data.subset=0 must be a positive integer (or null)"),
    (["model.norm=null"], "model.norm=None must be a group of settings"),
    (["model=airbench94", "model.widths=[64,128,256,256,256]"], "must be a list of at most 4 items"),
    (["optim.schedule.epochs=[0,5,nan]"], "knot nan is not a finite number of epochs"),
    (["optim=muon", "optim.whiten_bias_schedule.epochs=[5,3]"], "optim.whiten_bias_schedule.epochs=[5.0, 3.0] are"),
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov=true needs optim.momentum > 0"),
    (["+trainer.max_steps=10"], "trainer.max_steps is not taken: the run's length follows `epochs`"),
    (["trainer.enable_progress_bar=banana"], "trainer.enable_progress_bar='banana' must be true or false"),
    (["trainer.devices=[0,0]"], "trainer.devices=[0, 0] names a device twice"),
    (["trainer=ddp", "trainer.devices=[0,1]", "data.batch_size=48", "+trick=ghost_bn"], "per-device batch is 24"),
    (["+logger.csv.nme=foo"], "did you mean logger.csv.name?"),
    (["data.root=${paths.nope}"], "data.root=${paths.nope} cannot be resolved"),
    (["tags=[${nope}]"], "tags[0]=${nope} cannot be resolved"),
]


@pytest.mark.parametrize("overrides,message", OUT_OF_RANGE, ids=[" ".join(o) for o, _ in OUT_OF_RANGE])
def test_settings_out_of_range_are_refused_before_any_data(compose_cfg, overrides, message) -> None:
    cfg = compose_cfg(*overrides)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


UNKNOWN_KEYS = [
    ("+optim.lrr=0.1", "unknown key optim.lrr", "did you mean optim.lr?"),
    ("+data.batchsize=256", "unknown key data.batchsize", "did you mean data.batch_size?"),
    ("+model.norm.ghost_split=8", "unknown key model.norm.ghost_split", "did you mean model.norm.ghost_splits?"),
    ("+trainer.max_epoch=3", "unknown key trainer.max_epoch", "did you mean trainer.max_epochs?"),
    ("+loss.smoothing=0.1", "unknown key loss.smoothing", "did you mean loss.label_smoothing?"),
    ("+tta.flips=true", "unknown key tta.flips", "did you mean tta.flip?"),
    ("+callbacks.train_timer.target=0.9", "unknown key callbacks.train_timer.target", "TrainTimer has no argument"),
    ("+epoch=3", "unknown key epoch", "did you mean epochs?"),
]


@pytest.mark.parametrize("override,message,hint", UNKNOWN_KEYS, ids=[u[0] for u in UNKNOWN_KEYS])
def test_keys_nobody_reads_are_refused(compose_cfg, override, message, hint) -> None:
    with pytest.raises(UserError) as info:
        validate(compose_cfg(override))
    assert message in str(info.value) and hint in str(info.value) and "drop the `+`" in str(info.value)


def test_interpolated_copies_name_the_key_the_user_set(compose_cfg) -> None:
    """`model.whitening.seed: ${seed}` and `trainer.max_epochs: ${ceil:${epochs}}` copy top-level keys: a bad
    value is named where the user wrote it, not where its first copy fails."""
    for override, message in (("seed=-1", "seed=-1 must be an integer in [0, 4294967295]"),
                              ("epochs=0", "epochs=0 must be a number > 0"),
                              ("channels_last=1", "channels_last=1 must be true or false")):
        with pytest.raises(UserError) as info:
            validate(compose_cfg(override))
        assert str(info.value).startswith(message), str(info.value)


def test_model_helpers_and_averaging_callbacks_refuse_in_one_line() -> None:
    from cifar_speedrun.recipe.averaging import EMA, Lookahead
    from cifar_speedrun.recipe.models import build, build_norm, build_whitening

    def ema(**settings):
        return EMA(use_buffers=True, **settings)

    def lookahead(**settings):
        return Lookahead(use_buffers=True, **settings)

    for call, message in ((lambda: build("nosuch"), "model='nosuch' is not a model family"),
                          (lambda: build_norm(8, kind="x"), "model.norm.kind='x' is not known"),
                          (lambda: build_whitening(kernel_size=0), "model.whitening.kernel_size=0 must be"),
                          (lambda: ema(momentum=0.99, every_n_steps=0), "callbacks.ema.every_n_steps=0 must be"),
                          (lambda: ema(momentum=1.5, every_n_steps=5), "callbacks.ema.momentum=1.5 must be"),
                          (lambda: ema(momentum=float("nan"), every_n_steps=5),
                           "callbacks.ema.momentum=nan must be a finite number"),
                          (lambda: lookahead(decay_base="abc", decay_pow=3.0, every_n_steps=5, start_epochs=3),
                           "callbacks.lookahead.decay_base='abc' must be"),
                          # int() would have truncated it; the run would start averaging at another epoch
                          (lambda: lookahead(decay_base=0.95, decay_pow=3.0, every_n_steps=5, start_epochs=1.5),
                           "callbacks.lookahead.start_epochs=1.5 must be an integer")):
        with pytest.raises(UserError) as info:
            call()
        assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_unknown_key_from_the_command_line_is_one_line(tmp_path: Path, archive: str, cache_dir: str, monkeypatch,
                                                       capsys) -> None:
    code, err = _main([*TINY, f"data.path={archive}", f"paths.cache_dir={cache_dir}", "+optim.lrr=0.1",
                       f"hydra.run.dir={tmp_path}/run"], monkeypatch, capsys)
    assert code == 2 and "did you mean optim.lr?" in _one_error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused before training"


# ================================================================ clear messages
def test_a_failure_while_building_names_the_key_and_the_cause(tmp_path: Path, archive: str, cache_dir: str,
                                                              monkeypatch, capsys) -> None:
    code, err = _main([*TINY, f"data.path={archive}", f"paths.cache_dir={cache_dir}", "+trick=ema",
                       "callbacks.checkpoint.save_top_k=abc", f"hydra.run.dir={tmp_path}/run"], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 1 and "building callbacks.checkpoint (lightning.pytorch.callbacks.model_checkpoint" in line
    # Our own callbacks check their numbers: a mistake to fix, named by its key.
    code, err = _main([*TINY, f"data.path={archive}", f"paths.cache_dir={cache_dir}", "+trick=ema",
                       "callbacks.ema.momentum=abc", f"hydra.run.dir={tmp_path}/run2"], monkeypatch, capsys)
    assert code == 2 and "callbacks.ema.momentum='abc' must be a number in [0, 1); Page: 0.99" in _one_error_line(err)


def test_an_unquoted_path_with_a_space_says_to_quote_it(monkeypatch, capsys) -> None:
    code, err = _main(["data.source=image_folder", "data.path=/my", "data/cifar10.tar.gz"], monkeypatch, capsys)
    assert code == 2 and "quote the whole override" in _one_error_line(err)


def test_the_cpu_estimate_probe_accepts_any_valid_ghost_split(compose_cfg, capsys) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg("+trick=ghost_bn", "model.norm.ghost_splits=32", "model.width=0.5", "trainer=cpu")
    validate(cfg)
    train_lib._warn_if_full_width_on_cpu(cfg, instantiate(cfg.model))
    assert "[cpu] no CUDA" in capsys.readouterr().out


# ================================================================ report inputs
def _results(root: Path, job: int, content: bytes) -> None:
    (root / str(job)).mkdir(parents=True)
    (root / str(job) / "results.json").write_bytes(content)


def test_report_survives_bad_results_files(tmp_path: Path) -> None:
    root = tmp_path / "multi"
    good = {"status": "ok", "test_acc": 0.9, "train_seconds": 10.0, "overrides": "a=1 seed=0", "seed": 0}
    _results(root, 0, json.dumps(good).encode())
    _results(root, 1, b"[1, 2, 3]")
    _results(root, 2, json.dumps({**good, "test_acc": "0.91"}).encode())
    _results(root, 3, b"\xff\xfe not utf-8 \x80")
    _results(root, 4, b"{truncated")
    assert report_lib.main([str(root)]) == 0
    text = (root / "report.md").read_text()
    assert "| 1 | (shared settings) | 1 | 90.00 |" in text or "| 1 | a=1 | 1 | 90.00 |" in text
    assert "holds a JSON list, not an object" in text
    assert "test_acc='0.91' is not a finite number" in text
    assert "3/results.json: not UTF-8" in text and "JSONDecodeError" in text


def test_report_into_an_unwritable_place_says_where(tmp_path: Path, capsys) -> None:
    root = tmp_path / "multi"
    _results(root, 0, json.dumps({"status": "ok", "test_acc": 0.9, "overrides": "seed=0"}).encode())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert report_lib.main([str(root), "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the report into {blocker / 'report'}" in err and "Traceback" not in err
    runs_csv = tmp_path / "bad.csv"
    runs_csv.write_bytes(b"\xff\xfe\x00garbage")
    assert report_lib.main([str(runs_csv)]) == 2
    assert "is not a runs CSV" in capsys.readouterr().err
