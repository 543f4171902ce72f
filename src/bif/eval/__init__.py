"""Evaluation of attribution scores: LDS, leave-one-out correlation, mislabel detection.

Only the metrics are imported here; heavier parts of ``bif.eval`` (the retraining harness) are
imported from their own modules so this package never depends on them.
"""

from bif.eval.correlation import pearson, rankdata, roc_auc, spearman
from bif.eval.metrics import (
    LDSResult,
    LOOResult,
    flip_labels,
    lds,
    loo_correlation,
    mislabel_auc,
    token_lds,
)

__all__ = [
    "LDSResult",
    "LOOResult",
    "flip_labels",
    "lds",
    "loo_correlation",
    "mislabel_auc",
    "pearson",
    "rankdata",
    "roc_auc",
    "spearman",
    "token_lds",
]
