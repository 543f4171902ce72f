"""The token text of a causal-LM attribution, saved next to its result as ``lm.json``.

A run saves its :class:`bif.BIFResult` (with per-token traces) and, next to it, ``lm.json``:
the display text of every token of every training and query sequence (and, optionally, the
query tokens' losses at the checkpoint). One call of :func:`save_lm_text` with the tokenizer and
the batches writes it; :func:`bif.report.lm.write_lm_report` (``bif report RESULT_DIR``) turns the
two into token heatmaps::

    result = bif.attribute(model, train, query, task=CausalLMTask())
    result.save("run")
    save_lm_text("run", tokenizer, train, query)     # writes run/lm.json
    # bif report run
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bif.checkpoint import read_json, write_json
from bif.errors import DataError

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
