"""``python -m bif.bench.kronecker_memory``: the Kronecker mass's memory against its formula.

Builds :func:`bif.sampler.kronecker_build.build_kronecker_mass` for a randomly initialised
Hugging Face Llama (every parameter sampled, float32, CPU; a few short random-token batches) and
reports the bytes the mass holds (sum of its tensors' ``nbytes``) against the formula of
:mod:`bif.sampler.kronecker`, their ratio to the model replica, the build time and the process's
peak RSS. The formula is then evaluated, without building anything (meta-device models), for
1 B-parameter Llama configurations at several ranks and at the rank the 10% budget picks.
Writes ``docs/bench/kronecker-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bif.bench.memory import PeakMemory
from bif.sampler.kronecker import budget_rank, mass_floats, plan_layers
from bif.sampler.kronecker_build import build_kronecker_mass

OUT = Path("docs/bench/kronecker-memory.json")
# 1 B-parameter Llama shapes: TinyLlama-1.1B (untied 32k vocabulary) and Llama-3.2-1B (tied
# 128k vocabulary; the tied embedding falls back to γ·I), plus the untied 128k variant.
ONE_B = {
    "llama-1b-v32000-untied": dict(vocab=32000, tie=False),
    "llama-1b-v128256-tied": dict(vocab=128256, tie=True),
    "llama-1b-v128256-untied": dict(vocab=128256, tie=False),
}


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                 kv_heads: int, tie: bool) -> Any:  # fmt: skip
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=tie, use_cache=False,
    )  # fmt: skip


def formula_row(name: str, cfg: Any, ranks: list[int], fraction: float = 0.1) -> dict[str, Any]:
    """Mass bytes by the formula for ``cfg`` (float32, all parameters sampled, EK-FAC core)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    keys = [k for k, _ in model.named_parameters()]
    params = sum(p.numel() for p in model.parameters())
    specs, fallback = plan_layers(model, keys)
    replica = 4 * params
    r_budget = budget_rank(specs, 4096, True, 4, fraction * replica)
    rows = {}
    for r in sorted({*ranks, r_budget}):
        b = 4 * mass_floats(specs, r, True)
        rows[str(r)] = {"bytes": b, "fraction_of_replica": b / replica}
    factored = sum(p.numel() for n, p in model.named_parameters() if n not in fallback)
    return {
        "config": name, "params": params, "replica_bytes": replica,
        "factored_params": factored, "layers_factored": len(specs),
        "budget_rank_at_10pct": r_budget, "by_rank": rows,
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from bif.lm import CausalLMTask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = llama_config(args.hidden, args.intermediate, args.layers, args.vocab,
                       args.hidden // 64, args.hidden // 64, False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    n = args.batches * args.batch_size
    g = torch.Generator().manual_seed(1)
    train = {"input_ids": torch.randint(0, args.vocab, (n, args.seq), generator=g)}
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        mass, info = build_kronecker_mass(
            model, CausalLMTask(pass_attention_mask=False), train, nbeta=1000.0, gamma=1000.0,
            num_batches=args.batches, batch_size=args.batch_size, rank=args.rank,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    measured = sum(t.nbytes for b in mass.blocks for t in b.tensors())
    replica = sum(p.nbytes for p in model.parameters())
    one_b = [
        formula_row(k, llama_config(2048, 8192, 16, v["vocab"], 32, 8, v["tie"]), [32, 64, 128])
        for k, v in ONE_B.items()
    ]
    return {
        "bif_bench": "kronecker-memory", "torch_version": torch.__version__,
        "python_version": platform.python_version(), "threads": args.threads,
        "model": {"hidden": args.hidden, "intermediate": args.intermediate,
                  "layers": args.layers, "vocab": args.vocab, "tied": False},
        "params": params, "sampled_params": mass.num_params,
        "factored_params": info["factored_params"], "rank": info["rank"],
        "tokens": n * args.seq, "batches": info["batches"],
        "mass_bytes_measured": measured, "mass_bytes_formula": info["formula_bytes"],
        "measured_over_formula": measured / info["formula_bytes"],
        "replica_bytes": replica, "mass_over_replica": measured / replica,
        "build_seconds": seconds, "peak_rss_mb": peak.peak_mb,
        "layers_factored": len(info["factored"]), "sketched": info["sketched"],
        "fallback": sorted(set(info["fallback"].values())),
        "fallback_tensors": len(info["fallback"]), "one_b_formula": one_b,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=128, help="most eigenpairs per factor")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    res = run(args)
    print(
        f"Llama {res['params'] / 1e6:.0f} M params (all sampled), rank {res['rank']}: mass "
        f"{res['mass_bytes_measured'] / 2**20:.1f} MiB measured, "
        f"{res['mass_bytes_formula'] / 2**20:.1f} MiB formula "
        f"({res['mass_over_replica']:.1%} of the {res['replica_bytes'] / 2**20:.0f} MiB "
        f"replica); build {res['build_seconds']:.0f} s, peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    print(f"{'1 B config':26s} {'params':>7s} {'rank':>5s} {'mass MiB':>9s} {'of replica':>10s}")
    for row in res["one_b_formula"]:
        for r, v in row["by_rank"].items():
            mark = " (10% budget)" if int(r) == row["budget_rank_at_10pct"] else ""
            print(
                f"{row['config']:26s} {row['params'] / 1e9:6.2f}B {r:>5s} "
                f"{v['bytes'] / 2**20:9.0f} {v['fraction_of_replica']:10.1%}{mark}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
