"""Shared fixtures: the real CIFAR-10 archive, one decoded cache per session, Hydra composition.

`make test` runs the suite on pytest-xdist workers (docs/testing.md): each worker is its own process, so
what a session shares is shared through files here. The decoded cache is one folder for all workers,
decoded once under a file lock; each worker and every run it starts gets an even share of the cores
(torch threads); the tests that read one module-scoped run are kept on one worker, so the run happens once,
and the tests that need no cache run on one worker while another decodes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import preloaded_python
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from cifar_speedrun.conf_files import CONF_DIR
from cifar_speedrun.config.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[1]
# The measuring callbacks (op_count.StepOps, step_clock.StepClock) live with the benchmarks: tests name them too.
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_ARCHIVE = REPO.parent / "shared" / "cifar10" / "cifar10-jpeg-q75.tar.gz"

register_resolvers()

# On an xdist worker: its share of the cores, for torch here and, through OMP_NUM_THREADS, for every process it
# starts (train.py, eval.py, the benchmarks), so two workers on two cores run two threads, not four. The same
# count on both sides keeps runs that are compared bit for bit (a resumed run and the uninterrupted one, eval.py
# and the run it evaluates, a test and the run it reads) comparable. An OMP_NUM_THREADS already set is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS and "OMP_NUM_THREADS" not in os.environ:
    import torch

    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CORES // _WORKERS))
    torch.set_num_threads(max(1, _CORES // _WORKERS))
preloaded_python.CLIENT.use_environment(dict(os.environ))  # the session's environment, as the commands get it


# ---------------------------------------------------------------- pytest-xdist: groups and order
# The controller's scheduler learns each test's group from the workers through this file: xdist's own
# `--dist loadgroup` renames test ids to carry the group, which pytest 9.2 no longer allows (pytest-xdist
# issue 1386), so the tests of a group would be spread over the workers without a word.
_GROUPS_FILE = "CIFAR_SPEEDRUN_TEST_GROUPS"


def _stop_the_suite(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sends_itself_signals: the test signals its own process on purpose")
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends the suite as Ctrl-C does, summary included
        signal.signal(signal.SIGTERM, _stop_the_suite)
    if getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput"):
        os.environ[_GROUPS_FILE] = str(Path(tempfile.mkdtemp(prefix="pytest-groups-")) / "groups.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and os.environ.get(_GROUPS_FILE):
        shutil.rmtree(Path(os.environ.pop(_GROUPS_FILE)).parent, ignore_errors=True)


# Tests that need no decoded cache: one unit of work, so that one worker runs them while another decodes it.
_WITHOUT_CACHE = "tests that need no decoded cache"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, groups of tests that run on one worker each, and the order they are handed out in.

    The tests that read one module-scoped fixture (a training run several tests read) form one group, so the
    fixture runs once; the tests that need no decoded cache form another, run first by one worker while
    another decodes the cache (the other tests wait for it); then slow tests come first, so that the workers
    finish together rather than one waiting on a long test picked up last. Every worker collects the same
    items in the same order; a serial run keeps its order and has no groups."""
    if not hasattr(config, "workerinput"):
        return
    groups = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info is not None else ()
        if any(defs and defs[-1].scope == "module" for defs in definitions):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
        elif "cache_dir" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(_WITHOUT_CACHE))
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        if names:
            groups[item.nodeid] = "_".join(names)
    # stable: the tests without the cache, then the slow ones, then the rest, each in collection order
    items.sort(key=lambda item: (groups.get(item.nodeid) != _WITHOUT_CACHE, item.get_closest_marker("slow") is None))
    if os.environ.get(_GROUPS_FILE):  # every worker writes the same content; each replaces the file whole
        target = Path(os.environ[_GROUPS_FILE])
        scratch = target.with_name(f"{target.name}.{os.getpid()}")
        scratch.write_text(json.dumps(groups))
        os.replace(scratch, target)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` with the groups named above (xdist's own scheduler otherwise)."""
    if config.getvalue("dist") != "loadgroup" or not os.environ.get(_GROUPS_FILE):
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroupScheduling(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first asked once every worker has collected, so the file is written
                try:
                    self.groups = json.loads(Path(os.environ[_GROUPS_FILE]).read_text())
                except (OSError, ValueError):
                    self.groups = {}
            return self.groups.get(nodeid) or super()._split_scope(nodeid)

    return FileGroupScheduling(config, log)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One process at a time, across xdist workers (an advisory lock the kernel drops if its holder dies)."""
    import fcntl

    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _decode_once(archive: str, folder: str) -> None:
    """Decode the archive into the uint8 cache in `folder` unless that is done: the first process to ask
    decodes it while any other waits on the lock, then finds it done."""
    from cifar_speedrun.operations.sources import load_cifar10_uint8

    path = Path(folder)
    done = path.parent / f"{path.name}.decoded"
    with _exclusive(path.parent / f"{path.name}.lock"):
        if not done.exists():
            load_cifar10_uint8("image_folder", None, archive, folder)
            done.touch()


@pytest.fixture(autouse=True)
def _a_signal_stops_the_suite(request: pytest.FixtureRequest) -> Iterator[None]:
    """Ctrl-C or SIGTERM during a test stops the suite with pytest's own summary.

    A test that runs train.py's or eval.py's main() in this process installs the project's handlers
    (interrupts.raise_on_signals), and the run turns the signal into its own clean exit (130 / 143), which
    the test sees as a failed assertion: the suite would go on, and the handlers, left installed, would do
    the same to every later test. So each test's handlers are put back after it, and a signal a run
    handled during it ends the session."""
    from cifar_speedrun.operations import interrupts

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts.last_signal = None
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    if interrupts.last_signal is not None and request.node.get_closest_marker("sends_itself_signals") is None:
        name = signal.Signals(interrupts.last_signal).name
        pytest.exit(f"interrupted by {name} during {request.node.nodeid}", returncode=128 + interrupts.last_signal)


@pytest.fixture(scope="session")
def archive() -> str:
    """The lossy JPEG copy of CIFAR-10 (../shared or $CIFAR10_ARCHIVE); the tests need real data."""
    path = os.environ.get("CIFAR10_ARCHIVE") or str(DEFAULT_ARCHIVE)
    if not Path(path).is_file():
        pytest.fail(f"CIFAR-10 archive not found at {path}: set CIFAR10_ARCHIVE")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, archive: str) -> str:
    """One decoded uint8 cache for the whole session, so real data is decoded once.

    Under xdist the folder is in the base temp folder all workers of the session share, decoded once for
    all of them (_decode_once). It is decoded before any test runs train.py with it, so no two runs decode
    the archive side by side."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the base temp folder of the session, above each worker's own
        folder = tmp_path_factory.getbasetemp().parent / "cache"
        folder.mkdir(exist_ok=True)
    else:
        folder = tmp_path_factory.mktemp("cache")
    _decode_once(archive, str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def real_data(archive: str, cache_dir: str):
    from cifar_speedrun.operations.sources import load_cifar10_uint8

    return load_cifar10_uint8("image_folder", None, archive, cache_dir)


@pytest.fixture()
def compose_cfg(tmp_path: Path, archive: str, cache_dir: str) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml like `python train.py` would, with test-sized paths."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.root_dir = str(REPO)
            cfg.paths.output_dir = str(tmp_path / "out")
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.paths.cache_dir = cache_dir
            cfg.data.path = archive
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_train(args: list[str], cwd: Path, cache_dir: str, archive: str, timeout: int = 900,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python train.py args` as a user runs it, in its own process (forked from one that has imported torch
    and Lightning already: tests/preloaded_python.py)."""
    full_env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir,
                "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return preloaded_python.run(
        [sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={cwd}/logs", "hydra.job.chdir=false"],
        cwd=cwd, env=full_env, timeout=timeout,
    )


# Small, fast settings for end-to-end runs on CPU.
TINY = ["trainer=cpu", "data.source=image_folder", "model.width=0.125", "data.subset=512", "data.batch_size=128",
        "data.test_subset=500", "epochs=1", "optim.schedule.epochs=[0,0.5,1]", "trainer.enable_progress_bar=false"]
