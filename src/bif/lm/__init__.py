"""Language models: per-token BIF for causal LMs (Hugging Face or plain modules).

import bif
from bif.lm import CausalLMTask, encode
train = encode(tokenizer, train_texts)                     # input_ids, attention_mask, loss_mask
query = encode(tokenizer, query_texts, prompts=prompts)    # attribute only the completions
result = bif.attribute(model, train, query, task=CausalLMTask())
result.scores                            # [Q, N] sequence-level BIF (sum over tokens)
result.tokens.token_scores()             # [Kq, Kn] token x token BIF, in memory-bounded blocks
result.tokens.top_train_tokens(0, position=5)
result.save("out"); save_lm_text("out", tokenizer, train, query)   # then `bif report out`

The task, the encoding and the token text (``lm.json``, for ``bif report``) are imported here;
the pretrained SmolLM2 loader (which needs ``transformers``) is :mod:`bif.lm.pretrained`. The
tiny Shakespeare model and its corpus are benchmark and demo material: :mod:`bif.bench.lm`.
"""

from bif.lm.task import CausalLMTask, encode, is_token_task
from bif.lm.text import save_lm_text
from bif.tokens import TokenInfluence, TokenTraces

__all__ = [
    "CausalLMTask",
    "TokenInfluence",
    "TokenTraces",
    "encode",
    "is_token_task",
    "save_lm_text",
]
