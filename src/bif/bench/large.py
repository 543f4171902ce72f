"""``bif bench large``: peak memory of a large causal LM on one device against a formula.

A randomly initialised Hugging Face Llama (≥ 300 M parameters at the default size) is attributed
with ``vmap_chains=False`` (one chain at a time: the memory of one replica plus the sampler
state), forward passes in bfloat16, and sampling restricted to its last ``blocks`` decoder
blocks (:func:`bif.lm.freeze_except`). The peak resident memory of the ``bif.attribute`` call
(:class:`bif.bench.memory.PeakMemory`) is printed against :func:`predicted_bytes`:

    peak ≈ R₀                             the process before the model (Python, torch, ...)
         + P·b_model                      the user's model (all P parameters, its dtype)
         + P_f·b_fwd                      frozen tensors cast to the forward dtype once
         + P_s·b_s·(2 + S)                w* and ∇L_n(w*) (centring), S sampler-state copies
         + P_s·(6·b_s + 2·b_fwd)          a step's work: the gradient, its chunk-weighted copy,
                                          the posterior gradient, the noise and two update
                                          temporaries, and the weights and their gradient in
                                          the forward dtype
         + P_s·k·b_s                      the low-rank mass basis (rank k)
         + A                              activations of one chunk's forward+backward

with ``P_s`` sampled parameters in the sampling dtype ``b_s`` (the model's), ``P_f = P − P_s``,
``S`` = 2 for the kinetic sampler (position, momentum; 1 for SGLD, 2 for RMSProp), and ``A``
measured as the peak of a bare forward+backward of one chunk (reported separately). This is
what ``vmap_chains=False`` promises: nothing in it grows with the number of chains or draws
except the recorded traces (``C·D·(N + Q)`` float64 values; the per-token traces are on disk,
:mod:`bif.tracestore`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bif.bench.memory import PeakMemory


def llama_config(hidden: int, layers: int, vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
        tie_word_embeddings=True, attn_implementation="eager", use_cache=False,
    )  # fmt: skip


def predicted_bytes(
    total: int, sampled: int, model_bytes: int, forward_bytes: int, state_copies: int,
    rank: int, centred: bool, activations: float, process: float = 0.0,
) -> dict[str, float]:  # fmt: skip
    """The terms of the module docstring's formula, in bytes (``process``: the resident memory
    of the interpreter and its libraries before the model exists)."""
    frozen = total - sampled
    terms = {
        "process": process,
        "model": total * model_bytes,
        "frozen_forward_copy": frozen * forward_bytes if forward_bytes != model_bytes else 0,
        "w_star_and_grad_star": sampled * model_bytes * (1 + int(centred)),
        "sampler_state": sampled * model_bytes * state_copies,
        "step_work": sampled * (model_bytes * 6 + forward_bytes * 2),
        "mass_basis": sampled * rank * model_bytes,
        "activations": activations,
    }
    terms["total"] = sum(terms.values())
    return terms


def _data(n: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}


def run_large(
    hidden: int = 1024, layers: int = 24, vocab: int = 32000, blocks: int = 2,
    num_train: int = 8, num_query: int = 2, seq: int = 64, chains: int = 2, draws: int = 4,
    burnin: int = 2, forward_dtype: str = "bfloat16", threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Build the model, measure one chunk's bare forward+backward, then the attribution."""
    from transformers import LlamaForCausalLM

    import bif
    from bif.lm import CausalLMTask
    from bif.lm.pretrained import freeze_except

    if threads is not None:
        torch.set_num_threads(threads)
    with PeakMemory() as before:  # the process (Python, torch, transformers) before the model
        pass
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden, layers, vocab)).eval()
    total = sum(p.numel() for p in model.parameters())
    first = layers - blocks
    patterns = [f"model.layers.{i}.*" for i in range(first, layers)] + ["model.norm.*"]
    freeze_except(model, patterns)
    sampled = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train, query = _data(num_train, seq, vocab, 1), _data(num_query, seq, vocab, 2)
    task = CausalLMTask()
    fwd = getattr(torch, forward_dtype)

    # A: one chunk's forward+backward of the sampled blocks, outside bif (the model's own
    # autograd, forward in the forward dtype), over the memory already held.
    with PeakMemory() as base:
        pass
    # cache_enabled=False: no cached forward-dtype copy of every weight (bif casts per call).
    with PeakMemory() as act, torch.autocast("cpu", dtype=fwd, cache_enabled=False):
        out = model(input_ids=train["input_ids"]).logits
        out.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    del out
    activations = max(0.0, (act.peak_mb - base.peak_mb)) * 2**20
    cfg = dict(
        num_chains=chains, num_draws=draws, num_burnin=burnin, vmap_chains=False,
        forward_dtype=forward_dtype, precondition_rank=0, step_size=1e-4, nbeta=100.0,
        gamma=1e4, chunk_size=num_train, progress=False, center_gradient=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        result = bif.attribute(model, train, query, task=task, **cfg)
    seconds = time.perf_counter() - t0
    model_bytes = next(model.parameters()).element_size()
    terms = predicted_bytes(
        total,
        sampled,
        model_bytes,
        torch.finfo(fwd).bits // 8,
        2,
        0,
        True,
        activations,
        before.peak_mb * 2**20,
    )
    measured = peak.peak_mb * 2**20
    return {
        "bif_version": bif.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": dict(hidden=hidden, layers=layers, vocab=vocab, total_params=total,
                      sampled_params=sampled, sampled_blocks=blocks, dtype=str(model.dtype)),
        "data": dict(num_train=num_train, num_query=num_query, seq=seq),
        "config": {k: v for k, v in cfg.items() if k != "progress"},
        "seconds": seconds,
        # Chains run one after another: each had seconds / chains of the run.
        "tokens_per_second_per_chain": num_train * seq * (burnin + draws) * chains / seconds,
        "peak_rss_mb": peak.peak_mb,
        "predicted_mb": {k: v / 2**20 for k, v in terms.items()},
        "measured_over_predicted": measured / terms["total"],
        "scores_finite": bool(torch.isfinite(result.scores).all()),
    }  # fmt: skip


def table(rec: dict[str, Any]) -> str:
    m, p = rec["model"], rec["predicted_mb"]
    lines = [
        f"Llama {m['total_params'] / 1e6:.0f} M parameters ({m['layers']} layers, hidden "
        f"{m['hidden']}), sampling the last {m['sampled_blocks']} blocks: "
        f"{m['sampled_params'] / 1e6:.1f} M; {rec['config']['num_chains']} chains one at a time, "
        f"forward in {rec['config']['forward_dtype']}",
        f"{'term':<24}{'MB':>10}",
    ]
    lines += [f"{k:<24}{v:>10.0f}" for k, v in p.items()]
    lines.append(f"{'measured peak RSS':<24}{rec['peak_rss_mb']:>10.0f}")
    lines.append(
        f"measured / predicted = {rec['measured_over_predicted']:.2f}; "
        f"{rec['seconds']:.0f} s, {rec['tokens_per_second_per_chain']:.0f} tokens/s per chain"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--burnin", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bif-bench"))
    a = ap.parse_args(argv)
    rec = run_large(
        a.hidden, a.layers, a.vocab, a.blocks, chains=a.chains, draws=a.draws, burnin=a.burnin,
        threads=a.threads,
    )  # fmt: skip
    text = table(rec)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "large.json").write_text(json.dumps(rec, indent=1))
    (a.out / "large.txt").write_text(text + "\n")
    print(f"wrote {a.out / 'large.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
