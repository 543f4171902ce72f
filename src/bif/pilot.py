"""A short pilot run that checks the automatic rules on the model itself, before sampling.

The rules (:mod:`bif.auto`) read the curvature at w* only: a step size that is stable for the
quadratic model there can still blow up a few steps away, where a ReLU network with BatchNorm
(scale γ_bn/sqrt(running var), ~10× on the digits CNN) turns a small move of the convolution
weights into a cliff of the loss, or where a loss the model was not trained on (label smoothing
on an over-confident model) makes the centred potential fall away from w*. On such models the
defaults used to diverge a hundred steps into a run.

The pilot samples ``PILOT_CHAINS`` chains for ``pilot_steps`` steps with the resolved settings
and their own seeds (the run's chains are not touched) and watches the energy
``E = U(w) - U(w*)``, which under a local Gaussian posterior sits near P/2 with spread
sqrt(P/2). It fails when a chain diverges, when ``E`` exceeds ``PILOT_ENERGY·(P + 10)`` (running
hot: the chain is where the loss is far steeper than at w*), or when ``E`` falls below
``-PILOT_ENERGY·(P + 10)`` (sliding: the potential has a lower region away from w*, so the
posterior is not local). A failure halves the step size; a slide, or a second halving that
did not help, lowers nβ 4× (with ``nbeta='auto'``), i.e. raises the damping, and re-derives
the step and the mass at that nβ. After ``PILOT_ATTEMPTS`` failures it raises
:class:`bif.ModelError` before any draw is taken. Every attempt is recorded in
``result.meta['preconditioner']['pilot']``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from bif.auto import Curvature
from bif.config import BIFConfig
from bif.data import DataSource
from bif.errors import DivergenceError, ModelError
from bif.functional import FunctionalModel
from bif.task import Task

log = logging.getLogger(__name__)

PILOT_CHAINS = 4
PILOT_MIN_STEPS = 30
# |U(w) - U(w*)| beyond PILOT_ENERGY·(P + 10): ten times the spread a local posterior allows
# (mean P/2); the runaway check of the run itself (bif.sampler.run) is 100× looser.
PILOT_ENERGY = 10.0
PILOT_ATTEMPTS = 6
# The pilot's chains draw from (seed + PILOT_SEED_OFFSET, c): other streams than the run's.
PILOT_SEED_OFFSET = 7919


def needs_pilot(requested: BIFConfig) -> bool:
    """The pilot checks the rules' choices: it runs when the step size or nβ is 'auto'."""
    auto = requested.step_size == "auto" or requested.nbeta == "auto"
    return auto and requested.pilot_steps > 0


