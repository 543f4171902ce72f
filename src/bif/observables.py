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

    With ``tokens=True`` (a task with ``token_losses``/``token_mask``, e.g. a causal LM) one
    forward pass gives the per-token losses; the per-sample value is their float64 sum over the
    attributed positions, so sequence-level statistics are exactly sums of token-level ones.
    ``token_index`` then holds ``[K, 2]`` (example, position) of the ``K`` attributed tokens, in
    the order of :meth:`evaluate`'s token values.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        task: Task,
        source: DataSource,
        what: PerSample,
        chunk_size: int,
        vmapped: bool,
        tokens: bool = False,
    ) -> None:
        self.source = source
        self.chunk_size = chunk_size
        self.tokens = tokens
        self._task = task
        self._chunks: list[Any] | None = None
        self._masks: list[Tensor] = []
        self._flat: list[Tensor] = []
        self._index: Tensor | None = None

        def one_chain(params: Params, batch: Any) -> Tensor:
            model = fmodel.model_fn(params)
            if tokens:
                return task.token_losses(model, batch)  # type: ignore[attr-defined]
            return what(task, model, batch)

        self._fn = per_chain(one_chain, vmapped, batch_in_dim=None)

    def chunks(self) -> list[Any]:
        if self._chunks is None:
            self._chunks = [b for _, b in self.source.chunks(self.chunk_size)]
            if self.tokens:
                self._masks = [self._task.token_mask(b) for b in self._chunks]  # type: ignore[attr-defined]
                # Flat positions of each mask, once: selecting by a boolean mask at every
                # draw would read its count from the device (a host synchronisation on CUDA).
                self._flat = [m.flatten().nonzero().squeeze(1) for m in self._masks]
        return self._chunks

    @property
    def token_index(self) -> Tensor:
        """``[K, 2]`` long: (example index, position) of every attributed token, in order."""
        if self._index is None:
            self.chunks()
            parts, start = [], 0
            for m in self._masks:
                nz = m.nonzero().cpu()
                nz[:, 0] += start
                parts.append(nz)
                start += m.shape[0]
            self._index = torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.long)
        return self._index

    @torch.no_grad()
    def evaluate(self, params: Params) -> tuple[Tensor, Tensor | None]:
        """Per-sample values ``[G, len(source)]`` and, in token mode, token values ``[G, K]``."""
        return self.assemble([self._fn(params, b) for b in self.chunks()])

    def assemble(self, values: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Per-chunk values (``[G, B]``, or ``[G, B, S]`` token losses in token mode) ->
        what :meth:`evaluate` returns. The fused loop passes the values of its gradient pass."""
        if not self.tokens:
            return torch.cat(values, dim=1), None
        self.chunks()
        seq, tok = [], []
        for v, m, flat in zip(values, self._masks, self._flat, strict=True):
            t = v.float()  # [G, B, S]
            seq.append(torch.where(m, t, 0).double().sum(-1))
            tok.append(t.flatten(1)[:, flat])  # = t[:, m]
        return torch.cat(seq, dim=1), torch.cat(tok, dim=1)

    def __call__(self, params: Params) -> Tensor:
        """Per-sample values ``[G, len(source)]`` at chain-stacked ``params`` ``[G, ...]``."""
        return self.evaluate(params)[0]


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
