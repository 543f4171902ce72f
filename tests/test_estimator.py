"""Streaming float64 moments against batch covariances of the full traces (pure tensor tests)."""

from __future__ import annotations

import math

import pytest
import torch

from bif.estimator import (
    Moments,
    batch_covariance,
    estimate,
    init_moments,
    merge_chains,
    update_moments,
)

C, D, N, Q = 3, 9, 5, 4


def traces(seed: int = 0, offset: float = 0.0, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Correlated random traces a [C, D, N], b [C, D, Q] (b depends on a, so Cov != 0)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(C, D, N, generator=g, dtype=torch.float64)
    mix = torch.randn(N, Q, generator=g, dtype=torch.float64)
    b = a @ mix + 0.5 * torch.randn(C, D, Q, generator=g, dtype=torch.float64)
    chain_shift = torch.arange(C, dtype=torch.float64)[:, None, None]  # chains differ in mean
    return offset + scale * (a + chain_shift), offset + scale * (b - chain_shift)


def stream(a: torch.Tensor, b: torch.Tensor, inplace: bool, per_chain: bool) -> Moments:
    """Feed draws as the sampler does: all chains at once (vmap) or one chain at a time (loop)."""
    m = init_moments(C, N, Q)
    if per_chain:
        for c in range(C):
            for d in range(a.shape[1]):
                idx = torch.tensor([c])
                out = update_moments(m, idx, a[c, d][None], b[c, d][None], inplace=inplace)
                m = m if inplace else out
    else:
        idx = torch.arange(C)
        for d in range(a.shape[1]):
            out = update_moments(m, idx, a[:, d], b[:, d], inplace=inplace)
            m = m if inplace else out
    return m


def torch_cross_cov(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cov(b_q, a_n) [Q, N] of draws a [D, N], b [D, Q] via torch.cov (independent reference)."""
    full = torch.cov(torch.cat([b, a], dim=1).T)  # [(Q+N), (Q+N)]
    return full[: b.shape[1], b.shape[1] :]


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("per_chain", [True, False])
def test_streaming_matches_batch_covariance(inplace: bool, per_chain: bool) -> None:
    a, b = traces()
    m = stream(a, b, inplace, per_chain)
    ref = batch_covariance(a, b)  # [C, Q, N]
    torch.testing.assert_close(m.comoment / (D - 1), ref, rtol=1e-12, atol=1e-12)
    for c in range(C):
        torch.testing.assert_close(ref[c], torch_cross_cov(a[c], b[c]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.count, torch.full((C,), float(D), dtype=torch.float64))
    torch.testing.assert_close(m.mean_a, a.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.mean_b, b.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.m2_a / (D - 1), a.var(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.m2_b / (D - 1), b.var(1), rtol=1e-12, atol=1e-12)


def test_pure_update_does_not_mutate() -> None:
    a, b = traces()
    m0 = init_moments(C, N, Q)
    m1 = update_moments(m0, torch.arange(C), a[:, 0], b[:, 0])
    m2 = update_moments(m1, torch.arange(C), a[:, 1], b[:, 1])
    assert all(bool((t == 0).all()) for t in m0)
    assert bool((m1.count == 1).all()) and bool((m2.count == 2).all())
    # The in-place twin gives the same numbers and mutates its argument.
    m3 = init_moments(C, N, Q)
    update_moments(m3, torch.arange(C), a[:, 0], b[:, 0], inplace=True)
    update_moments(m3, torch.arange(C), a[:, 1], b[:, 1], inplace=True)
    for x, y in zip(m2, m3, strict=True):
        assert torch.equal(x, y)


def test_float32_draws_accumulate_in_float64() -> None:
    a, b = traces()
    m = stream(a.float(), b.float(), inplace=True, per_chain=False)
    assert all(t.dtype == torch.float64 for t in m)
    ref = batch_covariance(a.float().double(), b.float().double())
    torch.testing.assert_close(m.comoment / (D - 1), ref, rtol=1e-12, atol=1e-12)


def test_merge_chains_matches_concatenated_draws() -> None:
    """Chan's merge of per-chain moments == covariance of all C·D draws pooled together, also
    with unequal draw counts per chain."""
    a, b = traces(seed=1)
    m = init_moments(C, N, Q)
    counts = [D, D - 4, 2]
    for c, k in enumerate(counts):
        for d in range(k):
            update_moments(m, torch.tensor([c]), a[c, d][None], b[c, d][None], inplace=True)
    pooled = merge_chains(m)
    a_all = torch.cat([a[c, :k] for c, k in enumerate(counts)])  # [sum k, N]
    b_all = torch.cat([b[c, :k] for c, k in enumerate(counts)])
    total = sum(counts)
    assert pooled.count.tolist() == [float(total)]
    torch.testing.assert_close(pooled.mean_a[0], a_all.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled.m2_a[0] / (total - 1), a_all.var(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled.m2_b[0] / (total - 1), b_all.var(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        pooled.comoment[0] / (total - 1), torch_cross_cov(a_all, b_all), rtol=1e-12, atol=1e-12
    )


def test_estimate_chain_and_pooled() -> None:
    a, b = traces(seed=2)
    m = stream(a, b, inplace=True, per_chain=False)
    est = estimate(m, "chain")
    cov = batch_covariance(a, b)  # [C, Q, N]
    torch.testing.assert_close(est.scores, -cov.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.stderr, cov.std(0) / math.sqrt(C), rtol=1e-10, atol=1e-12)
    var_a, var_b = a.var(1), b.var(1)  # [C, N], [C, Q]
    torch.testing.assert_close(est.self_influence, -var_a.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        est.self_influence_stderr, var_a.std(0) / math.sqrt(C), rtol=1e-10, atol=1e-12
    )
    corr = cov.mean(0) / (var_b.mean(0)[:, None] * var_a.mean(0)[None, :]).sqrt()
    torch.testing.assert_close(est.correlation, corr, rtol=1e-12, atol=1e-12)
    assert bool((est.correlation.abs() <= 1).all())

    pooled = estimate(m, "pooled")
    a_all, b_all = a.reshape(C * D, N), b.reshape(C * D, Q)
    torch.testing.assert_close(pooled.scores, -torch_cross_cov(a_all, b_all), rtol=1e-12, atol=0)
    ref_corr = torch.corrcoef(torch.cat([b_all, a_all], 1).T)[:Q, Q:]
    torch.testing.assert_close(pooled.correlation, ref_corr, rtol=1e-10, atol=1e-12)
    # Pooling adds the between-chain spread of the means (chains were shifted on purpose).
    assert not torch.allclose(pooled.scores, est.scores, rtol=1e-3)


def test_single_chain_stderr_is_nan() -> None:
    a, b = traces()
    m = init_moments(1, N, Q)
    for d in range(D):
        update_moments(m, torch.tensor([0]), a[0, d][None], b[0, d][None], inplace=True)
    est = estimate(m)
    assert torch.isfinite(est.scores).all() and torch.isnan(est.stderr).all()


def test_welford_survives_large_offsets() -> None:
    """Losses of ~1e9 with O(1) fluctuations: the textbook E[ab] - E[a]E[b] loses every digit
    (products ~1e18, float64 resolution ~1e2), Welford keeps ~1e-6 relative accuracy."""
    offset = 1e9
    a0, b0 = traces(seed=3)
    a, b = traces(seed=3, offset=offset)
    m = stream(a, b, inplace=True, per_chain=False)
    exact = batch_covariance(a0, b0)  # covariance is shift-invariant
    torch.testing.assert_close(m.comoment / (D - 1), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.m2_a / (D - 1), a0.var(1), rtol=1e-6, atol=1e-6)
    # The twin that must fail: the naive one-pass formula is wrong by O(1) or more here.
    naive = torch.einsum("cdq,cdn->cqn", b, a) - D * b.mean(1)[:, :, None] * a.mean(1)[:, None]
    err = (naive / (D - 1) - exact).abs().max()
    assert err > 1e-2
    # And the pooled merge, whose between-chain terms subtract large means, stays accurate.
    pooled = merge_chains(m)
    a_all, b_all = a0.reshape(C * D, N), b0.reshape(C * D, Q)
    ref = torch_cross_cov(a_all, b_all)
    torch.testing.assert_close(pooled.comoment[0] / (C * D - 1), ref, rtol=1e-6, atol=1e-6)


def test_estimate_needs_two_draws() -> None:
    m = init_moments(2, N, Q)
    update_moments(m, torch.arange(2), torch.zeros(2, N), torch.zeros(2, Q), inplace=True)
    with pytest.raises(ValueError, match="at least 2 draws"):
        estimate(m)
