"""Statistical oracles: ``bif.attribute`` against covariances known in closed form.

Every covariance check's tolerance comes from the run's own standard error (``result.stderr``,
the spread of the per-chain estimates across C independent chains): a Bonferroni-corrected
Student-t quantile with C-1 degrees of freedom over the number of entries checked, at family-wise
level ``ALPHA``. The classical-influence oracle (logistic regression) is a correlation check.

The exact references are those of the *discretised* chain. Full-batch SGLD on a Gaussian target
with precision matrix A is the linear recursion ``δ' = M δ + sqrt(ε) ξ``, ``M = I - εA/2``, so in
A's eigenbasis mode k is an AR(1) process with coefficient ``m_k = 1 - ε a_k / 2`` and stationary
variance ``σ_k² = ε / (1 - m_k²) = 1 / (a_k (1 - ε a_k / 4))`` (the continuum value is 1/a_k).
Per-chain centring makes each chain's covariance biased by its own autocorrelation (order τ/D);
rather than choosing D ≫ τ·C we add that term exactly (:func:`expected_chain_cov`), using the
lag covariances of the stationary chain (the burn-in makes the start at w* negligible; asserted).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.datasets import load_breast_cancer
from torch import Tensor, nn
from torch.func import hessian, jacrev

import bif
from bif.bench.calibration import LIN_QUERY, LIN_TRAIN, diabetes_regression
from bif.estimator import batch_covariance
from bif.oracles import baoab_mode_lag_var, expected_chain_cov, kinetic_squared_loss_scores

ALPHA = 1e-3  # family-wise false-alarm rate of each statistical check
F64 = torch.float64


def t_crit(num_chains: int, num_checks: int) -> float:
    """Two-sided Bonferroni Student-t quantile for ``num_checks`` z-scores with C-1 dof."""
    return float(stats.t.ppf(1 - ALPHA / (2 * num_checks), num_chains - 1))


# ---------------------------------------------------------------------------------------------
# Exact moments of full-batch (optionally preconditioned) SGLD on a Gaussian target
# ---------------------------------------------------------------------------------------------


def sgld_modes(
    A: Tensor, eps: float, precond: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Modes of ``δ' = (I - ε/2·G A) δ + sqrt(εG) ξ`` with a fixed diagonal preconditioner G.

    With ``v = G^{-1/2} δ`` this is plain SGLD on ``Ã = G^{1/2} A G^{1/2}``, so

        Cov(δ_t, δ_{t+h}) = W diag(σ_k² m_k^h) Wᵀ,  W = G^{1/2} V,  Ã = V diag(ã) Vᵀ.

    Returns:
        W [P, P], σ² [P] (stationary variances), m [P] (AR coefficients per step).
    """
    g = torch.ones(A.shape[0], dtype=F64) if precond is None else precond
    a, V = torch.linalg.eigh(g.sqrt()[:, None] * A * g.sqrt()[None, :])
    assert bool((eps * a < 2).all()), "unstable step size in the oracle itself"
    return g.sqrt()[:, None] * V, 1.0 / (a * (1 - eps * a / 4)), 1 - eps * a / 2


def squared_residual_cov(
    zq: Tensor, zi: Tensor, mu_q: Tensor, mu_i: Tensor, sigma2: Tensor, m: Tensor, lags: Tensor
) -> Tensor:
    """Cov(½u_q², ½u_i²) between draws ``lags`` steps apart, u = μ + z·(modes of δ).

    For jointly Gaussian u, v: ``Cov(½u², ½v²) = ½ s² + μ_u μ_v s`` with ``s = Cov(u, v)``.

    Args:
        zq: [Q, P], zi: [N, P] residual loadings on the modes; mu_q [Q], mu_i [N] residual means
            at w*; sigma2, m: [P] from :func:`sgld_modes`; lags: [L] step lags.

    Returns:
        [L, Q, N].
    """
    s = torch.einsum("qk,lk,ik->lqi", zq, sigma2 * m[None, :] ** lags[:, None], zi)
    return 0.5 * s**2 + mu_q[None, :, None] * mu_i[None, None, :] * s


