"""Autocorrelation-aware standard errors of the scores by streaming batch means (pure functions).

The across-chain error of :func:`bif.estimator.estimate` rests on ``C - 1`` degrees of freedom
(7 with the default 8 chains): unbiased for the variance, but so uncertain itself that z-scores
built on it are Student-t with variance ``(C - 1)/(C - 3)`` (1.4 for 8 chains). Batch means add
the information inside each chain. Every chain's draws are cut into consecutive blocks; for each
block ``k`` (``n_k`` draws) we keep its own Welford moments, so the block's share of the chain's
co-moment, centred on the CHAIN means ``ā, b̄``, is exact:

    S_k = M_k + n_k (b̄_k - b̄)(ā_k - ā)ᵀ                   [Q, N]
    y_k = S_k / n_k ,   Cov_c = Σ_k S_k / (n - 1)

and the variance of ``Cov_c`` is estimated from the spread of the block values (weights
``w_k = n_k / n``, ``K'`` non-empty blocks; for equal blocks the textbook batch-means formula):

    Var(Cov_c) ≈ (n / (n - 1))² · K'/(K' - 1) · Σ_k w_k² (y_k - ȳ)²      ȳ = Σ_k w_k y_k

With ``K`` slots the block length doubles whenever the slots are full (adjacent pairs merged by
Chan's formula), so memory stays ``K × [C, Q, N]`` for any number of draws, including runs whose
length is not known in advance (``num_draws='auto'``). Batch means are biased low while blocks
are shorter than the autocorrelation time; :func:`combined_variance` pools them with the
across-chain estimate, which is not.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Blocks(NamedTuple):
    """Per-chain moments of consecutive blocks of draws. C chains, K slots, N train, Q queries."""

    length: Tensor  # [C] draws per full block (float64, an integer value)
    count: Tensor  # [C, K]
    mean_a: Tensor  # [C, K, N]
    mean_b: Tensor  # [C, K, Q]
    m2_a: Tensor  # [C, K, N]
    comoment: Tensor  # [C, K, Q, N]


def init_blocks(
    num_chains: int,
    num_slots: int,
    num_train: int,
    num_query: int,
    block_length: int,
    device: torch.device | str = "cpu",
) -> Blocks:
    """Empty blocks; ``block_length`` draws per block until the ``num_slots`` slots are full."""
    if num_slots < 2 or num_slots % 2:
        raise ValueError(f"num_slots must be an even number >= 2, got {num_slots}")
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
    c, k, n, q = num_chains, num_slots, num_train, num_query
    # On the host whatever the device: every draw reads it (a device read would wait for the
    # accelerator at every draw), and it changes only when slots merge.
    length = torch.full((c,), float(max(1, block_length)), dtype=torch.float64)
    return Blocks(length, z(c, k), z(c, k, n), z(c, k, q), z(c, k, n), z(c, k, q, n))


def _merge_pairs(bl: Blocks, rows: Tensor) -> None:
    """Merge slots (2j, 2j+1) into slot j for chains ``rows`` (in place); doubles their length."""
    n1, n2 = bl.count[rows, 0::2], bl.count[rows, 1::2]  # [G, K/2]
    n = n1 + n2
    safe = torch.where(n > 0, n, torch.ones_like(n))
    da = bl.mean_a[rows, 1::2] - bl.mean_a[rows, 0::2]  # [G, K/2, N]
    db = bl.mean_b[rows, 1::2] - bl.mean_b[rows, 0::2]
    f = (n2 / safe).unsqueeze(-1)
    g = (n1 * n2 / safe).unsqueeze(-1)
    mean_a = bl.mean_a[rows, 0::2] + f * da
    mean_b = bl.mean_b[rows, 0::2] + f * db
    m2_a = bl.m2_a[rows, 0::2] + bl.m2_a[rows, 1::2] + g * da**2
    com = (
        bl.comoment[rows, 0::2]
        + bl.comoment[rows, 1::2]
        + g.unsqueeze(-1) * db.unsqueeze(-1) * da.unsqueeze(-2)
    )
    half = bl.count.shape[1] // 2
    for t, new in ((bl.count, n), (bl.mean_a, mean_a), (bl.mean_b, mean_b), (bl.m2_a, m2_a)):
        t[rows, :half] = new
        t[rows, half:] = 0
    bl.comoment[rows, :half] = com
    bl.comoment[rows, half:] = 0
    bl.length[rows if isinstance(rows, slice) else rows.cpu()] *= 2


def chain_comoment(bl: Blocks, mean_a: Tensor, mean_b: Tensor) -> Tensor:
    """Each chain's whole co-moment ``Σ_d (b_d - b̄)(a_d - ā)ᵀ`` ``[C, Q, N]`` from its blocks:
    ``Σ_k S_k`` with ``S_k`` as in the module docstring (Chan's merge, exact), given the chain
    means ``mean_a [C, N]`` and ``mean_b [C, Q]``. Empty slots add nothing."""
    da = bl.mean_a - mean_a.unsqueeze(1)  # [C, K, N]
    db = (bl.mean_b - mean_b.unsqueeze(1)) * bl.count.unsqueeze(-1)  # [C, K, Q]
    return bl.comoment.sum(1) + db.transpose(1, 2) @ da


def update_blocks(bl: Blocks, chains: Tensor | slice, draw: int, a: Tensor, b: Tensor) -> None:
    """Add draw number ``draw`` (0-based, the same for every chain in ``chains``) in place.

    Args:
        bl: the blocks (modified in place, like the loop's moments).
        chains: long tensor [G] of chain indices that share ``draw`` and the block length, or
            a slice of them (in place on views, as in :func:`bif.estimator.update_moments`).
        draw: index of this draw in each of those chains.
        a: train losses [G, N]; b: query observables [G, Q].
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    slots = bl.count.shape[1]
    first = chains.start if isinstance(chains, slice) else int(chains[0])
    length = int(bl.length[first])
    while draw // length >= slots:
        _merge_pairs(bl, chains)
        length *= 2
    k = draw // length
    if isinstance(chains, slice):
        count, mean_a, mean_b = bl.count[chains, k], bl.mean_a[chains, k], bl.mean_b[chains, k]
        count += 1
        n = count.unsqueeze(-1)  # [G, 1]
        da, db = a - mean_a, b - mean_b
        mean_a += da / n
        mean_b += db / n
        bl.m2_a[chains, k] += da * (a - mean_a)
        bl.comoment[chains, k].addcmul_(db.unsqueeze(-1), (a - mean_a).unsqueeze(-2))
        return
    bl.count[chains, k] += 1
    n = bl.count[chains, k].unsqueeze(-1)  # [G, 1]
    da = a - bl.mean_a[chains, k]
    db = b - bl.mean_b[chains, k]
    new_a = bl.mean_a[chains, k] + da / n
    bl.mean_a[chains, k] = new_a
    bl.mean_b[chains, k] = bl.mean_b[chains, k] + db / n
    bl.m2_a[chains, k] += da * (a - new_a)
    bl.comoment[chains, k] = bl.comoment[chains, k].addcmul_(
        db.unsqueeze(-1), (a - new_a).unsqueeze(-2)
    )


class BatchVariance(NamedTuple):
    """Batch-means variances of each chain's estimates and their degrees of freedom."""

    cov: Tensor  # [C, Q, N]  Var(Cov_c)
    var_a: Tensor  # [C, N]  Var(Var_c(l_n))
    dof: Tensor  # [C]  non-empty blocks - 1


def batch_variance(bl: Blocks) -> BatchVariance:
    """Batch-means variance of every chain's covariance and train-loss variance estimates."""
    cnt = bl.count  # [C, K]
    n = cnt.sum(1)  # [C]
    w = cnt / n[:, None]
    ma = (w[..., None] * bl.mean_a).sum(1, keepdim=True)  # [C, 1, N]
    mb = (w[..., None] * bl.mean_b).sum(1, keepdim=True)  # [C, 1, Q]
    safe = torch.where(cnt > 0, cnt, torch.ones_like(cnt))
    da, db = bl.mean_a - ma, bl.mean_b - mb  # [C, K, N], [C, K, Q]
    y = bl.comoment / safe[..., None, None] + db.unsqueeze(-1) * da.unsqueeze(-2)  # [C,K,Q,N]
    ya = bl.m2_a / safe[..., None] + da**2  # [C, K, N]
    kk = (cnt > 0).sum(1).to(torch.float64)  # [C]
    scale = (n / (n - 1)) ** 2 * kk / (kk - 1)  # [C]

    def var(v: Tensor) -> Tensor:
        extra = (1,) * (v.dim() - 2)
        ww = w.view(*w.shape, *extra)
        mean = (ww * v).sum(1, keepdim=True)
        return scale.view(-1, *extra) * (ww**2 * (v - mean) ** 2).sum(1)

    return BatchVariance(var(y), var(ya), kk - 1)


def combined_variance(
    across: Tensor, across_dof: int, batch: Tensor | None, batch_dof: float
) -> Tensor:
    """Pool two estimates of one variance by their degrees of freedom.

    ``across`` (the squared across-chain standard error, ``across_dof = C - 1``) is unbiased
    whatever the autocorrelation; ``batch`` (batch means, ``batch_dof = Σ_c (K'_c - 1)``) has
    many more degrees of freedom. NaN entries of either (one chain; one block) fall back to the
    other.
    """
    if batch is None or batch_dof <= 0:
        return across
    if across_dof <= 0:
        return batch
    ok_a, ok_b = torch.isfinite(across), torch.isfinite(batch)
    pooled = (across_dof * across + batch_dof * batch) / (across_dof + batch_dof)
    return torch.where(ok_a & ok_b, pooled, torch.where(ok_a, across, batch))


def t_variance(dof: float) -> float:
    """Variance of a z-score whose standard error has ``dof`` degrees of freedom (Student t)."""
    return dof / (dof - 2) if dof > 2 else math.inf
