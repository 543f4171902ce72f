"""bif.eval metrics against constructed cases with known answers and against scipy / sklearn."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from bif.errors import ConfigError, DataError, ShapeError
from bif.eval import flip_labels, lds, loo_correlation, mislabel_auc, rankdata, spearman

F64 = torch.float64


def make_case(q: int = 12, n: int = 40, m: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(q, n, generator=g, dtype=F64)
    masks = torch.rand(m, n, generator=g) < 0.5
    preds = masks.to(F64) @ scores.T  # [M, Q]
    return scores, masks, preds, g


# --- ranks and Spearman ---------------------------------------------------------------------


def test_rankdata_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (30, 5), generator=g).to(F64)  # many ties
    for dim in (0, 1):
        expected = torch.from_numpy(stats.rankdata(x.numpy(), axis=dim))
        torch.testing.assert_close(rankdata(x, dim), expected, rtol=0, atol=0)


def test_spearman_matches_scipy_on_ties():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 5, (40, 8), generator=g).to(F64)
    y = torch.randint(0, 3, (40, 8), generator=g).to(F64) + 0.1 * x
    ours = spearman(x, y, dim=0)
    ref = torch.tensor([stats.spearmanr(x[:, j], y[:, j]).statistic for j in range(8)], dtype=F64)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_spearman_is_nan_for_a_constant_column():
    x = torch.arange(10, dtype=F64).unsqueeze(1).repeat(1, 2)
    y = x.clone()
    y[:, 1] = 3.0
    out = spearman(x, y)
    assert out[0] == pytest.approx(1.0)
    assert torch.isnan(out[1])


# --- LDS ------------------------------------------------------------------------------------


def test_lds_is_one_for_a_monotone_target_and_minus_one_reversed():
    scores, masks, preds, _ = make_case()
    # A different strictly increasing transform per query: ranks are all that matter.
    targets = torch.exp(preds / 5) + preds.pow(3)
    up = lds(scores, masks, targets)
    down = lds(scores, masks, -targets)
    assert up.mean == pytest.approx(1.0, abs=1e-12)
    assert down.mean == pytest.approx(-1.0, abs=1e-12)
    assert torch.allclose(up.per_query, torch.ones(12, dtype=F64))
    assert (up.ci_low, up.ci_high) == pytest.approx((1.0, 1.0))
    assert up.num_excluded == 0 and up.num_subsets == 60 and up.num_seeds == 1


def test_lds_averages_seeds_before_ranking():
    scores, masks, preds, g = make_case()
    noise = torch.randn(60, 3, 12, generator=g, dtype=F64)
    targets = preds.unsqueeze(1) + noise
    a = lds(scores, masks, targets)
    b = lds(scores, masks, targets.mean(1))
    assert a.num_seeds == 3
    torch.testing.assert_close(a.per_query, b.per_query)


def test_lds_excludes_constant_columns_explicitly():
    scores, masks, preds, _ = make_case()
    targets = preds.clone()
    targets[:, 2] = 0.7  # every retrained model gave the same output for query 2
    scores[5] = 0.0  # a method that gives query 5 no signal: constant predictions
    res = lds(scores, masks, targets)
    assert res.num_excluded == 2
    assert res.excluded.nonzero().flatten().tolist() == [2, 5]
    assert torch.isnan(res.per_query[[2, 5]]).all()
    assert res.num_queries == 10
    assert res.mean == pytest.approx(1.0)  # the excluded queries did not drag it to 0 or NaN
    assert "2 constant excluded" in str(res)


def test_lds_raises_when_every_query_is_constant():
    scores, masks, _, _ = make_case()
    with pytest.raises(DataError, match="constant"):
        lds(scores, masks, torch.ones(60, 12))
    with pytest.raises(DataError, match="constant"):
        lds(torch.zeros_like(scores), masks, torch.randn(60, 12))


def test_lds_bootstrap_interval_contains_mean_and_is_seeded():
    scores, masks, preds, g = make_case(q=30)
    targets = preds + 3.0 * torch.randn(preds.shape, generator=g, dtype=F64)
    a = lds(scores, masks, targets, n_boot=500, seed=3)
    b = lds(scores, masks, targets, n_boot=500, seed=3)
    c = lds(scores, masks, targets, n_boot=500, seed=4)
    assert a.ci_low < a.mean < a.ci_high
    assert 0.0 < a.mean < 1.0
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.mean == c.mean  # the point estimate does not depend on the bootstrap


def test_lds_rejects_bad_shapes():
    scores, masks, preds, _ = make_case()
    with pytest.raises(ShapeError, match="bool"):
        lds(scores, masks.float(), preds)
    with pytest.raises(ShapeError, match="targets"):
        lds(scores, masks, preds.T)
    with pytest.raises(ShapeError, match="masks cover"):
        lds(scores, masks[:, :-1], preds)
    with pytest.raises(DataError, match="NaN"):
        lds(scores, masks, preds.clone().fill_(float("nan")))
    with pytest.raises(ConfigError):
        lds(scores, masks, preds, n_boot=0)


# --- LOO ------------------------------------------------------------------------------------


def test_loo_correlation_sign_and_values():
    scores, _, _, g = make_case()
    index = torch.tensor([0, 3, 4, 9, 17, 30])
    # Removing a proponent (negative score) raises the loss: measured Δ ∝ -score.
    delta = -2.0 * scores[:, index] + 0.5
    res = loo_correlation(scores, delta, index)
    assert res.pearson == pytest.approx(1.0) and res.spearman == pytest.approx(1.0)
    wrong = loo_correlation(scores, -delta, index)
    assert wrong.pearson == pytest.approx(-1.0) and wrong.spearman == pytest.approx(-1.0)
    noisy = delta + torch.randn(delta.shape, generator=g, dtype=F64)
    ref = [stats.pearsonr(-scores[q, index], noisy[q]).statistic for q in range(12)]
    torch.testing.assert_close(
        loo_correlation(scores, noisy, index).per_query_pearson, torch.tensor(ref, dtype=F64)
    )
    with pytest.raises(ShapeError):
        loo_correlation(scores, delta[:, :-1], index)


# --- mislabel detection ---------------------------------------------------------------------


def test_mislabel_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(200, generator=g, dtype=F64).round(decimals=1)  # ties
    flipped = torch.rand(200, generator=g) < 0.2
    ours = mislabel_auc(s, flipped, direction="negative")
    ref = roc_auc_score(flipped.numpy(), (-s).numpy())
    assert ours == pytest.approx(ref, abs=1e-12)
    assert mislabel_auc(s, flipped, direction="positive") == pytest.approx(1 - ref, abs=1e-12)


def test_mislabel_auc_is_one_when_flipped_are_most_negative():
    y = torch.arange(100) % 10
    _, flipped = flip_labels(y, 0.1, 10, seed=0)
    # bif's self-influence is -Var(l_n): flipped examples have the most volatile loss.
    self_inf = torch.where(flipped, -5.0 - torch.rand(100), -torch.rand(100)).to(F64)
    assert mislabel_auc(self_inf, flipped) == 1.0
    assert mislabel_auc(self_inf, flipped, direction="positive") == 0.0
    with pytest.raises(ConfigError):
        mislabel_auc(self_inf, flipped, direction="up")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="flipped and clean"):
        mislabel_auc(self_inf, torch.zeros(100, dtype=torch.bool))


def test_flip_labels_flips_exactly_the_reported_examples():
    y = torch.arange(1000) % 7
    yf, flipped = flip_labels(y, 0.15, 7, seed=11)
    assert int(flipped.sum()) == 150
    assert torch.equal(yf != y, flipped)  # every flipped label changed, nothing else did
    assert int(yf.min()) >= 0 and int(yf.max()) <= 6
    yf2, flipped2 = flip_labels(y, 0.15, 7, seed=11)
    assert torch.equal(yf, yf2) and torch.equal(flipped, flipped2)
    assert not torch.equal(flip_labels(y, 0.15, 7, seed=12)[1], flipped)
    with pytest.raises(DataError):
        flip_labels(y, 0.1, 5)
    with pytest.raises(ConfigError):
        flip_labels(y, 1.5, 7)