def exact_loss_cov(
    xq: Tensor, xi: Tensor, mu_q: Tensor, mu_i: Tensor, modes: tuple, thin: int, draws: int
) -> tuple[Tensor, Tensor]:
    """(expected per-chain-centred estimate, stationary covariance) of ½u² losses, [Q, N].

    ``u_q = μ_q + x_qᵀ δ`` with ``xq`` [Q, P], ``xi`` [N, P] the gradients of the residuals.
    """
    W, sigma2, m = modes
    lags = torch.arange(draws, dtype=F64) * thin
    c = squared_residual_cov(xq @ W, xi @ W, mu_q, mu_i, sigma2, m, lags)
    return expected_chain_cov(c), c[0]


def assert_burnt_in(modes: tuple, burnin: int) -> None:
    """The chains start at w*; after ``burnin`` steps the start's imprint is m^(2B) of σ²."""
    assert float(modes[2].abs().max()) ** (2 * burnin) < 1e-12


# ---------------------------------------------------------------------------------------------
# 1. One-dimensional Gaussian toy (BIF_NOTES §2)
# ---------------------------------------------------------------------------------------------


class Scalar(nn.Module):
    """f(x) = w for every example: with the ½-squared-error task, l_a(w) = (w - a)²/2."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x) + self.w


TOY_A = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)
TOY_CONTINUUM = torch.tensor([-0.21875, 0.03125, 0.28125], dtype=F64)  # σ⁴/2 + aσ², σ² = 1/4
TOY_CHAINS, TOY_DRAWS = 256, 125


def toy_run(eps: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample the toy at step ε; returns (Cov estimate, SE, exact E[estimate], exact stationary).

    L_n(w) = mean_a (w - a)²/2 = w²/2 + 1/3, nβ = γ = 2, w* = 0: U(w) = 2w², precision k = 4.
    Thinning 0.8/ε steps (draw autocorrelation (1 - 2ε)^(0.8/ε) ≈ 0.18), burn-in 10/ε.
    """
    thin, burnin = round(0.8 / eps), round(10 / eps)
    res = bif.attribute(
        Scalar().eval(),
        train=(torch.zeros(3, 1), TOY_A[:, None]),
        query=(torch.zeros(1, 1), torch.ones(1, 1)),
        task="regression",
        dtype=F64, progress=False, num_chains=TOY_CHAINS, num_draws=TOY_DRAWS,
        num_burnin=burnin, thin=thin, step_size=eps, nbeta=2.0, gamma=2.0, seed=seed,
        sampler="sgld",
    )  # fmt: skip
    modes = sgld_modes(torch.tensor([[4.0]], dtype=F64), eps)
    assert_burnt_in(modes, burnin)
    one = torch.ones(1, 1, dtype=F64)
    # residuals u = w - target: μ_q = -1 for φ = (w - 1)²/2, μ_a = -a.
    exp_d, exp_inf = exact_loss_cov(one, one.expand(3, 1), -one[0], -TOY_A, modes, thin, TOY_DRAWS)
    return -res.scores[0], res.stderr[0], exp_d[0], exp_inf[0]


def test_toy_exact_discretised_values_and_their_continuum_limit():
    """The oracle maths: σ_ε² = 1/(k(1 - εk/4)); bias (s+a)·ε/4 + O(ε²) vanishes as ε → 0."""
    for eps in (0.0, 1e-4, 0.01, 0.1, 0.2):
        _, exp_inf = exact_loss_cov(
            torch.ones(1, 1, dtype=F64), torch.ones(3, 1, dtype=F64), -torch.ones(1, dtype=F64),
            -TOY_A, sgld_modes(torch.tensor([[4.0]], dtype=F64), eps), 1, 2,
        )  # fmt: skip
        s = 1 / (4 * (1 - eps))
        torch.testing.assert_close(exp_inf[0], s**2 / 2 + TOY_A * s, rtol=1e-12, atol=1e-14)
        bias = exp_inf[0] - TOY_CONTINUUM
        torch.testing.assert_close(bias, eps * (0.25 + TOY_A) / 4, rtol=0, atol=2 * eps**2)


