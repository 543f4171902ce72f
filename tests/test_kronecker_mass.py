"""The Kronecker-factored mass (bif.sampler.kronecker, bif.sampler.kronecker_build).

Checks: the operators M, M^½, M^-½, M^-1 against dense matrix functions of the dense K-FAC
blocks (whole and truncated factors, sketched factors, the eigenvalue correction), chain-group
bit identity, the identity fallback and its log line, the factors against the K-FAC formula
computed directly from closed-form per-example activations and output gradients, the
per-example-mean normalisation (A ⊗ G ≈ H on linear regression over token positions), and the
exact lagged-covariance oracle of the kinetic sampler with the mass (and its failure with the
mass left out of the O step).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from bif.config import BIFConfig
from bif.data import DataSource
from bif.estimator import estimate
from bif.functional import FunctionalModel
from bif.oracles import baoab_mode_lag_var, expected_chain_cov
from bif.sampler.kronecker import KroneckerMass, mass_floats, plan_layers
from bif.sampler.kronecker_build import build_kronecker_mass, sample_targets
from bif.sampler.run import run_chains
from bif.task import make_task
from test_oracles import ALPHA, LIN_N, diabetes, t_crit

F64 = torch.float64
NB, GAMMA = 30.0, 2.0


class Mixed(nn.Module):
    """Embedding + Conv2d + LayerNorm + Linear (+ a bias-free head): every kind of block."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.conv = nn.Conv2d(2, 3, 2)  # [B, 2, 3, 3] -> [B, 3, 2, 2]
        self.norm = nn.LayerNorm(15)
        self.fc = nn.Linear(15, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x [B, 2 + 18]: two token ids, then a 2x3x3 image
        e = self.emb(x[:, :2].long()).sum(1)
        c = self.conv(x[:, 2:].reshape(-1, 2, 3, 3)).flatten(1)
        return self.head(torch.tanh(self.fc(self.norm(torch.cat([e, c], 1)))))


def mixed_problem(n: int = 64) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randint(0, 7, (n, 2), generator=g), torch.randn(n, 18, generator=g)], 1)
    return Mixed().double().eval(), (x.to(F64), torch.randint(0, 3, (n,), generator=g))


def dense_mass(mass: KroneckerMass) -> Tensor:
    """``[P, P]`` from the factors by the K-FAC formula (no operator code involved)."""
    m = mass.gamma * torch.eye(mass.num_params, dtype=F64)
    for b in mass.blocks:
        kron = torch.kron(b.g.dense(), b.a.dense())  # row-major vec of X [d_out, d_in]
        if b.core is not None:  # eigenvalues in the kept eigenbasis replaced by the core
            q = torch.kron(b.g.vectors, b.a.vectors)
            lam = (b.g.values[:, None] * b.a.values).reshape(-1)
            kron = kron + q @ torch.diag(b.core.reshape(-1) - lam) @ q.T
        pos = b.gather(torch.arange(mass.num_params, dtype=F64)[None])[0].long().reshape(-1)
        m[pos[:, None], pos[None, :]] = mass.nbeta * kron + mass.gamma * torch.eye(
            len(pos), dtype=F64
        )
    return m


