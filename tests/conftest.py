"""Shared fixtures: the real CIFAR-10 archive, one decoded cache per session, Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


@pytest.fixture(scope="session")
def archive() -> str:
    """The lossy JPEG copy of CIFAR-10 (../shared or $CIFAR10_ARCHIVE); the tests need real data."""
    path = os.environ.get("CIFAR10_ARCHIVE") or str(DEFAULT_ARCHIVE)
    if not Path(path).is_file():
        pytest.fail(f"CIFAR-10 archive not found at {path}: set CIFAR10_ARCHIVE")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One decoded uint8 cache for the whole session, so real data is decoded once."""
    return str(tmp_path_factory.mktemp("cache"))


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
    """`python train.py args` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "CIFAR10_ARCHIVE": archive, "CIFAR_SPEEDRUN_CACHE": cache_dir,
                "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={cwd}/logs", "hydra.job.chdir=false"],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


# Small, fast settings for end-to-end runs on CPU.
TINY = ["trainer=cpu", "data.source=image_folder", "model.width=0.125", "data.subset=512", "data.batch_size=128",
        "data.test_subset=500", "epochs=1", "optim.schedule.epochs=[0,0.5,1]", "trainer.enable_progress_bar=false"]
