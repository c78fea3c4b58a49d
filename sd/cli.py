"""What the project's command lines share: one-line errors and their exit statuses, one-line notes.

Every command (`run_demo.py`, `python -m sd.train`, `python -m weights_converter`) reports a mistake as
one line `error: ...` on stderr, never a traceback: exit status 2 for bad input (any `SDError`, an
unknown flag), 1 when writing fails, 130 when interrupted.
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from sd.errors import InputError, SDError


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are `InputError`s, reported like every other error."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


def run_command(body: Callable[[], None], *, interrupted: str, out_of_memory: str,
                write_error: Callable[[OSError], str] = str) -> int:
    """Run `body`, turning the errors a user can meet into one line and an exit status."""
    try:
        body()
    except SDError as e:
        return fail(str(e), 2)
    except torch.cuda.OutOfMemoryError:
        return fail(f"out of GPU memory; {out_of_memory}", 2)
    except OSError as e:
        return fail(write_error(e), 1)
    except KeyboardInterrupt:
        return fail(f"interrupted; {interrupted}", 130)
    return 0


def fail(message: str, status: int) -> int:
    print(f"error: {printable(message)}", file=sys.stderr)
    return status


def note(message: str) -> None:
    print(f"note: {printable(message)}", file=sys.stderr)


def printable(text: str) -> str:
    """`text` with what cannot be written as UTF-8 (the lone surrogates of a file name that is not) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(path: Path) -> str:
    """`path` relative to the current folder when inside it, as a user would type it."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