@pytest.mark.parametrize(
    "rank, exact, correction",
    [(64, 4096, False), (64, 4096, True), (2, 4096, False), (2, 4096, True), (3, 2, True)],
)
def test_operators_match_dense_matrix_functions(rank: int, exact: int, correction: bool) -> None:
    """Whole factors (rank 64), truncated ones with their isotropic tail (rank 2), sketched ones
    (max_exact_dim 2), with and without the eigenvalue correction."""
    model, data = mixed_problem()
    mass, info = build_kronecker_mass(
        model, make_task("classification"), data, NB, GAMMA, 2, 40, rank=rank,
        budget_fraction=None, max_exact_dim=exact, eigen_correction=correction,
    )  # fmt: skip
    assert info["factored"] == ["emb", "conv", "fc", "head"]
    assert list(info["fallback"]) == ["norm.weight", "norm.bias"]
    assert info["bytes"] == info["formula_bytes"] == mass.memory_bytes()
    assert bool(info["sketched"]) == (exact == 2)
    assert any(b.a.truncated or b.g.truncated for b in mass.blocks) == (rank < 4)
    dense = dense_mass(mass)
    vals, vecs = torch.linalg.eigh(dense)
    assert float(vals.min()) >= GAMMA * (1 - 1e-12)  # SPD, never below the prior
    power = lambda t: vecs @ torch.diag(vals**t) @ vecs.T  # noqa: E731
    x = torch.randn(5, mass.num_params, dtype=F64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # noqa: E731
    close(mass.matvec(x), x @ dense)
    close(mass.inverse(x), x @ power(-1.0))
    close(mass.sqrt(x), x @ power(0.5))
    close(mass.inverse_sqrt(x), x @ power(-0.5))
    close(mass.sqrt(mass.sqrt(x)), mass.matvec(x))
    close(mass.inverse_sqrt(mass.matvec(mass.inverse_sqrt(x))), x)
    close(mass.matvec(mass.inverse(x)), x)
    close(mass.inverse(x[0]), mass.inverse(x)[0])  # a flat [P] vector
    # chain groups: 2 rows computed as 5 are bit for bit the single-process rows
    assert torch.equal(mass._replace(rows=5).sqrt(x[:2]), mass.sqrt(x)[:2])
    f32 = mass.to("cpu", torch.float32)
    torch.testing.assert_close(
        f32.inverse(x.float()), mass.inverse(x).float(), rtol=1e-4, atol=1e-5
    )


def test_sketched_factors_are_exact_when_the_sketch_spans_the_factor() -> None:
    """Nyström with k + oversample >= d columns reproduces the exact truncation."""
    model, data = mixed_problem()
    kw = dict(rank=2, budget_fraction=None, eigen_correction=False, oversample=20)
    exact, _ = build_kronecker_mass(model, make_task("classification"), data, NB, GAMMA, **kw)
    sk, info = build_kronecker_mass(
        model, make_task("classification"), data, NB, GAMMA, max_exact_dim=1, **kw
    )
    assert info["sketched"] == ["emb", "conv", "fc", "head"]
    for a, b in zip(exact.blocks, sk.blocks, strict=True):
        for fa, fb in ((a.a, b.a), (a.g, b.g)):
            torch.testing.assert_close(fb.dense(), fa.dense(), rtol=1e-9, atol=1e-11)


def test_unsupported_layers_fall_back_to_identity_and_are_logged(caplog) -> None:
    """LayerNorm, a grouped Conv2d, a bare parameter and a tied embedding get mass γ, with one
    INFO line naming them; frozen parameters are not in the flat vector at all."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.conv = nn.Conv2d(4, 4, 1, groups=2)
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(4))
            self.out = nn.Linear(4, 5)
            self.out.weight = self.emb.weight  # tied
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.emb(x[:, 0].long())
            h = self.conv(h[:, :, None, None])[:, :, 0, 0]
            return self.out(self.fc(self.frozen(self.norm(h) * self.scale)))

    torch.manual_seed(0)
    model = Odd().double()
    x, y = torch.randint(0, 5, (16, 1)).double(), torch.randint(0, 5, (16,))
    with caplog.at_level(logging.INFO, logger="bif.sampler.kronecker_build"):
        mass, info = build_kronecker_mass(model, make_task("classification"), (x, y), NB, GAMMA)
    fell = ["scale", "emb.weight", "conv.weight", "conv.bias", "norm.weight", "norm.bias"]
    assert list(info["fallback"]) == fell
    assert "tied" in info["fallback"]["emb.weight"]
    assert info["factored"] == ["out", "fc"]  # out: only its (untied) bias is sampled
    lines = [r.getMessage() for r in caplog.records if "fall back" in r.getMessage()]
    assert len(lines) == 1 and all(k in lines[0] for k in fell)
    fm = FunctionalModel(model, "cpu")
    assert "frozen.weight" not in fm.w_star and mass.num_params == fm.num_params
    v = torch.randn(mass.num_params, dtype=F64)
    off = {k: i for i, k in enumerate(fm.w_star)}
    starts = torch.tensor([0] + [t.numel() for t in fm.w_star.values()]).cumsum(0)
    for k in fell:
        s, e = int(starts[off[k]]), int(starts[off[k] + 1])
        torch.testing.assert_close(mass.matvec(v)[s:e], GAMMA * v[s:e])


@pytest.mark.parametrize("fisher, correction", [("sampled", False), ("sampled", True),
                                                ("empirical", True)])  # fmt: skip
def test_factors_match_the_kfac_formula_from_per_example_quantities(fisher, correction) -> None:
    """2-layer MLP, closed-form per-example inputs ã_i and output gradients g_i = ∂l_i/∂s:
    A = mean ã ãᵀ, G = mean g gᵀ (per-example means), S = mean (Q_Gᵀ g ãᵀ Q_A)²."""
    torch.manual_seed(0)
    g0 = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(50, 4, generator=g0, dtype=F64), torch.randint(0, 3, (50,), generator=g0)
    task = make_task("classification")
    mass, info = build_kronecker_mass(
        model, task, (x, y), NB, GAMMA, 1, 64, fisher=fisher, eigen_correction=correction,
        seed=5, budget_fraction=None,
    )  # fmt: skip
    assert info["fisher"] == fisher and info["examples"] == 50
    l1, l2 = model[0], model[2]
    with torch.no_grad():
        s1 = l1(x)
        h = torch.tanh(s1)
        s2 = l2(h)
        t = sample_targets(task, s2, torch.Generator().manual_seed(5)) if fisher == "sampled" else y
        g2 = torch.softmax(s2, 1) - F.one_hot(t, 3)  # ∂CE/∂logits
        g1 = (g2 @ l2.weight) * (1 - h**2)
    ones = torch.ones(50, 1, dtype=F64)
    for block, a, g in zip(mass.blocks, (torch.cat([x, ones], 1), torch.cat([h, ones], 1)),
                           (g1, g2), strict=True):  # fmt: skip
        torch.testing.assert_close(block.a.dense(), a.T @ a / 50, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(block.g.dense(), g.T @ g / 50, rtol=1e-12, atol=1e-14)
        if correction:
            qa, qg = block.a.vectors, block.g.vectors
            per = torch.einsum("ng,na->nga", g @ qg, a @ qa)  # Q_Gᵀ (g_i ã_iᵀ) Q_A
            torch.testing.assert_close(block.core, per.pow(2).mean(0), rtol=1e-10, atol=1e-14)
        else:
            assert block.core is None


def test_mean_loss_normalisation_on_token_positions() -> None:
    """Linear regression applied to every position of [B, T, d] inputs, ½-squared error summed
    over positions: H = (1/n) Σ_{i,t} x̃ x̃ᵀ. K-FAC gives A = H/T exactly and G = (1/n) Σ_{i,t}
    ξ², ξ ~ N(0, 1) the sampled residuals: E[G] = T with standard error sqrt(2T/n)."""
    torch.manual_seed(0)
    g0 = torch.Generator().manual_seed(2)
    n, t, d = 4096, 3, 4
    x = torch.randn(n, t, d, generator=g0, dtype=F64) + 0.5
    model = nn.Linear(d, 1).double()
    y = model(x).detach() + 0.1 * torch.randn(n, t, 1, generator=g0, dtype=F64)
    mass, info = build_kronecker_mass(model, make_task("regression"), (x, y), NB, GAMMA, 4, 1024)
    assert info["examples"] == n and info["batches"] == 4
    (block,) = mass.blocks
    xt = torch.cat([x, torch.ones(n, t, 1, dtype=F64)], -1).reshape(-1, d + 1)
    h = xt.T @ xt / n
    torch.testing.assert_close(block.a.dense() * t, h, rtol=1e-12, atol=1e-12)
    z = (float(block.g.values[0]) - t) / (2 * t / n) ** 0.5
    assert abs(z) < stats.norm.ppf(1 - ALPHA / 2), z


def test_kinetic_sampler_with_kronecker_mass_matches_exact_gaussian_covariance() -> None:
    """Linear regression (Gaussian posterior, precision A = nβH + γI), kinetic Langevin with the
    Kronecker mass M built from the sampled Fisher of the 40 training rows (rank 2: the 5-dim
    input factor truncated, with its tail; EK-FAC core). In u = M^½ δ the chain is unit-mass
    BAOAB on K = M^-½ A M^-½ = W diag(κ) Wᵀ, so Cov(δ_{t+l}, δ_t) = M^-½ W diag(c_l(κ)) Wᵀ M^-½
    with c_l the per-mode BAOAB lag covariances; every -BIF entry must match it within the
    Bonferroni t bound of its own standard error. A mass whose sqrt is the identity (noise
    N(0, I) in the O step) samples another law and fails the same check.
    Measured (seed 0): max |z| = 3.5 (critical 4.9); with the unit-noise mass 8012."""
    model, X, Y, design, H, mu = diabetes()
    nbeta, gamma, chains, draws, thin, burnin = 40.0, 4.0, 128, 200, 5, 150
    fm = FunctionalModel(model, "cpu", F64)
    task = make_task("regression")
    mass, info = build_kronecker_mass(fm, task, (X[:LIN_N], Y[:LIN_N]), nbeta, gamma, 1, LIN_N,
                                      rank=2, budget_fraction=None)  # fmt: skip
    assert (
        info["factored"] == [""] and mass.blocks[0].a.truncated and mass.blocks[0].core is not None
    )
    m = mass.matvec(torch.eye(5, dtype=F64))
    mv, mq = torch.linalg.eigh(m)
    m_isqrt = mq @ torch.diag(mv**-0.5) @ mq.T
    kappa, w = torch.linalg.eigh(m_isqrt @ (nbeta * H + gamma * torch.eye(5, dtype=F64)) @ m_isqrt)
    h = 1.0 / float(kappa.max().sqrt())  # the auto rule in the mass's frame, friction 2
    start = baoab_mode_lag_var(kappa, h, 2.0, torch.tensor([0, burnin]))
    assert float((start[1] / start[0]).abs().max()) < 1e-6
    lag = baoab_mode_lag_var(kappa, h, 2.0, torch.arange(draws) * thin)  # [L, 5]
    load_q, load_i = design[LIN_N:] @ m_isqrt @ w, design[:LIN_N] @ m_isqrt @ w
    s = torch.einsum("qk,lk,ik->lqi", load_q, lag, load_i)
    expected = expected_chain_cov(0.5 * s**2 + mu[LIN_N:, None] * mu[None, :LIN_N] * s)
    cfg = BIFConfig(num_chains=chains, num_draws=draws, num_burnin=burnin, thin=thin,
                    step_size=h, friction=2.0, nbeta=nbeta, gamma=gamma, sampler="kinetic",
                    precondition_rank=0, pilot_steps=0)  # fmt: skip
    train = DataSource((X[:LIN_N], Y[:LIN_N]), "train", "cpu", F64)
    query = DataSource((X[LIN_N:], Y[LIN_N:]), "query", "cpu", F64)

    def z_max(mm: KroneckerMass) -> float:
        out = run_chains(fm, task, train, query, cfg, progress=False, mass=mm)
        est = estimate(out.moments, cfg.centering, out.blocks)
        return float(((-est.scores - expected) / est.stderr).abs().max())

    crit = t_crit(chains, expected.numel())
    assert z_max(mass) <= crit

    class UnitNoise(KroneckerMass):
        def sqrt(self, x: Tensor) -> Tensor:  # the O step's N(0, M) replaced by N(0, I)
            return x

    assert z_max(UnitNoise(*mass)) > crit


def test_memory_formula_counts_every_tensor() -> None:
    model, data = mixed_problem()
    for rank in (1, 2, 5):
        mass, info = build_kronecker_mass(model, make_task("classification"), data, NB, GAMMA,
                                          rank=rank, budget_fraction=None)  # fmt: skip
        specs, _ = plan_layers(model, list(dict(model.named_parameters())))
        assert mass.memory_bytes() == 8 * mass_floats(specs, rank, True) == info["bytes"]
    _, info = build_kronecker_mass(model, make_task("classification"), data, NB, GAMMA,
                                        rank=64, budget_fraction=0.5, budget_floor=0)  # fmt: skip
    assert (
        info["bytes"]
        <= 0.5 * info["replica_bytes"]
        < 8 * mass_floats(specs, info["rank"] + 1, True)
    )


def test_causal_lm_head_factors_from_sampled_next_tokens() -> None:
    """A causal LM (tests/test_lm.py's TinyLM, right padding): the head's G is the mean over
    sequences of Σ_t g gᵀ with g = softmax - onehot(sampled token) at attributed positions, and
    its A the mean of h̃ h̃ᵀ over those positions only (padding and the last position carry no
    loss, hence no curvature)."""
    from bif.lm import CausalLMTask
    from test_lm import TinyLM
    from test_lm import _data as lm_data

    model, task = TinyLM().double().eval(), CausalLMTask()
    train, _ = lm_data()
    mass, info = build_kronecker_mass(model, task, train, NB, GAMMA, 1, 16, seed=4,
                                      budget_fraction=None)  # fmt: skip
    assert info["factored"] == ["emb", "mix", "out"] and info["fisher"] == "sampled"
    ids, attn = train["input_ids"], train["attention_mask"].bool()
    length = int(attn.sum(1).max())
    ids_t = torch.where(attn, ids, 0)[:, :length]
    with torch.no_grad():
        e = model.emb(ids_t)
        steps = torch.arange(1, length + 1, dtype=F64)[:, None]
        h = torch.tanh(model.mix(e.cumsum(1) / steps))
        logits = model.out(h)[:, :-1]
    t = sample_targets(task, logits, torch.Generator().manual_seed(4))
    used = task.token_mask(train)[:, 1:length]  # [B, L-1]
    # the task's cross-entropy runs in float32
    g = (torch.softmax(logits.float(), -1) - F.one_hot(t, logits.shape[-1])).double()
    g = g * used[..., None]
    ht = torch.cat([h[:, :-1], torch.ones(*h.shape[:2], 1, dtype=F64)[:, :-1]], -1)[used]
    head = mass.blocks[2]
    torch.testing.assert_close(head.a.dense(), ht.T @ ht / len(ht), rtol=1e-12, atol=1e-14)
    gg = g.reshape(-1, g.shape[-1])
    g_ref = gg.T @ gg / ids.shape[0]  # float32 rounding of the task's cross-entropy gradient
    torch.testing.assert_close(head.g.dense(), g_ref, rtol=1e-5, atol=1e-6 * float(g_ref.max()))
    emb = mass.blocks[0].a.values  # diagonal: frequencies of the tokens that carry curvature
    assert emb.sum().item() == pytest.approx(1.0) and bool((emb[ids_t.unique()] >= 0).all())
    x = torch.randn(3, mass.num_params, dtype=F64)
    torch.testing.assert_close(mass.inverse(mass.matvec(x)), x)
