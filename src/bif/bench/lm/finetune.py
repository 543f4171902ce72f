"""Fine-tuning the pretrained tiny LM on a small set of passages: the model the LM demo and the
LM benchmark explain.

Attribution asks which of the data a model was trained on made it predict what it does. For a
language model the practical case is fine-tuning: a pretrained model (here the cached tiny
Shakespeare LM of :mod:`bif.bench.lm.tiny`) is trained further on a few hundred passages, and the
BIF attributes its predictions to those passages. Fine-tuning runs close to convergence on them,
so the checkpoint is (nearly) a minimum of the attributed data's loss, which is what the local
posterior around w* assumes; retraining on subsets (the LDS ground truth) repeats the same
recipe from the same pretrained weights.

The passages are :func:`finetune_passages`: passages of one play (*Hamlet*) that the pretrained
model never saw, in a seeded order; the demo and the benchmark setting both take theirs from it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from bif.bench.lm.shakespeare import Passage, load_speeches, make_passages
from bif.bench.lm.tiny import TinyLM, run_epochs
from bif.demo import torch_threads
from bif.errors import ConfigError, DataError

PLAY = "Hamlet"  # the fine-tuning play
SPLIT_SEED = 0  # the seeded order of its unseen passages


@dataclass(frozen=True)
class FinetuneRecipe:
    """AdamW (no weight decay) at a constant rate after a short warm-up, for ``epochs`` passes
    over shuffled batches (a subset of half the size takes half the steps)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_FINETUNE = FinetuneRecipe()


def finetune(
    pretrained: Any,
    sequences: Sequence[Sequence[int]],
    recipe: FinetuneRecipe = DEFAULT_FINETUNE,
    *,
    seed: int | None = None,
    threads: int | None = 1,
) -> Any:
    """A fine-tuned copy of ``pretrained`` (which is left unchanged); eval mode.

    Args:
        pretrained: a causal LM (``model(input_ids=..., attention_mask=...).logits``).
        sequences: token id sequences ``[BOS, ..., EOS]``.
        recipe: the optimisation.
        seed: batch order (default ``recipe.seed``); the only randomness.
        threads: torch CPU threads while training (None: leave as is).
    """
    if not sequences:
        raise DataError("finetune needs at least one sequence")
    if recipe.epochs < 1 or recipe.batch_size < 1 or not recipe.lr > 0:
        raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
    seed = recipe.seed if seed is None else seed
    with torch_threads(threads):
        model = copy.deepcopy(pretrained).train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0)
        warm = max(1, recipe.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        gen = torch.Generator().manual_seed(seed)
        run_epochs(model, opt, sched, sequences, recipe.epochs, recipe.batch_size, gen)
    return model.eval()


def steps_per_run(num_sequences: int, recipe: FinetuneRecipe = DEFAULT_FINETUNE) -> int:
    return recipe.epochs * math.ceil(num_sequences / recipe.batch_size)


def finetune_passages(
    tiny: TinyLM, num_train: int, play: str = PLAY
) -> tuple[list[Passage], list[Passage]]:
    """Passages of ``play`` that the pretrained model never saw, in a seeded order: the first
    ``num_train`` for fine-tuning, the rest held out.

    Raises:
        ConfigError: the play has no more than ``num_train`` unseen passages.
    """
    seen = {p.text for p in (*tiny.split.train, *tiny.split.heldout)}
    pool = [
        p for p in make_passages(load_speeches(), tiny.tokenizer)
        if p.play == play and p.text not in seen
    ]  # fmt: skip
    if len(pool) < num_train + 1:
        raise ConfigError(f"{play} has {len(pool)} unseen passages; ask for fewer than that.")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pool))
    return [pool[i] for i in order[:num_train]], [pool[i] for i in order[num_train:]]
