"""Streaming float64 moments and the BIF estimates derived from them (pure functions).

For each chain ``c`` we keep, over its draws ``d = 1..n_c``, the running means of the train losses
``a = l_i(w_d)`` ``[N]`` and query observables ``b = φ_q(w_d)`` ``[Q]``, their second central
moments, and the co-moment ``M_c = Σ_d (b_d - b̄)(a_d - ā)ᵀ`` ``[Q, N]`` (Welford's update, so no
trace is kept in memory). Then

    Cov_c = M_c / (n_c - 1)                          per-chain covariance  [C, Q, N]
    BIF   = - mean_c Cov_c                            ("chain" centring)    [Q, N]
    SE    = std_c(Cov_c) / sqrt(C)                    spread across chains  [Q, N]

"pooled" centring instead uses one covariance over all C·n draws (Chan's merge); it adds the
between-chain spread of the means to the covariance. The sign convention: a negative BIF means
up-weighting train example i lowers φ_q (a proponent when φ is the query loss).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from bif.mcse import Blocks, batch_variance, combined_variance


class Moments(NamedTuple):
    """Per-chain running statistics. C chains, N train examples, Q queries."""

    count: Tensor  # [C] draws seen
    mean_a: Tensor  # [C, N]
    mean_b: Tensor  # [C, Q]
    m2_a: Tensor  # [C, N]   Σ (a - ā)²
    m2_b: Tensor  # [C, Q]   Σ (b - b̄)²
    comoment: Tensor  # [C, Q, N]  Σ (b - b̄)(a - ā)ᵀ


def init_moments(
    num_chains: int, num_train: int, num_query: int, device: torch.device | str = "cpu"
) -> Moments:
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
    c, n, q = num_chains, num_train, num_query
    return Moments(z(c), z(c, n), z(c, q), z(c, n), z(c, q), z(c, q, n))


def update_moments(
    m: Moments, chains: Tensor | slice, a: Tensor, b: Tensor, inplace: bool = False,
    comoment: bool = True,
) -> Moments:  # fmt: skip
    """Add one draw for each chain in ``chains`` (Welford's update).

    Pure unless ``inplace=True`` (the sampling loop updates in place to avoid copying the
    ``[C, Q, N]`` co-moment at every draw; tests use both and check they agree).

    Args:
        m: current moments.
        chains: long tensor [G] of distinct chain indices receiving a draw, or a slice of
            them (the loop's contiguous groups: every update is then in place on views, one
            pass over the co-moment and no gather/scatter copies).
        a: train losses [G, N] at the draw.
        b: query observables [G, Q] at the draw.
        comoment: also update the ``[C, Q, N]`` co-moment (False: the caller derives it,
            e.g. from batch-means blocks with :func:`bif.mcse.chain_comoment`).
    """
    if not inplace:
        m = Moments(*(t.clone() for t in m))
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    if isinstance(chains, slice):
        count, mean_a, mean_b = m.count[chains], m.mean_a[chains], m.mean_b[chains]
        count += 1
        n = count.unsqueeze(-1)  # [G, 1]
        da, db = a - mean_a, b - mean_b
        mean_a += da / n
        mean_b += db / n
        m.m2_a[chains] += da * (a - mean_a)
        m.m2_b[chains] += db * (b - mean_b)
        # Co-moment: old deviation of one variable times new deviation of the other (exact).
        if comoment:
            m.comoment[chains].addcmul_(db.unsqueeze(-1), (a - mean_a).unsqueeze(-2))
        return m
    m.count[chains] += 1
    n = m.count[chains].unsqueeze(-1)  # [G, 1]
    da = a - m.mean_a[chains]
    db = b - m.mean_b[chains]
    new_mean_a = m.mean_a[chains] + da / n
    new_mean_b = m.mean_b[chains] + db / n
    m.mean_a[chains] = new_mean_a
    m.mean_b[chains] = new_mean_b
    m.m2_a[chains] += da * (a - new_mean_a)
    m.m2_b[chains] += db * (b - new_mean_b)
    # The same arithmetic as the slice path (addcmul rounds as one fused step).
    if comoment:
        m.comoment[chains] = m.comoment[chains].addcmul_(
            db.unsqueeze(-1), (a - new_mean_a).unsqueeze(-2)
        )
    return m


def merge_chains(m: Moments) -> Moments:
    """Pool all chains into one set of moments (Chan et al.'s parallel formula), leading dim 1."""
    w = m.count / m.count.sum()  # [C]
    mean_a = (w[:, None] * m.mean_a).sum(0)
    mean_b = (w[:, None] * m.mean_b).sum(0)
    da = m.mean_a - mean_a  # [C, N]
    db = m.mean_b - mean_b
    cnt = m.count[:, None]
    m2_a = (m.m2_a + cnt * da**2).sum(0)
    m2_b = (m.m2_b + cnt * db**2).sum(0)
    com = (m.comoment + cnt[:, :, None] * db[:, :, None] * da[:, None, :]).sum(0)
    return Moments(
        m.count.sum()[None], mean_a[None], mean_b[None], m2_a[None], m2_b[None], com[None]
    )


class Estimates(NamedTuple):
    scores: Tensor  # [Q, N]  BIF = -Cov
    stderr: Tensor  # [Q, N]  reported error (across-chain, pooled with batch means if given)
    correlation: Tensor  # [Q, N]  Corr(l_i, φ_q)
    self_influence: Tensor  # [N]  -Var(l_i)
    self_influence_stderr: Tensor  # [N]
    mcse: Tensor | None = None  # [Q, N]  batch-means (autocorrelation-aware) error alone
    stderr_dof: float = math.nan  # degrees of freedom behind ``stderr``
    stderr_method: str = "across-chain"
    stderr_chains: Tensor | None = None  # [Q, N]  the across-chain error alone


def _mean_and_se(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the chain dim and its standard error (NaN with fewer than 2 chains)."""
    c = x.shape[0]
    mean = x.mean(0)
    if c < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, x.std(0, unbiased=True) / math.sqrt(c)


def estimate(m: Moments, centering: str = "chain", blocks: Blocks | None = None) -> Estimates:
    """BIF, its standard error, correlation and self-influence from per-chain moments.

    With ``blocks`` (:mod:`bif.mcse`) the reported error pools the across-chain variance
    (``C - 1`` degrees of freedom) with the batch-means variance (``Σ_c (K'_c - 1)``), and
    ``mcse`` holds the batch-means error alone.
    """
    if bool((m.count < 2).any()):
        raise ValueError("every chain needs at least 2 draws to estimate a covariance")
    denom = (m.count - 1)[:, None]
    cov = m.comoment / denom[:, :, None]  # [C, Q, N]
    var_a = m.m2_a / denom  # [C, N]
    var_b = m.m2_b / denom  # [C, Q]
    cov_mean, cov_se = _mean_and_se(cov)
    var_a_mean, var_a_se = _mean_and_se(var_a)
    var_b_mean = var_b.mean(0)
    if centering == "pooled":
        p = merge_chains(m)
        pd = p.count - 1
        cov_mean = p.comoment[0] / pd
        var_a_mean = p.m2_a[0] / pd
        var_b_mean = p.m2_b[0] / pd
    elif centering != "chain":
        raise ValueError(f"centering must be 'chain' or 'pooled', got {centering!r}")
    denom_corr = (var_b_mean[:, None] * var_a_mean[None, :]).sqrt()
    corr = torch.where(denom_corr > 0, cov_mean / denom_corr, torch.zeros_like(cov_mean))
    c = int(m.count.shape[0])
    if blocks is None:
        return Estimates(-cov_mean, cov_se, corr, -var_a_mean, var_a_se, None, c - 1.0)
    bv = batch_variance(blocks)
    dof = float(bv.dof.clamp(min=0).sum())
    mcse = bv.cov.sum(0).sqrt() / c  # [Q, N]: SE of the mean over chains
    mcse_a = bv.var_a.sum(0).sqrt() / c
    se = combined_variance(cov_se**2, c - 1, mcse**2, dof).sqrt()
    se_a = combined_variance(var_a_se**2, c - 1, mcse_a**2, dof).sqrt()
    total = (c - 1) * (c > 1) + dof
    return Estimates(
        -cov_mean, se, corr, -var_a_mean, se_a, mcse, total, "across-chain+batch-means", cov_se
    )


def batch_covariance(a: Tensor, b: Tensor) -> Tensor:
    """Reference (non-streaming) per-chain covariance from full traces.

    Args:
        a: train traces [C, D, N]; b: query traces [C, D, Q].

    Returns:
        [C, Q, N] unbiased covariances, float64.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    ac = a - a.mean(1, keepdim=True)
    bc = b - b.mean(1, keepdim=True)
    return torch.einsum("cdq,cdn->cqn", bc, ac) / (a.shape[1] - 1)
