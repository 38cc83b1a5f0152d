"""resume=true: continue an interrupted run in its own folder, with its own saved config.

`python train.py hydra.run.dir=<run dir> resume=true` must continue *that* run, not start the
default config from that run's checkpoint. So before Hydra starts, the run's saved overrides
(`<run dir>/.hydra/overrides.yaml`) replace the command line's; overrides given now are kept only for
keys that may change without changing what is trained (`epochs`, where data and logs live, the
loggers), and each is announced. Hydra is told not to rewrite the run's `.hydra/` files. Then,
before training, the checkpoint's own config is compared with the composed one: any other difference
(a checkpoint of another model, a hand-edited config) is refused, listing the keys. Nothing in the
run's folder is written before the checkpoint has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cifar_speedrun.conf_files import flatten
from cifar_speedrun.config import hydra_job
from cifar_speedrun.errors import UserError

# Keys (prefixes) that may differ on resume: how long to train, and the plumbing (hydra_job.PLUMBING:
# where things live, how it is logged).
CHANGEABLE = ("epochs", "trainer.max_epochs", *hydra_job.PLUMBING, "trainer.log_every_n_steps",
              "trainer.default_root_dir", "nan_check_every", "callbacks.results_writer.", "callbacks.model_file.",
              "callbacks.lr_logger.", "task_name", "run_keys", "wandb_group",
              "step.mode")  # the same step op by op or replayed (tests/test_graph_step.py resumes across modes)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def changeable(key: str) -> bool:
    """`epochs`, `logger.wandb.project`, `paths.output_dir`: entries ending in '.' are prefixes."""
    for prefix in CHANGEABLE:
        if prefix.endswith("."):
            if key.startswith(prefix):
                return True
        elif key == prefix or key.startswith(prefix + "."):
            return True
    return False


def _is_true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def resume_arguments(args: list[str]) -> list[str]:
    """The command line that continues the run named by `hydra.run.dir=` (args unchanged otherwise)."""
    flags = [arg for arg in args if arg.startswith("-")]
    overrides = [arg for arg in args if not arg.startswith("-")]
    resume = [o for o in overrides if _key(o) == "resume" and _is_true(o.split("=", 1)[1])]
    run_dirs = [o.split("=", 1)[1] for o in overrides if _key(o) == "hydra.run.dir"]
    if not resume or not run_dirs or "-m" in flags or "--multirun" in flags:
        return args
    run_dir = Path(run_dirs[-1]).expanduser()
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        return args  # not a run folder: train.py says there is nothing to resume
    try:
        saved = [str(o) for o in (yaml.safe_load(saved_file.read_text()) or [])]
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read {saved_file} ({type(error).__name__}): the run's saved settings are needed "
                        "to resume it") from None
    saved_keys = {_key(o): o for o in saved}
    given = [o for o in overrides if _key(o) not in ("resume", "hydra.run.dir")]
    elsewhere = {"paths.checkpoint_dir", "callbacks.checkpoint.dirpath", "ckpt_path"}
    last = run_dir / "checkpoints" / "last.ckpt"
    if not elsewhere & ({_key(o) for o in saved} | {_key(o) for o in given}) and not last.exists():
        # Said before the saved settings are composed: a run that failed its own config check would
        # otherwise answer a resume with that old error instead of what is true now.
        raise UserError(f"resume=true but there is no {last}: the run in {run_dir} left no checkpoint to continue "
                        "(it failed or stopped before its first); start it again without resume=true")
    kept, changed = [], []
    for override in given:
        key = _key(override)
        if override in saved:
            continue
        if not changeable(key):
            was = saved_keys.get(key)
            raise UserError(
                f"resume=true continues the run in {run_dir} with its own settings; {override} "
                f"{'would change ' + repr(was) if was else 'is not one of them'} and would change what it trains: "
                f"drop it (only {', '.join(p.rstrip('.') for p in CHANGEABLE[:8])}, ... may change on resume)"
            )
        kept.append(override)
        changed.append(f"{override} (was {saved_keys[key]})" if key in saved_keys else override)
    merged = [o for o in saved if _key(o) not in {_key(k) for k in kept}] + kept
    if changed:
        print(f"[resume] continuing {run_dir} with its saved settings; changed now: {', '.join(changed)}", flush=True)
    else:
        print(f"[resume] continuing {run_dir} with its saved settings", flush=True)
    return [*flags, *merged, f"hydra.run.dir={run_dirs[-1]}", "hydra.output_subdir=null", "resume=true"]



def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: checkpoint -> now' for every trained-relevant key that differs."""
    before, after = flatten(saved), flatten(current)
    differences = []
    for key in sorted(set(before) | set(after)):
        if changeable(key):
            continue
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            differences.append(f"{key}: {before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r}")
    return differences


def check_checkpoint_matches(checkpoint: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Refuse to continue a checkpoint under a config that would train something else."""
    run_config = ((checkpoint.get("hyper_parameters") or {}).get("run_config") or {})
    saved = run_config.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path} was not written by this project's train.py (no run config inside): it cannot be "
                        "resumed here")
    differences = config_differences(saved, current)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise UserError(f"{path} was trained with other settings ({shown}): resume it with its own settings "
                        "(hydra.run.dir=<its run dir> resume=true, without these overrides)")
    check_same_data(checkpoint, current, path)


# Where Lightning keeps the data module's state_dict in a checkpoint (its class's __qualname__); the data
# module records there which data it trained on (Cifar10DataModule.state_dict's source_id).
DATAMODULE_KEY = "Cifar10DataModule"


def recorded_source_id(checkpoint: dict[str, Any]) -> str | None:
    """The data a checkpoint was trained on (sources.source_identity), or None for a checkpoint without it."""
    state = checkpoint.get(DATAMODULE_KEY)
    value = state.get("source_id") if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


def check_same_data(checkpoint: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Refuse to continue a checkpoint on data other than it was trained on.

    data.path is plumbing (a copy of the archive elsewhere is fine), so the config comparison lets it
    change; what must not change is the content. The identity is the archive's hash (a folder's image
    digest, or torchvision's official release), computed before anything is trained or written.
    """
    recorded = recorded_source_id(checkpoint)
    data = current.get("data") if isinstance(current.get("data"), dict) else {}
    if recorded is None or not data.get("source"):
        return  # a checkpoint from before the identity was recorded, or a config without data: nothing to compare
    from cifar_speedrun.operations.sources import source_identity

    now = source_identity(str(data["source"]), data.get("path"))
    if now != recorded:
        where = f"data.path={data.get('path')}" if data["source"] == "image_folder" else f"data.source={data['source']}"
        saved = ((checkpoint.get("hyper_parameters") or {}).get("run_config") or {}).get("config") or {}
        then = (saved.get("data") or {}).get("path") if isinstance(saved, dict) else None
        fix = f"data.path={then}, if it still holds that archive" if then else "data.path=<that archive>"
        raise UserError(f"{path} was trained on {recorded}, but {where} is {now}: resume on the data it was trained "
                        f"on ({fix}), or start a new run")
