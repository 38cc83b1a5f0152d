"""What the running Hydra job is: its overrides, group choices, mode, and which overrides are plumbing.

The one place that reads HydraConfig for a running job (run names, W&B groups, eval's command line,
the [run] line), and the one list of "plumbing" keys: where things live and how a run is logged, not
what is trained. Run names and the report's configurations leave them out; resume lets them change.
"""

from __future__ import annotations

import sys
from typing import Any

# Keys (and their sub-keys) that say where things are or how a run is logged, not what is trained.
PLUMBING = ("hydra", "paths", "data.path", "data.root", "data.cache_dir", "logger", "trainer.enable_progress_bar",
            "tags", "callbacks.checkpoint", "ckpt_path", "resume")


def is_plumbing(key: str) -> bool:
    """`paths.output_dir`, `hydra/launcher`, `logger=wandb`'s `logger`: True; `data.batch_size`: False."""
    key = key.lstrip("+~").split("=", 1)[0]
    return any(key == p or key.startswith((p + ".", p + "/")) for p in PLUMBING)


def current() -> Any | None:
    """The running job's HydraConfig, or None outside a Hydra job (tests, scripts)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:
        return None


def job_overrides() -> list[str]:
    """This job's command-line overrides (a sweep's job: its own values), or [] outside Hydra."""
    hydra_cfg = current()
    return list(hydra_cfg.overrides.task) if hydra_cfg is not None else []


def choices() -> dict[str, Any]:
    """The config group choices (experiment, stage, sweep, ...), or {} outside Hydra."""
    hydra_cfg = current()
    try:
        return dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
    except AttributeError:
        return {}


def is_multirun() -> bool:
    from hydra.types import RunMode

    hydra_cfg = current()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def config_key(overrides: list[str] | str) -> str:
    """Every override except the seed: the seeds of one configuration share it (report.py groups by it)."""
    parts = overrides.split() if isinstance(overrides, str) else list(overrides)
    return " ".join(o for o in parts if not o.lstrip("+").startswith("seed=")) or "(defaults)"


# Group choices shown by their value alone, in this order, at the front of a run name.
_NAMED_GROUPS = ("stage", "trick", "experiment", "debug")
NAME_LENGTH = 64


def run_name(overrides: list[str], seed: Any) -> str:
    """Short and readable: 's3_celu_ghost_bn · seed 1 · cpu_proxy', '+label_smoothing,celu · seed 0'."""
    named: list[tuple[int, str]] = []
    rest: list[str] = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "seed" or is_plumbing(key):
            continue
        if key in _NAMED_GROUPS:
            if key == "trick":
                listed = value.strip("[]")
                value = f"+{listed}" if listed else "no tricks"
            named.append((_NAMED_GROUPS.index(key), value))
        else:
            rest.append(override.lstrip("+"))
    parts = [value for _, value in sorted(named)] + [f"seed {seed}"] + rest
    name = " · ".join(parts)
    return name if len(name) <= NAME_LENGTH else name[: NAME_LENGTH - 1] + "…"


def is_terminal() -> bool:
    """A progress bar for people at a terminal; none in a log file (it would write a line per update)."""
    return sys.stdout.isatty()
