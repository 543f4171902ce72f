"""Spectra behind the kinetic sampler's mass matrix (pure functions of an HVP operator).

- the top-k eigenpairs of the Hessian H at w* (Lanczos), from which the mass is built;
- the extreme eigenvalues of the preconditioned precision ``M^-½ (nβH + γI) M^-½`` (one
  Lanczos run): the top one sets the time step, the bottom one exposes negative curvature
  beyond the localisation, and its Ritz vectors there are the directions to localise.

HVP operators map parameter dicts to parameter dicts (:func:`bif.curvature.hessian_operator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bif.functional import Params
from bif.sampler.mass import LowRankMass, Mass, flatten, unflatten


def preconditioned_operator(
    hvp: Callable[[Params], Params], mass: Mass, nbeta: float, gamma: float, like: Params
) -> Callable[[Tensor], Tensor]:
    """``x [P] -> M^-½ (nβH + γI) M^-½ x`` on flat vectors (parameter order of ``like``)."""

    def op(x: Tensor) -> Tensor:
        y = mass.inverse_sqrt(x)
        ay = nbeta * flatten(hvp(unflatten(y, like)), chain_dim=False) + gamma * y
        return mass.inverse_sqrt(ay)

    return op


def lanczos(
    op: Callable[[Tensor], Tensor], num: int, steps: int, like: Tensor, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``steps`` Lanczos steps with full reorthogonalisation on the symmetric map ``op`` of
    flat vectors ``[num]`` (device and dtype of ``like``), from a seeded random start.

    One run resolves both ends of the spectrum: with the bulk of the preconditioned precision
    near 1 and its outliers at either end, 30-40 steps pin the extremes to ~1e-3, where power
    iteration needs as many HVPs for each end and can stall on a near-degenerate top.

    Returns:
        Ritz values θ ``[m]`` (ascending, float64, m <= steps: fewer if the Krylov space is
        exhausted), the coefficients S ``[m, m]`` (Ritz vectors are ``basis.T @ S``), the
        Lanczos basis ``[m, num]`` (dtype of ``like``) and the residual norms ``[m]``:
        ``||op(y) - θ y||`` for each Ritz vector y, so that an eigenvalue lies within it.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(num, generator=g, dtype=torch.float64)
    q = (q / q.norm()).to(like.device, like.dtype)
    basis = torch.empty(steps, num, device=like.device, dtype=like.dtype)
    alpha: list[float] = []
    beta: list[float] = []
    b = 0.0
    for j in range(steps):
        basis[j] = q
        z = op(q).to(like.dtype)
        alpha.append(float(q.double() @ z.double()))
        done = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            z = z - done.T @ (done @ z)
        b = float(z.double().norm())
        if not math.isfinite(b):
            break
        if j == steps - 1 or b <= 1e-10 * max(abs(a) for a in alpha):
            break
        beta.append(b)
        q = z / b
    m = len(alpha)
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s, basis[:m], b * s[-1].abs()


def top_hessian_eigenpairs(
    hvp: Callable[[Params], Params], like: Params, k: int, seed: int = 0, tol: float = 1e-3
) -> tuple[Tensor, Tensor, int]:
    """The ``k`` algebraically largest eigenpairs of the Hessian behind ``hvp``.

    Implicitly restarted Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``) on HVPs; for
    ``P <= 4k`` parameters the dense Hessian is built from P HVPs instead (Lanczos then needs
    about as many). Computed in float64 on the CPU.

    Returns:
        eigenvalues ``[k]`` (descending), eigenvectors ``[P, k]`` (orthonormal columns, float64)
        and the number of HVPs spent.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    ref = next(iter(like.values()))
    num = sum(v.numel() for v in like.values())
    count = 0

    def matvec(x: Tensor) -> Tensor:
        nonlocal count
        count += 1
        hv = hvp(unflatten(x.to(ref.device, ref.dtype), like))
        return flatten(hv, chain_dim=False).to("cpu", torch.float64)

    if num <= 4 * k:
        eye = torch.eye(num, dtype=torch.float64)
        dense = torch.stack([matvec(eye[i]) for i in range(num)])
        vals, vecs = torch.linalg.eigh(0.5 * (dense + dense.T))
        vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        return vals, vecs, count
    op = LinearOperator(
        (num, num),
        matvec=lambda x: matvec(torch.from_numpy(np.ascontiguousarray(x).reshape(-1))).numpy(),
        dtype=np.float64,
    )
    v0 = np.random.default_rng(seed).standard_normal(num)
    vals_np, vecs_np = eigsh(op, k=k, which="LA", v0=v0, tol=tol)
    order = np.argsort(vals_np)[::-1]
    vals = torch.from_numpy(vals_np[order].copy())
    vecs = torch.from_numpy(np.ascontiguousarray(vecs_np[:, order]))
    return vals, vecs, count


