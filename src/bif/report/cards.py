"""One training example as a card: its view (if any) and everything the result knows about it.

Every card has the same rows whether or not the example has an image or a text: the index and
caption, the score ± stderr, the example's training loss at w*, and z = score / stderr with a
verdict, so cards of a tabular result (no view at all) are as informative as the demo's digit
cards and line up in an even grid (see ``.examples`` in :mod:`bif.report.style`).
"""

from __future__ import annotations

import html
import math
from typing import Any

from bif.report.meta import fmt_number
from bif.report.views import ExampleView, ViewSource, get_view, png_data_uri

e = html.escape


def score_text(score: float, stderr: float) -> str:
    """``"+1.23e-05 ± 4.5e-06"``: the score to 3 digits, its standard error to 2."""
    se = f"{stderr:.2g}" if math.isfinite(stderr) else "n/a"
    return f"{score:+.3g} ± {se}"


def z_text(score: float, stderr: float, num_chains: int | None = None) -> tuple[str, bool]:
    """The card's last row and whether |score| ≥ 2 stderr (distinguishable from zero)."""
    if not (math.isfinite(stderr) and stderr > 0):
        why = f"{num_chains} chain" if num_chains == 1 else "no stderr"
        return f"z n/a ({why})", False
    z = score / stderr
    clear = abs(z) >= 2
    return f"z {z:+.2f} · " + ("distinct from 0" if clear else "within noise"), clear


def view_body(view: ExampleView, alt: str, img_class: str = "") -> str:
    parts = []
    if view.image is not None:
        cls = f' class="{img_class}"' if img_class else ""
        parts.append(f'<img{cls} src="{png_data_uri(view.image, view.cmap)}" alt="{e(alt)}">')
    if view.text is not None:
        parts.append(f'<pre class="example-text">{e(view.text)}</pre>')
    return "".join(parts)


def tags(view: ExampleView) -> str:
    return "".join(f'<span class="tag tag-{e(t)}">{e(t)}</span>' for t in view.tags)


def train_example(
    index: int,
    score: float,
    stderr: float,
    view: ExampleView,
    kind: str,
    loss_star: float | None = None,
    correlation: float | None = None,
    num_chains: int | None = None,
) -> str:
    """One training example card (``kind``: proponent, opponent or self-influence).

    Args:
        index, score, stderr: the example and its score (``data-*`` attributes keep the
            full-precision ``repr``).
        view: its image/text/caption/tags (an empty view for indices only).
        kind: CSS class and meaning of the score.
        loss_star: the example's training loss at w* (``result.train_loss_star[index]``).
        correlation: Corr(ℓ_i, φ) for the tooltip.
        num_chains: to explain a missing standard error.
    """
    z, clear = z_text(score, stderr, num_chains)
    weak = math.isfinite(stderr) and not clear
    cls = f"train-example {kind}" + (" not-significant" if weak else "")
    cls += " has-view" if view.image is not None or view.text is not None else " stats-only"
    caption = f' · <span class="caption">{e(view.caption)}</span>' if view.caption else ""
    loss = "" if loss_star is None else fmt_number(loss_star)
    tip = f"training example {index}" + (f" ({view.caption})" if view.caption else "")
    if correlation is not None and math.isfinite(correlation):
        tip += f"; correlation of its loss with the query's φ: {correlation:+.3f}"
    rows = [
        f'<span class="head"><span class="index">#{index}</span>{caption}</span>',
        f'<span class="tags">{tags(view)}</span>' if view.tags else "",
        f'<span class="score">{e(score_text(score, stderr))}</span>',
        f'<span class="loss-star">loss at w* {e(loss)}</span>' if loss else "",
        f'<span class="z">{e(z)}</span>',
    ]
    return (
        f'<figure class="{cls}" data-index="{index}" data-score="{score!r}" '
        f'data-stderr="{stderr!r}" data-distinct="{str(clear).lower()}" title="{e(tip)}">'
        f"{view_body(view, f'training example {index}')}"
        f"<figcaption>{''.join(rows)}</figcaption></figure>"
    )


def group(
    title: str, kind: str, items: list[Any], result: Any, q: int | None, views: ViewSource | None
) -> str:
    """A titled grid of cards for the ``items`` (``Influence`` objects) of query ``q``."""
    loss = result.train_loss_star
    cards = "".join(
        train_example(
            x.index, x.score, x.stderr, get_view(views, x.index), kind,
            loss_star=float(loss[x.index]),
            correlation=None if q is None else float(result.correlation[q, x.index]),
            num_chains=result.config.num_chains,
        )
        for x in items
    )  # fmt: skip
    if not cards:
        cards = '<p class="none">no training example has a score of this sign</p>'
    return f'<div class="group {kind}s"><h4>{title}</h4><div class="examples">{cards}</div></div>'
