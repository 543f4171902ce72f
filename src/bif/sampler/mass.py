"""Low-rank mass matrix for the kinetic sampler: the stiff directions of the posterior at unit
frequency, every other direction untouched.

The local posterior's precision at w* is ``A = nβ·H + γ·I``. Measured on the digits MLP at the
damping λ = λ_max/150, 99% of A's eigenvalues lie within [0.97 γ, 1.7 γ]: the loss
constrains a few dozen directions strongly and leaves the rest to the prior. A unit-mass sampler
must take steps small enough for the stiffest direction (h ≈ 1/sqrt(nβ·λ_max + γ)), so the
isotropic bulk, which carries most of the influence, needs ~sqrt(condition) steps per
independent draw. With the mass

    M = γ·I + U·diag(a - γ)·Uᵀ,    U [P, k] the top-k eigenvectors of H, a = nβ·μ + γ [k]

every captured direction has frequency sqrt(a/a) = 1 and the bulk sqrt(γ/γ) = 1, so one time
step h ≈ 1 decorrelates the chain (a diagonal mass makes it worse there: its preconditioned
condition number is 368 against 169 unpreconditioned, because the curvature is not
axis-aligned). M only changes how the chain moves, not where: kinetic Langevin with any constant
positive-definite mass has the same stationary law in w.

All operators below act on flat vectors ``x [..., P]`` and cost two ``[P, k]`` products.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]


class LowRankMass(NamedTuple):
    """``M = gamma·I + basis·diag(curvature - gamma)·basisᵀ``.

    Attributes:
        gamma: mass of every direction outside the basis (the localisation strength γ).
        basis: ``[P, k]`` orthonormal columns (top eigenvectors of the Hessian at w*).
        curvature: ``[k]`` mass along each column, ``nβ·μ_j + γ`` (> 0).
    """

    gamma: float
    basis: Tensor
    curvature: Tensor

    def _apply(self, x: Tensor, power: float) -> Tensor:
        """``M^power · x`` for ``x [..., P]``."""
        g = self.gamma**power
        coef = self.curvature.pow(power) - g  # [k]
        return g * x + ((x @ self.basis) * coef) @ self.basis.T

    def inverse(self, x: Tensor) -> Tensor:
        return self._apply(x, -1.0)

    def sqrt(self, x: Tensor) -> Tensor:
        return self._apply(x, 0.5)

    def inverse_sqrt(self, x: Tensor) -> Tensor:
        return self._apply(x, -0.5)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LowRankMass:
        return LowRankMass(
            self.gamma, self.basis.to(device, dtype), self.curvature.to(device, dtype)
        )


def flatten(params: Params, chain_dim: bool = True) -> Tensor:
    """Parameter dict -> ``[G, P]`` (or ``[P]`` without the leading chain dim), in key order."""
    if chain_dim:
        g = next(iter(params.values())).shape[0]
        return torch.cat([v.reshape(g, -1) for v in params.values()], dim=1)
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflatten(x: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: ``x [..., P]`` split into tensors shaped like ``like``."""
    lead = x.shape[:-1]
    out, i = {}, 0
    for k, v in like.items():
        shape = v.shape[len(lead) :] if len(lead) else v.shape
        n = math.prod(shape)
        out[k] = x[..., i : i + n].reshape(*lead, *shape)
        i += n
    return out
