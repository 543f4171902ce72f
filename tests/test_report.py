"""The HTML report: unit checks on a hand-made result, and the demo's page in a real browser."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bif import BIFConfig, BIFResult
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
    assert plots == ["step-loss", "draw-loss", "chains"]
