"""The report's readable tables, card rows, trace summaries and token text, without a browser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bif import BIFConfig, BIFResult
from bif.lm.text import token_text
from bif.report.cards import z_text
from bif.report.meta import config_rows, fmt_number, fmt_value, meta_table, rows_of
from bif.report.plots import chain_summary, loss_trace_plots


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (500.99999999999994, "501"), (0.9983753561973572, "0.9984"), (0.0, "0"),
        (50038.820962060825, "50,040"), (440.886601098412, "440.9"), (1.5e-7, "1.5e-07"),
        (-0.008751310408115387, "-0.008751"), (2.5e9, "2.5e+09"), (math.inf, "inf"),
    ],
)  # fmt: skip
def test_numbers_have_four_significant_digits(value, text) -> None:
    assert fmt_number(value) == text


def test_values_lists_and_nested_dicts_read_as_rows() -> None:
    assert fmt_value(12.440456919999633, "seconds") == "12.44 s"
    assert fmt_value(["friction", "gamma"]) == "friction, gamma" and fmt_value([]) == "(none)"
    assert fmt_value([-0.0087513, -0.0073636]) == "-0.008751, -0.007364"
    assert fmt_value(list(range(10))) == "10 values: min 0, median 4.5, max 9"
    assert fmt_value([str(i) for i in range(10)]).endswith("7, … (+2 more)")
    assert fmt_value({"a": 1.23456, "b": [1, 2]}) == "a = 1.235; b = 1, 2"
    assert (fmt_value(True), fmt_value(None), fmt_value(7)) == ("True", "None", "7")
    meta = {"task": "regression", "preconditioner": {"rank": 4, "inner": {"x": 0.333333333}}}
    rows = rows_of(meta)
    assert [(k, v, d) for k, v, _, d in rows] == [
        ("task", "regression", 0), ("preconditioner", "", -1), ("preconditioner.rank", "4", 1),
        ("preconditioner.inner", "", -2), ("preconditioner.inner.x", "0.3333", 2),
    ]  # fmt: skip
    assert rows[2][2] == "Hessian eigenpairs in the mass matrix"
    html = meta_table({"<k>": "<v>", **meta})
    assert "&lt;k&gt;" in html and "&lt;v&gt;" in html and "{" not in html
    assert 'data-key="preconditioner.inner.x"' in html


def test_config_rows_round_and_explain() -> None:
    cfg = BIFConfig(step_size=0.0012345678, nbeta=50038.82, gamma=440.886601098412)
    rows = {k: (v, m) for k, v, m, _ in config_rows(cfg)}
    assert rows["step_size"][0] == "0.001235" and rows["nbeta"][0] == "50,040"
    assert rows["gamma"][0] == "440.9" and rows["damping"][0] == fmt_number(cfg.damping)
    assert rows["num_chains"][1]  # the field's help text


def test_z_and_verdict() -> None:
    assert z_text(-3.0, 1.0) == ("z -3.00 · distinct from 0", True)
    assert z_text(1.97, 1.0) == ("z +1.97 · within noise", False)
    assert z_text(1.0, math.nan, num_chains=1) == ("z n/a (1 chain)", False)


@pytest.mark.parametrize("chains", [2, 16])
def test_trace_plots_summarise_many_chains(chains) -> None:
    g = torch.Generator().manual_seed(chains)
    c, d, t = chains, 20, 30
    result = BIFResult(
        scores=torch.zeros(1, 3), stderr=torch.ones(1, 3), correlation=torch.zeros(1, 3),
        self_influence=torch.zeros(3), self_influence_stderr=torch.ones(3),
        draw_loss=1 + torch.rand(c, d, generator=g), step_loss=1 + torch.rand(c, t, generator=g),
        query_trace=torch.zeros(c, d, 1), train_loss_star=torch.ones(3), query_star=torch.ones(1),
        config=BIFConfig(num_chains=c, num_draws=d, num_burnin=t - d, thin=1),
    )  # fmt: skip
    plots = loss_trace_plots(result)
    assert list(plots) == ["step-loss", "draw-loss", "chains"]
    assert all(uri.startswith("data:image/png;base64,") for uri, _ in plots.values())
    assert f"mean over the {chains} chains" in plots["step-loss"][1]


def test_chain_summary_ignores_unfinished_draws() -> None:
    t = torch.tensor([[1.0, 2.0, math.nan], [3.0, math.nan, math.nan]])
    s = chain_summary(t)
    assert s["mean"][:2].tolist() == [2.0, 2.0] and math.isnan(s["mean"][2])
    assert s["lo"][:2].tolist() == [1.0, 2.0] and s["hi"][:2].tolist() == [3.0, 2.0]
    assert np.isclose(s["sd"][0], math.sqrt(2.0))


class _CharDecoder:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_token_text_from_decode_and_from_a_function() -> None:
    assert token_text(_CharDecoder(), [72, 105, 33]) == ["H", "i", "!"]
    assert token_text(lambda ids: [f"<{i}>" for i in ids], [1, 2]) == ["<1>", "<2>"]


def test_token_text_of_a_byte_level_tokenizer() -> None:
    """Leading spaces kept, and a multi-byte character shown once, on the token completing it."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(["to be or not to be"], tokenizers.trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=alphabet, show_progress=False))  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw)
    text = "to be — or not"
    pieces = token_text(tok, tok(text)["input_ids"])
    assert "".join(pieces) == text and " be" in pieces and "—" in pieces
