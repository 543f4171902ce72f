"""Plain SGLD (Welling & Teh 2011), Euler-Maruyama discretisation of Langevin dynamics.

Target ``p(w) ∝ exp(-U(w))`` (see :mod:`bif.posterior`). One step with step size ε:

    w ← w - (ε/2) · ∇U(w) + sqrt(ε) · ξ,        ξ ~ N(0, I)

``noise`` is ξ, drawn by the caller. Works with or without a leading chain dimension.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

Params = dict[str, Tensor]


class SGLDState(NamedTuple):
    """Carried between steps: the current weights."""

    params: Params


class SGLDInfo(NamedTuple):
    """Reported only: squared norm of the drift term (ε/2)·∇U, summed over tensors."""

    drift_sq: Tensor


def init(params: Params) -> SGLDState:
    return SGLDState({k: v.clone() for k, v in params.items()})


def step(
    state: SGLDState, potential_grad: Params, noise: Params, step_size: float
) -> tuple[SGLDState, SGLDInfo]:
    """One SGLD step (pure).

    Args:
        state: current weights, tensors ``[C, ...]`` or unbatched.
        potential_grad: ``∇U`` at ``state.params`` (same shapes).
        noise: standard normal ξ (same shapes).
        step_size: ε > 0.
    """
    scale = step_size**0.5
    new, drift_sq = {}, 0.0
    for k, w in state.params.items():
        drift = 0.5 * step_size * potential_grad[k]
        new[k] = w - drift + scale * noise[k]
        drift_sq = drift_sq + drift.pow(2).sum()
    return SGLDState(new), SGLDInfo(drift_sq)  # type: ignore[arg-type]
