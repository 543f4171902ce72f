"""The Task protocol: the user's only job is per-sample losses for a batch.

A batch is whatever the data yields, by default a pair ``(inputs, targets)``. ``model`` is a
callable mapping inputs to outputs at the current sampled weights (bif calls the user's
``nn.Module`` functionally, so the module itself is never modified).

Value checks (e.g. class labels in range) live in :meth:`Task.check`, which bif calls once on a
real batch before sampling: inside ``torch.func.vmap`` data-dependent checks are not possible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from bif.errors import ConfigError, ShapeError

Batch = Any
ModelFn = Callable[[Any], Any]
OutputLossFn = Callable[[Any, Any], Tensor]


def forward(model: ModelFn, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a mapping as keywords, anything else as one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def split_batch(batch: Batch) -> tuple[Any, Any]:
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise ShapeError(
        "built-in tasks expect each batch to be a pair (inputs, targets); got "
        f"{type(batch).__name__}. Yield (inputs, targets) from your Dataset, or pass a custom Task."
    )


@runtime_checkable
class Task(Protocol):
    """What bif needs from the user.

    ``loss`` returns the per-sample training loss ``l_i(w)`` of every example in the batch, shape
    ``[B]``; its mean over the training set is the ``L_n`` of the local posterior.
    Optionally, ``observable(model, batch) -> [B]`` gives the query observable ``φ(w)`` (default:
    the query's loss) and ``check(model, batch)`` validates values on a real batch.
    Both must be pure functions of their arguments (no in-place state, no randomness) so that
    bif can vmap them over chains.
    """

    def loss(self, model: ModelFn, batch: Batch) -> Tensor: ...


def task_observable(task: Task, model: ModelFn, batch: Batch) -> Tensor:
    """The task's query observable, falling back to its loss."""
    fn = getattr(task, "observable", None)
    return fn(model, batch) if fn is not None else task.loss(model, batch)


class OutputLossTask:
    """A task defined by a per-sample function of ``(outputs, targets)``."""

    name = "custom"

    def __init__(self, loss_fn: OutputLossFn, observable_fn: OutputLossFn | None = None) -> None:
        self.loss_fn = loss_fn
        self.observable_fn = observable_fn or loss_fn

    def loss(self, model: ModelFn, batch: Batch) -> Tensor:
        inputs, targets = split_batch(batch)
        return self.loss_fn(forward(model, inputs), targets)

    def observable(self, model: ModelFn, batch: Batch) -> Tensor:
        inputs, targets = split_batch(batch)
        return self.observable_fn(forward(model, inputs), targets)

    def check(self, model: ModelFn, batch: Batch) -> None:
        inputs, targets = split_batch(batch)
        self.check_outputs(forward(model, inputs), targets)

    def check_outputs(self, outputs: Any, targets: Any) -> None:
        """Hook for value checks on real outputs; the generic task has none."""

    def with_observable(self, observable_fn: OutputLossFn) -> OutputLossTask:
        task = type(self).__new__(type(self))
        task.__dict__.update(self.__dict__)
        task.observable_fn = observable_fn
        return task


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def margin(logits: Tensor, targets: Tensor) -> Tensor:
    """Margin ``logit_y - logsumexp(other logits)`` [B] (higher = more confident)."""
    correct = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


class ClassificationTask(OutputLossTask):
    """Cross-entropy ``l_i = -log softmax(f(x_i))[y_i]``; logits ``[B, K]``, labels ``[B]``."""

    name = "classification"

    def __init__(self, observable_fn: OutputLossFn | None = None) -> None:
        super().__init__(_cross_entropy, observable_fn)

    def check_outputs(self, outputs: Any, targets: Any) -> None:
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ShapeError(
                f"classification expects model outputs of shape [B, num_classes], got {shape}. "
                "Return raw logits (no softmax), or pass task=... with your own loss."
            )
        if not isinstance(targets, Tensor) or targets.dim() != 1:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ShapeError(f"classification expects integer labels of shape [B], got {shape}.")
        if targets.shape[0] != outputs.shape[0]:
            raise ShapeError(
                f"model returned {outputs.shape[0]} rows of logits for {targets.shape[0]} labels."
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ShapeError(f"classification labels must be integers, got dtype {targets.dtype}.")
        k = outputs.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise ShapeError(
                f"labels must lie in [0, {k - 1}] for a model with {k} outputs; "
                f"got range [{int(targets.min())}, {int(targets.max())}]."
            )


def _half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    diff = outputs - targets
    return 0.5 * diff.reshape(diff.shape[0], -1).pow(2).sum(-1)


class RegressionTask(OutputLossTask):
    """Squared error ``l_i = ½ ||f(x_i) - y_i||²`` (summed over output dimensions)."""

    name = "regression"

    def __init__(self, observable_fn: OutputLossFn | None = None) -> None:
        super().__init__(_half_squared_error, observable_fn)

    def check_outputs(self, outputs: Any, targets: Any) -> None:
        if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
            raise ShapeError("regression expects tensor outputs and tensor targets.")
        if outputs.shape != targets.shape:
            hint = ""
            if outputs.numel() == targets.numel():
                hint = " (reshape targets, e.g. y.unsqueeze(-1) for a model with one output)"
            raise ShapeError(
                f"regression outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
                f"must have the same shape{hint}."
            )


OBSERVABLES: dict[str, OutputLossFn | None] = {"loss": None, "margin": margin}


def observable_name(task: Task, observable: str | OutputLossFn | None) -> str:
    """A short name of the query observable for messages and reports ("loss", "margin", a
    function's name, or "observable" for an anonymous one)."""
    if isinstance(observable, str):
        return observable
    if observable is None:
        custom = not isinstance(task, OutputLossTask) and hasattr(task, "observable")
        if not custom and not (
            isinstance(task, OutputLossTask) and task.observable_fn is not task.loss_fn
        ):
            return "loss"
        observable = getattr(task, "observable_fn", None) or getattr(task, "observable", None)
    name = getattr(observable, "__name__", "")
    return name if name and name != "<lambda>" else "observable"


def make_task(
    task: str | Task | OutputLossFn,
    observable: str | OutputLossFn | None = None,
) -> Task:
    """Resolve the ``task=`` and ``observable=`` arguments of :func:`bif.attribute`.

    Args:
        task: "classification", "regression", a :class:`Task`, or a per-sample loss function
            ``fn(outputs, targets) -> [B]``.
        observable: None/"loss" (the query's loss), "margin" (classification), or a function
            ``fn(outputs, targets) -> [B]`` evaluated on the queries instead of their loss.
    """
    if isinstance(observable, str):
        if observable not in OBSERVABLES:
            raise ConfigError(
                f"unknown observable {observable!r}; use one of {sorted(OBSERVABLES)}"
            )
        observable = OBSERVABLES[observable]
    if isinstance(task, str):
        builtins = {"classification": ClassificationTask, "regression": RegressionTask}
        if task not in builtins:
            raise ConfigError(
                f"unknown task {task!r}; use 'classification', 'regression', a Task object, "
                "or a per-sample loss function fn(outputs, targets) -> [B]."
            )
        return builtins[task](observable)
    if isinstance(task, OutputLossTask):
        return task.with_observable(observable) if observable is not None else task
    if isinstance(task, Task):
        if observable is not None:
            raise ConfigError(
                "observable= cannot be combined with a custom Task object; "
                "implement Task.observable instead."
            )
        return task
    if callable(task):
        return OutputLossTask(task, observable)
    raise ConfigError(f"task must be a string, a Task or a callable, got {type(task).__name__}.")
