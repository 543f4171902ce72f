"""Token heatmap reports of a causal-LM attribution, built from saved artefacts only.

A run saves its :class:`bif.BIFResult` (with per-token traces) and, next to it, ``lm.json``:
the display text of every token of every training and query sequence (and, optionally, the
query tokens' losses at the checkpoint). :func:`write_lm_report` rebuilds the page from those
two files, so a saved run can always be re-rendered (``bif report RESULT_DIR``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from bif.errors import ArtifactError
from bif.report.tokens import TokenPassage, TokenQueryView, write_token_report
from bif.result import BIFResult

LM_FILE = "lm.json"


def save_token_text(
    result_dir: str | Path,
    train_tokens: list[list[str]],
    query_tokens: list[list[str]],
    query_token_loss: list[list[float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``lm.json``: per-sequence token strings (position order, padding excluded)."""
    info = {"train_tokens": train_tokens, "query_tokens": query_tokens}
    if query_token_loss is not None:
        info["query_token_loss"] = query_token_loss
    info.update(extra or {})
    path = Path(result_dir) / LM_FILE
    path.write_text(json.dumps(info, indent=1, allow_nan=True))
    return path


def load_token_text(result_dir: str | Path) -> dict[str, Any] | None:
    path = Path(result_dir) / LM_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _nan_list(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.tolist()]


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
            on_query = tok.per_position("query", q, tok.query_token_scores(i), n_q)
            return TokenPassage(
                index=i,
                tokens=train_tokens[i],
                token_scores=_nan_list(tok.per_position("train", i, col, n_i)),
                score=float(result.scores[q, i]),
                stderr=float(result.stderr[q, i]),
                query_token_scores=_nan_list(on_query),
            )

        pro = [passage(int(i)) for i in order[:k] if row[i] < 0]
        opp = [passage(int(i)) for i in order.flip(0)[:k] if row[i] > 0]
        loss = (
            query_token_loss[q]
            if query_token_loss is not None
            else [math.nan] * len(query_tokens[q])
        )
        views.append(TokenQueryView(q, query_tokens[q], [float(x) for x in loss], pro, opp))
    return views


def write_lm_report(
    result_dir: str | Path, path: str | Path, k: int = 3, title: str | None = None
) -> Path:
    """(Re)build the token heatmap page from ``result_dir`` (a saved result and its lm.json)."""
    info = load_token_text(result_dir)
    if info is None:
        raise ArtifactError(f"{result_dir} holds no {LM_FILE}: save it with save_token_text.")
    result = BIFResult.load(result_dir)
    views = token_query_views(
        result, info["train_tokens"], info["query_tokens"], info.get("query_token_loss"), k
    )
    meta = {
        "sequences attributed": result.num_train,
        "queries": result.num_queries,
        "chains x draws": f"{result.config.num_chains} x {result.config.num_draws}",
        "damping γ/nβ": result.meta.get("damping"),
        "sampling seconds": result.meta.get("sampling_seconds"),
        "bif version": result.meta.get("bif_version"),
    }
    meta.update(info.get("report_meta", {}))
    return write_token_report(
        path,
        views,
        title=title or info.get("title", "bif: per-token influence"),
        meta=meta,
        note=info.get("note"),
    )
