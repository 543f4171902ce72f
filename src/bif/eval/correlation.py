"""Rank statistics shared by the metrics: ranks with ties, correlations, bootstrap, ROC AUC.

All in float64 on the CPU, column-wise along a chosen dimension, with NaN where a correlation is
undefined (a constant side) rather than a silent 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bif.errors import DataError

F64 = torch.float64


def rankdata(x: Tensor, dim: int = 0) -> Tensor:
    """Ranks along ``dim`` (1-based, ties get their average rank, like ``scipy.stats.rankdata``).

    Args:
        x: any shape; NaN is not allowed (its rank would be meaningless).

    Returns:
        float64 ranks, same shape as ``x``.
    """
    x = x.to(F64).movedim(dim, -1)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])  # [R, M]
    r, m = rows.shape
    if m == 0:
        return torch.empty(shape, dtype=F64).movedim(-1, dim)
    sorted_vals, order = rows.sort(dim=1, stable=True)
    # A new tie group starts wherever the sorted value changes; groups are numbered globally
    # (row offset) so one scatter handles every row at once.
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1 + torch.arange(r).unsqueeze(1) * m  # [R, M]
    position = torch.arange(1, m + 1, dtype=F64).expand(r, m)
    total = torch.zeros(r * m, dtype=F64).scatter_add_(0, group.reshape(-1), position.reshape(-1))
    count = torch.zeros(r * m, dtype=F64).scatter_add_(
        0, group.reshape(-1), torch.ones(r * m, dtype=F64)
    )
    avg_sorted = (total / count.clamp_min(1))[group]  # [R, M]
    ranks = torch.empty_like(avg_sorted).scatter_(1, order, avg_sorted)
    return ranks.reshape(shape).movedim(-1, dim)


def is_constant(x: Tensor, dim: int = 0) -> Tensor:
    """True where every entry along ``dim`` is equal (a correlation with it is undefined)."""
    if x.shape[dim] == 0:
        return torch.ones(x.movedim(dim, -1).shape[:-1], dtype=torch.bool)
    return x.amax(dim=dim) == x.amin(dim=dim)


def pearson(x: Tensor, y: Tensor, dim: int = 0) -> Tensor:
    """Pearson correlation along ``dim`` (float64); NaN where either side is constant."""
    x, y = x.to(F64), y.to(F64)
    xc = x - x.mean(dim=dim, keepdim=True)
    yc = y - y.mean(dim=dim, keepdim=True)
    num = (xc * yc).sum(dim=dim)
    den = (xc.pow(2).sum(dim=dim) * yc.pow(2).sum(dim=dim)).sqrt()
    out = num / den
    undefined = is_constant(x, dim) | is_constant(y, dim)
    return torch.where(undefined, torch.full_like(out, float("nan")), out.clamp(-1.0, 1.0))


def spearman(x: Tensor, y: Tensor, dim: int = 0) -> Tensor:
    """Spearman rank correlation along ``dim`` with average ranks for ties (as scipy).

    NaN where either side is constant along ``dim`` (the correlation is undefined there).
    """
    return pearson(rankdata(x, dim), rankdata(y, dim), dim)


def bootstrap_mean_ci(
    values: Tensor, n_boot: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` ``[K]`` (seeded, CPU RNG)."""
    k = values.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(k, (n_boot, k), generator=g)
    means = values.to(F64)[idx].mean(dim=1)
    tail = (1.0 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=F64)).tolist()
    return lo, hi


def roc_auc(suspicion: Tensor, positive: Tensor) -> float:
    """ROC AUC of ``suspicion`` ``[N]`` for the bool labels ``positive`` (ties count one half).

    Mann-Whitney form: the probability that a random positive outranks a random negative.
    """
    pos = positive.reshape(-1).to(torch.bool).cpu()
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"AUC needs both flipped and clean examples; got {n_pos} flipped, {n_neg} clean."
        )
    ranks = rankdata(suspicion.reshape(-1).cpu(), dim=0)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
