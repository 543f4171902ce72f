"""Per-token influence heatmaps for language models: a self-contained HTML page.

Each query's text is shown token by token, coloured by the BIF of one selected training sequence
on each query token; below it, its top proponent and opponent training sequences are coloured
token by token by their BIF on the query's sequence-level loss. Sign convention (as everywhere
in bif): BIF = −Cov(train loss, query observable), so **negative (blue) = proponent** (training
on it lowers the query's loss) and **positive (red) = opponent**. Colours are computed here into
inline ``style="background: rgba(...)"`` (readable without JS); every token span carries
``data-score`` (``repr`` of the float, ``nan`` when not attributed) and a ``title`` tooltip.
Only a few lines of inline JS switch which passage colours the query (click a passage, or use
the drop-down). Stable hooks: ``article.token-query[data-query]``, ``.query-tokens span.tok``,
``.passage.proponent|opponent[data-index][data-score][data-stderr][data-key]``, ``span.tok``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bif import __version__
from bif.report.style import CSS

e = html.escape

NEGATIVE_RGB = (33, 102, 172)  # ColorBrewer RdBu blue: proponent (BIF < 0)
POSITIVE_RGB = (178, 24, 43)  # ColorBrewer RdBu red: opponent (BIF > 0)
NONE = '<p class="none">no training sequence of this sign</p>'
MAX_ALPHA = 0.75  # the strongest shade still leaves dark text readable

TOKEN_CSS = """
.token-report { --pro: rgb(33,102,172); --opp: rgb(178,24,43); }
.tokens { white-space: pre-wrap; word-break: break-word; font: 13px/1.7 ui-monospace, monospace;
          background: #fff; border: 1px solid var(--line); border-radius: 4px; padding: 6px;
          margin: 4px 0; max-height: 16em; overflow: auto; }
.tok { border-radius: 2px; }
.tok:hover { outline: 1px solid var(--ink); }
.tok.na { color: var(--muted); }
.token-query { background: #fff; border: 1px solid var(--line); border-radius: 8px;
               padding: 8px 14px; margin: 12px 0; }
.token-query h3 { margin-top: 4px; }
.passage { cursor: pointer; border: 2px solid transparent; border-radius: 6px; padding: 2px 6px;
           margin: 4px 0; }
.passage:hover { border-color: var(--line); }
.passage.selected { border-color: var(--ink); }
.passage.not-significant .passage-head { opacity: 0.6; }
.passage-head { font-size: 12px; font-variant-numeric: tabular-nums; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted);
          flex-wrap: wrap; margin: 4px 0; }
