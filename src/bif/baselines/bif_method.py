"""BIF itself behind the :class:`~bif.baselines.base.Attributor` interface."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from bif.api import attribute
from bif.baselines.base import AttributionContext
from bif.config import BIFConfig
from bif.errors import ConfigError
from bif.result import BIFResult

# Keywords of bif.attribute that are not BIFConfig fields.
_CALL_KEYWORDS = {"device", "dtype", "run_dir", "checkpoint_every", "progress"}


class BIFAttributor:
    """Runs :func:`bif.attribute` on the context; scores ``[Q, N]`` = BIF (same sign convention).

    Args:
        config: base configuration (default: the library defaults).
        name: label in benchmark tables.
        **hyperparams: BIFConfig fields overriding ``config`` (``num_chains``, ``nbeta``, ...),
            and the call options ``device``, ``dtype``, ``run_dir``, ``checkpoint_every``,
            ``progress`` (default False).

    The last :class:`BIFResult` is kept in ``self.result`` (standard errors, traces).
    ``ctx.extra["observable"]``, when present, is passed on as ``observable=``. A "causal-lm"
    context passes its token batches with :class:`bif.lm.task.CausalLMTask` (sequence losses).
    """

    def __init__(self, config: BIFConfig | None = None, *, name: str = "bif", **hyperparams: Any):
        fields = {f.name for f in dataclasses.fields(BIFConfig)}
        unknown = sorted(set(hyperparams) - fields - _CALL_KEYWORDS)
        if unknown:
            raise ConfigError(
                f"unknown BIFAttributor option(s) {unknown}; use BIFConfig fields "
                f"{sorted(fields)} or {sorted(_CALL_KEYWORDS)}."
            )
        overrides = {k: v for k, v in hyperparams.items() if k in fields}
        # Validated now, so a typo fails when the benchmark is set up, not an hour into it.
        self.config = (config or BIFConfig()).replace(**overrides)
        self.call_options = {"progress": False}
        self.call_options.update({k: v for k, v in hyperparams.items() if k in _CALL_KEYWORDS})
        self.name = name
        self.result: BIFResult | None = None

    def run(self, ctx: AttributionContext) -> BIFResult:
        """The full :class:`BIFResult` for the context (also stored in ``self.result``)."""
        if ctx.task == "causal-lm":  # token batches (bif.lm.encode dicts), sequence losses
            from bif.lm.task import CausalLMTask

            train, query, task = ctx.x_train, ctx.x_query, CausalLMTask()
        else:
            train, query, task = (ctx.x_train, ctx.y_train), (ctx.x_query, ctx.y_query), ctx.task
        self.result = attribute(
            ctx.model,
            train,
            query,
            task=task,
            observable=ctx.extra.get("observable"),
            config=self.config,
            **self.call_options,
        )
        return self.result

    def scores(self, ctx: AttributionContext) -> Tensor:
        """BIF scores ``[Q, N]``: ``-Cov_p(l_n, φ_q)``; negative = proponent."""
        return self.run(ctx).scores

    def token_scores(self, ctx: AttributionContext, tokens: Tensor) -> Tensor:
        """``[K, N]``: each training sequence's BIF on each sampled query token's loss,
        ``-Cov_p(l_n, l_{j,s'})`` for ``tokens[k] = (j, s')``, from the per-token traces of the
        LAST run on ``ctx`` (one sampling run gives both; run now if there was none).

        Raises:
            ConfigError: the run kept no per-token traces (not a causal-lm context).
            SelectionError: a token of ``tokens`` is not an attributed query position.
        """
        result = self.result if self.result is not None else self.run(ctx)
        if result.tokens is None:
            raise ConfigError("per-token BIF scores need a causal-lm context (token traces).")
        cols = result.tokens.columns("query", tokens)
        return result.tokens.token_sequence_scores(cols)

    def diagnostics(self) -> dict[str, Any]:
        """The last run's draw-loss trace (mean training loss at each draw, averaged over
        chains, in 10 equal blocks of draws) and its value at w*: a plateau means burn-in was
        long enough; the draws taken, the diagnostics' verdict and, for ``num_draws='auto'``,
        why the run stopped."""
        if self.result is None:
            return {}
        trace = self.result.draw_loss.double().mean(0)  # [D]
        blocks = [float(b.mean()) for b in trace.chunk(min(10, trace.numel()))]
        r = self.result
        return {
            "draw_loss_blocks": blocks,
            "train_loss_star": float(r.train_loss_star.double().mean()),
            "num_draws": int(r.config.num_draws),
            "verdict": r.diagnostics.verdict if r.diagnostics is not None else None,
            "adaptive": r.meta.get("adaptive"),
        }

    def self_influence(self, ctx: AttributionContext) -> Tensor:
        """``-Var_p(l_n)`` ``[N]`` (more negative = more suspicious)."""
        return self.run(ctx).self_influence
