"""`bif report` on every kind of saved result, each page checked in headless chromium.

Kinds: a classifier on feature vectors (no image, no text: cards with stats only), the digits
demo (images), a causal LM with its token text (lm.json) and one without it (tokens shown by
position, with instructions on the page). Every page shows the chain diagnostics: the verdict
banner, per-chain trace plots, the R-hat/ESS tables and badges on unresolved queries (checked
with hand-made failing and warning verdicts too, and for results saved without diagnostics).
Every page goes through the real CLI (`bif.cli.main(["report", DIR])`); results come from tiny
models in a few seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bif
from bif.cli import main
from bif.diagnostics import Reason
from bif.lm import CausalLMTask, encode
from bif.lm.text import load_token_text, save_lm_text
from bif.report.cards import score_text

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TINY = dict(num_chains=8, num_draws=12, num_burnin=6, thin=1, progress=False, precondition_rank=0)
# The preconditioner record a user reported as a raw dict (values as `bif.attribute` wrote them).
PRECONDITIONER = {
    "rank": 56, "hvps": 57, "localised_directions": 3,
    "localised_mu": [-0.008751310408115387, -0.0073636434972286224, -0.005998792592436075],
    "kmax_preconditioned": 0.9983753561973572, "kmin_preconditioned": 0.5052283704280853,
    "smallest_captured": 1.0152972438094505,
    "condition_unpreconditioned": 500.99999999999994, "seconds": 12.440456919999633,
}  # fmt: skip
TEXTS = ["To be, or not to be: that is the question.", "Whether tis nobler in the mind",
         "The slings and arrows of outrageous fortune", "Or to take arms against a sea",
         "And by opposing end them. To die", "No more; and by a sleep to say we end"]  # fmt: skip
QUERIES = ["HAMLET:\nTo sleep, perchance to dream.", "OPHELIA:\nGood my lord, how are you?"]


class CharTokenizer:
    """Printable ASCII, one token per character (ids 0..94): enough for encode and decode."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [min(94, max(0, ord(c) - 32)) for c in text.replace("\n", "~")]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids).replace("~", "\n")


class TinyLM(nn.Module):
    """Causal by construction: position s sees a running mean of the embeddings up to s."""

    def __init__(self, vocab: int = 95, hidden: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb, self.mix, self.out = (
            nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, vocab)
        )  # fmt: skip
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        h = self.emb(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(torch.tanh(self.mix(h.cumsum(1) / steps)))


@pytest.fixture(scope="module")
def tabular_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class MLP on 6 features, its margin explained; saved as a user would."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(34, 6, generator=g)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), 5e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    result = bif.attribute(
        model.eval(), (x[:30], y[:30]), (x[30:], y[30:]), observable="margin", **TINY
    )
    result.meta.setdefault("observable", "margin")  # written by bif.attribute once it names it
    result.meta["preconditioner"] = PRECONDITIONER
    return result.save(tmp_path_factory.mktemp("tabular") / "result")


@pytest.fixture(scope="module")
def lm_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny causal LM's per-token result, saved twice: with lm.json and without."""
    tok = CharTokenizer()
    train = encode(tok, TEXTS)
    query = encode(tok, QUERIES, prompts=[q.split("\n")[0] + "\n" for q in QUERIES])
    result = bif.attribute(
        TinyLM().eval(), train, query, task=CausalLMTask(pass_attention_mask=False),
        center_gradient=False, **{**TINY, "num_chains": 3},
    )  # fmt: skip
    root = tmp_path_factory.mktemp("lm")
    with_text = result.save(root / "with-text")
    save_lm_text(with_text, tok, train, query, title="tiny LM <report>", note="a note & more")
    return {"result": result, "with_text": with_text, "without_text": result.save(root / "bare")}


