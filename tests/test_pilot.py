"""The pilot run (bif.pilot): own seeds (the run's chains are untouched), repairs in the
documented order, a ModelError before sampling when nothing helps, and a real slide detected
on an untrained model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bif
from bif import pilot
from bif.errors import ModelError
from test_auto import problem

SMALL = dict(num_chains=2, num_draws=20, num_burnin=10, progress=False, dtype=torch.float64)


def trained_problem() -> tuple[torch.nn.Module, tuple, tuple]:
    model, train, query = problem()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(train[0]), train[1])
        loss = loss + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval(), train, query


def test_a_passing_pilot_leaves_the_run_bit_identical() -> None:
    model, train, query = trained_problem()
    with_pilot = bif.attribute(model, train, query, **SMALL)
    without = bif.attribute(model, train, query, pilot_steps=0, **SMALL)
    attempts = with_pilot.meta["preconditioner"]["pilot"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["ok"]
    assert "pilot" not in without.meta["preconditioner"]
    assert torch.equal(with_pilot.scores, without.scores)
    assert with_pilot.config.replace(pilot_steps=0) == without.config


def scripted(outcomes: list[str], monkeypatch) -> list[dict[str, Any]]:
    """Replace the pilot's sampling by a script of outcomes; returns the calls' settings."""
    calls: list[dict[str, Any]] = []

    def fake(fmodel, task, train, query, cfg, curv, progress=False):
        outcome = outcomes[min(len(calls), len(outcomes) - 1)]
        calls.append({"step_size": cfg.step_size, "nbeta": cfg.nbeta})
        return {**calls[-1], "limit": 1.0, "outcome": outcome, "step": 3, "max_energy": 9.0,
                "min_energy": -9.0}  # fmt: skip

    monkeypatch.setattr(pilot, "run_pilot", fake)
    return calls


def test_divergence_halves_the_step_then_slide_lowers_nbeta(monkeypatch) -> None:
    model, train, query = trained_problem()
    calls = scripted(["diverged", "hot", "slide", "ok"], monkeypatch)
    res = bif.attribute(model, train, query, **SMALL)
    h0, nb0 = calls[0]["step_size"], calls[0]["nbeta"]
    assert calls[1] == {"step_size": pytest.approx(h0 / 2), "nbeta": nb0}
    assert calls[2] == {"step_size": pytest.approx(h0 / 4), "nbeta": nb0}
    assert calls[3]["nbeta"] == pytest.approx(nb0 / 4)  # slide: nβ/4, step re-derived there
    assert calls[3]["step_size"] > h0 / 4
    assert (res.config.step_size, res.config.nbeta) == (calls[3]["step_size"], calls[3]["nbeta"])
    outcomes = [a["outcome"] for a in res.meta["preconditioner"]["pilot"]["attempts"]]
    assert outcomes == ["diverged", "hot", "slide", "ok"]


def test_given_step_size_is_kept_and_nbeta_lowered(monkeypatch) -> None:
    model, train, query = trained_problem()
    calls = scripted(["diverged", "ok"], monkeypatch)
    res = bif.attribute(model, train, query, step_size=0.01, **SMALL)
    assert [c["step_size"] for c in calls] == [0.01, 0.01]
    assert calls[1]["nbeta"] == pytest.approx(calls[0]["nbeta"] / 4)
    assert res.config.step_size == 0.01


def test_no_pilot_when_the_user_set_step_and_nbeta(monkeypatch) -> None:
    model, train, query = trained_problem()
    calls = scripted(["diverged"], monkeypatch)
    res = bif.attribute(model, train, query, step_size=1e-3, nbeta=100.0, **SMALL)
    assert calls == [] and "pilot" not in res.meta["preconditioner"]


def test_model_error_before_sampling_when_nothing_helps(monkeypatch) -> None:
    model, train, query = trained_problem()
    scripted(["hot"], monkeypatch)

    def no_sampling(*a, **k):
        raise AssertionError("sampled although the pilot failed")

    monkeypatch.setattr("bif.api.run_chains", no_sampling)
    with pytest.raises(ModelError, match=r"6 pilot runs .* failed.*Nothing was sampled"):
        bif.attribute(model, train, query, **SMALL)


def test_untrained_model_slides_and_nbeta_is_lowered() -> None:
    """The untrained tanh MLP: the centred potential falls away from w* (a real pilot, no
    script); the rules' nβ is lowered 4× per slide until the chains stay."""
    model, train, query = problem()
    res = bif.attribute(model, train, query, precondition_rank=0, **SMALL)
    attempts = res.meta["preconditioner"]["pilot"]["attempts"]
    assert attempts[0]["outcome"] == "slide" and attempts[-1]["outcome"] == "ok"
    assert attempts[0]["min_energy"] < -attempts[0]["limit"]
    slides = sum(a["outcome"] == "slide" for a in attempts)
    assert res.config.nbeta == pytest.approx(attempts[0]["nbeta"] / 4**slides)
