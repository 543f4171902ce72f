"""Runaway and NaN checks on a chain group: raise before a bad draw reaches any estimate."""

from __future__ import annotations

from torch import Tensor

from bif.config import BIFConfig
from bif.errors import DivergenceError

# A draw whose energy U(w) - U(w*) exceeds this many times (P + 10) is a runaway chain. Under the
# target, U(w) - U(w*) <= U(w) - min U, which is about P/2 (at most ~P for a log-concave
# posterior, with O(sqrt P) spread); only an unstable sampler (or minibatch noise heating the
# chain ~1000-fold) gets near the bound. Without it an exploding chain can stay finite for many
# steps and be averaged in as scores of 1e50.
ENERGY_FACTOR = 1e3


def energy_limit(num_params: int) -> float:
    """The runaway bound on ``U(w) - U(w*)`` for ``num_params`` sampled parameters."""
    return ENERGY_FACTOR * (num_params + 10)


def diverged(
    chains: list[int], bad: Tensor, step: int, what: str, cfg: BIFConfig, why: str = ""
) -> DivergenceError:
    """The error for the first chain flagged in ``bad`` ``[G]`` (bool) at sampler ``step``."""
    c = chains[int(bad.nonzero()[0, 0])]
    why = why or f"the {what} became NaN/inf"
    return DivergenceError(
        f"chain {c} diverged at sampler step {step}: {why}. Nothing from that "
        f"draw entered the estimates. Lower step_size (now {cfg.step_size:g}; try "
        f"{cfg.step_size / 10:g}), or raise gamma (now {cfg.gamma:g}) or lower nbeta "
        f"(now {cfg.nbeta:g}) to make the posterior better conditioned.",
        chain=c,
        step=step,
    )


def check_step(chains: list[int], loss: Tensor, step: int, cfg: BIFConfig) -> None:
    """The minibatch loss ``[G]`` of a sampler step must be finite."""
    if not bool(loss.isfinite().all()):
        raise diverged(chains, ~loss.isfinite(), step, "training loss", cfg)


def check_draw(
    chains: list[int], a: Tensor, b: Tensor, energy: Tensor, step: int, cfg: BIFConfig,
    num_params: int,
) -> None:  # fmt: skip
    """A draw's losses ``a [G, N]`` and observables ``b [G, Q]`` must be finite and its
    energy ``[G]`` below :func:`energy_limit`."""
    finite = a.isfinite().all(1) & b.isfinite().all(1)
    if not bool(finite.all()):
        raise diverged(chains, ~finite, step, "evaluated losses", cfg)
    limit = energy_limit(num_params)
    if bool((energy > limit).any()):
        e = float(energy.max())
        raise diverged(
            chains, energy > limit, step, "energy", cfg,
            f"its energy nβ·(L_n(w) - L_n(w*)) + γ/2·||w - w*||² = {e:.3g} exceeds "
            f"{limit:.3g} = {ENERGY_FACTOR:g}·(P + 10) with P = {num_params} "
            "sampled parameters (about P/2 is expected under the posterior); the chain "
            "is running away (with minibatches, a larger batch_size also helps)",
        )  # fmt: skip