def test_toy_gaussian_matches_discretised_chain_and_extrapolates_to_continuum():
    """1-D toy, l_a = (w-a)²/2 for a ∈ {-1, 0, 1}, φ = (w-1)²/2, nβ = γ = 2 ⇒ p = N(0, 1/4).

    Each run (256 chains x 125 draws) matches the exact covariance of its discretised chain,
    per-chain centring included. At ε = 0.1 the discretisation bias (s+a)·ε/4 + O(ε²)
    (-0.019, +0.006, +0.031 for a = -1, 0, 1) is 3.5-13 SE, and the continuum values are
    rejected; Richardson extrapolation 2·Cov(ε/2) - Cov(ε) removes the first order and recovers
    the continuum values (the exact second-order remainder, ≤ 0.26 SE, is asserted < 0.5 SE).
    Measured (seeds 0, 1): |z| ≤ 1.2 against the exact values, continuum at ε = 0.1:
    z = (-10.0, 4.1, 7.4), Richardson |z| ≤ 0.5; critical value 3.9.
    """
    runs = {eps: toy_run(eps, seed) for seed, eps in enumerate((0.1, 0.05))}
    crit = t_crit(TOY_CHAINS, num_checks=3 * 3)  # 3 entries x (2 runs + extrapolation)
    debiased = {}
    for eps, (cov, se, exp_d, exp_inf) in runs.items():
        z = (cov - exp_d) / se
        assert float(z.abs().max()) <= crit, (eps, z)
        debiased[eps] = cov - (exp_d - exp_inf)  # remove the exactly known centring term

    z_cont = (debiased[0.1] - TOY_CONTINUUM) / runs[0.1][1]
    assert float(z_cont.abs().max()) > crit, "the check cannot resolve the discretisation bias"

    rich = 2 * debiased[0.05] - debiased[0.1]
    rich_se = (4 * runs[0.05][1] ** 2 + runs[0.1][1] ** 2).sqrt()
    residual = 2 * runs[0.05][3] - runs[0.1][3] - TOY_CONTINUUM  # exact O(ε²) remainder
    assert float((residual / rich_se).abs().max()) < 0.5
    z_rich = (rich - TOY_CONTINUUM) / rich_se
    assert float(z_rich.abs().max()) <= crit, z_rich


# ---------------------------------------------------------------------------------------------
# 2. Linear regression with squared loss: the local posterior is exactly Gaussian
# ---------------------------------------------------------------------------------------------

LIN_N, LIN_Q = LIN_TRAIN, LIN_QUERY


