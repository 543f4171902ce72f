"""Training recipes as data, and two trainers that share them: one model, or many at once.

A :class:`Recipe` is AdamW on the mean cross-entropy, either full-batch (``batch_size=None``;
one step per epoch) or with seeded minibatches (each epoch a fresh permutation, the last
incomplete batch dropped so every step has ``batch_size`` examples). The seed of a run fixes the
minibatch order; the initialisation is the caller's (``build_model(seed)``).

- :func:`train_single` trains one ``nn.Module`` with ``torch.optim.AdamW`` (the slow twin).
- :func:`train_batched` trains ``M`` models at once: parameters stacked ``[M, ...]``, gradients by
  ``torch.func.vmap`` over ``functional_call``, AdamW written out on the stacked tensors with
  the same update as PyTorch's single-tensor AdamW. Row ``m`` trains on the examples
  ``idx[m]`` from the init ``build_model(seeds[m])``, exactly as :func:`train_single` would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bif.errors import ConfigError

Params = dict[str, Tensor]
# The minibatch order is drawn from its own stream so it never reuses the init's random bits.
ORDER_SALT = 0x5EED


@dataclass(frozen=True)
class Recipe:
    """AdamW on the mean cross-entropy (PyTorch's AdamW conventions).

    Attributes:
        lr, weight_decay, betas, eps: AdamW hyperparameters (decoupled weight decay).
        epochs: passes over the data; with ``batch_size=None`` each pass is one full-batch step.
        batch_size: minibatch size, or None for full-batch gradients.
    """

    lr: float
    weight_decay: float
    epochs: int
    batch_size: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)  # JSON round-trips lists, not tuples
        return {"optimizer": "AdamW", "loss": "mean cross-entropy", **d}

    def num_steps(self, n: int) -> int:
        return self.epochs * (1 if self.batch_size is None else n // self.batch_size)


def minibatch_order(n: int, recipe: Recipe, seed: int) -> Tensor | None:
    """Positions ``[T, B]`` into an n-example training set for each step (None: full batch)."""
    if recipe.batch_size is None:
        return None
    b = recipe.batch_size
    if n < b:
        raise ConfigError(f"the recipe's batch_size {b} exceeds the {n} training examples.")
    gen = torch.Generator().manual_seed(seed ^ ORDER_SALT)
    per_epoch = n // b
    rows = [torch.randperm(n, generator=gen)[: per_epoch * b].view(per_epoch, b)]
    rows += [torch.randperm(n, generator=gen)[: per_epoch * b].view(per_epoch, b)
             for _ in range(recipe.epochs - 1)]  # fmt: skip
    return torch.cat(rows)


def train_single(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    seed: int,
    recipe: Recipe,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Train one model in place with ``torch.optim.AdamW``; returns it in eval mode.

    Args:
        model: a fresh model (its initialisation is the caller's, e.g. ``build_model(seed)``).
        x: inputs ``[n, ...]``; y: labels ``[n]``.
        seed: fixes the minibatch order (unused for full-batch recipes).
        callback: called as ``callback(t, model)`` after optimiser step ``t`` (1-based), e.g. to
            save the checkpoints TracIn needs.
    """
    order = minibatch_order(len(x), recipe, seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
        betas=recipe.betas, eps=recipe.eps,
    )  # fmt: skip
    model.train()
    for t in range(recipe.num_steps(len(x))):
        xb, yb = (x, y) if order is None else (x[order[t]], y[order[t]])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if callback is not None:
            callback(t + 1, model)
    return model.eval()


def stack_inits(build_model: Callable[[int], nn.Module], seeds: Tensor) -> tuple[nn.Module, Params]:
    """A template module and the initial parameters of ``build_model(s)`` stacked ``[M, ...]``."""
    models = [build_model(int(s)) for s in seeds]
    return models[0].eval(), stack_params(models)


def stack_params(models: list[nn.Module]) -> Params:
    """The parameters of same-architecture models, stacked ``[M, ...]`` (detached)."""
    named = [dict(m.named_parameters()) for m in models]
    return {k: torch.stack([n[k].detach() for n in named]) for k in named[0]}


def train_batched(
    build_model: Callable[[int], nn.Module],
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    seeds: Tensor,
    recipe: Recipe,
) -> tuple[nn.Module, Params]:
    """Train ``M`` models at once, row ``m`` on ``x[idx[m]]`` from ``build_model(seeds[m])``.

    Args:
        x: all inputs ``[N, ...]``; y: all labels ``[N]``.
        idx: ``[M, K]`` training examples of each model (K the same for every row).
        seeds: ``[M]`` init and minibatch-order seed of each model.

    Returns:
        The template module (for ``functional_call``) and the trained parameters ``[M, ...]``.
        Models must have no buffers that training changes (no BatchNorm) and no dropout.
    """
    k = idx.shape[1]
    module, params = stack_inits(build_model, seeds)
    buffers = dict(module.named_buffers())

    def mean_loss(p: Params, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(module, {**p, **buffers}, (xb,)), yb)

    grads_of = vmap(grad(mean_loss), in_dims=(0, 0, 0))
    orders = [minibatch_order(k, recipe, int(s)) for s in seeds]
    if orders[0] is not None:
        pos = torch.stack(orders)  # [M, T, B] positions into each row of idx
        batch_idx = torch.gather(idx, 1, pos.flatten(1)).view_as(pos)  # [M, T, B]
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    beta1, beta2 = recipe.betas
    full = (x[idx], y[idx]) if orders[0] is None else None  # gathered once: [M, K, ...]
    for t in range(recipe.num_steps(k)):
        if full is None:
            rows = batch_idx[:, t]  # [M, B]
            grads = grads_of(params, x[rows], y[rows])
        else:
            grads = grads_of(params, *full)
        step = t + 1
        # PyTorch's single-tensor AdamW, term by term, so the slow twin can match it.
        bias1, bias2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
        for n, p in params.items():
            g = grads[n]
            p.mul_(1 - recipe.lr * recipe.weight_decay)
            exp_avg[n].lerp_(g, 1 - beta1)
            exp_avg_sq[n].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq[n].sqrt() / bias2_sqrt).add_(recipe.eps)
            p.addcdiv_(exp_avg[n], denom, value=-recipe.lr / bias1)
    return module, params


@torch.no_grad()
def batched_logits(module: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Outputs ``[M, n, ...]`` of the stacked models on shared inputs ``x [n, ...]``."""
    buffers = dict(module.named_buffers())
    return vmap(lambda p: functional_call(module, {**p, **buffers}, (x,)))(params)


def train_looped(
    build_model: Callable[[int], nn.Module],
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    seeds: Tensor,
    recipe: Recipe,
) -> tuple[nn.Module, Params]:
    """:func:`train_batched`'s signature and result, one :func:`train_single` run per row.

    For architectures where vmap is slower than a loop on CPU (convolutions become grouped
    convolutions, about 3× slower per model than one ordinary convolution here).
    """
    trained = [
        train_single(build_model(int(s)), x[rows], y[rows], int(s), recipe)
        for rows, s in zip(idx, seeds, strict=True)
    ]
    return trained[0], stack_params(trained)
