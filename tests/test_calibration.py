"""The calibration benchmark's arithmetic (``bif.bench.calibration``) on synthetic replicates with
known answers, a small end-to-end run on linear regression against its exact expectation, and the
time-to-EK-FAC grid helpers. The 60/20-replicate studies are slow (tests/test_diagnostics_
calibration.py)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from bif.bench.calibration import (
    false_alarms,
    linear_replicates,
    summarise,
    z_squared,
    z_variance,
)
from bif.bench.timeto import by_cost, parse_grid
from bif.errors import ConfigError
from bif.mcse import t_variance

F64 = torch.float64


def _synthetic(r: int, q: int, n: int, sigma: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(q, n, generator=g, dtype=F64)
    scores = truth + sigma * torch.randn(r, q, n, generator=g, dtype=F64)
    return scores, truth


def test_z_variance_of_calibrated_errors_is_one_and_detects_a_factor_two() -> None:
    """Independent normal replicates with their true standard deviation as the error: E[z²] = 1,
    within the Monte-Carlo error of R·Q·N independent χ²₁ (variance 2); reporting half the
    deviation gives 4; the leave-one-out mean (no truth) gives the same answers."""
    r, q, n = 40, 5, 50
    sigma = torch.rand(q, n, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.1
    scores, truth = _synthetic(r, q, n, sigma)
    err = sigma.expand(r, q, n)
    se = math.sqrt(2 / (r * q * n))
    crit = stats.norm.ppf(1 - 1e-3 / 2)
    for t in (truth, None):
        v, lo, hi, m = z_variance(scores, err, t)
        assert m == q * n and lo <= v <= hi
        assert abs(v - 1) <= crit * se * 1.1, (t is None, v)  # LOO: a 1/(R-1) larger spread
        v2, *_ = z_variance(scores, err / 2, t)
        assert abs(v2 - 4) <= 4 * crit * se * 1.1, v2


def test_z_squared_leaves_out_zero_and_nonfinite_errors() -> None:
    scores = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]], [[2.0, 2.0]]], dtype=F64)
    err = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[math.nan, 0.0]]], dtype=F64)
    z2 = z_squared(scores, err)
    assert torch.isnan(z2[:, 0, 1]).all() and torch.isnan(z2[2, 0, 0])
    # Leave-one-out: replicate 0 against mean(3, 2) = 2.5, scaled by sqrt(R/(R-1)) = sqrt(1.5).
    assert float(z2[0, 0, 0]) == pytest.approx(1.5**2 / 1.5)
    with pytest.raises(ConfigError, match="needs >= 3 replicates"):
        z_squared(scores[:2], err[:2])


def test_student_t_errors_have_the_t_variance() -> None:
    """An error estimated from ν = 7 degrees of freedom (8 chains): E[z²] = 7/5."""
    g = torch.Generator().manual_seed(3)
    r, c, m = 400, 8, 20
    per_chain = torch.randn(r, c, m, generator=g, dtype=F64)
    scores = per_chain.mean(1)[:, None]  # [R, 1, M]
    err = (per_chain.std(1) / math.sqrt(c))[:, None]
    v, lo, hi, _ = z_variance(scores, err, torch.zeros(1, m, dtype=F64))
    assert lo <= t_variance(7) <= hi and lo > 1.1, (v, lo, hi)


def test_linear_regression_replicates_match_the_exact_answer() -> None:
    """Eight short replicates (4 chains × 400 draws) against the exact expectation: the grand
    mean agrees entry by entry within its own error (Bonferroni t over the 400 entries), and
    every kind of error gets a z-variance row with its Student-t expectation."""
    reps = linear_replicates(8, num_chains=4, num_draws=400, num_burnin=300)
    assert reps.truth is not None and reps.scores.shape == (8, 10, 40)
    mean = reps.scores.mean(0)
    se = reps.scores.std(0) / math.sqrt(8)
    crit = stats.t.ppf(1 - 1e-3 / (2 * mean.numel()), 7)
    assert float(((mean - reps.truth) / se).abs().max()) <= crit
    rows = {r.error: r for r in summarise(reps, n_boot=200)}
    assert set(rows) == {"stderr", "stderr_chains", "mcse"}
    assert rows["stderr_chains"].dof == 3 and rows["stderr_chains"].expected == 3.0
    assert all(math.isfinite(r.variance) and r.replicates == 8 for r in rows.values())
    bad, runs = false_alarms(reps)
    assert runs == 8 and 0 <= bad <= 8


def test_time_to_grid_helpers() -> None:
    assert parse_grid("4x250, 8X500") == ((4, 250), (8, 500))
    for bad in ("4-250", "1x100", ""):
        with pytest.raises(ConfigError):
            parse_grid(bad)
    assert by_cost(((8, 500), (4, 250), (8, 250), (4, 250)), 200) == [(4, 250), (8, 250), (8, 500)]
