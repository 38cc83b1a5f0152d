"""Config plumbing: where conf/ is, resolvers, and the checks that refuse a bad run before it starts.

The checks turn mistakes into one line naming the fix (`UserError`), before any data is loaded or
any GPU time is spent.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.errors import UserError
from cifar_speedrun.run_lock import RunFolders

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Groups whose options are files in conf/<group>/ (hydra and sweep too, but those are not chosen often).
CHOOSABLE_GROUPS = ("data", "model", "optim", "trainer", "logger", "callbacks", "paths", "trick",
                    "experiment", "stage", "sweep", "debug", "proxy")


def available_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


# Hydra's flags that take a value: the value is not an override.
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")


def check_arguments(args: list[str]) -> None:
    """Every command-line word is a flag, a flag's value, or key=value (or ~key to delete one).

    An unquoted path with a space arrives as two words (`data.path=/my` and `data/cifar.tar.gz`);
    Hydra's own message for the second is a parse error that does not say why.
    """
    after_flag = False
    for arg in args:
        if after_flag:
            after_flag = False
            continue
        if arg.startswith("-"):
            after_flag = arg in _FLAGS_WITH_VALUE
            continue
        if "=" not in arg and not arg.startswith("~"):
            raise UserError(
                f"{arg!r} is not an override (key=value): if it is the rest of a value with a space, quote the "
                f"whole override, e.g. 'data.path=/my data/cifar10.tar.gz'"
            )


_GROUP_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<group>[a-z_]+)=(?P<value>.*)$")


def check_group_overrides(args: list[str]) -> None:
    """Unknown group options (trick=labl_smoothing) get one line listing what exists.

    Hydra's own message spans several lines and ends in a hint about HYDRA_FULL_ERROR; for the
    commonest mistake, a typo in a trick or experiment name, we answer first and more briefly.
    Sweep values (a,b or [a,b],[c]) and list values are split and each name checked.
    """
    for arg in args:
        match = _GROUP_OVERRIDE.match(arg)
        if not match or match["group"] not in CHOOSABLE_GROUPS or match["prefix"] == "~":
            continue
        group, value = match["group"], match["value"].strip()
        if value.startswith(("choice(", "range(", "glob(", "interval(")):
            continue
        options = available_options(group)
        names = [name.strip().strip("'\"") for name in re.split(r"[\[\],]", value)]
        for name in names:
            if name and name != "null" and name not in options:
                raise UserError(f"unknown {group} {name!r}; available: {', '.join(options)}")


def _one_line(message: str) -> str:
    """Hydra/OmegaConf messages span lines (and list full_key/object_type); keep the sentences."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type", "reference_type"))]
    return " ".join(kept).replace("..", ".")


