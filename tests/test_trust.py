"""The fault suite, part two: what a user can trust (issue 17). One class of fault at a time.

Classes: files from someone else that try to run code (model.pt, last.ckpt), eval.py that must
reproduce the run from the file alone, cause chains that loop, two runs into one folder, archives
that cost without bound, errors that must be one line, messages that must be true, and the model
file's inputs. Each case asserts the exit status, one clear line and that nothing was touched.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import preloaded_python
import pytest
import torch
from conftest import REPO, TINY, run_train
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from test_faults import _main, _one_error_line, _tiny_dataset

from cifar_speedrun import evaluate as evaluate_lib
from cifar_speedrun.errors import UserError, cause_chain, describe, find_user_error
from cifar_speedrun.operations import archive as archive_lib
from cifar_speedrun.operations import interrupts, run_lock
from cifar_speedrun.operations.archive import safe_extract
from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import load_cifar10_uint8
from cifar_speedrun.recipe.models import build, by_name, default_settings, target_of
from cifar_speedrun.records.model_file import FORMAT, build_model, load_model

DAVIDNET = "cifar_speedrun.recipe.models.davidnet.DavidNet"


def _eval_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """eval.py's main() in this process, as a user starts it: exit code and stderr."""
    return _main(argv, monkeypatch, capsys, entry=evaluate_lib.main, program="eval.py")


def _eval_process(args: list[str], cwd: Path, cache_dir: str) -> subprocess.CompletedProcess[str]:
    """eval.py as a user runs it, with no CIFAR10_ARCHIVE: the data must come from the checkpoint."""
    env = {key: value for key, value in os.environ.items() if key != "CIFAR10_ARCHIVE"}
    env.update(CIFAR_SPEEDRUN_CACHE=cache_dir, PYTHONUNBUFFERED="1")
    return preloaded_python.run([sys.executable, str(REPO / "eval.py"), *args, f"paths.log_dir={cwd}/logs"], cwd=cwd,
                                env=env, timeout=900)


# ================================================================ a file from someone else runs no code
def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


def _attacks(victim: Path, payload: Path) -> list[tuple[str, dict]]:
    """Model configs an attacker could put in model.pt or a checkpoint, one per class of attack."""
    return [
        ("attribute path through an imported module (truncate a file)",
         {"_target_": "cifar_speedrun.recipe.models.base.torch.os.open", "path": str(victim),
          "flags": os.O_TRUNC | os.O_WRONLY}),
        ("attribute path to torch.save (overwrite a file)",
         {"_target_": "cifar_speedrun.recipe.models.base.torch.save", "obj": "owned", "f": str(victim)}),
        ("attribute path to makedirs", {"_target_": "cifar_speedrun.recipe.models.base.torch.os.makedirs",
                                        "name": str(victim.parent / "made")}),
        ("torch.load of a second file without weights_only",
         {"_target_": "cifar_speedrun.recipe.models.base.torch.load", "f": str(payload), "weights_only": False}),
        ("a plain module function", {"_target_": "os.system", "command": f"echo owned > {victim}"}),
        ("a target that is not text", {"_target_": ["os", "system"]}),
        ("nested target in an argument", {"_target_": DAVIDNET,
                                          "norm": {"_target_": "os.system", "command": f"echo owned > {victim}"}}),
        ("nested target in a list", {"_target_": DAVIDNET, "whitening": [{"_target_": "os.getcwd"}]}),
        ("positional _args_", {"_target_": DAVIDNET, "_args_": [1.0]}),
        ("_partial_", {"_target_": DAVIDNET, "_partial_": True}),
        ("_recursive_ / _convert_", {"_target_": DAVIDNET, "_recursive_": False, "_convert_": "all"}),
        ("an argument the class does not take", {"_target_": DAVIDNET, "command": "echo owned"}),
        ("a non-data argument value (a tensor)", {"_target_": DAVIDNET, "width": torch.tensor(1.0)}),
    ]


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    """A pickle that would write a file if anything unpickled it without weights_only."""
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "payload.pt"
    path.write_bytes(pickle.dumps(Payload()))
    return path


def test_every_attack_class_on_a_model_config_builds_nothing(tmp_path: Path, payload: Path) -> None:
    victim = _victim(tmp_path)
    for name, config in _attacks(victim, payload):
        with pytest.raises(UserError) as info:
            build_model(config, "handed.pt")
        message = str(info.value)
        assert "\n" not in message and message.startswith("handed.pt") and "refusing" in message, name
    assert victim.read_text() == "precious" and not (tmp_path / "made").exists()
    assert not (tmp_path / "payload-ran").exists()
    # Text is passed as text: an interpolation in a file is never resolved (here: not an activation name).
    with pytest.raises(UserError, match=r"model.activation='\$\{oc.env:HOME\}' is not known"):
        build_model({"_target_": DAVIDNET, **default_settings("davidnet"), "activation": "${oc.env:HOME}"},
                    "handed.pt")


