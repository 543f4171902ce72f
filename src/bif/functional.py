"""The user's ``nn.Module`` as a pure function of its sampled parameters.

Parameters with ``requires_grad=True`` are sampled; those with ``requires_grad=False`` and all
buffers are held fixed at their checkpoint values. A chain dimension is added by
``torch.func.vmap`` (all chains in one call, for models small enough to replicate ``C`` times)
or by a plain loop over chains (memory of one replica); the two share every line of maths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from bif.errors import ConfigError

Params = dict[str, Tensor]


class FunctionalModel:
    """``(params, inputs) -> outputs`` for a module, with its fixed tensors captured.

    Args:
        module: any ``nn.Module``; it is called in whatever mode it is in (bif puts it in eval
            mode first) and is never modified.
        device: where the sampled and fixed tensors live.
        dtype: floating parameters and buffers are cast to it (None keeps their dtype).
        forward_dtype: if given, every forward pass runs in it (e.g. ``torch.bfloat16``): the
            sampled weights stay in ``dtype`` (master weights: the sampler's small updates are
            not rounded away), and are cast on the way in; gradients flow back through the cast.
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        forward_dtype: torch.dtype | None = None,
    ) -> None:
        self.module = module
        self.device = torch.device(device)
        self.forward_dtype = forward_dtype

        def prep(t: Tensor) -> Tensor:
            t = t.detach().to(self.device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t

        named = dict(module.named_parameters())
        self.w_star: Params = {k: prep(p).clone() for k, p in named.items() if p.requires_grad}
        self.fixed: dict[str, Tensor] = {
            k: prep(p) for k, p in named.items() if not p.requires_grad
        }
        self.fixed.update({k: prep(b) for k, b in module.named_buffers()})
        if forward_dtype is not None:
            self.fixed = {
                k: t.to(forward_dtype) if t.is_floating_point() else t
                for k, t in self.fixed.items()
            }
        if not self.w_star:
            raise ConfigError(
                "the model has no parameter with requires_grad=True, so there is nothing to "
                "sample. "
                "Enable gradients on the parameters (or layers) whose posterior defines the BIF."
            )

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.w_star.values())

    def model_fn(self, params: Params) -> Callable[..., Any]:
        """A callable ``inputs -> outputs`` at weights ``params`` (one chain, no chain dim)."""

        fd = self.forward_dtype
        if fd is not None:
            params = {k: v.to(fd) if v.is_floating_point() else v for k, v in params.items()}

        def call(*args: Any, **kwargs: Any) -> Any:
            if fd is not None:  # float inputs follow the forward dtype (ids stay integers)
                args, kwargs = tree_map(_cast_float(fd), (args, kwargs))
            return functional_call(self.module, {**params, **self.fixed}, args, kwargs)

        return call


def _cast_float(dtype: torch.dtype) -> Callable[[Any], Any]:
    return lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t


def per_chain(fn: Callable[..., Any], vmapped: bool, batch_in_dim: int | None) -> Callable:
    """Lift ``fn(params, batch)`` to chain-stacked params ``[C, ...]``.

    ``batch_in_dim`` is 0 when each chain has its own batch (minibatch SGLD) and None when all
    chains share it (full batch, evaluation). The loop twin stacks per-chain results so both
    return the same shapes; tests check they agree.
    """
    if vmapped:
        return vmap(fn, in_dims=(0, batch_in_dim), randomness="error")

    def looped(params: Params, batch: Any) -> Any:
        num_chains = next(iter(params.values())).shape[0]
        outs = []
        for c in range(num_chains):
            p_c = {k: v[c] for k, v in params.items()}
            b_c = batch if batch_in_dim is None else _index_tree(batch, c)
            outs.append(fn(p_c, b_c))
        return _stack_tree(outs)

    return looped


def _index_tree(tree: Any, i: int) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, tree)


def _stack_tree(trees: list[Any]) -> Any:
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flats = [tree_flatten(t) for t in trees]
    spec = flats[0][1]
    leaves = [torch.stack([f[0][j] for f in flats]) for j in range(len(flats[0][0]))]
    return tree_unflatten(leaves, spec)


def mean_loss_and_grad(
    fmodel: FunctionalModel, per_sample_loss: Callable[[Callable, Any], Tensor]
) -> Callable[[Params, Any], tuple[Params, Tensor]]:
    """``(params, batch) -> (∇ mean loss, mean loss)`` for one chain (pure; vmappable)."""

    def mean_loss(params: Params, batch: Any) -> Tensor:
        return per_sample_loss(fmodel.model_fn(params), batch).mean()

    return grad_and_value(mean_loss)


def mean_loss_grad_and_losses(
    fmodel: FunctionalModel,
    losses: Callable[[Callable, Any], Tensor],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Params, Any], tuple[Params, tuple[Tensor, Tensor]]]:
    """``(params, batch) -> (∇ mean loss, (mean loss, values))`` for one chain: the gradient of
    :func:`mean_loss_and_grad` and, from the same forward pass, the per-example ``values``
    (``[B]``, or ``[B, S]`` per-token losses that ``reduce`` sums to the per-example loss).

    The sampling loop's training losses at a draw are these values of the next step's
    gradient pass (the fused evaluation), instead of a second forward pass at the draw.
    """

    def mean_loss(params: Params, batch: Any) -> tuple[Tensor, Tensor]:
        v = losses(fmodel.model_fn(params), batch)
        per = v if reduce is None else reduce(v)
        return per.mean(), v.detach()

    return grad_and_value(mean_loss, has_aux=True)
