"""Error types users see. Each message is one line naming the key/file/number and the fix.

The mains catch `JzeroError` and print `error: <message>` without a traceback from deep inside JAX.
"""


class JzeroError(Exception):
    """Base class for errors caused by user input (config, data, checkpoints)."""


class ConfigError(JzeroError, ValueError):
    """A config key is unknown, mistyped, inconsistent, or names something jzero does not implement."""


class DataError(JzeroError, ValueError):
    """A data file is missing, unreadable, or too short for the requested batch."""


class CheckpointError(JzeroError, ValueError):
    """A checkpoint directory is missing, partial or corrupted."""


class TrainingError(JzeroError, RuntimeError):
    """Training itself went wrong: the loss diverged to inf/nan, or the fp16 loss scale is stuck at its minimum."""


class RunDirError(JzeroError):
    """An output directory is in use by another run, or cannot be created or written."""
