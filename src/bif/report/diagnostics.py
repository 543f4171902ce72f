"""The diagnostics part of every report (example pages and token pages alike): loss trace plots,
the configuration and the run's meta, from a saved result only."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from bif.report.meta import config_table, fmt_value, meta_table
from bif.report.plots import loss_trace_plots

e = html.escape


def observable_name(result: Any, observable: str | None = None) -> str:
    """What the queries' φ is called on the page: the explicit name, else the result's own
    (:attr:`bif.BIFResult.observable`, "loss" for results saved before it was recorded)."""
    return str(observable) if observable else result.observable


def plots_html(result: Any) -> str:
    """The loss trace figures (``figure.plot[data-plot]``)."""
    plots = "".join(
        f'<figure class="plot" data-plot="{key}"><img src="{uri}" alt="{e(key)} plot">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for key, (uri, caption) in loss_trace_plots(result).items()
    )
    return f'<div class="plots">{plots}</div>'


def run_tables(result: Any, meta: Mapping[str, Any]) -> str:
    """The configuration and run tables (nested entries as indented rows)."""
    return f"<h3>Configuration</h3>{config_table(result.config)}<h3>Run</h3>{meta_table(meta)}"


def summary_line(result: Any) -> str:
    """One line: sizes, chains × draws, sampler and the main hyperparameters (plain text)."""
    cfg = result.config
    secs = result.meta.get("sampling_seconds")
    wall = f" · sampling {secs:.1f} s" if isinstance(secs, int | float) else ""
    return (
        f"{result.num_train} training examples · {result.num_queries} queries · "
        f"{cfg.num_chains} chains × {cfg.num_draws} draws ({cfg.sampler}, "
        f"step={fmt_value(cfg.step_size)}, nβ={fmt_value(cfg.nbeta)}, "
        f"γ={fmt_value(cfg.gamma)}, damping γ/nβ={fmt_value(cfg.damping)}){wall}"
    )
