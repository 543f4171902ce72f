"""Spectra behind the kinetic sampler's mass matrix (pure functions of an HVP operator).

- the top-k eigenpairs of the Hessian H at w* (Lanczos), from which the mass is built;
- the extreme eigenvalues of the preconditioned precision ``M^-½ (nβH + γI) M^-½``: the top one
  sets the time step, the bottom one exposes negative curvature beyond the localisation;
- the negatively curved directions themselves (Lanczos from the bottom).

HVP operators map parameter dicts to parameter dicts (:func:`bif.curvature.hessian_operator`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from bif.curvature import power_iteration
from bif.functional import Params
from bif.sampler.mass import LowRankMass, flatten, unflatten


def preconditioned_operator(
    hvp: Callable[[Params], Params], mass: LowRankMass, nbeta: float, gamma: float, like: Params
) -> Callable[[Tensor], Tensor]:
    """``x [P] -> M^-½ (nβH + γI) M^-½ x`` on flat vectors (parameter order of ``like``)."""

    def op(x: Tensor) -> Tensor:
        y = mass.inverse_sqrt(x)
        ay = nbeta * flatten(hvp(unflatten(y, like)), chain_dim=False) + gamma * y
        return mass.inverse_sqrt(ay)

    return op


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


def preconditioned_kmax(
    hvp: Callable[[Params], Params], mass: LowRankMass, nbeta: float, gamma: float,
    like: Params, seed: int = 0,
) -> float:  # fmt: skip
    """Top (algebraic) eigenvalue of ``M^-½ (nβH + γI) M^-½``: the stiffest squared frequency
    left. A negatively curved direction (H's most negative eigenvalue beyond -γ/nβ, which the
    mass leaves at γ) can dominate plain power iteration; the iteration is then repeated with
    that eigenvalue shifted away."""

    pre = preconditioned_operator(hvp, mass, nbeta, gamma, like)

    def op(v: Params, shift: float = 0.0) -> Params:
        x = flatten(v, chain_dim=False)
        return unflatten(pre(x) + shift * x, like)

    top = power_iteration(op, like, iters=30, seed=seed, signed=True)
    if top < 0:
        shift = -top
        top = power_iteration(lambda v: op(v, shift), like, iters=30, seed=seed, signed=True)
        top -= shift
    return top


def preconditioned_kmin(
    hvp: Callable[[Params], Params], mass: LowRankMass, nbeta: float, gamma: float,
    like: Params, kmax: float, seed: int = 0,
) -> float:  # fmt: skip
    """Bottom eigenvalue of ``M^-½ (nβH + γI) M^-½`` (power iteration on ``kmax·I`` minus it).

    The bulk sits at 1, so a negatively curved direction, if any, stands out and converges in a
    few dozen HVPs; with none the estimate stays near 1 (it is an upper bound either way). Below
    0 the local posterior is not normalisable along that direction: chains leave w* there."""

    pre = preconditioned_operator(hvp, mass, nbeta, gamma, like)

    def op(v: Params) -> Params:
        x = flatten(v, chain_dim=False)
        return unflatten(kmax * x - pre(x), like)

    return kmax - power_iteration(op, like, iters=30, seed=seed + 1, signed=True)


def negative_directions(
    hvp: Callable[[Params], Params], mass: LowRankMass, nbeta: float, gamma: float,
    like: Params, floor: float, k: int = 8, seed: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Directions where ``nβH + γI`` falls below ``floor·γ``, and their curvature ``vᵀ(nβH)v``.

    Lanczos (``which='SA'``) on ``M^-½ (nβH + γI) M^-½``, whose bulk sits at 1 so that the
    negatively curved outliers converge in a few restarts; the eigenvectors, outside the mass's
    basis up to rounding, are orthogonalised against it.

    Returns:
        ``V [P, j]`` orthonormal (float64, CPU) and ``nβ·μ [j]`` (negative).
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    ref = next(iter(like.values()))
    num = mass.basis.shape[0]
    pre = preconditioned_operator(hvp, mass, nbeta, gamma, like)

    def op_pre(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(ref.device, ref.dtype)
        return pre(t).to("cpu", torch.float64).numpy()

    op = LinearOperator((num, num), matvec=op_pre, dtype=np.float64)
    v0 = np.random.default_rng(seed + 2).standard_normal(num)
    vals, vecs = eigsh(op, k=min(k, num - 2), which="SA", v0=v0, tol=1e-3)
    keep = vals < floor
    basis = mass.basis.to("cpu", torch.float64)
    v = torch.from_numpy(np.ascontiguousarray(vecs[:, keep]))
    v = v - basis @ (basis.T @ v)
    v, _ = torch.linalg.qr(v)
    curv = []
    for j in range(v.shape[1]):
        col = v[:, j].to(ref.device, ref.dtype)
        hv = flatten(hvp(unflatten(col, like)), chain_dim=False)
        curv.append(nbeta * float(col @ hv))
    return v, torch.tensor(curv, dtype=torch.float64)
