"""Helpers shared by the benchmarks: compose the project's config the way train.py does."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cifar_speedrun.conf_files import CONF_DIR  # noqa: E402
from cifar_speedrun.config.resolvers import register_resolvers  # noqa: E402

DEFAULT_ARCHIVE = REPO.parent / "shared" / "cifar10" / "cifar10-jpeg-q75.tar.gz"


def archive_path() -> str:
    return os.environ.get("CIFAR10_ARCHIVE") or str(DEFAULT_ARCHIVE)


def compose_config(overrides: list[str], output_dir: str | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would run, with output in a temp dir."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = output_dir or tempfile.mkdtemp(prefix="cifar-speedrun-bench-")
        cfg.paths.log_dir = cfg.paths.output_dir
        del cfg["hydra"]  # a task's config has no hydra node (HydraConfig above still answers ${hydra:...})
    return cfg


def keep_large_allocations_off_mmap() -> None:
    """Each batch allocates a few MB; glibc serves such blocks with mmap and returns them to the OS on
    free, so every batch pays fresh page faults (measured here: 36k vs 130-180k img/s for the same
    code). Raising glibc's mmap/trim thresholds keeps them in the heap. Linux/glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
