"""The per-token heatmap report: unit checks on its HTML, and the page in a real browser."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bif.report.tokens import (
    MAX_ALPHA,
    TokenPassage,
    TokenQueryView,
    render_token_report,
    token_colour,
    write_token_report,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
NAN = math.nan
RGBA = re.compile(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\)")
SPAN = re.compile(
    r'<span class="(tok[^"]*)" data-score="([^"]+)" title="[^"]*"(?: style="([^"]*)")?>'
)


def _queries() -> list[TokenQueryView]:
    """Query 0: proponents #7, #3 and opponent #11; query 1: proponents #7, #5, no opponent."""
    q0_tokens = ["The", " cat", " sat", "\n", "<script>alert(1)</script>", " & dog"]
    a = TokenPassage(
        index=7,
        tokens=["Once", " upon", "\n", " a", " <b>time</b>"],
        token_scores=[NAN, -0.5, -0.05, -0.1, 0.2],
        score=-0.45,
        stderr=0.05,
        query_token_scores=[NAN, -0.3, -0.2, 0.1, -0.05, -0.01],
    )
    b = TokenPassage(
        3, ["x", " y", " z"], [NAN, -0.25, 0.0], -0.25, 0.2, [NAN, 0.1, 0.1, 0.1, 0, 0]
    )
    c = TokenPassage(
        index=11,
        tokens=["Cats", " hate", " mats"],
        token_scores=[NAN, 0.6, 0.3],
        score=0.9,
        stderr=NAN,
        query_token_scores=[NAN, 0.4, 0.2, -0.1, 0.3, 0.02],
    )
    q1_tokens = ["Hello", " world"]
    d = TokenPassage(7, ["Hi", " there"], [NAN, -1.0], -1.0, 0.1, [NAN, -0.7])
    f = TokenPassage(5, ["Yo"], [-0.5], -0.5, 0.1, [NAN, 0.35])
    return [
        TokenQueryView(0, q0_tokens, [NAN, 1.2, 0.8, 0.5, 2.0, 0.3], [a, b], [c]),
        TokenQueryView(1, q1_tokens, [NAN, 0.9], [d, f], []),
    ]


def _article(html: str, q: int) -> str:
    return html.split(f'<article class="token-query" id="query-{q}"')[1].split("</article>")[0]


def _passages(article: str) -> list[str]:
    return article.split('<div class="passage ')[1:]


def test_escaping_and_self_contained() -> None:
    html = render_token_report(_queries(), title="<t> & co", meta={"model": "<gpt>"}, note="n<1>")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the page's own small switcher
    assert "&lt;b&gt;time&lt;/b&gt;" in html and "<b>time" not in html
    assert "&lt;t&gt; &amp; co" in html and "&lt;gpt&gt;" in html and "n&lt;1&gt;" in html
    assert "> &amp; dog</span>" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert not re.search(r"https?://|@import|url\(", html)


def test_tokens_counts_nan_and_colours() -> None:
    queries = _queries()
    html = render_token_report(queries)
    for q in queries:
        art = _article(html, q.index)
        passages = [*q.proponents, *q.opponents]
        chunks = _passages(art)
        assert len(chunks) == len(passages)
        for p, chunk in zip(passages, chunks, strict=True):
            spans = SPAN.findall(chunk)
            assert len(spans) == len(p.tokens)
            assert [float(s) for _, s, _ in spans] == pytest.approx(p.token_scores, nan_ok=True)
            assert f'data-index="{p.index}"' in chunk
        scale = float(re.search(r'data-token-scale="([^"]+)"', art).group(1))
        assert scale == max(abs(s) for p in passages for s in p.token_scores if s == s)
        spans = [s for c in chunks for s in SPAN.findall(c)]
        for cls, score, style in spans:
            s = float(score)
            if math.isnan(s):  # not attributed: greyed, no colour at all
                assert cls == "tok na" and style == ""
                continue
            r, _, b, alpha = map(float, RGBA.search(style).groups())
            assert cls == "tok" and alpha == pytest.approx(MAX_ALPHA * abs(s) / scale, abs=1e-3)
            if s < 0:
                assert b > r  # blue: proponent
            elif s > 0:
                assert r > b  # red: opponent
        # The query is coloured by its top proponent at first (no JS needed to see it).
        qspans = SPAN.findall(art.split('class="tokens query-tokens">')[1].split("</pre>")[0])
        assert [float(s) for _, s, _ in qspans] == pytest.approx(
            passages[0].query_token_scores, nan_ok=True
        )
    assert "no training sequence of this sign" in _article(html, 1)  # no opponent for query 1


def test_colour_is_monotone_and_signed() -> None:
    mags = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0, 2.0]
    for sign in (-1.0, 1.0):
        cols = [RGBA.fullmatch(token_colour(sign * m, 1.0)).groups() for m in mags]
        alphas = [float(c[3]) for c in cols]
        assert alphas == sorted(alphas) and alphas[0] == 0 and alphas[-1] == MAX_ALPHA
        assert alphas[-1] == alphas[-2]  # clipped beyond the scale
        r, b = int(cols[1][0]), int(cols[1][2])
        assert (b > r) if sign < 0 else (r > b)
    assert token_colour(NAN, 1.0) is None
    assert float(RGBA.fullmatch(token_colour(1.0, 0.0)).group(4)) == 0  # degenerate scale


