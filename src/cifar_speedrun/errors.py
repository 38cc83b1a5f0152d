"""One exception type for mistakes a user can fix.

Anything raised as `UserError` is printed as a single line (no traceback) by the entry point,
because the user needs the fix, not our call stack. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's config, data or environment, with the fix in its message."""


def find_user_error(error: BaseException) -> UserError | None:
    """Hydra's instantiate wraps exceptions; find a UserError anywhere in the cause chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
        cause = error.__cause__ or error.__context__
        cause_text = describe(cause) if cause is not None else text.splitlines()[-1]
        where = key.group(1) if key else "a configured object"
        what = f" ({target.group(1)})" if target else ""
        return f"building {where}{what} failed: {cause_text}"
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
