"""What a search is and where it is kept, checked before any trial runs.

train.py's command-line checks (cifar_speedrun.config.command_line) call `check_search` with the config
the first trial would get, before Hydra starts: every mistake in the search's settings or storage is
one `UserError` naming the fix, and nothing is written (a foreign SQLite file is read, read-only, and
refused before Optuna could add its tables to it). The sweeper uses the same functions, so what was
checked is what runs.

A study remembers the configuration it was started with (`measured_configuration`: every key that
changes what a trial measures, the searched ones left out, plus the search space, objective and seed):
a resume with another model width, data subset, validation split, epochs or experiment would mix
trials that measured different things into one "best", so it is refused, naming the keys that differ.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.errors import UserError

SWEEPER_MARK = "cifar_speedrun_search"
DB_NAME = "search.db"
PARAMS = "hydra.sweeper.params"
# Keys that do not change what a trial measures: where it writes and logs, how it prints, where the
# images are read from (the same images either way).
_UNMEASURED = ("task_name", "applied_tricks", "tags", "paths", "logger", "callbacks", "ckpt_path", "resume",
               "nan_check_every", "data.source", "data.root", "data.path", "data.cache_dir",
               "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
               "trainer.default_root_dir", "trainer.enable_checkpointing")
# Config groups whose choice does not change what a trial measures (the search itself, logging, folders).
_UNMEASURED_GROUPS = ("hparams_search", "logger", "paths", "callbacks")
_OPTUNA_TABLES = ("studies", "trials", "version_info")
_SPEC = re.compile(r"^\s*(float|int|choice)\((.*)\)\s*$")


@dataclass(frozen=True)
class SearchSpec:
    """The sweeper's settings, checked: what `hydra.sweeper.*` asks for."""

    n_trials: int
    sampler_seed: int
    direction: str
    objective: str
    study_name: str
    specs: dict[str, str]          # searched key -> its spec as written, e.g. "float(0.2, 2.0, log)"
    space: dict[str, Any]          # searched key -> optuna distribution


def shell_quoted(key: str, spec: str) -> str:
    """How to write a spec on a shell command line so Hydra passes it on as text (not its own int(...))."""
    return f"'{key}=\"{spec}\"'"