def diabetes(scale0: float = 1.0) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`bif.bench.calibration.diabetes_regression` (50 rows of sklearn's diabetes, 40 for
    training) and H [5, 5], the Hessian of the mean training loss.

    Returns:
        model (nn.Linear at the least-squares w*), X [50, 4], y [50, 1], design [50, 5] (the
        gradient of each residual u = xᵀw + b - y with respect to (weight, bias)), H and the
        residuals at w* [50].
    """
    model, X, Y, design, mu = diabetes_regression(scale0)
    H = design[:LIN_N].T @ design[:LIN_N] / LIN_N
    return model, X, Y, design, H, mu


def z2_null_interval(per_chain: Tensor) -> tuple[float, float]:
    """Central 1-ALPHA interval of mean_j z_j² when the standard errors are calibrated.

    The M z-scores are correlated (all entries come from the same few parameters), so
    ``Σ_j z_j² ≈ ν/(ν-2) · Σ_k λ_k χ²_1`` with λ_k the eigenvalues of their correlation matrix,
    which equals the across-chain correlation of the per-chain estimates ``per_chain`` [C, M]
    (its nonzero eigenvalues are those of the C x C Gram matrix of standardised columns).
    """
    c, m = per_chain.shape
    y = per_chain - per_chain.mean(0)
    y = y / y.norm(dim=0)
    lam = torch.linalg.eigvalsh(y @ y.T).clamp_min(0).numpy()
    nu = c - 1
    sims = np.random.default_rng(0).chisquare(1, size=(200_000, c)) @ lam / m * nu / (nu - 2)
    lo, hi = np.quantile(sims, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)


def test_linear_regression_matches_exact_gaussian_covariance():
    """Full-batch SGLD, nβ = 40, γ = 4, ε = 0.005 (ε·a_max = 0.48), 128 chains x 200 draws.

    Queries: 10 held-out rows and the 40 training rows (whose traces give per-chain covariances
    for the calibration check). Every entry of -BIF [50, 40] must match the exact covariance of
    the discretised chain; the mean squared z-score must lie in its own null interval.
    Measured (seed 0): max |z| = 3.8 over 2000 entries (critical 5.3); mean z² = 1.16 in its
    null interval [0.39, 2.34] (M_eff ≈ 13: the entries are strongly correlated). Without the
    exact per-chain-centring term the entries would be off by 0.25 SE on average.
    """
    model, X, Y, design, H, mu = diabetes()
    nbeta, gamma, eps, chains, draws, thin, burnin = 40.0, 4.0, 0.005, 128, 200, 10, 500
    modes = sgld_modes(nbeta * H + gamma * torch.eye(5, dtype=F64), eps)
    assert_burnt_in(modes, burnin)
    qidx = torch.cat([torch.arange(LIN_N, LIN_N + LIN_Q), torch.arange(LIN_N)])
    res = bif.attribute(
        model, (X[:LIN_N], Y[:LIN_N]), (X[qidx], Y[qidx]), "regression",
        dtype=F64, progress=False, num_chains=chains, num_draws=draws, num_burnin=burnin,
        thin=thin, step_size=eps, nbeta=nbeta, gamma=gamma, sampler="sgld",
    )  # fmt: skip
    exp_d, _ = exact_loss_cov(
        design[qidx], design[:LIN_N], mu[qidx], mu[:LIN_N], modes, thin, draws
    )
    z = (-res.scores - exp_d) / res.stderr
    assert float(z.abs().max()) <= t_crit(chains, z.numel()), float(z.abs().max())

    # Per-chain covariances from the traces of the training rows (queried as well).
    per_chain = batch_covariance(res.query_trace[:, :, LIN_Q:], res.query_trace)  # [C, 50, 40]
    torch.testing.assert_close(-per_chain.mean(0), res.scores)
    lo, hi = z2_null_interval(per_chain.reshape(chains, -1))
    assert lo <= float(z.pow(2).mean()) <= hi, (float(z.pow(2).mean()), lo, hi)


# ---------------------------------------------------------------------------------------------
# 3. L2-regularised logistic regression: nβ·BIF ≈ damped classical influence function
# ---------------------------------------------------------------------------------------------


class PenalisedLogistic(nn.Module):
    """Logistic regression returning ``[logit, λ/2·||w||²]`` per example, shape [B, 2].

    The task adds the second column to each example's cross-entropy, so the L2 penalty is part of
    every per-sample loss (a Task only sees outputs, so the penalty travels as an output).
    """

    def __init__(self, w: Tensor, lam: float) -> None:
        super().__init__()
        self.linear = nn.Linear(w.numel() - 1, 1).double()
        with torch.no_grad():
            self.linear.weight.copy_(w[:-1][None])
            self.linear.bias.copy_(w[-1:])
        self.lam = lam

    def forward(self, x: Tensor) -> Tensor:
        sq = self.linear.weight.square().sum() + self.linear.bias.square().sum()
        logit = self.linear(x)
        return torch.cat([logit, (0.5 * self.lam * sq).expand_as(logit)], dim=-1)


def _bce(logit: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logit, y, reduction="none")


def penalised_loss(out: Tensor, y: Tensor) -> Tensor:
    return _bce(out[:, 0], y) + out[:, 1]


def query_loss(out: Tensor, y: Tensor) -> Tensor:
    return _bce(out[:, 0], y)


def test_logistic_regression_bif_matches_damped_influence_function():
    """breast_cancer (standardised): 300 training rows, 50 held-out queries, L2 penalty 0.01.

    w* = LBFGS optimum of mean cross-entropy + 0.005·||w||² (31 parameters, ||∇|| < 1e-8).
    Regular setting: nβ = 3000, λ = γ/nβ = 0.05 (γ = 150), spectrum of H in [0.010, 0.22],
    ε = 0.4 / (nβ·λ_max(H) + γ) (so ε·a_max = 0.4), 16 chains x 200 draws, thin 5, burn-in 500.
    IF(i, q) = -∇l_i(w*)ᵀ (H + λI)⁻¹ ∇φ_q(w*) with the exact Hessian H of the mean loss.
    Measured: Pearson(nβ·BIF, IF) = 0.998 over all 50 x 300 entries; same sign on 99.4 % of the
    quartile of largest |IF|; least-squares slope 1.11 on IF, of which the discretisation
    inflation 1/(1 - εa/4) ≤ 1.11 explains most: the slope on the discretised chain's Gaussian
    prediction is 1.03 (checked within 10 %, an allowance for the non-Gaussian terms).

    Where the penalty goes: the posterior must be centred at a stationary point of the mean loss
    it is built from (every chain starts at w*, and BIF ≈ IF assumes ∇L_n(w*) = 0); w* minimises
    the penalised objective, so the penalty belongs in L_n and hence in every per-sample loss
    l_i = CE_i + λ/2·||w||². This adds the same term -Cov(λ/2·||w||², φ_q) to every training
    example's score for query q, and the IF built from the same l_i carries the same term
    (∇l_i includes λw*); rankings within a query are unaffected. φ_q is the query's plain
    cross-entropy (a test loss has no penalty).
    """
    x_all, y_all = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y_all))
    n, q, lam_reg = 300, 50, 1e-2
    x, yv = x_all[perm][: n + q], y_all[perm][: n + q].astype(np.float64)
    X = torch.tensor((x - x[:n].mean(0)) / x[:n].std(0))
    Y = torch.tensor(yv)

    def data_loss(w: Tensor, xb: Tensor, yb: Tensor) -> Tensor:  # [B]
        return _bce(xb @ w[:-1] + w[-1], yb)

    def train_loss(w: Tensor, xb: Tensor, yb: Tensor) -> Tensor:  # [B], penalty included
        return data_loss(w, xb, yb) + 0.5 * lam_reg * w.square().sum()

    w = torch.zeros(31, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=2000, tolerance_grad=1e-12, tolerance_change=0.0,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = train_loss(w, X[:n], Y[:n]).mean()
        loss.backward()
        return loss

    opt.step(closure)
    w_star = w.detach()
    grad_star = torch.func.grad(lambda v: train_loss(v, X[:n], Y[:n]).mean())(w_star)
    assert float(grad_star.norm()) < 1e-8
    H = hessian(lambda v: train_loss(v, X[:n], Y[:n]).mean())(w_star)
    grads_train = jacrev(train_loss)(w_star, X[:n], Y[:n])  # [N, P]
    grads_query = jacrev(data_loss)(w_star, X[n:], Y[n:])  # [Q, P]

    nbeta, lam = 3000.0, 0.05
    gamma = lam * nbeta
    a_max = nbeta * float(torch.linalg.eigvalsh(H).max()) + gamma
    eps = 0.4 / a_max
    infl = -grads_query @ torch.linalg.solve(H + lam * torch.eye(31, dtype=F64), grads_train.T)

    res = bif.attribute(
        PenalisedLogistic(w_star, lam_reg).eval(), (X[:n], Y[:n]), (X[n:], Y[n:]),
        penalised_loss, observable=query_loss,
        dtype=F64, progress=False, num_chains=16, num_draws=200, num_burnin=500, thin=5,
        step_size=eps, nbeta=nbeta, gamma=gamma, sampler="sgld",
    )  # fmt: skip
    scaled = nbeta * res.scores
    pearson = float(torch.corrcoef(torch.stack([scaled.flatten(), infl.flatten()]))[0, 1])
    assert pearson >= 0.95, pearson
    large = infl.abs() >= infl.abs().quantile(0.75)
    same_sign = float((scaled[large].sign() == infl[large].sign()).double().mean())
    assert same_sign >= 0.95, same_sign
    # Scale (the 1/nβ factor): against the Gaussian prediction of the discretised chain,
    # nβ·Σ_ε with Σ_ε = (A - εA²/4)⁻¹, A = nβH + γI, the slope is 1 up to higher-order terms.
    A = nbeta * H + gamma * torch.eye(31, dtype=F64)
    infl_eps = -nbeta * grads_query @ torch.linalg.solve(A - eps * A @ A / 4, grads_train.T)
    slope = float((scaled * infl_eps).sum() / infl_eps.square().sum())
    assert abs(slope - 1) <= 0.1, slope


# ---------------------------------------------------------------------------------------------
# 4. RMSProp-preconditioned SGLD (approximate) on the linear-regression oracle
# ---------------------------------------------------------------------------------------------


def rmsprop_frozen_preconditioner(A: Tensor, H: Tensor, eps: float, rms_eps: float) -> Tensor:
    """Self-consistent G = 1/(sqrt(E[g²]) + rms_eps) with g = ∇L_n = H δ, δ ~ chain law under G."""
    g = torch.ones(A.shape[0], dtype=F64)
    for _ in range(300):
        W, sigma2, _ = sgld_modes(A, eps, g)
        new = 1.0 / (torch.diag(H @ (W * sigma2) @ W.T @ H).sqrt() + rms_eps)
        g, change = 0.5 * (g + new), float((new - g).abs().max())
    assert change < 1e-10
    return g


def test_rmsprop_sgld_matches_frozen_preconditioner_prediction():
    """RMSProp-SGLD is approximate; this documents what it matches, on an anisotropic problem.

    Same linear regression, first feature scaled x4 (its curvature x16), nβ = 40, γ = 4,
    ε = 0.0015, 64 chains x 200 draws, thin 10, burn-in 1000 (10 EMA lifetimes of V).
    Expected: V averages g² over ~1/(1-α) = 100 steps, so G is nearly constant and the chain is
    close to SGLD with the *frozen* diagonal preconditioner G* = 1/(sqrt(diag(H Σ H)) + 0.1)
    (self-consistent; here G* = 1.15 on the scaled weight, 3.7-3.9 elsewhere). Its exact
    covariance (discretised, as for SGLD) is matched up to the omitted Γ term and the
    fluctuations of V: 2 % relative (Frobenius), measured with 256 chains. The check allows 5 %
    relative model error on top of the Bonferroni-t band of the SE. The continuum posterior is
    NOT matched: the effective steps ε·G give a 16 % discretisation bias, which the same check
    rejects; the Pearson correlation with the exact posterior covariance is still ≥ 0.99 (0.994).
    As ε → 0 the discretisation bias shrinks (8.5 % at ε = 0.0007) but the frozen-G picture
    degrades (4 %): V then follows the state, and the omitted Γ term matters.
    Measured (seed 0): excess 0.54 (0.68 without the model allowance), continuum excess 3.2.
    """
    model, X, Y, design, H, mu = diabetes(scale0=4.0)
    nbeta, gamma, eps, chains, draws, thin, burnin = 40.0, 4.0, 0.0015, 64, 200, 10, 1000
    A = nbeta * H + gamma * torch.eye(5, dtype=F64)
    modes = sgld_modes(A, eps, rmsprop_frozen_preconditioner(A, H, eps, rms_eps=0.1))
    assert_burnt_in(modes, burnin)
    res = bif.attribute(
        model, (X[:LIN_N], Y[:LIN_N]), (X[LIN_N:], Y[LIN_N:]), "regression",
        dtype=F64, progress=False, num_chains=chains, num_draws=draws, num_burnin=burnin,
        thin=thin, step_size=eps, nbeta=nbeta, gamma=gamma, sampler="rmsprop",
        rmsprop_alpha=0.99, rmsprop_eps=0.1,
    )  # fmt: skip
    xq, xi, mq, mi = design[LIN_N:], design[:LIN_N], mu[LIN_N:], mu[:LIN_N]
    frozen, _ = exact_loss_cov(xq, xi, mq, mi, modes, thin, draws)
    _, cont = exact_loss_cov(xq, xi, mq, mi, sgld_modes(A, 0.0), 1, 2)  # ε = 0: the posterior
    est, se = -res.scores, res.stderr
    crit = t_crit(chains, est.numel())
    model_err = 0.05

    def excess(ref: Tensor) -> float:
        return float(((est - ref).abs() / (crit * se + model_err * ref.abs())).max())

    assert excess(frozen) <= 1.0, excess(frozen)
    assert excess(cont) > 1.0, "the check cannot tell the sampler's discretisation bias"
    pearson = float(torch.corrcoef(torch.stack([est.flatten(), cont.flatten()]))[0, 1])
    assert pearson >= 0.99, pearson


# ---------------------------------------------------------------------------------------------
# 5. Kinetic Langevin (BAOAB) on the linear-regression oracle: exact, like SGLD
# ---------------------------------------------------------------------------------------------


def test_baoab_oracle_positions_are_exact_for_gaussians():
    """The oracle maths: BAOAB's stationary position variance is 1/a for every stable h."""
    a = torch.tensor([0.5, 4.0, 100.0], dtype=F64)
    for h in (0.01, 0.1, 0.19):
        var = baoab_mode_lag_var(a, h, friction=2.0, lags=torch.tensor([0]))[0]
        torch.testing.assert_close(var, 1 / a, rtol=1e-10, atol=0)


