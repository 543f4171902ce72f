"""The result of an attribution: scores ``[Q, N]`` with standard errors, traces and provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bif.config import BIFConfig
from bif.errors import ArtifactError
from bif.tokens import TOKENS_FILE, TokenTraces

TENSORS_FILE = "result.safetensors"
META_FILE = "result.json"


@dataclass(frozen=True)
class Influence:
    """One training example's influence on one query."""

    index: int
    score: float
    stderr: float

    def __str__(self) -> str:
        return f"#{self.index:<6d} {self.score:+.4g} ± {self.stderr:.2g}"


@dataclass(frozen=True)
class TopInfluences:
    """Proponents (most negative BIF: training on them lowers the query's loss) and opponents."""

    query: int
    proponents: list[Influence]
    opponents: list[Influence]

    def __str__(self) -> str:
        lines = [f"query {self.query}", "  proponents (BIF < 0, lower the query loss):"]
        lines += [f"    {x}" for x in self.proponents]
        lines.append("  opponents (BIF > 0, raise the query loss):")
        lines += [f"    {x}" for x in self.opponents]
        return "\n".join(lines)


@dataclass
class BIFResult:
    """Attribution scores of N training examples on Q queries.

    Attributes:
        scores: ``[Q, N]`` BIF = -Cov(l_n, φ_q). Negative: training on n lowers φ_q (proponent).
        stderr: ``[Q, N]`` standard error of each score from the spread across chains.
        correlation: ``[Q, N]`` Corr(l_n, φ_q) in [-1, 1] (note: the opposite sign of ``scores``).
        self_influence: ``[N]`` -Var(l_n); large magnitude flags unusual or mislabelled examples.
        self_influence_stderr: ``[N]``.
        draw_loss: ``[C, D]`` mean training loss at each recorded draw, per chain.
        step_loss: ``[C, T]`` minibatch loss at every sampler step (burn-in included).
        query_trace: ``[C, D, Q]`` the query observables at each draw.
        train_loss_star: ``[N]`` training losses at the checkpoint w*.
        query_star: ``[Q]`` query observables at w*.
        config: the hyperparameters used.
        meta: library version, sizes, timing, device.
        tokens: per-token traces and token-level estimates (:class:`bif.tokens.TokenTraces`)
            for tasks with per-token losses, such as :class:`bif.lm.CausalLMTask`; else None.
    """

    scores: Tensor
    stderr: Tensor
    correlation: Tensor
    self_influence: Tensor
    self_influence_stderr: Tensor
    draw_loss: Tensor
    step_loss: Tensor
    query_trace: Tensor
    train_loss_star: Tensor
    query_star: Tensor
    config: BIFConfig
    meta: dict[str, Any] = field(default_factory=dict)
    tokens: TokenTraces | None = None

    _TENSORS = (
        "scores", "stderr", "correlation", "self_influence", "self_influence_stderr",
        "draw_loss", "step_loss", "query_trace", "train_loss_star", "query_star",
    )  # fmt: skip

    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.scores.shape[1])

    def top(self, q: int, k: int = 5) -> TopInfluences:
        """The ``k`` strongest proponents and opponents of query ``q``."""
        if not 0 <= q < self.num_queries:
            raise IndexError(f"query index {q} out of range [0, {self.num_queries}).")
        k = max(0, min(k, self.num_train))
        row, se = self.scores[q], self.stderr[q]
        order = torch.argsort(row)
        mk = lambda i: Influence(int(i), float(row[i]), float(se[i]))  # noqa: E731
        pro = [mk(i) for i in order[:k] if row[i] < 0]
        opp = [mk(i) for i in order.flip(0)[:k] if row[i] > 0]
        return TopInfluences(q, pro, opp)

    def save(self, path: str | Path) -> Path:
        """Write ``path/result.safetensors`` and ``path/result.json`` (config, meta, version)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: getattr(self, n).detach().cpu().contiguous() for n in self._TENSORS},
            str(path / TENSORS_FILE),
        )
        meta = {"config": self.config.to_dict(), "meta": self.meta}
        (path / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if self.tokens is not None:
            self.tokens.save(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BIFResult:
        path = Path(path)
        if not (path / TENSORS_FILE).exists() or not (path / META_FILE).exists():
            raise ArtifactError(
                f"{path} is not a saved BIF result (expected {TENSORS_FILE} and {META_FILE})."
            )
        tensors = load_file(str(path / TENSORS_FILE))
        meta = json.loads((path / META_FILE).read_text())
        return cls(
            **{n: tensors[n] for n in cls._TENSORS},
            config=BIFConfig.from_dict(meta["config"]),
            meta=meta.get("meta", {}),
            tokens=TokenTraces.load(path) if (path / TOKENS_FILE).exists() else None,
        )