def flatten_params(node: Any, prefix: str = "") -> dict[str, Any]:
    """`params: {optim: {lr: ...}}` and `params: {optim.lr: ...}` both give {"optim.lr": ...}.

    The nested form is what lets `hydra.sweeper.params.optim.lr=...` override one key from the command
    line (Hydra reads dots in a key as nesting); the flat form is kept for search files written before.
    An emptied group (`~hydra.sweeper.params.optim.lr` leaves `optim: {}`) searches nothing.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, Mapping):
        leaves: dict[str, Any] = {}
        for key, value in node.items():
            leaves.update(flatten_params(value, f"{prefix}{key}."))
        return leaves
    return {prefix[:-1]: node} if prefix else {}


def distribution(key: str, spec: Any) -> Any:
    """'float(0.1, 2.0, log)' -> optuna's FloatDistribution(0.1, 2.0, log=True), and so on; a spec that
    samples nothing (inverted or empty bounds, log of 0, an empty choice) is refused here, not in Optuna."""
    import optuna

    where = f"{PARAMS}.{key}={spec}"
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if not match:
        if spec is None or isinstance(spec, (bool, int, float)) or (isinstance(spec, str) and "(" not in spec):
            raise UserError(f"{where} is not a range to search: write float(low, high[, log]), int(low, high[, log]) "
                            f"or choice(a, b, ...), quoted, e.g. {shell_quoted(f'{PARAMS}.{key}', 'float(0.1, 1.0)')}; "
                            f"to fix {key} for every trial instead, drop it from the search: "
                            f"~{PARAMS}.{key} {key}={spec}")
        raise UserError(f"{where} is not float(low, high[, log]), int(low, high[, log]) or choice(a, b, ...)")
    kind, inner = match.group(1), [part.strip() for part in match.group(2).split(",")]
    if inner == [""]:
        inner = []
    if kind == "choice":
        values = [_literal(part) for part in inner]
        if not values or any(part == "" for part in inner):
            raise UserError(f"{where}: a choice needs values separated by commas, e.g. choice(8, 10, 12)")
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"{where} lists a value twice: give each value once")
        return optuna.distributions.CategoricalDistribution(values)
    if len(inner) not in (2, 3) or (len(inner) == 3 and inner[2] != "log"):
        raise UserError(f"{where}: give low, high and optionally log, e.g. {kind}(1, 10) or {kind}(0.01, 1, log)")
    log_scale = len(inner) == 3
    try:
        low, high = (int(inner[0]), int(inner[1])) if kind == "int" else (float(inner[0]), float(inner[1]))
    except ValueError:
        whole = "whole numbers" if kind == "int" else "numbers"
        raise UserError(f"{where}: low and high must be {whole}"
                        + (f" (for decimals write float({inner[0]}, {inner[1]}))" if kind == "int" else "")) from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UserError(f"{where}: low and high must be finite numbers, e.g. {kind}(0.01, 1.0)")
    if low > high:
        raise UserError(f"{where} is empty (low {inner[0]} > high {inner[1]}): give the lower bound first, "
                        f"{kind}({inner[1]}, {inner[0]}{', log' if log_scale else ''})")
    if low == high:
        raise UserError(f"{where} holds one value: to fix {key} for every trial drop it from the search, "
                        f"~{PARAMS}.{key} {key}={inner[0]}")
    if log_scale and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0 (e.g. {kind}(1e-4, {inner[1]}, log))")
    if kind == "int":
        return optuna.distributions.IntDistribution(int(low), int(high), log=log_scale)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log_scale)


def _literal(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip("'\"")


def parse_search(sweeper: Any) -> SearchSpec:
    """The sweeper's settings (`hydra.sweeper`, a mapping), each checked, or one UserError naming the fix."""
    get = sweeper.get if hasattr(sweeper, "get") else (lambda key, default=None: getattr(sweeper, key, default))
    n_trials = get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"hydra.sweeper.n_trials={n_trials} must be a whole number >= 1 (how many trials to complete), "
                        "e.g. hydra.sweeper.n_trials=4")
    seed = get("sampler_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"hydra.sweeper.sampler_seed={seed} must be a whole number >= 0, "
                        "e.g. hydra.sweeper.sampler_seed=0")
    direction = get("direction")
    if direction not in ("maximize", "minimize"):
        raise UserError(f"hydra.sweeper.direction={direction} must be maximize or minimize")
    objective = get("objective")
    if not isinstance(objective, str) or not objective.startswith("val_"):
        raise UserError(f"hydra.sweeper.objective={objective} must be a held-out number of results.json (val_acc, "
                        "val_loss): a search never judges on the test set")
    study_name = get("study_name")
    if not isinstance(study_name, str) or not study_name.strip():
        raise UserError("hydra.sweeper.study_name must be a non-empty name, e.g. hydra.sweeper.study_name=proxy")
    specs = flatten_params(get("params") or {})
    if not specs:
        raise UserError(f"the search has nothing to search ({PARAMS} is empty): add a key, e.g. "
                        f"{shell_quoted(f'+{PARAMS}.optim.lr', 'float(0.1, 1.0, log)')}")
    space = {key: distribution(key, spec) for key, spec in specs.items()}
    return SearchSpec(int(n_trials), int(seed), str(direction), str(objective), study_name.strip(),
                      {key: str(spec) for key, spec in specs.items()}, space)


def _unmeasured(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in _UNMEASURED)


