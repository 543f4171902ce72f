"""Curvature of the training loss at the checkpoint, for setting the SGLD step size.

SGLD on the local posterior is stable only if ε · (nβ · λ_max(H) + γ) < 2, with H the Hessian of
the mean training loss at w*. λ_max is estimated by power iteration on Hessian-vector products
(forward-over-reverse ``torch.func.jvp`` of ``torch.func.grad``; reverse-over-reverse ``vjp``
for models with an op that has no forward-mode rule, e.g. PyTorch's fused CPU attention), which
costs a few dozen gradient evaluations and no Hessian in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from bif.config import BIFConfig
from bif.errors import ConfigError
from bif.functional import FunctionalModel, Params
from bif.task import Task

log = logging.getLogger(__name__)

# ε = AUTO_STEP_FACTOR / (nβ·λ_max + γ): a factor 4 below the stability limit; the stiffest
# direction's stationary variance is then inflated by 1/(1 - 0.5/4) ≈ 1.14, every other one less.
AUTO_STEP_FACTOR = 0.5
# h = KINETIC_STEP_FACTOR / sqrt(k_max) for the kinetic sampler: half the BAOAB stability limit.
KINETIC_STEP_FACTOR = 1.0


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def hessian_operator(
    fmodel: FunctionalModel, task: Task, chunks: list[Any], sizes: list[int]
) -> Callable[[Params], Params]:
    """``v -> H v`` at w* for the Hessian H of the mean loss over ``chunks`` (sizes: examples
    per chunk), summed chunk by chunk so activation memory stays that of one chunk."""
    n = sum(sizes)
    w = fmodel.w_star

    def chunk_loss(params: Params, batch: Any) -> Tensor:
        return task.loss(fmodel.model_fn(params), batch).sum() / n

    mode = {"forward": True}

    def chunk_hvp(batch: Any, v: Params) -> Params:
        g = lambda p: grad(chunk_loss)(p, batch)  # noqa: E731
        if mode["forward"]:
            try:
                return jvp(g, (w,), (v,))[1]
            except NotImplementedError as e:  # an op without a forward-mode AD rule
                log.info("HVPs fall back to reverse-over-reverse: %s", str(e).splitlines()[0])
                mode["forward"] = False
        try:
            return vjp(g, w)[1](v)[0]
        except (NotImplementedError, RuntimeError) as e:
            if "derivative" not in str(e) and "not implemented" not in str(e).lower():
                raise
            raise ConfigError(
                "the 'auto' rules and the preconditioner need Hessian-vector products, but an op "
                f"of this model has no second derivative ({str(e).splitlines()[0]}). For Hugging "
                "Face models load them with attn_implementation='eager' (fused attention kernels "
                "have none on the CPU), or pass numeric step_size and nbeta and "
                "precondition_rank=0."
            ) from e

    def hvp(v: Params) -> Params:
        out: Params | None = None
        for batch in chunks:
            hv = chunk_hvp(batch, v)
            out = hv if out is None else {k: out[k] + hv[k] for k in hv}
        assert out is not None
        return out

    return hvp


def power_iteration(
    op: Callable[[Params], Params],
    like: Params,
    iters: int = 20,
    seed: int = 0,
    tol: float = 1e-3,
    signed: bool = False,
) -> float:
    """Largest-magnitude eigenvalue of the symmetric linear map ``op`` (on dicts like ``like``),
    from a seeded random start; stops when the Rayleigh quotient changes by less than ``tol``
    relative. Its absolute value, or with ``signed`` the Rayleigh quotient itself."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for k, p in like.items()}
    norm = math.sqrt(float(_dot(v, v)))
    v = {k: x / norm for k, x in v.items()}
    estimate = 0.0
    for _ in range(iters):
        hv = op(v)
        new = float(_dot(v, hv))
        norm = math.sqrt(float(_dot(hv, hv)))
        if norm == 0.0 or not math.isfinite(norm):
            if not math.isfinite(new):
                return math.inf
            return new if signed else abs(new)
        v = {k: x / norm for k, x in hv.items()}
        if abs(new - estimate) <= tol * abs(new):
            estimate = new
            break
        estimate = new
    return estimate if signed else abs(estimate)


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
    hvp = hessian_operator(fmodel, task, chunks, sizes)
    return power_iteration(hvp, fmodel.w_star, iters, seed, tol)


def auto_step_size(lambda_max: float, cfg: BIFConfig) -> float:
    """Step size from the stiffest curvature ``k_max = nβ·λ_max + γ`` of the potential U.

    - 'sgld': ε = 0.5 / k_max, a factor 4 inside the stability limit ε·k_max < 2.
    - 'rmsprop': the same with k_max multiplied by the largest preconditioner value 1/eps
      (G = 1/(sqrt(V)+eps) never exceeds it).
    - 'kinetic': h = 1 / sqrt(k_max), half the BAOAB stability limit h·sqrt(k_max) < 2.
    """
    k_max = cfg.nbeta * lambda_max + cfg.gamma
    if cfg.sampler == "kinetic":
        return KINETIC_STEP_FACTOR / math.sqrt(k_max)
    g_max = 1.0 / cfg.rmsprop_eps if cfg.sampler == "rmsprop" else 1.0
    return AUTO_STEP_FACTOR / (g_max * k_max)


def auto_friction(cfg: BIFConfig) -> float:
    """f = 2·sqrt(γ): critical damping of the flattest direction of U, whose curvature is at
    least γ when the Hessian at w* is positive semi-definite. Stiffer directions are then
    underdamped, and every direction relaxes within about ``1/(sqrt(γ)·h)`` steps."""
    return 2.0 * math.sqrt(cfg.gamma)


def auto_gamma(w_star: Params, radius: float) -> float:
    """γ = P / (radius² · ||w*||²).

    Under the local posterior a direction the loss does not constrain has variance 1/γ, so each
    of the P coordinates then spreads by ``radius`` × RMS(w*): a relative, scale-free notion
    of "local". Too weak a γ lets the chains leave the basin of w* through flat or negatively
    curved directions (on the digits MLP, γ = 10 lets the mean training loss rise from 0.003 to
    2.8 nats and the LDS fall from 0.48 to 0.08).

    Raises:
        ConfigError: if w* is all zeros (no scale to be relative to).
    """
    sq = float(sum(v.double().pow(2).sum() for v in w_star.values()))
    num = sum(v.numel() for v in w_star.values())
    if not (sq > 0.0 and math.isfinite(sq)):
        raise ConfigError(
            "gamma='auto' sets the localisation relative to the size of the weights, but the "
            "sampled weights are all zero (or not finite); pass a numeric gamma."
        )
    return num / (radius**2 * sq)


def auto_nbeta(gamma: float, lambda_max: float, condition: float) -> float:
    """nβ = γ · condition / λ_max, i.e. damping λ = γ/nβ = λ_max / condition.

    The damping decides which directions of the loss count, like the damping of a classical
    influence function, and the condition number λ_max/λ of the sampled posterior decides how
    many steps the sampler needs (about sqrt(condition) for the kinetic sampler). Setting λ
    relative to λ_max makes the rule independent of the loss's scale.

    Raises:
        ConfigError: if λ_max is not positive and finite.
    """
    if not (lambda_max > 0.0 and math.isfinite(lambda_max)):
        raise ConfigError(
            f"nbeta='auto' needs a positive top Hessian eigenvalue, got {lambda_max!r}; the "
            "loss is flat at the checkpoint: pass a numeric nbeta."
        )
    return gamma * condition / lambda_max
