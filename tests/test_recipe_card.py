"""Page's table as diffs (conf/stage), and the recipe card that shows a composed recipe in one block.

Each conf/stage/sN file is meant to state only what row N of Page's part-8 table changes from row N-1:
the previous stage, the trick(s) the row adds, and the keys whose values the row changes. Composing
both rows and comparing proves it, so a future edit that restates a key (or forgets one) fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from cifar_speedrun.conf_files import CONF_DIR, flatten
from cifar_speedrun.config import recipe_card

# The rows of Page's table in order: the bag_of_tricks sweep's own list.
_SWEEP = yaml.safe_load((CONF_DIR / "sweep" / "bag_of_tricks.yaml").read_text())
STAGES = [name.strip() for name in str(_SWEEP["hydra"]["sweeper"]["params"]["stage"]).split(",")]
_MISSING = object()


def _changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The keys whose value differs (or that appear), with their value after."""
    return {key: after.get(key, _MISSING) for key in before.keys() | after.keys()
            if before.get(key, _MISSING) != after.get(key, _MISSING)}


def _file(group: str, name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), resolve=False)


@pytest.fixture()
def composed(compose_cfg):
    """The composed config as its files write it (unresolved), without Hydra's own node."""

    def _composed(*overrides: str) -> dict[str, Any]:
        cfg = compose_cfg(*overrides)
        with open_dict(cfg):
            del cfg["hydra"]
        return flatten(OmegaConf.to_container(cfg, resolve=False))

    return _composed


@pytest.mark.parametrize("index", range(len(STAGES)), ids=STAGES)
def test_each_stage_states_only_what_its_row_changes(composed, index: int) -> None:
    name = STAGES[index]
    own = _file("stage", name)
    defaults = own.pop("defaults")
    previous = STAGES[index - 1] if index else None
    assert defaults[-1] == "_self_", f"{name}: _self_ last, so the row's own keys win over its tricks"
    includes = defaults[:-1]
    if previous:
        assert includes[0] == f"/stage/{previous}", f"{name} starts from the row before it, {previous}"
        includes = includes[1:]
    tricks = [entry.removeprefix("/trick/") for entry in includes]
    assert tricks and all(entry.startswith("/trick/") for entry in includes), f"{name}: the trick(s) it adds"
    base = [f"stage={previous}"] if previous else []
    before = composed(*base)
    with_tricks = composed(*base, f"trick=[{','.join(tricks)}]")
    after = composed(f"stage={name}")
    # The tricks change only keys their files set, and each is recorded.
    trick_keys = set().union(*(flatten(_file("trick", trick)) for trick in tricks))
    added = _changes(before, with_tricks)
    assert set(added) <= trick_keys
    assert {f"applied_tricks.{trick}" for trick in tricks} <= set(added)
    # The row's own keys: exactly what changes after its tricks, to the values the file states.
    stated, changed = flatten(own), _changes(with_tricks, after)
    if previous:
        assert changed == stated, f"{name} restates or misses a key of its row"
    else:
        # Row 0 has no row before it: it states the whole baseline schedule, defaults included (so a
        # stage sets the same keys whatever optim or data comes before it); what it changes it states.
        assert changed.items() <= stated.items()


def test_final_recipe_plus_every_trick_is_the_last_row(composed) -> None:
    """final_recipe (the leave_one_out sweep's base) restates s7_tta's numbers: they must stay equal."""
    last = composed(f"stage={STAGES[-1]}")
    tricks = sorted({key.split(".", 1)[1].split(".")[0] for key in last if key.startswith("applied_tricks.")})
    assert not any(key.startswith("applied_tricks.") for key in composed("stage=final_recipe"))
    assert composed("stage=final_recipe", f"trick=[{','.join(tricks)}]") == last  # flat: applied_tricks as a dict


def test_docs_recipes_is_generated_from_the_configs() -> None:
    """docs/recipes.md is the cards of every experiment and stage: regenerate it when a config changes."""
    assert recipe_card.DOCS.read_text() == recipe_card.docs(), (
        f"docs/recipes.md is out of date: run `{recipe_card.DOCS_COMMAND}`")


def test_card_shows_what_is_trained_and_no_plumbing() -> None:
    text = recipe_card.card(["experiment=page_final"])
    lines = {line.split()[0]: line for line in text.splitlines() if line[:1] != " "}
    assert list(lines) == ["recipe", "tricks", "model", "data", "optim", "loss", "tta", "epochs", "precision",
                           "callbacks"]
    assert "schedule: factor 0.0 at epoch 0 -> 1.0 at 2 -> 0.1 at 8, held to 10" in text  # [0, epochs/5, epochs - 2]
    assert lines["precision"].split(None, 1)[1] == (
        "16-mixed on CUDA, bf16-mixed on a CPU (trick=mixed_precision, by device)")
    assert lines["callbacks"].split(None, 1)[1].startswith("ema (EMA): momentum=0.99 every_n_steps=5")
    for plumbing in ("output_dir", "checkpoint", "train_timer", "results_writer", "lr_logger", "model_file",
                     "logger", "cache_dir", "seed="):
        assert plumbing not in text
    # The CPU proxy fixes fp32, whatever order mixed_precision comes in.
    assert "precision  32-true" in recipe_card.card(["experiment=cpu_proxy", "+trick=mixed_precision"])


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=0.1"], "error: unknown key optim.lrr: did you mean optim.lr=0.1?"),   # composition
    (["+trick=labl_smoothing"], "error: unknown trick 'labl_smoothing'"),               # the command line
    (["data.cutout_size=40"], "error: data.cutout_size=40 must be"),                    # validate(cfg)
])
def test_a_mistake_is_one_error_line_and_exit_2(capsys, overrides: list[str], message: str) -> None:
    assert recipe_card.main(overrides) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith(message)
