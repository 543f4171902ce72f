"""The diagnostics part of every report (example pages and token pages alike): the verdict banner,
per-chain trace plots and the R-hat/ESS tables (:mod:`bif.report.verdict`), loss trace plots, the
configuration and the run's meta, from a saved result only."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from bif.report.meta import config_table, fmt_value, meta_table
from bif.report.plots import chain_trace_plots, loss_trace_plots
from bif.report.verdict import diagnostics_tables, restore_nan, verdict_banner

e = html.escape


def observable_name(result: Any, observable: str | None = None) -> str:
    """What the queries' φ is called on the page: the explicit name, else the result's own
    (:attr:`bif.BIFResult.observable`, "loss" for results saved before it was recorded)."""
    return str(observable) if observable else result.observable


def _figures(plots: Mapping[str, tuple[str, str]], cls: str = "plot") -> str:
    return "".join(
        f'<figure class="{cls}" data-plot="{key}"><img src="{uri}" alt="{e(key)} plot">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for key, (uri, caption) in plots.items()
    )


def plots_html(result: Any) -> str:
    """The loss trace figures (``figure.plot[data-plot]``)."""
    return f'<div class="plots">{_figures(loss_trace_plots(result))}</div>'


def diagnostics(result: Any) -> Any:
    """The result's :class:`bif.diagnostics.Diagnostics` with its JSON nulls back to NaN, or
    None for a result saved without them."""
    return restore_nan(getattr(result, "diagnostics", None))


def banner_html(result: Any) -> str:
    """The verdict banner for the top of the page (``div.verdict[data-verdict]``)."""
    return verdict_banner(diagnostics(result), result.num_queries)


def chain_diagnostics_html(result: Any) -> str:
    """Per-chain trace plots (``figure.plot.trace-plot[data-plot]``: ``draw-loss-chains``,
    ``query-traces``) and the R-hat/ESS tables; a neutral line without diagnostics."""
    diag = diagnostics(result)
    if diag is None:
        return (
            '<div id="chain-diagnostics" class="chain-diagnostics none"><h3>Chain diagnostics'
            '</h3><p class="muted">No diagnostics recorded with this result; '
            "<code>bif diagnose RESULT_DIR</code> computes them from its saved traces.</p></div>"
        )
    plots = _figures(chain_trace_plots(result), "plot trace-plot")
    tables = diagnostics_tables(diag, result.config.num_chains, result.num_queries)
    method = result.meta.get("stderr_method")
    se = f'<p class="muted">Standard errors: {e(str(method))}.</p>' if method else ""
    return (
        f'<div id="chain-diagnostics" class="chain-diagnostics" data-verdict="{e(diag.verdict)}">'
        f"<h3>Chain diagnostics: {e(diag.verdict)}</h3>"
        f'<div class="plots">{plots}</div><h4>R-hat and effective sample sizes</h4>{tables}'
        f"{se}</div>"
    )


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
