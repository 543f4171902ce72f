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
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]


class Mass(Protocol):
    """What the kinetic sampler needs of a constant SPD mass matrix M: its powers on flat
    vectors ``x [..., P]`` (:class:`LowRankMass`, :class:`bif.sampler.kronecker.KroneckerMass`)."""

    rows: int  # products of a [G, P] group computed as if it had this many rows (0: as is)

    def inverse(self, x: Tensor) -> Tensor: ...
    def sqrt(self, x: Tensor) -> Tensor: ...
    def inverse_sqrt(self, x: Tensor) -> Tensor: ...
    def _replace(self, **fields: Any) -> Any: ...


class LowRankMass(NamedTuple):
    """``M = gamma·I + basis·diag(curvature - gamma)·basisᵀ``.

    Attributes:
        gamma: mass of every direction outside the basis (the localisation strength γ).
        basis: ``[P, k]`` orthonormal columns (top eigenvectors of the Hessian at w*).
        curvature: ``[k]`` mass along each column, ``nβ·μ_j + γ`` (> 0).
        rows: compute the products of a ``[G, P]`` group as if it had this many rows (see
            :func:`group_matmul`); 0: as it is.
    """

    gamma: float
    basis: Tensor
    curvature: Tensor
    rows: int = 0

    def _apply(self, x: Tensor, power: float) -> Tensor:
        """``M^power · x`` for ``x [..., P]``."""
        g = self.gamma**power
        coef = self.curvature.pow(power) - g  # [k]
        proj = group_matmul(x, self.basis, self.rows) * coef
        return g * x + group_matmul(proj, self.basis.T, self.rows)

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
        return self._replace(
            basis=self.basis.to(device, dtype), curvature=self.curvature.to(device, dtype)
        )


def group_matmul(x: Tensor, m: Tensor, rows: int = 0) -> Tensor:
    """``x @ m`` for a chain group ``x [G, P]``, computed as if the group had ``rows`` rows.

    A matrix product's rounding depends on its shape (BLAS picks other kernels and blockings for
    2 rows than for 8), so chain ``c`` would round differently in a group of 2 than in the
    single-process group of all ``C`` chains. A process of a chain-parallel run pads its group
    with zero rows up to ``C``: the same kernel, so each row is bit for bit the single-process
    one, at the single-process cost of the product.
    """
    g = x.shape[0] if x.dim() == 2 else rows
    if g >= rows:
        return x @ m
    return (torch.cat([x, x.new_zeros(rows - g, x.shape[1])]) @ m)[:g]


def flatten(params: Params, chain_dim: bool = True) -> Tensor:
    """Parameter dict -> ``[G, P]`` (or ``[P]`` without the leading chain dim), in key order.

    When the tensors are already the in-order views of one flat tensor (what :func:`unflatten`
    returns, which the kinetic sampler's states and the per-chain noise are), that tensor is
    returned without a copy, instead of a copy of every state and noise tensor per step. The
    result may alias ``params``: read it, never write into it."""
    base = _flat_base(params, chain_dim)
    if base is not None:
        return base
    if chain_dim:
        g = next(iter(params.values())).shape[0]
        return torch.cat([v.reshape(g, -1) for v in params.values()], dim=1)
    return torch.cat([v.reshape(-1) for v in params.values()])


def _flat_base(params: Params, chain_dim: bool) -> Tensor | None:
    """The flat ``[G, P]`` (``[P]``) tensor whose in-order views ``params`` are, else None."""
    vs = list(params.values())
    if not vs or (chain_dim and vs[0].dim() == 0):
        return None
    ref = vs[0]
    g = ref.shape[0] if chain_dim else None
    rows = [v[0] if g is not None else v for v in vs]  # one chain's part of each tensor
    total = sum(r.numel() for r in rows)
    ptr, i = ref.untyped_storage().data_ptr(), ref.storage_offset()
    for v, r in zip(vs, rows, strict=True):
        same = v.dtype == ref.dtype and v.device == ref.device
        if not same or v.untyped_storage().data_ptr() != ptr or v.storage_offset() != i:
            return None
        if not r.is_contiguous():
            return None
        if g is not None and (v.shape[0] != g or (g > 1 and v.stride(0) != total)):
            return None
        i += r.numel()
    # The last view reaches the end of row G-1, so the flat tensor lies inside the storage.
    shape, stride = ((g, total), (total, 1)) if g is not None else ((total,), (1,))
    return ref.as_strided(shape, stride, ref.storage_offset())


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
