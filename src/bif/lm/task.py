"""Per-token next-token losses of a causal language model: the task behind per-token BIF.

A batch is a dict of right-padded tensors (what :func:`bif.lm.encode` returns)::

    input_ids       [B, S] long   token ids
    attention_mask  [B, S]        1 = real token, 0 = padding (optional: all real)
    loss_mask       [B, S]        1 = attribute the prediction of this token (optional:
                                  every real token; e.g. 0 over a prompt, 1 over the completion)

Token ``s`` of sequence ``b`` carries the loss of predicting it from the tokens before it,
``l_{b,s} = -log p(x_{b,s} | x_{b,<s})``, so position 0 is never attributed. The sequence loss
is the sum over attributed positions, ``l_b = Σ_s m_{b,s} l_{b,s}``; because covariance is
bilinear, every sequence-level BIF is exactly the sum of its token-level BIFs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bif.errors import DataError, ShapeError

ModelFn = Callable[..., Any]


def _logits(out: Any) -> Tensor:
    """Logits from a Hugging Face output (``.logits``), a tuple (first item) or a tensor."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ShapeError(
        f"a causal LM must return logits [B, S, vocab] (a tensor, a tuple starting with them, or "
        f"an object with .logits); got {type(out).__name__}."
    )


class CausalLMTask:
    """Next-token cross-entropy per token, for Hugging Face causal LMs and plain modules.

    Args:
        pass_attention_mask: call ``model(input_ids=..., attention_mask=...)`` (Hugging Face
            style). With False the model is called as ``model(input_ids)``: fine for right
            padding and causal attention, where real tokens never attend to the padding after
            them.
        trim_padding: cut each batch to its longest real sequence before the forward pass, so
            one long sequence in the data does not make every chunk pay for its padding.
    """

    name = "causal-lm"

    def __init__(self, pass_attention_mask: bool = True, trim_padding: bool = True) -> None:
        self.pass_attention_mask = pass_attention_mask
        self.trim_padding = trim_padding

    # -- data-only parts (no model): safe to call outside vmap -----------------------------
    @staticmethod
    def _parts(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ShapeError(
                "a causal-LM batch is a dict with 'input_ids' [B, S] (and optionally "
                "'attention_mask' and 'loss_mask'); build one with bif.lm.encode(...), got "
                f"{type(batch).__name__}."
            )
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
        lm = batch.get("loss_mask")
        lm = attn if lm is None else lm.bool() & attn
        return ids, attn, lm

    def token_mask(self, batch: Any) -> Tensor:
        """``[B, S]`` bool: which token losses are attributed (position 0 never is)."""
        return self._attributed(self._parts(batch)[2])

    @staticmethod
    def _attributed(loss_mask: Tensor) -> Tensor:
        mask = loss_mask.clone()
        mask[:, 0] = False
        return mask

    # -- model parts (pure; vmappable over chains) --------------------------------------------
    def token_losses(self, model: ModelFn, batch: Any) -> Tensor:
        """Per-token losses ``[B, S]`` (float32), zero wherever :meth:`token_mask` is False."""
        ids, attn, lm = self._parts(batch)
        mask = self._attributed(lm)
        s = ids.shape[1]
        # The batch is shared by all chains (never a vmapped tensor), so its length is a plain
        # int even inside torch.func.vmap.
        length = int(attn.sum(1).max()) if self.trim_padding else s
        length = max(length, 2)
        ids_t = torch.where(attn, ids, torch.zeros_like(ids))[:, :length]
        if self.pass_attention_mask:
            out = model(input_ids=ids_t, attention_mask=attn[:, :length].long())
        else:
            out = model(ids_t)
        logits = _logits(out)[:, :-1].float()  # [B, L-1, V] predicts tokens 1..L-1
        nll = F.cross_entropy(logits.transpose(1, 2), ids_t[:, 1:], reduction="none")
        per_token = F.pad(nll, (1, s - length))  # [B, S]: position 0 and trimmed tail are 0
        return torch.where(mask, per_token, torch.zeros_like(per_token))

    def loss(self, model: ModelFn, batch: Any) -> Tensor:
        """Sequence loss ``[B]``: the sum of attributed token losses."""
        return self.token_losses(model, batch).sum(-1)

    def check(self, model: ModelFn, batch: Any) -> None:
        """Shapes, dtypes, padding side and token ids of a real batch, with how to fix them."""
        ids, attn, _ = self._parts(batch)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ShapeError(
                f"input_ids must be integer token ids of shape [B, S], got {tuple(ids.shape)} "
                f"{ids.dtype}."
            )
        for key in ("attention_mask", "loss_mask"):
            m = batch.get(key)
            if m is not None and tuple(m.shape) != tuple(ids.shape):
                raise ShapeError(
                    f"{key} {tuple(m.shape)} must have the shape of input_ids {tuple(ids.shape)}."
                )
        if ids.shape[1] < 2:
            raise ShapeError("sequences need at least 2 tokens: the first one is only context.")
        # Right padding: once a row's mask is 0 it must stay 0.
        if bool((attn[:, 1:] & ~attn[:, :-1]).any()):
            raise DataError(
                "padding must be on the right (real tokens first); set "
                "tokenizer.padding_side = 'right' or use bif.lm.encode."
            )
        empty = (~self.token_mask(batch)).all(1)
        if bool(empty.any()):
            b = int(empty.nonzero()[0, 0])
            raise DataError(
                f"sequence {b} of a batch has no attributed token (its loss_mask, after the "
                "first position, is all 0, or it has fewer than 2 real tokens); drop it or widen "
                "its loss_mask."
            )
        # Probe with token 0 (always valid) to learn the vocabulary size before touching ids.
        probe = torch.zeros_like(ids[:, :2])
        logits = _logits(
            model(input_ids=probe, attention_mask=torch.ones_like(probe))
            if self.pass_attention_mask
            else model(probe)
        )
        if logits.dim() != 3 or logits.shape[:2] != (ids.shape[0], 2):
            raise ShapeError(
                f"the model must map input_ids [B, S] to logits [B, S, vocab]; for [{ids.shape[0]},"
                f" 2] it returned {tuple(logits.shape)}."
            )
        real = ids[attn]
        vocab = logits.shape[-1]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
            raise DataError(
                f"token ids must lie in [0, {vocab - 1}] for this model's vocabulary; got "
                f"[{int(real.min())}, {int(real.max())}]. Use the model's own tokenizer."
            )


def is_token_task(task: Any) -> bool:
    """Tasks with per-token losses get per-token traces recorded."""
    return callable(getattr(task, "token_losses", None)) and callable(
        getattr(task, "token_mask", None)
    )


def _completion_mask(tokenizer: Any, text: str, prompt: str, i: int) -> tuple[list, list]:
    """Token ids of ``text`` and a 0/1 mask that is 1 on the tokens after ``prompt``.

    Fast tokenizers report character offsets: a token belongs to the completion if it starts at
    or after the prompt's end. Special tokens (offsets ``(0, 0)``) follow their neighbour: a BOS
    belongs to the prompt, an EOS after completion text to the completion. Without offsets the
    prompt's own token ids must be a prefix of the text's.
    """
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets is not None:
        ids, mask, after = list(enc["input_ids"]), [], False
        for start, end in offsets:
            if end > start:
                after = start >= len(prompt)
            mask.append(int(after))
        return ids, mask
    ids = list(tokenizer(text)["input_ids"])
    p_ids = list(tokenizer(prompt)["input_ids"])
    if ids[: len(p_ids)] != p_ids:
        raise DataError(
            f"text {i} does not tokenise with its prompt's tokens as a prefix; end the prompt "
            "at a word boundary (e.g. before a space), or use a fast tokenizer."
        )
    return ids, [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))


