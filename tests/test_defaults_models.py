"""The defaults end to end on models a new user brings, beyond the shipped MLPs (issue 13):
a CNN with BatchNorm (sampled in eval mode, on its running statistics) and Dropout, and a
label-smoothed loss on that model, which was trained without it. Before the pilot run
(bif.pilot) the first diverged a hundred steps in for some seeds and the second within ten.
Each run must finish, with finite scores whose top-5 proponents share the query's class well
above chance (a one-sided test against scores that know nothing of the classes)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bif
from bif.datasets import load_digits

RUN = dict(num_chains=4, num_draws=100, num_burnin=50, progress=False)


@functools.cache
def cnn(seed: int) -> tuple[nn.Module, tuple, tuple]:
    d = load_digits()
    x, y = (d.images.float() / 16.0).unsqueeze(1), d.labels
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:500], perm[500:550]
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(8 * 64, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(40):
        for b in torch.randperm(500).split(50):
            opt.zero_grad()
            F.cross_entropy(model(x[tr][b]), y[tr][b]).backward()
            opt.step()
    return model.eval(), (x[tr], y[tr]), (x[te], y[te])


def same_class_share(scores: torch.Tensor, y_train: torch.Tensor, y_query: torch.Tensor) -> float:
    top = (-scores).topk(5, dim=1).indices  # negative BIF = proponent
    return float((y_train[top] == y_query[:, None]).float().mean())


def chance_bound(y_train: torch.Tensor, y_query: torch.Tensor, k: int = 5, z: float = 4.0) -> float:
    """The share that scores blind to the classes exceed with probability below ~3e-5.

    Blind scores pick each query's top ``k`` uniformly from the training set: the share's mean is
    ``p = mean_q f(y_q)`` (``f``: class frequency in the training set) and its standard deviation
    at most ``sqrt(p (1 - p) / (Q k))`` (draws without replacement within a query only lower it).
    """
    freq = torch.bincount(y_train, minlength=int(y_query.max()) + 1).double() / len(y_train)
    p = float(freq[y_query].mean())
    return p + z * (p * (1 - p) / (len(y_query) * k)) ** 0.5


def smoothed(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize(
    ("seed", "loss"), [(0, "classification"), (1, "classification"), (0, "smoothed")]
)
def test_defaults_run_to_the_end(seed: int, loss: str) -> None:
    model, train, query = cnn(seed)
    task = smoothed if loss == "smoothed" else loss
    # The smoothed run samples at the pilot's smaller step: more draws for the same resolution.
    draws = 400 if loss == "smoothed" else RUN["num_draws"]
    res = bif.attribute(model, train, query, task=task, seed=seed, **{**RUN, "num_draws": draws})
    assert torch.isfinite(res.scores).all() and torch.isfinite(res.draw_loss).all()
    pilot = res.meta["preconditioner"]["pilot"]
    assert pilot["attempts"][-1]["outcome"] == "ok"
    if loss == "smoothed":  # the rules' first choice diverges: the pilot repaired it
        assert pilot["attempts"][0]["outcome"] != "ok"
        assert res.config.step_size < pilot["attempts"][0]["step_size"] or (
            res.config.nbeta < pilot["attempts"][0]["nbeta"]
        )
    assert same_class_share(res.scores, train[1], query[1]) > chance_bound(train[1], query[1])


def test_blind_scores_stay_under_the_chance_bound() -> None:
    """The bound's own check: scores that know nothing of the classes do not pass it."""
    _, train, query = cnn(0)
    gen = torch.Generator().manual_seed(0)
    bound = chance_bound(train[1], query[1])
    for _ in range(20):
        blind = torch.randn(len(query[1]), len(train[1]), generator=gen)
        assert same_class_share(blind, train[1], query[1]) < bound
