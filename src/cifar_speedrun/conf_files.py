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


def keys_set_by_trick(name: str) -> set[str]:
    """The dotted keys conf/trick/<name>.yaml sets (its bookkeeping `applied_tricks` and `defaults` left out)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "trick" / f"{name}.yaml"
    if not path.is_file():
        return set()

    def flat(node: Any, prefix: str) -> set[str]:
        if isinstance(node, dict):
            return set().union(*(flat(value, f"{prefix}{key}.") for key, value in node.items())) if node else set()
        return {prefix[:-1]}

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {key for key in flat(data, "") if not key.startswith(("applied_tricks", "defaults"))}


def evaluation_tricks() -> list[str]:
    """The tricks that change how a trained net is evaluated, not how it trains: those setting `tta.*` only."""
    return [name for name in trick_names()
            if keys_set_by_trick(name) and all(key.startswith("tta.") for key in keys_set_by_trick(name))]
