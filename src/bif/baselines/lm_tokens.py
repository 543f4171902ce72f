"""Per-token scores of the causal-LM baselines: training SEQUENCES against sampled query tokens.

A token sample ``tokens`` ``[K, 2]`` (query index, position; e.g.
:func:`bif.bench.lm.setting.token_sample`) names query tokens that carry a loss, ``l_{j,s'} =
-log p(x_{j,s'} | x_{j,<s'})``. Every function here returns ``[K, N]`` in bif's sign convention
(negative = training on sequence n lowers that token's loss), the rows of the token-level LDS
(:func:`bif.eval.metrics.token_lds`):

- grad-dot / grad-cos: ``-<∇l_{j,s'}, ∇l_n>`` (or the cosine) with the per-sequence training
  gradients of :func:`bif.baselines.lm_methods.sequence_gradients`. Gradients are linear, so a
  query's token scores summed over all its tokens are its sequence scores.
- EK-FAC (kronfluence): one query "measurement" per sampled token (its loss) instead of the
  query's sequence loss, with the same factors and training gradients as the sequence scores.
  UNTESTED here (kronfluence is not installed in the development environment).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bif.baselines.base import AttributionContext
from bif.baselines.gradients import F64, eval_mode, normalise
from bif.baselines.lm_methods import (
    Batch,
    _kron_task,
    _row,
    _rows,
    kron_pairwise,
    lm_sizes,
    sequence_gradients,
)
from bif.baselines.peers import bif_scores
from bif.errors import SelectionError
from bif.lm.task import CausalLMTask


def check_tokens(ctx: AttributionContext, tokens: Tensor) -> Tensor:
    """``tokens`` as long ``[K, 2]``; every one must carry a loss in ``ctx.x_query``.

    Raises:
        SelectionError: wrong shape, or a token that is out of range or not attributed.
    """
    tokens = torch.as_tensor(tokens).long()
    if tokens.dim() != 2 or tokens.shape[1] != 2 or len(tokens) == 0:
        raise SelectionError(f"tokens must be [K, 2] (query, position), got {tuple(tokens.shape)}.")
    mask = CausalLMTask().token_mask(ctx.x_query)  # [Q, S]
    q, s = mask.shape
    inside = (tokens[:, 0] >= 0) & (tokens[:, 0] < q) & (tokens[:, 1] >= 0) & (tokens[:, 1] < s)
    if not bool(inside.all()) or not bool(mask[tokens[:, 0], tokens[:, 1]].all()):
        raise SelectionError("every sampled token must be an attributed query position.")
    return tokens


def _flat(grads: tuple[Tensor | None, ...], params: list[nn.Parameter]) -> Tensor:
    parts = [
        (g if g is not None else torch.zeros_like(p)).reshape(-1)
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts).to(F64)


def token_gradients(model: nn.Module, batch: Batch, j: int, positions: list[int]) -> Tensor:
    """Gradients ``[len(positions), P]`` float64 of query ``j``'s token losses at ``positions``."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = CausalLMTask().token_losses(model, _row(batch, j))[0]  # [L]
    rows = []
    for i, pos in enumerate(positions):
        keep = i < len(positions) - 1
        rows.append(_flat(torch.autograd.grad(losses[pos], params, retain_graph=keep,
                                              allow_unused=True), params))  # fmt: skip
    return torch.stack(rows)


def token_gradsim_scores(ctx: AttributionContext, tokens: Tensor, cosine: bool) -> Tensor:
    """``-<∇l_{j,s'}, ∇l_n>`` (or ``-cos``) ``[K, N]`` float64 at w*, rows in ``tokens`` order."""
    lm_sizes(ctx)
    tokens = check_tokens(ctx, tokens)
    with eval_mode(ctx.model):
        gn = torch.stack([g.to(F64) for g in sequence_gradients(ctx.model, ctx.x_train)])
        if cosine:
            gn = normalise(gn)
        out = torch.empty(len(tokens), gn.shape[0], dtype=F64)
        for j in tokens[:, 0].unique().tolist():
            rows = (tokens[:, 0] == j).nonzero().squeeze(1)
            g = token_gradients(ctx.model, ctx.x_query, j, tokens[rows, 1].tolist())
            out[rows] = -((normalise(g) if cosine else g) @ gn.T)
    return out


def _kron_token_task(seed: int) -> Any:
    """The sequence-loss kronfluence task of :mod:`bif.baselines.lm_methods`, measuring ONE
    token's loss per query item (``batch["position"]`` ``[B]``) instead of the sequence loss."""
    from kronfluence.task import Task

    base = type(_kron_task(Task, seed))

    class TokenTask(base):  # type: ignore[misc, valid-type]
        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            ids, pos = batch["input_ids"], batch["position"]
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            rows = torch.arange(ids.shape[0], device=ids.device)
            # token s' is predicted by the logits at s' - 1
            return F.cross_entropy(logits[rows, pos - 1].float(), ids[rows, pos], reduction="sum")

    return TokenTask()


def ekfac_token_scores(method: Any, ctx: AttributionContext, tokens: Tensor) -> Tensor:
    """EK-FAC ``[K, N]`` with one kronfluence measurement per sampled query token (UNTESTED:
    written against kronfluence 1.0's ``Task.compute_measurement`` / pairwise-score API)."""
    _, n = lm_sizes(ctx)
    tokens = check_tokens(ctx, tokens)
    rows = _rows(ctx.x_query)
    query = [{**rows[j], "position": torch.tensor(p)} for j, p in tokens.tolist()]
    raw = kron_pairwise(method, ctx, _kron_token_task(method.seed), query)
    return bif_scores(raw, len(tokens), n, "EK-FAC", negate=True)
