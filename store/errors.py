"""The project's own exceptions, shared by every room (store, engine, ui, the CLI): this module imports nothing.

`SelfratError` is what a user can act on (a bad option, a missing dataset, a run that is busy): the CLI prints
its message on one line and exits 2. `Cancelled` is a long operation stopped by SIGTERM / SIGINT: exit 130.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SelfratError(Exception):
    """An error the user can act on; its message says what to do (the CLI: one line, exit 2)."""


class UsageError(SelfratError, ValueError):
    """An input a command cannot use: an unknown option value, a file in the wrong format, a missing part."""


class Cancelled(Exception):
    """The job received SIGTERM/SIGINT; the current stage stops at a batch boundary and can be resumed."""


__all__ = ["Cancelled", "SelfratError", "UsageError"]
