"""Hand-written baselines against slow references, closed forms, retraining, and bif.attribute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_iris
from torch import Tensor, nn
from torch.func import grad, hessian

import bif
from bif.baselines.base import AttributionContext, Attributor
from bif.baselines.bif_method import BIFAttributor
from bif.baselines.gradsim import GradientCosine, GradientDot
from bif.baselines.influence import (
    CGInfluence,
    ExactInfluence,
    LiSSAInfluence,
    ModelTooLargeError,
)
from bif.errors import ConfigError

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and OpenMP barriers spin badly on shared cores.

    Module scope, so it is in force before the module-scoped model fixture trains.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def iris_ctx() -> AttributionContext:
    """A 4-8-3 tanh MLP (67 parameters) trained on 120 iris flowers; 30 held-out queries."""
    x, y = load_iris(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(150, generator=g)
    tr, te = perm[:120], perm[120:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x[tr]), y[tr]).backward()
        opt.step()
    return AttributionContext(model.eval(), x[tr], y[tr], x[te], y[te])


def loop_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-example gradients [B, P], one ordinary backward pass per example (the slow twin)."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_every_method_satisfies_the_protocol():
    for m in (GradientDot(), GradientCosine(), ExactInfluence(), CGInfluence(), BIFAttributor()):
        assert isinstance(m, Attributor)


def test_gradient_dot_and_cosine_equal_a_naive_autograd_loop(iris_ctx):
    ctx = iris_ctx
    model64 = copy.deepcopy(ctx.model).double()
    ctx64 = AttributionContext(model64, ctx.x_train.double(), ctx.y_train,
                               ctx.x_query.double(), ctx.y_query)  # fmt: skip
    gt = loop_grads(model64, ctx64.x_train, ctx64.y_train)
    gq = loop_grads(model64, ctx64.x_query, ctx64.y_query)
    dot = GradientDot(chunk_size=7).scores(ctx64)  # chunk size not dividing N on purpose
    torch.testing.assert_close(dot, -(gq @ gt.T), rtol=1e-10, atol=1e-12)
    cos = GradientCosine(chunk_size=7).scores(ctx64)
    ref = -(F.normalize(gq, dim=1) @ F.normalize(gt, dim=1).T)
    torch.testing.assert_close(cos, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(GradientDot().self_influence(ctx64), -gt.pow(2).sum(1))
    # float32 model: same scores to float32 accuracy
    torch.testing.assert_close(GradientDot().scores(ctx), dot, rtol=1e-4, atol=1e-6)


def test_exact_influence_matches_the_closed_form_of_linear_regression():
    g = torch.Generator().manual_seed(0)
    n, d, lam = 50, 3, 0.1
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 * torch.randn(n, generator=g)
    xq = torch.randn(4, d, generator=g, dtype=F64)
    yq = torch.randn(4, generator=g, dtype=F64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():  # a point off the optimum: residuals, hence gradients, are generic
        model.weight.copy_(torch.tensor([[0.8, -1.5, 0.2]]))
        model.bias.fill_(0.1)
    ctx = AttributionContext(model, x, y[:, None], xq, yq[:, None], task="regression")
    # ½(w·x + b - y)²: gradient r·[x, 1], Hessian of the mean = mean [x,1][x,1]ᵀ (parameter
    # order: weight then bias, as model.parameters()).
    xt, xqt = (
        torch.cat([x, torch.ones(n, 1, dtype=F64)], 1),
        torch.cat([xq, torch.ones(4, 1, dtype=F64)], 1),
    )
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    gt = (xt @ w - y)[:, None] * xt
    gq = (xqt @ w - yq)[:, None] * xqt
    h = xt.T @ xt / n
    expected = -gq @ torch.linalg.solve(h + lam * torch.eye(d + 1, dtype=F64), gt.T)
    exact = ExactInfluence(damping=lam, hessian_budget=40)  # several Hessian chunks
    torch.testing.assert_close(exact.scores(ctx), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(CGInfluence(damping=lam).scores(ctx), expected, rtol=1e-7,
                               atol=1e-10)  # fmt: skip


def test_exact_and_iterative_influence_agree_on_a_tiny_mlp(iris_ctx):
    exact_m = ExactInfluence(damping=1e-2)
    exact = exact_m.scores(iris_ctx)
    # The damping makes H + λI positive definite; otherwise the comparison is meaningless.
    assert exact_m.info["lambda_min"] + 1e-2 > 0
    cg_m = CGInfluence(damping=1e-2, tol=1e-10, query_block=8)
    cg = cg_m.scores(iris_ctx)
    scale = float(exact.abs().max())
    torch.testing.assert_close(cg, exact, rtol=1e-4, atol=1e-4 * scale)
    assert cg_m.info["max_relative_residual"] <= 1e-10
    # LiSSA converges at rate 1 - (λ_min + λ)/s per step; λ = 0.1 needs a few hundred steps.
    sub = AttributionContext(iris_ctx.model, iris_ctx.x_train, iris_ctx.y_train,
                             iris_ctx.x_query[:4], iris_ctx.y_query[:4])  # fmt: skip
    lissa = LiSSAInfluence(damping=0.1, depth=400).scores(sub)
    ref = ExactInfluence(damping=0.1).scores(sub)
    torch.testing.assert_close(lissa, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_exact_self_influence_is_the_diagonal_of_train_on_train_scores(iris_ctx):
    ctx = iris_ctx
    train_on_train = AttributionContext(ctx.model, ctx.x_train, ctx.y_train,
                                        ctx.x_train, ctx.y_train)  # fmt: skip
    exact = ExactInfluence(damping=1e-2)
    torch.testing.assert_close(
        exact.self_influence(ctx), exact.scores(train_on_train).diagonal(), rtol=1e-8, atol=0
    )


def test_exact_influence_refuses_large_models_and_bad_arguments(iris_ctx):
    with pytest.raises(ModelTooLargeError, match="CGInfluence"):
        ExactInfluence(max_params=50).scores(iris_ctx)
    with pytest.raises(ConfigError):
        ExactInfluence(damping=-1.0)
    with pytest.raises(ConfigError):
        CGInfluence(max_iter=0)


# --- sign convention, checked by retraining -------------------------------------------------

REG = 1e-2  # L2 strength of the logistic regression; the exact IF uses it as its damping


def fit_logistic(x: Tensor, y: Tensor) -> nn.Linear:
    """argmin of mean cross-entropy + REG/2·||θ||² for a 2-class linear model (Newton, float64)."""
    d = x.shape[1]

    def objective(t: Tensor) -> Tensor:
        logits = x @ t[: 2 * d].reshape(2, d).T + t[2 * d :]
        return F.cross_entropy(logits, y) + REG / 2 * t.pow(2).sum()

    t = torch.zeros(2 * d + 2, dtype=F64)
    for _ in range(30):
        g = grad(objective)(t)
        if float(g.norm()) < 1e-12:
            break
        t = t - torch.linalg.solve(hessian(objective)(t), g)
    model = nn.Linear(d, 2).double()
    with torch.no_grad():
        model.weight.copy_(t[: 2 * d].reshape(2, d))
        model.bias.copy_(t[2 * d :])
    return model


def test_negative_scores_are_proponents_by_retraining():
    """Removing the most negative-scored examples raises the query loss; the most positive lower it.

    A direct check of the sign convention on real data (breast cancer, logistic regression):
    nothing statistical, the retrained optimum is deterministic.
    """
    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0))
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    xt, yt, xq, yq = x[perm[:400]], y[perm[:400]], x[perm[400:]], y[perm[400:]]
    model = fit_logistic(xt, yt)
    with torch.no_grad():
        q_loss = F.cross_entropy(model(xq), yq, reduction="none")
    queries = q_loss.argsort(descending=True)[:3]  # the hardest test points: clear signals
    ctx = AttributionContext(model, xt, yt, xq[queries], yq[queries])
    scores = ExactInfluence(damping=REG).scores(ctx)
    k = 20
    for q, qi in enumerate(queries.tolist()):
        change = {}
        for side, order in (("proponents", scores[q].argsort()),
                            ("opponents", scores[q].argsort(descending=True))):  # fmt: skip
            keep = torch.ones(len(yt), dtype=torch.bool)
            keep[order[:k]] = False
            retrained = fit_logistic(xt[keep], yt[keep])
            with torch.no_grad():
                after = F.cross_entropy(retrained(xq[qi : qi + 1]), yq[qi : qi + 1])
            change[side] = float(after) - float(q_loss[qi])
        assert change["proponents"] > 0 > change["opponents"], (q, change)


# --- BIF behind the interface ---------------------------------------------------------------


def test_bif_attributor_matches_bif_attribute(iris_ctx):
    ctx = iris_ctx
    hp = dict(num_chains=2, num_draws=10, num_burnin=5, thin=1, seed=3)
    method = BIFAttributor(**hp, dtype=F64)
    scores = method.scores(ctx)
    ref = bif.attribute(ctx.model, (ctx.x_train, ctx.y_train), (ctx.x_query, ctx.y_query),
                        task="classification", progress=False, dtype=F64, **hp)  # fmt: skip
    assert scores.shape == (30, 120)
    torch.testing.assert_close(scores, ref.scores, rtol=0, atol=0)
    assert method.result is not None and method.result.config.seed == 3
    with pytest.raises(ConfigError, match="num_chain"):
        BIFAttributor(num_chain=4)
    with pytest.raises(ConfigError):
        BIFAttributor(gamma=-1.0)
