"""Iterative influence functions (CG, LiSSA) through dattri's inverse-Hessian attributors.

    score(q, n) = -∇ℓ_qᵀ (H + λI)⁻¹ ∇ℓ_n,   H = Hessian of the MEAN training loss at w*

dattri scores ``+∇ℓ_qᵀ (H + λI)⁻¹ ∇ℓ_n`` (positive = proponent); the adapters negate into bif's
convention (negative = training on n lowers the query loss). Verified against an exact damped
influence function built with ``torch.func.hessian`` in tests/test_peers.py.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor

from bif.baselines.base import AttributionContext
from bif.baselines.peers import (
    bif_scores,
    check_context,
    functional_mean_loss,
    loader,
    model_device,
    non_negative,
    positive_int,
    require,
    resolve_task,
    seeded,
)
from bif.errors import ConfigError


class _DattriInfluence:
    """Shared driver of dattri's inverse-Hessian attributors.

    dattri's own ``attribute`` re-solves the inverse-Hessian system for every training batch
    (and, for LiSSA, with fresh randomness each time, so scores of different batches would not
    be comparable); this driver solves once per query batch and streams the training gradients.
    The Hessian is that of the MEAN training loss over all N examples, plus ``damping · I``.
    """

    name = "if"
    label = "influence function"

    def __init__(self, damping: float, batch_size: int, query_batch_size: int, seed: int) -> None:
        self.damping = non_negative(damping, "damping")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.query_batch_size = positive_int(query_batch_size, "query_batch_size")
        self.seed = seed

    def _attributor(self, atask: Any, device: torch.device, ctx: AttributionContext) -> Any:
        raise NotImplementedError

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]`` (negative = training on n lowers query q's loss)."""
        require("dattri", self.label)
        from dattri.task import AttributionTask

        q, n = check_context(ctx)
        model = copy.deepcopy(ctx.model)
        device = model_device(model)
        loss = functional_mean_loss(model, resolve_task(ctx))
        atask = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        attributor = self._attributor(atask, device, ctx)
        # One batch: dattri sums the solves over the batches of this loader.
        attributor.cache(loader(ctx.x_train, ctx.y_train, n))
        with seeded(self.seed):
            solved = [
                attributor.transform_test_rep(0, attributor.generate_test_rep(0, _batched(x, y)))
                for x, y in loader(ctx.x_query, ctx.y_query, self.query_batch_size)
            ]
        queries = torch.cat(solved).detach()  # [Q, P] = (H + λI)^-1 ∇ℓ_q
        raw = torch.cat(
            [
                queries @ attributor.generate_train_rep(0, _batched(x, y)).detach().T
                for x, y in loader(ctx.x_train, ctx.y_train, self.batch_size)
            ],
            dim=1,
        )  # [Q, N]
        # dattri scores ∇ℓ_qᵀ(H + λI)⁻¹∇ℓ_n; upweighting n changes ℓ_q by minus that: negate.
        return bif_scores(raw, q, n, self.label, negate=True)