@pytest.fixture(scope="module")
def page_of():
    """Open a page in one shared headless chromium; returns ``open(path) -> page``."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: apt-get install chromium (or `make browser`)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        requests: list[str] = []

        def open_page(path: Path, shot: Path | None = None) -> Any:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            if shot is not None:
                page.screenshot(path=str(shot), full_page=True)
            return page

        try:
            yield open_page
        finally:
            browser.close()
        assert all(u.startswith(("file:", "data:")) for u in requests), requests


def _report(result_dir: Path, out: Path, *flags: str) -> Path:
    assert main(["report", str(result_dir), "--out", str(out), *flags]) == 0
    return out


CARDS_JS = """els => els.map(f => {
    const r = f.getBoundingClientRect();
    const t = s => (f.querySelector(s) || {}).innerText;
    return {x: r.x, y: r.y, w: r.width, h: r.height, visible: f.checkVisibility(),
            grid: f.parentElement.className, kind: f.className, index: +f.dataset.index,
            score: +f.dataset.score, stderr: +f.dataset.stderr, distinct: f.dataset.distinct,
            text: t('.score'), loss: t('.loss-star'), z: t('.z'),
            overflow: f.scrollHeight > f.clientHeight + 1,
            clipped: [...f.querySelectorAll('.score, .loss-star, .z')].some(
                s => s.scrollWidth > s.clientWidth + 1)};
})"""
PLOTS_JS = """els => els.map(f => [f.dataset.plot, f.querySelector('img').naturalWidth,
                                f.getBoundingClientRect().width])"""
CELLS_JS = "els => els.map(e => e.innerText)"


def _check_cards(cards: list[dict], result: bif.BIFResult) -> None:
    """Every card visible, of one size, laid out on an even grid, and carrying its numbers."""
    assert cards and all(c["visible"] and not c["overflow"] for c in cards)
    assert not [c for c in cards if c["clipped"]]  # the numbers are never cut off
    assert {c["grid"] for c in cards} <= {"examples", "examples self-influence-list"}
    sizes = {(round(c["w"], 1), round(c["h"], 1)) for c in cards}
    assert len(sizes) == 1, sizes  # equal widths and heights across every grid of the page
    w = cards[0]["w"]
    rows: dict[float, list[float]] = {}
    for c in cards:
        rows.setdefault(round(c["y"], 1), []).append(c["x"])
    pitches = {round(b - a, 1) for xs in rows.values() for a, b in itertools.pairwise(xs)}
    assert len(pitches) <= 1 and all(p >= w for p in pitches), pitches  # one column pitch
    for c in cards:
        assert c["text"] == score_text(c["score"], c["stderr"])
        i = c["index"]
        star = float(result.train_loss_star[i])
        assert c["loss"].startswith("loss at w* ") and float(c["loss"].split()[-1]) == (
            pytest.approx(star, rel=1e-3)
        )
        z = c["score"] / c["stderr"]
        assert c["z"].startswith(f"z {z:+.2f} · ")
        assert c["distinct"] == ("true" if abs(z) >= 2 else "false")
        assert c["z"].endswith("distinct from 0" if abs(z) >= 2 else "within noise")


def _check_tables(page: Any) -> None:
    """Config and meta as readable rows: no raw dict, no float printed to 17 digits."""
    cells = page.eval_on_selector_all("table.meta td, table.config td", CELLS_JS)
    assert cells
    for text in cells:
        assert "{" not in text, text
        for number in re.findall(r"\d+\.\d+", text):  # at most 4 significant digits
            assert len(number.replace(".", "").lstrip("0")) <= 4, text


def _check_plots(page: Any, chains: int, diagnosed: bool = True) -> None:
    plots = page.eval_on_selector_all("figure.plot", PLOTS_JS)
    expected = ["draw-loss-chains", "query-traces"] if diagnosed else []
    expected += ["step-loss", "draw-loss"] + (["chains"] if chains > 1 else [])
    assert [p[0] for p in plots] == expected
    assert all(width > 0 and shown > 300 for _, width, shown in plots), plots
    traces = page.eval_on_selector_all("figure.plot.trace-plot", PLOTS_JS)
    assert [p[0] for p in traces] == expected[:2] if diagnosed else traces == []


BANNER_JS = """b => ({verdict: b.dataset.verdict, text: b.innerText, y: b.getBoundingClientRect().y,
    visible: b.checkVisibility(), bg: getComputedStyle(b).backgroundColor,
    reasons: [...b.querySelectorAll('li.reason')].map(r => [r.dataset.level, r.dataset.check,
        r.querySelector('.fix').innerText])})"""
BADGES_JS = """els => els.map(b => ({q: +b.closest('article').dataset.query, title: b.title,
    flag: b.closest('article').dataset.unresolved, visible: b.checkVisibility()}))"""
ROWS_JS = "els => els.map(r => [r.dataset.group || +r.dataset.query, r.dataset.unresolved])"


def _check_diagnostics(page: Any, result: bif.BIFResult) -> dict:
    """The verdict banner above the queries, with every finding and its fix; the R-hat/ESS
    tables (a row per trace group and per query); the unresolved queries badged."""
    diag = result.diagnostics
    banner = page.eval_on_selector("div.verdict", BANNER_JS)
    first = page.eval_on_selector("article", "a => a.getBoundingClientRect().y")
    assert banner["visible"] and banner["y"] < first
    if diag is None:
        assert banner["verdict"] == "none" and "bif diagnose" in banner["text"]
        assert page.locator("table.diagnostics-table").count() == 0
        assert page.locator(".badge.unresolved").count() == 0
        return banner
    assert banner["verdict"] == diag.verdict and f"Diagnostics: {diag.verdict}" in banner["text"]
    assert banner["reasons"] == [[r.level, r.check, f"Fix: {r.fix}"] for r in diag.reasons]
    for r in diag.reasons:
        assert r.message in banner["text"]
    groups = page.eval_on_selector_all("table.diagnostics-table[data-table=groups] tbody tr",
                                       ROWS_JS)  # fmt: skip
    assert groups[0][0] == "draw_loss" and sorted(g[0] for g in groups) == sorted(diag.summary)
    rows = page.eval_on_selector_all("table.diagnostics-table[data-table=queries] tbody tr",
                                     ROWS_JS)  # fmt: skip
    assert rows == [[q, str(q in diag.unresolved).lower()] for q in range(result.num_queries)]
    badges = page.eval_on_selector_all("article .badge.unresolved", BADGES_JS)
    assert [b["q"] for b in badges] == sorted(diag.unresolved)
    for b in badges:
        assert b["visible"] and b["flag"] == "true"
        assert "Monte-Carlo error" in b["title"] and "top-5 scores" in b["title"]
    return banner


@pytest.mark.browser
def test_tabular_result_page(tabular_dir, page_of, tmp_path) -> None:
    result = bif.BIFResult.load(tabular_dir)
    page = page_of(_report(tabular_dir, tmp_path / "r.html", "-k", "4"), tmp_path / "tab.png")
    cards = page.eval_on_selector_all("figure.train-example", CARDS_JS)
    _check_cards(cards, result)
    assert sum("self-influence" in c["kind"] for c in cards) == 4
    # Each query names its observable and shows its value at w*.
    for q in range(result.num_queries):
        art = page.locator(f"article.query[data-query='{q}']")
        assert art.locator(".query-card dt").inner_text() == "margin at w*"
        value = float(art.locator(".query-card dd").inner_text())
        assert value == pytest.approx(float(result.query_star[q]), rel=1e-3)
        heads = art.locator("h4").all_inner_texts()
        assert heads[0].endswith("lowers this query's margin") and "loss" not in " ".join(heads)
    assert page.get_attribute("main", "data-observable") == "margin"
    _check_plots(page, result.config.num_chains)
    _check_diagnostics(page, result)
    _check_tables(page)
    row = "table.meta tr[data-key='preconditioner.{}'] td.value"
    assert page.inner_text(row.format("condition_unpreconditioned")) == "501"
    assert page.inner_text(row.format("localised_mu")) == "-0.008751, -0.007364, -0.005999"
    assert page.inner_text(row.format("seconds")) == "12.44 s"
    assert page.locator("table.meta tr.group[data-key='preconditioner']").is_visible()


@pytest.mark.browser
def test_image_demo_page(demo_run, page_of, tmp_path) -> None:
    """The demo's result re-rendered by `bif report`: digit cards of one size in the grid."""
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    result = bif.BIFResult.load(demo_run.result_dir)
    page = page_of(_report(demo_run.result_dir, tmp_path / "demo.html"), tmp_path / "demo.png")
    cards = page.eval_on_selector_all("figure.train-example", CARDS_JS)
    _check_cards(cards, result)
    imgs = page.eval_on_selector_all(
        "figure.train-example img", "els => els.map(e => e.getBoundingClientRect().width)"
    )
    assert len(imgs) == len(cards) and all(w == 80 for w in imgs)
    _check_plots(page, result.config.num_chains)
    _check_diagnostics(page, result)
    _check_tables(page)


