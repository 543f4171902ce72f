"""Evaluation metrics for attribution scores: LDS, leave-one-out correlation, mislabel AUC.

All functions are pure functions of tensors (no I/O, no global RNG). Scores follow the project's
sign convention ``[Q, N]``: negative = training on n LOWERS query q's observable (a proponent).

Direction of each metric, so that a good method scores high:

- LDS: the prediction for subset S_j is ``Σ_{n∈S_j} score[q, n]``. Keeping proponents (negative
  scores) in S_j lowers both the prediction and the retrained query loss, so a good method has a
  POSITIVE Spearman correlation with the measured loss.
- LOO: removing a proponent RAISES the query loss, so the predicted effect of removal is
  ``-score`` (first order: ``-score / N``) and is correlated with the measured change.
- Mislabel AUC: examples are ranked by suspicion derived from self-influence (see
  :func:`mislabel_auc`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from bif.errors import ConfigError, DataError, ShapeError
from bif.eval.correlation import (
    bootstrap_mean_ci,
    is_constant,
    pearson,
    roc_auc,
    spearman,
)

if TYPE_CHECKING:
    from bif.eval.ground_truth import GroundTruth

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# LDS
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score of one method on one setting.

    Attributes:
        mean: mean Spearman correlation over the queries where it is defined.
        ci_low, ci_high: percentile bootstrap interval of ``mean`` (resampling those queries).
        per_query: ``[Q]`` Spearman correlation per query, NaN where it is undefined.
        excluded: ``[Q]`` bool, True for queries whose predictions or targets are constant over
            the subsets (their correlation is undefined; they are left out of ``mean``).
        num_subsets: M, subsets the targets were measured on.
        num_seeds: R, retraining seeds averaged per subset (1 when targets were ``[M, Q]``).
        confidence: level of the interval.
        unit: what the rows are: "queries" (:func:`lds`) or "tokens" (:func:`token_lds`, where
            ``per_query`` holds one correlation per sampled query token).
    """

    mean: float
    ci_low: float
    ci_high: float
    per_query: Tensor
    excluded: Tensor
    num_subsets: int
    num_seeds: int
    confidence: float
    unit: str = "queries"

    @property
    def num_excluded(self) -> int:
        return int(self.excluded.sum())

    @property
    def num_queries(self) -> int:
        """Queries that entered the mean."""
        return int((~self.excluded).sum())

    def __str__(self) -> str:
        s = (
            f"LDS {self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] "
            f"({self.num_queries} {self.unit}, M={self.num_subsets}, R={self.num_seeds})"
        )
        return s + (f", {self.num_excluded} constant excluded" if self.num_excluded else "")


def _check_boot(n_boot: int, confidence: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence!r}.")


def _finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name} contains NaN or inf; drop or recompute those entries first.")


