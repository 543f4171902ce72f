"""Token-level LDS: the token sample, per-token retraining targets, the metric, per-token scores.

A tiny causal LM (test_lm's ``TinyLM``: 3 queries of 5 attributed tokens, 10 training sequences)
fine-tuned by a few seeded SGD steps stands in for the shakespeare setting; the harness hooks
are the real ones (:func:`bif.bench.lm.setting.lm_retrainers`).
"""

from __future__ import annotations

import importlib.util
import json
import types
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bif.baselines.base import AttributionContext
from bif.baselines.bif_method import BIFAttributor
from bif.baselines.gradsim import GradientDot
from bif.bench.lm.setting import lm_retrainers, query_token_losses, take, token_sample
from bif.bench.runner import format_table, run_method
from bif.bench.setting import Setting
from bif.errors import ArtifactError, ConfigError, SelectionError, ShapeError
from bif.eval.ground_truth import GroundTruth, _sha
from bif.eval.metrics import lds, token_lds
from bif.eval.retrain import load_ground_truth, run_retraining
from bif.lm import CausalLMTask
from test_lm import FAST, TinyLM
from test_lm import _data as lm_data

TRAIN, QUERY = lm_data()
KW = dict(num_subsets=4, num_seeds=2, models_per_batch=3, progress=False)


