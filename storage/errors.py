"""Errors a user can act on. Each names the file, field, key or step at fault; the CLI prints the message alone
(``sfc -v`` adds the traceback). Any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by input, configuration or the state of a run rather than by the code."""


class DataError(UserError, ValueError):
    """Bad dataset content; the message names the offending file or field."""


class ConfigError(UserError, ValueError):
    """An invalid configuration; the message names every offending key."""


class RunNotFoundError(UserError, LookupError):
    """No run directory or MLflow run of that name or id."""


class TrainingDivergedError(UserError, FloatingPointError):
    """A training loss or gradient norm became non-finite; the message names the step and the loss terms."""


class CheckpointError(UserError, ValueError):
    """A weights or checkpoint file that cannot be read, or that does not fit the network it is loaded into."""
