"""The curvature pass's building blocks: HVPs (reverse-over-reverse, its forward-over-reverse
twin, the exact Hessian), Lanczos with its residual bound, the preconditioned extremes against a
dense eigendecomposition, and the counted operator that shows progress."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from bif.curvature import CountedHVP, hessian_operator
from bif.functional import FunctionalModel
from bif.sampler.mass import flatten, unflatten
from bif.spectrum import lanczos, lowrank_mass, preconditioned_extremes
from bif.task import make_task
from test_mass import exact_hessian, mlp_problem

F64 = torch.float64


@pytest.mark.parametrize("split", [1, 2])  # one chunk: the graph is built once and reused
def test_reverse_hvp_matches_forward_twin_and_exact_hessian(split: int) -> None:
    model, x, y = mlp_problem()
    fmodel = FunctionalModel(model, torch.device("cpu"), F64)
    task = make_task("classification", None)
    cut = [0, 50] if split == 1 else [0, 20, 50]
    chunks = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(cut)]
    sizes = [b - a for a, b in itertools.pairwise(cut)]
    H = exact_hessian(model, x, y)
    rev = hessian_operator(fmodel, task, chunks, sizes, mode="reverse")
    fwd = hessian_operator(fmodel, task, chunks, sizes, mode="forward")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # repeated calls through the kept graph stay exact
        v = torch.randn(H.shape[0], generator=g, dtype=F64)
        vd = unflatten(v, fmodel.w_star)
        hv_rev = flatten(rev(vd), chain_dim=False)
        torch.testing.assert_close(hv_rev, H @ v, rtol=1e-10, atol=1e-12)
        hv_fwd = flatten(fwd(vd), chain_dim=False)
        torch.testing.assert_close(hv_fwd, hv_rev, rtol=1e-10, atol=1e-12)


def test_lanczos_extremes_and_residual_bound() -> None:
    """A spectrum like the preconditioned precision's: bulk near 1, outliers at both ends."""
    g = torch.Generator().manual_seed(0)
    n = 300
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = 1.0 + 0.05 * torch.randn(n, generator=g, dtype=F64)
    eig[:3] = torch.tensor([-2.0, -0.7, 0.2], dtype=F64)
    eig[-2:] = torch.tensor([6.0, 9.0], dtype=F64)
    a = q @ torch.diag(eig) @ q.T
    theta, s, basis, resid = lanczos(lambda v: a @ v, n, 40, torch.zeros(n, dtype=F64), seed=1)
    assert theta.shape == (40,) and basis.shape == (40, n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(40, dtype=F64), atol=1e-10, rtol=0)
    for t, r in ((theta[-1], resid[-1]), (theta[0], resid[0])):
        assert float((eig - t).abs().min()) <= float(r) + 1e-12  # an eigenvalue within r
    assert float(theta[-1]) == pytest.approx(9.0, rel=1e-6)
    assert float(theta[0]) == pytest.approx(-2.0, rel=1e-6)
    ritz = basis.T @ s  # Ritz vectors: the residual norms are what they say
    for j in (0, 1, 39):
        r = a @ ritz[:, j] - theta[j] * ritz[:, j]
        assert float(r.norm()) == pytest.approx(float(resid[j]), rel=1e-4, abs=1e-10)


def test_preconditioned_extremes_match_dense_eigendecomposition() -> None:
    """k'_max (with its residual), k'_min and the directions below the floor of
    M^-½(nβH + γI)M^-½ on an untrained MLP, whose Hessian has negative eigenvalues."""
    model, x, y = mlp_problem()
    fmodel = FunctionalModel(model, torch.device("cpu"), F64)
    hvp = hessian_operator(fmodel, make_task("classification", None), [(x, y)], [50])
    H = exact_hessian(model, x, y)
    vals, vecs = torch.linalg.eigh(H)
    nbeta, gamma = 400.0, 3.0
    mass = lowrank_mass(vals.flip(0)[:4], vecs.flip(1)[:, :4], nbeta, gamma, fmodel.w_star)
    dense = nbeta * H + gamma * torch.eye(H.shape[0], dtype=F64)
    pre = mass.inverse_sqrt(mass.inverse_sqrt(dense).T)
    exact = torch.linalg.eigvalsh(0.5 * (pre + pre.T))
    ext = preconditioned_extremes(hvp, mass, nbeta, gamma, fmodel.w_star, 0.5)
    assert ext.hvps == 40  # P = 51 parameters, 40 Lanczos steps
    assert float(exact[-1]) - 1e-8 <= ext.kmax <= float(exact[-1]) * (1 + 1e-3)
    assert ext.kmin == pytest.approx(float(exact[0]), rel=1e-6)
    # interlacing: at most as many Ritz values below the floor as eigenvalues; the ends converged
    assert 3 <= ext.low.shape[1] <= int((exact < 0.5).sum())
    torch.testing.assert_close(ext.low_values[:3], exact[:3], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ext.low.T @ ext.low, torch.eye(ext.low.shape[1], dtype=F64))


def test_counted_hvp_counts_and_shows_progress(capsys, caplog) -> None:
    counted = CountedHVP(lambda v: v, progress=True)
    with caplog.at_level(logging.INFO, logger="bif.curvature"):
        counted.set_stage("top 4 Hessian eigenpairs")
        for _ in range(7):
            counted({"w": torch.ones(2)})
    counted.close()
    assert counted.count == 7
    err = capsys.readouterr().err
    assert "curvature" in err and "7HVP" in err.replace(" ", "")
    assert "top 4 Hessian eigenpairs (0 HVPs so far)" in caplog.text
