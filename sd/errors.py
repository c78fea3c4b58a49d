"""Exceptions for mistakes a user can make. Each message is one line that names the value and the fix.

The command line prints `error: <message>` for any `SDError` and exits with status 2.
"""

from collections.abc import Callable


class SDError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class CheckpointError(SDError):
    """A checkpoint file is missing, unreadable, corrupt, or not a Stable Diffusion v1 checkpoint."""


def checkpoint_not_found(path) -> CheckpointError:
    return CheckpointError(f"checkpoint not found: {path}. Check the path, or see the README for where to get "
                           f"the official file.")


class UnsupportedModelError(CheckpointError):
    """A real checkpoint of another model family (SD 2.x, SDXL) that this project does not run yet."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that tries to run code while loading; it is refused and nothing runs."""


class InputError(SDError, ValueError):
    """A bad argument: size, steps, strength, sampler name, image, device, output path."""


class SettingError(InputError):
    """A bad setting of a generation. The message is written by `describe`, which spells each parameter
    through the function it is given: as the Python name here, as a command-line flag by `for_flags`."""

    def __init__(self, describe: Callable[[Callable[[str], str]], str]):
        self.describe = describe
        super().__init__(describe(str))

    def for_flags(self) -> InputError:
        """The same message naming `--flag-names` instead of `parameter_names`."""
        return InputError(self.describe(lambda name: SHORT_FLAGS.get(name, "--" + name.replace("_", "-"))))


SHORT_FLAGS = {"token_merging": "--tome"}  # parameters whose flag is not their name


class GenerationError(SDError):
    """The model produced NaN or inf values, usually from running it in half precision."""
