"""The Attributor protocol shared by BIF and every baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@dataclass
class AttributionContext:
    """Everything a method may use to score training examples against queries.

    Attributes:
        model: the trained model at its checkpoint w* (eval mode).
        x_train, y_train: the N attributed training examples (also the training set); for
            "causal-lm", a :func:`bif.lm.encode` dict of ``[N, S]`` tensors and placeholder
            zeros ``[N]`` (the targets are the next tokens).
        x_query, y_query: the Q queries (same forms).
        task: "classification", "regression" or "causal-lm" (the per-sample loss the model was
            trained on; causal-lm: the sequence loss, :meth:`bif.lm.task.CausalLMTask.loss`).
        checkpoints: state_dicts saved along the training trajectory (for TracIn), oldest first.
        learning_rates: the learning rate in force at each checkpoint (same length).
        build_model: fresh-model factory ``seed -> nn.Module`` (for ensembles, e.g. TRAK).
        train_fn: the setting's training recipe ``(model, x, y, seed) -> trained model``.
        extra: free-form, method-specific inputs.
    """

    model: nn.Module
    x_train: Any
    y_train: Tensor
    x_query: Any
    y_query: Tensor
    task: str = "classification"
    checkpoints: Sequence[dict[str, Tensor]] = ()
    learning_rates: Sequence[float] = ()
    build_model: Callable[[int], nn.Module] | None = None
    train_fn: Callable[..., nn.Module] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Attributor(Protocol):
    """A data attribution method. ``name`` labels it in benchmark tables."""

    name: str

    def scores(self, ctx: AttributionContext) -> Tensor:
        """Scores ``[Q, N]``; negative = training on n lowers query q's loss (proponent)."""
        ...