def lowrank_mass(
    vals: Tensor, vecs: Tensor, nbeta: float, gamma: float, like: Params
) -> LowRankMass:
    """``M = γI + U diag(nβμ)Uᵀ`` over the eigenpairs with μ > 0 (device and dtype of ``like``)."""
    keep = vals > 0
    ref = next(iter(like.values()))
    curvature = nbeta * vals[keep] + gamma
    return LowRankMass(gamma, vecs[:, keep], curvature).to(ref.device, ref.dtype)


# Lanczos steps on the preconditioned precision: its bulk sits at 1 and the outliers at both
# ends converge first, so 40 steps pin k'_max and k'_min to ~1e-3 relative (the residual bound
# covers the rest) where two power iterations needed 30 HVPs each and could stall.
EXTREME_STEPS = 40


@dataclass
class Extremes:
    """Both ends of the spectrum of ``M^-½ (nβH + γI) M^-½`` from one Lanczos run.

    Attributes:
        kmax: top Ritz value plus its residual norm, so that an eigenvalue at least this large
            is unlikely to be missed: it sets the time step.
        kmin: bottom Ritz value (an upper bound of the bottom eigenvalue).
        low: ``[P, j]`` Ritz vectors whose value is below the floor, most negative first
            (float64, CPU): candidate negatively curved directions.
        low_values: ``[j]`` their Ritz values.
        hvps: HVPs spent.
    """

    kmax: float
    kmin: float
    low: Tensor
    low_values: Tensor
    hvps: int


def preconditioned_extremes(
    hvp: Callable[[Params], Params], mass: Mass, nbeta: float, gamma: float,
    like: Params, floor: float, steps: int = EXTREME_STEPS, seed: int = 0,
) -> Extremes:  # fmt: skip
    """k'_max, k'_min and the directions below ``floor`` of ``M^-½ (nβH + γI) M^-½`` (one
    Lanczos run, :func:`lanczos`); ``steps`` is capped at P."""
    ref = next(iter(like.values()))
    num = sum(v.numel() for v in like.values())
    pre = preconditioned_operator(hvp, mass, nbeta, gamma, like)
    theta, s, basis, resid = lanczos(pre, num, min(steps, num), ref, seed=seed)
    if not bool(torch.isfinite(theta).all()):
        return Extremes(math.inf, -math.inf, torch.zeros(num, 0, dtype=torch.float64),
                        torch.zeros(0, dtype=torch.float64), int(theta.numel()))  # fmt: skip
    below = (theta < floor).nonzero().flatten()  # ascending: most negative first
    low = (basis.T.double() @ s[:, below].to(basis.device)).to("cpu")
    return Extremes(
        kmax=float(theta[-1] + resid[-1]),
        kmin=float(theta[0]),
        low=low,
        low_values=theta[below],
        hvps=int(theta.numel()),
    )


def localised_directions(
    hvp: Callable[[Params], Params], mass: LowRankMass, nbeta: float, gamma: float,
    like: Params, candidates: Tensor, floor: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The candidate directions (Ritz vectors of the preconditioned precision, which lie
    outside the mass's basis up to rounding) orthogonalised against the basis, and their
    exact curvature ``nβ·vᵀHv`` (one HVP each); only those where ``nβH + γI`` falls below
    ``floor·γ`` are kept.

    Returns:
        ``V [P, j]`` orthonormal (float64, CPU) and ``nβ·μ [j]`` (negative).
    """
    ref = next(iter(like.values()))
    basis = mass.basis.to("cpu", torch.float64)
    v = candidates - basis @ (basis.T @ candidates)
    v, _ = torch.linalg.qr(v)
    curv = []
    for j in range(v.shape[1]):
        col = v[:, j].to(ref.device, ref.dtype)
        hv = flatten(hvp(unflatten(col, like)), chain_dim=False)
        curv.append(nbeta * float(col.double() @ hv.double()))
    nb_mu = torch.tensor(curv, dtype=torch.float64)
    keep = 1.0 + nb_mu / gamma < floor
    return v[:, keep], nb_mu[keep]
