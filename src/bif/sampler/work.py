"""What one process computes per step and per draw: gradients and evaluations, and how the
work is split over processes (the parallel strategy, in one place).

The loop (:mod:`bif.sampler.run`) asks a :class:`Work` for three things and never sees how
they are spread over processes:

- :meth:`Work.gradient`: ``∇L`` of every chain of a group (full batch, or each chain's own
  minibatch), and with the fused evaluation the per-chunk losses of that same forward pass;
- :meth:`Work.train` / :meth:`Work.train_from`: every training example's loss ``[G, N]`` (and
  token losses ``[G, Kn]``) at a draw, from a separate forward or from the fused values;
- :meth:`Work.query`: the query observables ``[G, Q]`` (and token losses ``[G, Kq]``).

Strategies: one process (``shard=None``), chain-parallel (also ``shard=None``: each process
simply runs fewer chains, :class:`bif.distributed.Partition`), data-parallel
(``cfg.parallel='data'``: every process evaluates and differentiates its slice of the training
set, :class:`bif.distributed.Shard`; gradients are summed, losses gathered).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bif import distributed
from bif.config import BIFConfig
from bif.data import DataSource, stack_chain_batches
from bif.distributed import Partition, Shard
from bif.functional import (
    FunctionalModel,
    Params,
    mean_loss_and_grad,
    mean_loss_grad_and_losses,
    per_chain,
)
from bif.lm.task import CausalLMTask, is_token_task
from bif.observables import Evaluator, query_observables, train_losses
from bif.sampler.rng import ChainRandom
from bif.task import Task


class Work:
    """The gradient and evaluation passes of one process (see the module docstring).

    Attributes:
        full_batch: steps use the exact ``∇L_n`` (else each chain's minibatch).
        fused: a draw's training losses come from the next step's gradient pass.
        tokens: the task has per-token losses.
        shard: this process's slice of the training set (data-parallel), else None.
        train_tokens: ``[Kn, 2]`` (sequence, position) of every attributed training token.
        query_tokens: ``[Kq, 2]`` the same for the queries.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        task: Task,
        train: DataSource,
        query: DataSource,
        cfg: BIFConfig,
        partition: Partition | None,
        fused: bool,
    ) -> None:
        N = len(train)
        self.fmodel, self.task, self.data, self.cfg = fmodel, task, train, cfg
        self.n = N
        self.shard: Shard | None = None
        if partition is not None and cfg.parallel == "data":
            self.shard = distributed.shard(N)
        vm = cfg.vmap_chains
        self.tokens = is_token_task(task)
        local = train.slice(self.shard.start, self.shard.stop) if self.shard else train
        self.eval_train = Evaluator(
            fmodel, task, local, train_losses, cfg.chunk_size, vm, self.tokens
        )  # fmt: skip
        self.eval_query = Evaluator(
            fmodel, task, query, query_observables, cfg.chunk_size, vm, self.tokens
        )  # fmt: skip
        self.token_widths: list[int] = []
        self.train_tokens: Tensor | None = None
        self.query_tokens: Tensor | None = None
        if self.tokens:
            self.train_tokens, self.token_widths = _train_token_index(self.eval_train, self.shard)
            self.query_tokens = self.eval_query.token_index
        self.full_batch = cfg.batch_size is None or cfg.batch_size >= N
        # Fused: a full-batch gradient pass already evaluates every training loss, so the draw's
        # losses are taken from the next step's pass instead of a second forward at the draw.
        self.fused = (
            fused and self.full_batch and (not self.tokens or type(task).loss is CausalLMTask.loss)
        )
        if self.fused:
            one = mean_loss_grad_and_losses(
                fmodel, task.token_losses if self.tokens else task.loss,  # type: ignore[attr-defined]
                (lambda t: t.sum(-1)) if self.tokens else None,
            )  # fmt: skip
        else:
            one = mean_loss_and_grad(fmodel, task.loss)
        self._grad_fn = per_chain(one, vm, batch_in_dim=None if self.full_batch else 0)

    # -- gradients ------------------------------------------------------------------------

    def gradient(
        self, params: Params, rng: ChainRandom, groups: int
    ) -> tuple[Params, Tensor, list[Tensor] | None]:
        """``(∇L, L [G], fused values or None)`` of a group of ``groups`` chains at ``params``:
        the full-batch gradient, or each chain's minibatch drawn from its own generator."""
        if self.full_batch:
            return self.full_grad(self._grad_fn, params, keep=self.fused)
        index = rng.indices(self.n, self.cfg.batch_size)  # type: ignore[arg-type]
        g, loss = self._minibatch_grad(params, index, groups)
        return g, loss, None

    def full_grad(
        self, fn: Any, params: Params, keep: bool = False
    ) -> tuple[Params, Tensor, list[Tensor] | None]:
        """``∇L_n`` over the whole training set: this process's slice, summed over processes;
        with ``keep`` (a fused ``fn``) also the per-chunk values of its forward passes."""
        g, loss, values = _full_batch_grad(fn, params, self.eval_train.chunks(), self.n, keep)
        if self.shard is None:
            return g, loss, values
        *vals, loss = distributed.sum_over_ranks([*g.values(), loss])
        return dict(zip(g, vals, strict=True)), loss, values

    def centre_gradient(self, w_star_1: Params) -> Params:
        """``∇L_n(w*)`` over the full attributed set (chain dimension 1), once per run."""
        vm = self.cfg.vmap_chains
        fn = per_chain(mean_loss_and_grad(self.fmodel, self.task.loss), vm, batch_in_dim=None)
        g, _, _ = self.full_grad(fn, w_star_1)
        return {k: v.detach() for k, v in g.items()}

    def _minibatch_grad(self, params: Params, index: Tensor, groups: int) -> tuple[Params, Tensor]:
        """Mean loss and gradient over each chain's minibatch ``index [G·B]``. Data-parallel:
        this process takes every ``world``-th example of each chain's batch, and the
        size-weighted parts are summed over the processes."""
        train, shard = self.data, self.shard
        if shard is None:
            return self._grad_fn(params, stack_chain_batches(train.batch(index), groups))
        per_chain_index = index.view(groups, -1)
        mine = per_chain_index[:, shard.rank :: shard.world]
        batch = stack_chain_batches(train.batch(mine.reshape(-1)), groups)
        g, loss = self._grad_fn(params, batch)
        w = mine.shape[1] / per_chain_index.shape[1]
        *vals, loss = distributed.sum_over_ranks([*(w * v for v in g.values()), w * loss])
        return dict(zip(g, vals, strict=True)), loss

    # -- evaluations ----------------------------------------------------------------------

    def _gathered(self, a: Tensor, a_tok: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """This process's slice's losses -> every training example's (data-parallel)."""
        if self.shard is not None:
            a = distributed.gather_columns(a, self.shard.sizes)
            if a_tok is not None:
                a_tok = distributed.gather_columns(a_tok, self.token_widths)
        return a, a_tok

    def train(self, params: Params) -> tuple[Tensor, Tensor | None]:
        """Every training example's loss ``[G, N]`` (and token losses ``[G, Kn]``)."""
        return self._gathered(*self.eval_train.evaluate(params))

    def train_from(self, values: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """What :meth:`train` returns, from a fused gradient pass's per-chunk values."""
        return self._gathered(*self.eval_train.assemble(values))

    def query(self, params: Params) -> tuple[Tensor, Tensor | None]:
        """The query observables ``[G, Q]`` (and token losses ``[G, Kq]``)."""
        return self.eval_query.evaluate(params)


def _train_token_index(ev: Evaluator, shard: Shard | None) -> tuple[Tensor, list[int]]:
    """(sequence, position) ``[Kn, 2]`` of every attributed training token, and how many
    tokens each data-parallel process evaluates (its slice's index, offset to global rows)."""
    index = ev.token_index
    if shard is None:
        return index, [len(index)]
    offset = index + torch.tensor([shard.start, 0])
    parts = distributed.gather_objects(offset)
    return torch.cat(parts), [len(p) for p in parts]


def _full_batch_grad(
    grad_fn: Any, params: Params, chunks: list[Any], n: int, keep: bool = False
) -> tuple[Params, Tensor, list[Tensor] | None]:
    """Exact ∇L_n as a size-weighted sum of chunk gradients (bounded activation memory).
    With ``keep``, ``grad_fn`` is fused (:func:`bif.functional.mean_loss_grad_and_losses`)
    and its per-chunk values are returned too."""
    total_g: Params | None = None
    total_l: Tensor | None = None
    values: list[Tensor] = []
    for chunk in chunks:
        if keep:
            g, (loss, v) = grad_fn(params, chunk)
            values.append(v)
        else:
            g, loss = grad_fn(params, chunk)
        w = _batch_len(chunk) / n
        total_g = (
            {k: w * v for k, v in g.items()}
            if total_g is None
            else {k: total_g[k] + w * v for k, v in g.items()}
        )
        total_l = w * loss if total_l is None else total_l + w * loss
    assert total_g is not None and total_l is not None
    return total_g, total_l, values if keep else None


def _batch_len(batch: Any) -> int:
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("cannot infer the batch size of a batch without tensors")
