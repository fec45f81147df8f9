"""The trainer's errors that ``unisd-train`` reports in one line instead of a traceback.

Standard library only: the command line catches them around argument parsing, before torch
is imported. Bad input exits with status 2, a diverged run with status 1 (:mod:`.cli`).
"""


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the field."""


class DataError(ValueError):
    """A data file is malformed; the message names the file, line and field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; names the file."""


class OutputDirLocked(RuntimeError):
    """Another live run holds the output folder."""


class TrainingDiverged(RuntimeError):
    """The run cannot go on: repeated non-finite steps, or non-finite weights."""
