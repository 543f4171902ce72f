"""bif: training data attribution with local Bayesian influence functions.

import bif
result = bif.attribute(model, train=(X, y), query=(Xq, yq), task="classification")
result.scores   # [Q, N]  BIF = -Cov(train loss, query loss); negative = proponent
result.stderr   # [Q, N]
result.top(0, k=5)
"""

from bif._version import __version__
from bif.api import attribute
from bif.config import BIFConfig
from bif.diagnostics import Diagnostics, DiagnosticWarning
from bif.errors import (
    ArtifactError,
    BIFError,
    ConfigError,
    DataError,
    DivergenceError,
    ModelError,
    SelectionError,
    ShapeError,
)
from bif.result import BIFResult, Influence, TopInfluences
from bif.task import ClassificationTask, OutputLossTask, RegressionTask, Task, margin
from bif.tokens import TokenInfluence, TokenTraces

__all__ = [
    "ArtifactError",
    "BIFConfig",
    "BIFError",
    "BIFResult",
    "ClassificationTask",
    "ConfigError",
    "DataError",
    "DiagnosticWarning",
    "Diagnostics",
    "DivergenceError",
    "Influence",
    "ModelError",
    "OutputLossTask",
    "RegressionTask",
    "SelectionError",
    "ShapeError",
    "Task",
    "TokenInfluence",
    "TokenTraces",
    "TopInfluences",
    "__version__",
    "attribute",
    "margin",
]
