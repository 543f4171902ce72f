"""The pieces of the token heatmap page: diverging token colours, token spans, passages and one
query's article (the page around them is :mod:`bif.report.tokens`)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bif.report.meta import fmt_number

e = html.escape

NEGATIVE_RGB = (33, 102, 172)  # ColorBrewer RdBu blue: proponent (BIF < 0)
POSITIVE_RGB = (178, 24, 43)  # ColorBrewer RdBu red: opponent (BIF > 0)
NONE = '<p class="none">no training sequence of this sign</p>'
MAX_ALPHA = 0.75  # the strongest shade still leaves dark text readable


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
        loss_star: the sequence's training loss at the checkpoint (NaN: not shown).
    """

    index: int
    tokens: list[str]
    token_scores: list[float]
    score: float
    stderr: float
    query_token_scores: list[float]
    loss_star: float = math.nan


@dataclass(frozen=True)
class TokenQueryView:
    """One query: its tokens, per-token loss at the checkpoint, and its top passages.

    Attributes:
        index: query index.
        tokens: the query's tokens.
        loss: per-token loss at the checkpoint (NaN where not attributed), shown on hover.
        proponents: most negative sequence-level scores first.
        opponents: most positive first.
        value: the query's observable at the checkpoint (NaN: not shown).
    """

    index: int
    tokens: list[str]
    loss: list[float]
    proponents: list[TokenPassage]
    opponents: list[TokenPassage]
    value: float = math.nan


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
    if _finite(p.loss_star):
        head += f" · loss at w* {fmt_number(p.loss_star)}"
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


def query_article(q: TokenQueryView, phi: str = "loss", badge: str = "") -> str:
    """One query's article: its token heatmap, the colour switch, and its passages.

    ``badge``: HTML after the query's heading (the ``unresolved`` badge of
    :mod:`bif.report.verdict`); the article then carries ``data-unresolved="true"``.
    """
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
    value = (
        f' <span class="query-value">· {e(phi)} at w* {e(fmt_number(q.value))}</span>'
        if _finite(q.value)
        else ""
    )
    groups = []
    for kind, verb, sign in (("proponent", "lowers", "&lt;"), ("opponent", "raises", "&gt;")):
        items = "".join(_passage(*x, q, scales, x[2] == keyed[0][2]) for x in keyed if x[1] == kind)
        groups.append(
            f'<div class="group {kind}s"><h4>{kind.title()}s: BIF {sign} 0, training on them '
            f"{verb} this query's {e(phi)}</h4>"
            f"{items or NONE}</div>"
        )
    return (
        f'<article class="token-query" id="query-{q.index}" data-query="{q.index}" '
        f'data-token-scale="{scales[0]!r}" data-query-scale="{scales[1]!r}" '
        f'data-unresolved="{str(bool(badge)).lower()}">'
        f"<h3>Query {q.index}{value} {badge}</h3>{control}{_legend(scales[1], 'query tokens')}"
        f'<pre class="tokens query-tokens">{qspans}</pre>'
        f"{_legend(scales[0], 'training tokens')}{''.join(groups)}</article>"
    )
