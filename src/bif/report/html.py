"""A self-contained HTML page from a (saved) :class:`BIFResult` and per-example views.

The page needs no server and no external asset: images are inline PNG data URIs and the style
is inlined. All user-visible text goes through :func:`html.escape`. Stable hooks for tests and
scripts: ``article.query[data-query]``, ``figure.train-example.proponent|opponent|self-influence``
with ``data-index``, ``data-score`` and ``data-stderr`` (full-precision ``repr`` of the floats),
``main[data-k][data-num-queries][data-num-train]`` and ``figure.plot[data-plot]``.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bif import __version__
from bif.config import BIFConfig
from bif.report.plots import loss_trace_plots
from bif.report.style import CSS
from bif.report.views import ExampleView, ViewSource, get_view, png_data_uri

e = html.escape


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _score_text(score: float, stderr: float) -> str:
    se = f"{stderr:.2g}" if math.isfinite(stderr) else "n/a"
    return f"{score:+.3g} ± {se}"


def _view_body(view: ExampleView, alt: str, img_class: str = "") -> str:
    parts = []
    if view.image is not None:
        cls = f' class="{img_class}"' if img_class else ""
        parts.append(f'<img{cls} src="{png_data_uri(view.image, view.cmap)}" alt="{e(alt)}">')
    if view.text is not None:
        parts.append(f'<pre class="example-text">{e(view.text)}</pre>')
    return "".join(parts)


def _tags(view: ExampleView) -> str:
    return "".join(f'<span class="tag tag-{e(t)}">{e(t)}</span>' for t in view.tags)


def train_example(index: int, score: float, stderr: float, view: ExampleView, kind: str) -> str:
    """One training example card (``kind``: proponent, opponent or self-influence)."""
    weak = math.isfinite(stderr) and abs(score) < 2 * stderr
    cls = f"train-example {kind}" + (" not-significant" if weak else "")
    caption = f'<span class="caption">{e(view.caption)}</span><br>' if view.caption else ""
    return (
        f'<figure class="{cls}" data-index="{index}" data-score="{score!r}" '
        f'data-stderr="{stderr!r}">{_view_body(view, f"training example {index}")}'
        f'<figcaption><span class="index">#{index}</span> {caption}{_tags(view)}'
        f'<span class="score">{e(_score_text(score, stderr))}</span></figcaption></figure>'
    )


def _group(title: str, kind: str, items: list[Any], train_views: ViewSource | None) -> str:
    cards = "".join(
        train_example(x.index, x.score, x.stderr, get_view(train_views, x.index), kind)
        for x in items
    )
    if not cards:
        cards = '<p class="none">no training example has a score of this sign</p>'
    return f'<div class="group {kind}s"><h4>{title}</h4><div class="examples">{cards}</div></div>'


def _query(result: Any, q: int, k: int, views: tuple[Any, Any], observable: str) -> str:
    train_views, query_views = views
    view = get_view(query_views, q)
    top = result.top(q, k)
    value = float(result.query_star[q])
    card = (
        f'<div class="query-card"><h3>Query {q}</h3>'
        f'<figure class="example query-example">{_view_body(view, f"query {q}", "query-image")}'
        f"<figcaption>{e(view.caption)}</figcaption></figure>{_tags(view)}"
        f"<dl><dt>{e(observable)} at w*</dt><dd>{e(_fmt(value))}</dd></dl></div>"
    )
    pro = _group(
        f"Top {k} proponents: BIF &lt; 0, training on them lowers this query's {e(observable)}",
        "proponent", top.proponents, train_views,
    )  # fmt: skip
    opp = _group(
        f"Top {k} opponents: BIF &gt; 0, training on them raises this query's {e(observable)}",
        "opponent", top.opponents, train_views,
    )  # fmt: skip
    return (
        f'<article class="query" id="query-{q}" data-query="{q}" data-value="{value!r}">'
        f'{card}<div class="influences">{pro}{opp}</div></article>'
    )


def _table(cls: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="value">{e(c)}</td>' if j == 1 else f"<td>{e(c)}</td>"
            for j, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _diagnostics(result: Any, k: int, train_views: ViewSource | None, meta: dict) -> str:
    plots = "".join(
        f'<figure class="plot" data-plot="{key}"><img src="{uri}" alt="{e(key)} plot">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for key, (uri, caption) in loss_trace_plots(result).items()
    )
    si, si_se = result.self_influence, result.self_influence_stderr
    order = si.argsort()[: min(k, result.num_train)].tolist()  # most negative = largest Var
    cards = "".join(
        train_example(i, float(si[i]), float(si_se[i]), get_view(train_views, i), "self-influence")
        for i in order
    )
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(BIFConfig)}
    cfg_rows = [(n, _fmt(v), helps.get(n, "")) for n, v in result.config.to_dict().items()]
    cfg_rows.append(("damping", _fmt(result.config.damping), "γ / nβ, as in a damped IF"))
    meta_rows = [(str(n), _fmt(v)) for n, v in meta.items()]
    return (
        '<section class="diagnostics"><h2>Diagnostics</h2>'
        f'<h3>Sampler loss traces</h3><div class="plots">{plots}</div>'
        f"<h3>Largest self-influence (possible mislabels or unusual examples)</h3>"
        '<p class="muted">Self-influence is −Var<sub>p</sub>(ℓ<sub>i</sub>): the most negative '
        "values belong to the examples whose loss the posterior is least sure about, which "
        "are often mislabelled, ambiguous or atypical.</p>"
        f'<div class="examples self-influence-list">{cards}</div>'
        f"<h3>Configuration</h3>{_table('config', ('field', 'value', 'meaning'), cfg_rows)}"
        f"<h3>Run</h3>{_table('meta', ('key', 'value'), meta_rows)}</section>"
    )


def render_report(
    result: Any,
    train_views: ViewSource | None = None,
    query_views: ViewSource | None = None,
    *,
    k: int = 5,
    title: str = "BIF attribution report",
    extra_meta: Mapping[str, Any] | None = None,
    observable: str = "loss",
) -> str:
    """The HTML page of ``result``: every query beside its top proponents and opponents.

    Args:
        result: a :class:`bif.BIFResult` (typically ``BIFResult.load(dir)``).
        train_views: view of each training example (index 0..N-1), or None for indices only.
        query_views: view of each query (index 0..Q-1), or None.
        k: proponents, opponents and self-influence examples shown per list.
        title: page title.
        extra_meta: more key/value rows for the "Run" table (e.g. the demo's test accuracy).
        observable: name of the query observable φ in the text ("loss", "margin", ...).

    Returns:
        The complete page as a string.
    """
    k = max(1, int(k))
    cfg = result.config
    meta = {**result.meta, "report made with bif": __version__, **(extra_meta or {})}
    secs = result.meta.get("sampling_seconds")
    wall = f" · sampling {secs:.1f} s" if isinstance(secs, int | float) else ""
    summary = (
        f"{result.num_train} training examples · {result.num_queries} queries · "
        f"{cfg.num_chains} chains × {cfg.num_draws} draws ({cfg.sampler}, "
        f"step={_fmt(cfg.step_size)}, "
        f"nβ={_fmt(cfg.nbeta)}, γ={_fmt(cfg.gamma)}, damping γ/nβ={_fmt(cfg.damping)}){wall}"
    )
    phi = e(observable)
    explainer = (
        '<section class="explainer"><h2>How to read this page</h2>'
        "<p>Each score is the Bayesian influence function "
        f"BIF = −Cov<sub>p</sub>(ℓ<sub>i</sub>(w), φ(w)) of training example <i>i</i> "
        f"on the query's {phi} φ, over weights w sampled "
        "around the trained checkpoint w* (local SGLD posterior).</p><ul>"
        f'<li><span class="pro">Negative = proponent</span>: training on this example lowers '
        f"the query's {phi} (it supports the model's answer).</li>"
        f'<li><span class="opp">Positive = opponent</span>: training on it raises the '
        f"query's {phi}.</li>"
        f"<li>± is one standard error from the spread across the {cfg.num_chains} chains; faded "
        "cards have |score| &lt; 2 standard errors (not distinguishable from zero).</li></ul>"
        "</section>"
    )
    views = (train_views, query_views)
    queries = "".join(_query(result, q, k, views, observable) for q in range(result.num_queries))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f'<main class="bif-report" data-k="{k}" data-num-queries="{result.num_queries}" '
        f'data-num-train="{result.num_train}"><header><h1>{e(title)}</h1>'
        f'<p class="summary">{e(summary)}</p></header>{explainer}'
        f'<section class="queries"><h2>Queries</h2>{queries}</section>'
        f"{_diagnostics(result, k, train_views, meta)}"
        f"<footer>Generated by bif {e(__version__)} from a saved result; self-contained "
        "(no network access needed).</footer></main></body></html>\n"
    )


def write_report(path: str | Path, result: Any, *args: Any, **kwargs: Any) -> Path:
    """Render :func:`render_report` (same arguments) into the file ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result, *args, **kwargs), encoding="utf-8")
    return path
