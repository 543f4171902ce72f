"""Per-token BIF for causal LMs: exact token/sequence agreement, masks, padding, twins, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import bif
from bif.errors import ConfigError, DataError, ShapeError
from bif.estimator import batch_covariance
from bif.lm import CausalLMTask, encode
from bif.tokens import TokenTraces

V, S = 13, 8
# Unit mass and no centring: these tests check token bookkeeping on an untrained model (whose
# negative curvature the preconditioned rules would answer by lowering the condition,
# test_mass.py), and padding invariance to float32 rounding, which ∇L_n(w*) (summed in
# padding-dependent chunks, then multiplied by nβ at every step) would amplify.
FAST = dict(
    num_chains=3,
    num_draws=12,
    num_burnin=4,
    thin=1,
    progress=False,
    precondition_rank=0,
    center_gradient=False,
)


class TinyLM(nn.Module):
    """Causal by construction: position s sees a running mean of embeddings up to s."""

    def __init__(self, vocab: int = V, hidden: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        h = self.emb(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(torch.tanh(self.mix(h.cumsum(1) / steps)))


def _data(n: int = 10, seed: int = 1) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, S), generator=g)
    attn = torch.ones(n, S, dtype=torch.long)
    for i in range(n):
        attn[i, 3 + i % (S - 2) :] = 0  # lengths 3..S
    train = {"input_ids": ids, "attention_mask": attn}
    q_ids = torch.randint(0, V, (3, S), generator=g)
    prompt = torch.zeros(3, S, dtype=torch.long)
    prompt[:, 3:] = 1  # attribute only the "completion" after 3 prompt tokens
    query = {"input_ids": q_ids, "attention_mask": torch.ones(3, S, dtype=torch.long)}
    query["loss_mask"] = prompt
    return train, query


@pytest.fixture(scope="module")
def run() -> bif.BIFResult:
    train, query = _data()
    return bif.attribute(TinyLM().eval(), train, query, task=CausalLMTask(), chunk_size=4, **FAST)


def test_token_sums_reproduce_sequence_scores(run) -> None:
    """Σ over both sequences' tokens of the token x token BIF = the streamed sequence BIF."""
    tok = run.tokens
    assert tok is not None and run.meta["per_token"]
    seq = tok.sequence_scores()
    assert seq.shape == run.scores.shape
    torch.testing.assert_close(seq, run.scores, rtol=1e-10, atol=1e-12)
    # The same from the per-query and per-train views.
    for q in range(run.num_queries):
        col = tok.train_token_scores(q)
        per_seq = torch.zeros(run.num_train, dtype=torch.float64)
        per_seq.index_add_(0, tok.train_index[:, 0], col)
        torch.testing.assert_close(per_seq, run.scores[q], rtol=1e-10, atol=1e-12)
    for i in range(run.num_train):
        row = tok.query_token_scores(i)
        per_q = torch.zeros(run.num_queries, dtype=torch.float64)
        per_q.index_add_(0, tok.query_index[:, 0], row)
        torch.testing.assert_close(per_q, run.scores[:, i], rtol=1e-10, atol=1e-12)


def test_blocks_match_reference_covariance(run) -> None:
    """Blocked token x token estimates (tiny block budget) equal one full-trace covariance."""
    tok = run.tokens
    ref = -batch_covariance(tok.train, tok.query).mean(0)  # [Kq, Kn]
    small = TokenTraces(tok.train, tok.query, tok.train_index, tok.query_index, max_block_mb=1e-4)
    assert small._block_cols(tok.query.shape[2]) < tok.train.shape[2]  # really blocked
    torch.testing.assert_close(small.token_scores(), ref, rtol=1e-10, atol=1e-12)
    cols = torch.tensor([5, 0, 7])
    torch.testing.assert_close(small.token_scores(train_tokens=cols), ref[:, cols])
    corr = small.token_scores(kind="correlation")
    assert float(corr.abs().max()) <= 1 + 1e-9
    assert torch.equal(torch.sign(corr), torch.sign(-ref))


def test_masks_and_attributed_positions(run) -> None:
    """Only loss_mask/attention_mask positions (never position 0) carry token traces, and the
    query observable at w* is the sum of exactly those token losses."""
    train, query = _data()
    tok = run.tokens
    assert torch.equal(tok.query_index[:, 1].unique(), torch.arange(3, S))
    lengths = train["attention_mask"].sum(1)
    for i in range(len(lengths)):
        assert tok.positions("train", i).tolist() == list(range(1, int(lengths[i])))
    task = CausalLMTask()
    model = TinyLM().eval()
    per_token = task.token_losses(model, query)
    assert bool((per_token[:, :3] == 0).all())
    torch.testing.assert_close(run.query_star, per_token.sum(1).double(), rtol=1e-6, atol=1e-6)


