"""Behaviour around the user's model, task and data: eval mode, frozen parameters, custom losses
and observables, dict inputs, and the embedded digits."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import bif
from bif.datasets import load_digits

N, Q, DIN, K = 16, 4, 4, 3
KW: dict[str, Any] = dict(
    num_chains=2,
    num_draws=5,
    num_burnin=5,
    thin=1,
    step_size=1e-3,
    nbeta=16.0,
    gamma=100.0,
    progress=False,
)
COMPARED = ("scores", "stderr", "correlation", "self_influence", "step_loss", "query_trace")


@pytest.fixture
def data() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, DIN, generator=g), torch.randint(0, K, (N,), generator=g)
    xq, yq = torch.randn(Q, DIN, generator=g), torch.randint(0, K, (Q,), generator=g)
    return (x, y), (xq, yq)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIN, 6), nn.Tanh(), nn.Linear(6, K)).eval()


def assert_identical(r1: bif.BIFResult, r2: bif.BIFResult) -> None:
    for name in COMPARED:
        a, b = getattr(r1, name), getattr(r2, name)
        assert torch.equal(a, b), f"{name} differs by {float((a - b).abs().max())}"


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# --- eval mode ------------------------------------------------------------------------------


def bn_dropout_model() -> nn.Sequential:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(DIN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, K)
    )
    with torch.no_grad():  # non-trivial running statistics, so eval vs train BatchNorm differs
        for _ in range(3):
            model(torch.randn(32, DIN) * 3 + 1)
    return model


def test_training_mode_model_is_sampled_in_eval_mode(data) -> None:
    train, query = data
    model = bn_dropout_model().train()
    reference = copy.deepcopy(model).eval()
    before = snapshot(model)
    with pytest.warns(UserWarning, match=r"eval mode.*restore training mode"):
        r = bif.attribute(model, train, query, batch_size=8, **KW)
    assert r.meta["model_was_training"] is True
    assert all(m.training for m in model.modules())  # restored
    assert_state_equal(model, before)  # BatchNorm running statistics untouched
    ref = bif.attribute(reference, train, query, batch_size=8, **KW)
    assert_identical(r, ref)


def test_submodule_left_in_training_mode(data) -> None:
    """A Dropout in training mode inside an eval-mode parent is switched off too (otherwise it
    would draw random masks inside vmap) and keeps its own mode afterwards."""
    train, query = data
    model = bn_dropout_model().eval()
    model[3].train()
    with pytest.warns(UserWarning, match="eval mode"):
        r = bif.attribute(model, train, query, **KW)
    assert not model.training and not model[1].training and model[3].training
    assert_identical(r, bif.attribute(model.eval(), train, query, **KW))


def test_eval_model_no_warning_and_unchanged(data, recwarn) -> None:
    train, query = data
    model = mlp()
    before = snapshot(model)
    bif.attribute(model, train, query, **KW)
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
    assert_state_equal(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# --- frozen parameters ----------------------------------------------------------------------


class FixedLinear(nn.Module):
    """A linear layer whose weights are buffers: never sampled by construction."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("vmap", [True, False])
def test_requires_grad_false_is_held_fixed(data, vmap: bool) -> None:
    train, query = data
    model = mlp()
    model[0].requires_grad_(False)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    seen: list[bool] = []

    def record(module: nn.Module, args: Any) -> None:
        # Called at every forward (gradient steps and evaluations) with the weights in use.
        seen.append(torch.equal(module.weight, w0) and torch.equal(module.bias, b0))

    handle = model[0].register_forward_pre_hook(record)
    r = bif.attribute(model, train, query, batch_size=8, vmap_chains=vmap, **KW)
    handle.remove()
    assert len(seen) > KW["num_burnin"] + KW["num_draws"] and all(seen)
    assert r.meta["num_params_sampled"] == 6 * K + K
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad  # flags kept

    as_buffers = copy.deepcopy(model)
    as_buffers[0] = FixedLinear(model[0]).eval()
    assert_identical(
        r, bif.attribute(as_buffers, train, query, batch_size=8, vmap_chains=vmap, **KW)
    )


# --- tasks and observables ------------------------------------------------------------------