def measured_configuration(cfg: DictConfig, spec: SearchSpec) -> dict[str, str]:
    """Everything that changes what a trial measures, as text by dotted key: the config's keys (as written,
    interpolations unresolved, so a searched key's value does not leak into the keys that refer to it),
    the config groups chosen (`experiment`, `proxy`, ...), and the search itself (space, objective,
    direction, seed). Searched keys and where things are written or logged are left out; n_trials too
    (a resume may ask for more trials)."""
    from optuna.distributions import distribution_to_json

    from cifar_speedrun.conf_files import flatten

    task = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)
    measured = {key: json.dumps(value, sort_keys=True, default=str) for key, value in flatten(task).items()
                if key not in spec.space and not _unmeasured(key)}
    choices = OmegaConf.select(cfg, "hydra.runtime.choices")
    for group, choice in (OmegaConf.to_container(choices) if choices is not None else {}).items():
        if not group.startswith("hydra/") and group != "hydra" and group not in _UNMEASURED_GROUPS:
            measured[group] = json.dumps(choice, default=str)
    for key, dist in spec.space.items():
        measured[f"search {key}"] = distribution_to_json(dist)
    measured.update({"search objective": spec.objective, "search direction": spec.direction,
                     "search sampler_seed": str(spec.sampler_seed)})
    # The data itself, by content (data.path is where it is, left out above): another archive is another study.
    from cifar_speedrun.operations.sources import source_identity

    source = OmegaConf.select(cfg, "data.source")
    if source:
        measured["data (its content)"] = source_identity(str(source), OmegaConf.select(cfg, "data.path"))
    return measured


