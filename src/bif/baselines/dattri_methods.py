"""TRAK and TracIn through dattri (its CG and LiSSA influence functions: dattri_influence.py).

dattri's attributors return ``[N, Q]`` scores whose POSITIVE sign means "training on n lowers
query q's loss" (proponent); every adapter transposes and negates into bif's convention. The
signs were verified against hand-computed references (exact damped influence function, gradient
dot products) on tiny models: see tests/test_peers.py.

Install: ``make compare-install`` (dattri 0.3.0 declares no torch requirement, so it installs on
bif's CPU torch as is).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bif.baselines import lm_methods
from bif.baselines.base import AttributionContext
from bif.baselines.peers import (
    Params,
    bif_scores,
    check_context,
    functional_sample_loss,
    is_classification,
    loader,
    model_device,
    non_negative,
    positive_int,
    projector_kwargs,
    quiet_dattri,
    require,
    resolve_task,
    seeded,
    with_projector,
)
from bif.errors import ConfigError
from bif.task import margin


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TRAK:
    """TRAK (Park et al. 2023) via ``dattri.algorithm.trak.TRAKAttributor``.

    Features are randomly projected gradients of the margin ``f = logit_y - logsumexp(others)``
    (classification; the loss for other tasks), re-weighted by ``1 - p_correct``; an ensemble of
    ``ensemble_size`` models averages the kernel regressions (members beyond the checkpoint are
    retrained with ``ctx.build_model`` and ``ctx.train_fn``).

    Args:
        proj_dim: random projection dimension k (must not exceed N unless ``damping > 0``).
        ensemble_size: number of independently trained models (1 = the checkpoint alone).
        damping: ridge added to the kernel ``Φᵀ Φ`` before solving.
        batch_size: examples per per-sample-gradient batch.
        seed: projection seed; ensemble member i is trained with seed ``seed + i``.
    """

    def __init__(
        self,
        proj_dim: int = 512,
        ensemble_size: int = 1,
        damping: float = 0.0,
        batch_size: int = 256,
        seed: int = 0,
        name: str = "trak",
    ) -> None:
        self.proj_dim = positive_int(proj_dim, "proj_dim")
        self.ensemble_size = positive_int(ensemble_size, "ensemble_size")
        self.damping = non_negative(damping, "damping")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed = seed
        self.name = name

    def _members(self, ctx: AttributionContext) -> list[dict[str, Tensor]]:
        members = [ctx.model]
        if self.ensemble_size > 1 and (ctx.build_model is None or ctx.train_fn is None):
            raise ConfigError(
                f"TRAK with ensemble_size={self.ensemble_size} retrains models: give the context "
                "build_model and train_fn, or use ensemble_size=1."
            )
        for i in range(1, self.ensemble_size):
            fresh = ctx.build_model(self.seed + i)  # type: ignore[misc]
            members.append(ctx.train_fn(fresh, ctx.x_train, ctx.y_train, self.seed + i))  # type: ignore[misc]
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in members]

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]`` (negative = training on n lowers query q's loss)."""
        require("dattri", "TRAK")
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask

        if lm_methods.is_lm_context(ctx):  # token batches: the LM adapter
            return lm_methods.trak_scores(self, ctx)
        q, n = check_context(ctx)
        if self.proj_dim > n and self.damping == 0.0:
            raise ConfigError(
                f"TRAK's kernel is singular when proj_dim ({self.proj_dim}) exceeds the number of "
                f"training examples ({n}): lower proj_dim or set damping > 0."
            )
        task = resolve_task(ctx)
        model = copy.deepcopy(ctx.model)  # dattri loads each member's state_dict into it
        device = model_device(model)
        checkpoints = self._members(ctx)

        if is_classification(task):

            def output(params: Params, data: tuple[Tensor, Tensor]) -> Tensor:
                x, y = data
                logits = functional_call(model, params, (x.unsqueeze(0),))
                return margin(logits, y.unsqueeze(0).long()).squeeze(0)

            def p_correct(params: Params, data: tuple[Tensor, Tensor]) -> Tensor:
                return torch.sigmoid(output(params, data))  # p_y = sigmoid(margin), exactly

        else:
            # No probability to re-weight by: features are loss gradients and Q = 1 - 0.
            output = functional_sample_loss(model, task)  # type: ignore[assignment]

            def p_correct(params: Params, data: tuple[Tensor, Tensor]) -> Tensor:
                return torch.zeros((), device=device)

        atask = AttributionTask(loss_func=output, model=model, checkpoints=checkpoints)
        attributor = with_projector(
            TRAKAttributor,
            task=atask,
            correct_probability_func=p_correct,
            projector_kwargs=projector_kwargs(self.proj_dim, self.seed, device, "normal"),
            device=device.type,
            regularization=self.damping,
        )
        with seeded(self.seed), quiet_dattri():
            attributor.cache(loader(ctx.x_train, ctx.y_train, self.batch_size))
            raw = attributor.attribute(loader(ctx.x_query, ctx.y_query, self.batch_size))
        # Positive TRAK = training on n raises the query's margin (lowers its loss): negate.
        return bif_scores(raw.T, q, n, "TRAK", negate=True)


