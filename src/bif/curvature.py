"""Curvature of the training loss at the checkpoint, for setting the SGLD step size.

SGLD on the local posterior is stable only if ε · (nβ · λ_max(H) + γ) < 2, with H the Hessian of
the mean training loss at w*. λ_max is estimated by power iteration on Hessian-vector products
(forward-over-reverse ``torch.func.jvp`` of ``torch.func.grad``), which costs a few dozen
gradient evaluations and no Hessian in memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp

from bif.functional import FunctionalModel, Params
from bif.task import Task

# ε = AUTO_STEP_FACTOR / (nβ·λ_max + γ): a factor 4 below the stability limit; the stiffest
# direction's stationary variance is then inflated by 1/(1 - 0.5/4) ≈ 1.14, every other one less.
AUTO_STEP_FACTOR = 0.5


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def top_hessian_eigenvalue(
    fmodel: FunctionalModel,
    task: Task,
    chunks: list[Any],
    sizes: list[int],
    iters: int = 20,
    seed: int = 0,
    tol: float = 1e-3,
) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over ``chunks`` at w*.

    Args:
        fmodel: the functional model; w* are its sampled parameters.
        task: gives the per-sample loss.
        chunks: batches covering the examples whose mean loss is taken.
        sizes: number of examples in each chunk.
        iters: maximum power iterations.
        seed: seed of the random start vector.
        tol: stop when the estimate changes by less than this relative amount.
    """
    n = sum(sizes)
    w = fmodel.w_star

    def chunk_loss(params: Params, batch: Any) -> Tensor:
        return task.loss(fmodel.model_fn(params), batch).sum() / n

    def hvp(v: Params) -> Params:
        out: Params | None = None
        for batch in chunks:
            _, hv = jvp(lambda p, b=batch: grad(chunk_loss)(p, b), (w,), (v,))
            out = hv if out is None else {k: out[k] + hv[k] for k in hv}
        assert out is not None
        return out

    g = torch.Generator(device="cpu").manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for k, p in w.items()}
    norm = math.sqrt(float(_dot(v, v)))
    v = {k: x / norm for k, x in v.items()}
    estimate = 0.0
    for _ in range(iters):
        hv = hvp(v)
        new = float(_dot(v, hv))
        norm = math.sqrt(float(_dot(hv, hv)))
        if norm == 0.0 or not math.isfinite(norm):
            return abs(new) if math.isfinite(new) else math.inf
        v = {k: x / norm for k, x in hv.items()}
        if abs(new - estimate) <= tol * abs(new):
            estimate = new
            break
        estimate = new
    return abs(estimate)


def auto_step_size(
    lambda_max: float, nbeta: float, gamma: float, max_precond: float = 1.0
) -> float:
    """ε = 0.5 / (G_max · (nβ · λ_max + γ)): a factor 4 inside the SGLD stability limit.

    ``max_precond`` is the largest factor a preconditioner can put on the step (1 for plain
    SGLD; 1/eps for RMSProp-SGLD, whose G = 1/(sqrt(V)+eps) never exceeds 1/eps).
    """
    return AUTO_STEP_FACTOR / (max_precond * (nbeta * lambda_max + gamma))