def test_padding_and_chunking_change_no_score(run) -> None:
    """Extra padding (with garbage ids under the mask) and another chunking give the same run."""
    train, query = _data()
    pad = 5
    garbage = torch.randint(0, V, (len(train["input_ids"]), pad))
    padded = {
        "input_ids": torch.cat([torch.where(train["attention_mask"].bool(), train["input_ids"],
                                            7), garbage], 1),
        "attention_mask": torch.cat([train["attention_mask"], torch.zeros_like(garbage)], 1),
    }  # fmt: skip
    r2 = bif.attribute(TinyLM().eval(), padded, query, task=CausalLMTask(), chunk_size=3, **FAST)
    # Other batch shapes round float32 sums differently: agreement to ~float32 precision of the
    # score scale, not bit identity (a real padding leak moves scores by O(scale)).
    scale = float(run.scores.abs().max())
    torch.testing.assert_close(r2.scores, run.scores, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(r2.tokens.train, run.tokens.train, rtol=1e-5, atol=1e-6)
    assert torch.equal(r2.tokens.train_index, run.tokens.train_index)


def test_vmap_matches_loop_and_resume(run, tmp_path, monkeypatch) -> None:
    train, query = _data()
    loop = bif.attribute(
        TinyLM().eval(), train, query, task=CausalLMTask(), chunk_size=4, vmap_chains=False,
        **FAST,
    )  # fmt: skip
    torch.testing.assert_close(loop.scores, run.scores, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(loop.tokens.query, run.tokens.query, rtol=1e-5, atol=1e-6)
    # Kill mid-run, resume: identical token traces and scores.
    import bif.api as api_mod
    import bif.sampler.recorder as recorder_mod

    real, calls = recorder_mod.update_moments, {"n": 0, "pilot": False}
    real_guard = api_mod.guard

    def stop(*a: Any, **k: Any) -> Any:
        calls["n"] += 0 if calls["pilot"] else 1  # the pilot's draws do not count
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    def guard(*a: Any, **k: Any) -> Any:
        calls["pilot"] = True
        try:
            return real_guard(*a, **k)
        finally:
            calls["pilot"] = False

    kw = dict(task=CausalLMTask(), chunk_size=4, run_dir=tmp_path, checkpoint_every=2, **FAST)
    monkeypatch.setattr(recorder_mod, "update_moments", stop)
    monkeypatch.setattr(api_mod, "guard", guard)
    with pytest.raises(KeyboardInterrupt):
        bif.attribute(TinyLM().eval(), train, query, **kw)
    monkeypatch.undo()
    resumed = bif.attribute(TinyLM().eval(), train, query, **kw)
    assert resumed.meta["resumed"]
    assert torch.equal(resumed.scores, run.scores)
    assert torch.equal(resumed.tokens.train, run.tokens.train)


def test_save_load_and_top_tokens(run, tmp_path) -> None:
    back = bif.BIFResult.load(run.save(tmp_path / "r"))
    assert back.tokens is not None and torch.equal(back.tokens.train, run.tokens.train)
    # The diagnostics follow a sample of the token traces too, and survive the save.
    assert run.diagnostics is not None and "tokens" in run.diagnostics.summary
    assert back.diagnostics.to_dict() == run.diagnostics.to_dict()
    top = run.tokens.top_train_tokens(0, position=4, k=3)
    block = run.tokens.token_scores(query_tokens=run.tokens._column_at("query", 0, 4).view(1))
    assert top and top[0].score == pytest.approx(float(block.min()))
    assert all(t.score < 0 for t in top)
    assert [t.score for t in top] == sorted(t.score for t in top)
    back_top = run.tokens.top_query_tokens(2, k=2)
    assert all(0 <= t.sequence < 3 and t.position >= 3 for t in back_top)
    with pytest.raises(bif.SelectionError, match="not attributed"):
        run.tokens.top_train_tokens(0, position=1)
    # Position 0 never is (nothing precedes it); the error says so, typed and catchable as an
    # IndexError or a ConfigError.
    with pytest.raises(bif.SelectionError, match=r"position 0 never is.*attributed positions"):
        run.tokens.top_train_tokens(0, position=0)
    with pytest.raises(IndexError, match="has no attributed token"):
        run.tokens.top_train_tokens(99)
    for bad in (0, -2):
        with pytest.raises(bif.ConfigError, match="k must be a positive integer"):
            run.tokens.top_query_tokens(2, k=bad)


def test_errors_say_how_to_fix() -> None:
    train, query = _data()
    model = TinyLM().eval()
    left = dict(train, attention_mask=train["attention_mask"].flip(1))
    with pytest.raises(DataError, match="padding_side"):
        bif.attribute(model, left, query, task=CausalLMTask(), **FAST)
    empty = dict(query, loss_mask=torch.zeros_like(query["loss_mask"]))
    with pytest.raises(DataError, match="no attributed token"):
        bif.attribute(model, train, empty, task=CausalLMTask(), **FAST)
    with pytest.raises(ShapeError, match="input_ids"):
        bif.attribute(model, (train["input_ids"], train["input_ids"]), query, task=CausalLMTask(),
                      **FAST)  # fmt: skip
    big = dict(train, input_ids=train["input_ids"] + V)
    with pytest.raises(DataError, match="vocabulary"):
        bif.attribute(model, big, query, task=CausalLMTask(), **FAST)
    with pytest.raises(ConfigError, match="max_token_trace_mb"):
        bif.attribute(model, train, query, task=CausalLMTask(), max_token_trace_mb=1e-6, **FAST)


class _CharTokenizer:
    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) % V for c in text]}


