"""The defaults end to end on models a new user brings, beyond the shipped MLPs (issue 13):
a CNN with BatchNorm (sampled in eval mode, on its running statistics) and Dropout, and a
label-smoothed loss on that model, which was trained without it. Before the pilot run
(bif.pilot) the first diverged a hundred steps in for some seeds and the second within ten.
Each run must finish, with finite scores whose top-5 proponents share the query's class well
above chance (1/10)."""

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


def same_class_share(result: bif.BIFResult, y_train: torch.Tensor, y_query: torch.Tensor) -> float:
    top = (-result.scores).topk(5, dim=1).indices  # negative BIF = proponent
    return float((y_train[top] == y_query[:, None]).float().mean())


def smoothed(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize(
    ("seed", "loss"), [(0, "classification"), (1, "classification"), (0, "smoothed")]
)
def test_defaults_run_to_the_end(seed: int, loss: str) -> None:
    model, train, query = cnn(seed)
    task = smoothed if loss == "smoothed" else loss
    res = bif.attribute(model, train, query, task=task, seed=seed, **RUN)
    assert torch.isfinite(res.scores).all() and torch.isfinite(res.draw_loss).all()
    pilot = res.meta["preconditioner"]["pilot"]
    assert pilot["attempts"][-1]["outcome"] == "ok"
    if loss == "smoothed":  # the rules' first choice diverges: the pilot repaired it
        assert pilot["attempts"][0]["outcome"] != "ok"
        assert res.config.step_size < pilot["attempts"][0]["step_size"] or (
            res.config.nbeta < pilot["attempts"][0]["nbeta"]
        )
    assert same_class_share(res, train[1], query[1]) > 0.2