.legend .bar { width: 160px; height: 12px; border: 1px solid var(--line); border-radius: 2px; }
"""

SCRIPT = """
function bifSelect(passage) {
  const q = passage.closest('.token-query');
  const data = JSON.parse(passage.dataset.colouring);
  q.querySelectorAll('.query-tokens .tok').forEach((t, i) => {
    const [s, colour, title] = data[i];
    t.style.background = colour || '';
    t.classList.toggle('na', s === null);
    t.dataset.score = s === null ? 'nan' : String(s);
    t.title = title;
  });
  q.querySelectorAll('.passage').forEach(p => p.classList.toggle('selected', p === passage));
  const sel = q.querySelector('select.colour-by');
  if (sel) sel.value = passage.dataset.key;
}
document.addEventListener('click', ev => {
  const p = ev.target.closest && ev.target.closest('.passage');
  if (p) bifSelect(p);
});
document.addEventListener('change', ev => {
  if (!ev.target.matches('select.colour-by')) return;
  const q = ev.target.closest('.token-query');
  bifSelect(q.querySelector('.passage[data-key="' + ev.target.value + '"]'));
});
"""


@dataclass(frozen=True)
class TokenPassage:
    """One training sequence shown under a query.

    Attributes:
        index: training sequence index.
        tokens: display text of each token (their concatenation is the text).
        token_scores: per token, its BIF on the query's sequence-level loss (NaN: not attributed).
        score: sequence-level BIF (the nansum of ``token_scores``).
        stderr: its standard error (NaN when unknown).
        query_token_scores: per query token, the BIF of this whole sequence on that token's loss.
    """

    index: int
    tokens: list[str]
    token_scores: list[float]
    score: float
    stderr: float
    query_token_scores: list[float]


@dataclass(frozen=True)
class TokenQueryView:
    """One query: its tokens, per-token loss at the checkpoint, and its top passages.

    Attributes:
        index: query index.
        tokens: the query's tokens.
        loss: per-token loss at the checkpoint (NaN where not attributed), shown on hover.
        proponents: most negative sequence-level scores first.
        opponents: most positive first.
    """

    index: int
    tokens: list[str]
    loss: list[float]
    proponents: list[TokenPassage]
    opponents: list[TokenPassage]


def _finite(x: float) -> bool:
    return math.isfinite(float(x))


def token_colour(score: float, scale: float) -> str | None:
    """Diverging colour of ``score`` on the symmetric scale ±``scale`` (None: NaN, uncoloured).

    Blue for negative (proponent), red for positive (opponent); the opacity over the white page
    grows linearly with ``|score| / scale`` (clipped to 1) up to :data:`MAX_ALPHA`, so lightness
    is monotone in the magnitude and zero is white.
    """
    score = float(score)
    if not math.isfinite(score):
        return None
    t = min(1.0, abs(score) / scale) if scale > 0 and math.isfinite(scale) else 0.0
    r, g, b = NEGATIVE_RGB if score < 0 else POSITIVE_RGB
    return f"rgba({r}, {g}, {b}, {MAX_ALPHA * t:.3f})"


def _scale(rows: Sequence[Sequence[float]]) -> float:
    """max |score| over all finite values (1.0 when there is none, or all are zero)."""
    m = max((abs(float(s)) for row in rows for s in row if _finite(s)), default=0.0)
    return m if m > 0 else 1.0


def _num(x: float, fmt: str = "+.4g") -> str:
    return format(float(x), fmt) if _finite(x) else "n/a"


def _span(text: str, score: float, scale: float, title: str) -> str:
    colour = token_colour(score, scale)
    style = f' style="background: {colour}"' if colour else ""
    cls = "tok" if colour else "tok na"
    return (
        f'<span class="{cls}" data-score="{float(score)!r}" title="{e(title)}"{style}>'
        f"{e(text)}</span>"
    )


def _query_colouring(q: TokenQueryView, p: TokenPassage | None, scale: float) -> list[list[Any]]:
    """Per query token: [score or None, colour or None, tooltip] when ``p`` colours the query."""
    out: list[list[Any]] = []
    for i, tok in enumerate(q.tokens):
        s = float(p.query_token_scores[i]) if p is not None else math.nan
        tip = f"{tok!r} · loss {_num(q.loss[i], '.4g')}"
        if p is not None:
            tip += f" · BIF of train #{p.index} on this token: " + (
                _num(s) if _finite(s) else "not attributed"
            )
        out.append([s if math.isfinite(s) else None, token_colour(s, scale), tip])
    return out


def _passage(
    p: TokenPassage, kind: str, key: str, q: TokenQueryView, scales: tuple, selected: bool
) -> str:
    """One training sequence: header (index, score ± stderr) and its token heatmap."""
    if len(p.tokens) != len(p.token_scores):
        raise ValueError(f"train #{p.index}: {len(p.tokens)} tokens, {len(p.token_scores)} scores")
    if len(p.query_token_scores) != len(q.tokens):
        raise ValueError(f"train #{p.index}: query_token_scores must have one per query token")
    tok_scale, q_scale = scales
    spans = "".join(
        _span(t, s, tok_scale, f"{t!r} · BIF " + (_num(s) if _finite(s) else "not attributed"))
        for t, s in zip(p.tokens, p.token_scores, strict=True)
    )
    weak = _finite(p.stderr) and abs(p.score) < 2 * p.stderr
    cls = f"passage {kind}" + (" selected" if selected else "") + (" not-significant" * weak)
    data = e(json.dumps(_query_colouring(q, p, q_scale)))
    head = f"#{p.index} · BIF {_num(p.score, '+.3g')} ± {_num(p.stderr, '.2g')}"
    return (
        f'<div class="{cls}" data-key="{key}" '
        f'data-index="{p.index}" data-score="{float(p.score)!r}" '
        f'data-stderr="{float(p.stderr)!r}" data-colouring="{data}" tabindex="0">'
        f'<div class="passage-head">{e(head)}</div><pre class="tokens">{spans}</pre></div>'
    )


def _legend(scale: float, what: str) -> str:
    lo, hi = token_colour(-scale, scale), token_colour(scale, scale)
    bar = f"background: linear-gradient(to right, {lo}, rgba(255, 255, 255, 0), {hi})"
    return (
        f'<div class="legend"><span>{e(what)}:</span><span>{-scale:+.3g} (proponent)</span>'
        f'<span class="bar" style="{bar}"></span><span>{scale:+.3g} (opponent)</span></div>'
    )


def _query(q: TokenQueryView) -> str:
    if len(q.loss) != len(q.tokens):
        raise ValueError(f"query {q.index}: {len(q.tokens)} tokens but {len(q.loss)} losses")
    passages = [*q.proponents, *q.opponents]
    scales = (
        _scale([p.token_scores for p in passages]),
        _scale([p.query_token_scores for p in passages]),
    )
    keyed = [(p, "proponent", f"pro-{j}") for j, p in enumerate(q.proponents)]
    keyed += [(p, "opponent", f"opp-{j}") for j, p in enumerate(q.opponents)]
    colouring = _query_colouring(q, keyed[0][0] if keyed else None, scales[1])
    qspans = "".join(
        _span(t, math.nan if s is None else s, scales[1], tip)
        for t, (s, _, tip) in zip(q.tokens, colouring, strict=True)
    )
    options = "".join(
        f'<option value="{key}">{kind} #{p.index} ({_num(p.score, "+.3g")})</option>'
        for p, kind, key in keyed
    )
    control = (
        '<p class="muted">Query tokens coloured by the BIF on each token\'s loss of '
        f'<select class="colour-by">{options}</select> (or click a passage below).</p>'
        if keyed
        else '<p class="none">no passage to colour the query with</p>'
    )
    groups = []
    for kind, verb, sign in (("proponent", "lowers", "&lt;"), ("opponent", "raises", "&gt;")):
        items = "".join(_passage(*x, q, scales, x[2] == keyed[0][2]) for x in keyed if x[1] == kind)
        groups.append(
            f'<div class="group {kind}s"><h4>{kind.title()}s: BIF {sign} 0, training on them '
            f"{verb} this query's loss</h4>"
            f"{items or NONE}</div>"
        )
    return (
        f'<article class="token-query" id="query-{q.index}" data-query="{q.index}" '
        f'data-token-scale="{scales[0]!r}" data-query-scale="{scales[1]!r}">'
        f"<h3>Query {q.index}</h3>{control}{_legend(scales[1], 'query tokens')}"
        f'<pre class="tokens query-tokens">{qspans}</pre>'
        f"{_legend(scales[0], 'training tokens')}{''.join(groups)}</article>"
    )


def render_token_report(
    queries: list[TokenQueryView],
    title: str = "BIF per-token influence report",
    meta: dict | None = None,
    note: str | None = None,
) -> str:
    """The HTML page: each query's tokens, then its proponent and opponent sequences, as heatmaps.

    Args:
        queries: one view per query (see :class:`TokenQueryView`).
        title: page title.
        meta: key/value rows for a "Run" table (e.g. model, checkpoint, sampler settings).
        note: a line of free text under the title.

    Returns:
        The complete self-contained page (no external asset, works from ``file://``).
    """
    explainer = (
        '<section class="explainer"><h2>How to read this page</h2><p>Scores are Bayesian '
        "influence functions BIF = −Cov<sub>p</sub>(ℓ<sub>train</sub>(w), ℓ<sub>query</sub>(w))"
        " over weights w sampled around the checkpoint.</p><ul>"
        '<li><span class="pro">Blue = negative = proponent</span>: training on this token '
        "(or sequence) lowers the query's loss.</li>"
        '<li><span class="opp">Red = positive = opponent</span>: training on it raises it.</li>'
        "<li>Grey text, no colour: not attributed (prompt, padding, first token).</li>"
        "<li>Colour intensity ∝ |score| on one symmetric scale per query: training tokens use "
        "±max |token score| over that query's passages; query tokens use ±max |score of a "
        "passage on a query token| over the same passages. Hover a token for its score.</li>"
        "<li>± is one standard error; a faded header means |score| &lt; 2 standard errors.</li>"
        "</ul></section>"
    )
    rows = {"report made with bif": __version__, **(meta or {})}
    table = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in rows.items())
    body = "".join(_query(q) for q in queries)
    summary = f'<p class="summary">{e(note)}</p>' if note else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}{TOKEN_CSS}</style></head><body>"
        f'<main class="bif-report token-report" data-num-queries="{len(queries)}">'
        f"<header><h1>{e(title)}</h1>{summary}</header>{explainer}"
        f'<section class="queries"><h2>Queries</h2>{body}</section>'
        f'<section class="diagnostics"><h2>Run</h2><table class="meta"><thead><tr><th>key</th>'
        f"<th>value</th></tr></thead><tbody>{table}</tbody></table></section>"
        f"<footer>Generated by bif {e(__version__)}; self-contained (no network access needed)."
        f"</footer></main><script>{SCRIPT}</script></body></html>\n"
    )


def write_token_report(path: str | Path, queries: list[TokenQueryView], **kwargs: Any) -> Path:
    """Write :func:`render_token_report` (same keyword arguments) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_token_report(queries, **kwargs), encoding="utf-8")
    return path
