"""Kinetic (underdamped) Langevin dynamics, BAOAB splitting (Leimkuhler & Matthews 2013).

Target ``p(w) ∝ exp(-U(w))`` extended by a unit-mass momentum ``v ~ N(0, I)``. With time step h,
friction f and ``c = exp(-f·h)``, one step given ``g = ∇U(w)`` at the current weights is

    v ← v - h · g                                  (B: two merged half kicks)
    w ← w + (h/2) · v                              (A)
    v ← c · v + sqrt(1 - c²) · ξ,   ξ ~ N(0, I)    (O: exact Ornstein-Uhlenbeck)
    w ← w + (h/2) · v                              (A)

Merging the closing half kick of one step with the opening half kick of the next leaves one
gradient per step and visits exactly BAOAB's positions (only the first step differs, by a half
kick on the zero initial momentum, which burn-in forgets).

Why not plain SGLD: first-order Langevin relaxes a direction of curvature k in about
``1/(ε·k)`` steps, and stability caps ``ε`` at about ``1/k_max``, so the flat directions, which
carry most of the influence at small damping, need ``κ = k_max/k_min`` steps. With friction
near critical damping of the flattest direction, kinetic Langevin needs about ``sqrt(κ)``. BAOAB
also samples the positions of a Gaussian target without discretisation bias for any stable
``h < 2/sqrt(k_max)``, so the step can sit close to the stability limit.

With a mass matrix ``M`` (:class:`bif.sampler.mass.LowRankMass`) the momentum is ``v ~ N(0, M)``
and the two A steps move ``w`` by ``(h/2)·M⁻¹v``, the O step refreshes with ``M^½·ξ``. In
``u = M^½ w`` this is exactly the unit-mass recursion above on the curvature ``M^-½ A M^-½``, so
the stationary law of ``w`` is unchanged and only the frequencies sqrt(eig(M⁻¹A)) move.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from bif.sampler.mass import Mass, flatten, unflatten
from bif.sampler.sgld import SGLDInfo

Params = dict[str, Tensor]


class KineticState(NamedTuple):
    """Carried between steps: weights and momenta."""

    params: Params
    momentum: Params


def init(params: Params) -> KineticState:
    """Start at ``params`` with zero momentum (the O step draws it within ~1/(f·h) steps)."""
    return KineticState(
        {k: v.clone() for k, v in params.items()},
        {k: torch.zeros_like(v) for k, v in params.items()},
    )


def step(
    state: KineticState,
    potential_grad: Params,
    noise: Params,
    step_size: float,
    friction: float,
    mass: Mass | None = None,
) -> tuple[KineticState, SGLDInfo]:
    """One BAOAB step (pure). Shapes as in :func:`bif.sampler.sgld.step`.

    Args:
        state: weights and momenta, tensors ``[C, ...]`` or unbatched.
        potential_grad: ``∇U`` at ``state.params``.
        noise: standard normal ξ for the O step.
        step_size: time step h > 0.
        friction: f > 0 (per unit time).
        mass: constant mass matrix M (None: the identity). Parameters then carry a leading
            chain dimension ``[C, ...]``.
    """
    c = math.exp(-friction * step_size)
    s = math.sqrt(max(0.0, 1.0 - c * c))
    half = 0.5 * step_size
    if mass is not None:
        return _step_with_mass(state, potential_grad, noise, step_size, c, s, mass)
    new_p, new_v, drift_sq = {}, {}, 0.0
    for k, w in state.params.items():
        kick = step_size * potential_grad[k]
        v = state.momentum[k] - kick
        w = w + half * v
        v = c * v + s * noise[k]
        new_p[k] = w + half * v
        new_v[k] = v
        drift_sq = drift_sq + kick.pow(2).sum()
    return KineticState(new_p, new_v), SGLDInfo(drift_sq)  # type: ignore[arg-type]


def _step_with_mass(
    state: KineticState,
    potential_grad: Params,
    noise: Params,
    h: float,
    c: float,
    s: float,
    mass: Mass,
) -> tuple[KineticState, SGLDInfo]:
    """The same BAOAB step with momentum ``v ~ N(0, M)`` on flat ``[C, P]`` vectors.

    The two half drifts ``w += h/2·M⁻¹v`` (before and after the O step) are one
    ``w += h/2·M⁻¹(v₁ + v₂)``: M⁻¹ is linear, so one application instead of two (the low-rank
    products dominate a step's overhead for large P)."""
    kick = h * flatten(potential_grad)
    v1 = flatten(state.momentum) - kick
    v = c * v1 + s * mass.sqrt(flatten(noise))
    w = flatten(state.params) + 0.5 * h * mass.inverse(v1 + v)
    like = state.params
    return KineticState(unflatten(w, like), unflatten(v, like)), SGLDInfo(kick.pow(2).sum())