def _token_pages(page: Any) -> list[dict]:
    return page.eval_on_selector_all(
        "article.token-query",
        """els => els.map(a => ({
            query: [...a.querySelectorAll('.query-tokens .tok')].map(t => t.textContent),
            head: a.querySelector('h3').innerText,
            passages: [...a.querySelectorAll('.passage')].map(p => ({
                index: +p.dataset.index, head: p.querySelector('.passage-head').innerText,
                tokens: [...p.querySelectorAll('.tok')].map(t => ({
                    text: t.textContent, score: t.dataset.score,
                    bg: getComputedStyle(t).backgroundColor,
                    w: t.getBoundingClientRect().width, visible: t.checkVisibility()})),
            })),
        }))""",
    )


def _check_heatmaps(queries: list[dict], result: bif.BIFResult, train_text: list[str]) -> None:
    assert len(queries) == result.num_queries
    coloured = 0
    for q, view in enumerate(queries):
        assert f"loss at w* {float(result.query_star[q]):.4g}" in view["head"]
        assert view["passages"], "every query shows its strongest passages"
        for p in view["passages"]:
            assert "".join(t["text"] for t in p["tokens"]) == train_text[p["index"]]
            assert "loss at w*" in p["head"]
            for t in p["tokens"]:
                assert t["visible"] and (t["w"] > 0 or not t["text"].strip())
                if t["score"] != "nan" and float(t["score"]) != 0:
                    rgb = [float(v) for v in re.findall(r"[\d.]+", t["bg"])[:3]]
                    assert (rgb[2] > rgb[0]) == (float(t["score"]) < 0), t
                    coloured += 1
    assert coloured > 10