def test_write_and_length_checks(tmp_path) -> None:
    path = write_token_report(tmp_path / "a" / "b" / "tokens.html", _queries(), title="T")
    assert path.exists() and "<title>T</title>" in path.read_text(encoding="utf-8")
    q = _queries()[0]
    bad = TokenQueryView(0, q.tokens, q.loss[:-1], q.proponents, q.opponents)
    with pytest.raises(ValueError, match="losses"):
        render_token_report([bad])
    p = TokenPassage(1, ["a"], [0.1, 0.2], 0.3, NAN, [0.0] * len(q.tokens))
    with pytest.raises(ValueError, match="scores"):
        render_token_report([TokenQueryView(0, q.tokens, q.loss, [p], [])])
    assert "no passage to colour" in render_token_report([TokenQueryView(2, ["a"], [NAN], [], [])])


def _rgba(css: str) -> tuple[float, ...]:
    nums = [float(x) for x in re.findall(r"[\d.]+", css)]
    return tuple(nums) if len(nums) == 4 else (*nums, 1.0)


def _launch(playwright):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: apt-get install chromium (or `make browser`)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.mark.browser
def test_token_report_in_browser(tmp_path) -> None:
    """Open the page in headless chromium: spans render, colours follow the sign, switching."""
    sync_api = pytest.importorskip("playwright.sync_api")
    queries = _queries()
    path = write_token_report(tmp_path / "tokens.html", queries)
    tokens_js = """els => els.map(e => {
        const r = e.getBoundingClientRect();
        return {score: +e.dataset.score, bg: getComputedStyle(e).backgroundColor,
                title: e.title, w: r.width, h: r.height, text: e.textContent,
                visible: e.checkVisibility()};
    })"""
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / "tokens.png"), full_page=True)
            q0 = "#query-0"
            passages = [
                page.eval_on_selector_all(f"{q0} .passage[data-key='{k}'] .tok", tokens_js)
                for k in ("pro-0", "pro-1", "opp-0")
            ]
            before = page.eval_on_selector_all(f"{q0} .query-tokens .tok", tokens_js)
            page.hover(f"{q0} .passage[data-key='opp-0'] .tok >> nth=1")
            page.click(f"{q0} .passage[data-key='opp-0'] .passage-head")
            after = page.eval_on_selector_all(f"{q0} .query-tokens .tok", tokens_js)
            selected = page.eval_on_selector_all(
                f"{q0} .passage.selected", "els => els.map(e => e.dataset.key)"
            )
            select_value = page.input_value(f"{q0} select.colour-by")
            page.select_option("#query-1 select.colour-by", "pro-1")
            q1_after = page.eval_on_selector_all("#query-1 .query-tokens .tok", tokens_js)
        finally:
            browser.close()

    png = tmp_path / "tokens.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    given = [*queries[0].proponents, *queries[0].opponents]
    for shown, passage in zip(passages, given, strict=True):
        assert [t["text"] for t in shown] == passage.tokens  # whitespace kept, text unescaped
        for t, s in zip(shown, passage.token_scores, strict=True):
            assert t["visible"]
            if t["text"].strip():
                assert t["w"] > 0 and t["h"] > 0
            r, _, b, a = _rgba(t["bg"])
            if math.isnan(s):
                assert a == 0 and "not attributed" in t["title"]
            else:
                assert t["score"] == pytest.approx(s) and f"{s:+.4g}" in t["title"]
                if s < 0:
                    assert b > r + 50 and a > 0.05  # bluish
                elif s > 0:
                    assert r > b + 50 and a > 0.05  # reddish
    # Clicking the opponent recolours the query tokens with its per-query-token scores.
    assert [t["score"] for t in before[1:]] == pytest.approx(given[0].query_token_scores[1:])
    assert [t["score"] for t in after[1:]] == pytest.approx(given[2].query_token_scores[1:])
    assert [t["bg"] for t in after] != [t["bg"] for t in before]
    assert _rgba(after[1]["bg"])[0] > _rgba(after[1]["bg"])[2]  # +0.4 now: reddish
    assert _rgba(before[1]["bg"])[2] > _rgba(before[1]["bg"])[0]  # -0.3 before: bluish
    assert _rgba(after[0]["bg"])[3] == 0 and "loss n/a" in after[0]["title"]
    assert "#11" in after[1]["title"] and "+0.4" in after[1]["title"] and "1.2" in after[1]["title"]
    assert selected == ["opp-0"] and select_value == "opp-0"
    # The drop-down switches too (query 1, to its second proponent).
    assert q1_after[1]["score"] == pytest.approx(0.35) and "#5" in q1_after[1]["title"]