def test_kinetic_langevin_matches_exact_gaussian_covariance():
    """Full-batch kinetic Langevin with the automatic step and friction, nβ = 40, γ = 4.

    h = 1/sqrt(a_max) (half the stability limit), f = 2·sqrt(γ) = 4, 128 chains x 200 draws,
    thin 5, burn-in 300. Every entry of -BIF [10, 40] must match the exact covariance of the
    discretised chain (per-chain centring term included); BAOAB's stationary positions carry no
    discretisation bias, so the same check against the continuum posterior passes too.
    """
    model, X, Y, design, H, mu = diabetes()
    nbeta, gamma, chains, draws, thin, burnin = 40.0, 4.0, 128, 200, 5, 300
    A = nbeta * H + gamma * torch.eye(5, dtype=F64)
    a = torch.linalg.eigvalsh(A)
    h, friction = 1.0 / float(a.max().sqrt()), 2.0 * gamma**0.5
    res = bif.attribute(
        model, (X[:LIN_N], Y[:LIN_N]), (X[LIN_N:], Y[LIN_N:]), "regression",
        dtype=F64, progress=False, num_chains=chains, num_draws=draws, num_burnin=burnin,
        thin=thin, nbeta=nbeta, gamma=gamma, sampler="kinetic", precondition_rank=0,
    )  # fmt: skip
    assert res.config.step_size == pytest.approx(h, rel=0.02)  # auto rule, power iteration
    assert res.config.friction == pytest.approx(friction)
    h = float(res.config.step_size)
    # The start at w* (zero momentum) is forgotten: the slowest mode's decay over the burn-in.
    start = baoab_mode_lag_var(a, h, friction, torch.tensor([0, burnin]))
    assert float((start[1] / start[0]).abs().max()) < 1e-6
    expected = -kinetic_squared_loss_scores(
        design[LIN_N:], design[:LIN_N], mu[LIN_N:], mu[:LIN_N], A, h, friction, draws, thin
    )
    z = (-res.scores - expected) / res.stderr
    assert float(z.abs().max()) <= t_crit(chains, z.numel()), float(z.abs().max())


