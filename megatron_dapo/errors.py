"""Errors a user can fix: the CLI prints them as one line (exit code 2) on every rank, never a traceback.

Each message names what to change: the config key, file, row, field or tensor, and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by input the user controls (config, data, checkpoints, models)."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


class CheckpointMismatchError(UserError, ValueError):
    """Weights or a checkpoint do not fit the model being built (missing tensors, other shapes or config)."""


class NonFiniteWeightsError(UserError, ValueError):
    """Loaded weights hold NaN or Inf: every log-prob, loss and update computed from them would be NaN."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A path given as a checkpoint holds none."""


class CheckpointUnusableError(UserError, ValueError):
    """A checkpoint is torn (cannot be resumed or converted) or could not be written; the message names it and
    the checkpoint that is still intact."""


def different_models(detail: str, what: str = "checkpoint") -> CheckpointMismatchError:
    """The one error for weights that do not fit the config: ``<detail>: the model config and the <what> ...``.

    ``detail`` names the source (file, folder, tensor) and the field or shape that disagrees.
    """
    return CheckpointMismatchError(f"{detail}: the model config and the {what} belong to different models")