def _batched(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    # dattri's inner-product attributors take data as [1, B, ...] and vmap over dim 1.
    return x.unsqueeze(0), y.unsqueeze(0)


class DattriCGInfluence(_DattriInfluence):
    """Influence function with conjugate-gradient iHVPs (``dattri IFAttributorCG``).

    Args:
        damping: λ in ``(H + λI)⁻¹``, H the Hessian of the mean training loss.
        max_iter: CG iterations (dattri runs exactly this many, with no early stop).
        batch_size: training examples per gradient batch.
        query_batch_size: queries solved together (memory grows with it).
        seed: accepted for a uniform interface (CG is deterministic).
    """

    label = "CG influence"

    def __init__(
        self,
        damping: float = 1e-3,
        max_iter: int = 50,
        batch_size: int = 256,
        query_batch_size: int = 16,
        seed: int = 0,
        name: str = "if-cg-dattri",
    ) -> None:
        super().__init__(damping, batch_size, query_batch_size, seed)
        self.max_iter = positive_int(max_iter, "max_iter")
        self.name = name

    def _attributor(self, atask: Any, device: torch.device, ctx: AttributionContext) -> Any:
        from dattri.algorithm.influence_function import IFAttributorCG

        return IFAttributorCG(
            task=atask, device=device.type, max_iter=self.max_iter, regularization=self.damping
        )


class DattriLiSSAInfluence(_DattriInfluence):
    """Influence function with LiSSA iHVPs (``dattri IFAttributorLiSSA``).

    LiSSA iterates ``v ← g + (1 - d) v - H_B v / s`` on random minibatches B; its fixed point
    is ``s (H + s d I)⁻¹ g`` and dattri returns it divided by s, so dattri's ``damping`` is
    ``λ / s`` for bif's damping λ. It converges when ``s > λ_max(H_B) + λ`` and needs about
    ``s / λ`` steps; with ``scaling=None``, s is twice ``λ_max(H) + λ`` from a power iteration.

    Args:
        damping: λ in ``(H + λI)⁻¹``, H the Hessian of the mean training loss.
        recursion_depth: LiSSA steps per estimate.
        num_repeat: independent estimates averaged.
        hvp_batch_size: training examples per stochastic Hessian-vector product.
        scaling: s, or None to choose it as above.
    """

    label = "LiSSA influence"

    def __init__(
        self,
        damping: float = 1e-2,
        recursion_depth: int = 1000,
        num_repeat: int = 1,
        hvp_batch_size: int = 64,
        scaling: float | None = None,
        batch_size: int = 256,
        query_batch_size: int = 16,
        seed: int = 0,
        name: str = "if-lissa-dattri",
    ) -> None:
        super().__init__(damping, batch_size, query_batch_size, seed)
        self.recursion_depth = positive_int(recursion_depth, "recursion_depth")
        self.num_repeat = positive_int(num_repeat, "num_repeat")
        self.hvp_batch_size = positive_int(hvp_batch_size, "hvp_batch_size")
        self.scaling = None if scaling is None else non_negative(scaling, "scaling")
        if self.scaling == 0.0:
            raise ConfigError("LiSSA scaling must be > 0 (or None to choose it automatically).")
        self.name = name

    def _attributor(self, atask: Any, device: torch.device, ctx: AttributionContext) -> Any:
        from dattri.algorithm.influence_function import IFAttributorLiSSA

        scaling = self.scaling
        if scaling is None:
            top = _top_eigenvalue(atask, ctx, self.seed)
            scaling = 2.0 * (top + self.damping)
        self.scaling_used = scaling
        return IFAttributorLiSSA(
            task=atask,
            device=device.type,
            batch_size=min(self.hvp_batch_size, len(ctx.x_train)),
            num_repeat=self.num_repeat,
            recursion_depth=self.recursion_depth,
            damping=self.damping / scaling,
            scaling=scaling,
        )


def _top_eigenvalue(atask: Any, ctx: AttributionContext, seed: int, iters: int = 30) -> float:
    """Largest |eigenvalue| of the Hessian of the mean training loss (power iteration, HVPs)."""
    params, _ = atask.get_param(0)
    params = params.detach()
    loss = atask.get_loss_func()
    data = (ctx.x_train, ctx.y_train)
    grad = torch.func.grad(lambda p: loss(p, data))

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(params.shape, generator=gen, dtype=params.dtype).to(params.device)
    v = v / v.norm()
    top = 0.0
    for _ in range(iters):
        hv = torch.func.jvp(grad, (params,), (v,))[1].detach()
        norm = float(hv.norm())  # = |λ| once v is an eigenvector
        if not math.isfinite(norm) or norm == 0.0:
            break
        v = hv / norm
        converged = abs(norm - top) <= 1e-3 * norm
        top = norm
        if converged:
            break
    return top