def lds(
    scores: Tensor,
    masks: Tensor,
    targets: Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> LDSResult:
    """Linear datamodeling score: per query, Spearman over subsets of predicted vs measured output.

    Args:
        scores: ``[Q, N]`` attribution scores (negative = proponent).
        masks: ``[M, N]`` bool, ``masks[j, n]`` = training example n is in subset S_j.
        targets: ``[M, Q]`` measured query output (e.g. loss) after training on S_j, or
            ``[M, R, Q]`` over R retraining seeds (averaged over R first).
        n_boot: bootstrap resamples of the queries for the interval.
        seed: seed of the bootstrap.
        confidence: level of the interval.

    Returns:
        :class:`LDSResult`. Queries whose predictions or targets are constant over the M subsets
        have no defined correlation: they are excluded from the mean and counted.

    Raises:
        ShapeError: inconsistent shapes or a non-bool mask.
        DataError: non-finite inputs, fewer than 3 subsets, or every query constant.
    """
    _check_boot(n_boot, confidence)
    if scores.dim() != 2:
        raise ShapeError(f"scores must be [Q, N], got {tuple(scores.shape)}.")
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ShapeError(
            f"masks must be a bool tensor [M, N], got {masks.dtype} {tuple(masks.shape)}."
        )
    q, n = scores.shape
    m = masks.shape[0]
    if masks.shape[1] != n:
        raise ShapeError(f"masks cover {masks.shape[1]} training examples but scores have {n}.")
    if targets.dim() == 3:
        num_seeds = targets.shape[1]
        if num_seeds == 0:
            raise ShapeError("targets [M, R, Q] has R = 0 seeds.")
        targets = targets.to(F64).mean(dim=1)
    elif targets.dim() == 2:
        num_seeds = 1
    else:
        raise ShapeError(f"targets must be [M, Q] or [M, R, Q], got {tuple(targets.shape)}.")
    if tuple(targets.shape) != (m, q):
        raise ShapeError(
            f"targets must be [M={m}, Q={q}] to match masks and scores, got {tuple(targets.shape)}."
        )
    if m < 3:
        raise DataError(f"LDS needs at least 3 subsets for a rank correlation, got M={m}.")
    _finite(scores, "scores")
    _finite(targets, "targets")

    preds = masks.to("cpu", F64) @ scores.to("cpu", F64).T  # [M, Q]
    targets = targets.to("cpu", F64)
    excluded = is_constant(preds, 0) | is_constant(targets, 0)  # [Q]
    if bool(excluded.all()):
        raise DataError(
            f"all {q} queries have constant predictions or constant targets over the {m} subsets, "
            "so no Spearman correlation is defined (all-zero scores? identical retrained "
            "outputs?)."
        )
    per_query = spearman(preds, targets, dim=0)
    per_query[excluded] = float("nan")
    valid = per_query[~excluded]
    lo, hi = bootstrap_mean_ci(valid, n_boot, confidence, seed)
    return LDSResult(
        mean=float(valid.mean()),
        ci_low=lo,
        ci_high=hi,
        per_query=per_query,
        excluded=excluded,
        num_subsets=m,
        num_seeds=num_seeds,
        confidence=confidence,
    )


def token_lds(
    scores: Tensor,
    gt: GroundTruth,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> LDSResult:
    """Token-level LDS: per sampled query token k, Spearman over the subsets S_j between
    ``Σ_{n∈S_j} scores[k, n]`` and token k's retrained loss (mean over seeds), averaged over the
    tokens with a bootstrap interval over tokens. It is :func:`lds` with the tokens as queries.

    Args:
        scores: ``[K, N]`` score of each training SEQUENCE on each sampled query token's loss,
            rows in the order of ``gt.token_index`` ``[K, 2]`` (query, position).
        gt: a complete ground truth with token targets ``[M, R, K]``.
        n_boot, seed, confidence: as in :func:`lds`.

    Returns:
        :class:`LDSResult` with ``unit="tokens"`` (``per_query``: ``[K]`` per token).

    Raises:
        ArtifactError: ``gt`` has no token targets or is incomplete.
        ShapeError: ``scores`` is not ``[K, N]``.
    """
    k = gt.mean_token_targets().shape[1]  # raises unless complete with token targets
    if scores.dim() != 2 or scores.shape[0] != k:
        raise ShapeError(
            f"token scores must be [K={k}, N] (one row per sampled query token), "
            f"got {tuple(scores.shape)}."
        )
    assert gt.token_targets is not None
    # [M, R, K]: lds averages the seeds itself (float64), exactly as for the sequence LDS
    res = lds(scores, gt.masks, gt.token_targets, n_boot=n_boot, seed=seed, confidence=confidence)
    return replace(res, unit="tokens")


# ---------------------------------------------------------------------------------------------
# Leave-one-out correlation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LOOResult:
    """Agreement of scores with measured leave-one-out changes.

    Attributes:
        pearson, spearman: means over the queries where the correlation is defined.
        per_query_pearson, per_query_spearman: ``[Q]``, NaN where undefined.
        excluded: ``[Q]`` bool, queries whose scores or LOO changes are constant over the
            examples with ground truth (left out of the means).
    """

    pearson: float
    spearman: float
    per_query_pearson: Tensor
    per_query_spearman: Tensor
    excluded: Tensor

    @property
    def num_excluded(self) -> int:
        return int(self.excluded.sum())


def loo_correlation(scores: Tensor, loo_delta: Tensor, index: Tensor) -> LOOResult:
    """Per-query Pearson and Spearman correlation of predicted and measured removal effects.

    Removing a proponent (negative score) raises the query's loss, so the predicted change on
    removal is ``-score`` and a good method correlates POSITIVELY with ``loo_delta``.

    Args:
        scores: ``[Q, N]`` attribution scores.
        loo_delta: ``[Q, K]`` measured ``φ_q(trained without example index[k]) - φ_q(trained
            on all)`` (averaged over retraining seeds by the caller).
        index: ``[K]`` training indices (into N) that have leave-one-out ground truth.

    Raises:
        ShapeError: inconsistent shapes or an index out of range.
        DataError: fewer than 3 examples, non-finite values, or every query constant.
    """
    if scores.dim() != 2 or loo_delta.dim() != 2:
        raise ShapeError(
            f"scores must be [Q, N] and loo_delta [Q, K]; got {tuple(scores.shape)} and "
            f"{tuple(loo_delta.shape)}."
        )
    q, n = scores.shape
    index = torch.as_tensor(index).reshape(-1)
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ShapeError(f"index must hold integer training indices, got dtype {index.dtype}.")
    if tuple(loo_delta.shape) != (q, index.numel()):
        raise ShapeError(
            f"loo_delta must be [Q={q}, K={index.numel()}] (one column per index), got "
            f"{tuple(loo_delta.shape)}."
        )
    if index.numel() < 3:
        raise DataError(f"LOO correlation needs at least 3 examples, got {index.numel()}.")
    if int(index.min()) < 0 or int(index.max()) >= n:
        raise ShapeError(f"index must lie in [0, {n - 1}], got [{int(index.min())}, "
                         f"{int(index.max())}].")  # fmt: skip
    _finite(scores, "scores")
    _finite(loo_delta, "loo_delta")
    predicted = -scores.to("cpu", F64)[:, index.cpu()]  # [Q, K]
    measured = loo_delta.to("cpu", F64)
    excluded = is_constant(predicted, 1) | is_constant(measured, 1)
    if bool(excluded.all()):
        raise DataError("every query has constant scores or constant LOO changes over the "
                        "examples; no correlation is defined.")  # fmt: skip
    pr = pearson(predicted, measured, dim=1)
    sp = spearman(predicted, measured, dim=1)
    pr[excluded] = float("nan")
    sp[excluded] = float("nan")
    return LOOResult(
        pearson=float(pr[~excluded].mean()),
        spearman=float(sp[~excluded].mean()),
        per_query_pearson=pr,
        per_query_spearman=sp,
        excluded=excluded,
    )


# ---------------------------------------------------------------------------------------------
# Mislabel detection
# ---------------------------------------------------------------------------------------------


def mislabel_auc(
    self_influence: Tensor,
    is_flipped: Tensor,
    direction: Literal["negative", "positive"] = "negative",
) -> float:
    """How well self-influence finds flipped labels: ROC AUC of the suspicion ranking.

    Args:
        self_influence: ``[N]`` per-example self-influence.
        is_flipped: ``[N]`` bool, True where the label was flipped.
        direction: which end of the scale is suspicious. "negative" (default): MORE NEGATIVE is
            more suspicious. This fits bif's ``self_influence = -Var_p(l_n)`` (mislabelled
            examples have high, volatile loss) and the classical ``-∇l_nᵀ(H+λI)⁻¹∇l_n``.
            "positive": larger is more suspicious (e.g. a positive variance or gradient norm).

    Returns:
        AUC in [0, 1]: 1 = every flipped example ranked above every clean one, 0.5 = chance.
    """
    return roc_auc(suspicion(self_influence, is_flipped, direction), is_flipped)


def check_flip_pair(values: Tensor, is_flipped: Tensor, name: str) -> None:
    """Both ``[N]``, ``is_flipped`` bool, ``values`` finite; typed errors naming ``name``."""
    if values.dim() != 1 or is_flipped.shape != values.shape:
        raise ShapeError(
            f"{name} and is_flipped must both be [N]; got {tuple(values.shape)} "
            f"and {tuple(is_flipped.shape)}."
        )
    if is_flipped.dtype != torch.bool:
        raise ShapeError(f"is_flipped must be a bool tensor, got {is_flipped.dtype}.")
    _finite(values, name)


def suspicion(
    self_influence: Tensor,
    is_flipped: Tensor,
    direction: Literal["negative", "positive"] = "negative",
) -> Tensor:
    """Self-influence ``[N]`` oriented so that LARGER = more suspicious (float64, CPU).

    Args and checks as in :func:`mislabel_auc`.
    """
    if direction not in ("negative", "positive"):
        raise ConfigError(f"direction must be 'negative' or 'positive', got {direction!r}.")
    check_flip_pair(self_influence, is_flipped, "self_influence")
    s = self_influence.detach().to("cpu", F64)
    return -s if direction == "negative" else s


def flip_labels(
    y: Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Flip a known fraction of class labels to a different class, uniformly at random.

    Args:
        y: ``[N]`` integer labels in ``[0, num_classes)``.
        fraction: share of examples to flip, in [0, 1]; ``round(fraction · N)`` are flipped.
        num_classes: K >= 2.
        seed: seed of the choice of examples and of their new labels.

    Returns:
        ``(y_flipped [N], is_flipped [N] bool)``; every flipped label differs from the original.
    """
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ShapeError(f"y must be integer labels [N], got {y.dtype} {tuple(y.shape)}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must lie in [0, 1], got {fraction!r}.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes - 1}], got "
                        f"[{int(y.min())}, {int(y.max())}].")  # fmt: skip
    n = y.numel()
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[: round(fraction * n)]
    # A shift in [1, K-1] modulo K is uniform over the OTHER classes.
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=g)
    y_flipped = y.clone()
    y_flipped[chosen.to(y.device)] = (y[chosen.to(y.device)] + shift.to(y)) % num_classes
    is_flipped = torch.zeros(n, dtype=torch.bool, device=y.device)
    is_flipped[chosen.to(y.device)] = True
    return y_flipped, is_flipped