@pytest.mark.browser
def test_lm_page_with_token_text(lm_result, page_of, tmp_path) -> None:
    result = lm_result["result"]
    page = page_of(_report(lm_result["with_text"], tmp_path / "lm.html", "-k", "2"),
                   tmp_path / "lm.png")  # fmt: skip
    queries = _token_pages(page)
    _check_heatmaps(queries, result, TEXTS)
    assert ["".join(v["query"]) for v in queries] == QUERIES
    assert page.title() == "tiny LM <report>" and page.locator(".notice").count() == 0
    assert "a note & more" in page.inner_text("header .summary")
    _check_plots(page, result.config.num_chains)
    _check_diagnostics(page, result)
    _check_tables(page)


@pytest.mark.browser
def test_lm_page_without_token_text(lm_result, page_of, tmp_path, capsys) -> None:
    """No lm.json: every heatmap still there, tokens by position, and how to save the text."""
    result = lm_result["result"]
    out = _report(lm_result["without_text"], tmp_path / "bare.html", "-k", "2")
    assert "tokens are shown by position" in capsys.readouterr().out
    page = page_of(out, tmp_path / "bare.png")
    queries = _token_pages(page)
    positions = [
        "".join(str(s) for s in range(int(result.tokens.positions("train", i).max()) + 1))
        for i in range(result.num_train)
    ]
    _check_heatmaps(queries, result, positions)
    for q, view in enumerate(queries):
        assert view["query"] == [str(s) for s in range(len(QUERIES[q]))]
    notice = page.locator("section.notice.missing-text")
    assert notice.is_visible()
    text = notice.inner_text()
    assert "save_lm_text(" in text and str(lm_result["without_text"]) in text
    _check_plots(page, result.config.num_chains)
    _check_diagnostics(page, result)
    _check_tables(page)


