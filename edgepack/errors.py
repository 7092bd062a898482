"""Errors the user can fix, kept apart from bugs.

The CLI turns a ``UserError`` into one line and exit code 2; anything else is a bug and keeps its
traceback. ``ToleranceNotMet`` gets its own exit code so scripts can tell "bad input" from "the
model could not be made accurate enough" (the best model is still saved).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Something the user can fix: a bad path, value, file or flag."""

    exit_code = 2


class ToleranceNotMet(Exception):
    """The accuracy tolerance was not met; the best model found was kept."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what the build had put in the output folder when it came.

    A KeyboardInterrupt, so every cleanup that handles Ctrl-C handles SIGTERM the same way.
    """

    def __init__(self, signum: int = 2, published: Iterable[Path] = ()) -> None:
        super().__init__(signum)
        self.signum, self.published = signum, tuple(published)


class BundleTampered(UserError):
    """A bundle's file does not match its recorded checksum."""


def choices_hint(value: str, valid: Iterable[str]) -> str:
    """Name the valid choices, closest first, so a typo is one glance from its fix."""
    valid = sorted(valid)
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Valid choices are: {', '.join(valid)}.{hint}"


@contextmanager
def exporter_errors(what: str) -> Iterator[None]:
    """optimum's exporter reports a model it cannot handle with these types; say so in one line."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: {first}") from None
