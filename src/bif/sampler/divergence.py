"""Runaway and NaN checks on a chain group: raise before a bad draw reaches any estimate."""

from __future__ import annotations

import torch
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
        why = _runaway(float(energy.max()), num_params)
        raise diverged(chains, energy > limit, step, "energy", cfg, why)


def _runaway(e: float, num_params: int) -> str:
    limit = energy_limit(num_params)
    return (
        f"its energy nβ·(L_n(w) - L_n(w*)) + γ/2·||w - w*||² = {e:.3g} exceeds "
        f"{limit:.3g} = {ENERGY_FACTOR:g}·(P + 10) with P = {num_params} "
        "sampled parameters (about P/2 is expected under the posterior); the chain "
        "is running away (with minibatches, a larger batch_size also helps)"
    )


# The kinds of check, in the order the immediate checks make them at one step.
_LOSS, _LOSSES, _ENERGY = 0, 1, 2
_WHAT = ("training loss", "evaluated losses", "energy")


class Guard:
    """The step and draw checks of one chain group, read on the host every ``every`` steps.

    With ``every == 1`` each check raises at once (a host synchronisation per step: free on a
    CPU). With ``every > 1`` (an accelerator, where reading a flag waits for the device) a check
    only marks, on the device, the first bad step of each chain and kind; :meth:`read` raises
    the error the immediate check would have raised (same chain, step and message). The loop
    reads every ``every`` steps, before a checkpoint or an adaptive check and at the end of a
    group, so a draw recorded in between never reaches a checkpoint or a result.

    Args:
        chains: the group's chain numbers ``[G]``.
        num_params: sampled parameters P (for the energy bound).
    """

    def __init__(self, chains: list[int], cfg: BIFConfig, num_params: int, every: int) -> None:
        self.chains, self.cfg, self.num_params = chains, cfg, num_params
        self.every = max(1, every)
        self.limit = energy_limit(num_params)
        self._first: Tensor | None = None  # [G, 3] first bad step per chain and kind; -1: none
        self._energy: Tensor | None = None  # [G] energy of each chain's first runaway draw

    def _mark(self, kind: int, bad: Tensor, step: int) -> Tensor:
        """Mark ``bad [G]`` at ``step``; returns where this is the chain's first of ``kind``."""
        if self._first is None:
            self._first = torch.full((len(bad), 3), -1, dtype=torch.long, device=bad.device)
        col = self._first[:, kind]
        new = (col < 0) & bad
        col.copy_(torch.where(new, step, col))
        return new

    def step(self, loss: Tensor, step: int) -> None:
        """The loss ``[G]`` of sampler step ``step`` must be finite."""
        if self.every == 1:
            check_step(self.chains, loss, step, self.cfg)
        else:
            self._mark(_LOSS, ~loss.isfinite(), step)

    def draw(self, a: Tensor, b: Tensor, energy: Tensor, step: int) -> None:
        """A draw made by ``step`` (as :func:`check_draw`)."""
        if self.every == 1:
            check_draw(self.chains, a, b, energy, step, self.cfg, self.num_params)
            return
        self._mark(_LOSSES, ~(a.isfinite().all(1) & b.isfinite().all(1)), step)
        energy = energy.detach()
        new = self._mark(_ENERGY, energy > self.limit, step)
        if self._energy is None:
            self._energy = torch.full_like(energy, float("nan"))
        self._energy.copy_(torch.where(new, energy, self._energy))

    def due(self, step: int) -> bool:
        """Is a read due after sampler step ``step``?"""
        return self.every > 1 and (step + 1) % self.every == 0

    def read(self) -> None:
        """Raise the error of the earliest marked check, if any (one host synchronisation)."""
        if self._first is None:
            return
        first = self._first.cpu()
        if not bool((first >= 0).any()):
            return
        # Order (step, kind) as the immediate checks meet them; ties: the first chain.
        key = first.masked_fill(first < 0, 2**40) * 3 + torch.arange(3)
        kind = int(key.min(0).values.argmin())
        step = int(first[:, kind][key[:, kind].argmin()])
        bad = first[:, kind] == step
        why = ""
        if kind == _ENERGY:
            assert self._energy is not None
            why = _runaway(float(self._energy.cpu()[bad].max()), self.num_params)
        raise diverged(self.chains, bad, step, _WHAT[kind], self.cfg, why)
