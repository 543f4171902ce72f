"""RMSProp-preconditioned SGLD (Li et al. 2016; the BIF authors' preferred sampler).

With ``g = ∇L_B(w)`` the raw minibatch gradient of the mean loss and ``t`` the step count:

    V ← α · V + (1 - α) · g²,        V̂ = V / (1 - α^t)          (bias-corrected)
    G = 1 / (sqrt(V̂) + eps)
    w ← w - (ε/2) · G ⊙ ∇U(w) + sqrt(ε · G) ⊙ ξ,   ξ ~ N(0, I)

The preconditioner equalises step sizes across directions of very different curvature. The
small correction term Γ(w) of exact preconditioned Langevin dynamics is omitted, as is usual.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bif.sampler.sgld import SGLDInfo

Params = dict[str, Tensor]


class RMSPropSGLDState(NamedTuple):
    """Carried between steps: weights, squared-gradient average ``V`` and step count ``t``."""

    params: Params
    square_avg: Params
    count: Tensor


def init(params: Params) -> RMSPropSGLDState:
    p = {k: v.clone() for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    first = next(iter(params.values()))
    return RMSPropSGLDState(p, v, torch.zeros((), dtype=first.dtype, device=first.device))


def step(
    state: RMSPropSGLDState,
    potential_grad: Params,
    loss_grad: Params,
    noise: Params,
    step_size: float,
    alpha: float = 0.99,
    eps: float = 0.1,
) -> tuple[RMSPropSGLDState, SGLDInfo]:
    """One RMSProp-SGLD step (pure). Shapes as in :func:`bif.sampler.sgld.step`."""
    count = state.count + 1
    correction = 1.0 - alpha**count
    new_p, new_v, drift_sq = {}, {}, 0.0
    for k, w in state.params.items():
        v = alpha * state.square_avg[k] + (1.0 - alpha) * loss_grad[k].pow(2)
        precond = 1.0 / ((v / correction).sqrt() + eps)
        drift = 0.5 * step_size * precond * potential_grad[k]
        new_p[k] = w - drift + (step_size * precond).sqrt() * noise[k]
        new_v[k] = v
        drift_sq = drift_sq + drift.pow(2).sum()
    return RMSPropSGLDState(new_p, new_v, count), SGLDInfo(drift_sq)  # type: ignore[arg-type]