def _flat_keys(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys = []
        for key, value in node.items():
            keys += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
        return keys
    return [prefix[:-1]] if prefix else []


def suggest_key(typed: str, known: list[str]) -> str | None:
    """The known key a typo most likely meant: 'optim.lrr' -> 'optim.lr', 'lr' -> 'optim.lr'."""
    import difflib

    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    section, _, last = typed.rpartition(".")
    by_tail: dict[str, list[str]] = {}
    for key in known:
        by_tail.setdefault(key.rpartition(".")[2], []).append(key)
    tails = [last] if last in by_tail else difflib.get_close_matches(last, list(by_tail), n=1, cutoff=0.75)
    if not tails:
        return None
    candidates = sorted(by_tail[tails[0]], key=lambda key: (not key.startswith(section + "."), key.count("."), key))
    return candidates[0]


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _unknown_override(key: str, overrides: list[str], config_name: str) -> UserError:
    """`lr=0.1` / `optim.lrr=0.1` (a key the config does not have): the nearest key, in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    value = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == key and "=" in o), "...")
    others = [o for o in overrides if _override_key(o) != key]
    known: list[str] = []
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name, overrides=others)
        known = _flat_keys(OmegaConf.to_container(cfg, resolve=False))
    except Exception:  # the other overrides are broken too: Hydra will say so once this one is fixed
        pass
    finally:
        GlobalHydra.instance().clear()
    guess = suggest_key(key, known)
    hint = (f"did you mean {guess}={value}?" if guess
            else "check the spelling (python train.py --cfg job lists the keys)")
    return UserError(f"unknown key {key}: {hint} (+{key}=... would add a key that nothing reads)")


# Hydra's flags that only print (a config, help, completion): nothing runs, nothing is written.
_PRINT_FLAGS = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion",
                "-sc", "--resolve", "--package", "-p")
# Flags that would run another config than conf/<name>.yaml, around every check made here.
_OTHER_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
_RUN_FLAGS = ("-m", "--multirun", "-r", "--run")


def check_composition(args: list[str], config_name: str = "train") -> RunFolders | None:
    """Compose and resolve the config the first job would get, so a mistake fails in one line before Hydra starts.

    Hydra reports composition errors (a misspelled key, a bad value) over several lines plus a
    hint; this does the same composition up front and condenses the message: a key the config lacks
    gets the nearest one (`lr=0.1` -> did you mean optim.lr), a list value given to a single run
    gets how to quote it, an interpolation that cannot resolve (a loop, a missing key) is named.
    With HYDRA_FULL_ERROR=1 the original error is raised instead. For a multirun the first job's
    overrides are checked.

    Returns where the command will write (run_lock.RunFolders, `${now:...}` resolved), or None when
    Hydra is only asked to print something.
    """
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("-")]
    if any(flag in _PRINT_FLAGS for flag in flags):
        return None
    other = [flag for flag in flags if flag in _OTHER_CONFIG_FLAGS]
    if other:
        raise UserError(f"{other[0]} is not taken here: {config_name}.py runs conf/{config_name}.yaml with overrides, "
                        "checked before it starts (a config of your own goes in conf/experiment/<name>.yaml, "
                        "then experiment=<name>)")
    unknown = [flag for flag in flags if flag not in _RUN_FLAGS]
    if unknown:
        raise UserError(f"unknown flag {unknown[0]}: {config_name}.py takes -m (a multirun), --cfg job (print the "
                        "config), --help, and key=value overrides")
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cifar_speedrun.errors import full_error

    multirun = "-m" in flags or "--multirun" in flags
    overrides = [arg for arg in args if not arg.startswith("-")]
    first = overrides
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if not multirun:
            for override in parsed:
                if override.is_sweep_override():
                    key, _, value = override.input_line.partition("=")
                    raise UserError(
                        f"{override.input_line} lists several values, which only a multirun sweeps: for a list "
                        f"(several tricks at once) write it in brackets and quote it, '{key}=[{value}]'; to run one "
                        "job per value add -m"
                    )
        jobs = BasicSweeper.split_arguments(parsed, None)
        first = jobs[0][0] if jobs and jobs[0] else overrides
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name, overrides=list(first), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        run_dir = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
        numbered = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir") == "${hydra.job.num}"
        task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        OmegaConf.to_container(task, resolve=True)  # every interpolation resolves (no loop, no missing key)
    except UserError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, RecursionError) as error:
        if full_error():
            raise
        missing = re.search(r"Could not override '([^']+)'", str(error))
        if missing and "+" + missing[1] not in " ".join(overrides):
            raise _unknown_override(missing[1], list(first), config_name) from None
        raise UserError(_one_line(str(error))) from None
    finally:
        GlobalHydra.instance().clear()
    chosen_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    chosen = any(_override_key(arg) == chosen_key for arg in overrides)
    return RunFolders(run_dir, chosen, multirun, sum(len(batch) for batch in jobs) if multirun else 1, numbered)


def _on_cuda(accelerator: str) -> bool:
    """The run is meant for CUDA: asked for (gpu, cuda), or auto on a machine that has it."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def auto_mixed_precision(accelerator: str, on_cpu: str = "bf16-mixed") -> str:
    """fp16 autocast (with a GradScaler) on CUDA, where tensor cores make it pay; `on_cpu` on a CPU."""
    return "16-mixed" if _on_cuda(accelerator) else str(on_cpu)


def wandb_group(task_name: str) -> str | None:
    """Runs of one multirun share a W&B group: '<task>-<sweep option>-<sweep dir name (its time)>'."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep = hydra_cfg.runtime.choices.get("sweep") or "multirun"
    return f"{task_name}-{sweep}-{Path(str(hydra_cfg.sweep.dir)).name}"


def run_name_resolver(*, _root_: DictConfig) -> str:
    """W&B run name: what differs between jobs first (tracking.run_name); works in single runs too."""
    from cifar_speedrun.tracking import job_overrides, run_name

    return run_name(job_overrides(), _root_.get("seed"))


def run_tags_resolver(*, _root_: DictConfig) -> list[str]:
    """W&B tags: the applied tricks, then the user's own `tags=[...]`."""
    tricks = list(_root_.get("applied_tricks") or {})
    own = [str(tag) for tag in (_root_.get("tags") or [])]
    return tricks + [tag for tag in own if tag not in tricks]


def register_resolvers() -> None:
    from cifar_speedrun.tracking import is_terminal

    resolvers = {"wandb_group": wandb_group, "run_name": run_name_resolver, "run_tags": run_tags_resolver,
                 "auto_mixed_precision": auto_mixed_precision, "is_terminal": is_terminal,
                 "ceil": lambda value: math.ceil(float(value))}
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


def validate(cfg: DictConfig) -> None:
    """Refuse impossible settings and combinations before anything is built or loaded.

    First the schema (schema.py: every key known, typed and in range), then the rules that tie keys
    together.
    """
    from cifar_speedrun import schema

    schema.check(cfg)
    batch = int(cfg.data.batch_size)
    epochs = cfg.epochs
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs != math.ceil(epochs):
        raise UserError(
            f"trainer.max_epochs={max_epochs} differs from epochs={epochs}: set epochs={max_epochs} instead "
            "(the LR schedule and everything else that depends on the run's length follow `epochs`)"
        )
    from cifar_speedrun.module import check_schedule, resolve_knots

    written = list(cfg.optim.schedule.epochs)
    schedule_epochs = resolve_knots(written, epochs)
    schedule_factors = list(cfg.optim.schedule.factors)
    try:
        check_schedule(schedule_epochs, schedule_factors)
    except UserError as error:
        if written == schedule_epochs:
            raise
        raise UserError(f"{error} (optim.schedule.epochs={written} at epochs={epochs} gives "
                        f"{[round(k, 4) for k in schedule_epochs]}: raise epochs or give the knots)") from None
    if schedule_epochs[0] < 0:
        raise UserError(f"optim.schedule.epochs={schedule_epochs} starts before epoch 0")
    if schedule_epochs[-1] > epochs:
        raise UserError(
            f"optim.schedule.epochs ends at {schedule_epochs[-1]:g} but the run has epochs={epochs}: the "
            f"schedule would be cut off; set epochs={schedule_epochs[-1]:g} or write the knots in `epochs` "
            "(e.g. [0,epochs/5,epochs])"
        )
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise UserError(f"trainer.accelerator={accelerator} is not supported here: use auto, cpu or gpu (CUDA)")
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but this machine has no CUDA device: use trainer=cpu "
                        "(or trainer.accelerator=auto)")
    for key, off in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
        if cfg.trainer.get(key, off) not in (off, 0, None) and not (key == "accumulate_grad_batches"
                                                                      and cfg.trainer.get(key) == 1):
            raise UserError(f"trainer.{key}={cfg.trainer.get(key)} is not taken: the training step is written out "
                            "(module.py, manual optimization, no host sync) without gradient clipping or accumulation; "
                            f"drop trainer.{key} (a larger batch: data.batch_size)")
    precision = str(cfg.trainer.get("precision"))
    if precision in ("16-mixed", "16") and not _on_cuda(str(cfg.trainer.get("accelerator", "auto"))):
        raise UserError(f"trainer.precision={precision} is fp16 autocast, which needs CUDA (Lightning would run "
                        "bf16-mixed instead): on this machine use trainer.precision=bf16-mixed or 32-true, or "
                        "trick=mixed_precision, which picks the precision for the device")
    devices = cfg.trainer.get("devices", 1)
    world = devices if isinstance(devices, int) and devices > 0 else 1
    num_nodes = cfg.trainer.get("num_nodes", 1) or 1
    world *= num_nodes
    if batch % world:
        raise UserError(f"data.batch_size={batch} is not divisible by the {world} devices: use a multiple of {world}")
    norm = cfg.model.get("norm") or {}
    if norm.get("kind") == "ghost":
        splits = norm.ghost_splits
        per_rank = batch // world
        if per_rank % splits:
            raise UserError(
                f"ghost_bn splits each batch into model.norm.ghost_splits={splits}, but the per-device batch is "
                f"{per_rank}: use a batch size divisible by {splits} (Page: 512 = 16 x 32)"
            )
    if cfg.data.source == "image_folder" and not cfg.data.path:
        raise UserError(
            "data.source=image_folder needs data.path=/path/to/cifar10.tar.gz (or export CIFAR10_ARCHIVE)"
        )
    data = cfg.data
    if data.crop_size > 32 + 2 * data.translate:
        raise UserError(f"data.crop_size={data.crop_size} is larger than the {32 + 2 * data.translate}px padded image "
                        f"(32 + 2 x data.translate={data.translate}): lower data.crop_size or raise data.translate")
    if data.cutout and data.cutout_size >= data.crop_size:
        raise UserError(f"data.cutout_size={data.cutout_size} would blank the whole {data.crop_size}px crop: use a "
                        f"smaller square (Page: 8, then 5) or data.cutout=false")
    subset = cfg.data.subset
    if subset is not None and subset < batch:
        raise UserError(
            f"data.subset={subset} is smaller than data.batch_size={batch}: no full batch to train on; "
            "lower data.batch_size or raise data.subset"
        )
