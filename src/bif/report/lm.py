"""Token heatmap reports of a causal-LM attribution, built from saved artefacts only.

:func:`write_lm_report` rebuilds the page from a saved :class:`bif.BIFResult` (with per-token
traces) and, next to it, ``lm.json``, the token text :func:`bif.lm.save_lm_text` writes, so a
saved run can always be re-rendered (``bif report RESULT_DIR``). Without ``lm.json`` the page
still shows every heatmap, with tokens labelled by their positions, and says how to add the text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bif.errors import ArtifactError
from bif.lm.text import load_token_text
from bif.report.diagnostics import observable_name
from bif.report.tokens import TokenPassage, TokenQueryView, write_token_report
from bif.result import BIFResult
from bif.tokens import TokenTraces


def positional_tokens(tok: TokenTraces, side: str, count: int) -> list[list[str]]:
    """Stand-in token text when none was saved: each token shown as its position, up to the
    last attributed one (the traces know positions, not ids)."""
    index = tok.train_index if side == "train" else tok.query_index
    last = torch.full((count,), -1, dtype=torch.long)
    last.scatter_reduce_(0, index[:, 0], index[:, 1], reduce="amax")
    return [[str(s) for s in range(int(n) + 1)] for n in last.tolist()]


def _per_position(tok: TokenTraces, side: Any, seq: int, values: torch.Tensor, n: int) -> list:
    index = tok.train_index if side == "train" else tok.query_index
    cols = index[:, 0] == seq
    if not bool(cols.any()):  # e.g. a one-token sequence: nothing is attributed
        return [math.nan] * n
    if int(index[cols, 1].max()) >= n:
        raise ArtifactError(
            f"{side} sequence {seq} has attributed position {int(index[cols, 1].max())} but "
            f"only {n} token strings: the token text does not belong to this result."
        )
    return [float(v) for v in tok.per_position(side, seq, values, n).tolist()]


def token_query_views(
    result: BIFResult,
    train_tokens: list[list[str]],
    query_tokens: list[list[str]],
    query_token_loss: list[list[float]] | None = None,
    k: int = 3,
) -> list[TokenQueryView]:
    """For every query: its tokens, and its ``k`` strongest proponent and opponent training
    sequences, each with per-token scores in both directions.

    A passage's ``token_scores[s]`` is the BIF of its token ``s`` on the query's sequence loss;
    its ``query_token_scores[s']`` the BIF of the whole passage on the query's token ``s'``.
    """
    tok = result.tokens
    if tok is None:
        raise ArtifactError("this result has no per-token traces (run it with CausalLMTask).")
    if len(train_tokens) != result.num_train or len(query_tokens) != result.num_queries:
        raise ArtifactError(
            f"token text for {len(train_tokens)} train / {len(query_tokens)} query sequences "
            f"does not match the result's {result.num_train} / {result.num_queries}."
        )
    views = []
    for q in range(result.num_queries):
        row = result.scores[q]
        train_col = tok.train_token_scores(q)  # [Kn]
        order = torch.argsort(row)

        def passage(i: int, q: int = q, col: torch.Tensor = train_col) -> TokenPassage:
            n_q, n_i = len(query_tokens[q]), len(train_tokens[i])
            return TokenPassage(
                index=i,
                tokens=train_tokens[i],
                token_scores=_per_position(tok, "train", i, col, n_i),
                score=float(result.scores[q, i]),
                stderr=float(result.stderr[q, i]),
                query_token_scores=_per_position(tok, "query", q, tok.query_token_scores(i), n_q),
                loss_star=float(result.train_loss_star[i]),
            )

        pro = [passage(int(i)) for i in order[:k] if row[i] < 0]
        opp = [passage(int(i)) for i in order.flip(0)[:k] if row[i] > 0]
        loss = (
            query_token_loss[q]
            if query_token_loss is not None
            else [math.nan] * len(query_tokens[q])
        )
        value = float(result.query_star[q])
        views.append(TokenQueryView(q, query_tokens[q], [float(x) for x in loss], pro, opp, value))
    return views


def write_lm_report(
    result_dir: str | Path, path: str | Path, k: int = 3, title: str | None = None
) -> Path:
    """(Re)build the token heatmap page from ``result_dir``: a saved result with per-token
    traces and, if saved, its ``lm.json`` (else tokens are shown by position, and the page says
    how to save the text)."""
    result = BIFResult.load(result_dir)
    if result.tokens is None:
        raise ArtifactError(
            f"{result_dir} holds no per-token traces: attribute with bif.lm.CausalLMTask."
        )
    info = load_token_text(result_dir)
    missing = info is None
    if info is None:
        info = {
            "train_tokens": positional_tokens(result.tokens, "train", result.num_train),
            "query_tokens": positional_tokens(result.tokens, "query", result.num_queries),
        }
    views = token_query_views(
        result, info["train_tokens"], info["query_tokens"], info.get("query_token_loss"), k
    )
    return write_token_report(
        path,
        views,
        title=title or info.get("title", "bif: per-token influence"),
        meta=info.get("report_meta", {}),
        note=info.get("note"),
        result=result,
        observable=observable_name(result),
        missing_text=str(result_dir) if missing else None,
    )
