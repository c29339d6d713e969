"""The project's error type for mistakes a user can fix (wrong path, missing column, mismatched config).

``neurojepa`` (``neurojepa_pl.cli.main``) catches :class:`UserError` anywhere in a run and prints it as two short lines,

    neurojepa: error: <what was expected and what was found>
    fix: <how to fix it>

with exit status 2 and no traceback (``--debug`` shows the traceback). Any other exception is a bug of ours and keeps
its traceback. The subclasses also derive from the matching built-in so that callers catching ``ValueError``,
``FileNotFoundError`` or ``KeyError`` keep working.

This module imports nothing beyond the standard library so that every room (models, data, checkpoint I/O, the CLI before
its heavy imports) can raise these errors.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "UserFileNotFoundError",
    "UserKeyError",
    "UserValueError",
    "format_user_error",
]


class UserError(Exception):
    """An expected error caused by the user's input, with the fix.

    Args:
        message: what is wrong: what was expected and what was found, naming the file or key concerned.
        fix: one sentence on how to fix it (empty if the message already says it).

    Attributes:
        message: as given.
        fix: as given.
    """

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        # str() keeps the fix: code and tests that only see str(err) (logs, pytest.raises(match=...)) still get it.
        return f"{self.message}\nfix: {self.fix}" if self.fix else self.message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Picklable with both arguments (DataLoader workers and multiprocessing re-raise errors in the parent).
        return (type(self), (self.message, self.fix))


class UserValueError(UserError, ValueError):
    """A :class:`UserError` that is also a ``ValueError`` (bad values, out-of-range labels, mismatched geometry)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A :class:`UserError` that is also a ``FileNotFoundError`` (manifest, scan or checkpoint path missing)."""


class UserKeyError(UserError, KeyError):
    """A :class:`UserError` that is also a ``KeyError`` (a missing manifest column or config key)."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message (quotes, escaped newlines); keep the plain text.
        return UserError.__str__(self)


def format_user_error(err: UserError, prog: str = "neurojepa") -> str:
    """The two-line form the CLI prints: ``<prog>: error: <message>`` then ``fix: <fix>``.

    Multi-line messages (a table of broken scans) keep their lines; the first one follows ``error:``.
    """
    text = f"{prog}: error: {err.message}"
    if err.fix:
        text += f"\nfix: {err.fix}"
    return text
