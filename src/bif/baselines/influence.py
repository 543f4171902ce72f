"""Classical damped influence functions: exact (Hessian in memory), CG and LiSSA (HVPs only).

    score(q, n) = -∇φ_q(w*)ᵀ (H + λI)⁻¹ ∇l_n(w*),   H = ∇² L_n(w*),  L_n = MEAN training loss

i.e. the derivative of φ_q with respect to up-weighting l_n in the objective ``L_n + λ/2·||w||²``
(bif's sign convention: negative = training on n lowers φ_q). The BIF approximates
``score / nβ`` with ``λ = γ / nβ`` (BIF_NOTES.md §2). No 1/N removal factor is applied; it would
not change any ranking.

These are slow reference implementations in float64 by default: :class:`ExactInfluence` builds
the Hessian with ``torch.func.hessian``; :class:`CGInfluence` and :class:`LiSSAInfluence` only
use Hessian-vector products (forward-over-reverse), so the two families check each other.
The damped Hessian must be positive definite (λ > -λ_min(H)) for the scores to mean anything.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, vmap

from bif.baselines.base import AttributionContext
from bif.baselines.gradients import (
    F64,
    GradientSource,
    context_task,
    eval_mode,
    flatten,
    unflatten,
)
from bif.curvature import top_hessian_eigenvalue
from bif.errors import ConfigError

log = logging.getLogger(__name__)


class ModelTooLargeError(ConfigError):
    """The model has too many parameters for a dense Hessian; use an HVP-based method."""


def _positive(name: str, v: Any, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not v > 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{name} must be {kind}, got {v!r}.")


class _InfluenceBase:
    """Shared scoring: ``X = (H + λI)⁻¹ ∇φ_Q`` solved per method, then ``-X ∇l_nᵀ`` by chunks."""

    name = "if"

    def __init__(self, damping: float, chunk_size: int, dtype: torch.dtype) -> None:
        if isinstance(damping, bool) or not isinstance(damping, int | float) or damping < 0:
            raise ConfigError(f"damping must be a number >= 0, got {damping!r}.")
        _positive("chunk_size", chunk_size, integer=True)
        self.damping = float(damping)
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.info: dict[str, Any] = {}

    def _solve(self, src: GradientSource, ctx: AttributionContext, b: Tensor) -> Tensor:
        """``(H + λI)⁻¹ b`` for right-hand sides ``b`` ``[K, P]`` -> ``[K, P]``."""
        raise NotImplementedError

    def _source(self, ctx: AttributionContext) -> GradientSource:
        return GradientSource(ctx.model, context_task(ctx), self.dtype, self.chunk_size)

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]`` (float64, CPU)."""
        with eval_mode(ctx.model):
            src = self._source(ctx)
            gq = src.all(ctx.x_query, ctx.y_query, query=True)  # [Q, P]
            x = self._solve(src, ctx, gq).to(F64)  # [Q, P]
            out = torch.empty(gq.shape[0], ctx.x_train.shape[0], dtype=F64, device=x.device)
            for start, g in src.chunks(ctx.x_train, ctx.y_train):
                out[:, start : start + g.shape[0]] = -(x @ g.to(F64).T)
        return out.cpu()


def train_chunks(
    src: GradientSource, ctx: AttributionContext, index: Tensor, size: int
) -> list[tuple[Tensor, Tensor]]:
    """Training examples ``index`` as ``(x, y)`` chunks of ``size`` on the model's device/dtype."""
    out = []
    for start in range(0, index.numel(), size):
        i = index[start : start + size]
        pair = []
        for t in (ctx.x_train[i], ctx.y_train[i]):
            t = t.to(src.fmodel.device)
            pair.append(t.to(src.dtype) if t.is_floating_point() else t)
        out.append((pair[0], pair[1]))
    return out


# ---------------------------------------------------------------------------------------------
# Exact: dense Hessian
# ---------------------------------------------------------------------------------------------


