"""Retraining harness: batched vs single-model training, determinism, resume, shipped artefacts."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from torch import nn

from bif.bench.setting import Setting
from bif.bench.settings import SETTINGS, init_like_torch, load_setting
from bif.bench.training import (
    Recipe,
    batched_logits,
    train_batched,
    train_looped,
    train_single,
)
from bif.errors import ArtifactError, DataError
from bif.eval.retrain import (
    GroundTruth,
    load_ground_truth,
    make_subsets,
    query_outputs,
    run_retraining,
    train_reference,
)


def with_recipe(s: Setting, recipe: Recipe, build=None, x=None) -> Setting:
    """``s`` with another recipe (and optionally model / inputs), both trainers rebound."""
    build = build or s.build_model
    x_train = s.x_train if x is None else x(s.x_train)
    return dataclasses.replace(
        s,
        x_train=x_train,
        x_query=s.x_query if x is None else x(s.x_query),
        build_model=build,
        train=functools.partial(train_single, recipe=recipe),
        train_batched=functools.partial(train_batched, build, x_train, s.y_train, recipe=recipe),
        training=recipe,
        recipe={**s.recipe, "training": recipe.as_dict()},
    )


@pytest.fixture(scope="module")
def digits() -> Setting:
    return load_setting("digits")


@pytest.fixture(scope="module")
def small(digits: Setting) -> Setting:
    """Digits with a 40-step recipe: the harness's logic at a fraction of the cost."""
    return with_recipe(digits, dataclasses.replace(digits.training, epochs=40))


def tiny_cnn(seed: int) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    return init_like_torch(net, seed)


def twin_gap(s: Setting, m: int = 2) -> float:
    """Largest |query-logit difference| between the batched trainer and the single-model one."""
    masks, seeds = make_subsets(s.num_train, 0.5, m, 1, seed=5)
    idx = torch.stack([row.nonzero().squeeze(1) for row in masks])
    module, params = s.train_batched(idx, seeds[:, 0])
    fast = batched_logits(module, params, s.x_query)
    gap = 0.0
    for i in range(m):
        sd = int(seeds[i, 0])
        model = s.train(s.build_model(sd), s.x_train[idx[i]], s.y_train[idx[i]], sd)
        with torch.no_grad():
            gap = max(gap, float((model(s.x_query) - fast[i]).abs().max()))
    return gap


# float32 rounding differs between vmapped and plain kernels; AdamW's normalised steps keep the
# drift over a few hundred steps orders of magnitude below a logit (a wrong recipe moves ~1).
TWIN_ATOL = 1e-3


def test_batched_trainer_equals_demo_trainer(digits: Setting) -> None:
    """The digits setting: vmapped functional AdamW vs the demo's torch.optim loop, 300 steps."""
    assert twin_gap(digits) < TWIN_ATOL


def test_batched_trainer_minibatch_and_conv(digits: Setting) -> None:
    """Minibatch orders and a vmapped CNN (grouped convolutions) also match the slow twin."""
    mb = Recipe(lr=3e-3, weight_decay=1e-2, epochs=3, batch_size=64)
    assert twin_gap(with_recipe(digits, mb)) < TWIN_ATOL
    cnn = with_recipe(digits, mb, build=tiny_cnn, x=lambda t: t.view(-1, 1, 8, 8))
    assert twin_gap(cnn) < TWIN_ATOL
    # A different recipe is far outside the tolerance (the comparison can fail).
    other = dataclasses.replace(cnn, train=functools.partial(train_single, recipe=mb.__class__(
        lr=1e-3, weight_decay=1e-2, epochs=3, batch_size=64)))  # fmt: skip
    assert twin_gap(other) > 100 * TWIN_ATOL


def test_looped_trainer_is_the_single_trainer(digits: Setting) -> None:
    r = Recipe(lr=3e-3, weight_decay=0.0, epochs=2, batch_size=100)
    idx = torch.stack([torch.arange(0, 500), torch.arange(500, 1000)])
    _, params = train_looped(digits.build_model, digits.x_train, digits.y_train, idx,
                             torch.tensor([4, 9]), r)  # fmt: skip
    ref = train_single(digits.build_model(9), digits.x_train[500:], digits.y_train[500:], 9, r)
    for k, p in ref.named_parameters():
        assert torch.equal(params[k][1], p), k


def test_query_outputs() -> None:
    logits = torch.tensor([[[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]]])  # [1, Q=2, C=3]
    y = torch.tensor([0, 2])
    assert torch.allclose(query_outputs(logits, y, "margin"), torch.tensor([[1.0, -4.0]]))
    ce = -torch.log_softmax(logits, -1)[0, [0, 1], [0, 2]]
    assert torch.allclose(query_outputs(logits, y, "loss"), ce[None])


