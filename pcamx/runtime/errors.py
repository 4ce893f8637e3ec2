"""Known errors: the ways a command is refused or fails that pcamx anticipates. Each message names the key or the
file, what is wrong and the way out, so a command prints it as one `error: …` line and exits with status 2
instead of showing a traceback (`HYDRA_FULL_ERROR=1` shows the traceback too). Anything else is a bug and keeps
its traceback."""

from __future__ import annotations

import os
import sys

EXIT_CODE = 2


class UserError(Exception):
    """A known error (see the module docstring). Other exception types join by inheriting from it."""


class ConfigError(UserError, ValueError):
    """A setting that cannot run: out of its range, or impossible on this machine or with these other settings."""


class OutputError(UserError, OSError):
    """A destination that cannot be written: checked before any work is done."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined with "; ")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = ""
    for line in lines:  # "…with:" introduces the next line; other lines are items of their own
        text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text or type(err).__name__


def report(err: BaseException, prog: str = "") -> int:
    """Print `error: …` on stderr (the traceback too under HYDRA_FULL_ERROR=1) and return the exit status."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    print(f"{prog + ': ' if prog else ''}error: {one_line(err)}", file=sys.stderr, flush=True)
    return EXIT_CODE