class _HFLike(TinyLM):
    """TinyLM answering with ``.logits``, the Hugging Face form (as the tiny Llama does)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
        return types.SimpleNamespace(logits=super().forward(input_ids))


def _fresh(seed: int = 0) -> TinyLM:
    del seed  # every run starts from the same weights (as fine-tuning does)
    return _HFLike().eval()


def _train(model: TinyLM, x: dict, y: Any, seed: int) -> TinyLM:
    """Three SGD steps on minibatches of 2 in a seeded order."""
    del y
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    order = torch.randperm(x["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed))
    for rows in order[:6].split(2):
        opt.zero_grad()
        CausalLMTask().loss(model, take(x, rows)).mean().backward()
        opt.step()
    return model.eval()


def _setting(tokens: bool = True) -> Setting:
    seq, tok = lm_retrainers(_fresh, _train, TRAIN, QUERY)
    n, q = TRAIN["input_ids"].shape[0], QUERY["input_ids"].shape[0]
    return Setting(
        name="tiny-lm", x_train=TRAIN, y_train=torch.zeros(n, dtype=torch.long), x_query=QUERY,
        y_query=torch.zeros(q, dtype=torch.long), x_test=QUERY,
        y_test=torch.zeros(q, dtype=torch.long), build_model=_fresh, train=_train,
        train_batched=None, training=None, recipe={"tiny": "3 SGD steps"}, task="causal-lm",
        retrain_outputs=seq, retrain_token_outputs=tok if tokens else None,
    )  # fmt: skip


def _context(model: torch.nn.Module) -> AttributionContext:
    n, q = TRAIN["input_ids"].shape[0], QUERY["input_ids"].shape[0]
    return AttributionContext(
        model=model, x_train=TRAIN, y_train=torch.zeros(n), x_query=QUERY, y_query=torch.zeros(q),
        task="causal-lm",
    )  # fmt: skip


def test_token_sample_is_fixed_seeded_and_attributed() -> None:
    tok = token_sample(_setting(), k=8, seed=0)
    assert tok.shape == (8, 2) and tok.dtype == torch.long
    assert torch.equal(tok, token_sample(QUERY, k=8, seed=0))  # deterministic; batch or setting
    assert not torch.equal(tok, token_sample(QUERY, k=8, seed=1))
    assert bool(CausalLMTask().token_mask(QUERY)[tok[:, 0], tok[:, 1]].all())
    key = tok[:, 0] * 100 + tok[:, 1]
    assert torch.equal(key, key.sort().values) and key.unique().numel() == 8  # sorted, distinct
    with pytest.raises(ConfigError, match="attributed tokens"):
        token_sample(QUERY, k=16)  # only 15 carry a loss


def test_harness_records_token_targets_and_resumes(tmp_path) -> None:
    setting, tok = _setting(), token_sample(QUERY, k=8, seed=0)
    full = run_retraining(setting, tmp_path / "a", tokens=tok, **KW)
    assert full.complete and full.token_targets.shape == (4, 2, 8)
    assert torch.isfinite(full.token_targets).all() and torch.equal(full.token_index, tok)
    part = run_retraining(setting, tmp_path / "b", tokens=tok, max_batches=1, **KW)
    assert int(part.done.sum()) == 3 and bool(part.token_targets.isnan().any())
    resumed = run_retraining(setting, tmp_path / "b", tokens=tok, **KW)
    torch.testing.assert_close(resumed.token_targets, full.token_targets, rtol=0, atol=0)
    torch.testing.assert_close(resumed.targets, full.targets, rtol=0, atol=0)
    loaded = GroundTruth.load(tmp_path / "a")
    assert torch.equal(loaded.token_targets, full.token_targets)
    assert torch.equal(loaded.token_index, tok) and loaded.config["tokens"]["num"] == 8
    # the numbers: model (m=2, r=1) retrained by hand, its token losses and sequence losses
    rows, seed = full.masks[2].nonzero().squeeze(1), int(full.seeds[2, 1])
    per_token = query_token_losses(_train(_fresh(), take(TRAIN, rows), None, seed), QUERY)
    torch.testing.assert_close(full.token_targets[2, 1], per_token[tok[:, 0], tok[:, 1]])
    torch.testing.assert_close(full.targets[2, 1], per_token.sum(1))
    # the sequence targets are those of a run without tokens (same models)
    plain = run_retraining(setting, tmp_path / "c", **KW)
    torch.testing.assert_close(plain.targets, full.targets, rtol=0, atol=0)
    assert plain.token_targets is None and "tokens" not in plain.config


def test_token_index_pin_refuses_another_sample(tmp_path) -> None:
    setting = _setting()
    run_retraining(setting, tmp_path / "a", tokens=token_sample(QUERY, 8, 0), max_batches=1, **KW)
    with pytest.raises(ArtifactError, match=r"tokens\.index_sha"):
        run_retraining(setting, tmp_path / "a", tokens=token_sample(QUERY, 8, 1), **KW)
    with pytest.raises(ArtifactError, match="tokens"):
        run_retraining(setting, tmp_path / "a", **KW)  # sequence-only on a token artefact
    with pytest.raises(ConfigError, match="no per-token"):
        run_retraining(_setting(tokens=False), tmp_path / "b", tokens=token_sample(QUERY, 8), **KW)


def test_old_artifacts_without_token_targets_load(tmp_path) -> None:
    """The format written before token targets existed: five tensors, no ``tokens`` config."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "masks": torch.rand(4, 10, generator=g) < 0.5, "targets": torch.rand(4, 2, 3, generator=g),
        "seeds": torch.zeros(4, 2, dtype=torch.long), "done": torch.ones(4, 2, dtype=torch.bool),
        "query_accuracy": torch.zeros(4, 2),
    }  # fmt: skip
    config = {"setting": "old", "alpha": 0.5}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"config_sha": _sha(config)})
    (tmp_path / "old.json").write_text(json.dumps({"config": config, "meta": {"command": "x"}}))
    gt = GroundTruth.load(tmp_path / "old")
    assert gt.complete and not gt.has_tokens and gt.token_index is None
    torch.testing.assert_close(gt.mean_targets(), tensors["targets"].mean(1))
    with pytest.raises(ArtifactError, match="no per-token targets"):
        token_lds(torch.zeros(3, 10), gt)
    gt.save(tmp_path / "again")  # and a save without tokens writes that format again
    assert json.loads((tmp_path / "again.json").read_text())["config"] == config
    shipped = load_ground_truth("shakespeare")  # loads whether or not it has token targets
    assert shipped.complete and (shipped.token_targets is None) == ("tokens" not in shipped.config)


