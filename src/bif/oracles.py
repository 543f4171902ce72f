"""Closed-form answers for Gaussian posteriors: what a BIF run must return, exactly.

On a quadratic potential ``U = ½ δᵀAδ`` the kinetic sampler (BAOAB, :mod:`bif.sampler.kinetic`)
is a linear recursion, so the lag covariances of its positions are known per eigenmode, and the
expectation of one chain's per-chain-centred covariance over D draws follows from them. Linear
regression with a squared loss has exactly such a posterior: the oracles of the test suite
(``tests/test_oracles.py``) and the calibration benchmark (:mod:`bif.bench.calibration`) use
these functions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

F64 = torch.float64


def expected_chain_cov(c: Tensor) -> Tensor:
    """Expectation of one stationary chain's unbiased covariance over D draws.

    ``E[Σ_d (x_d - x̄)(y_d - ȳ)] = D c(0) - (1/D) Σ_{d,e} c(e - d)`` for a reversible chain whose
    cross-covariance at lag j (in draws) is ``c[j]`` (symmetric in j), hence

        E[cov] = c(0) - 2 / (D (D - 1)) · Σ_{j=1}^{D-1} (D - j) c(j).

    Args:
        c: lag covariances [D, ...] for lags 0..D-1.
    """
    d = c.shape[0]
    j = torch.arange(1, d, dtype=F64).reshape(-1, *([1] * (c.dim() - 1)))
    return c[0] - 2.0 / (d * (d - 1)) * ((d - j) * c[1:]).sum(0)


def baoab_mode_lag_var(a: Tensor, h: float, friction: float, lags: Tensor) -> Tensor:
    """Position lag covariances ``Cov(δ_{t+l}, δ_t)`` per mode of the merged BAOAB recursion.

    On ``U = ½ δᵀAδ`` one step is linear in z = (δ, v) per eigenmode ``a`` of A, with
    ``c = exp(-f h)``, ``s = sqrt(1 - c²)``:

        z' = [[1 - (1+c) h² a / 2, (1+c) h / 2], [-c h a, c]] z + [h s / 2, s] ξ

    The stationary 2x2 covariance Σ solves ``Σ = M Σ Mᵀ + n nᵀ``; lag l gives ``(M^l Σ)[0, 0]``.

    Args:
        a: [P] curvatures of the modes (in the sampler's mass-scaled coordinates).
        h, friction: the step size and friction of the run.
        lags: [L] lags in sampler steps.

    Returns:
        [L, P] lag covariances of each mode's position.
    """
    from scipy.linalg import solve_discrete_lyapunov

    c = float(np.exp(-friction * h))
    s = float(np.sqrt(1 - c * c))
    out = torch.zeros(len(lags), len(a), dtype=F64)
    for k, ak in enumerate(a.tolist()):
        m = np.array([[1 - (1 + c) * h * h * ak / 2, (1 + c) * h / 2], [-c * h * ak, c]])
        if float(np.abs(np.linalg.eigvals(m)).max()) >= 1:
            raise ValueError(f"unstable step h={h:g} for curvature {ak:g} in the oracle itself")
        noise = np.array([[h * s / 2], [s]])
        sigma = solve_discrete_lyapunov(m, noise @ noise.T)
        for li, lag in enumerate(lags.tolist()):
            out[li, k] = float((np.linalg.matrix_power(m, int(lag)) @ sigma)[0, 0])
    return out


def kinetic_squared_loss_scores(
    design_q: Tensor, design_i: Tensor, mu_q: Tensor, mu_i: Tensor, A: Tensor,
    h: float, friction: float, draws: int, thin: int,
) -> Tensor:  # fmt: skip
    """Expected BIF scores ``[Q, N]`` of a unit-mass kinetic run on a linear model with
    ``½ u²`` losses (``u = μ + xᵀδ``, residual gradients ``design_*``), per-chain centring
    included: ``-E[Cov_chain(½u_i², ½u_q²)]``.

    For jointly Gaussian u, v: ``Cov(½u², ½v²) = ½ s² + μ_u μ_v s`` with ``s = Cov(u, v)``.

    Args:
        design_q: [Q, P], design_i: [N, P]; mu_q [Q], mu_i [N] residuals at w*; A [P, P] the
            posterior precision (``nβ H + γ I``); h, friction, draws, thin: the run's.
    """
    a, V = torch.linalg.eigh(A)
    lag_var = baoab_mode_lag_var(a, h, friction, torch.arange(draws) * thin)
    xq, xi = design_q @ V, design_i @ V
    s = torch.einsum("qk,lk,ik->lqi", xq, lag_var, xi)
    lagged = 0.5 * s**2 + mu_q[None, :, None] * mu_i[None, None, :] * s
    return -expected_chain_cov(lagged)