def test_custom_loss_function_equals_builtin(data) -> None:
    train, query = data
    model = mlp()
    builtin = bif.attribute(model, train, query, task="classification", **KW)
    custom = bif.attribute(
        model, train, query, task=lambda out, y: F.cross_entropy(out, y, reduction="none"), **KW
    )
    assert_identical(builtin, custom)
    assert custom.meta["task"] == "custom"


def test_custom_task_object(data) -> None:
    """A bare Task (loss only, no check, no observable): the query observable is its loss."""
    train, query = data

    class Weighted:
        def loss(self, model: Any, batch: Any) -> Tensor:
            x, y = batch
            return 2.0 * F.cross_entropy(model(x), y, reduction="none")

    model = mlp()
    r = bif.attribute(model, train, query, task=Weighted(), **dict(KW, nbeta=8.0))
    ref = bif.attribute(model, train, query, **KW)
    # 2·l under nbeta/2 is the same posterior, and both observables double: scores ×4. Powers
    # of two scale floats exactly, so the trajectories are bit-identical.
    assert torch.equal(r.step_loss, 2 * ref.step_loss)
    assert torch.equal(r.scores, 4 * ref.scores)


def test_margin_observable(data) -> None:
    train, query = data
    (xq, yq) = query
    model = mlp()
    r = bif.attribute(model, train, query, observable="margin", **KW)
    with torch.no_grad():
        expected = bif.margin(model(xq), yq)
        loss = F.cross_entropy(model(xq), yq, reduction="none")
    torch.testing.assert_close(r.query_star, expected.double(), rtol=1e-6, atol=1e-6)
    assert_identical(r, bif.attribute(model, train, query, observable=bif.margin, **KW))
    rl = bif.attribute(model, train, query, **KW)
    torch.testing.assert_close(rl.query_star, loss.double(), rtol=1e-6, atol=1e-6)
    # Same trajectories, other observable: train-side quantities agree, query side does not.
    assert torch.equal(r.step_loss, rl.step_loss) and torch.equal(r.draw_loss, rl.draw_loss)
    assert not torch.allclose(r.scores, rl.scores, rtol=1e-3, atol=0)  # scores are ~1e-9 here


def test_callable_observable(data) -> None:
    train, query = data
    (xq, _) = query
    model = mlp()
    r = bif.attribute(model, train, query, observable=lambda out, y: out[:, 0], **KW)
    with torch.no_grad():
        torch.testing.assert_close(r.query_star, model(xq)[:, 0].double(), rtol=1e-6, atol=1e-6)
    assert r.scores.shape == (Q, N) and torch.isfinite(r.scores).all()


def test_regression_task(data) -> None:
    (x, _), (xq, _) = data
    torch.manual_seed(0)
    model = nn.Linear(DIN, 2).eval()
    w = torch.randn(DIN, 2)
    r = bif.attribute(model, (x, x @ w), (xq, xq @ w), task="regression", **KW)
    with torch.no_grad():
        expected = 0.5 * (model(xq) - xq @ w).pow(2).sum(-1)
    torch.testing.assert_close(r.query_star, expected.double(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(r.scores).all()


# --- dict inputs ----------------------------------------------------------------------------


class DictDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return {"features": self.x[i]}, self.y[i]


class DictModel(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_dict_inputs(data, batch_size: int | None) -> None:
    (x, y), (xq, yq) = data
    model = mlp()
    kw = dict(KW, batch_size=batch_size)
    ref = bif.attribute(model, (x, y), (xq, yq), **kw)
    wrapped = DictModel(copy.deepcopy(model)).eval()
    r = bif.attribute(wrapped, DictDataset(x, y), DictDataset(xq, yq), **kw)
    assert_identical(r, ref)
    loader = DataLoader(DictDataset(x, y), batch_size=3, shuffle=True)
    assert_identical(bif.attribute(wrapped, loader, DictDataset(xq, yq), **kw), ref)


# --- embedded data --------------------------------------------------------------------------


def test_digits_equal_scikit_learn() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    ref = sklearn_datasets.load_digits()
    d = load_digits()
    assert d.images.shape == (1797, 8, 8) and d.labels.shape == (1797,)
    assert d.labels.dtype == torch.int64
    np.testing.assert_array_equal(d.images.numpy().astype(np.float64), ref.images)
    np.testing.assert_array_equal(d.labels.numpy(), ref.target)
    np.testing.assert_array_equal(d.features().numpy(), (ref.data / 16.0).astype(np.float32))
