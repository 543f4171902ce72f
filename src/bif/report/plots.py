"""Diagnostic plots of a saved result, rendered to PNG data URIs with matplotlib (no pyplot).

Eight or sixteen overlaid chains are a tangle, so the traces are summarised: the chain mean with
a band (min–max over chains, and ±1 sd), and small multiples (one small panel per chain on a
shared y axis) for spotting the one chain that drifts. Both stay readable from 2 to 16 chains.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from typing import Any

import numpy as np
import torch

from bif.result import BIFResult

MEAN_COLOUR = "#0969da"
CHAIN_COLOUR = "#57606a"


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _finite_range(trace: np.ndarray) -> tuple[float, float] | None:
    finite = trace[np.isfinite(trace)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _log_if_wide(ax: Any, trace: np.ndarray) -> None:
    """Log scale when the trace spans orders of magnitude (a diverging start, tiny losses)."""
    span = _finite_range(trace)
    if span is not None and span[0] > 0 and span[1] / span[0] > 30:
        ax.set_yscale("log")


def _marks(ax: Any, star: float, burnin: int | None) -> None:
    ax.axhline(star, color="k", ls="--", lw=1, label="loss at w*")
    if burnin is not None:
        ax.axvline(burnin, color="k", ls=":", lw=1, label="end of burn-in")


def chain_summary(trace: torch.Tensor) -> dict[str, np.ndarray]:
    """Per step, over chains: ``mean``, ``sd``, ``lo`` and ``hi`` (NaN entries ignored)."""
    t = trace.detach().to(torch.float64).cpu().numpy()
    with warnings.catch_warnings():  # a step no chain has reached (NaN column) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "mean": np.nanmean(t, 0),
            "sd": np.nanstd(t, 0, ddof=1) if t.shape[0] > 1 else np.zeros(t.shape[1]),
            "lo": np.nanmin(t, 0),
            "hi": np.nanmax(t, 0),
        }


def _band_axes(trace: torch.Tensor, title: str, xlabel: str, star: float, burnin: int | None):
    """Chain mean, ±1 sd and min–max bands of a ``[C, T]`` trace on one axes."""
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean loss")
    ax.grid(alpha=0.3)
    c = trace.shape[0]
    s = chain_summary(trace)
    x = np.arange(trace.shape[1])
    if c > 1:
        ax.fill_between(x, s["lo"], s["hi"], color=MEAN_COLOUR, alpha=0.15, lw=0,
                        label=f"min–max of {c} chains")  # fmt: skip
        ax.fill_between(x, s["mean"] - s["sd"], s["mean"] + s["sd"], color=MEAN_COLOUR,
                        alpha=0.3, lw=0, label="±1 sd across chains")  # fmt: skip
    ax.plot(x, s["mean"], color=MEAN_COLOUR, lw=1.5, label="chain mean" if c > 1 else "chain 0")
    _marks(ax, star, burnin)
    _log_if_wide(ax, trace.detach().to(torch.float64).cpu().numpy())
    # Below the axes, never over the traces it explains.
    fig.legend(fontsize=7, loc="outside lower center", ncols=5, frameon=False)
    return fig


def _small_multiples(trace: torch.Tensor, star: float, burnin: int) -> Any:
    """One small panel per chain (shared axes), the chain mean in grey behind each."""
    c, t = trace.shape
    cols = min(c, 4)
    rows = math.ceil(c / cols)
    fig = _figure(8.0, 0.4 + 1.25 * rows)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    data = trace.detach().to(torch.float64).cpu().numpy()
    mean = chain_summary(trace)["mean"]
    x = np.arange(t)
    for i, ax in enumerate(axes.flat):
        if i >= c:
            ax.set_visible(False)
            continue
        ax.plot(x, mean, color="#afb8c1", lw=1)
        ax.plot(x, data[i], color=MEAN_COLOUR, lw=0.9)
        _marks(ax, star, burnin)
        ax.text(0.02, 0.95, f"chain {i}", transform=ax.transAxes, fontsize=7, va="top")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _log_if_wide(axes.flat[0], data)
    fig.suptitle("Each chain's loss at every sampler step (grey: chain mean)", fontsize=10)
    fig.supxlabel("sampler step", fontsize=8)
    return fig


def loss_trace_plots(result: BIFResult) -> dict[str, tuple[str, str]]:
    """The sampler's loss traces as chain summaries and small multiples.

    Returns:
        ``{key: (data_uri, caption)}`` with keys ``"step-loss"`` (chain mean and bands of
        ``result.step_loss [C, T]``, burn-in marked), ``"draw-loss"`` (the same for
        ``result.draw_loss [C, D]``) and ``"chains"`` (one panel per chain of the step loss);
        each shows the training loss at the checkpoint w* as a dashed line.
    """
    cfg = result.config
    c = result.step_loss.shape[0]
    star = float(result.train_loss_star.to(torch.float64).mean())
    batch = "full batch" if cfg.batch_size is None else f"minibatches of {cfg.batch_size}"
    band = (
        f"the line is the mean over the {c} chains, the bands ±1 sd and min–max across them"
        if c > 1
        else "one chain"
    )
    out: dict[str, tuple[str, str]] = {}
    fig = _band_axes(
        result.step_loss, "Training loss at every sampler step", "sampler step", star,
        cfg.num_burnin,
    )  # fmt: skip
    out["step-loss"] = (
        _figure_uri(fig),
        f"Loss of the gradient batch ({batch}) at each step: {band}; dotted: end of burn-in "
        f"({cfg.num_burnin} steps); dashed: loss at w*. It should rise a little from w* and "
        "then stay flat.",
    )
    fig = _band_axes(result.draw_loss, "Mean training loss at each recorded draw", "draw", star,
                     None)  # fmt: skip
    out["draw-loss"] = (
        _figure_uri(fig),
        f"Mean loss over all attributed training examples at each of the {cfg.num_draws} draws "
        f"per chain (every {cfg.thin} steps): {band}. A drifting mean biases the scores.",
    )
    if c > 1:
        out["chains"] = (
            _figure_uri(_small_multiples(result.step_loss, star, cfg.num_burnin)),
            "The step loss of each chain on shared axes: a chain that drifts away or gets "
            "stuck stands out against the grey chain mean.",
        )
    return out


def chain_colours(num_chains: int) -> list[Any]:
    """One colour per chain: tab10 up to 10 chains, tab20 up to 20, else a viridis ramp."""
    from matplotlib import colormaps

    if num_chains <= 10:
        return [colormaps["tab10"](i) for i in range(num_chains)]
    if num_chains <= 20:
        return [colormaps["tab20"](i) for i in range(num_chains)]
    return [colormaps["viridis"](i / (num_chains - 1)) for i in range(num_chains)]


def moving_average(row: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` draws, NaN draws left out (NaN where none)."""
    ok = np.isfinite(row)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, row, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


