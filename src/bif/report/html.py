"""A self-contained HTML page from a (saved) :class:`BIFResult` and per-example views.

The page needs no server and no external asset: images are inline PNG data URIs and the style
is inlined. All user-visible text goes through :func:`html.escape`. Without views (a tabular
result) every training example is still a full card: index, score ± stderr, its loss at w* and
whether the score is distinguishable from zero. Stable hooks for tests and scripts:

- ``main[data-k][data-num-queries][data-num-train][data-observable]``
- ``article.query[data-query][data-value]`` (``data-value``: the observable at w*)
- ``figure.train-example.proponent|opponent|self-influence`` with ``data-index``,
  ``data-score`` and ``data-stderr`` (full-precision ``repr`` of the floats) and
  ``data-distinct`` (``true`` when |score| ≥ 2 stderr); inside it ``.score`` (exactly
  ``score_text``), ``.loss-star`` and ``.z``; ``.examples`` is the grid holding the cards
- ``figure.plot[data-plot]`` (``step-loss``, ``draw-loss``, ``chains``; with diagnostics also
  ``figure.plot.trace-plot``: ``draw-loss-chains``, ``query-traces``)
- ``div.verdict[data-verdict]`` under the page's header, ``table.diagnostics-table``, and
  ``span.badge.unresolved`` in the query card of an unresolved query (``article.query`` then has
  ``data-unresolved="true"``); see :mod:`bif.report.verdict`
- ``table.config`` and ``table.meta``, rows ``tr[data-key]`` (see :mod:`bif.report.meta`)
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bif._version import __version__
from bif.report.cards import group, tags, train_example, view_body
from bif.report.diagnostics import (
    banner_html,
    chain_diagnostics_html,
    diagnostics,
    observable_name,
    plots_html,
    run_tables,
    summary_line,
)
from bif.report.meta import fmt_number
from bif.report.style import CSS
from bif.report.verdict import is_unresolved, unresolved_badge
from bif.report.views import ViewSource, get_view

e = html.escape

__all__ = ["render_report", "train_example", "write_report"]


def _query(
    result: Any, q: int, k: int, views: tuple[Any, Any], observable: str, diag: Any = None
) -> str:
    train_views, query_views = views
    view = get_view(query_views, q)
    top = result.top(q, k)
    value = float(result.query_star[q])
    body = view_body(view, f"query {q}", "query-image")
    figure = (
        f'<figure class="example query-example">{body}<figcaption>{e(view.caption)}'
        "</figcaption></figure>"
        if body or view.caption
        else ""
    )
    card = (
        f'<div class="query-card"><h3>Query {q} {unresolved_badge(diag, q)}</h3>{figure}'
        f"{tags(view)}"
        f"<dl><dt>{e(observable)} at w*</dt><dd>{e(fmt_number(value))}</dd></dl></div>"
    )
    phi = e(observable)
    pro = group(
        f"Top {k} proponents: BIF &lt; 0, training on them lowers this query's {phi}",
        "proponent", top.proponents, result, q, train_views,
    )  # fmt: skip
    opp = group(
        f"Top {k} opponents: BIF &gt; 0, training on them raises this query's {phi}",
        "opponent", top.opponents, result, q, train_views,
    )  # fmt: skip
    return (
        f'<article class="query" id="query-{q}" data-query="{q}" data-value="{value!r}" '
        f'data-unresolved="{str(is_unresolved(diag, q)).lower()}">'
        f'{card}<div class="influences">{pro}{opp}</div></article>'
    )


def _self_influence(result: Any, k: int, train_views: ViewSource | None) -> str:
    si, si_se = result.self_influence, result.self_influence_stderr
    order = si.argsort()[: min(k, result.num_train)].tolist()  # most negative = largest Var
    cards = "".join(
        train_example(
            i, float(si[i]), float(si_se[i]), get_view(train_views, i), "self-influence",
            loss_star=float(result.train_loss_star[i]), num_chains=result.config.num_chains,
        )
        for i in order
    )  # fmt: skip
    return (
        "<h3>Largest self-influence (possible mislabels or unusual examples)</h3>"
        '<p class="muted">Self-influence is −Var<sub>p</sub>(ℓ<sub>i</sub>): the most negative '
        "values belong to the examples whose loss the posterior is least sure about, which "
        "are often mislabelled, ambiguous or atypical.</p>"
        f'<div class="examples self-influence-list">{cards}</div>'
    )


def _explainer(num_chains: int, phi: str) -> str:
    return (
        '<section class="explainer"><h2>How to read this page</h2>'
        "<p>Each score is the Bayesian influence function "
        f"BIF = −Cov<sub>p</sub>(ℓ<sub>i</sub>(w), φ(w)) of training example <i>i</i> "
        f"on the query's observable φ = <b>{phi}</b>, over weights w sampled "
        "around the trained checkpoint w* (local posterior).</p><ul>"
        f'<li><span class="pro">Negative = proponent</span>: training on this example lowers '
        f"the query's {phi}.</li>"
        f'<li><span class="opp">Positive = opponent</span>: training on it raises the '
        f"query's {phi}.</li>"
        f"<li>± is one standard error from the spread across the {num_chains} chains; "
        "z = score / standard error. Faded cards have |z| &lt; 2 (“within noise”: not "
        "distinguishable from zero).</li>"
        "<li>“loss at w*” on a card is that training example's own loss at the checkpoint; "
        f"under each query number is its {phi} at w*.</li></ul></section>"
    )


def render_report(
    result: Any,
    train_views: ViewSource | None = None,
    query_views: ViewSource | None = None,
    *,
    k: int = 5,
    title: str = "BIF attribution report",
    extra_meta: Mapping[str, Any] | None = None,
    observable: str | None = None,
) -> str:
    """The HTML page of ``result``: every query beside its top proponents and opponents.

    Args:
        result: a :class:`bif.BIFResult` (typically ``BIFResult.load(dir)``).
        train_views: view of each training example (index 0..N-1), or None for indices only.
        query_views: view of each query (index 0..Q-1), or None.
        k: proponents, opponents and self-influence examples shown per list.
        title: page title.
        extra_meta: more key/value rows for the "Run" table (e.g. the demo's test accuracy).
        observable: name of the query observable φ in the text; None: the name
            :func:`bif.attribute` stored in ``result.meta["observable"]`` (else "loss").

    Returns:
        The complete page as a string.
    """
    k = max(1, int(k))
    phi = observable_name(result, observable)
    meta = {**result.meta, "report made with bif": __version__, **(extra_meta or {})}
    views = (train_views, query_views)
    diag = diagnostics(result)
    queries = "".join(_query(result, q, k, views, phi, diag) for q in range(result.num_queries))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f'<main class="bif-report" data-k="{k}" data-num-queries="{result.num_queries}" '
        f'data-num-train="{result.num_train}" data-observable="{e(phi)}"><header>'
        f'<h1>{e(title)}</h1><p class="summary">{e(summary_line(result))}</p></header>'
        f"{banner_html(result)}{_explainer(result.config.num_chains, e(phi))}"
        f'<section class="queries"><h2>Queries</h2>{queries}</section>'
        '<section class="diagnostics"><h2>Diagnostics</h2>'
        f"{chain_diagnostics_html(result)}<h3>Sampler loss traces</h3>{plots_html(result)}"
        f"{_self_influence(result, k, train_views)}{run_tables(result, meta)}</section>"
        f"<footer>Generated by bif {e(__version__)} from a saved result; self-contained "
        "(no network access needed).</footer></main></body></html>\n"
    )


def write_report(path: str | Path, result: Any, *args: Any, **kwargs: Any) -> Path:
    """Render :func:`render_report` (same arguments) into the file ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result, *args, **kwargs), encoding="utf-8")
    return path
