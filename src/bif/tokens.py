"""Per-token traces and the token-level BIF computed from them in memory-bounded blocks.

For a task with per-token losses (a causal LM), every draw records the loss of each attributed
token: ``train[c, d, k]`` for the ``Kn`` training tokens and ``query[c, d, k]`` for the ``Kq``
query tokens, with ``*_index[k] = (sequence, position)``. From these,

    BIF(train token (i, s), query token (j, s')) = -mean_c Cov_c(l_{i,s}, l_{j,s'})

with the same per-chain centring as the sequence-level estimate (``centering="chain"``). Sums
of token columns give sequence losses, and covariance is bilinear, so the sequence-level BIF
of :class:`bif.BIFResult` equals the token-level BIF summed over both sequences' tokens.

Nothing larger than what is asked for is built: a request is answered column block by column
block, each block's float64 working copies bounded by ``max_block_mb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from bif.checkpoint import load_tensors, save_tensors
from bif.errors import ArtifactError, ConfigError, SelectionError
from bif.validate import check_k

TOKENS_FILE = "tokens.safetensors"
Side = Literal["train", "query"]
Kind = Literal["bif", "correlation"]


@dataclass(frozen=True)
class TokenInfluence:
    """One token's influence: ``sequence``/``position`` of the token, and its score."""

    sequence: int
    position: int
    score: float

    def __str__(self) -> str:
        return f"seq {self.sequence:<5d} pos {self.position:<4d} {self.score:+.4g}"