class TracIn:
    """TracIn (Pruthi et al. 2020) via ``dattri.algorithm.tracin.TracInAttributor``.

    ``Σ_t η_t ∇ℓ_q(w_t) · ∇ℓ_n(w_t)`` over ``ctx.checkpoints`` with ``ctx.learning_rates``.

    Args:
        proj_dim: random projection dimension, or None for exact gradients (no projection).
        normalize: cosine instead of dot products (TracIn-CP "CosIn").
        batch_size: examples per per-sample-gradient batch.
        seed: projection seed.
    """

    def __init__(
        self,
        proj_dim: int | None = None,
        normalize: bool = False,
        batch_size: int = 256,
        seed: int = 0,
        name: str = "tracin",
    ) -> None:
        self.proj_dim = None if proj_dim is None else positive_int(proj_dim, "proj_dim")
        self.normalize = bool(normalize)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.seed = seed
        self.name = name

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]`` (negative = training on n lowers query q's loss)."""
        require("dattri", "TracIn")
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.task import AttributionTask

        q, n = check_context(ctx)
        if not ctx.checkpoints or len(ctx.checkpoints) != len(ctx.learning_rates):
            raise ConfigError(
                "TracIn needs the training trajectory: ctx.checkpoints (state_dicts) and one "
                f"learning rate per checkpoint; got {len(ctx.checkpoints)} checkpoints and "
                f"{len(ctx.learning_rates)} learning rates."
            )
        model = copy.deepcopy(ctx.model)  # dattri loads every checkpoint into it
        device = model_device(model)
        loss = functional_sample_loss(model, resolve_task(ctx))
        atask = AttributionTask(loss_func=loss, model=model, checkpoints=list(ctx.checkpoints))
        kind = "identity" if self.proj_dim is None else "normal"
        dim = _num_params(model) if self.proj_dim is None else self.proj_dim
        attributor = with_projector(
            TracInAttributor,
            task=atask,
            weight_list=torch.tensor([float(lr) for lr in ctx.learning_rates]),
            normalized_grad=self.normalize,
            projector_kwargs=projector_kwargs(dim, self.seed, device, kind),
            device=device.type,
        )
        with seeded(self.seed), quiet_dattri():
            raw = attributor.attribute(
                loader(ctx.x_train, ctx.y_train, self.batch_size),
                loader(ctx.x_query, ctx.y_query, self.batch_size),
            )
        # A gradient step on n changes ℓ_q by -η ∇ℓ_q·∇ℓ_n: positive TracIn = proponent.
        return bif_scores(raw.T, q, n, "TracIn", negate=True)
