"""airbench (Keller Jordan's package) as the peer, on the CPU: the exported files hold exactly the project's
images, airbench's own loader reads them, its printed table is parsed, and the run wrapper seeds, changes
directory and restores it. Training the peer needs CUDA (tests/test_cuda.py's machine); the smoke run of
gpu_speedrun.py --peer is in tests/test_benchmarks.py."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import REPO

from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import Cifar10Uint8


@pytest.fixture(scope="module")
def bench() -> SimpleNamespace:
    """benchmarks/airbench_peer.py and gpu_speedrun.py, imported as the scripts import each other."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return SimpleNamespace(peer=importlib.import_module("airbench_peer"),
                               speedrun=importlib.import_module("gpu_speedrun"))
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def airbench(bench: SimpleNamespace) -> ModuleType:
    """The installed airbench (the dev extra installs it); importing it leaves cudnn.benchmark as it was."""
    before = torch.backends.cudnn.benchmark
    module = bench.peer.require_airbench()
    assert torch.backends.cudnn.benchmark == before
    return module


@pytest.fixture(scope="module")
def exported(bench: SimpleNamespace, real_data: Cifar10Uint8, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("airbench")
    assert bench.peer.export_uint8(real_data, folder) == folder / "cifar10"
    return folder


def _tiny(labels: list[int]) -> Cifar10Uint8:
    n = len(labels)
    images = torch.arange(n * 3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 3, 32, 32)
    y = torch.tensor(labels, dtype=torch.int64)
    return Cifar10Uint8(train_x=images, train_y=y, test_x=images[:4].clone(), test_y=y[:4].clone(), source_id="tiny")


# ------------------------------------------------------------------------------------------ the export


def test_export_holds_exactly_the_projects_images_and_labels(exported: Path, real_data: Cifar10Uint8) -> None:
    for split in ("train", "test"):
        path = exported / "cifar10" / f"{split}.pt"
        blob = torch.load(path, weights_only=True)  # plain tensors and a list of str: no pickled code
        images, labels = blob["images"], blob["labels"]
        expected = getattr(real_data, f"{split}_x").permute(0, 2, 3, 1)
        assert images.dtype == torch.uint8 and images.is_contiguous() and images.shape == expected.shape
        assert tuple(images.shape[1:]) == (32, 32, 3), "NHWC, as airbench's own (torchvision) files"
        assert torch.equal(images, expected)
        assert labels.dtype == torch.int64 and torch.equal(labels, getattr(real_data, f"{split}_y"))
        assert blob["classes"] == list(CIFAR10_CLASSES)
        assert path.stat().st_size < 1.01 * images.numel() + 8 * labels.numel() + 100_000, "no larger storage saved"
    assert len(real_data.train_y) == 50_000 and len(real_data.test_y) == 10_000
    assert not list((exported / "cifar10").glob(".*tmp*")), "no temporary file left"


def test_airbench_cifarloader_reads_the_export_back_exactly(exported: Path, real_data: Cifar10Uint8,
                                                             airbench: ModuleType, bench: SimpleNamespace) -> None:
    """CifarLoader keeps x/255 in fp16; times 255 and rounded, that is x again for every image (the fp16
    error of x/255 is at most 0.062/255, far from the 0.5/255 that would flip a rounding)."""
    for split, train in (("train", True), ("test", False)):
        loader = airbench.CifarLoader(str(exported / "cifar10"), train=train, gpu="cpu")
        images = getattr(real_data, f"{split}_x")
        assert len(loader.images) == len(images) and loader.images.dtype == torch.float16
        assert torch.equal(loader.labels, getattr(real_data, f"{split}_y"))
        assert list(loader.classes) == list(CIFAR10_CLASSES)
        worst = 0.0
        for start in range(0, len(images), 5000):  # in chunks: the whole train set in fp32 is 600 MB
            scaled = loader.images[start:start + 5000].float() * 255
            chunk = images[start:start + 5000]
            worst = max(worst, float((scaled - chunk.float()).abs().max()))
            back = scaled.round().to(torch.uint8).permute(0, 2, 3, 1)
            assert torch.equal(back, chunk.permute(0, 2, 3, 1)), f"{split} images from {start}"
        assert worst < 0.07
    assert bench.peer.check_with_airbench_loader(exported, real_data) == {
        "train": 50_000, "test": 10_000, "classes": list(CIFAR10_CLASSES)}


def test_the_loader_check_refuses_files_that_differ(tmp_path: Path, airbench: ModuleType,
                                                    bench: SimpleNamespace) -> None:
    labels = [c % 10 for c in range(20)]
    bench.peer.export_uint8(_tiny(labels), tmp_path)
    assert bench.peer.check_with_airbench_loader(tmp_path, _tiny(labels), every=1)["train"] == 20
    with pytest.raises(RuntimeError, match="labels differ"):
        bench.peer.check_with_airbench_loader(tmp_path, _tiny([(c + 1) % 10 for c in range(20)]))
    other = _tiny(labels)
    other.train_x[7, 0, 3, 3] += 1
    with pytest.raises(RuntimeError, match="images differ"):
        bench.peer.check_with_airbench_loader(tmp_path, other, every=1)
    with pytest.raises(ValueError, match="labels outside"):
        bench.peer.export_uint8(_tiny([0, 10]), tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="export the data first"):
        bench.peer.check_with_airbench_loader(tmp_path / "empty", _tiny(labels))


# -------------------------------------------------------------------------------- airbench's printed table


def _airbench_table(airbench: ModuleType, *, epochs: int, tta: float | None, seconds: float, warmup: bool = False,
                    eval_row: bool = True, eval_val_acc: bool = True) -> str:
    """What airbench.utils.train prints for one run, made by airbench's own printing functions in its order:
    the header (run 0), one row per epoch from its locals (run printed once), and the final row with
    epoch 'eval', whose locals still hold the last epoch's train_loss, train_acc and val_acc."""
    utils = importlib.import_module("airbench.utils")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if warmup:  # warmup94: a rule, then one row with run 'warmup' and no epoch
            utils.print_columns(utils.logging_columns_list, is_head=True, print_cols=False)
            utils.print_training_details({"run": "warmup", "epoch": None, "train_loss": None}, is_final_entry=False)
        utils.print_columns(utils.logging_columns_list, is_head=True)
        local: dict = {"run": 0}
        for epoch in range(epochs):
            local.update(epoch=epoch, train_loss=2.0 - 0.1 * epoch, train_acc=0.5 + 0.04 * epoch,
                         val_acc=0.6 + 0.03 * epoch, total_time_seconds=0.35 * (epoch + 1))
            utils.print_training_details(local, is_final_entry=False)
            local["run"] = None
        if eval_row:
            local.update(epoch="eval", tta_val_acc=tta, total_time_seconds=seconds)
            if not eval_val_acc:
                local["val_acc"] = None
            utils.print_training_details(local, is_final_entry=True)
    return buffer.getvalue()


def test_the_parser_reads_airbench_s_own_table(airbench: ModuleType, bench: SimpleNamespace) -> None:
    text = _airbench_table(airbench, epochs=10, tta=0.9412, seconds=3.8312)
    assert "|  epoch  |" in text and "|   eval  |" in text  # airbench's format, not ours
    rows = bench.peer.parse_table(text)
    assert len(rows) == 11 and rows[0]["run"] == "0" and rows[1]["run"] == "" and rows[-1]["epoch"] == "eval"
    assert bench.peer.parse_result(text) == {"tta_val_acc": 0.9412, "total_seconds": 3.8312,
                                             "val_acc": pytest.approx(0.87), "epochs": 10}
    # Two runs after a warm-up, other output between: the last run's final row counts.
    both = (_airbench_table(airbench, epochs=3, tta=0.5, seconds=9.0, warmup=True) + "some other line | x |\n"
            + _airbench_table(airbench, epochs=4, tta=0.9388, seconds=2.5))
    result = bench.peer.parse_result(both)
    assert (result["tta_val_acc"], result["total_seconds"], result["epochs"]) == (0.9388, 2.5, 4)
    assert result["val_acc"] == pytest.approx(0.69)
    # An eval row without val_acc (a future format): the last epoch row's.
    no_val = _airbench_table(airbench, epochs=10, tta=0.9412, seconds=3.8312, eval_val_acc=False)
    assert no_val != text and bench.peer.parse_table(no_val)[-1]["val_acc"] == ""
    assert bench.peer.parse_result(no_val)["val_acc"] == pytest.approx(0.87)


def test_the_parser_refuses_a_text_without_a_final_row(airbench: ModuleType, bench: SimpleNamespace) -> None:
    without = _airbench_table(airbench, epochs=3, tta=0.9, seconds=1.0, warmup=True, eval_row=False)
    with pytest.raises(bench.peer.PeerOutputError, match="no final 'eval' row") as raised:
        bench.peer.parse_result(without)
    assert without in str(raised.value), "the captured text is in the error"
    with pytest.raises(bench.peer.PeerOutputError, match="no final 'eval' row"):
        bench.peer.parse_result("")
    blank = _airbench_table(airbench, epochs=2, tta=None, seconds=1.0)
    with pytest.raises(bench.peer.PeerOutputError, match="lacks tta_val_acc"):
        bench.peer.parse_result(blank)


# ------------------------------------------------------------------------------------------ running (fakes)


def test_run_one_seeds_changes_directory_captures_and_restores(tmp_path: Path, airbench: ModuleType,
                                                               bench: SimpleNamespace, capsys) -> None:
    """run_one on a fake train94 that prints airbench's table: the seed is set first, the files are found
    by train94's relative path, the table is parsed, and the working directory and cudnn flag come back."""
    bench.peer.export_uint8(_tiny([c % 10 for c in range(20)]), tmp_path / "data")
    seen: list[tuple[str, bool, float, bool]] = []

    def fake_train94() -> object:
        seen.append((os.getcwd(), Path("cifar10/train.pt").is_file(), float(torch.rand(1)),
                     torch.backends.cudnn.benchmark))
        print(_airbench_table(airbench, epochs=2, tta=0.9401, seconds=3.25), end="")
        return object()

    here, flag = os.getcwd(), torch.backends.cudnn.benchmark
    first = bench.peer.run_one(tmp_path / "data", 3, train_fn=fake_train94)
    again = bench.peer.run_one(tmp_path / "data", 3, train_fn=fake_train94, echo=False)
    other = bench.peer.run_one(tmp_path / "data", 4, train_fn=fake_train94, echo=False)
    assert again == {**first, "wall_seconds": again["wall_seconds"]} and other["seed"] == 4
    assert os.getcwd() == here and torch.backends.cudnn.benchmark == flag
    assert first["seed"] == 3 and first["tta_val_acc"] == 0.9401 and first["total_seconds"] == 3.25
    assert first["val_acc"] == pytest.approx(0.63) and first["wall_seconds"] > 0
    assert {s[0] for s in seen} == {str((tmp_path / "data").resolve())} and all(s[1] and s[3] for s in seen)
    assert seen[0][2] == seen[1][2] != seen[2][2], "the same seed, the same random numbers"
    assert capsys.readouterr().out.count("|   eval  |") == 1, "echoed when asked, silent otherwise"

    def prints_nothing_useful() -> None:
        print("CUDA out of memory, say")

    with pytest.raises(bench.peer.PeerOutputError, match="CUDA out of memory, say"):
        bench.peer.run_one(tmp_path / "data", 0, train_fn=prints_nothing_useful, echo=False)
    assert os.getcwd() == here

    def crashes() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench.peer.run_one(tmp_path / "data", 0, train_fn=crashes)
    assert os.getcwd() == here and torch.backends.cudnn.benchmark == flag
    with pytest.raises(FileNotFoundError):
        bench.peer.run_one(tmp_path / "nowhere", 0, train_fn=fake_train94)


def test_warm_up_takes_airbench_s_step_then_a_whole_unreported_run(tmp_path: Path, airbench: ModuleType,
                                                                   bench: SimpleNamespace) -> None:
    bench.peer.export_uint8(_tiny([c % 10 for c in range(20)]), tmp_path)
    calls: list[str] = []

    def fake_warmup94() -> None:
        calls.append("step")

    def fake_train94() -> None:
        calls.append("run")
        print(_airbench_table(airbench, epochs=1, tta=0.9, seconds=4.0), end="")

    full = bench.peer.warm_up(tmp_path, "full", warmup_fn=fake_warmup94, train_fn=fake_train94, echo=False)
    assert calls == ["step", "run"] and full["run"]["seed"] == bench.peer.WARMUP_SEED
    assert full["run"]["total_seconds"] == 4.0 and full["mode"] == "full"
    step = bench.peer.warm_up(tmp_path, "step", warmup_fn=fake_warmup94, train_fn=fake_train94, echo=False)
    assert calls == ["step", "run", "step"] and "run" not in step
    with pytest.raises(ValueError, match="warm-up mode"):
        bench.peer.warm_up(tmp_path, "none", warmup_fn=fake_warmup94)


def test_without_airbench_peer_fails_with_one_line_naming_the_install(tmp_path: Path, bench: SimpleNamespace,
                                                                      monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "airbench", None)  # import airbench now raises ImportError
    with pytest.raises(bench.peer.PeerUnavailable, match=r"pip install airbench==0\.1\.8"):
        bench.peer.require_airbench()
    monkeypatch.setattr(sys, "argv", ["gpu_speedrun.py", "--peer", "--smoke", "--out", str(tmp_path / "out")])
    assert bench.speedrun.main() == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install airbench==0.1.8" in err and ".[bench]" in err
    assert not (tmp_path / "out").exists(), "failed before anything ran"


# ---------------------------------------------------------------------------------------------- comparison


def test_welch_difference_matches_scipy(bench: SimpleNamespace) -> None:
    """Equal n and std give Welch 2(n - 1) degrees of freedom exactly (8 here), so the table's t quantile
    is scipy's and the CI must match; otherwise the table's rounded-down quantile is the wider one."""
    import statistics

    from scipy import stats

    a = [0.9401, 0.9388, 0.9420, 0.9395, 0.9412]
    b = [x - 0.0031 for x in [0.9412, 0.9395, 0.9401, 0.9420, 0.9388]]
    diff, ci = bench.speedrun.welch_difference(statistics.fmean(a), statistics.stdev(a), 5,
                                               statistics.fmean(b), statistics.stdev(b), 5)
    low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx((low + high) / 2, abs=1e-12)
    assert ci == pytest.approx((high - low) / 2, rel=1e-3)
    c = [0.93, 0.95, 0.91, 0.96]  # unequal spreads and sizes: dof 3.3 -> t(3), wider than scipy's t(3.3)
    diff, ci = bench.speedrun.welch_difference(statistics.fmean(c), statistics.stdev(c), 4,
                                               statistics.fmean(a), statistics.stdev(a), 5)
    low, high = stats.ttest_ind(c, a, equal_var=False).confidence_interval(0.95)
    assert (high - low) / 2 < ci < 1.1 * (high - low) / 2
    assert math.isnan(bench.speedrun.welch_difference(0.9, math.nan, 1, 0.9, 0.01, 5)[1])


def test_every_summary_row_gets_its_ratio_and_difference_to_the_peer(bench: SimpleNamespace) -> None:
    summary = {"airbench94 16-mixed": {"n": 5, "mean_acc": 0.9390, "std": 0.0015,
                                       "median_train_plus_eval_seconds": 4.5},
               "page_final bf16-mixed": {"n": 1, "mean_acc": 0.9400, "std": math.nan,
                                         "median_train_plus_eval_seconds": 9.0}}
    peer = bench.speedrun.peer_summary([{"tta_val_acc": acc, "total_seconds": s} for acc, s in
                                        [(0.9400, 3.1), (0.9410, 2.9), (0.9395, 3.0), (0.9405, 3.3), (0.9390, 2.8)]])
    assert peer["n"] == 5 and peer["median_seconds"] == 3.0 and peer["mean_acc"] == pytest.approx(0.94)
    lines = bench.speedrun.compare_to_peer(summary, peer)
    row = summary["airbench94 16-mixed"]
    assert row["ratio_to_peer"] == pytest.approx(1.5)
    assert row["acc_diff_vs_peer"] == pytest.approx(-0.001) and 0 < row["acc_diff_vs_peer_ci95"] < 0.01
    assert lines[0] == ("airbench94 16-mixed: 4.50s vs airbench 3.00s = 1.50x; acc -0.10 ± "
                        f"{100 * row['acc_diff_vs_peer_ci95']:.2f} points (95% CI, Welch)")
    assert summary["page_final bf16-mixed"]["ratio_to_peer"] == pytest.approx(3.0)
    assert lines[1].startswith("page_final bf16-mixed: 9.00s vs airbench 3.00s = 3.00x; acc ")
    assert lines[1].endswith("0.00 ± nan points (95% CI, Welch)"), "n = 1: no CI"


def test_run_peer_on_cuda_records_every_run_and_keeps_going_past_a_failed_one(tmp_path: Path, airbench: ModuleType,
                                                                              bench: SimpleNamespace,
                                                                              monkeypatch) -> None:
    """gpu_speedrun's CUDA path with airbench's training faked (it needs a GPU): the export and check are
    real, the warm-up is recorded apart, a seed whose table does not parse is recorded as failed and the
    others go on, the report is saved after each run, and the summary covers the runs that finished."""
    labels = [c % 10 for c in range(20)]
    monkeypatch.setattr(bench.peer, "load_project_data", lambda overrides, scratch_dir=None: _tiny(labels))
    monkeypatch.setattr(bench.peer, "release_memory", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.peer, "warm_up", lambda folder, mode: {"mode": mode, "run": {
        "seed": 1000, "tta_val_acc": 0.93, "total_seconds": 4.0}})

    def fake_run_one(folder: Path, seed: int) -> dict:
        assert (Path(folder) / "cifar10" / "train.pt").is_file()
        if seed == 1:
            raise bench.peer.PeerOutputError("no final 'eval' row in airbench's output:\nboom")
        return {"seed": seed, "tta_val_acc": 0.94 + 0.001 * seed, "total_seconds": 3.0 + seed, "val_acc": 0.93,
                "epochs": 10, "wall_seconds": 5.0}

    monkeypatch.setattr(bench.peer, "run_one", fake_run_one)
    report: dict = {}
    saved: list[int] = []
    bench.speedrun.run_peer(report, lambda: saved.append(len(report["peer"].get("runs", []))), [],
                            tmp_path / "peer", seeds=3, warmup="full", smoke=False)
    peer = report["peer"]
    assert peer["check"]["train"] == 20 and "skipped" not in peer and peer["warmup"]["mode"] == "full"
    assert [r["seed"] for r in peer["runs"]] == [0, 2]
    assert peer["failed"] == [{"seed": 1, "error": "PeerOutputError: no final 'eval' row in airbench's output:\nboom"}]
    assert peer["summary"]["n"] == 2 and peer["summary"]["median_seconds"] == 4.0
    assert saved == [0, 1, 1, 2, 2], "after the warm-up, each run, the failure and the summary"
