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
