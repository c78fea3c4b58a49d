"""Exceptions for mistakes a user can make. Each message is one line that names the value and the fix.

The command line prints `error: <message>` for any `SDError` and exits with status 2.
"""


class SDError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class CheckpointError(SDError):
    """A checkpoint file is missing, unreadable, corrupt, or not a Stable Diffusion v1 checkpoint."""


class UnsupportedModelError(CheckpointError):
    """A real checkpoint of another model family (SD 2.x, SDXL) that this project does not run yet."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that tries to run code while loading; it is refused and nothing runs."""


class InputError(SDError, ValueError):
    """A bad argument: size, steps, strength, sampler name, image, device, output path."""


class GenerationError(SDError):
    """The model produced NaN or inf values, usually from running it in half precision."""
