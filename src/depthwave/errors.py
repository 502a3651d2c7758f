"""Exceptions that carry a message meant for the user, printed as one line by the CLI."""


class DepthwaveError(Exception):
    """Base class of every error depthwave raises on purpose (bad input, bad checkpoint, ...)."""


class ConfigError(DepthwaveError, ValueError):
    """A model configuration field is missing, of the wrong type or inconsistent."""


class CheckpointError(DepthwaveError):
    """A checkpoint cannot be found, downloaded, or does not match its configuration."""


class InvalidParameterError(DepthwaveError, ValueError):
    """A sampling or sampler hyperparameter is out of range."""


class PromptError(DepthwaveError, ValueError):
    """A prompt is empty, holds unknown token ids, or does not fit in the model's context."""