def encode(
    tokenizer: Any,
    texts: list[str],
    prompts: list[str] | None = None,
    max_length: int | None = None,
) -> dict[str, Tensor]:
    """Tokenise ``texts`` into right-padded ``input_ids``/``attention_mask``/``loss_mask``.

    Args:
        tokenizer: a Hugging Face tokenizer (``tokenizer(text)["input_ids"]``); special tokens
            are added as the tokenizer does by default.
        texts: the full sequences.
        prompts: optional prefixes (one per text, each a prefix of its text) whose tokens are
            context only: ``loss_mask`` is 0 over them, so only the completion is attributed.
        max_length: truncate every sequence to this many tokens.

    Returns:
        dict of ``[N, S]`` tensors, ``S`` the longest sequence.
    """
    if prompts is not None and len(prompts) != len(texts):
        raise DataError(f"got {len(prompts)} prompts for {len(texts)} texts.")
    if not texts:
        raise DataError("encode needs at least one text.")
    rows, masks = [], []
    for i, text in enumerate(texts):
        if prompts is None:
            ids = list(tokenizer(text)["input_ids"])
            mask = [1] * len(ids)
        else:
            if not text.startswith(prompts[i]):
                raise DataError(f"prompt {i} {prompts[i]!r} is not a prefix of its text.")
            ids, mask = _completion_mask(tokenizer, text, prompts[i], i)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        rows.append(ids)
        masks.append(mask)
    s = max(len(r) for r in rows)
    out = torch.zeros(len(rows), s, dtype=torch.long)
    attn = torch.zeros(len(rows), s, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), s, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": out, "attention_mask": attn, "loss_mask": loss_mask}
