"""Typed errors. Every message says what to change; bif never `assert`s on user input."""

from __future__ import annotations


class BIFError(Exception):
    """Base class of every error bif raises on purpose."""


class ConfigError(BIFError, ValueError):
    """A hyperparameter is invalid (non-finite, non-positive, wrong type or unknown name)."""


class SelectionError(ConfigError, IndexError):
    """A query, training example, token or position asked for does not exist in the result."""


class DataError(BIFError, ValueError):
    """The data cannot be used: empty, unindexable, or inconsistent lengths."""


class ModelError(BIFError, ValueError):
    """The model cannot be sampled as it is (e.g. NaN or inf in its weights)."""


class ShapeError(BIFError, ValueError):
    """Model outputs, targets or a loss function's result have shapes that do not fit together."""


class DivergenceError(BIFError, RuntimeError):
    """A chain produced NaN/inf. Nothing from the diverged draw entered the estimates.

    Attributes:
        chain: index of the first chain that diverged.
        step: sampler step (0-based, burn-in included) at which it was detected.
    """

    def __init__(self, message: str, chain: int, step: int) -> None:
        super().__init__(message)
        self.chain = chain
        self.step = step


class ArtifactError(BIFError, ValueError):
    """A saved run or result does not match what is being asked (config, model or data differ)."""


class RunConfigError(ConfigError):
    """A ``bif run`` configuration file cannot be used: an unknown or missing key, a path that
    does not exist, an entry point that cannot be imported or returns the wrong thing."""