class ExactInfluence(_InfluenceBase):
    """Influence with the dense Hessian of the mean training loss (small models only).

    Args:
        damping: λ added to the Hessian's diagonal.
        max_params: refuse models with more trainable parameters (the Hessian is P² floats).
        chunk_size: examples per per-sample-gradient call.
        hessian_budget: bound on examples × parameters per ``torch.func.hessian`` call (its
            forward-mode pass carries P tangents for every example of the chunk).
        dtype: computation dtype (float64 by default: this is a reference).
    """

    name = "if-exact"

    def __init__(
        self,
        damping: float = 1e-3,
        max_params: int = 6000,
        chunk_size: int = 256,
        hessian_budget: int = 2**18,
        dtype: torch.dtype = F64,
    ) -> None:
        super().__init__(damping, chunk_size, dtype)
        _positive("max_params", max_params, integer=True)
        _positive("hessian_budget", hessian_budget, integer=True)
        self.max_params = max_params
        self.hessian_budget = hessian_budget

    def hessian(self, src: GradientSource, ctx: AttributionContext) -> Tensor:
        """Hessian ``[P, P]`` of the mean training loss at w*."""
        p = src.num_params
        if p > self.max_params:
            raise ModelTooLargeError(
                f"ExactInfluence builds a dense {p}x{p} Hessian but max_params={self.max_params}. "
                "Use CGInfluence (Hessian-vector products only), or raise max_params if "
                f"{p * p * 8 / 2**30:.1f} GiB of float64 fits in memory."
            )
        fm, task = src.fmodel, src.task
        n = ctx.x_train.shape[0]
        theta = flatten(fm.w_star)
        step = max(1, min(n, self.hessian_budget // p))
        h = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
        for xb, yb in train_chunks(src, ctx, torch.arange(n), step):

            def chunk_loss(t: Tensor, xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                return task.loss(fm.model_fn(unflatten(t, fm.w_star)), (xb, yb)).sum() / n

            h += hessian(chunk_loss)(theta)
        return 0.5 * (h + h.T)  # symmetric up to round-off; make it exact for eigh/solve

    def _solve(self, src: GradientSource, ctx: AttributionContext, b: Tensor) -> Tensor:
        h = self.hessian(src, ctx)
        eig = torch.linalg.eigvalsh(h)
        self.info = {"lambda_min": float(eig[0]), "lambda_max": float(eig[-1])}
        if float(eig[0]) + self.damping <= 0:
            log.warning(
                "H + λI is not positive definite (λ_min(H) = %.3g, λ = %.3g): influence scores "
                "are ill-defined; raise the damping above %.3g.",
                float(eig[0]), self.damping, -float(eig[0]),
            )  # fmt: skip
        a = h + self.damping * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        return torch.linalg.solve(a, b.to(h.dtype).T).T

    def self_influence(self, ctx: AttributionContext) -> Tensor:
        """``-∇l_nᵀ (H + λI)⁻¹ ∇l_n`` ``[N]`` (more negative = more suspicious)."""
        with eval_mode(ctx.model):
            src = self._source(ctx)
            h = self.hessian(src, ctx)
            a = h + self.damping * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            chol, bad = torch.linalg.cholesky_ex(a)
            if int(bad):
                raise ConfigError("H + λI is not positive definite; raise the damping.")
            parts = []
            for _, g in src.chunks(ctx.x_train, ctx.y_train):
                z = torch.linalg.solve_triangular(chol, g.to(h.dtype).T, upper=False)  # L⁻¹ gᵀ
                parts.append(z.pow(2).sum(0))
        return -torch.cat(parts).to(F64).cpu()


# ---------------------------------------------------------------------------------------------
# Hessian-vector products, batched over right-hand sides
# ---------------------------------------------------------------------------------------------


def damped_hvp(src: GradientSource, ctx: AttributionContext, damping: float, batch: Tensor | None):
    """``V [K, P] -> (H_B + λI) V`` with H_B the Hessian of the mean loss over ``batch`` indices
    (None: all training examples), by forward-over-reverse products, chunked over examples."""
    fm, task = src.fmodel, src.task
    theta = flatten(fm.w_star)
    index = torch.arange(ctx.x_train.shape[0]) if batch is None else batch
    n = index.numel()
    parts = train_chunks(src, ctx, index, src.chunk_size)

    def hv(v: Tensor) -> Tensor:
        out = damping * v
        for xb, yb in parts:

            def chunk_loss(t: Tensor, xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                return task.loss(fm.model_fn(unflatten(t, fm.w_star)), (xb, yb)).sum() / n

            out = out + jvp(grad(chunk_loss), (theta,), (v,))[1]
        return out

    return vmap(hv)


class CGInfluence(_InfluenceBase):
    """Influence by conjugate gradients on ``(H + λI) x = ∇φ_q``, all queries as one batch.

    Args:
        damping: λ; CG needs ``H + λI`` positive definite.
        max_iter: CG iterations at most (P iterations solve exactly in exact arithmetic).
        tol: stop a query once ``||r|| <= tol · ||∇φ_q||``.
        chunk_size: examples per gradient / HVP call.
        query_block: queries solved together (memory grows with block × chunk_size).
        dtype: computation dtype.
    """

    name = "if-cg"

    def __init__(
        self,
        damping: float = 1e-3,
        max_iter: int = 200,
        tol: float = 1e-8,
        chunk_size: int = 256,
        query_block: int = 64,
        dtype: torch.dtype = F64,
    ) -> None:
        super().__init__(damping, chunk_size, dtype)
        _positive("max_iter", max_iter, integer=True)
        _positive("tol", tol)
        _positive("query_block", query_block, integer=True)
        self.max_iter, self.tol, self.query_block = max_iter, float(tol), query_block

    def _solve(self, src: GradientSource, ctx: AttributionContext, b: Tensor) -> Tensor:
        apply = damped_hvp(src, ctx, self.damping, None)
        xs, iters, worst = [], 0, 0.0
        for start in range(0, b.shape[0], self.query_block):
            x, it, res = batched_cg(apply, b[start : start + self.query_block], self.max_iter,
                                    self.tol)  # fmt: skip
            xs.append(x)
            iters, worst = max(iters, it), max(worst, res)
        self.info = {"iterations": iters, "max_relative_residual": worst}
        if worst > self.tol:
            log.warning(
                "CG stopped after %d iterations with relative residual %.2g > tol %.2g; raise "
                "max_iter or the damping.", iters, worst, self.tol,
            )  # fmt: skip
        return torch.cat(xs)


def batched_cg(apply, b: Tensor, max_iter: int, tol: float) -> tuple[Tensor, int, float]:
    """Solve ``A x_k = b_k`` for every row of ``b`` ``[K, P]`` (A symmetric positive definite).

    Each row has its own step sizes; converged rows are frozen (their residual stays below
    ``tol · ||b_k||``) so no 0/0 appears.

    Returns:
        x ``[K, P]``, iterations run, worst relative residual.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    bnorm = b.norm(dim=1)
    rs = (r * r).sum(1)
    active = rs.sqrt() > tol * bnorm
    it = 0
    while bool(active.any()) and it < max_iter:
        ap = apply(p)
        curv = (p * ap).sum(1)
        if bool((curv[active] <= 0).any()):
            raise ConfigError(
                "CG met a direction of non-positive curvature: H + λI is not positive definite. "
                "Raise the damping."
            )
        alpha = torch.where(active, rs / torch.where(active, curv, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        p = r + beta[:, None] * p
        rs = rs_new
        active = active & (rs.sqrt() > tol * bnorm)
        it += 1
    rel = (rs.sqrt() / bnorm.clamp_min(torch.finfo(b.dtype).tiny)).max()
    return x, it, float(rel)


class LiSSAInfluence(_InfluenceBase):
    """Influence by the LiSSA recursion ``h ← b + (I - (H_B + λI)/s) h``, ``x = h / s``.

    Converges (geometrically, rate ``1 - (λ_min(H) + λ)/s``) when ``s > λ_max(H) + λ``; slow
    for small damping, which is why CG is the default iterative reference.

    Args:
        damping: λ.
        depth: recursion steps.
        scale: s, or "auto" = 1.2 · (λ_max(H) + λ) from power iteration.
        batch_size: examples per HVP (None = full batch, deterministic; else sampled per step).
        seed: seed of the HVP minibatches.
        chunk_size, dtype: as for :class:`CGInfluence`.
    """

    name = "if-lissa"

    def __init__(
        self,
        damping: float = 1e-3,
        depth: int = 1000,
        scale: float | str = "auto",
        batch_size: int | None = None,
        seed: int = 0,
        chunk_size: int = 256,
        dtype: torch.dtype = F64,
    ) -> None:
        super().__init__(damping, chunk_size, dtype)
        _positive("depth", depth, integer=True)
        if scale != "auto":
            _positive("scale", scale)
        if batch_size is not None:
            _positive("batch_size", batch_size, integer=True)
        self.depth, self.scale, self.batch_size, self.seed = depth, scale, batch_size, seed

    def _solve(self, src: GradientSource, ctx: AttributionContext, b: Tensor) -> Tensor:
        n = ctx.x_train.shape[0]
        scale = self.scale
        if scale == "auto":
            chunks = train_chunks(src, ctx, torch.arange(n), self.chunk_size)
            sizes = [c[0].shape[0] for c in chunks]
            lam = top_hessian_eigenvalue(src.fmodel, src.task, chunks, sizes, iters=50, seed=0)
            scale = 1.2 * (lam + self.damping)
        g = torch.Generator().manual_seed(self.seed)
        full = damped_hvp(src, ctx, self.damping, None) if self.batch_size is None else None
        h = b.clone()
        for _ in range(self.depth):
            if full is None:
                idx = torch.randperm(n, generator=g)[: self.batch_size]
                apply = damped_hvp(src, ctx, self.damping, idx)
            else:
                apply = full
            h = b + h - apply(h) / scale
        self.info = {"scale": float(scale)}
        return h / scale