def describe_difference(stored: dict[str, str], current: dict[str, str], limit: int = 6) -> str:
    """'model.width 0.03 (now 0.06), data.subset 640 (now 1280)': what differs, keys sorted, at most `limit`."""
    keys = sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))
    parts = [f"{key} {_shown(stored.get(key))} (now {_shown(current.get(key))})" for key in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def _shown(text: str | None) -> str:
    if text is None:
        return "unset"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and "name" in value and "attributes" in value:  # an optuna distribution
        return f"{value['name'].replace('Distribution', '').lower()}{value['attributes']}"
    return "null" if value is None else str(value)


@dataclass(frozen=True)
class StoredStudy:
    """What search.db holds, read without writing: the study's name, its configuration (None when an
    older version made it), its trial numbers."""

    name: str
    configuration: dict[str, str] | None
    trial_numbers: list[int]


def read_storage(db: Path) -> StoredStudy | None:
    """The study in `db`, read-only, or None when there is none yet; a file that is not a search's study
    (corrupt, another program's SQLite, unwritable) is refused before anything writes to it."""
    where = f"{db}"
    fix = "move it away (or choose another hydra.sweep.dir) to start a new search there"
    if db.is_symlink():  # no search makes one: a planted link would have the study written through it
        raise UserError(f"{where} is a link ({db} -> {os.readlink(db)}), which no search makes: remove it, or {fix}")
    if not db.exists():
        return None
    if not db.is_file():
        raise UserError(f"{where} is not a file: {fix}")
    if not os.access(db, os.R_OK):
        raise UserError(f"{where} cannot be read (no permission): make it readable (chmod u+r), or {fix}")
    try:
        connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return None
            missing = [table for table in _OPTUNA_TABLES if table not in tables]
            if missing:
                held = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
                raise UserError(f"{where} is an SQLite database but not a search's study (no Optuna tables; it holds "
                                f"{held}): it is left untouched; {fix}")
            studies = connection.execute("SELECT study_id, study_name FROM studies ORDER BY study_id").fetchall()
            if not studies:
                return None
            if len(studies) > 1:
                names = ", ".join(name for _, name in studies)
                raise UserError(f"{where} holds several studies ({names}): a sweep folder keeps one search, whose "
                                f"trials are its numbered folders; {fix}")
            study_id, name = studies[0]
            row = connection.execute("SELECT value_json FROM study_user_attributes WHERE study_id=? AND key=?",
                                     (study_id, "configuration")).fetchone()
            numbers = [n for (n,) in connection.execute("SELECT number FROM trials WHERE study_id=?", (study_id,))]
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:  # not a database, truncated, encrypted, locked beyond the timeout
        raise UserError(f"{where} is not a readable search study ({error}): {fix}") from None
    configuration = None
    if row is not None:
        try:
            configuration = {str(k): str(v) for k, v in json.loads(row[0]).items()}
        except (ValueError, AttributeError):
            raise UserError(f"{where}: the study's recorded configuration is unreadable: {fix}") from None
    _check_writable(db, fix)
    return StoredStudy(str(name), configuration, sorted(numbers))


def _check_writable(db: Path, fix: str) -> None:
    """SQLite opens an unwritable file read-only without a word and fails at the first trial's record; ask
    for a write lock now (nothing is written: the transaction is rolled back)."""
    reason = None
    if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
        reason = "no write permission"
    else:
        try:
            connection = sqlite3.connect(str(db), timeout=5)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
            finally:
                connection.close()
        except sqlite3.OperationalError as error:
            reason = str(error)
    if reason is not None:
        raise UserError(f"{db} cannot be written ({reason}): a search records each trial there; make it and its "
                        "folder writable (chmod u+w), or copy the sweep folder somewhere writable and resume there "
                        "with hydra.sweep.dir=<copy>")


def check_study(db: Path, spec: SearchSpec, configuration: dict[str, str]) -> StoredStudy | None:
    """Refuse a resume into a study of another name or started with another configuration."""
    stored = read_storage(db)
    if stored is None:
        return None
    if stored.name != spec.study_name:
        raise UserError(f"{db} holds the study {stored.name!r}, not {spec.study_name!r}: resume it with "
                        f"hydra.sweeper.study_name={stored.name}, or start {spec.study_name!r} with another "
                        "hydra.sweep.dir")
    if stored.configuration is not None and stored.configuration != configuration:
        raise UserError(f"{db} holds the search {stored.name!r} started with another configuration: "
                        f"{describe_difference(stored.configuration, configuration)}; resume it with the settings "
                        "it was started with, or start a new search with another hydra.sweep.dir")
    return stored


def check_search(cfg: DictConfig, overrides: list[str], suggest: Any = None) -> None:
    """Everything about a search a user can get wrong, checked on the config the first trial would get.

    `overrides`: the command line's key=value words. `suggest(key, known_keys)` names the nearest key for a
    misspelled searched key (command_line.suggest_key).
    """
    spec = parse_search(cfg.hydra.sweeper)
    if spec.objective.startswith("val") and not int(OmegaConf.select(cfg, "data.val_split") or 0):
        raise UserError("hparams_search judges trials on the validation accuracy, but data.val_split=0 holds "
                        "nothing out: set data.val_split=N, e.g. 5000 (a search never looks at the test set)")
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in spec.space:
            raise UserError(f"{key} is searched ({PARAMS}.{key}={spec.specs[key]}) and also given as {override}: "
                            f"drop {override} to search it, or fix it for every trial and search the rest with "
                            f"~{PARAMS}.{key} {override}")
    missing = object()
    from cifar_speedrun.conf_files import flatten

    for key in spec.space:
        if OmegaConf.select(cfg, key, default=missing) is missing or key == "hydra" or key.startswith("hydra."):
            known = list(flatten(OmegaConf.to_container(
                OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)))
            guess = suggest(key, known) if suggest is not None else None
            hint = f"did you mean {PARAMS}.{guess}?" if guess else "python train.py --cfg job lists the keys"
            raise UserError(f"{PARAMS}.{key}: {key} is not a key of the config, so no trial could set it ({hint})")
    check_study(Path(str(cfg.hydra.sweep.dir)) / DB_NAME, spec, measured_configuration(cfg, spec))
