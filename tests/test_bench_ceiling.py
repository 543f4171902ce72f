"""bif.bench.ceiling on a 26-parameter MLP: HVP / GN products, block Krylov solves and sign."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from bif.baselines.base import AttributionContext
from bif.baselines.influence import ExactInfluence, batched_cg
from bif.bench.ceiling import (
    block_krylov,
    flat,
    gn_op,
    hessian_op,
    krylov_scores,
    lm_logits,
    unflat,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def mlp():
    """3 -> 4 (tanh) -> 2 classes, untrained (an indefinite Hessian), 12 training examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    like = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 2, (12,))
    xq, yq = torch.randn(3, 3, dtype=F64), torch.randint(0, 2, (3,))

    def logits(w, inputs=x):
        return functional_call(model, unflat(w, like), (inputs,))

    def loss(w):
        return F.cross_entropy(logits(w), y)  # the MEAN training loss

    def grads(inputs, labels):  # per-example loss gradients [B, P]
        rows = [
            jacrev(lambda w, i=i: F.cross_entropy(logits(w, inputs[i : i + 1]), labels[i : i + 1]))
            for i in range(len(labels))
        ]
        return torch.stack([g(flat(like)) for g in rows])

    return dict(model=model, w=flat(like), x=x, y=y, xq=xq, yq=yq, logits=logits, loss=loss,
                gn=grads(x, y), gq=grads(xq, yq))  # fmt: skip


def test_hessian_op_matches_dense(mlp):
    w = mlp["w"]
    assert w.numel() == 26
    h = hessian(mlp["loss"])(w)
    v = torch.randn(26, dtype=F64)
    torch.testing.assert_close(hessian_op(mlp["loss"], w)(v), h @ v, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(h)[0]) < 0  # the solves below meet an indefinite H


def test_gn_op_matches_dense_jt_hout_j(mlp):
    w, n = mlp["w"], len(mlp["y"])
    z = mlp["logits"](w)  # [n, C]
    j = jacrev(mlp["logits"])(w)  # [n, C, P]
    p = torch.softmax(z, -1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, C, C]
    g = torch.einsum("tcp,tcd,tdq->pq", j, h_out, j) / n
    v = torch.randn(26, dtype=F64)
    got = gn_op(mlp["logits"], w, 1 / n)(v)
    torch.testing.assert_close(got, g @ v, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, hessian(mlp["loss"])(w) @ v, atol=1e-6)  # G is not H here
    assert float(torch.linalg.eigvalsh(g)[0]) > -1e-12  # and it is positive semi-definite


@pytest.mark.parametrize("shift", [0.05, 2.0])
def test_krylov_solve_matches_dense_solve(mlp, shift):
    w = mlp["w"]
    h = hessian(mlp["loss"])(w)
    a = h + shift * torch.eye(26, dtype=F64)
    b = mlp["gq"][:2]
    op = hessian_op(mlp["loss"], w)
    full = block_krylov(op, b, steps=13)  # 2 x 13 = 26 = P: the whole space
    y, res = full.solve(shift)
    x = (full.basis.T @ y).T
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-9)
    assert float(res.max()) < 1e-8
    ritz = full.ritz()
    torch.testing.assert_close(ritz, torch.linalg.eigvalsh(h), rtol=1e-8, atol=1e-10)
    # A truncated space: the closed-form residual is the true one.
    part = block_krylov(op, b, steps=4)
    y, res = part.solve(shift)
    x = (part.basis.T @ y).T
    true = (b - x @ a).norm(dim=1) / b.norm(dim=1)
    assert float(true.min()) > 1e-6  # not converged: the check has teeth
    torch.testing.assert_close(res, true, rtol=1e-6, atol=1e-12)


def test_library_cg_twin_agrees_on_the_hvp(mlp):
    w, shift = mlp["w"], 2.0
    a = hessian(mlp["loss"])(w) + shift * torch.eye(26, dtype=F64)
    op = hessian_op(mlp["loss"], w)
    b = mlp["gq"]
    x, _, rel = batched_cg(lambda v: torch.stack([op(r) for r in v]) + shift * v, b, 100, 1e-12)
    assert rel < 1e-10
    torch.testing.assert_close(x, torch.linalg.solve(a, b.T).T, rtol=1e-8, atol=1e-10)


def test_sign_and_scale_match_the_influence_baseline(mlp):
    shift = 2.0  # H + shift·I positive definite
    ctx = AttributionContext(
        model=mlp["model"],
        x_train=mlp["x"],
        y_train=mlp["y"],
        x_query=mlp["xq"],
        y_query=mlp["yq"],
        task="classification",
    )
    ref = ExactInfluence(damping=shift).scores(ctx)  # [Q, N], negative = proponent
    kry = block_krylov(hessian_op(mlp["loss"], mlp["w"]), mlp["gq"], steps=8)  # 3 x 8 = 24 < P
    got, res = krylov_scores(kry, shift, kry.basis @ mlp["gn"].T)
    assert float(res.max()) < 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
    assert float((got * ref).sum()) > 0 and float(ref.abs().max()) > 1e-3


def test_lm_logits_reproduce_the_causal_lm_loss():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from bif.lm.task import CausalLMTask

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                      tie_word_embeddings=True, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(3, 11, (3, 7))
    attn = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3])
    loss_mask = attn.clone()
    loss_mask[2, :2] = 0  # a prompt: its tokens are context only
    batch = {"input_ids": ids * attn, "attention_mask": attn, "loss_mask": loss_mask}
    fn, w, y = lm_logits(model, batch)
    assert w.numel() == sum(p.numel() for p in model.parameters())  # tied matrix once
    mine = F.cross_entropy(fn(w), y, reduction="sum")
    ref = CausalLMTask().loss(model, batch).sum()
    torch.testing.assert_close(mine.float(), ref.float(), rtol=1e-5, atol=1e-5)