def pilot_steps(cfg: BIFConfig) -> int:
    """``pilot_steps``, capped at a fifth of the run's steps per chain (at least 30): a short
    run is not made twice as long by its check."""
    return min(cfg.pilot_steps, max(PILOT_MIN_STEPS, cfg.steps_per_chain // 5))


def run_pilot(
    fmodel: FunctionalModel, task: Task, train: DataSource, query: DataSource, cfg: BIFConfig,
    curv: Curvature, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One pilot at the resolved ``cfg``: the outcome ('ok', 'diverged', 'hot' or 'slide') and
    the energy figures behind it."""
    from bif.sampler.run import run_chains

    pcfg = cfg.replace(
        num_chains=min(cfg.num_chains, PILOT_CHAINS), num_draws=max(2, pilot_steps(cfg)),
        num_burnin=0,
        thin=1, seed=cfg.seed + PILOT_SEED_OFFSET,
    )  # fmt: skip
    limit = PILOT_ENERGY * (fmodel.num_params + 10)
    record: dict[str, Any] = {"step_size": cfg.step_size, "nbeta": cfg.nbeta, "limit": limit}
    try:
        out = run_chains(
            fmodel, task, train, query.head(1), pcfg, progress=progress, mass=curv.mass,
            saddle=curv.saddle, desc="BIF pilot",
        )  # fmt: skip
    except DivergenceError as e:
        record.update(outcome="diverged", step=e.step)
        return record
    assert out.energy is not None
    energy = out.energy
    hi, lo = float(energy.max()), float(energy.min())
    record.update(max_energy=hi, min_energy=lo, final_energy=float(energy[:, -10:].mean()))
    if not math.isfinite(hi) or hi > limit:
        record["outcome"] = "hot"
    elif lo < -limit:
        record["outcome"] = "slide"
    else:
        record["outcome"] = "ok"
    return record


def guard(
    requested: BIFConfig, cfg: BIFConfig, curv: Curvature, fmodel: FunctionalModel, task: Task,
    train: DataSource, query: DataSource,
    resolve: Callable[[BIFConfig], tuple[BIFConfig, Curvature]], progress: bool = False,
) -> tuple[BIFConfig, Curvature]:  # fmt: skip
    """Pilot the resolved settings and repair them until a pilot passes (see module doc).

    Args:
        requested: the config as the user gave it (which fields were 'auto').
        cfg, curv: the rules' resolution of it (:func:`bif.auto.resolve_auto`).
        resolve: re-runs the rules for a config with a numeric nβ (reusing the eigenpairs).
        progress: show each pilot's progress bar ("BIF pilot").

    Raises:
        ModelError: no attempt passed; nothing was sampled.
    """
    if not needs_pilot(requested):
        return cfg, curv
    t0 = time.perf_counter()
    attempts: list[dict[str, Any]] = []
    halvings = 0
    for _ in range(PILOT_ATTEMPTS):
        log.info("pilot run: %d chains x %d steps at step_size=%.4g, nbeta=%.4g",
                 min(cfg.num_chains, PILOT_CHAINS), pilot_steps(cfg), cfg.step_size,
                 cfg.nbeta)  # fmt: skip
        record = run_pilot(fmodel, task, train, query, cfg, curv, progress)
        attempts.append(record)
        if record["outcome"] == "ok":
            break
        log.warning(
            "pilot run at step_size=%.4g, nbeta=%.4g: %s; adjusting the automatic settings",
            cfg.step_size, cfg.nbeta, _describe(record),
        )  # fmt: skip
        can_lower = requested.nbeta == "auto"
        can_halve = requested.step_size == "auto"
        if can_lower and (record["outcome"] == "slide" or halvings >= 2 or not can_halve):
            assert not isinstance(cfg.nbeta, str)
            # a given step size stays given: ``requested`` carries it
            cfg, curv = resolve(requested.replace(nbeta=cfg.nbeta / 4))
            halvings = 0
        elif can_halve:
            assert not isinstance(cfg.step_size, str)
            cfg = cfg.replace(step_size=cfg.step_size / 2)
            halvings += 1
        else:
            break
    info = {"attempts": attempts, "seconds": time.perf_counter() - t0}
    curv.info["pilot"] = info
    if attempts[-1]["outcome"] != "ok":
        raise ModelError(
            f"the automatic settings do not give a stable sampler for this model: "
            f"{len(attempts)} pilot runs of {pilot_steps(cfg)} steps failed (last at step_size="
            f"{cfg.step_size:.4g}, nbeta={cfg.nbeta:.4g}: {_describe(attempts[-1])}). Nothing "
            "was sampled. The loss far from the checkpoint is much steeper, or much lower, "
            "than its curvature at w* says. Check that the checkpoint is trained on this loss "
            "(a loss the model was not trained on can pull the chains away), or localise "
            "harder: a smaller radius (now "
            f"{requested.radius:g}) or a numeric gamma above {cfg.gamma:.4g}, a lower nbeta."
        )
    return cfg, curv


def _describe(record: dict[str, Any]) -> str:
    o = record["outcome"]
    if o == "diverged":
        return f"a chain diverged at step {record['step']}"
    if o == "hot":
        return f"energy U(w) - U(w*) reached {record['max_energy']:.3g} > {record['limit']:.3g}"
    if o == "slide":
        return (
            f"energy U(w) - U(w*) fell to {record['min_energy']:.3g} < -{record['limit']:.3g} "
            "(the chains left w*)"
        )
    return "ok"
