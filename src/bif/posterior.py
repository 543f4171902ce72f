"""The local, tempered posterior: the only place nβ, γ and w* enter the maths.

    p(w) ∝ exp( -nβ · L_n(w) - (γ/2) · ||w - w*||² )

with ``L_n`` the MEAN per-sample training loss. SGLD needs the gradient of the potential
``U(w) = nβ · L_n(w) + (γ/2) · ||w - w*||²``; with a minibatch estimate ``∇L_B`` of ``∇L_n`` this is

    ∇U(w) ≈ nβ · ∇L_B(w) + γ · (w - w*).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class LocalPosterior:
    """Target density parameters. ``w_star`` tensors may carry a leading chain dimension."""

    nbeta: float
    gamma: float
    w_star: Params

    def potential_grad(self, params: Params, loss_grad: Params) -> Params:
        """``∇U = nβ · ∇L_B + γ · (w - w*)`` per parameter tensor (same shapes as ``params``)."""
        return {
            k: self.nbeta * loss_grad[k] + self.gamma * (params[k] - self.w_star[k]) for k in params
        }

    def potential(self, params: Params, mean_loss: Tensor) -> Tensor:
        """``U(w)`` given the mean loss at ``params`` (for diagnostics; [C] with a chain dim)."""
        sq = sum(
            (params[k] - self.w_star[k]).pow(2).reshape((*mean_loss.shape, -1)).sum(-1)
            for k in params
        )
        return self.nbeta * mean_loss + 0.5 * self.gamma * sq

    @property
    def damping(self) -> float:
        """λ = γ / nβ: the damping of the classical influence function this BIF approximates."""
        return self.gamma / self.nbeta
