"""One exception type for mistakes a user can fix.

Anything raised as `UserError` is printed as a single line (no traceback) by the entry point,
because the user needs the fix, not our call stack. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator


class UserError(Exception):
    """A problem in the user's config, data or environment, with the fix in its message."""


def full_error() -> bool:
    """HYDRA_FULL_ERROR read by value, as Hydra reads it: "1" shows tracebacks; "0", "" or unset do not."""
    return os.environ.get("HYDRA_FULL_ERROR", "").strip() == "1"


def cause_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then its causes (`__cause__`, else `__context__`), each once.

    A chain can loop: `raise error from error` makes an error its own cause, and two errors can
    name each other. The visited set ends the walk on any chain.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def find_user_error(error: BaseException) -> UserError | None:
    """Hydra's instantiate wraps exceptions; find a UserError anywhere in the cause chain."""
    return next((link for link in cause_chain(error) if isinstance(link, UserError)), None)


def describe(error: BaseException) -> str:
    """One line for any exception; for a failure while building a configured object, its key and cause.

    Hydra's InstantiationException says only "Error in call to target '...':" on its first line and
    puts the cause and the config key on the next ones.
    """
    import re

    text = str(error).strip()
    if type(error).__name__ == "InstantiationException":
        target = re.search(r"target '([^']+)'", text)
        key = re.search(r"full_key: (\S+)", text)
        cause = next((link for link in list(cause_chain(error))[1:]
                      if type(link).__name__ != "InstantiationException"), None)
        cause_text = describe(cause) if cause is not None else text.splitlines()[-1]
        where = key.group(1) if key else "a configured object"
        what = f" ({target.group(1)})" if target else ""
        return f"building {where}{what} failed: {cause_text}"
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
