"""What a benchmark setting is: fixed data, a model factory and its training recipe.

The settings themselves (``digits``, ``mnist``, ``fmnist``, ``shakespeare``) are made in
:mod:`bif.bench.settings` and :mod:`bif.bench.lm.setting`; the retraining harness
(:mod:`bif.eval.retrain`) and the ground truth (:mod:`bif.eval.ground_truth`) need only this
class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bif.bench.training import Params, Recipe

Trainer = Callable[[nn.Module, Tensor, Tensor, int], nn.Module]
BatchedTrainer = Callable[[Tensor, Tensor], tuple[nn.Module, Params]]
# (idx [B, K], seeds [B]) -> (query outputs [B, Q], query accuracy [B])
RetrainOutputs = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# (idx [B, K], seeds [B], tokens [Kt, 2]) -> (outputs [B, Q], accuracy [B], token losses [B, Kt])
RetrainTokenOutputs = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
Data = Any  # a Tensor [N, ...], or (causal-lm) a dict of [N, S] token tensors


@dataclass(frozen=True)
class Setting:
    """One benchmark setting.

    Attributes:
        name: registry key.
        x_train, y_train: the N training examples ``[N, ...]``, labels ``[N]`` (causal-lm: a
            dict batch of :func:`bif.lm.encode`, and placeholder zeros ``[N]``).
        x_query, y_query: the Q ≥ 100 held-out queries (the first Q test examples).
        x_test, y_test: the whole held-out set, for test accuracy.
        build_model: ``seed -> nn.Module``, a fresh initialisation from an explicit generator.
        train: ``(model, x, y, seed) -> model``: the recipe applied to one model (eval mode out).
        train_batched: ``(idx [M, K], seeds [M]) -> (template module, params [M, ...])``: model m
            trained on ``x_train[idx[m]]`` from ``build_model(seeds[m])``, many at once (None
            where ``retrain_outputs`` replaces it).
        training: the optimiser recipe both trainers follow (None: the setting's own recipe,
            described in ``recipe``).
        recipe: everything above as JSON-able data (stored with every artefact).
        reference_seed: seed of the full-data reference model that methods explain.
        task: the loss the model is trained on ("classification" or "causal-lm").
        retrain_outputs: ``(idx [B, K], seeds [B]) -> (outputs [B, Q], query accuracy [B])``:
            the retraining harness's path for settings without a vmapped trainer.
        retrain_token_outputs: ``(idx [B, K], seeds [B], tokens [Kt, 2]) -> (outputs [B, Q],
            accuracy [B], token losses [B, Kt])``: the same models, also recording the loss of
            each sampled query token ``tokens[k] = (query, position)`` (causal-lm only).
        accuracy_fn: ``(model, split) -> accuracy`` replacing the argmax accuracy.
    """

    name: str
    x_train: Data
    y_train: Tensor
    x_query: Data
    y_query: Tensor
    x_test: Data
    y_test: Tensor
    build_model: Callable[[int], nn.Module]
    train: Trainer
    train_batched: BatchedTrainer | None
    training: Recipe | None
    recipe: dict[str, Any]
    reference_seed: int = 0
    task: str = "classification"
    retrain_outputs: RetrainOutputs | None = None
    retrain_token_outputs: RetrainTokenOutputs | None = None
    accuracy_fn: Callable[[nn.Module, str], float] | None = None

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_query(self) -> int:
        return len(self.y_query)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Accuracy of ``model`` on the "train", "query" or "test" examples (causal-lm: top-1
        next-token accuracy)."""
        if self.accuracy_fn is not None:
            return self.accuracy_fn(model.eval(), split)
        x, y = {
            "train": (self.x_train, self.y_train),
            "query": (self.x_query, self.y_query),
            "test": (self.x_test, self.y_test),
        }[split]
        return float((model.eval()(x).argmax(-1) == y).double().mean())