def _synthetic(m: int = 20, n: int = 10, k: int = 7) -> tuple[GroundTruth, torch.Tensor]:
    """A linear datamodel: token k's loss after S_j is Σ_{i∈S_j} w[k, i] (seed noise ±e)."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(m, n, generator=g) < 0.5
    w = torch.randn(k, n, generator=g, dtype=torch.float64)
    exact = (masks.double() @ w.T).float()  # [M, K]
    e = 0.25 * torch.randn(m, 1, k, generator=g)
    gt = GroundTruth(
        masks=masks, targets=torch.zeros(m, 2, 3), seeds=torch.zeros(m, 2, dtype=torch.long),
        done=torch.ones(m, 2, dtype=torch.bool), query_accuracy=torch.zeros(m, 2),
        config={"setting": "synthetic"}, meta={}, token_index=torch.zeros(k, 2, dtype=torch.long),
        token_targets=torch.cat([exact[:, None] + e, exact[:, None] - e], 1),
    )  # fmt: skip
    return gt, w


def test_token_lds_is_the_sequence_lds_on_tokens_and_perfect_for_the_datamodel() -> None:
    gt, w = _synthetic()
    perfect = token_lds(w, gt, n_boot=200)
    assert perfect.mean == pytest.approx(1.0, abs=1e-12) and perfect.unit == "tokens"
    assert perfect.ci_low == pytest.approx(1.0, abs=1e-12) and perfect.num_seeds == 2
    noisy = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=w.dtype)
    mine = token_lds(noisy, gt, n_boot=200, seed=4)
    twin = lds(noisy, gt.masks, gt.token_targets, n_boot=200, seed=4)
    assert (mine.mean, mine.ci_low, mine.ci_high) == (twin.mean, twin.ci_low, twin.ci_high)
    assert torch.equal(mine.per_query, twin.per_query) and mine.per_query.shape == (7,)
    assert 0 < mine.mean < 1 and "7 tokens" in str(mine)
    with pytest.raises(ShapeError, match=r"K=7"):
        token_lds(w[:3], gt)


@pytest.fixture(scope="module")
def bif_method() -> tuple[BIFAttributor, AttributionContext]:
    ctx = _context(TinyLM().eval())
    method = BIFAttributor(**FAST)
    method.scores(ctx)
    return method, ctx


def test_bif_token_scores_sum_to_its_sequence_scores(bif_method) -> None:
    method, ctx = bif_method
    every = token_sample(QUERY, k=15)  # all attributed query tokens
    tok = method.token_scores(ctx, every)  # from the same run
    assert tok.shape == (15, 10)
    per_query = torch.zeros(3, 10, dtype=torch.float64).index_add_(0, every[:, 0], tok)
    torch.testing.assert_close(per_query, method.result.scores, rtol=1e-10, atol=1e-12)
    # by bilinearity also the token x token BIF summed over each training sequence's tokens
    t = method.result.tokens
    tt = t.token_scores(query_tokens=t.columns("query", every))  # [15, Kn]
    summed = torch.zeros(15, 10, dtype=torch.float64).index_add_(1, t.train_index[:, 0], tt)
    torch.testing.assert_close(tok, summed, rtol=1e-10, atol=1e-12)
    sample = token_sample(QUERY, k=6, seed=2)
    rows = torch.tensor([every.tolist().index(r) for r in sample.tolist()])
    torch.testing.assert_close(method.token_scores(ctx, sample), tok[rows])
    with pytest.raises(SelectionError, match="not attributed"):
        method.token_scores(ctx, torch.tensor([[0, 1]]))  # a prompt position


def test_grad_dot_token_scores_sum_to_its_sequence_scores() -> None:
    ctx = _context(TinyLM().eval())
    every = token_sample(QUERY, k=15)
    tok = GradientDot().token_scores(ctx, every)
    per_query = torch.zeros(3, 10, dtype=torch.float64).index_add_(0, every[:, 0], tok)
    torch.testing.assert_close(per_query, GradientDot().scores(ctx), rtol=1e-4, atol=1e-6)


def test_runner_adds_the_token_lds(tmp_path) -> None:
    setting = _setting()
    gt = run_retraining(setting, tmp_path / "gt", tokens=token_sample(QUERY, k=12), **KW)
    ctx = _context(setting.train(_fresh(), TRAIN, None, 0))
    row = run_method("grad-dot", ctx, gt.masks, gt.mean_targets(), n_boot=50, token_gt=gt)
    assert row.error is None and -1 <= row.token_lds <= 1 and row.token_seconds >= 0
    plain = run_method("grad-dot", ctx, gt.masks, gt.mean_targets(), n_boot=50)
    assert plain.token_lds != plain.token_lds and plain.lds == row.lds  # NaN: not asked for
    table = format_table([row, plain])
    assert "token LDS" in table and f"{row.token_lds:.3f}" in table
    assert "token LDS" not in format_table([plain])


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="needs kronfluence")
def test_ekfac_identity_token_scores_sum_to_its_sequence_scores() -> None:
    from bif.baselines.kronfluence_methods import EKFAC

    ctx = _context(_HFLike().eval())
    every = token_sample(QUERY, k=15)
    method = EKFAC(strategy="identity", damping=0.0)
    tok = method.token_scores(ctx, every)
    per_query = torch.zeros(3, 10, dtype=torch.float64).index_add_(0, every[:, 0], tok)
    torch.testing.assert_close(per_query, method.scores(ctx), rtol=1e-4, atol=1e-6)