@dataclass
class TokenTraces:
    """Per-token losses at every draw. C chains, D draws, Kn/Kq attributed train/query tokens.

    Attributes:
        train: ``[C, D, Kn]`` float32 training-token losses.
        query: ``[C, D, Kq]`` float32 query-token losses.
        train_index: ``[Kn, 2]`` long (training sequence, position) of each column.
        query_index: ``[Kq, 2]`` long (query sequence, position).
        max_block_mb: working memory allowed per block of a computation.
        max_output_mb: largest token x token result returned in one call (ask for column
            subsets beyond it).
    """

    train: Tensor
    query: Tensor
    train_index: Tensor
    query_index: Tensor
    max_block_mb: float = 256.0
    max_output_mb: float = 2048.0

    def __post_init__(self) -> None:
        if self.train.shape[:2] != self.query.shape[:2]:
            raise ArtifactError("train and query token traces must share [chains, draws].")
        if self.train.shape[1] < 2:
            raise ConfigError("token-level estimates need at least 2 draws per chain.")

    # -- columns ---------------------------------------------------------------------------
    def tokens_of(self, side: Side, sequence: int) -> Tensor:
        """Column indices ``[k]`` of one sequence's attributed tokens, in position order."""
        index = self._index(side)
        cols = (index[:, 0] == sequence).nonzero().squeeze(1)
        if cols.numel() == 0:
            n = int(index[:, 0].max()) + 1 if index.numel() else 0
            raise SelectionError(
                f"{side} sequence {sequence} has no attributed token (this result has {n} "
                f"{side} sequences with attributed tokens, 0 to {n - 1})."
            )
        return cols

    def positions(self, side: Side, sequence: int) -> Tensor:
        """Positions ``[k]`` of one sequence's attributed tokens."""
        return self._index(side)[self.tokens_of(side, sequence), 1]

    def _index(self, side: Side) -> Tensor:
        return self.train_index if side == "train" else self.query_index

    def _traces(self, side: Side) -> Tensor:
        return self.train if side == "train" else self.query

    def _columns(self, side: Side, cols: Tensor | None) -> Tensor:
        """Centred float64 token traces ``[C, D, k]`` of the given columns."""
        t = self._traces(side)
        x = (t if cols is None else t[:, :, cols]).double()
        return x - x.mean(1, keepdim=True)

    def _sequence_sums(self, side: Side, sequences: Tensor) -> Tensor:
        """Centred float64 sequence losses ``[C, D, len(sequences)]`` (sums of token columns)."""
        out = []
        for s in sequences.tolist():
            out.append(self._traces(side)[:, :, self.tokens_of(side, s)].double().sum(-1))
        x = torch.stack(out, -1)
        return x - x.mean(1, keepdim=True)

    # -- estimates -----------------------------------------------------------------------------
    def _block_cols(self, rows: int) -> int:
        c, d = self.train.shape[:2]
        per_col = 8 * (c * d + rows)  # centred float64 column + its output column
        return max(1, int(self.max_block_mb * 2**20 // per_col))

    def _estimate(self, b: Tensor, train_cols: Tensor | None, kind: Kind) -> Tensor:
        """``[rows, kn]`` from centred query-side traces ``b`` ``[C, D, rows]``."""
        c, d = b.shape[:2]
        cols = torch.arange(self.train.shape[2]) if train_cols is None else train_cols
        n = len(cols)
        out = torch.empty(b.shape[2], n, dtype=torch.float64)
        var_b = (b * b).sum(1).mean(0) / (d - 1)  # [rows]
        step = self._block_cols(b.shape[2])
        for start in range(0, n, step):
            a = self._columns("train", cols[start : start + step])
            cov = torch.einsum("cdq,cdn->qn", b, a) / (c * (d - 1))
            if kind == "correlation":
                var_a = (a * a).sum(1).mean(0) / (d - 1)
                den = (var_b[:, None] * var_a[None, :]).sqrt()
                cov = torch.where(den > 0, cov / den, torch.zeros_like(cov))
            else:
                cov = -cov
            out[:, start : start + step] = cov
        return out

    def _check_output(self, rows: int, cols: int) -> None:
        mb = rows * cols * 8 / 2**20
        if mb > self.max_output_mb:
            raise ConfigError(
                f"a [{rows}, {cols}] token block needs {mb:.0f} MB (max_output_mb="
                f"{self.max_output_mb:g}); ask for fewer tokens at a "
                "time (query_tokens=/train_tokens= column indices) or raise max_output_mb."
            )

    def token_scores(
        self,
        query_tokens: Tensor | None = None,
        train_tokens: Tensor | None = None,
        kind: Kind = "bif",
    ) -> Tensor:
        """Token × token BIF ``[kq, kn]`` (or correlation), for the given columns (None: all)."""
        kq = self.query.shape[2] if query_tokens is None else len(query_tokens)
        kn = self.train.shape[2] if train_tokens is None else len(train_tokens)
        self._check_output(kq, kn)
        return self._estimate(self._columns("query", query_tokens), train_tokens, kind)

    def train_token_scores(self, query: int, kind: Kind = "bif") -> Tensor:
        """``[Kn]``: each training token's BIF on query sequence ``query``'s loss."""
        b = self._sequence_sums("query", torch.tensor([query]))
        return self._estimate(b, None, kind)[0]

    def query_token_scores(self, train: int, kind: Kind = "bif") -> Tensor:
        """``[Kq]``: training sequence ``train``'s BIF on each query token's loss."""
        a = self._sequence_sums("train", torch.tensor([train]))  # [C, D, 1]
        b = self._columns("query", None)
        c, d = b.shape[:2]
        cov = torch.einsum("cdq,cdn->q", b, a) / (c * (d - 1))
        if kind == "bif":
            return -cov
        var_a = (a * a).sum((0, 1)) / (c * (d - 1))
        var_b = (b * b).sum(1).mean(0) / (d - 1)
        den = (var_a * var_b).sqrt()
        return torch.where(den > 0, cov / den, torch.zeros_like(cov))

    def columns(self, side: Side, index: Tensor) -> Tensor:
        """Column indices ``[K]`` of the tokens ``index`` ``[K, 2]`` ``(sequence, position)``.

        Raises:
            SelectionError: a token of ``index`` is not attributed in this result.
        """
        where = {(int(a), int(b)): k for k, (a, b) in enumerate(self._index(side).tolist())}
        cols = []
        for seq, pos in torch.as_tensor(index).long().view(-1, 2).tolist():
            if (seq, pos) not in where:
                self._column_at(side, seq, pos)  # raises with the attributed positions
            cols.append(where[(seq, pos)])
        return torch.tensor(cols, dtype=torch.long)

    def token_sequence_scores(self, query_tokens: Tensor | None = None) -> Tensor:
        """``[kq, N]``: each training SEQUENCE's BIF on each query token's loss (None: all).

        ``-mean_c Cov_c(l_{j,s'}, Σ_s l_{i,s})``; by bilinearity the sum over training tokens
        of :meth:`token_scores`, and summed over a query's tokens it is the sequence BIF. Rows
        are in the order of ``query_tokens`` (column indices, e.g. from :meth:`columns`).
        """
        n = int(self.train_index[:, 0].max()) + 1
        kq = self.query.shape[2] if query_tokens is None else len(query_tokens)
        self._check_output(kq, n)
        b = self._columns("query", query_tokens)  # [C, D, kq]
        a = self._sequence_sums("train", torch.arange(n))  # [C, D, N]
        c, d = b.shape[:2]
        return -torch.einsum("cdq,cdn->qn", b, a) / (c * (d - 1))

    def sequence_scores(self) -> Tensor:
        """Sequence-level BIF ``[Q, N]`` as sums of token-level BIFs, block by block."""
        q = int(self.query_index[:, 0].max()) + 1
        n = int(self.train_index[:, 0].max()) + 1
        out = torch.zeros(q, n, dtype=torch.float64)
        b = self._columns("query", None)  # centred once, shared by every block
        step = self._block_cols(self.query.shape[2])
        for start in range(0, self.train.shape[2], step):
            cols = torch.arange(start, min(start + step, self.train.shape[2]))
            block = self._estimate(b, cols, "bif")  # [Kq, k]
            # Sum token rows into query sequences and token columns into train sequences.
            rows = torch.zeros(q, block.shape[1], dtype=torch.float64)
            rows.index_add_(0, self.query_index[:, 0], block)
            out.index_add_(1, self.train_index[cols, 0], rows)
        return out

    def top_train_tokens(self, query: int, position: int | None = None, k: int = 10) -> list:
        """The ``k`` training tokens with the most negative BIF (proponents) on query
        ``query``'s token at ``position`` (None: on the whole query sequence)."""
        if position is None:
            row = self.train_token_scores(query)
        else:
            col = self._column_at("query", query, position)
            row = self.token_scores(query_tokens=col.view(1))[0]
        return self._top(row, self.train_index, k)

    def top_query_tokens(self, train: int, position: int | None = None, k: int = 10) -> list:
        """The ``k`` query tokens whose loss training sequence ``train`` (or its token at
        ``position``) lowers most (most negative BIF)."""
        if position is None:
            row = self.query_token_scores(train)
        else:
            col = self._column_at("train", train, position)
            row = self.token_scores(train_tokens=col.view(1))[:, 0]
        return self._top(row, self.query_index, k)

    def _column_at(self, side: Side, sequence: int, position: int) -> Tensor:
        cols = self.tokens_of(side, sequence)
        hit = cols[self._index(side)[cols, 1] == position]
        if hit.numel() == 0:
            why = (
                " (position 0 never is: its token has no context to be predicted from)"
                if position == 0
                else ""
            )
            raise SelectionError(
                f"position {position} of {side} sequence {sequence} is not attributed{why}; "
                f"its attributed positions: {_ranges(self._index(side)[cols, 1].tolist())}."
            )
        return hit[0]

    @staticmethod
    def _top(row: Tensor, index: Tensor, k: int) -> list[TokenInfluence]:
        check_k(k)
        order = torch.argsort(row)[:k]
        return [
            TokenInfluence(int(index[i, 0]), int(index[i, 1]), float(row[i]))
            for i in order
            if row[i] < 0
        ]

    def per_position(self, side: Side, sequence: int, values: Tensor, length: int) -> Tensor:
        """Scatter column values ``[K]`` of one sequence into ``[length]`` (NaN elsewhere)."""
        cols = self.tokens_of(side, sequence)
        out = torch.full((length,), float("nan"), dtype=torch.float64)
        out[self._index(side)[cols, 1]] = values[cols].double()
        return out

    # -- artefacts -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "train": self.train, "query": self.query,
            "train_index": self.train_index, "query_index": self.query_index,
        }  # fmt: skip
        save_tensors(path / TOKENS_FILE, tensors)
        return path / TOKENS_FILE

    @classmethod
    def load(cls, path: str | Path) -> TokenTraces:
        """Read ``tokens.safetensors``; :class:`ArtifactError` if absent or damaged."""
        file = Path(path) / TOKENS_FILE
        if not file.exists():
            raise ArtifactError(f"{path} holds no token traces ({TOKENS_FILE}).")
        fix = f"The result in {path} must be recomputed (or saved again)."
        t, _ = load_tensors(file, fix, with_meta=False)
        names = ("train", "query", "train_index", "query_index")
        if any(n not in t for n in names):
            raise ArtifactError(f"{file} lacks some of {names}; the result must be recomputed.")
        return cls(*(t[n] for n in names))


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7, 8]`` -> ``"1-3, 7-8"`` (attributed positions are mostly runs)."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
