"""Bad input raises a typed error whose message says what to change (type AND key phrase)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bif
from bif.errors import ConfigError, DataError, DivergenceError, ShapeError

N, Q, DIN, K = 12, 3, 4, 3
KW: dict[str, Any] = dict(
    num_chains=2,
    num_draws=3,
    num_burnin=2,
    thin=1,
    step_size=1e-3,
    nbeta=12.0,
    gamma=100.0,
    progress=False,
)


@pytest.fixture
def data() -> tuple[nn.Module, tuple, tuple]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIN, 6), nn.Tanh(), nn.Linear(6, K)).eval()
    x, y = torch.randn(N, DIN, generator=g), torch.randint(0, K, (N,), generator=g)
    xq, yq = torch.randn(Q, DIN, generator=g), torch.randint(0, K, (Q,), generator=g)
    return model, (x, y), (xq, yq)


def run(data, **overrides: Any) -> bif.BIFResult:
    model, train, query = data
    model = overrides.pop("model", model)
    train = overrides.pop("train", train)
    query = overrides.pop("query", query)
    return bif.attribute(model, train, query, **{**KW, **overrides})


# --- hyperparameters ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["step_size", "nbeta", "gamma"])
@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0])
def test_bad_float_hyperparameter(data, name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"{name} must be finite and > 0"):
        run(data, **{name: value})


@pytest.mark.parametrize(
    ("name", "value", "phrase"),
    [
        ("num_chains", 0, "num_chains must be >= 1"),
        ("num_draws", 1, "num_draws must be >= 2"),
        ("thin", 0, "thin must be >= 1"),
        ("num_burnin", -1, "num_burnin must be >= 0"),
        ("chunk_size", 0, "chunk_size must be >= 1"),
        ("num_draws", 2.5, "num_draws must be an integer"),
        ("batch_size", 0, "batch_size must be a positive integer or None"),
        ("sampler", "adam", "sampler must be 'sgld', 'rmsprop' or 'kinetic'"),
        ("friction", -1.0, "friction must be a positive number or 'auto'"),
        ("centering", "none", "centering must be 'chain' or 'pooled'"),
        ("rmsprop_alpha", 1.0, r"rmsprop_alpha must lie in \(0, 1\)"),
    ],
)
def test_bad_hyperparameter(data, name: str, value: Any, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        run(data, **{name: value})


def test_unknown_hyperparameter(data) -> None:
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['stepsize'\]") as e:
        run(data, stepsize=1e-3)
    assert "step_size" in str(e.value)  # the message lists the known names


def test_bad_checkpoint_every(data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every must be a positive integer"):
        run(data, run_dir=tmp_path, checkpoint_every=0)


def test_unknown_task_and_observable(data) -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'classifcation'.*'classification'"):
        run(data, task="classifcation")
    with pytest.raises(ConfigError, match=r"unknown observable 'margn'.*'margin'"):
        run(data, observable="margn")


def test_not_a_module(data) -> None:
    with pytest.raises(ConfigError, match=r"model must be a torch\.nn\.Module"):
        run(data, model=lambda x: x)


# --- data -----------------------------------------------------------------------------------


def test_empty_train(data) -> None:
    _, (x, y), _ = data
    with pytest.raises(DataError, match="train data is empty"):
        run(data, train=(x[:0], y[:0]))


def test_empty_query(data) -> None:
    _, _, (xq, yq) = data
    with pytest.raises(DataError, match="query data is empty"):
        run(data, query=(xq[:0], yq[:0]))


def test_empty_dataset(data) -> None:
    with pytest.raises(DataError, match="query data is empty"):
        run(data, query=torch.utils.data.TensorDataset(torch.zeros(0, DIN)))


def test_mismatched_first_dimensions(data) -> None:
    _, (x, y), _ = data
    with pytest.raises(DataError, match=r"must share their first \(example\) dimension") as e:
        run(data, train=(x, y[:-1]))
    assert f"({N}, {DIN})" in str(e.value) and f"({N - 1},)" in str(e.value)


def test_unsupported_data_type(data) -> None:
    with pytest.raises(DataError, match="must be a pair of tensors"):
        run(data, train=42)


# --- outputs vs targets ---------------------------------------------------------------------


def test_classification_outputs_with_extra_dim(data) -> None:
    model = nn.Sequential(nn.Linear(DIN, K), nn.Unflatten(1, (K, 1))).eval()
    with pytest.raises(ShapeError, match=r"shape \[B, num_classes\], got \(12, 3, 1\)"):
        run(data, model=model)


@pytest.mark.parametrize("where", ["train", "query"])
@pytest.mark.parametrize("bad", [K, -1])
def test_labels_out_of_range(data, where: str, bad: int) -> None:
    """Every chunk is checked, not only the first: the bad label sits in the last chunk."""
    _, train, query = data
    x, y = train if where == "train" else query
    y = y.clone()
    y[-1] = bad
    with pytest.raises(ShapeError, match=rf"labels must lie in \[0, {K - 1}\]"):
        run(data, chunk_size=2, **{where: (x, y)})


def test_float_labels(data) -> None:
    _, (x, y), _ = data
    with pytest.raises(ShapeError, match="labels must be integers"):
        run(data, train=(x, y.float()))


def test_regression_shape_mismatch(data) -> None:
    _, (x, _), (xq, _) = data
    model = nn.Linear(DIN, 1).eval()
    target = torch.randn(N)  # [N] against outputs [N, 1] would silently broadcast to [N, N]
    with pytest.raises(ShapeError, match=r"same shape.*y.unsqueeze\(-1\)"):
        run(data, model=model, task="regression", train=(x, target), query=(xq, torch.zeros(Q)))


def test_loss_returning_scalar(data) -> None:
    with pytest.raises(ShapeError, match="reduction='none'"):
        run(data, task=lambda out, y: F.cross_entropy(out, y))


def test_loss_returning_matrix(data) -> None:
    def two_columns(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.cross_entropy(out, y, reduction="none")] * 2, dim=1)

    with pytest.raises(ShapeError, match=r"shape \[12\], got \(12, 2\).*Reduce every dimension"):
        run(data, task=two_columns)


def test_observable_returning_scalar(data) -> None:
    with pytest.raises(ShapeError, match=r"query observable must return one value per example"):
        run(data, observable=lambda out, y: out.sum())


def test_nonfinite_loss_at_checkpoint(data) -> None:
    _, (x, y), _ = data
    x = x.clone()
    x[5, 0] = math.nan
    with pytest.raises(DataError, match="not finite at the checkpoint for train example 5"):
        run(data, train=(x, y))


def test_nonfinite_query_at_checkpoint(data) -> None:
    _, _, (xq, yq) = data
    xq = xq.clone()
    xq[2, 1] = math.nan  # (inf would saturate the tanh and give a finite loss)
    with pytest.raises(DataError, match="not finite at the checkpoint for query example 2"):
        run(data, query=(xq, yq))


@pytest.mark.parametrize("frozen", [False, True])
def test_nonfinite_weights_are_the_models_fault(data, frozen: bool) -> None:
    """NaN in the weights used to be reported as bad data ("check that example's inputs")."""
    model = nn.Sequential(nn.Linear(DIN, 6), nn.Tanh(), nn.Linear(6, K)).eval()
    with torch.no_grad():
        model[2].weight[1, 3] = math.nan
    model[2].weight.requires_grad_(not frozen)
    kind = "frozen tensor" if frozen else "parameter"
    with pytest.raises(bif.ModelError, match=rf"model's {kind} '2.weight' has 1 NaN/inf"):
        run(data, model=model)


def test_no_trainable_parameters(data) -> None:
    model = nn.Sequential(nn.Linear(DIN, K)).eval().requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter with requires_grad=True"):
        run(data, model=model)


# --- divergence -----------------------------------------------------------------------------


@pytest.mark.parametrize("vmap", [True, False])
@pytest.mark.parametrize(("rank", "step"), [(0, 1.0), (64, 10.0)])
def test_divergence_overflow(data, vmap: bool, rank: int, step: float) -> None:
    """Unit mass: h²·γ = 100, far beyond BAOAB's stability limit h²·k < 4; with the low-rank
    mass every direction has frequency >= 1, so h = 10 is as far beyond it. float32 overflows
    within the burn-in: the NaN/inf training loss must be caught at the step it appears."""
    with pytest.raises(DivergenceError, match=rf"Lower step_size \(now {step:g}; try") as e:
        run(data, step_size=step, num_burnin=60, vmap_chains=vmap, precondition_rank=rank)
    assert 0 <= e.value.chain < KW["num_chains"]
    assert 0 < e.value.step < 60
    assert f"chain {e.value.chain} diverged at sampler step {e.value.step}" in str(e.value)


@pytest.mark.parametrize("vmap", [True, False])
def test_divergence_before_overflow(data, vmap: bool) -> None:
    """A chain that explodes but is still finite after a few steps (losses ~1e30) must not be
    averaged into scores of ~1e60: its energy far exceeds anything the posterior allows."""
    with pytest.raises(DivergenceError, match="step_size") as e:
        run(data, step_size=1.0, num_burnin=2, num_draws=3, vmap_chains=vmap,
            precondition_rank=0)  # fmt: skip
    assert 0 <= e.value.chain < KW["num_chains"]
    assert e.value.step == KW["num_burnin"]  # detected at the first draw, nothing returned


def test_sane_run_does_not_trip_divergence(data) -> None:
    """The twin of the two tests above: a stable step size samples without error."""
    r = run(data, num_burnin=30, num_draws=20)
    assert torch.isfinite(r.scores).all()
