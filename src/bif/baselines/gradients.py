"""The per-sample gradient machinery that the gradient-similarity and influence baselines share.

Per-sample gradients use ``torch.func.vmap(grad(...))`` over chunks of examples and are
flattened to ``[B, P]`` in the order of the model's trainable parameters (those with
``requires_grad=True``, the same parameters BIF samples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from bif.baselines.base import AttributionContext
from bif.errors import ConfigError
from bif.functional import FunctionalModel, Params
from bif.task import Task, make_task, task_observable

F64 = torch.float64
PerSampleFn = Callable[[Callable, Any], Tensor]  # (model, batch) -> [B]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout off, BatchNorm frozen), each mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def context_task(ctx: AttributionContext) -> Task:
    """The context's task; ``ctx.extra["observable"]`` (optional) replaces the query loss."""
    return make_task(ctx.task, ctx.extra.get("observable"))


def flatten(params: Params) -> Tensor:
    """Concatenate parameter tensors into one vector ``[P]`` (dict order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: split ``[P]`` into tensors shaped like ``like``."""
    out, start = {}, 0
    for k, p in like.items():
        out[k] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def _cast(x: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = x.to(device)
    return x.to(dtype) if x.is_floating_point() else x


class GradientSource:
    """Per-sample gradients of a model at its checkpoint, flattened to ``[B, P]``.

    Args:
        model: the trained model (called in eval mode, never modified).
        task: gives the per-sample training loss and the query observable.
        dtype: compute in this dtype (None keeps the model's).
        chunk_size: examples per vmapped gradient call (bounds memory to chunk × model).
    """

    def __init__(
        self, model: nn.Module, task: Task, dtype: torch.dtype | None = None, chunk_size: int = 256
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        self.fmodel = FunctionalModel(model, device, dtype)
        self.task = task
        self.chunk_size = chunk_size
        self.dtype = next(iter(self.fmodel.w_star.values())).dtype

    @property
    def num_params(self) -> int:
        return self.fmodel.num_params

    def _grad_fn(self, fn: PerSampleFn) -> Callable[[Params, Tensor, Tensor], Params]:
        def one(params: Params, x: Tensor, y: Tensor) -> Tensor:
            # A batch of one, so every task's batched loss applies unchanged.
            return fn(self.fmodel.model_fn(params), (x.unsqueeze(0), y.unsqueeze(0)))[0]

        return vmap(grad(one), in_dims=(None, 0, 0))

    def chunks(self, x: Tensor, y: Tensor, query: bool = False) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, grads [b, P])`` over consecutive chunks of the examples ``(x, y)``.

        ``query=False`` differentiates the training loss, ``query=True`` the query observable.
        """
        fn: PerSampleFn = (
            (lambda m, b: task_observable(self.task, m, b)) if query else self.task.loss
        )
        gfn = self._grad_fn(fn)
        dev = self.fmodel.device
        for start in range(0, x.shape[0], self.chunk_size):
            xb = _cast(x[start : start + self.chunk_size], dev, self.dtype)
            yb = _cast(y[start : start + self.chunk_size], dev, self.dtype)
            g = gfn(self.fmodel.w_star, xb, yb)
            yield start, torch.cat([g[k].reshape(xb.shape[0], -1) for k in self.fmodel.w_star], 1)

    def all(self, x: Tensor, y: Tensor, query: bool = False) -> Tensor:
        """All per-sample gradients ``[B, P]`` at once (use for the Q queries, not for N)."""
        return torch.cat([g for _, g in self.chunks(x, y, query)], dim=0)


def normalise(g: Tensor) -> Tensor:
    """Rows ``[B, P]`` scaled to unit norm; a zero row (no direction) stays 0, so its cosine
    with anything is reported as 0."""
    return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
