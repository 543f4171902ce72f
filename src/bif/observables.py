"""Per-draw evaluation of every attributed example: forward passes only, chunked, no gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bif.data import DataSource
from bif.errors import ShapeError
from bif.functional import FunctionalModel, Params, per_chain
from bif.task import Task, task_observable

PerSample = Callable[[Task, Callable, Any], Tensor]


def train_losses(task: Task, model: Callable, batch: Any) -> Tensor:
    return task.loss(model, batch)


def query_observables(task: Task, model: Callable, batch: Any) -> Tensor:
    return task_observable(task, model, batch)


class Evaluator:
    """Evaluates a per-sample quantity of all examples of ``source`` for a group of chains.

    Collated chunks are cached after the first pass: evaluation sets are fixed, and re-collating
    a ``Dataset`` at every draw would dominate the cost for small models.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        task: Task,
        source: DataSource,
        what: PerSample,
        chunk_size: int,
        vmapped: bool,
    ) -> None:
        self.source = source
        self.chunk_size = chunk_size
        self._chunks: list[Any] | None = None

        def one_chain(params: Params, batch: Any) -> Tensor:
            return what(task, fmodel.model_fn(params), batch)

        self._fn = per_chain(one_chain, vmapped, batch_in_dim=None)

    def chunks(self) -> list[Any]:
        if self._chunks is None:
            self._chunks = [b for _, b in self.source.chunks(self.chunk_size)]
        return self._chunks

    @torch.no_grad()
    def __call__(self, params: Params) -> Tensor:
        """Per-sample values ``[G, len(source)]`` at chain-stacked ``params`` ``[G, ...]``."""
        return torch.cat([self._fn(params, b) for b in self.chunks()], dim=1)


def check_per_sample(values: Any, batch_len: int, what: str) -> Tensor:
    """Validate that a task returned one finite-or-not number per example: shape [B]."""
    if not isinstance(values, Tensor):
        raise ShapeError(f"the {what} must return a tensor of shape [B], got {type(values)}.")
    if values.shape != (batch_len,):
        hint = ""
        if values.dim() == 0:
            hint = " It returned a scalar: use reduction='none' so each example keeps its loss."
        elif values.dim() > 1:
            hint = " Reduce every dimension except the batch one (e.g. .sum(-1) over outputs)."
        raise ShapeError(
            f"the {what} must return one value per example, shape [{batch_len}], "
            f"got {tuple(values.shape)}.{hint}"
        )
    return values
