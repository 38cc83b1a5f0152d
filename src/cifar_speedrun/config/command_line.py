"""The command line and the composed config: where conf/ is, and the checks that refuse a bad run before it starts.

The checks turn mistakes into one line naming the fix (`UserError`), before any data is loaded or
any GPU time is spent.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.conf_files import CONF_DIR
from cifar_speedrun.errors import UserError
from cifar_speedrun.operations import storage
from cifar_speedrun.operations.run_lock import RunFolders, refuse_links

if TYPE_CHECKING:
    from cifar_speedrun.config.settings import TrainSettings

# Groups whose options are files in conf/<group>/ (hydra and sweep too, but those are not chosen often).
CHOOSABLE_GROUPS = ("data", "model", "optim", "trainer", "logger", "callbacks", "paths", "trick",
                    "experiment", "stage", "sweep", "debug", "proxy", "hparams_search")


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


def _refuse_links_in(cfg: DictConfig) -> None:
    """paths.output_dir and the checkpoint folder hold no planted link (run_lock: no run makes one)."""
    for setting, key in (("paths.output_dir", "paths.output_dir"), ("paths.checkpoint_dir",
                                                                    "callbacks.checkpoint.dirpath")):
        folder = OmegaConf.select(cfg, key, default=None)
        if isinstance(folder, str) and storage.is_local(folder) and os.path.isdir(folder):
            refuse_links(os.path.realpath(folder), folder, setting)


def _grammar_hint(overrides: list[str], message: str) -> str:
    """Hydra's parser refused an override: name it (the first that does not parse alone) and say how to quote."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    refused = None
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:
            refused = override
            break
    if refused is None:
        return _one_line(message)
    key = refused.split("=", 1)[0].lstrip("+~")
    return (f"{refused} cannot be read as a Hydra override: quote a value with spaces, accents or other symbols, "
            f"e.g. \"{key}=['héllo world']\" for a list or \"{key}='text'\" (outer quotes for the shell, inner "
            "for Hydra); one key=value per word")


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
        for override in parsed:
            if override.is_sweep_override() and override.get_key_element().lstrip("+~").startswith("hydra."):
                raise UserError(_hydra_sweep_message(override.get_key_element().lstrip("+~"),
                                                     override.input_line.partition("=")[2]))
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
        _check_search(cfg, parsed, overrides, multirun)
        if not multirun:  # the run's other folders, before Hydra writes anything into its run folder
            _refuse_links_in(cfg)
    except UserError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, RecursionError) as error:
        if full_error():
            raise
        missing = re.search(r"Could not override '([^']+)'", str(error))
        if missing and missing[1].startswith(_SEARCH_PARAMS + ".") and "+" + missing[1] not in " ".join(overrides):
            value = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == missing[1]), "...")
            raise UserError(f"{missing[1]} is not searched yet: add it to the search with a +, "
                            f"'+{missing[1]}={value}'") from None
        if missing and "+" + missing[1] not in " ".join(overrides):
            raise _unknown_override(missing[1], list(first), config_name) from None
        if "LexerNoViableAltException" in str(error) or "mismatched input" in str(error):
            raise UserError(_grammar_hint(overrides, str(error))) from None
        if str(error).startswith("Error merging override") and error.__cause__ is not None:
            override = str(error).removeprefix("Error merging override").strip()
            cause = _one_line(str(error.__cause__))
            raise UserError(f"{override} cannot be set: {cause}; give a value of that type") from None
        raise UserError(_one_line(str(error))) from None
    finally:
        GlobalHydra.instance().clear()
    chosen_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    chosen = any(_override_key(arg) == chosen_key for arg in overrides)
    return RunFolders(run_dir, chosen, multirun, sum(len(batch) for batch in jobs) if multirun else 1, numbered)


_SEARCH_PARAMS = "hydra.sweeper.params"


def _hydra_sweep_message(key: str, value: str) -> str:
    """Hydra sweeps nothing in its own config, and `int(3,4)` / `float(0.1,1)` unquoted are Hydra's own cast
    of a two-value sweep, not the search's spec: say how to quote a spec, or give one value."""
    if key.startswith(_SEARCH_PARAMS + "."):
        return (f"{key}={value} reads as Hydra's own sweep over several values, not a range for the search: quote "
                f"the spec so it arrives as text, '{key}=\"{value}\"' (single quotes for the shell, double for Hydra)")
    return f"{key}={value} lists several values, but Hydra's own settings (hydra.*) take one: give {key} one value"


def _check_search(cfg: DictConfig, parsed: list, overrides: list[str], multirun: bool) -> None:
    """A search (hparams_search=...) runs only as a multirun, one job per trial; the rest of its checks
    (settings, storage, the study's configuration) are the sweeper's own (study.check_search)."""
    sweeper = str(OmegaConf.select(cfg, "hydra.sweeper._target_") or "")
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.hparams_search")
    if "cifar_speedrun_search" not in sweeper:
        return
    if not multirun:
        raise UserError(f"hparams_search={choice} runs a search of many trials: add -m")
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element().lstrip("+~")
            raise UserError(f"{override.input_line} sweeps several values, but a search runs one job per trial: "
                            f"give {key} one value (sweep the seeds over the command the search prints at its end)")
    try:
        from hydra_plugins.cifar_speedrun_search.study import check_search
    except ImportError as error:
        raise UserError(f"hparams_search needs Optuna ({error}): pip install -e '.[search]'") from None
    check_search(cfg, [o for o in overrides if "=" in o or o.startswith("~")], suggest_key)


def validate(cfg: DictConfig) -> TrainSettings:
    """Refuse unknown keys, bad values and impossible combinations before anything is built or loaded.

    The typed sections and their cross-key rules are in settings.py (pydantic); this is the entry point
    train.py and the tests call.
    """
    from cifar_speedrun.config.settings import check_train

    return check_train(cfg)
