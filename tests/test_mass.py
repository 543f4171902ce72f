"""The low-rank mass matrix of the kinetic sampler and the eigenpairs it is built from.

Checks: the mass operators against dense matrix functions; the Hessian eigenpairs (dense and
Lanczos paths) against ``torch.func.hessian``; one BAOAB step with the mass against the
unit-mass step in ``u = M^½ w`` (the identity the sampler's correctness rests on); the auto
rules in the mass's frame; resuming reads the stored eigenpairs instead of recomputing them.
The exact-covariance oracle of the preconditioned chain is in test_oracles.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import bif
from bif.checkpoint import CURVATURE_FILE
from bif.config import BIFConfig
from bif.curvature import hessian_operator
from bif.errors import ConfigError
from bif.functional import FunctionalModel
from bif.sampler import kinetic
from bif.sampler.mass import LowRankMass, flatten, unflatten
from bif.spectrum import lowrank_mass, top_hessian_eigenpairs
from bif.task import make_task

F64 = torch.float64


def random_mass(p: int = 12, k: int = 3, seed: int = 0) -> tuple[LowRankMass, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=F64))
    curvature = 5.0 + 20.0 * torch.rand(k, generator=g, dtype=F64)
    gamma = 2.0
    dense = gamma * torch.eye(p, dtype=F64) + basis @ torch.diag(curvature - gamma) @ basis.T
    return LowRankMass(gamma, basis, curvature), dense


def test_mass_operators_match_dense_matrix_functions() -> None:
    mass, dense = random_mass()
    vals, vecs = torch.linalg.eigh(dense)
    power = lambda t: vecs @ torch.diag(vals**t) @ vecs.T  # noqa: E731
    x = torch.randn(4, 12, dtype=F64)
    torch.testing.assert_close(mass.inverse(x), x @ power(-1.0))
    torch.testing.assert_close(mass.sqrt(x), x @ power(0.5))
    torch.testing.assert_close(mass.inverse_sqrt(x), x @ power(-0.5))
    torch.testing.assert_close(mass.sqrt(mass.sqrt(x)), x @ dense)


def test_flatten_round_trip() -> None:
    params = {"a": torch.randn(3, 2, 4), "b": torch.randn(3, 5)}
    flat = flatten(params)
    assert flat.shape == (3, 13)
    back = unflatten(flat, params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    single = {k: v[0] for k, v in params.items()}
    assert torch.equal(unflatten(flatten(single, chain_dim=False), single)["a"], single["a"])


def mlp_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(50, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (50,), generator=g)
    return model, x, y


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            parts[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

    return hessian(loss)(flat)


@pytest.mark.parametrize("k", [4, 16])  # P = 51: Lanczos for k = 4, dense for k = 16
def test_eigenpairs_match_exact_hessian(k: int) -> None:
    model, x, y = mlp_problem()
    fmodel = FunctionalModel(model, torch.device("cpu"), F64)
    task = make_task("classification", None)
    hvp = hessian_operator(fmodel, task, [(x[:30], y[:30]), (x[30:], y[30:])], [30, 20])
    vals, vecs, count = top_hessian_eigenpairs(hvp, fmodel.w_star, k, tol=1e-10)
    exact = torch.linalg.eigvalsh(exact_hessian(model, x, y)).flip(0)[:k]
    torch.testing.assert_close(vals, exact, rtol=1e-6, atol=1e-9)
    H = exact_hessian(model, x, y)
    torch.testing.assert_close(H @ vecs, vecs * vals, rtol=0, atol=1e-6)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=F64), rtol=0, atol=1e-8)
    assert count == 51 if k == 16 else 0 < count < 51


def test_step_with_mass_is_unit_mass_step_in_scaled_coordinates() -> None:
    """BAOAB with mass M on w equals unit-mass BAOAB on u = M^½ w (gradient M^-½ ∇U, momentum
    M^-½ v, same noise ξ): the identity behind 'same posterior, different speeds'."""
    mass, dense = random_mass()
    vals, vecs = torch.linalg.eigh(dense)
    half = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    inv_half = torch.linalg.inv(half)
    like = {"w": torch.zeros(2, 12, dtype=F64)}
    w, v, g, xi = (torch.randn(2, 12, dtype=F64) for _ in range(4))
    state = kinetic.KineticState({"w": w}, {"w": v})
    out, _ = kinetic.step(state, {"w": g}, {"w": xi}, 0.3, 1.7, mass)
    ref_state = kinetic.KineticState({"w": w @ half}, {"w": v @ inv_half})
    ref, _ = kinetic.step(ref_state, {"w": g @ inv_half}, {"w": xi}, 0.3, 1.7)
    torch.testing.assert_close(out.params["w"] @ half, ref.params["w"])
    torch.testing.assert_close(out.momentum["w"] @ inv_half, ref.momentum["w"])
    assert set(unflatten(flatten(like), like)) == {"w"}


def test_flatten_of_flat_views_is_free() -> None:
    """``flatten`` of :func:`unflatten`'s views returns the flat tensor itself (no copy); of
    anything else, a copy with the same values."""
    like = {"a": torch.zeros(3, 2, 4), "b": torch.zeros(3, 5), "c": torch.zeros(3)}
    x = torch.randn(7, 14)
    for flat in (x[:3], x[4:]):
        views = unflatten(flat, like)
        assert flatten(views).data_ptr() == flat.data_ptr() and torch.equal(flatten(views), flat)
        copied = {k: v.clone() for k, v in views.items()}
        assert flatten(copied).data_ptr() != flat.data_ptr()
        assert torch.equal(flatten(copied), flat)
        swapped = {"b": views["b"], "a": views["a"], "c": views["c"]}
        assert flatten(swapped).data_ptr() != flat.data_ptr()
    wide = torch.randn(3, 20)
    assert torch.equal(flatten(unflatten(wide[:, :14], like)), wide[:, :14])


def test_auto_rules_in_the_mass_frame() -> None:
    """h = 1/sqrt(top eigenvalue of M^-½ A M^-½) from the exact Hessian, friction 2, and the
    mass built from the top-k eigenpairs of the exact Hessian."""
    model, x, y = mlp_problem()
    H = exact_hessian(model, x, y)
    res = bif.attribute(model, (x, y), (x[:3], y[:3]), dtype=F64, num_chains=2, num_draws=3,
                        num_burnin=2, thin=1, progress=False, condition=3.0,
                        precondition_rank=6)  # fmt: skip
    cfg, info = res.config, res.meta["preconditioner"]
    vals, vecs = torch.linalg.eigh(H)
    assert res.meta["lambda_max"] == pytest.approx(float(vals[-1]), rel=1e-6)
    mass = lowrank_mass(vals.flip(0)[:6], vecs.flip(1)[:, :6], cfg.nbeta, cfg.gamma,
                        {"w": torch.zeros(H.shape[0], dtype=F64)})  # fmt: skip
    A = cfg.nbeta * H + cfg.gamma * torch.eye(H.shape[0], dtype=F64)
    pre = mass.inverse_sqrt(mass.inverse_sqrt(A).T)
    kmax = float(torch.linalg.eigvalsh(0.5 * (pre + pre.T)).max())
    assert info["kmax_preconditioned"] == pytest.approx(kmax, rel=1e-2)
    assert cfg.step_size == pytest.approx(1 / math.sqrt(max(kmax, 1.0)), rel=1e-2)
    assert cfg.friction == 2.0
    assert info["rank"] == 6


def test_rank_validation_and_samplers_without_mass() -> None:
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="precondition_rank must be an integer >= 0"):
            BIFConfig(precondition_rank=bad)
    model, x, y = mlp_problem()
    res = bif.attribute(model, (x, y), (x[:3], y[:3]), num_chains=2, num_draws=3, num_burnin=2,
                        thin=1, progress=False, sampler="sgld")  # fmt: skip
    assert "rank" not in res.meta["preconditioner"]  # the mass is a kinetic-sampler option


def test_resume_reads_stored_eigenpairs(tmp_path, monkeypatch) -> None:
    model, x, y = mlp_problem()
    kw = dict(num_chains=2, num_draws=6, num_burnin=2, thin=1, progress=False, condition=3.0,
              precondition_rank=4, run_dir=tmp_path)  # fmt: skip
    first = bif.attribute(model, (x, y), (x[:3], y[:3]), **kw)
    assert (tmp_path / CURVATURE_FILE).exists() and first.meta["preconditioner"]["hvps"] > 0

    def fail(*a, **k):
        raise AssertionError("eigenpairs recomputed on resume")

    monkeypatch.setattr("bif.auto.top_hessian_eigenpairs", fail)
    again = bif.attribute(model, (x, y), (x[:3], y[:3]), **kw)
    assert again.meta["preconditioner"]["eigenpair_hvps"] == 0
    assert torch.equal(again.scores, first.scores)
    assert again.config == first.config


def test_rank_is_lowered_to_fit_the_lanczos_budget(monkeypatch) -> None:
    from bif import auto

    assert auto.affordable_rank(64, 10_000) == 64
    assert auto.affordable_rank(64, 7_000_000) == 18  # 2048 MB / (8 B · 7M) ≈ 38 vectors
    assert auto.affordable_rank(64, 40) == 39
    monkeypatch.setattr(auto, "LANCZOS_BUDGET_MB", 1e-3)
    model, x, y = mlp_problem()
    # (preconditioner='auto' takes the Kronecker mass there: tests/test_preconditioner_choice)
    with pytest.warns(UserWarning, match="sampling with unit mass instead"):
        res = bif.attribute(model, (x, y), (x[:3], y[:3]), num_chains=2, num_draws=3,
                            num_burnin=2, thin=1, progress=False,
                            preconditioner="lowrank")  # fmt: skip
    assert "rank" not in res.meta["preconditioner"]
    assert res.config.friction == pytest.approx(2 * math.sqrt(res.config.gamma))


def test_negative_curvature_lowers_the_condition_or_is_reported() -> None:
    """An untrained model: the Hessian's most negative eigenvalue mu_min is far below -γ/nβ at
    condition 150. With nbeta='auto' the rules lower nβ until the flattest preconditioned
    direction keeps half the prior's curvature, 1 + nβ·mu_min/γ = KMIN_FLOOR (checked against
    the exact Hessian); with that nβ given by hand as the condition-150 value, the run warns
    that the local posterior is not normalisable."""
    from bif.auto import KMIN_FLOOR

    model, x, y = mlp_problem()
    H = exact_hessian(model, x, y)
    mu_min, lam_max = (float(v) for v in torch.linalg.eigvalsh(H)[[0, -1]])
    assert mu_min < -lam_max / 150
    kw = dict(num_chains=2, num_draws=3, num_burnin=2, thin=1, progress=False, dtype=F64,
              precondition_rank=6)  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (a run this short is rightly flagged by its diagnostics; that is not under test here)
        warnings.simplefilter("ignore", bif.DiagnosticWarning)
        res = bif.attribute(model, (x, y), (x[:3], y[:3]), condition=150.0,
                            negative_curvature="lower", **kw)  # fmt: skip
    info, cfg = res.meta["preconditioner"], res.config
    assert info["condition_lowered_to"] < 150
    assert 1 + cfg.nbeta * mu_min / cfg.gamma == pytest.approx(KMIN_FLOOR, abs=0.05)
    assert info["kmin_preconditioned"] == pytest.approx(KMIN_FLOOR, abs=0.05)

    nbeta_150 = cfg.gamma * 150 / lam_max
    with pytest.warns(UserWarning, match="not normalisable") as rec:
        given = bif.attribute(model, (x, y), (x[:3], y[:3]), nbeta=nbeta_150,
                              negative_curvature="lower", **kw)  # fmt: skip
    kmin = given.meta["preconditioner"]["kmin_preconditioned"]
    assert kmin < 0
    mu_est = (kmin - 1) * cfg.gamma / nbeta_150  # what the warning reports
    assert mu_est == pytest.approx(mu_min, rel=0.1)
    assert f"near {mu_est:.3g}" in str(rec[0].message)
    assert "condition_lowered_to" not in given.meta["preconditioner"]


def test_saddle_localisation_gradient_matches_its_potential() -> None:
    """LocalPosterior's extra term ½ Σ c_j (v_jᵀ(w - w*))²: its gradient in potential_grad is
    the autograd gradient of the potential it adds (chain dim included)."""
    from bif.posterior import LocalPosterior

    g = torch.Generator().manual_seed(1)
    w_star = {
        "a": torch.randn(3, 2, generator=g, dtype=F64),
        "b": torch.randn(4, generator=g, dtype=F64),
    }
    v, _ = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=F64))
    c = torch.tensor([3.0, 7.0], dtype=F64)
    post = LocalPosterior(5.0, 2.0, w_star, None, (v, c))
    plain = LocalPosterior(5.0, 2.0, w_star)
    params = {k: (t + 0.1 * torch.randn(2, *t.shape, generator=g, dtype=F64)).requires_grad_()
              for k, t in w_star.items()}  # fmt: skip
    zero = {k: torch.zeros_like(t) for k, t in params.items()}
    extra = post.potential(params, torch.zeros(2, dtype=F64)) - plain.potential(
        params, torch.zeros(2, dtype=F64)
    )
    grads = torch.autograd.grad(extra.sum(), list(params.values()))
    got = post.potential_grad(params, zero)
    ref = plain.potential_grad(params, zero)
    for (k, _), gk in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(got[k] - ref[k], gk)


def test_localise_finds_the_negative_eigenpairs() -> None:
    """negative_curvature='localise' on the untrained MLP: the localised directions are the
    Hessian's most negative eigenvalues (exact Hessian), each sampled at curvature γ + nβ|μ|."""
    model, x, y = mlp_problem()
    mu = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    res = bif.attribute(model, (x, y), (x[:3], y[:3]), num_chains=2, num_draws=3, num_burnin=2,
                        thin=1, progress=False, dtype=F64, precondition_rank=6,
                        negative_curvature="localise")  # fmt: skip
    info = res.meta["preconditioner"]
    found = torch.tensor(info["localised_mu"], dtype=F64)
    torch.testing.assert_close(found, mu[: len(found)], rtol=0.05, atol=1e-3)
    assert info["kmin_preconditioned"] >= 0.45
    with pytest.raises(ConfigError, match="negative_curvature must be 'lower' or 'localise'"):
        BIFConfig(negative_curvature="flip")
