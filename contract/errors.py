"""The errors netloupe raises for things a user can fix, and the "did you mean" helper.

Every message says what was expected, what was found, and how to fix it. The CLI prints
a :class:`NetloupeError` without a traceback and exits with :attr:`NetloupeError.exit_code`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NetloupeError(Exception):
    """An error in the user's input or environment, with a message meant for them."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    # The message is kept apart from ``args``: Ray Data appends its retry advice to a
    # worker's exception args, which would bury the user's message under Ray's.
    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.message,))


class SpecError(NetloupeError):
    """The job spec is malformed: unknown keys, wrong types, impossible combinations."""


class ModelError(NetloupeError):
    """The model cannot be loaded or does not behave as the spec says."""


class DatasetError(NetloupeError):
    """The dataset cannot be read or lacks what the spec names."""


class MethodError(NetloupeError):
    """An attribution method is unknown, misconfigured, or cannot work on this model."""


class RunError(NetloupeError):
    """The run cannot start or commit (existing run name, failed workers, lost rows)."""


def netloupe_cause(error: BaseException) -> NetloupeError | None:
    """The user-facing error inside Ray's wrappers (a worker's DatasetError arrives as a
    UserCodeException caused by a RayTaskError caused by it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, NetloupeError):
            # Ray re-raises a worker's error as a subclass of both RayTaskError and the
            # error's own class, with a traceback in its text; hand on the original.
            original = getattr(error, "cause", None)
            return original if isinstance(original, NetloupeError) else error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def did_you_mean(name: str, valid: Iterable[str], n: int = 3) -> str:
    """A hint naming the valid choices closest to ``name``, for error messages."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(repr(v) for v in valid[:12]) + (", ..." if len(valid) > 12 else "")
    return f"valid names are: {shown}"
