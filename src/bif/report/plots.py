"""Diagnostic plots of a saved result, rendered to PNG data URIs with matplotlib (no pyplot)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import torch

from bif.result import BIFResult


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import

    fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _per_chain(ax: Any, trace: torch.Tensor) -> None:
    """One line per chain of a ``[C, T]`` trace (NaN entries, e.g. unfinished draws, are gaps)."""
    t = trace.to(torch.float64)
    for c in range(t.shape[0]):
        ax.plot(range(t.shape[1]), t[c].tolist(), lw=0.8, alpha=0.8)


def loss_trace_plots(result: BIFResult) -> dict[str, tuple[str, str]]:
    """The sampler's loss traces, one line per chain.

    Returns:
        ``{key: (data_uri, caption)}`` with keys ``"step-loss"`` (``result.step_loss [C, T]``,
        burn-in marked) and ``"draw-loss"`` (``result.draw_loss [C, D]``); each shows the
        training loss at the checkpoint w* as a dashed line.
    """
    cfg = result.config
    star = float(result.train_loss_star.to(torch.float64).mean())
    out: dict[str, tuple[str, str]] = {}

    fig, ax = _new_axes("Training loss at every sampler step", "sampler step", "mean loss")
    _per_chain(ax, result.step_loss)
    ax.axvline(cfg.num_burnin, color="k", ls=":", lw=1)
    ax.axhline(star, color="k", ls="--", lw=1)
    if result.step_loss.numel() and bool(torch.isfinite(result.step_loss).any()):
        # Log scale when the trace spans orders of magnitude (a diverging start, tiny losses).
        lo = float(result.step_loss[torch.isfinite(result.step_loss)].min())
        hi = float(result.step_loss[torch.isfinite(result.step_loss)].max())
        if lo > 0 and hi / lo > 30 and math.isfinite(hi):
            ax.set_yscale("log")
    batch = "full batch" if cfg.batch_size is None else f"minibatches of {cfg.batch_size}"
    out["step-loss"] = (
        _figure_uri(fig),
        f"Loss of the gradient batch ({batch}) at each step, one line per chain; dotted: end "
        f"of burn-in ({cfg.num_burnin} steps); dashed: loss at w*. It should rise a little "
        "from w* and then stay flat.",
    )

    fig, ax = _new_axes("Mean training loss at each recorded draw", "draw", "mean loss")
    _per_chain(ax, result.draw_loss)
    ax.axhline(star, color="k", ls="--", lw=1)
    out["draw-loss"] = (
        _figure_uri(fig),
        f"Mean loss over all attributed training examples at each of the {cfg.num_draws} draws "
        f"per chain (every {cfg.thin} steps). A chain that keeps drifting biases the scores.",
    )
    return out