def _resave(src: Path, dst: Path, diagnostics: Any) -> bif.BIFResult:
    """The saved result at ``src`` with other diagnostics (None: as an older bif saved it),
    saved at ``dst`` with its lm.json."""
    result = bif.BIFResult.load(src)
    result.diagnostics = diagnostics
    result.save(dst)
    if (src / "lm.json").exists():
        shutil.copy(src / "lm.json", dst / "lm.json")
    return bif.BIFResult.load(dst)


@pytest.mark.browser
def test_pages_mark_findings_and_unresolved_queries(tabular_dir, lm_result, page_of,
                                                     tmp_path) -> None:  # fmt: skip
    """A failing tabular run and a warning LM run: red and amber banners listing each finding
    and its fix, and the unresolved queries badged where their scores are shown."""
    base = bif.BIFResult.load(tabular_dir).diagnostics
    assert base is not None
    fail = dataclasses.replace(base, verdict="fail", unresolved=[0], reasons=[
        Reason("fail", "rhat", "R-hat 1.4 on the query traces", "raise num_burnin"),
        Reason("warn", "drift", "the draw loss drifts <upward>", "keep center_gradient=True"),
    ])  # fmt: skip
    result = _resave(tabular_dir, tmp_path / "fail", fail)
    page = page_of(_report(tmp_path / "fail", tmp_path / "fail.html"), tmp_path / "fail.png")
    banner = _check_diagnostics(page, result)
    rgb = [float(v) for v in re.findall(r"[\d.]+", banner["bg"])[:3]]
    assert rgb[0] > rgb[1] and rgb[0] > rgb[2]  # reddish
    assert "the draw loss drifts <upward>" in banner["text"]  # escaped, shown as text
    badge = page.locator("article.query[data-query='0'] .query-card .badge.unresolved")
    assert badge.is_visible() and badge.inner_text() == "unresolved"
    assert page.locator("article.query[data-query='1'] .badge").count() == 0

    lm = lm_result["result"].diagnostics
    assert lm is not None
    warn = dataclasses.replace(lm, verdict="warn", unresolved=[1], reasons=[
        Reason("warn", "ess", "bulk ESS of the draw loss 40", "take more draws"),
    ])  # fmt: skip
    result = _resave(lm_result["with_text"], tmp_path / "warn", warn)
    page = page_of(_report(tmp_path / "warn", tmp_path / "warn.html"), tmp_path / "warn.png")
    banner = _check_diagnostics(page, result)
    rgb = [float(v) for v in re.findall(r"[\d.]+", banner["bg"])[:3]]
    assert rgb[0] > rgb[2] and rgb[1] > rgb[2]  # amber
    assert page.locator("article.token-query[data-query='1'] h3 .badge.unresolved").is_visible()


@pytest.mark.browser
def test_pages_of_results_saved_without_diagnostics(tabular_dir, lm_result, page_of,
                                                    tmp_path) -> None:  # fmt: skip
    """Results of an older bif: a neutral line instead of a verdict, no tables, no badges."""
    for name, src in (("tab", tabular_dir), ("lm", lm_result["with_text"])):
        result = _resave(src, tmp_path / name, None)
        page = page_of(_report(tmp_path / name, tmp_path / f"{name}.html"))
        banner = _check_diagnostics(page, result)
        rgb = [float(v) for v in re.findall(r"[\d.]+", banner["bg"])[:3]]
        assert rgb == [255.0, 255.0, 255.0]  # neutral
        _check_plots(page, result.config.num_chains, diagnosed=False)


def test_save_lm_text_round_trip(lm_result) -> None:
    """The one-call token text gives every real token, in position order."""
    info = load_token_text(lm_result["with_text"])
    assert ["".join(t) for t in info["train_tokens"]] == TEXTS
    assert ["".join(t) for t in info["query_tokens"]] == QUERIES
    assert info["title"] == "tiny LM <report>" and info["note"] == "a note & more"