SMOOTH_POINTS = 25  # the moving average spans 1/25 of the draws


def _chain_lines(ax: Any, trace: np.ndarray, colours: list[Any], label: bool) -> bool:
    """Every chain in its colour: each draw thin and faint, and (from 100 draws on) the
    chain's moving average thick on top, so that a chain offset from the others stands out
    from the tangle; returns whether the averages were drawn."""
    x = np.arange(trace.shape[1])
    window = trace.shape[1] // SMOOTH_POINTS
    smooth = window >= 4
    for i, row in enumerate(trace):
        name = f"chain {i}" if label else None
        if smooth:
            ax.plot(x, row, color=colours[i], lw=0.5, alpha=0.3)
            ax.plot(x, moving_average(row, window), color=colours[i], lw=1.4, label=name)
        else:
            ax.plot(x, row, color=colours[i], lw=0.9, alpha=0.85, label=name)
    return smooth


def trace_queries(result: BIFResult, count: int = 4) -> list[int]:
    """The queries whose traces are drawn: the ``count`` with the largest R-hat (NaN last),
    in index order; the first ones when there are no per-query diagnostics."""
    q = result.num_queries
    diag = result.diagnostics
    rh = list((diag.query or {}).get("rhat") or []) if diag is not None else []
    if len(rh) != q:
        return list(range(min(q, count)))
    key = [(-float(r) if r is not None and math.isfinite(float(r)) else math.inf) for r in rh]
    return sorted(sorted(range(q), key=lambda i: key[i])[:count])


def chain_trace_plots(result: BIFResult, count: int = 4) -> dict[str, tuple[str, str]]:
    """Per-chain traces, one colour per chain (the same colours in every panel).

    Returns:
        ``{key: (data_uri, caption)}`` with ``"draw-loss-chains"`` (the draw loss of every
        chain, ``result.draw_loss [C, D]``) and ``"query-traces"`` (up to ``count`` queries'
        observables at each draw, ``result.query_trace [C, D, Q]``, those with the largest
        R-hat when the result has diagnostics).
    """
    c = result.draw_loss.shape[0]
    colours = chain_colours(c)
    out: dict[str, tuple[str, str]] = {}
    loss = result.draw_loss.detach().to(torch.float64).cpu().numpy()
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.set_title("Draw loss of each chain", fontsize=10)
    ax.set_xlabel("draw")
    ax.set_ylabel("mean training loss")
    ax.grid(alpha=0.3)
    smooth = _chain_lines(ax, loss, colours, label=True)
    _log_if_wide(ax, loss)
    fig.legend(fontsize=7, loc="outside lower center", ncols=min(c, 8), frameon=False)
    window = loss.shape[1] // SMOOTH_POINTS
    how = (
        f" (faint: every draw; solid: each chain's moving average over {window} draws)"
        if smooth
        else ""
    )
    out["draw-loss-chains"] = (
        _figure_uri(fig),
        f"The mean training loss at each draw, one colour per chain ({c} chains){how}. Chains "
        "that agree overlap in one band; a chain offset from the others, stuck, or sliding in "
        "one direction is what a large R-hat, a small ESS or a drift finding points at.",
    )
    queries = trace_queries(result, count)
    if not queries:
        return out
    diag = result.diagnostics
    rh = ((diag.query or {}).get("rhat") or []) if diag is not None else []
    bad = set(diag.unresolved or []) if diag is not None else set()
    qt = result.query_trace.detach().to(torch.float64).cpu().numpy()
    cols = min(len(queries), 2)
    rows = math.ceil(len(queries) / cols)
    fig = _figure(8.0, 0.5 + 1.9 * rows)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= len(queries):
            ax.set_visible(False)
            continue
        q = queries[j]
        _chain_lines(ax, qt[:, :, q], colours, label=False)
        r = rh[q] if q < len(rh) and rh[q] is not None else math.nan
        title = f"query {q}" + (f" · R-hat {float(r):.3f}" if math.isfinite(float(r)) else "")
        ax.set_title(title + (" · unresolved" if q in bad else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    phi = result.observable
    fig.suptitle(f"Query {phi} at each draw, one colour per chain", fontsize=10)
    fig.supxlabel("draw", fontsize=8)
    which = "the queries with the largest R-hat" if diag is not None else "the first queries"
    out["query-traces"] = (
        _figure_uri(fig),
        f"The {phi} of {len(queries)} of the {result.num_queries} queries ({which}) at each "
        "draw, in the chain colours and style of the draw-loss plot. The scores are covariances of "
        "these traces with the training losses: every chain should wander over the same range.",
    )
    return out
