"""The scale-free 'auto' rules for γ, nβ, the step size and the friction.

Each rule is checked against its formula computed independently here (exact Hessian, weight
norm), for invariance under rescaling the loss, and for clear errors where it cannot apply.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import bif
from bif.config import BIFConfig
from bif.curvature import auto_friction, auto_gamma, auto_nbeta, auto_step_size
from bif.errors import ConfigError

SMALL = dict(num_chains=2, num_draws=3, num_burnin=2, thin=1, progress=False)


def problem(seed: int = 0) -> tuple[nn.Module, tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, (x, y), (x[:3], y[:3])


def exact_lambda_max(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = functional_call(model, parts, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    return float(torch.linalg.eigvalsh(hessian(loss)(flat)).abs().max())


def test_auto_rules_match_their_formulas() -> None:
    """The unit-mass rules (precondition_rank=0); test_mass.py checks them in the mass's frame.
    The model is untrained, so the pilot would rightly lower nβ (tests/test_pilot.py): off."""
    model, train, query = problem()
    res = bif.attribute(
        model, train, query, dtype=torch.float64, precondition_rank=0, pilot_steps=0, **SMALL
    )
    cfg, meta = res.config, res.meta
    w_sq = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    num = sum(p.numel() for p in model.parameters())
    lam = exact_lambda_max(model, *train)
    assert meta["lambda_max"] == pytest.approx(lam, rel=1e-2)
    assert cfg.gamma == pytest.approx(num / (0.1**2 * w_sq))
    cond = BIFConfig().condition
    assert cfg.nbeta == pytest.approx(cfg.gamma * cond / meta["lambda_max"])
    assert cfg.damping == pytest.approx(meta["lambda_max"] / cond)
    assert cfg.step_size == pytest.approx(1 / math.sqrt(cfg.nbeta * meta["lambda_max"] + cfg.gamma))
    assert cfg.friction == pytest.approx(2 * math.sqrt(cfg.gamma))
    assert meta["auto"] == ["friction", "gamma", "nbeta", "step_size"]
    assert meta["step_size_rule"] == "auto"


@pytest.mark.filterwarnings("ignore:the local posterior is not normalisable")  # untrained model
def test_given_values_are_kept_and_only_missing_ones_derived() -> None:
    model, train, query = problem()
    res = bif.attribute(model, train, query, gamma=50.0, condition=10.0, precondition_rank=0,
                        **SMALL)  # fmt: skip
    assert res.config.gamma == 50.0
    assert res.config.damping == pytest.approx(res.meta["lambda_max"] / 10)
    assert res.meta["auto"] == ["friction", "nbeta", "step_size"]
    given = dict(nbeta=100.0, gamma=5.0, step_size=1e-3, **SMALL)
    res = bif.attribute(model, train, query, precondition_rank=0, **given)
    assert (res.config.nbeta, res.config.gamma, res.config.step_size) == (100.0, 5.0, 1e-3)
    assert res.meta["lambda_max"] is None and res.meta["auto"] == ["friction"]
    # The mass still needs the curvature, though no rule does.
    res = bif.attribute(model, train, query, precondition_rank=4, **given)
    assert (res.config.nbeta, res.config.gamma, res.config.step_size) == (100.0, 5.0, 1e-3)
    assert res.meta["lambda_max"] > 0 and res.meta["preconditioner"]["rank"] == 4


def test_rules_are_invariant_to_the_scale_of_the_weights_and_the_loss() -> None:
    """Weights scaled by s scale γ by 1/s²; λ_max scaled by s scales nβ by 1/s (λ ∝ λ_max)."""
    w = {"a": torch.full((10,), 2.0)}
    assert auto_gamma({"a": 3 * w["a"]}, 0.1) == pytest.approx(auto_gamma(w, 0.1) / 9)
    assert auto_nbeta(100.0, 4.0, 300.0) == pytest.approx(2 * auto_nbeta(100.0, 8.0, 300.0))
    cfg = BIFConfig(nbeta=1e4, gamma=100.0)
    assert auto_step_size(0.5, cfg) == pytest.approx(1 / math.sqrt(1e4 * 0.5 + 100))
    sgld = cfg.replace(sampler="sgld")
    assert auto_step_size(0.5, sgld) == pytest.approx(0.5 / (1e4 * 0.5 + 100))
    assert auto_friction(cfg) == pytest.approx(20.0)


def test_rules_refuse_what_they_cannot_scale() -> None:
    with pytest.raises(ConfigError, match="pass a numeric gamma"):
        auto_gamma({"a": torch.zeros(3)}, 0.1)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="pass a numeric nbeta"):
            auto_nbeta(10.0, bad, 300.0)


@pytest.mark.parametrize(
    ("name", "value", "phrase"),
    [
        ("nbeta", "big", "nbeta must be a number or 'auto'"),
        ("gamma", "strong", "gamma must be a number or 'auto'"),
        ("condition", 0.0, "condition must be finite and > 0"),
        ("radius", -0.1, "radius must be finite and > 0"),
        ("friction", math.inf, "friction must be a positive number or 'auto'"),
    ],
)
def test_bad_rule_parameters(name: str, value: object, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        BIFConfig(**{name: value})
