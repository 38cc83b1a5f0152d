"""The recipe card: everything a command line trains, resolved, in one block.

    python -m cifar_speedrun.config.recipe_card experiment=page_final
    python -m cifar_speedrun.config.recipe_card stage=s3_celu_ghost_bn +trick=ema
    python -m cifar_speedrun.config.recipe_card --write-docs     # docs/recipes.md: every experiment and stage

airbench94.py shows its whole recipe in one `hyp` block; here a recipe is spread over the stage, trick,
model, optim and data files, merged in an order that decides which value wins. The card composes the
config exactly as train.py does, refuses what train.py would refuse, and prints only what is trained:
the tricks with their sources, the model, the batch and augmentation, the optimizer with its schedule
in epochs, the loss, TTA, epochs, precision and the averaging callbacks. Plumbing (where files go, how
runs are logged: hydra_job.is_plumbing) and our bookkeeping callbacks are left out, and nothing shown
depends on the machine, so docs/recipes.md can be regenerated anywhere and compared in a test.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.conf_files import CONF_DIR
from cifar_speedrun.errors import UserError

DOCS = CONF_DIR.parent / "docs" / "recipes.md"
DOCS_COMMAND = "python -m cifar_speedrun.config.recipe_card --write-docs"
# Callbacks that time, record, checkpoint and log a run: they change nothing that is trained.
BOOKKEEPING_CALLBACKS = ("train_timer", "results_writer", "checkpoint", "lr_logger", "model_file")
# The data keys that shape the training batches: the batch size and the augmentation.
DATA_KEYS = ("batch_size", "translate", "crop_size", "flip", "flip_mode", "cutout", "cutout_size", "cutout_inside")
# Shown only when set: a subset or a held-out split changes which images are trained on.
DATA_IF_SET = ("subset", "val_split")
LABEL, WIDTH = 11, 110


def compose_recipe(overrides: Sequence[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, checked as train.py checks it; a mistake is one UserError.

    The command line is checked first (an unknown trick, a misspelled key: the short messages of
    command_line), then the composed config is validated (bad values, impossible combinations), so a
    card never shows a recipe that train.py would refuse to run.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cifar_speedrun.config import command_line
    from cifar_speedrun.config.resolvers import register_resolvers

    register_resolvers()
    overrides = list(overrides)
    command_line.check_arguments(overrides)
    command_line.check_group_overrides(overrides)
    command_line.check_composition(overrides, "train")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} (the plumbing) resolves, as in a running job
    command_line.validate(cfg)
    return cfg


def card(overrides: Sequence[str]) -> str:
    """The recipe `python train.py <overrides>` trains, as lines of `label  key=value ...`."""
    cfg = compose_recipe(overrides)
    lines = _wrap("recipe", " ".join(overrides) or "(defaults)")
    tricks = dict(cfg.get("applied_tricks") or {})
    width = max((len(name) for name in tricks), default=0)
    rows = [f"{name:<{width}}  {source}" for name, source in tricks.items()] or ["none"]
    for index, row in enumerate(rows):
        lines += _wrap("tricks" if index == 0 else "", row, hang=width + 2)
    lines += _section("model", cfg, "model", f"{cfg.hydra.runtime.choices.model} ({_class(cfg.model)})")
    data = {key: cfg.data[key] for key in DATA_KEYS}
    data.update({key: cfg.data[key] for key in DATA_IF_SET if cfg.data.get(key)})
    lines += _wrap("data", _pairs(data, "data"))
    lines += _section("optim", cfg, "optim", str(cfg.optim.get("builder", "")))
    lines += _wrap("loss", _pairs(_resolved(cfg, "loss"), "loss"))
    lines += _wrap("tta", _pairs(_resolved(cfg, "tta"), "tta"))
    lines += _wrap("epochs", _number(cfg.epochs))
    lines += _wrap("precision", _precision(cfg))
    # What is left once bookkeeping is out: the weight averaging of trick=ema / trick=lookahead.
    trained = [name for name, node in (cfg.get("callbacks") or {}).items()
               if node is not None and name not in BOOKKEEPING_CALLBACKS and not _plumbing(f"callbacks.{name}")]
    for index, name in enumerate(trained):
        settings = {key: value for key, value in _resolved(cfg, f"callbacks.{name}").items() if key != "_target_"}
        lines += _wrap("callbacks" if index == 0 else "",
                       f"{name} ({_class(cfg.callbacks[name])}): {_pairs(settings, f'callbacks.{name}')}")
    if not trained:
        lines += _wrap("callbacks", "none")
    return "\n".join(lines)


def docs() -> str:
    """docs/recipes.md: the card of every experiment and every stage, under a header naming its command."""
    from cifar_speedrun.config.command_line import available_options

    parts = [
        "# Recipes\n",
        f"Generated by `{DOCS_COMMAND}`: do not edit by hand\n"
        "(tests/test_recipe_card.py fails when it is out of date). Each block is what\n"
        "`python -m cifar_speedrun.config.recipe_card <group>=<name>` prints: what the experiment or stage\n"
        "trains, fully resolved, without plumbing (paths, logging, checkpoints); schedule knots in epochs of\n"
        "the run. How the configs combine is in [experiments.md](experiments.md). Back to the\n"
        "[README](../README.md).\n",
    ]
    for group in ("experiment", "stage"):
        for name in available_options(group):
            parts.append(f"## `{group}={name}`\n\n```text\n{card([f'{group}={name}'])}\n```\n")
    return "\n".join(parts)


def _section(label: str, cfg: DictConfig, key: str, title: str) -> list[str]:
    """A nested section: its plain keys on the first line, each sub-dict (norm, schedule, ...) on its own."""
    node = _resolved(cfg, key)
    flat = {name: value for name, value in node.items() if not isinstance(value, dict) and name not in
            ("_target_", "builder")}
    pairs = _pairs(flat, key)
    lines = _wrap(label, f"{title}: {pairs}" if pairs else title)
    for name, value in node.items():
        if isinstance(value, dict) and not _plumbing(f"{key}.{name}"):
            text = _schedule(value, float(cfg.epochs)) if {"epochs", "factors"} <= set(value) else _pairs(
                value, f"{key}.{name}")
            lines += _wrap("", f"{name}: {text}", hang=len(name) + 2)
    return lines


def _resolved(cfg: DictConfig, key: str) -> dict[str, Any]:
    """One section resolved, without the keys that only pass a run setting on (`seed: ${seed}`).

    Such keys follow the run (its seed, its memory layout) rather than the recipe, and are shown where
    the recipe sets them, if anywhere.
    """
    node = OmegaConf.select(cfg, key)
    raw = OmegaConf.to_container(node, resolve=False)
    values = OmegaConf.to_container(node, resolve=True)

    def drop(raw_node: Any, value: Any) -> Any:
        if not isinstance(raw_node, dict):
            return value
        return {name: drop(raw_node[name], value[name]) for name in raw_node
                if not _passes_on(raw_node[name])}

    return drop(raw, values)


def _passes_on(raw: Any) -> bool:
    """`${seed}`, `${channels_last}`: a top-level run setting handed down unchanged."""
    return isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and raw[2:-1].isidentifier()


def _schedule(schedule: dict[str, Any], epochs: float) -> str:
    """`factor 0.0 at epoch 0 -> 1.0 at 2 -> 0.1 at 8, held to 10`: the knots resolved for this run."""
    from cifar_speedrun.recipe.schedule import resolve_knots

    knots = resolve_knots(list(schedule["epochs"]), epochs)
    points = [f"{_value(factor)} at {'epoch ' if index == 0 else ''}{_number(knot)}"
              for index, (knot, factor) in enumerate(zip(knots, schedule["factors"], strict=True))]
    held = f", held to {_number(epochs)}" if knots and knots[-1] < epochs else ""
    return "factor " + " -> ".join(points) + held


def _precision(cfg: DictConfig) -> str:
    """trainer.precision; trick=mixed_precision's by-device choice shown for both devices when it is open.

    With `trainer.accelerator=auto` the resolved value depends on the machine that composes it (16-mixed
    where CUDA is found): the card gives both, so it reads the same everywhere.
    """
    from cifar_speedrun.devices import auto_mixed_precision

    raw = OmegaConf.to_container(cfg.trainer, resolve=False).get("precision")
    if isinstance(raw, str) and "auto_mixed_precision" in raw and cfg.trainer.accelerator == "auto":
        on_cpu = str(cfg.cpu_mixed_precision)
        return (f"{auto_mixed_precision('cuda', on_cpu)} on CUDA, {auto_mixed_precision('cpu', on_cpu)} on a CPU "
                "(trick=mixed_precision, by device)")
    return str(cfg.trainer.precision)


def _pairs(values: dict[str, Any], prefix: str) -> str:
    """`key=value ...`, each key checked against is_plumbing by its full name (data.path sits among data's)."""
    return " ".join(f"{key}={_value(value)}" for key, value in values.items()
                    if not _plumbing(f"{prefix}.{key}"))


def _plumbing(key: str) -> bool:
    from cifar_speedrun.config.hydra_job import is_plumbing

    return is_plumbing(key)


def _value(value: Any) -> str:
    """As the yaml writes it: true, null, [0.0,1.0,0.1], 0.015625 (a config's floats are exact as typed)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_value(item)}" for key, item in value.items()) + "}"
    return repr(value) if isinstance(value, float) else str(value)


def _number(value: Any) -> str:
    """9.9 * 0.23 is 2.277, not 2.2770000000000001; 24.0 epochs is 24."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{float(value):.10g}"


def _class(node: Any) -> str:
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def _wrap(label: str, text: str, hang: int = 0) -> list[str]:
    """Label in a column of its own and wrapped continuation lines, so a section reads down the page."""
    return textwrap.wrap(text, width=WIDTH, initial_indent=f"{label:<{LABEL}}",
                         subsequent_indent=" " * (LABEL + hang), break_long_words=False, break_on_hyphens=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the card of the overrides, or (--write-docs) regenerate docs/recipes.md; a mistake exits 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="as for train.py: experiment=page_final, +trick=ema, ...")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write {Path('docs') / DOCS.name}: every experiment and stage, each as its card")
    args = parser.parse_args(argv)
    if args.write_docs and args.overrides:
        parser.error("--write-docs writes every experiment and stage: give it no overrides")
    try:
        if args.write_docs:
            DOCS.write_text(docs())
            print(f"wrote {DOCS}")
        else:
            print(card(args.overrides))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
