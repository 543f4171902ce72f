"""Which mass the automatic rules give the kinetic sampler, and what the result says of it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import bif
import bif.auto as auto
from bif.errors import ConfigError
from bif.sampler.kronecker import KroneckerMass

KW: dict[str, Any] = dict(num_chains=2, num_draws=20, num_burnin=10, progress=False, seed=0)


def _problem(n: int = 64) -> tuple[nn.Module, tuple, tuple]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))
    x, xq = torch.randn(n, 6, generator=g), torch.randn(5, 6, generator=g)
    w = torch.randn(6, 4, generator=g)
    y, yq = (x @ w).argmax(1), (xq @ w).argmax(1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), (x, y), (xq, yq)


def _pre(r: bif.BIFResult) -> dict[str, Any]:
    return r.meta["preconditioner"]["mass"]


def test_small_model_gets_the_low_rank_mass() -> None:
    r = bif.attribute(*_problem(), **KW)
    info = _pre(r)
    assert info["kind"] == "lowrank" and "fits" in info["why"], info


def test_beyond_the_lanczos_budget_the_kronecker_mass(monkeypatch, caplog) -> None:
    """The budget that decides is the Lanczos workspace; over it, the Kronecker mass, built
    from a fixed number of batches whatever N, its cost in meta, the norm on γI (logged)."""
    monkeypatch.setattr(auto, "LANCZOS_BUDGET_MB", 0.01)
    costs = []
    for n in (64, 400):
        with caplog.at_level("INFO"):
            r = bif.attribute(*_problem(n), **KW)
        info = _pre(r)
        assert info["kind"] == "kronecker" and "exceeds" in info["why"], info
        assert torch.isfinite(r.scores).all() and float(r.scores.abs().max()) > 0
        assert info["fallback"] == ["1.bias", "1.weight"], info
        assert info["factored_layers"] == 2 and info["bytes"] == info["formula_bytes"] > 0
        costs.append((info["batches"], info["examples"]))
        assert r.meta["preconditioner"]["kmin_posterior"] >= auto.KMIN_FLOOR - 1e-9
    assert costs[0][0] <= auto.KRONECKER_BATCHES and costs[1][0] == auto.KRONECKER_BATCHES
    assert costs[1][1] == auto.KRONECKER_BATCHES * auto.KRONECKER_BATCH_SIZE  # not N = 400
    assert any("fall back to mass gamma*I" in m for m in caplog.messages)


def test_kronecker_mass_requested_and_its_step(monkeypatch) -> None:
    """preconditioner='kronecker' on a small model: the step size comes from k'_max in the
    Kronecker frame, and the pilot's re-resolution reuses the same factors."""
    built: list[Any] = []
    real = auto.build_kronecker_mass

    def counting(*a: Any, **k: Any) -> Any:
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(auto, "build_kronecker_mass", counting)
    r = bif.attribute(*_problem(), preconditioner="kronecker", **KW)
    curv = r.meta["preconditioner"]
    assert _pre(r)["kind"] == "kronecker" and _pre(r)["why"] == "requested"
    assert r.config.step_size == pytest.approx(
        auto.KINETIC_STEP_FACTOR / max(curv["kmax_preconditioned"], 1.0) ** 0.5
    )
    assert len(built) == 1


def test_kronecker_mass_on_a_causal_lm() -> None:
    from bif.lm import CausalLMTask
    from test_lm import FAST, TinyLM
    from test_lm import _data as lm_data

    train, query = lm_data()
    kw = dict(FAST, precondition_rank=4, preconditioner="kronecker", sampler="kinetic")
    r = bif.attribute(TinyLM().eval(), train, query, task=CausalLMTask(), **kw)
    assert _pre(r)["kind"] == "kronecker" and _pre(r)["fisher"] == "sampled"
    assert torch.isfinite(r.scores).all()


def test_curvature_to_moves_a_kronecker_mass() -> None:
    model, train, _ = _problem()
    cfg = bif.BIFConfig(preconditioner="kronecker")
    from bif.data import DataSource
    from bif.functional import FunctionalModel
    from bif.task import make_task

    fm = FunctionalModel(model, "cpu")
    src = DataSource(train, "train", fm.device, None)
    _, curv = auto.resolve_auto(cfg, fm, make_task("classification"), src)
    assert isinstance(curv.mass, KroneckerMass)
    moved = auto.curvature_to(curv, "cpu")
    x = torch.randn(3, fm.num_params, dtype=next(iter(fm.w_star.values())).dtype)
    assert torch.equal(moved.mass.inverse(x), curv.mass.inverse(x))


def test_bad_preconditioner_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="preconditioner must be 'auto', 'lowrank' or"):
        bif.attribute(*_problem(), preconditioner="kfac", **KW)
