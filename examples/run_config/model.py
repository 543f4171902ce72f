"""The entry point of ``bif run examples/run_config/bif.toml``: a small digits classifier.

``build()`` takes no arguments and returns what :func:`bif.attribute` needs: the trained model,
the training examples to attribute and the queries to explain. Everything is seeded, so running
the configuration again rebuilds the same weights and data, and ``bif run`` resumes its
checkpoints in ``OUT/run`` instead of refusing them as another run's.
"""

from __future__ import annotations

from typing import Any

from bif.demo import build_model, split_digits, train_model

NUM_TRAIN = 300  # attributed training digits (a subset keeps the example quick)
NUM_QUERIES = 4  # test digits explained


def build() -> dict[str, Any]:
    """A 64-64-10 MLP trained on 300 bundled 8x8 digits (full-batch AdamW, about a second),
    with 4 test digits as queries."""
    split = split_digits()
    x, y = split.x_train[:NUM_TRAIN], split.y_train[:NUM_TRAIN]
    model = train_model(build_model(), x, y)
    return {
        "model": model,
        "train": (x, y),
        "query": (split.x_test[:NUM_QUERIES], split.y_test[:NUM_QUERIES]),
        "task": "classification",
    }