def test_subsets() -> None:
    masks, seeds = make_subsets(10, 0.5, 6, 3, seed=1)
    assert masks.shape == (6, 10) and masks.dtype == torch.bool and (masks.sum(1) == 5).all()
    assert seeds.shape == (6, 3) and len(seeds.unique()) == 18
    assert len({tuple(r.tolist()) for r in masks}) > 1


def run(s: Setting, path, **kw) -> GroundTruth:
    args = dict(num_subsets=3, num_seeds=2, models_per_batch=2, seed=3, progress=False)
    return run_retraining(s, path, **{**args, **kw})


def assert_same(a: GroundTruth, b: GroundTruth) -> None:
    for k in ("masks", "targets", "seeds", "done", "query_accuracy"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.config == b.config


def test_harness_deterministic_and_resumable(small: Setting, tmp_path) -> None:
    full = run(small, tmp_path / "a")
    assert full.complete and full.targets.shape == (3, 2, small.num_query)
    assert_same(full, run(small, tmp_path / "b"))  # same seed, same artefact
    assert_same(full, GroundTruth.load(tmp_path / "a"))  # what is on disk is what was returned

    # Interrupted at the second batch (as by a kill): only the batch in flight is lost ...
    calls = {"n": 0}

    def dies_second_time(idx, seeds):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return small.train_batched(idx, seeds)

    with pytest.raises(KeyboardInterrupt):
        run(dataclasses.replace(small, train_batched=dies_second_time), tmp_path / "c")
    part = GroundTruth.load(tmp_path / "c")
    assert int(part.done.sum()) == 2 and not part.complete
    with pytest.raises(ArtifactError, match="incomplete"):
        part.mean_targets()
    # ... a stopped run (max_batches) is resumable too, and the resumed artefact is identical.
    run(small, tmp_path / "c", max_batches=1)
    assert int(GroundTruth.load(tmp_path / "c").done.sum()) == 4
    assert_same(full, run(small, tmp_path / "c"))


def test_mismatched_arguments_refuse_with_a_diff(small: Setting, tmp_path) -> None:
    run(small, tmp_path / "a", max_batches=1)
    with pytest.raises(ArtifactError, match="num_seeds: 2 -> 3"):
        run(small, tmp_path / "a", num_seeds=3)
    other = with_recipe(small, dataclasses.replace(small.training, lr=0.02))
    with pytest.raises(ArtifactError, match=r"recipe\.training\.lr: 0\.01 -> 0\.02"):
        run(other, tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"recipe\.training\.lr: 0\.01 -> 0\.02"):
        GroundTruth.load(tmp_path / "a").check_setting(other)  # a stale artefact is caught
    # Files of two different runs are not mixed.
    run(small, tmp_path / "b", seed=4, max_batches=1)
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())
    with pytest.raises(ArtifactError, match="different runs"):
        GroundTruth.load(tmp_path / "a")


def test_reference_model(small: Setting) -> None:
    a, b = train_reference(small), train_reference(small)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert small.accuracy(a) > 0.85


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_shipped_ground_truth(name: str) -> None:
    gt = load_ground_truth(name)
    m, r, q, n = gt.num_subsets, gt.num_seeds, gt.num_query, gt.num_train
    assert m >= 100 and r >= 3 and q >= 100 and gt.complete
    assert gt.masks.shape == (m, n) and gt.masks.dtype == torch.bool
    assert gt.targets.shape == (m, r, q) and gt.targets.dtype == torch.float32
    assert torch.isfinite(gt.targets).all() and (gt.targets >= 0).all()  # cross-entropies
    assert (gt.masks.sum(1) == round(gt.config["alpha"] * n)).all()
    assert gt.mean_targets().shape == (m, q)
    assert "make_ground_truth.py" in gt.meta["command"] and json.dumps(gt.config)
    try:
        setting = load_setting(name)
    except DataError as e:
        pytest.skip(f"artefact loads; {name} data not installed, so staleness unchecked: {e}")
    gt.check_setting(setting)  # the artefact was made from today's data and recipe


def test_digits_targets_depend_on_the_subset() -> None:
    """Retrained query losses vary across subsets by more than the seed noise alone explains."""
    gt = load_ground_truth("digits")
    r = gt.num_seeds
    within = gt.targets.var(1).mean(0)  # [Q] seed noise of one model
    between = gt.targets.mean(1).var(0)  # [Q] spread of the subset means
    # Without a subset effect, between / (within / R) ~ F(M-1, M(R-1)), and P(F(99, 200) > 2) is
    # below 1e-4: a majority of queries above 2 means the subsets, not the seeds, move the losses.
    assert (between > 2 * within / r).float().mean() > 0.5
    assert (gt.targets.mean(1).std(0) > 0).all()
