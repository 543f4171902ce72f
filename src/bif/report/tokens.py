"""Per-token influence heatmaps for language models: a self-contained HTML page.

Each query's text is shown token by token, coloured by the BIF of one selected training sequence
on each query token; below it, its top proponent and opponent training sequences are coloured
token by token by their BIF on the query's sequence-level loss. Sign convention (as everywhere
in bif): BIF = −Cov(train loss, query observable), so **negative (blue) = proponent** (training
on it lowers the query's loss) and **positive (red) = opponent**. Colours are computed here into
inline ``style="background: rgba(...)"`` (readable without JS); every token span carries
``data-score`` (``repr`` of the float, ``nan`` when not attributed) and a ``title`` tooltip.
Only a few lines of inline JS switch which passage colours the query (click a passage, or use
the drop-down). Given the result, the page also carries the loss trace plots, configuration and
run tables of :mod:`bif.report.diagnostics`. Stable hooks: ``article.token-query[data-query]``,
``.query-tokens span.tok``, ``.passage.proponent|opponent[data-index][data-score][data-stderr]
[data-key]``, ``span.tok``, ``main[data-observable]``, ``main.positional`` with
``section.notice.missing-text`` when the token text was not saved, and the hooks of
:mod:`bif.report.html` for ``figure.plot``, the tables and the diagnostics
(``div.verdict[data-verdict]``, ``table.diagnostics-table``, ``span.badge.unresolved``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from bif._version import __version__
from bif.report.diagnostics import (
    banner_html,
    chain_diagnostics_html,
    diagnostics,
    plots_html,
    run_tables,
    summary_line,
)
from bif.report.heatmap import (
    MAX_ALPHA,
    NEGATIVE_RGB,
    POSITIVE_RGB,
    TokenPassage,
    TokenQueryView,
    query_article,
    token_colour,
)
from bif.report.meta import meta_table
from bif.report.style import CSS, TOKEN_CSS, TOKEN_SCRIPT
from bif.report.verdict import unresolved_badge

e = html.escape

__all__ = [
    "MAX_ALPHA",
    "NEGATIVE_RGB",
    "POSITIVE_RGB",
    "TokenPassage",
    "TokenQueryView",
    "render_token_report",
    "token_colour",
    "write_token_report",
]


def _explainer(phi: str) -> str:
    return (
        '<section class="explainer"><h2>How to read this page</h2><p>Scores are Bayesian '
        "influence functions BIF = −Cov<sub>p</sub>(ℓ<sub>train</sub>(w), φ(w)) over weights w "
        f"sampled around the checkpoint; φ is the query's <b>{phi}</b>, and a single query "
        "token's φ is that token's loss.</p><ul>"
        '<li><span class="pro">Blue = negative = proponent</span>: training on this token '
        f"(or sequence) lowers the query's {phi}.</li>"
        '<li><span class="opp">Red = positive = opponent</span>: training on it raises it.</li>'
        "<li>Grey text, no colour: not attributed (prompt, padding, first token).</li>"
        "<li>Colour intensity ∝ |score| on one symmetric scale per query: training tokens use "
        "±max |token score| over that query's passages; query tokens use ±max |score of a "
        "passage on a query token| over the same passages. Hover a token for its score.</li>"
        "<li>± is one standard error; a faded header means |score| &lt; 2 standard errors.</li>"
        "</ul></section>"
    )


def _missing_text_notice(result_dir: str) -> str:
    """How to get words instead of positions: one call next to the attribution."""
    d = json.dumps(result_dir)
    return (
        '<section class="notice missing-text"><h2>Token text not saved</h2><p>This result '
        "has per-token traces but no token text (<code>lm.json</code>) next to it, so every "
        "token is shown by its <b>position</b> in its sequence. To see the words, save the "
        "text once with the tokenizer and the encoded batches you gave "
        "<code>bif.attribute</code>, then run <code>bif report</code> again:</p>"
        f"<pre>from bif.lm import save_lm_text\nsave_lm_text({e(d)}, tokenizer, train, "
        "query)\n# then: bif report " + e(result_dir) + "</pre>"
        "<p>(<code>save_token_text</code> takes the token strings themselves, if you have "
        "them.)</p></section>"
    )


def render_token_report(
    queries: list[TokenQueryView],
    title: str = "BIF per-token influence report",
    meta: dict | None = None,
    note: str | None = None,
    *,
    result: Any = None,
    observable: str = "loss",
    missing_text: str | None = None,
) -> str:
    """The HTML page: each query's tokens, then its proponent and opponent sequences, as heatmaps.

    Args:
        queries: one view per query (see :class:`TokenQueryView`).
        title: page title.
        meta: key/value rows for a "Run" table (e.g. model, checkpoint, sampler settings).
        note: a line of free text under the title.
        result: the :class:`bif.BIFResult` the views come from: adds its verdict banner,
            summary line, chain diagnostics, loss trace plots, configuration and ``meta``
            (before ``meta``'s rows) to the page, and marks its unresolved queries.
        observable: the name of the queries' φ in the text.
        missing_text: the result directory when its token text is missing: tokens are then
            positions, and the page says how to save the text.

    Returns:
        The complete self-contained page (no external asset, works from ``file://``).
    """
    rows = {"report made with bif": __version__, **(meta or {})}
    diag, banner = None, ""
    if result is not None:
        rows = {**result.meta, **rows}
        diag, banner = diagnostics(result), banner_html(result)
        section = (
            '<section class="diagnostics"><h2>Diagnostics</h2>'
            f"{chain_diagnostics_html(result)}<h3>Sampler loss traces</h3>"
            f"{plots_html(result)}{run_tables(result, rows)}</section>"
        )
        note = summary_line(result) + (f" · {note}" if note else "")
    else:
        section = f'<section class="diagnostics"><h2>Run</h2>{meta_table(rows)}</section>'
    body = "".join(query_article(q, observable, unresolved_badge(diag, q.index)) for q in queries)
    summary = f'<p class="summary">{e(note)}</p>' if note else ""
    notice = _missing_text_notice(missing_text) if missing_text is not None else ""
    cls = "bif-report token-report" + (" positional" if missing_text is not None else "")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}{TOKEN_CSS}</style></head><body>"
        f'<main class="{cls}" data-num-queries="{len(queries)}" '
        f'data-observable="{e(observable)}">'
        f"<header><h1>{e(title)}</h1>{summary}</header>{banner}{notice}"
        f"{_explainer(e(observable))}"
        f'<section class="queries"><h2>Queries</h2>{body}</section>{section}'
        f"<footer>Generated by bif {e(__version__)}; self-contained (no network access needed)."
        f"</footer></main><script>{TOKEN_SCRIPT}</script></body></html>\n"
    )


def write_token_report(path: str | Path, queries: list[TokenQueryView], **kwargs: Any) -> Path:
    """Write :func:`render_token_report` (same keyword arguments) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_token_report(queries, **kwargs), encoding="utf-8")
    return path
