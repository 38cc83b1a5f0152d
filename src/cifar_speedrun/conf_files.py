"""Where the project's yaml lives (conf/), and what its trick files say, for everything that reads them.

A list of the tricks, or of the tricks that act at evaluation, is read from conf/trick/ here rather
than written out in code, so a new trick file is known everywhere it should be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def trick_names() -> list[str]:
    """Every `trick=<name>` there is: the files of conf/trick/."""
    return sorted(path.stem for path in (CONF_DIR / "trick").glob("*.yaml"))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config's leaves by dotted key (`optim.schedule.epochs`); lists are leaves (a yaml list replaces
    the one before it whole), an empty mapping has none."""
    if isinstance(node, dict):
        leaves: dict[str, Any] = {}
        for key, value in node.items():
            leaves.update(flatten(value, f"{prefix}{key}."))
        return leaves
    return {prefix[:-1]: node}


def keys_set_by_trick(name: str) -> set[str]:
    """The dotted keys conf/trick/<name>.yaml sets (its bookkeeping `applied_tricks` and `defaults` left out)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "trick" / f"{name}.yaml"
    if not path.is_file():
        return set()
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {key for key in flatten(data) if not key.startswith(("applied_tricks", "defaults"))}


def evaluation_tricks() -> list[str]:
    """The tricks that change how a trained net is evaluated, not how it trains: those setting `tta.*` only."""
    return [name for name in trick_names()
            if keys_set_by_trick(name) and all(key.startswith("tta.") for key in keys_set_by_trick(name))]


def epochs_set_by(group: str, choice: str) -> float | None:
    """The `epochs` conf/<group>/<choice>.yaml gives a run (its own, or the row it builds on), or None.

    Stages and experiments build on one another through their defaults lists (`- /stage/s2_...`); a file's
    own key comes after them (`_self_` last), so its own `epochs`, if any, wins."""
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{choice}.yaml"
    if not path.is_file():
        return None
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if isinstance(data.get("epochs"), (int, float)):
        return float(data["epochs"])
    found = None
    for entry in data.get("defaults") or []:
        if isinstance(entry, str) and entry.lstrip("/").split("/")[0] in ("stage", "experiment"):
            base_group, _, base = entry.lstrip("/").partition("/")
            found = epochs_set_by(base_group, base) if base else found
    return found