@pytest.mark.parametrize("family", ["davidnet", "airbench94", "resnet18"])
def test_the_registry_builds_each_family_from_its_plain_config(family: str) -> None:
    settings = default_settings(family)
    settings["width"] = 0.125
    if "ghost" != settings["norm"]["kind"]:
        settings["norm"] = {**settings["norm"], "kind": "ghost", "ghost_splits": 4}
    net = build_model({"_target_": target_of(by_name(family)), **settings}, "model.pt")
    assert isinstance(net, by_name(family)) and net(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    # Files written before the models/ package name the old module; they still load.
    if family != "resnet18":
        old = {"davidnet": "cifar_speedrun.model.DavidNet", "airbench94": "cifar_speedrun.model.AirbenchNet"}[family]
        assert isinstance(build_model({"_target_": old, **settings}, "old.pt"), by_name(family))


def _model_file(path: Path, config: dict, state: dict | None = None) -> Path:
    torch.save({"format": FORMAT, "model_config": config, "state_dict": state or {}, "mean": [0.0] * 3,
                "std": [1.0] * 3, "classes": list(CIFAR10_CLASSES)}, path)
    return path


def _checkpoint(path: Path, config: dict) -> Path:
    torch.save({"state_dict": {}, "epoch": 0, "hyper_parameters": {"run_config": {"config": {"model": config}}}},
               path)
    return path


@pytest.mark.parametrize("index", range(5), ids=["os.open", "torch.save", "makedirs", "torch.load", "os.system"])
def test_a_hostile_model_file_or_checkpoint_through_load_model_and_eval_is_refused(
        index: int, tmp_path: Path, payload: Path, monkeypatch, capsys) -> None:
    victim = _victim(tmp_path)
    name, config = _attacks(victim, payload)[index]
    model_pt = _model_file(tmp_path / "model.pt", config)
    ckpt = _checkpoint(tmp_path / "last.ckpt", config)
    with pytest.raises(UserError, match="not one of this project's model families"):
        load_model(str(model_pt))
    for path in (model_pt, ckpt):
        code, stderr = _eval_main([f"ckpt_path={path}", f"paths.log_dir={tmp_path}/logs"], monkeypatch, capsys)
        assert code == 2 and "refusing to build it" in _one_error_line(stderr), (name, stderr)
    assert victim.read_text() == "precious" and not (tmp_path / "made").exists()
    assert not (tmp_path / "payload-ran").exists()


# ================================================================ eval.py reproduces the run, from the file alone
# Every experiment and averaging trick, under tiny settings; the last sweep is shorter than each
# averaging's start.
TINY_CPU = ["trainer=cpu", "data.source=image_folder", "model.width=0.125", "data.test_subset=300",
            "trainer.enable_progress_bar=false"]
SWEEPS = {
    "experiments": ["experiment=page_baseline,page_final,airbench94,airbench94_muon,resnet18", "data.subset=1024",
                    "data.batch_size=256", "epochs=3"],
    "averaging": ["+trick=ema,lookahead", "data.subset=512", "data.batch_size=128", "epochs=3",
                  "optim.schedule.epochs=[0,1,3]", "callbacks.checkpoint.save_top_k=-1",
                  "callbacks.checkpoint.filename='{epoch}'"],
    # 3 steps in all: page_final's EMA updates first at step 5, airbench94's lookahead at epoch 3 (0-based).
    "shorter than the averaging's start": ["experiment=airbench94,page_final", "data.subset=256",
                                           "data.batch_size=256", "epochs=3"],
}


@pytest.fixture(scope="module")
def swept_runs(tmp_path_factory: pytest.TempPathFactory, archive: str, cache_dir: str) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("swept")
    runs = {}
    for name, overrides in SWEEPS.items():
        sweep = root / name.replace(" ", "_").replace("'", "")
        result = run_train(["-m", *TINY_CPU, *overrides, f"hydra.sweep.dir={sweep}"], root, cache_dir, archive,
                           timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = sorted(p.parent for p in sweep.glob("*/results.json"))
    return runs


def _sweep_of(key: str, values: list[str]) -> str:
    """A multirun override over paths, each quoted (a checkpoint's name holds '=')."""
    return f"{key}=" + ",".join(f"'{value}'" for value in values)


@pytest.mark.slow
def test_eval_of_last_ckpt_and_model_pt_reproduces_every_runs_own_accuracy(swept_runs, tmp_path: Path,
                                                                          cache_dir: str) -> None:
    """One eval.py multirun over every run's last.ckpt and model.pt, with no data settings given."""
    paths, expected = [], {}
    for runs in swept_runs.values():
        for run in runs:
            record = json.loads((run / "results.json").read_text())
            assert record["status"] == "ok"
            for file in (run / "checkpoints" / "last.ckpt", run / "model.pt"):
                if file.exists() or file.name == "model.pt":
                    paths.append(str(file))
                    expected[str(file)] = record["test_acc"]
    with_ckpt = [p for p in paths if p.endswith("last.ckpt")]
    # 5 experiments + 2 shorter runs; the averaging sweep keeps each epoch's file instead (next test).
    assert len(with_ckpt) == 7, with_ckpt
    result = _eval_process(["-m", _sweep_of("ckpt_path", paths), "trainer=cpu", f"hydra.sweep.dir={tmp_path}/ev"],
                           tmp_path, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in (tmp_path / "ev").glob("*/results.json"):
        evaluated = json.loads(job.read_text())
        assert evaluated["test_acc"] == pytest.approx(expected[evaluated["ckpt_path"]], abs=1e-6), evaluated
        assert evaluated["data"]["source"] == "image_folder" and evaluated["test_images"] == 300
    assert len(list((tmp_path / "ev").glob("*/results.json"))) == len(paths)


@pytest.mark.slow
def test_a_run_shorter_than_its_averaging_says_the_average_never_started(swept_runs) -> None:
    """Its accuracy is the raw weights': results.json says the average had 0 updates (and the run printed it)."""
    updates = {}
    for run in swept_runs["shorter than the averaging's start"]:
        record = json.loads((run / "results.json").read_text())
        updates.update({key: value for key, value in record.items() if key.endswith("_updates")})
    assert updates == {"ema_updates": 0, "lookahead_updates": 0}, updates
    averaged = [json.loads((run / "results.json").read_text()) for run in swept_runs["averaging"]]
    assert [r["ema_updates"] > 0 for r in averaged if "ema_updates" in r] == [True], "3 epochs: EMA started"


@pytest.mark.slow
def test_a_mid_run_checkpoint_holds_what_the_run_evaluated_then(swept_runs, tmp_path: Path, cache_dir: str) -> None:
    """Every epoch's checkpoint of the EMA and lookahead runs scores that epoch's own test accuracy."""
    paths, expected = [], {}
    for run in swept_runs["averaging"]:
        history = json.loads((run / "results.json").read_text())["history"]
        assert len(history) == 3
        for epoch, entry in enumerate(history):
            checkpoint = run / "checkpoints" / f"epoch={epoch}.ckpt"  # Lightning's '{epoch}': the 0-based index
            assert checkpoint.exists(), sorted(p.name for p in checkpoint.parent.iterdir())
            paths.append(str(checkpoint))
            expected[str(checkpoint)] = entry["test_acc"]
    result = _eval_process(["-m", _sweep_of("ckpt_path", paths), f"hydra.sweep.dir={tmp_path}/ev"], tmp_path,
                           cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = {json.loads(p.read_text())["ckpt_path"]: json.loads(p.read_text())["test_acc"]
              for p in (tmp_path / "ev").glob("*/results.json")}
    assert scored == pytest.approx(expected, abs=1e-6)  # the run records fp32 (torchmetrics): 1e-6 < 1/300


@pytest.mark.slow
def test_eval_takes_train_py_groups_that_make_sense_and_refuses_the_others(swept_runs, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    model_pt = swept_runs["shorter than the averaging's start"][0] / "model.pt"
    code, stderr = _eval_main([f"ckpt_path={model_pt}", "trainer=cpu", f"paths.log_dir={tmp_path}/logs"],
                              monkeypatch, capsys)
    assert code == 0, stderr
    for group in ("debug=smoke", "experiment=page_final", "model=airbench94", "proxy=cpu", "optim=muon"):
        code, stderr = _eval_main([f"ckpt_path={model_pt}", group, f"paths.log_dir={tmp_path}/logs"], monkeypatch,
                                  capsys)
        assert code == 2 and f"{group} shapes training" in _one_error_line(stderr)
    code, stderr = _eval_main([f"ckpt_path={model_pt}", "trainer=ddp"], monkeypatch, capsys)
    assert code == 2 and "runs on one device" in _one_error_line(stderr)


@pytest.mark.slow
def test_eval_refuses_weights_that_are_not_finite_or_do_not_fit(swept_runs, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    model_pt = swept_runs["shorter than the averaging's start"][0] / "model.pt"
    blob = torch.load(model_pt, weights_only=True)
    first = next(key for key, value in blob["state_dict"].items() if value.is_floating_point())
    blob["state_dict"][first] = blob["state_dict"][first].clone().fill_(float("nan"))
    torch.save(blob, tmp_path / "nan.pt")
    code, stderr = _eval_main([f"ckpt_path={tmp_path / 'nan.pt'}", f"paths.log_dir={tmp_path}/logs"], monkeypatch,
                              capsys)
    assert code == 2 and f"not finite (NaN or inf in {first})" in _one_error_line(stderr)
    blob = torch.load(model_pt, weights_only=True)
    blob["model_config"]["width"] = 0.25  # the stored config disagrees with the weights
    torch.save(blob, tmp_path / "mismatch.pt")
    code, stderr = _eval_main([f"ckpt_path={tmp_path / 'mismatch.pt'}", f"paths.log_dir={tmp_path}/logs"],
                              monkeypatch, capsys)
    assert code == 2 and "do not fit the model its stored config describes" in _one_error_line(stderr)


# ================================================================ cause chains end; each error is raised once
def test_cause_chain_walks_end_on_a_self_cause_and_on_a_cycle() -> None:
    looping = OSError(5, "I/O error")
    looping.__cause__ = looping
    assert list(cause_chain(looping)) == [looping] and find_user_error(looping) is None
    first, second = RuntimeError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert list(cause_chain(first)) == [first, second]
    hidden = UserError("the fix")
    wrapper, middle = RuntimeError("wrapped"), KeyError("k")
    wrapper.__cause__, middle.__cause__, hidden.__cause__ = middle, hidden, wrapper  # a cycle through the UserError
    assert find_user_error(wrapper) is hidden

    class InstantiationException(Exception):  # Hydra's wrapper, by name
        pass

    wrapped = InstantiationException("Error in call to target 'x':\nfull_key: model")
    wrapped.__cause__ = wrapped
    assert describe(wrapped).startswith("building model")


def test_a_non_disk_os_error_is_raised_once_not_as_its_own_cause(tmp_path: Path, monkeypatch) -> None:
    from cifar_speedrun.operations import storage

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage.tempfile, "mkstemp", broken)
    with pytest.raises(OSError) as info:
        storage.write_bytes_atomic(b"x", str(tmp_path / "f"))
    assert info.value.__cause__ is not info.value


@pytest.mark.parametrize("setting,message", [
    ("paths.cache_dir={file}", "cannot use paths.cache_dir (data.cache_dir)={file}: {file} is a file, not a folder"),
    ("paths.checkpoint_dir={file}", "cannot use paths.checkpoint_dir={file}: {file} is a file, not a folder"),
    ("hydra.run.dir={tmp}/" + "x" * 300, "a name in it is longer than the filesystem allows"),
    ("hydra.run.dir={file}/run", "{file} is a file, not a folder"),
    ("logger.csv.save_dir={file}", "cannot use logger.csv.save_dir={file}: {file} is a file, not a folder"),
    ("logger=tensorboard logger.tensorboard.save_dir={file}/tb",
     "cannot use logger.tensorboard.save_dir={file}/tb: {file} is a file, not a folder"),
    ("logger=wandb logger.wandb.save_dir={file}", "cannot use logger.wandb.save_dir={file}: {file} is a file"),
], ids=["cache dir is a file", "checkpoint dir is a file", "300-character folder name", "run dir under a file",
        "csv logger's folder", "tensorboard's folder", "W&B's folder"])
def test_places_that_cannot_be_used_exit_2_at_once(setting: str, message: str, tmp_path: Path, archive: str,
                                                   cache_dir: str) -> None:
    file = tmp_path / "a-file"
    file.write_text("in the way")
    result = run_train([*TINY, *setting.format(file=file, tmp=tmp_path).split()], tmp_path, cache_dir, archive,
                       timeout=180, env={"WANDB_MODE": "offline"})
    assert result.returncode == 2 and message.format(file=file) in _one_error_line(result.stderr)


# ================================================================ one run per folder
def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from cifar_speedrun.operations import run_lock; "
            "assert run_lock.try_lock(sys.argv[1], 'hydra.run.dir') is None; print('locked', flush=True); "
            "time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_folder_in_use_is_refused_and_a_killed_holder_leaves_no_stuck_lock(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = _hold_in_another_process(folder)
    try:
        with pytest.raises(UserError, match=f"{folder} is in use by another run \\(pid {holder.pid} on "):
            run_lock.lock_run_folder(str(folder), chosen=True)
        moved = run_lock.lock_run_folder(str(folder), chosen=False)  # a default folder moves on instead
        assert moved == f"{folder}_1"
        run_lock.release(moved)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_lock.lock_run_folder(str(folder), chosen=True) == str(folder), "the kernel released the lock"
    run_lock.release(str(folder))


def test_a_default_folder_that_holds_a_finished_run_is_not_reused(tmp_path: Path) -> None:
    folder = tmp_path / "2026-11-30_12-00-00"
    (folder / ".hydra").mkdir(parents=True)
    assert run_lock.lock_run_folder(str(folder), chosen=False) == f"{folder}_1"
    run_lock.release(f"{folder}_1")
    assert run_lock.lock_run_folder(str(folder), chosen=True) == str(folder), "a chosen folder is reused as asked"
    run_lock.release(str(folder))


@pytest.mark.slow
def test_a_second_train_py_into_a_running_runs_folder_is_refused_and_touches_nothing(
        tmp_path: Path, archive: str, cache_dir: str) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, "epochs=200",
                              "optim.schedule.epochs=[0,1,200]",
                              "seed=7", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}/logs"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "results.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # the first run is training (it wrote results.json after its first epoch)
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        for args in ([*TINY, "seed=8", f"hydra.run.dir={run_dir}"], [f"hydra.run.dir={run_dir}", "resume=true"],
                     ["-m", *TINY, "seed=8,9", f"hydra.sweep.dir={run_dir}"]):
            second = run_train(args, tmp_path, cache_dir, archive, timeout=300)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"{run_dir} is in use by another run (pid {first.pid}" in _one_error_line(second.stderr)
            assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides, "its config is untouched"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["seed"] == 7 and results["status"] == "interrupted"


# ================================================================ archives: only what the dataset needs, within limits
def _png_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _dataset_members(top: str = "cifar10/", per_class: int = 1) -> dict[str, bytes]:
    return {f"{top}{split}/{label}/{i}.png": _png_bytes(i) for split in ("train", "test")
            for label in CIFAR10_CLASSES for i in range(per_class)}


def _tar(path: Path, members: dict[str, bytes], declared: dict[str, int] | None = None) -> Path:
    """A .tar with the given members; `declared` gives a header size with no data behind it."""
    with tarfile.open(path, "w") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
        for name, size in (declared or {}).items():
            info = tarfile.TarInfo(name)
            info.size = size
            header = info.tobuf(bundle.format, bundle.encoding, bundle.errors)
            bundle.fileobj.write(header)  # the header only: a claim of `size` bytes with nothing behind it
            bundle.offset += len(header)
    return path


def test_a_member_claiming_a_gigabyte_is_refused_before_anything_is_extracted(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "bomb.tar", _dataset_members(),
                   declared={"cifar10/train/cat/huge.png": 1 << 30})
    target = tmp_path / "extract"
    with pytest.raises(UserError, match=r"'cifar10/train/cat/huge.png' is 1,073,741,824 bytes, more than 262,144"):
        safe_extract(archive, target)
    assert not any(p.is_file() for p in target.rglob("*")), "nothing was extracted"


@pytest.mark.parametrize("limit,value,members,message", [
    ("MAX_MEMBERS", 50, {f"junk/{i}.txt": b"" for i in range(60)}, "more than 50 entries"),
    ("MAX_IMAGES", 15, _dataset_members(), "more than 15 images"),
    ("MAX_TOTAL_BYTES", 20_000, _dataset_members(), "add up to more than 20,000 bytes"),
], ids=["entries", "images", "total size"])
def test_each_archive_limit_is_one_line(limit, value, members, message, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(archive_lib, limit, value)
    with pytest.raises(UserError, match=message) as info:
        safe_extract(_tar(tmp_path / "a.tar", members), tmp_path / "extract")
    assert "\n" not in str(info.value)


def test_the_limits_are_cifar_sized() -> None:
    real = 60_022  # entries of ../shared's CIFAR-10 archive (60,000 images + 22 folders), at most 1,124 bytes each
    assert archive_lib.MAX_MEMBERS >= 2 * real and archive_lib.MAX_IMAGES >= 60_000
    assert archive_lib.MAX_IMAGE_BYTES >= 16 * 1024 and archive_lib.MAX_TOTAL_BYTES >= 10 * 55_250_913


def test_a_macos_zip_loads_and_junk_is_not_extracted(tmp_path: Path, capsys) -> None:
    path = tmp_path / "cifar10.zip"
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in _dataset_members().items():
            bundle.writestr(name, data)
            folder, _, file = name.rpartition("/")
            bundle.writestr(f"__MACOSX/{folder}/._{file}", b"apple double")
        bundle.writestr("cifar10/.DS_Store", b"\0")
        bundle.writestr("cifar10/README.txt", "hello")
    data = load_cifar10_uint8("image_folder", None, str(path), str(tmp_path / "cache"))
    assert len(data.train_y) == 10 and len(data.test_y) == 10
    assert "skipped 22 other files" in capsys.readouterr().out
    assert not list((tmp_path / "cache").glob("extract-*")), "the scratch folder is gone"


def test_an_archive_without_the_layout_names_its_own_top_folders(tmp_path: Path) -> None:
    members = {"photos/cat.png": _png_bytes(), "photos/holiday/dog.png": _png_bytes(1), "README.txt": b"hello"}
    with pytest.raises(UserError) as info:
        load_cifar10_uint8("image_folder", None, str(_tar(tmp_path / "wrong.tar", members)), str(tmp_path / "cache"))
    message = str(info.value)
    assert "wrong.tar holds no images in train/<class>/" in message and "README.txt, photos" in message
    assert "extract-" not in message


def test_errors_inside_an_archive_name_the_archive_not_a_scratch_folder(tmp_path: Path) -> None:
    members = _dataset_members()
    members["cifar10/train/cat/0.png"] = b"not a png"
    with pytest.raises(UserError) as info:
        load_cifar10_uint8("image_folder", None, str(_tar(tmp_path / "handed.tar", members)), str(tmp_path / "cache"))
    assert "handed.tar:cifar10/train/cat/0.png" in str(info.value) and "extract-" not in str(info.value)
    two = {**_dataset_members("a/"), **_dataset_members("b/")}
    with pytest.raises(UserError, match=r"two datasets \(a/ and b/\)"):
        safe_extract(_tar(tmp_path / "two.tar", two), tmp_path / "x")


def _png_claiming(width: int, height: int) -> bytes:
    """A real 32x32 PNG whose header says width x height (the CRC recomputed, so it parses)."""
    data = bytearray(_png_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_a_decompression_bomb_header_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    dataset = _tiny_dataset(tmp_path / "d")
    (dataset / "train" / "cat" / "0.png").write_bytes(_png_claiming(20_000, 20_000))
    with pytest.raises(UserError, match="claims to be a huge image"):
        load_cifar10_uint8("image_folder", None, str(dataset), str(tmp_path / "cache"), verbose=False)
    code, stderr = _main([*TINY, f"data.path={dataset}", f"paths.cache_dir={tmp_path}/cache2",
                          f"hydra.run.dir={tmp_path}/run"], monkeypatch, capsys)
    assert code == 2 and "claims to be a huge image" in _one_error_line(stderr)


# ================================================================ clean errors everywhere
@pytest.mark.parametrize("argv,message", [
    (["lr=0.1"], "unknown key lr: did you mean optim.lr=0.1?"),
    (["optim.lrr=0.1"], "unknown key optim.lrr: did you mean optim.lr=0.1?"),
    (["data.bach_size=64"], "unknown key data.bach_size: did you mean data.batch_size=64?"),
    (["+trick=label_smoothing,celu"], "'+trick=[label_smoothing,celu]'"),
    (["optim.lr=${optim.lr}"], "Recursive interpolation detected"),
    (["optim.lr=${optim.nothing}"], "Interpolation key 'optim.nothing' not found"),
    (["trainer.precision=16-mixed"], "trainer.precision=16-mixed is fp16 autocast, which needs CUDA"),
    (["tags=[héllo]"], "tags=[héllo] cannot be read as a Hydra override: quote a value"),
    (["tags=[paper,日本]"], "tags=[paper,日本] cannot be read as a Hydra override: quote a value"),
    (["tags=['a'],tags=['c']"], "tags=['a'],tags=['c'] cannot be read as a Hydra override"),
    ([f"tags=['{'x' * 65}']"], "must be text of at most 64 characters"),
    (["tags=['']"], "tags[0]='' must be non-empty text"),
], ids=["top-level typo", "nested typo", "typo in data", "unquoted list", "recursive interpolation",
        "missing interpolation", "fp16 on a CPU", "accent unquoted", "other script unquoted",
        "two overrides in one word", "tag over W&B's 64 characters", "empty tag"])
def test_mistakes_are_one_line_with_the_fix(argv, message, tmp_path: Path, monkeypatch, capsys) -> None:
    code, stderr = _main([*TINY, *argv, f"hydra.run.dir={tmp_path}/run"], monkeypatch, capsys)
    assert code == 2 and message in _one_error_line(stderr)


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_hydra_full_error_is_read_by_value(value: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "lr=0.1", f"hydra.run.dir={tmp_path}/run"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", value)
    from cifar_speedrun import train as train_lib

    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as info:
        train_lib.main()
    assert info.value.code == 2 and "did you mean optim.lr" in _one_error_line(capsys.readouterr().err)
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "lr=0.1", f"hydra.run.dir={tmp_path}/run"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback, as Hydra means it
    GlobalHydra.instance().clear()
    with pytest.raises(Exception, match="Could not override 'lr'"):
        train_lib.main()
    GlobalHydra.instance().clear()


# ================================================================ messages that are true
@pytest.mark.slow
def test_sigterm_before_the_first_checkpoint_does_not_offer_a_resume(tmp_path: Path, archive: str,
                                                                      cache_dir: str) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, "data.subset=10000",
                                "data.batch_size=10", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}/logs"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("[run] "):  # training has started; its first epoch takes a while
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    line = _one_error_line(stderr)
    assert process.returncode == 143 and "no checkpoint had been written when it stopped" in line
    assert "resume=true" not in line and not (run_dir / "checkpoints" / "last.ckpt").exists()


def test_broken_and_looping_symlinks_are_counted(tmp_path: Path, capsys) -> None:
    dataset = _tiny_dataset(tmp_path / "d")
    (dataset / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (dataset / "train" / "dog" / "loop.png").symlink_to(dataset / "train" / "dog" / "loop.png")
    data = load_cifar10_uint8("image_folder", None, str(dataset), str(tmp_path / "cache"))
    assert len(data.train_y) == 20
    assert "train: skipped 2 broken or looping symlinks" in capsys.readouterr().out


def test_the_run_line_lists_only_tricks_in_effect() -> None:
    from cifar_speedrun.records.tracking import tricks_in_effect

    assert tricks_in_effect(["mixed_precision", "ema"], "32-true") == (["ema"], ["mixed_precision"])
    assert tricks_in_effect(["mixed_precision", "ema"], "bf16-mixed") == (["mixed_precision", "ema"], [])


def test_results_name_the_commit_the_run_started_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout edited during a run (a results CSV merged, a doc fixed) does not relabel the run's code."""
    from types import SimpleNamespace

    from cifar_speedrun.records import results as callbacks

    monkeypatch.setattr(callbacks, "code_version", lambda: "abc123")
    writer = callbacks.ResultsWriter(str(tmp_path))
    monkeypatch.setattr(callbacks, "code_version", lambda: "abc123-dirty")  # the tree changes mid-run
    trainer = SimpleNamespace(callbacks=[], datamodule=None, max_epochs=1, precision="32-true", world_size=1,
                              is_global_zero=True)
    writer.record(trainer, SimpleNamespace(hparams={}, device=torch.device("cpu")), "ok")  # type: ignore[arg-type]
    assert json.loads((tmp_path / "results.json").read_text())["git_commit"] == "abc123"


@pytest.mark.slow
def test_results_name_the_code_commit_and_no_lightning_chatter(tmp_path: Path, archive: str, cache_dir: str) -> None:
    """Started from outside the checkout (cwd is a temp folder), a run still records the code's commit."""
    result = run_train([*TINY, "experiment=airbench94", "proxy=cpu", "data.subset=512", "data.batch_size=128",
                        f"hydra.run.dir={tmp_path}/run"], tmp_path, cache_dir, archive)
    assert result.returncode == 0, result.stderr[-3000:]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["git_commit"].startswith(commit)
    run_line = next(line for line in result.stdout.splitlines() if line.startswith("[run] "))
    assert "32-true, step eager · tricks: channels_last" in run_line
    assert "(not in effect at 32-true: mixed_precision)" in run_line
    for chatter in ("smaller than the logging interval", "exists and is not empty"):
        assert chatter not in result.stderr + result.stdout


# ================================================================ the model file's inputs
def test_the_classifier_takes_uint8_or_unit_floats_and_refuses_the_rest(tmp_path: Path) -> None:
    from cifar_speedrun.records.model_file import Classifier

    torch.manual_seed(0)
    net = build("davidnet", width=0.125)
    classifier = Classifier(net, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7), CIFAR10_CLASSES)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    logits = classifier(images)
    assert torch.allclose(classifier(images.float() / 255), logits, atol=1e-4)
    assert classifier(images[0]).shape == (1, 10)
    probabilities = classifier.probabilities(images)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(4))
    top = classifier.topk(images, k=3)
    assert len(top) == 4 and all(a[1] >= b[1] for row in top for a, b in zip(row, row[1:], strict=False))
    assert [row[0][0] for row in top] == classifier.classify(images)
    with pytest.raises(ValueError, match="float images must be in \\[0, 1\\]"):
        classifier(images.float())
    with pytest.raises(ValueError, match="channels last"):
        classifier(images.permute(0, 2, 3, 1))


# ================================================================ cleanup survives a second signal
@pytest.mark.sends_itself_signals
def test_a_cleanup_finishes_through_two_signals_then_the_interruption_arrives(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "extract-scratch"
    for i in range(200):
        (folder / str(i % 10)).mkdir(parents=True, exist_ok=True)
        (folder / str(i % 10) / f"{i}.png").write_bytes(b"x")
    previous = signal.getsignal(signal.SIGTERM)
    interrupts.raise_on_signals()
    try:
        with pytest.raises(interrupts.RunInterrupted):
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                shutil.rmtree(folder)
        assert not folder.exists(), "the removal finished before the interruption was delivered"
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ================================================================ a hostile file's other fields, size and data
def _smoke_model_file(tmp_path: Path) -> dict:
    """A real model.pt's contents (a tiny DavidNet), to be edited into hostile variants."""
    from cifar_speedrun.records.model_file import save_model_file

    net = build("davidnet", width=0.125)
    path = tmp_path / "real.pt"
    config = {"_target_": DAVIDNET, **default_settings("davidnet"), "width": 0.125}
    save_model_file(str(path), net, config, [125.0] * 3, [63.0] * 3, CIFAR10_CLASSES,
                    {"flip": False}, {}, {"source": "image_folder", "path": "/nowhere.tar.gz"}, "32-true")
    return torch.load(path, weights_only=True)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("edit,message", [
    ({"model_config": {"_target_": DAVIDNET, "width": 200.0}}, "values, more than"),
    ({"model_config": {"_target_": DAVIDNET, "num_classes": 10**10}}, "num_classes=10000000000 is not known"),
    ({"model_config": {"_target_": DAVIDNET, "width": 2.0}}, "weights do not fit"),
    ({"model_config": {"_target_": DAVIDNET, "whitening": {"enabled": True, "kernel_size": 300}}},
     "whitening.kernel_size=300 must be an integer in"),
    ({"model_config": {"_target_": DAVIDNET, "norm": _nested(100)}}, "nested deeper than"),
    ({"model_config": {"_target_": DAVIDNET, "activation": "x" * 100_000}}, "characters of text"),
    ({"model_config": {"_target_": DAVIDNET, "width": "1"}}, "do not build the model family DavidNet"),
    ({"mean": None}, "its mean is"),
    ({"std": [1.0, 0.0, 1.0]}, "its std is"),
    ({"tta": [1, 2]}, "its tta is"),
    ({"tta": {"flip": "yes"}}, "its tta.flip is"),
    ({"data": {"test_subset": "abc"}}, "its data.test_subset is"),
    ({"data": {"test_subset": -5}}, "its data.test_subset is"),
    ({"precision": "evil"}, "its precision is"),
], ids=["huge width", "huge head", "width the weights do not have", "huge whitening", "deep nesting", "long text",
        "text width", "no mean", "zero std", "tta not a dict", "tta flag not a bool", "test subset text",
        "negative test subset", "unknown precision"])
def test_every_field_of_a_model_file_is_checked_before_use(edit: dict, message: str, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    blob = _smoke_model_file(tmp_path)
    if "model_config" in edit:  # one setting of the real config changed
        edit = {"model_config": {**blob["model_config"], **edit["model_config"]}}
    blob = {**blob, **edit}
    torch.save(blob, tmp_path / "edited.pt")
    with pytest.raises(UserError, match=message):
        load_model(str(tmp_path / "edited.pt"))
    code, stderr = _eval_main([f"ckpt_path={tmp_path / 'edited.pt'}", f"paths.log_dir={tmp_path}/logs"],
                              monkeypatch, capsys)
    assert code == 2 and message in _one_error_line(stderr)


def test_a_model_files_data_root_is_never_used(tmp_path: Path, monkeypatch, capsys) -> None:
    """torchvision's download folder is the evaluator's (data.root), never one a file names."""
    blob = _smoke_model_file(tmp_path)
    planted = tmp_path / "planted"
    blob["data"] = {"source": "torchvision", "root": str(planted)}
    torch.save(blob, tmp_path / "handed.pt")
    own = tmp_path / "own-root"
    code, stderr = _eval_main([f"ckpt_path={tmp_path / 'handed.pt'}", f"data.root={own}",
                               f"paths.cache_dir={tmp_path}/cache", f"paths.log_dir={tmp_path}/logs"],
                              monkeypatch, capsys)
    assert code == 2 and f"data.root={own}" in _one_error_line(stderr)  # no network here: the download fails
    assert not planted.exists()


def test_skipped_members_count_against_the_bytes_read_and_long_names_are_skipped(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "readme.tar", _dataset_members(), declared={"README": 2 << 30})
    with pytest.raises(UserError, match="members add up to more than"):
        safe_extract(archive, tmp_path / "x")
    members = {**_dataset_members(), "cifar10/train/cat/" + "n" * 300 + ".png": _png_bytes()}
    root = safe_extract(_tar(tmp_path / "long.tar", members), tmp_path / "y")
    assert len(list((root / "train" / "cat").iterdir())) == 1


def test_an_archive_file_larger_than_any_cifar_archive_is_not_read(tmp_path: Path, monkeypatch) -> None:
    from cifar_speedrun.operations.sources import source_identity

    monkeypatch.setattr(archive_lib, "MAX_ARCHIVE_BYTES", 1000)
    big = tmp_path / "big.tar.gz"
    big.write_bytes(b"\0" * 2000)
    with pytest.raises(UserError, match="2,000 bytes, more than a CIFAR-sized dataset archive"):
        source_identity("image_folder", str(big))


# ================================================================ every way into a folder in use
@pytest.fixture()
def held_folder(tmp_path: Path):
    folder = tmp_path / "busy"
    holder = _hold_in_another_process(folder)
    yield folder, holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_eval_into_a_folder_in_use_is_refused(held_folder, tmp_path: Path, monkeypatch, capsys) -> None:
    folder, holder = held_folder
    model_pt = tmp_path / "m.pt"
    torch.save(_smoke_model_file(tmp_path), model_pt)
    for args in ([f"paths.output_dir={folder}", f"hydra.run.dir={tmp_path}/e1"], [f"hydra.run.dir={folder}"]):
        code, stderr = _eval_main([f"ckpt_path={model_pt}", *args], monkeypatch, capsys)
        assert code == 2 and f"in use by another run (pid {holder.pid}" in _one_error_line(stderr)
    assert sorted(p.name for p in folder.iterdir()) == [".run.lock"], "nothing written there"


@pytest.mark.parametrize("argv", [
    ["--run", "hydra.run.dir={busy}"],
    ["paths.checkpoint_dir={busy}/checkpoints", "hydra.run.dir={tmp}/r2"],
    ["paths.output_dir={busy}", "hydra.run.dir={tmp}/r3"],
    ["-m", "seed=0,1", "hydra.sweep.dir={busy_parent}"],
], ids=["--run", "shared checkpoint folder", "paths.output_dir", "multirun job folder"])
def test_train_into_a_folder_in_use_is_refused_before_anything_is_written(argv, held_folder, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    folder, holder = held_folder
    if "{busy_parent}" in " ".join(argv):  # a sweep whose job 0 is the held folder
        folder = tmp_path / "sweep" / "0"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder = _hold_in_another_process(folder)
    try:
        args = [a.format(busy=folder, tmp=tmp_path, busy_parent=folder.parent) for a in argv]
        monkeypatch.setenv("LOCAL_RANK", "1")  # an inherited LOCAL_RANK turns nothing off
        code, stderr = _main([*TINY, *args], monkeypatch, capsys)
        assert code == 2 and f"in use by another run (pid {holder.pid}" in _one_error_line(stderr)
        assert sorted(p.name for p in folder.iterdir()) == [".run.lock"], "nothing written there"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize("argv,message", [
    (["-cd", "/tmp"], "-cd is not taken here"),
    (["--config-name", "eval"], "--config-name is not taken here"),
    (["--frobnicate"], "unknown flag --frobnicate"),
    (["trainer.accelerator=cuda"], "but this machine has no CUDA device"),
    (["trainer.accelerator=mps"], "trainer.accelerator='mps' is not known; use auto, cpu, gpu, cuda"),
], ids=["config dir", "config name", "unknown flag", "cuda without cuda", "mps"])
def test_flags_and_devices_that_cannot_run_are_one_line(argv, message, tmp_path: Path, monkeypatch, capsys) -> None:
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, stderr = _main([*TINY, *argv, f"hydra.run.dir={tmp_path}/run"], monkeypatch, capsys)
    assert code == 2 and message in _one_error_line(stderr)


@pytest.mark.parametrize("argv,message", [
    (["device=meta"], "device='meta' is not a device here"),
    (["device=xpu"], "device='xpu' is not a device here"),
    (["ckpt_path=null"], "eval.py needs ckpt_path="),
    ([], "eval.py needs ckpt_path="),
], ids=["meta", "xpu", "null path", "no path"])
def test_eval_arguments_that_cannot_run_are_one_line_and_leave_no_folder(argv, message, tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    model_pt = tmp_path / "m.pt"
    torch.save(_smoke_model_file(tmp_path), model_pt)
    path = [] if any(a.startswith("ckpt_path") for a in argv) or not argv else [f"ckpt_path={model_pt}"]
    code, stderr = _eval_main([*path, *argv, f"paths.log_dir={tmp_path}/logs"], monkeypatch, capsys)
    assert code == 2 and message in _one_error_line(stderr)
    if "ckpt_path" in message:
        assert not (tmp_path / "logs").exists()


# ================================================================ a run writes through no link it did not make
@pytest.mark.parametrize("link,argv", [
    (".run.lock", ["hydra.run.dir={dir}"]),
    ("results.json", ["hydra.run.dir={dir}"]),
    ("csv/metrics.csv", ["hydra.run.dir={dir}"]),
    ("checkpoints", ["hydra.run.dir={dir}"]),  # a folder link: every checkpoint would land in the victim's folder
    ("0/.hydra", ["-m", "seed=0,1", "hydra.sweep.dir={dir}"]),  # inside a multirun's job folder
    (".run.lock", ["hydra.run.dir={tmp}/elsewhere", "paths.output_dir={dir}"]),
    ("last.ckpt", ["hydra.run.dir={tmp}/elsewhere", "paths.checkpoint_dir={dir}"]),
], ids=["lock file", "results.json", "metrics.csv", "checkpoint folder", "multirun job", "paths.output_dir",
        "paths.checkpoint_dir"])
def test_a_planted_link_in_a_run_folder_is_refused_and_its_target_untouched(link: str, argv: list[str],
                                                                            tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    """`ln -s <victim> <dir>/.run.lock` then a run into <dir> must not write `pid ...` into the victim (nor
    results, metrics, checkpoints or Hydra's files through any other planted link): refused in one line."""
    folder = tmp_path / "run"
    victim = tmp_path / "victim"
    if link in ("checkpoints", "0/.hydra"):
        victim.mkdir()
    else:
        victim.write_text("precious\n")
    (folder / link).parent.mkdir(parents=True, exist_ok=True)
    (folder / link).symlink_to(victim)
    before = sorted(p.name for p in victim.iterdir()) if victim.is_dir() else victim.read_text()
    code, stderr = _main([*TINY, *(a.format(dir=folder, tmp=tmp_path) for a in argv)], monkeypatch, capsys)
    line = _one_error_line(stderr)
    assert code == 2 and "holds a link no run makes" in line and f"{folder / link} -> {victim}" in line, line
    assert (sorted(p.name for p in victim.iterdir()) if victim.is_dir() else victim.read_text()) == before
    assert not (folder / "results.json").exists() or (folder / "results.json").is_symlink(), "no record written there"
    assert not (tmp_path / "elsewhere").exists(), "refused before Hydra wrote the run folder"


def test_the_lock_file_is_never_opened_through_a_link(tmp_path: Path) -> None:
    """Even planted after the check, the lock's open does not follow the link (O_NOFOLLOW)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / run_lock.LOCK_NAME).symlink_to(victim)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_lock, "refuse_links", lambda *args: None)  # the race: the link appears after the scan
        with pytest.raises(UserError):
            run_lock.try_lock(str(folder), "hydra.run.dir")
    assert victim.read_text() == "precious\n"


# ================================================================ a record is this run's or it is not read
def test_a_job_that_now_fails_is_counted_by_what_it_did_now_and_the_earlier_run_is_kept(tmp_path: Path,
                                                                                        monkeypatch,
                                                                                        capsys) -> None:
    """A multirun into a sweep folder whose job folders hold an earlier run ("ok", 91%, a model.pt): the job that
    now fails before training must count as failed, the report must not see the old accuracy under the new
    overrides, and eval.py must not find the old model.pt there. The earlier run is kept, moved aside."""
    sweep = tmp_path / "sweep"
    earlier = {"status": "ok", "test_acc": 0.91, "started_at": "2026-01-02T03:04:05+00:00", "history": []}
    for job in ("0", "1"):
        (sweep / job / "checkpoints").mkdir(parents=True)
        (sweep / job / "results.json").write_text(json.dumps(earlier))
        (sweep / job / "model.pt").write_bytes(b"earlier weights")
        (sweep / job / "checkpoints" / "last.ckpt").write_bytes(b"earlier checkpoint")
        os.utime(sweep / job / "results.json", (time.time() - 3600, time.time() - 3600))
    code, stderr = _main(["-m", *TINY, "seed=3,-1", f"hydra.sweep.dir={sweep}"], monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    from cifar_speedrun.records.multirun import job_outcomes
    from cifar_speedrun.records.report import load_runs

    assert [(job, status) for job, status, _ in job_outcomes(sweep)] == [("0", "ok"), ("1", "failed")]
    runs = load_runs(sweep)  # job 1's record (seed -1) is listed as unreadable, with its reason
    assert len(runs) == 2 and 0.91 not in [run.test_acc for run in runs], "the set-aside runs are not read"
    for job, status in (("0", "ok"), ("1", "failed")):
        record = json.loads((sweep / job / "results.json").read_text())
        assert record["status"] == status and record["test_acc"] != 0.91
        aside = sweep / job / "earlier-20260102T030405"
        assert json.loads((aside / "results.json").read_text()) == earlier, "the earlier run is kept, moved aside"
        assert (aside / "model.pt").read_bytes() == b"earlier weights"
        assert (aside / "checkpoints" / "last.ckpt").read_bytes() == b"earlier checkpoint"
    assert not (sweep / "1" / "model.pt").exists(), "no earlier model.pt beside the new failure"
    assert "seed=-1" in json.loads((sweep / "1" / "results.json").read_text())["error"]


def test_a_resumed_run_keeps_the_run_it_continues(tmp_path: Path) -> None:
    from cifar_speedrun.records.results import set_aside_earlier_run

    (tmp_path / "results.json").write_text('{"status": "interrupted"}')
    assert set_aside_earlier_run(str(tmp_path), continuing=True) is None
    assert (tmp_path / "results.json").is_file()
    first = set_aside_earlier_run(str(tmp_path), continuing=False)
    (tmp_path / "results.json").write_text("not json")  # unreadable: still an earlier run's, still kept
    second = set_aside_earlier_run(str(tmp_path), continuing=False)
    assert first != second and Path(first, "results.json").is_file()
    assert Path(second, "results.json").read_text() == "not json" and not (tmp_path / "results.json").exists()


def test_eval_into_a_training_runs_folder_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch,
                                                                                capsys) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the training run's config\n")
    (run / "results.json").write_text(json.dumps({"status": "ok", "test_acc": 0.9, "history": []}))
    model_pt = tmp_path / "m.pt"
    torch.save(_smoke_model_file(tmp_path), model_pt)
    code, stderr = _eval_main([f"ckpt_path={model_pt}", f"hydra.run.dir={run}"], monkeypatch, capsys)
    assert code == 2 and "holds a training run" in _one_error_line(stderr)
    assert (run / ".hydra" / "config.yaml").read_text() == "the training run's config\n"
    assert json.loads((run / "results.json").read_text())["test_acc"] == 0.9


def test_the_report_writes_through_no_planted_link(tmp_path: Path) -> None:
    from cifar_speedrun.records import report as report_lib

    sweep = tmp_path / "sweep"
    for job, seed in (("0", 0), ("1", 1)):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "results.json").write_text(json.dumps({
            "status": "ok", "test_acc": 0.5 + seed / 10, "train_seconds": 3.0, "time_to_target": None,
            "target_acc": 0.94, "seed": seed, "overrides": f"seed={seed}", "history": [
                {"epoch": 1, "test_acc": 0.5, "train_seconds": 3.0, "train_loss": 1.0}],
            "device": "cpu", "config": {"model": {"width": 0.125}}}))
    victims = {}
    for name in ("report.md", "report.csv", "report.png", "report-curves.png"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (sweep / name).symlink_to(victim)
        victims[name] = victim
    assert report_lib.main([str(sweep)]) == 0
    for name, victim in victims.items():
        assert victim.read_text() == "precious", name
        assert not (sweep / name).is_symlink() or not (sweep / name).exists(), name


def test_the_multirun_summary_does_not_count_a_record_older_than_the_multirun(tmp_path: Path) -> None:
    from cifar_speedrun.records.multirun import job_outcomes

    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / "results.json").write_text('{"status": "ok"}')
    os.utime(job / "results.json", (time.time() - 3600, time.time() - 3600))
    (job / ".hydra" / "config.yaml").write_text("{}")
    [(_, status, error)] = job_outcomes(tmp_path, since=time.time() - 60)
    assert status != "ok" and "earlier run" in error


def test_the_table_a_multirun_prints_holds_only_the_jobs_it_ran(tmp_path: Path) -> None:
    from cifar_speedrun.records.multirun import table_lines

    for job, seed in (("0", 0), ("1", 1), ("2", 2)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "results.json").write_text(json.dumps({
            "status": "ok", "test_acc": 0.5, "train_seconds": 3.0, "time_to_target": None, "target_acc": 0.94,
            "seed": seed, "overrides": f"seed={seed}", "history": [], "device": "cpu"}))
    text = "\n".join(table_lines(tmp_path, ["2"]))
    assert "1 run" in text and "3 runs" not in text, text


def test_an_eval_multirun_into_a_training_sweep_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch,
                                                                                       capsys) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (sweep / "multirun.yaml").write_text("the training multirun\n")
    (sweep / "0" / "results.json").write_text(json.dumps({"status": "ok", "test_acc": 0.9, "history": []}))
    model_pt = tmp_path / "m.pt"
    torch.save(_smoke_model_file(tmp_path), model_pt)
    code, stderr = _eval_main(["-m", f"ckpt_path={model_pt},{model_pt}", f"hydra.sweep.dir={sweep}"], monkeypatch,
                              capsys)
    assert code == 2 and "holds a training run" in _one_error_line(stderr)
    assert (sweep / "0" / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n"
    assert (sweep / "multirun.yaml").read_text() == "the training multirun\n"
    assert sorted(p.name for p in (sweep / "0").iterdir()) == [".hydra", "results.json"]


def test_resume_of_a_run_that_left_no_checkpoint_says_so_not_its_old_error(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    """A folder whose last run failed its own config check: a resume says there is nothing to continue."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- tags=['{'x' * 80}']\n")
    code, stderr = _main(["hydra.run.dir=" + str(run), "resume=true"], monkeypatch, capsys)
    line = _one_error_line(stderr)
    assert code == 2 and f"there is no {run}/checkpoints/last.ckpt" in line and "64 characters" not in line, line
