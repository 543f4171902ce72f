"""The HTML report: unit checks on a hand-made result, and the demo's page in a real browser."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bif import BIFConfig, BIFResult
from bif.diagnostics import Reason, diagnose
from bif.report import ExampleView, render_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _result(num_chains: int = 2) -> BIFResult:
    """A small result with hand-set scores: query 0 has proponents 1, 3 and opponents 2, 0."""
    scores = torch.tensor([[0.5, -2.0, 1.0, -0.25], [0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    stderr = torch.full_like(scores, math.nan if num_chains < 2 else 0.1)
    c, d, t = num_chains, 3, 5
    return BIFResult(
        scores=scores,
        stderr=stderr,
        correlation=scores.clamp(-1, 1),
        self_influence=torch.tensor([-1.0, -4.0, -2.0, -3.0], dtype=torch.float64),
        self_influence_stderr=torch.full((4,), 0.5, dtype=torch.float64),
        draw_loss=torch.rand(c, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        step_loss=torch.rand(c, t, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        query_trace=torch.zeros(c, d, 2, dtype=torch.float64),
        train_loss_star=torch.full((4,), 0.2, dtype=torch.float64),
        query_star=torch.tensor([0.7, 1.5], dtype=torch.float64),
        config=BIFConfig(num_chains=num_chains, num_draws=d, num_burnin=2, thin=1),
        meta={"note": "<b>meta</b>"},
    )


def test_render_orders_escapes_and_embeds() -> None:
    views = [ExampleView("<script>alert(1)</script>", image=np.eye(3)) for _ in range(4)]
    qviews = [ExampleView("q & a", text="tokens <here>", tags=("misclassified",))] * 2
    html = render_report(_result(), views, qviews, k=2, extra_meta={"x": "<i>"})
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;meta&lt;/b&gt;" in html and "&lt;i&gt;" in html and "q &amp; a" in html
    assert '<pre class="example-text">tokens &lt;here&gt;</pre>' in html
    assert 'class="tag tag-misclassified"' in html
    # Self-contained: no external URL is loaded by the page.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    # Query 0: 2 proponents + 2 opponents; query 1: 1 opponent; 2 self-influence; 3 plots
    # (chain mean of the step and draw losses, and one panel per chain).
    assert html.count('src="data:image/png;base64,') == 4 + 1 + 2 + 3
    q0 = html.split('data-query="0"')[1].split('data-query="1"')[0]
    pro = re.findall(r'train-example proponent[^"]*" data-index="(\d+)"', q0)
    opp = re.findall(r'train-example opponent[^"]*" data-index="(\d+)"', q0)
    assert (pro, opp) == (["1", "3"], ["2", "0"])
    q1 = html.split('data-query="1"')[1]
    assert "no training example has a score of this sign" in q1  # no proponent at all
    si = re.findall(r'train-example self-influence[^"]*" data-index="(\d+)"', html)
    assert si == ["1", "3"]  # most negative self-influence first
    assert "-2 ± 0.1" in q0 and 'data-score="-2.0"' in q0


def test_render_without_views_and_without_stderr() -> None:
    html = render_report(_result(num_chains=1), k=5)
    assert 'class="query-image"' not in html and "± n/a" in html
    assert 'data-stderr="nan"' in html and not re.search(r'class="[^"]*not-significant', html)
    assert html.count('class="query"') == 2
    assert "z n/a (1 chain)" in html and '<figure class="plot" data-plot="chains"' not in html


def _diagnosed(verdict: str, unresolved: list[int]) -> BIFResult:
    """:func:`_result` with 40 draws of noise and diagnostics given ``verdict`` by hand, saved
    and reloaded (NaN as JSON null) as a page would see them."""
    r = _result()
    g = torch.Generator().manual_seed(2)
    r.draw_loss = torch.randn(2, 40, generator=g, dtype=torch.float64)
    r.query_trace = torch.randn(2, 40, 2, generator=g, dtype=torch.float64)
    diag = diagnose(r.draw_loss, r.query_trace, r.scores, 0.01 * r.scores.abs() + 1e-3)
    reasons = [Reason("warn", "drift", "the loss <drifts>", "raise num_burnin & wait")]
    reasons = [] if verdict == "ok" else reasons
    r.diagnostics = dataclasses.replace(diag, verdict=verdict, reasons=reasons,
                                        unresolved=unresolved)  # fmt: skip
    r.diagnostics = type(diag).from_dict(r.diagnostics.to_dict())
    return r


def test_render_verdict_banner_tables_and_badges() -> None:
    result = _diagnosed("warn", [1])
    html = render_report(result)
    rel = result.diagnostics.query["relative_mcse"][1]
    assert html.index('<div class="verdict verdict-warn" data-verdict="warn"') < html.index(
        'class="explainer"'
    )  # at the top, before the explainer and the queries
    assert 'data-check="drift"' in html and "the loss &lt;drifts&gt;" in html
    assert "raise num_burnin &amp; wait" in html and "<drifts>" not in html
    q0 = html.split('data-query="0"')[1].split('data-query="1"')[0]
    q1 = html.split('<article class="query" id="query-1"')[1].split("</article>")[0]
    assert 'data-unresolved="false"' in q0 and 'class="badge unresolved"' not in q0
    assert 'data-unresolved="true"' in q1 and 'class="badge unresolved" title="unresolved:' in q1
    assert f"top-5 scores is {100 * rel:.0f}% of their size, above 10%" in q1
    assert html.count('<table class="diagnostics-table"') == 2
    groups = re.findall(r'<tr data-group="(\w+)">', html)
    assert groups == ["draw_loss", "query"]
    rows = re.findall(r'<tr data-query="(\d)" data-unresolved="(\w+)"', html)
    assert rows == [("0", "false"), ("1", "true")]
    assert re.findall(r'figure class="plot trace-plot" data-plot="([\w-]+)"', html) == [
        "draw-loss-chains", "query-traces",
    ]  # fmt: skip
    # ok: green and short (no findings list).
    ok = render_report(_diagnosed("ok", []))
    banner = ok.split('<div class="verdict verdict-ok" data-verdict="ok"')[1].split("</div>")[0]
    assert "Diagnostics: ok" in banner and "<ul" not in banner
    assert 'class="badge unresolved"' not in ok


def test_render_without_diagnostics_is_neutral() -> None:
    html = render_report(_result())
    assert 'data-verdict="none"' in html and "No chain diagnostics recorded" in html
    assert '<table class="diagnostics-table"' not in html and 'class="plot trace-plot"' not in html
    assert "bif diagnose RESULT_DIR" in html and 'class="badge' not in html


def _launch(playwright):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: apt-get install chromium (or `make browser`)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.mark.browser
def test_demo_report_in_browser(demo_run, tmp_path) -> None:
    """Open the demo's report.html in headless chromium and check what is actually rendered."""
    sync_api = pytest.importorskip("playwright.sync_api")
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    result = BIFResult.load(demo_run.result_dir)
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(demo_run.report.as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            imgs = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.className, e.complete, e.naturalWidth])"
            )
            k = int(page.get_attribute("main", "data-k"))
            queries = page.eval_on_selector_all(
                "article.query",
                """els => els.map(q => ({
                    q: +q.dataset.query,
                    images: q.querySelectorAll('img.query-image').length,
                    groups: ['proponent', 'opponent'].map(kind =>
                        [...q.querySelectorAll('figure.train-example.' + kind)].map(f => ({
                            index: +f.dataset.index, score: +f.dataset.score,
                            stderr: +f.dataset.stderr, text: f.querySelector('.score').innerText,
                            img: f.querySelector('img').naturalWidth,
                        }))),
                }))""",
            )
            si = page.eval_on_selector_all(
                "figure.train-example.self-influence", "els => els.map(e => +e.dataset.index)"
            )
            plots = page.eval_on_selector_all("figure.plot", "els => els.map(e => e.dataset.plot)")
            banner = page.locator("div.verdict")
            verdict = (banner.get_attribute("data-verdict"), banner.is_visible(),
                       banner.inner_text(), banner.bounding_box()["y"])  # fmt: skip
            first_query_y = page.locator("article.query").first.bounding_box()["y"]
            traces = page.eval_on_selector_all(
                "figure.plot.trace-plot",
                "els => els.map(f => [f.dataset.plot, f.querySelector('img').naturalWidth,"
                " f.checkVisibility()])",
            )
            groups = page.eval_on_selector_all(
                "table.diagnostics-table[data-table=groups] tbody tr",
                "els => els.map(r => [r.dataset.group, r.cells.length])",
            )
            per_query = page.eval_on_selector_all(
                "table.diagnostics-table[data-table=queries] tbody tr",
                "els => els.map(r => [+r.dataset.query, r.dataset.unresolved,"
                " [...r.cells].map(c => c.innerText)])",
            )
            badges = page.eval_on_selector_all(
                "article.query .badge.unresolved",
                "els => els.map(b => +b.closest('article').dataset.query)",
            )
        finally:
            browser.close()

    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    # Every image (queries, training examples, plots) decoded: complete with a real width.
    assert imgs and all(done and width > 0 for _, done, width in imgs), imgs
    assert sum(cls == "query-image" for cls, _, _ in imgs) == result.num_queries
    assert k == 5 and [x["q"] for x in queries] == list(range(result.num_queries))
    for x in queries:
        q = x["q"]
        assert x["images"] == 1
        top = result.top(q, k)
        for shown, expected in zip(x["groups"], (top.proponents, top.opponents), strict=True):
            assert [s["index"] for s in shown] == [e.index for e in expected]
            for s in shown:
                assert s["img"] > 0
                assert s["score"] == pytest.approx(float(result.scores[q, s["index"]]), rel=1e-12)
                assert s["stderr"] == pytest.approx(float(result.stderr[q, s["index"]]), rel=1e-12)
                assert s["text"] == f"{s['score']:+.3g} ± {s['stderr']:.2g}"
    assert si == result.self_influence.argsort()[:k].tolist()
    assert plots == ["draw-loss-chains", "query-traces", "step-loss", "draw-loss", "chains"]
    # Chain diagnostics: the verdict at the top, per-chain traces, the R-hat/ESS tables.
    diag = result.diagnostics
    assert diag is not None
    assert verdict[0] == diag.verdict and verdict[1] and verdict[3] < first_query_y
    assert f"Diagnostics: {diag.verdict}" in verdict[2]
    for r in diag.reasons:
        assert r.message in verdict[2] and r.fix in verdict[2]
    assert [t[0] for t in traces] == ["draw-loss-chains", "query-traces"]
    assert all(width > 0 and shown for _, width, shown in traces), traces
    assert groups[0][0] == "draw_loss" and sorted(groups) == sorted([n, 7] for n in diag.summary)
    assert [r[0] for r in per_query] == list(range(result.num_queries))
    for q, unresolved, cells in per_query:
        assert unresolved == str(q in diag.unresolved).lower()
        assert cells[1] == f"{diag.query['rhat'][q]:.3f}"
        assert cells[3] == f"{100 * diag.query['relative_mcse'][q]:.1f}"
        assert cells[4] == ("unresolved" if q in diag.unresolved else "resolved")
    assert badges == sorted(diag.unresolved)
