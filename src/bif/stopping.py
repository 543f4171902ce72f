"""When an adaptive run (``num_draws='auto'``) has drawn enough (pure functions).

Every ``check_every`` draws per chain the loop asks :func:`check` whether the targets hold:

- every query's top-5 scores (by magnitude) have a reported standard error at most
  ``target_mcse`` times their mean magnitude;
- R-hat of the draw loss and of every query trace is at most ``target_rhat``;
- the bulk ESS of the draw loss and of every query trace is at least ``target_ess``.

The decision depends only on the draws so far, so a resumed run stops at the same draw. The
budget (``max_draws``, ``max_seconds``) ends the run otherwise; the result says which.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from bif.config import BIFConfig
from bif.diagnostics import TOP_K, ess, relative_mcse, rhat
from bif.estimator import Moments, estimate
from bif.mcse import Blocks


def check(
    moments: Moments,
    blocks: Blocks | None,
    draw_loss: Tensor,
    query_trace: Tensor,
    cfg: BIFConfig,
) -> dict[str, Any]:
    """The targets' status after the draws so far.

    Args:
        moments, blocks: the loop's running statistics.
        draw_loss: ``[C, d]`` recorded draw losses; query_trace: ``[C, d, Q]``.

    Returns:
        ``{"met": bool, "draws": d, "mcse": worst relative error, "rhat": max R-hat,
        "ess": min bulk ESS, "unresolved": queries above target_mcse}``.
    """
    est = estimate(moments, cfg.centering, blocks)
    rel = relative_mcse(est.scores.cpu().double(), est.stderr.cpu().double(), TOP_K)
    x = np.concatenate(
        [draw_loss.numpy()[..., None], query_trace.numpy()], axis=-1
    )  # [C, d, 1 + Q]
    keep = x.std(axis=(0, 1)) > 0
    x = x[..., keep]
    r = rhat(x) if x.shape[-1] else np.array([math.nan])
    e = ess(x, "bulk") if x.shape[-1] else np.array([math.nan])
    worst = float(np.nanmax(rel)) if rel.size else math.nan
    status = {
        "draws": int(draw_loss.shape[1]),
        "mcse": worst,
        "rhat": float(np.nanmax(r)),
        "ess": float(np.nanmin(e)),
        "unresolved": int((~(rel <= cfg.target_mcse)).sum()),
    }
    status["met"] = bool(
        worst <= cfg.target_mcse
        and status["rhat"] <= cfg.target_rhat
        and status["ess"] >= cfg.target_ess
    )
    return status


def describe(stop: dict[str, Any], cfg: BIFConfig) -> str:
    """One line: why the adaptive run stopped."""
    s = stop.get("status", {})
    got = (
        f"top-{TOP_K} error {s.get('mcse', math.nan):.3g} (target {cfg.target_mcse:g}), "
        f"R-hat {s.get('rhat', math.nan):.4f} ({cfg.target_rhat:g}), "
        f"bulk ESS {s.get('ess', math.nan):.0f} ({cfg.target_ess:g})"
    )
    why = {
        "targets_met": "targets met",
        "max_draws": f"max_draws={cfg.max_draws} reached before the targets",
        "max_seconds": f"max_seconds={cfg.max_seconds:g} spent before the targets"
        if cfg.max_seconds
        else "time budget spent",
    }[stop["reason"]]
    return f"stopped after {stop['draws']} draws per chain: {why}; {got}"
