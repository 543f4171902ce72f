"""The local, tempered posterior: the only place nβ, γ and w* enter the maths.

    p(w) ∝ exp( -nβ · L_n(w) - (γ/2) · ||w - w*||² )

with ``L_n`` the MEAN per-sample training loss. SGLD needs the gradient of the potential
``U(w) = nβ · L_n(w) + (γ/2) · ||w - w*||²``; with a minibatch estimate ``∇L_B`` of ``∇L_n`` this is

    ∇U(w) ≈ nβ · ∇L_B(w) + γ · (w - w*).

With ``center_gradient`` (``grad_star = ∇L_n(w*)``), the linear part of ``L_n`` at w* is removed:

    U(w) = nβ · [L_n(w) - ∇L_n(w*)ᵀ(w - w*)] + (γ/2) · ||w - w*||²

so w* is a stationary point of the sampled density even when it is not a minimum of the loss of
the attributed data (a pretrained model attributed on a subset of what it saw). The Hessian, and
with it the Gaussian-limit covariance (the damped influence function), is unchanged; only the
drift of the chains towards the subset's own minimum goes.

With ``saddle = (V, c)`` (``V [P, j]`` orthonormal directions of negative curvature at w*, ``c [j]``
extra precisions) the localisation is strengthened along those directions only:

    U(w) += ½ Σ_j c_j · (v_jᵀ(w - w*))²

:mod:`bif.auto` sets ``c_j = 2·nβ·|μ_j|`` for a Hessian eigenvalue ``μ_j < 0``, so the sampled
curvature there is ``γ + nβ·|μ_j|`` instead of ``γ - nβ·|μ_j|`` (the absolute value of the
Hessian, as in saddle-free Newton methods) and the damping elsewhere can stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bif.sampler.mass import flatten, group_matmul, unflatten

Params = dict[str, Tensor]


@dataclass(frozen=True)
class LocalPosterior:
    """Target density parameters. ``w_star`` tensors may carry a leading chain dimension."""

    nbeta: float
    gamma: float
    w_star: Params
    grad_star: Params | None = None  # ∇L_n(w*) when the gradient is centred, else None
    saddle: tuple[Tensor, Tensor] | None = None  # (V [P, j], c [j]): extra localisation
    rows: int = 0  # chain groups' products as if of this many rows (bif.sampler.mass.group_matmul)

    def _delta(self, params: Params) -> Params:
        return {k: params[k] - self.w_star[k] for k in params}

    def potential_grad(self, params: Params, loss_grad: Params) -> Params:
        """``∇U = nβ · (∇L_B - g*) + γ · (w - w*)`` per parameter tensor (``g* = 0`` unless
        centred; same shapes as ``params``)."""
        g = self.grad_star
        delta = self._delta(params)
        out = {
            k: self.nbeta * (loss_grad[k] if g is None else loss_grad[k] - g[k])
            + self.gamma * delta[k]
            for k in params
        }
        if self.saddle is not None:
            v, c = self.saddle
            proj = group_matmul(flatten(delta), v, self.rows) * c
            extra = unflatten(group_matmul(proj, v.T, self.rows), params)
            out = {k: out[k] + extra[k] for k in out}
        return out

    def potential(self, params: Params, mean_loss: Tensor) -> Tensor:
        """``U(w)`` given the mean loss at ``params`` (for diagnostics; [C] with a chain dim)."""
        shape = (*mean_loss.shape, -1)
        delta = self._delta(params)
        sq = sum(d.pow(2).reshape(shape).sum(-1) for d in delta.values())
        u = self.nbeta * mean_loss + 0.5 * self.gamma * sq
        if self.grad_star is not None:
            g = self.grad_star
            lin = sum((delta[k] * g[k]).reshape(shape).sum(-1) for k in delta)
            u = u - self.nbeta * lin
        if self.saddle is not None:
            v, c = self.saddle
            proj = group_matmul(flatten(delta), v, self.rows)  # [C, j]
            u = u + 0.5 * (proj.pow(2) * c).sum(-1).reshape(u.shape)
        return u

    @property
    def damping(self) -> float:
        """λ = γ / nβ: the damping of the classical influence function this BIF approximates."""
        return self.gamma / self.nbeta