def test_encode_prompts_and_padding() -> None:
    enc = encode(_CharTokenizer(), ["to be or", "not"], prompts=["to ", ""], max_length=6)
    assert enc["input_ids"].shape == (2, 6)
    assert enc["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert enc["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    with pytest.raises(DataError, match="prefix"):
        encode(_CharTokenizer(), ["abc"], prompts=["x"])


def _llama(attn: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hugging_face_llama_padding_and_twins() -> None:
    """A real transformers causal LM: the attention mask is honoured (padding changes nothing)
    and the vmapped chains agree with the loop."""
    model = _llama("eager")
    train, query = _data(6)
    kw = dict(task=CausalLMTask(), num_chains=2, num_draws=4, num_burnin=2, thin=1, progress=False)
    r = bif.attribute(model, train, query, **kw)
    loop = bif.attribute(model, train, query, vmap_chains=False, **kw)
    torch.testing.assert_close(loop.scores, r.scores, rtol=1e-5, atol=1e-6)
    pad = torch.zeros(6, 4, dtype=torch.long)
    padded = {
        "input_ids": torch.cat([train["input_ids"], pad + 3], 1),
        "attention_mask": torch.cat([train["attention_mask"], pad], 1),
    }
    r2 = bif.attribute(model, padded, query, task=CausalLMTask(trim_padding=False),
                       **{k: v for k, v in kw.items() if k != "task"})  # fmt: skip
    scale = float(r.scores.abs().max())
    torch.testing.assert_close(r2.scores, r.scores, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(r2.tokens.sequence_scores(), r.scores, rtol=1e-4, atol=1e-5 * scale)


def test_fused_attention_without_second_derivative_says_eager() -> None:
    model = _llama("sdpa")
    train, query = _data(4)
    with pytest.raises(ConfigError, match="attn_implementation='eager'"):
        bif.attribute(model, train, query, task=CausalLMTask(), **FAST)


def test_bf16_forwards_keep_fp32_master_weights() -> None:
    """forward_dtype='bfloat16': logits in bf16, sampled weights and their gradients in fp32,
    gradients equal to the fp32 ones to bf16 precision; a whole run works end to end."""
    from bif.functional import FunctionalModel, mean_loss_and_grad

    train, query = _data()
    model, task = TinyLM().eval(), CausalLMTask()
    f32 = FunctionalModel(model, "cpu")
    bf16 = FunctionalModel(model, "cpu", forward_dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in bf16.w_star.values())
    logits = bf16.model_fn(bf16.w_star)(train["input_ids"])
    assert logits.dtype == torch.bfloat16
    g32, _ = mean_loss_and_grad(f32, task.loss)(f32.w_star, train)
    g16, _ = mean_loss_and_grad(bf16, task.loss)(bf16.w_star, train)
    for k in g32:
        assert g16[k].dtype == torch.float32
        rel = (g16[k] - g32[k]).norm() / g32[k].norm()
        assert float(rel) < 0.05, (k, float(rel))  # bf16 keeps 8 bits: ~0.4% per op
    r = bif.attribute(model, train, query, task=task, forward_dtype="bfloat16", **FAST)
    assert r.tokens is not None and bool(torch.isfinite(r.scores).all())
    with pytest.raises(ConfigError, match="forward_dtype"):
        bif.BIFConfig(forward_dtype="int8")
