"""Errors a user can fix. Each is a ValueError/FileNotFoundError with a one-line message that says what to do; the
CLI prints them as `error: ...` and exits with code 2."""

from __future__ import annotations


class ConvertError(ValueError):
    """Base of the input errors `convert` raises."""


class SourceNotFoundError(FileNotFoundError):
    """The source path does not exist and is not a model in the local Hugging Face cache."""


class UnsupportedArchitectureError(ConvertError):
    """The config's model_type has no family adapter."""


class UnsafeCheckpointError(ConvertError):
    """A pickle file that `torch.load(weights_only=True)` refuses: loading it would run arbitrary code."""


class CorruptCheckpointError(ConvertError):
    """A weights file that cannot be read (truncated, not the format its name says)."""


class WeightMismatchError(ConvertError):
    """The weights do not fit the config: a tensor is missing, extra, or has the wrong shape."""


class MissingConfigError(ConvertError):
    """A bare state dict without a config.json beside it or given with --config."""