def test_centred_gradient_samples_gaussian_around_a_non_minimum():
    """``center_gradient=True`` at a checkpoint w0 that is NOT the least-squares solution: the
    centred potential is quadratic with its minimum at w0, so the chain is the exact BAOAB
    Gaussian around w0 from its first step (no burn-in needed for the mean) and every entry of
    -BIF must match the lagged-covariance oracle with the residuals at w0. The uncentred chain
    drifts towards the least-squares fit and fails the same check (power of the test).
    Measured (seed 0): centred max |z| = 3.1 (critical 4.9); uncentred max |z| = 878."""
    model, X, Y, design, H, _ = diabetes()
    with torch.no_grad():
        model.weight.add_(0.3)  # w0 = w_ls + 0.3 on every weight: a clear gradient at w0
    w0 = torch.cat([model.weight[0], model.bias]).detach()
    mu0 = design @ w0 - Y[:, 0]
    nbeta, gamma, chains, draws, thin, burnin = 40.0, 4.0, 128, 200, 5, 300
    A = nbeta * H + gamma * torch.eye(5, dtype=F64)
    kw = dict(
        dtype=F64, progress=False, num_chains=chains, num_draws=draws, num_burnin=burnin,
        thin=thin, nbeta=nbeta, gamma=gamma, sampler="kinetic", precondition_rank=0,
    )  # fmt: skip
    data = ((X[:LIN_N], Y[:LIN_N]), (X[LIN_N:], Y[LIN_N:]))
    res = bif.attribute(model, *data, "regression", center_gradient=True, **kw)
    h, friction = float(res.config.step_size), float(res.config.friction)
    expected = kinetic_squared_loss_scores(
        design[LIN_N:], design[:LIN_N], mu0[LIN_N:], mu0[:LIN_N], A, h, friction, draws, thin
    ).neg()
    z = (-res.scores - expected) / res.stderr
    assert float(z.abs().max()) <= t_crit(chains, z.numel()), float(z.abs().max())
    plain = bif.attribute(model, *data, "regression", center_gradient=False, **kw)
    z_plain = (-plain.scores - expected) / plain.stderr
    assert float(z_plain.abs().max()) > 3 * t_crit(chains, z.numel()), float(z_plain.abs().max())


