"""The result of an attribution: scores ``[Q, N]`` with standard errors, traces and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bif.checkpoint import damaged, file_digest, load_tensors, read_json, save_tensors, write_json
from bif.config import BIFConfig
from bif.diagnostics import Diagnostics
from bif.errors import ArtifactError, BIFError, SelectionError
from bif.tokens import TOKENS_FILE, TokenTraces
from bif.validate import check_dir_target, check_k

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
    """Proponents (most negative BIF: training on them lowers the query's observable, its loss
    by default) and opponents (training on them raises it)."""

    query: int
    proponents: list[Influence]
    opponents: list[Influence]
    observable: str = "loss"

    def __str__(self) -> str:
        phi = self.observable
        lines = [f"query {self.query}", f"  proponents (BIF < 0, lower the query's {phi}):"]
        lines += [f"    {x}" for x in self.proponents]
        lines.append(f"  opponents (BIF > 0, raise the query's {phi}):")
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
        mcse: ``[Q, N]`` batch-means (autocorrelation-aware) Monte-Carlo error of each score
            alone (:mod:`bif.mcse`); ``stderr`` pools it with the across-chain spread.
        stderr_chains: ``[Q, N]`` the across-chain error alone (``C - 1`` degrees of freedom).
        train_trace: ``[C, D, S]`` losses of ``train_index`` ``[S]`` (a fixed sample of the
            training examples) at each draw, for the diagnostics.
        energy: ``[C, D]`` U(w) - U(w*) at each draw.
        diagnostics: R-hat, ESS, drift, Monte-Carlo errors and the verdict
            (:class:`bif.diagnostics.Diagnostics`).
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
    mcse: Tensor | None = None
    stderr_chains: Tensor | None = None
    train_trace: Tensor | None = None
    train_index: Tensor | None = None
    energy: Tensor | None = None
    diagnostics: Diagnostics | None = None

    # Written when present; results saved before they existed load without them.
    _OPTIONAL = ("mcse", "stderr_chains", "train_trace", "train_index", "energy")
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

    @property
    def observable(self) -> str:
        """Name of the query observable φ the scores explain ("loss" unless one was given)."""
        return str(self.meta.get("observable", "loss"))

    def top(self, q: int, k: int = 5) -> TopInfluences:
        """The ``k`` strongest proponents and opponents of query ``q``.

        Raises:
            SelectionError: ``q`` is not a query of this result.
            ConfigError: ``k`` is not a positive integer.
        """
        if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q < self.num_queries:
            raise SelectionError(
                f"query index {q!r} out of range: this result has {self.num_queries} queries "
                f"(0 to {self.num_queries - 1})."
            )
        check_k(k)
        k = min(k, self.num_train)
        row, se = self.scores[q], self.stderr[q]
        order = torch.argsort(row)
        mk = lambda i: Influence(int(i), float(row[i]), float(se[i]))  # noqa: E731
        pro = [mk(i) for i in order[:k] if row[i] < 0]
        opp = [mk(i) for i in order.flip(0)[:k] if row[i] > 0]
        return TopInfluences(q, pro, opp, self.observable)

    def save(self, path: str | Path) -> Path:
        """Write ``path/result.safetensors`` (and ``tokens.safetensors``), then
        ``path/result.json`` (config, meta, and the size and hash of each tensor file).

        ``result.json`` is removed first and written last, each file atomically: a save that
        is interrupted leaves a directory that :meth:`load` refuses, never a mix of two
        results. Saving into a directory that holds a result replaces it.

        Raises:
            ArtifactError: ``path`` (or a parent) is an existing file, not a directory.
        """
        path = Path(path)
        # An existing file there would fail inside mkdir with a bare FileExistsError; an
        # existing result directory is overwritten (result.json first, see above).
        check_dir_target(path, "result.save path", f"{META_FILE} and {TENSORS_FILE}")
        path.mkdir(parents=True, exist_ok=True)
        (path / META_FILE).unlink(missing_ok=True)
        tensors = {n: getattr(self, n) for n in self._TENSORS}
        tensors.update({n: t for n in self._OPTIONAL if (t := getattr(self, n)) is not None})
        save_tensors(path / TENSORS_FILE, tensors)
        files = [TENSORS_FILE]
        if self.tokens is not None:
            self.tokens.save(path)
            files.append(TOKENS_FILE)
        else:
            (path / TOKENS_FILE).unlink(missing_ok=True)
        meta = {
            "config": self.config.to_dict(),
            "meta": self.meta,
            "diagnostics": self.diagnostics.to_dict() if self.diagnostics is not None else None,
            "files": {f: file_digest(path / f) for f in files},
        }
        write_json(path / META_FILE, meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BIFResult:
        """Read a result written by :meth:`save`.

        Raises:
            ArtifactError: ``path`` holds no result, an incomplete one (an interrupted save) or
                a damaged one (a file that does not match the size and hash recorded in
                ``result.json``, or cannot be parsed); the message names the file.
        """
        path = Path(path)
        fix = f"The result in {path} must be recomputed (or saved again)."
        if not (path / META_FILE).exists():
            if (path / TENSORS_FILE).exists():
                raise ArtifactError(
                    f"{path} holds {TENSORS_FILE} but no {META_FILE}: its save did not finish. "
                    + fix
                )
            raise ArtifactError(
                f"{path} is not a saved BIF result (expected {TENSORS_FILE} and {META_FILE})."
            )
        meta = read_json(path / META_FILE, fix)
        # Results saved before the manifest list no files: their tensor files, unchecked.
        legacy = [TENSORS_FILE] + [TOKENS_FILE] * (path / TOKENS_FILE).exists()
        files = meta.get("files", dict.fromkeys(legacy))
        if not isinstance(files, dict) or TENSORS_FILE not in files:
            raise damaged(path / META_FILE, f"it lists no {TENSORS_FILE}", fix)
        for name, expected in files.items():
            file = path / str(name)
            if not file.exists():
                raise ArtifactError(f"{file} is missing. {fix}")
            if expected is not None and file_digest(file) != expected:
                raise damaged(file, f"its size or hash differs from {META_FILE}'s record", fix)
        tensors, _ = load_tensors(path / TENSORS_FILE, fix, with_meta=False)
        missing = [n for n in cls._TENSORS if n not in tensors]
        if missing:
            raise damaged(path / TENSORS_FILE, f"it lacks {missing}", fix)
        try:
            config = BIFConfig.from_dict(meta["config"])
        except (KeyError, TypeError, BIFError) as e:
            raise damaged(path / META_FILE, f"its config is invalid: {e}", fix) from e
        tokens = TokenTraces.load(path) if TOKENS_FILE in files else None
        diag = meta.get("diagnostics")
        try:
            diagnostics = Diagnostics.from_dict(diag) if diag else None
        except TypeError as e:
            raise damaged(path / META_FILE, f"its diagnostics are invalid: {e}", fix) from e
        return cls(
            **{n: tensors[n] for n in cls._TENSORS},
            **{n: tensors.get(n) for n in cls._OPTIONAL},
            config=config,
            meta=meta.get("meta", {}),
            tokens=tokens,
            diagnostics=diagnostics,
        )
