"""Token heatmap reports of a causal-LM attribution, built from saved artefacts only.

A run saves its :class:`bif.BIFResult` (with per-token traces) and, next to it, ``lm.json``:
the display text of every token of every training and query sequence (and, optionally, the
query tokens' losses at the checkpoint). :func:`write_lm_report` rebuilds the page from those
two files, so a saved run can always be re-rendered (``bif report RESULT_DIR``). Without
``lm.json`` the page still shows every heatmap, with tokens labelled by their positions, and
says how to add the text: one call of :func:`save_lm_text` with the tokenizer and the batches::

    result = bif.attribute(model, train, query, task=CausalLMTask())
    result.save("run")
    save_lm_text("run", tokenizer, train, query)     # writes run/lm.json
    # bif report run
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bif.checkpoint import read_json, write_json
from bif.errors import ArtifactError, DataError
from bif.report.diagnostics import observable_name
from bif.report.tokens import TokenPassage, TokenQueryView, write_token_report
from bif.result import BIFResult
from bif.tokens import TokenTraces

LM_FILE = "lm.json"
DECODE_WINDOW = 8  # tokens of left context when decoding one token (a character spans ≤ 4)


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
    write_json(path, info)
    return path


def token_text(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display text of each token of one sequence, whatever the tokenizer's scheme.

    A token's text is what decoding it adds to the decoded tokens before it (within
    :data:`DECODE_WINDOW`), so leading spaces (SentencePiece ``▁``, byte-level ``Ġ``) come out
    as spaces. A byte-level piece that only starts a multi-byte character shows as ``""`` and
    the token completing it shows the character. ``tokenizer``: anything with
    ``decode(ids) -> str`` (Hugging Face), or a function ``ids -> list[str]``.
    """
    ids = [int(i) for i in ids]
    if not hasattr(tokenizer, "decode"):
        out = list(tokenizer(ids))
        if len(out) != len(ids):
            raise DataError(f"the token text function gave {len(out)} strings for {len(ids)} ids.")
        return [str(x) for x in out]
    pieces = []
    for i in range(len(ids)):
        lo = max(0, i - DECODE_WINDOW)
        stem = tokenizer.decode(ids[lo:i]).rstrip("\ufffd") if i > lo else ""
        full = tokenizer.decode(ids[lo : i + 1])
        piece = full[len(stem) :] if full.startswith(stem) else tokenizer.decode(ids[i : i + 1])
        pieces.append(piece.rstrip("\ufffd") if i + 1 < len(ids) else piece)
    return pieces


def batch_token_text(tokenizer: Any, batch: Any) -> list[list[str]]:
    """:func:`token_text` of every sequence of a right-padded batch (padding excluded).

    ``batch``: a dict with ``input_ids`` ``[B, S]`` (and ``attention_mask``), as made by
    :func:`bif.lm.encode`, or a list of id lists.
    """
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * len(ids)
        rows = [ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    else:
        rows = [list(r) for r in batch]
    return [token_text(tokenizer, r) for r in rows]


def save_lm_text(
    result_dir: str | Path,
    tokenizer: Any,
    train: Any,
    query: Any,
    *,
    query_token_loss: list[list[float]] | None = None,
    title: str | None = None,
    note: str | None = None,
    report_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``lm.json`` in one call from the tokenizer and the batches given to ``attribute``.

    Args:
        result_dir: the directory the result was saved to.
        tokenizer: a Hugging Face tokenizer (or a function ``ids -> list[str]``).
        train, query: the encoded batches (``bif.lm.encode``'s dicts) that were attributed.
        query_token_loss: per query, each token's loss at w* (NaN where not attributed), shown
            when hovering a query token.
        title, note, report_meta: the page's title, a line under it, more "Run" table rows.
    """
    extra: dict[str, Any] = {}
    for key, value in (("title", title), ("note", note), ("report_meta", report_meta)):
        if value is not None:
            extra[key] = value
    return save_token_text(
        result_dir,
        batch_token_text(tokenizer, train),
        batch_token_text(tokenizer, query),
        query_token_loss,
        extra,
    )


def load_token_text(result_dir: str | Path) -> dict[str, Any] | None:
    path = Path(result_dir) / LM_FILE
    if not path.exists():
        return None
    return read_json(path, "Write it again with bif.lm.save_lm_text(...), or delete it.")


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
