"""Gradient similarity baselines.

    GradientDot:     score(q, n) = -⟨∇φ_q(w*), ∇l_n(w*)⟩
    GradientCosine:  score(q, n) = -cos(∇φ_q(w*), ∇l_n(w*))

The minus sign gives bif's convention: one gradient step on l_n changes φ_q by about
``-lr · ⟨∇φ_q, ∇l_n⟩``, so aligned gradients (training on n lowers φ_q) score negative.
Per-sample gradients come from :class:`bif.baselines.gradients.GradientSource`; causal-lm
contexts use per-sequence gradients (:func:`bif.baselines.lm_methods.gradsim_scores`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bif.baselines import lm_methods
from bif.baselines.base import AttributionContext
from bif.baselines.gradients import F64, GradientSource, context_task, eval_mode, normalise
from bif.errors import ConfigError


class _GradientSimilarity:
    """Shared scoring loop: query gradients once, training gradients chunk by chunk.

    Args:
        dtype: dtype of the gradient computation (None keeps the model's).
        chunk_size: training examples per vmapped gradient call.
    """

    name = "grad-sim"
    cosine = False

    def __init__(self, dtype: torch.dtype | None = None, chunk_size: int = 256) -> None:
        self.dtype = dtype
        self.chunk_size = chunk_size

    def _source(self, ctx: AttributionContext) -> GradientSource:
        return GradientSource(ctx.model, context_task(ctx), self.dtype, self.chunk_size)

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]`` (float64, CPU); causal-lm contexts use sequence-loss gradients."""
        if lm_methods.is_lm_context(ctx):
            return lm_methods.gradsim_scores(ctx, self.cosine)
        with eval_mode(ctx.model):
            src = self._source(ctx)
            gq = src.all(ctx.x_query, ctx.y_query, query=True).to(F64)  # [Q, P]
            if self.cosine:
                gq = normalise(gq)
            out = torch.empty(gq.shape[0], ctx.x_train.shape[0], dtype=F64, device=gq.device)
            for start, g in src.chunks(ctx.x_train, ctx.y_train):
                g = g.to(F64)
                if self.cosine:
                    g = normalise(g)
                out[:, start : start + g.shape[0]] = -(gq @ g.T)
        return out.cpu()

    def token_scores(self, ctx: AttributionContext, tokens: Tensor) -> Tensor:
        """``[K, N]`` against the gradient of each sampled query token's loss (causal-lm only;
        :func:`bif.baselines.lm_tokens.token_gradsim_scores`)."""
        from bif.baselines.lm_tokens import token_gradsim_scores

        if not lm_methods.is_lm_context(ctx):
            raise ConfigError("per-token scores need a causal-lm context.")
        return token_gradsim_scores(ctx, tokens, self.cosine)


class GradientDot(_GradientSimilarity):
    """``score = -⟨∇φ_q, ∇l_n⟩`` at the checkpoint; products accumulated in float64."""

    name = "grad-dot"

    def self_influence(self, ctx: AttributionContext) -> Tensor:
        """``-||∇l_n||²`` ``[N]`` (more negative = more suspicious)."""
        with eval_mode(ctx.model):
            src = self._source(ctx)
            parts = [g.to(F64).pow(2).sum(1) for _, g in src.chunks(ctx.x_train, ctx.y_train)]
        return -torch.cat(parts).cpu()


class GradientCosine(_GradientSimilarity):
    """``score = -cos(∇φ_q, ∇l_n)`` at the checkpoint (0 where a gradient vanishes)."""

    name = "grad-cos"
    cosine = True
