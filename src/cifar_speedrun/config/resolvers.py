"""OmegaConf resolvers: the `${name:...}` functions the yaml files call (W&B naming, precision, ceil).

In their own module so that config checks (config.py) and run naming (tracking.py) do not import each
other: this imports tracking, and nothing here is imported by it.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def wandb_group(task_name: str) -> str | None:
    """Runs of one multirun share a W&B group: '<task>-<sweep option>-<sweep dir name (its time)>'."""
    from cifar_speedrun.config import hydra_job

    if not hydra_job.is_multirun():
        return None
    sweep = hydra_job.choices().get("sweep") or "multirun"
    return f"{task_name}-{sweep}-{Path(str(hydra_job.current().sweep.dir)).name}"


def run_name_resolver(*, _root_: DictConfig) -> str:
    """W&B run name: what differs between jobs first (tracking.run_name); works in single runs too."""
    from cifar_speedrun.config.hydra_job import job_overrides, run_name

    return run_name(job_overrides(), _root_.get("seed"))


def run_tags_resolver(*, _root_: DictConfig) -> list[str]:
    """W&B tags: the applied tricks, then the user's own `tags=[...]`."""
    tricks = list(_root_.get("applied_tricks") or {})
    own = [str(tag) for tag in (_root_.get("tags") or [])]
    return tricks + [tag for tag in own if tag not in tricks]


def register_resolvers() -> None:
    """The `${name:...}` functions conf/ uses; registered once per process, before composing."""
    from cifar_speedrun.config.hydra_job import is_terminal
    from cifar_speedrun.devices import auto_mixed_precision

    resolvers = {"wandb_group": wandb_group, "run_name": run_name_resolver, "run_tags": run_tags_resolver,
                 "auto_mixed_precision": auto_mixed_precision, "is_terminal": is_terminal,
                 "ceil": lambda value: math.ceil(float(value))}
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