def test_preconditioned_kinetic_langevin_matches_exact_gaussian_covariance():
    """Kinetic Langevin with the low-rank mass (rank 2 of 5), auto step and friction.

    In ``u = M^½ δ`` the chain is unit-mass BAOAB on ``M^-½ A M^-½``; the mass holds the top-2
    eigenvectors of H at their curvature ``a_j`` and γ elsewhere, so mode j (eigenvector of A)
    has curvature ``a_j/m_j`` in u and position variance ``Var(u_j)/m_j`` in δ. Every entry of
    -BIF must match that exact lagged covariance (the test of the unit-mass sampler above, with
    the mass's frequencies), and the auto rules must give h = 1/sqrt(max_j a_j/m_j), f = 2.
    A chain that ignored the mass in the O step (noise N(0, I) instead of N(0, M)) samples a
    different law; the same check on it fails (power of the test).
    Measured (seed 0): max |z| = 2.6 (critical 4.9); without the mass in the O step 2732.
    """
    model, X, Y, design, H, mu = diabetes()
    nbeta, gamma, chains, draws, thin, burnin = 40.0, 4.0, 128, 200, 5, 100
    A = nbeta * H + gamma * torch.eye(5, dtype=F64)
    a, V = torch.linalg.eigh(A)  # ascending: the last two are the captured directions
    m = torch.cat([torch.full((3,), gamma, dtype=F64), a[3:]])
    res = bif.attribute(
        model, (X[:LIN_N], Y[:LIN_N]), (X[LIN_N:], Y[LIN_N:]), "regression",
        dtype=F64, progress=False, num_chains=chains, num_draws=draws, num_burnin=burnin,
        thin=thin, nbeta=nbeta, gamma=gamma, sampler="kinetic", precondition_rank=2,
    )  # fmt: skip
    assert res.meta["preconditioner"]["rank"] == 2
    assert res.config.step_size == pytest.approx(1 / float((a / m).max().sqrt()), rel=0.02)
    assert res.config.friction == 2.0
    h, friction = float(res.config.step_size), 2.0
    start = baoab_mode_lag_var(a / m, h, friction, torch.tensor([0, burnin]))
    assert float((start[1] / start[0]).abs().max()) < 1e-6
    lag_var = baoab_mode_lag_var(a / m, h, friction, torch.arange(draws) * thin) / m
    xq, xi, mq, mi = design[LIN_N:] @ V, design[:LIN_N] @ V, mu[LIN_N:], mu[:LIN_N]
    s = torch.einsum("qk,lk,ik->lqi", xq, lag_var, xi)
    expected = expected_chain_cov(0.5 * s**2 + mq[None, :, None] * mi[None, None, :] * s)
    z = (-res.scores - expected) / res.stderr
    assert float(z.abs().max()) <= t_crit(chains, z.numel()), float(z.abs().max())

    from bif.sampler import mass as mass_module

    def unit_noise(self, x):  # the O step's N(0, M) replaced by N(0, I)
        return x

    orig = mass_module.LowRankMass.sqrt
    mass_module.LowRankMass.sqrt = unit_noise  # type: ignore[method-assign]
    try:
        wrong = bif.attribute(
            model, (X[:LIN_N], Y[:LIN_N]), (X[LIN_N:], Y[LIN_N:]), "regression",
            dtype=F64, progress=False, num_chains=chains, num_draws=draws, num_burnin=burnin,
            thin=thin, nbeta=nbeta, gamma=gamma, sampler="kinetic", precondition_rank=2,
        )  # fmt: skip
    finally:
        mass_module.LowRankMass.sqrt = orig  # type: ignore[method-assign]
    z_wrong = (-wrong.scores - expected) / wrong.stderr
    assert float(z_wrong.abs().max()) > t_crit(chains, z.numel()), float(z_wrong.abs().max())
