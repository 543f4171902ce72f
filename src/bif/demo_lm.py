"""The language demo: per-token BIF of a tiny Shakespeare transformer, with a heatmap report.

:func:`run_lm_demo` loads (training on first use, then from the cache) the tiny Llama-style
model of :mod:`bif.bench.lm.tiny`, pretrained on 3,000 passages from all plays; fine-tunes it on
``num_train`` passages of *Hamlet* that it has not seen (:mod:`bif.bench.lm.finetune`); attributes
a few other, held-out *Hamlet* speeches to those fine-tuning passages; and writes::

    out_dir/report.html      token heatmaps: each query coloured by a chosen training passage,
                             the strongest passages coloured token by token
    out_dir/result/          the BIFResult with per-token traces, and lm.json (token text)

Each query is ``"SPEAKER:\\n" + speech``; only the speech is attributed (``loss_mask`` 0 over
the speaker prompt), so the scores explain how the fine-tuned model predicts what is said, given
who says it. Fine-tuning runs close to convergence, so the checkpoint is nearly a minimum of the
attributed passages' loss (which the local posterior assumes; attributing a subset of the
pretraining data instead lets the chains drift into memorising it). The sampler uses the
library's rules (auto nβ, γ, step size, friction) with a shorter run than the library default,
sized so the whole demo takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bif.api import attribute
from bif.bench.lm import finetune as ft
from bif.bench.lm import tiny as tiny_lm
from bif.bench.lm.finetune import PLAY
from bif.bench.lm.shakespeare import token_strings
from bif.config import BIFConfig
from bif.demo import torch_threads
from bif.errors import ConfigError
from bif.lm.task import CausalLMTask, encode
from bif.lm.text import save_token_text
from bif.report.lm import write_lm_report
from bif.result import BIFResult

log = logging.getLogger(__name__)

NUM_TRAIN = 128
NUM_QUERIES = 4
# A shorter run than the library default (8 x (200 + 500 x 10) steps): 4 chains of
# 50 + 100 x 2 steps keep the demo at a few minutes on 2 cores. The auto rules still set
# nβ, γ, the step size and the friction from the model's curvature; the centred gradient
# removes what is left of the fine-tuning gradient at w* (see bif.posterior). Unit mass
# (precondition_rank=0): the fine-tuned model has negative curvature far beyond the default
# localisation (on the tests' shortened fine-tune an eigenvalue near -58 against -γ/nβ = -1.45),
# so the preconditioned rules would lower the condition ~40-fold; the LM settings keep the unit
# mass and the condition (150) they were measured with until the preconditioner is measured on
# them.
DEMO_CONFIG = dict(
    num_chains=4,
    num_burnin=50,
    num_draws=100,
    thin=2,
    chunk_size=128,
    center_gradient=True,
    precondition_rank=0,
    condition=150.0,
)


@dataclass
class LMDemoOutput:
    out_dir: Path
    report_path: Path
    result_dir: Path
    result: BIFResult
    train_texts: list[str]
    query_texts: list[str]
    heldout_loss: float
    train_seconds: float
    wall_seconds: float


def _prompt(text: str) -> str:
    """The ``"SPEAKER:\\n"`` head of a passage: context, not attributed."""
    head, sep, _ = text.partition("\n")
    return head + sep


def pick_queries(heldout: list[Any], num_queries: int) -> list[Any]:
    """Held-out passages of several lines, by distinct speakers, in held-out order."""
    out, speakers = [], set()
    for p in heldout:
        if p.text.count("\n") >= 2 and p.speaker not in speakers:
            out.append(p)
            speakers.add(p.speaker)
        if len(out) == num_queries:
            break
    return out


def run_lm_demo(
    out_dir: str | Path = "bif-demo-lm",
    num_queries: int = NUM_QUERIES,
    num_train: int = NUM_TRAIN,
    k: int = 3,
    progress: bool = True,
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    recipe: Any = None,
    finetune_recipe: Any = None,
    **hyperparams: Any,
) -> LMDemoOutput:
    """Train-or-load the tiny LM, attribute held-out speeches, write the token heatmap report.

    Args:
        out_dir: output directory (see the module docstring).
        num_queries: held-out speeches to explain.
        num_train: training passages attributed (the first of the model's training split).
        k: proponent and opponent passages per query in the report.
        progress: progress bars (first training, sampling).
        threads: torch CPU threads while the demo runs (None: torch's default).
        cache_dir: where the trained model is cached (default ``$BIF_CACHE`` or ~/.cache/bif).
        recipe: the tiny LM's :class:`bif.bench.lm.tiny.TinyLMRecipe` (default: the library's).
        finetune_recipe: a :class:`bif.bench.lm.finetune.FinetuneRecipe` (default: the
            library's).
        **hyperparams: :class:`BIFConfig` fields overriding the demo's run length or rules.
    """
    t0 = time.perf_counter()
    cfg = BIFConfig().replace(**{**DEMO_CONFIG, **hyperparams})
    if num_queries < 1 or num_train < 2:
        raise ConfigError("the LM demo needs num_queries >= 1 and num_train >= 2.")
    out_dir = Path(out_dir)
    with torch_threads(threads):
        # The default recipes are read here, not bound at import (tests swap in small ones).
        recipe = recipe or tiny_lm.DEFAULT_RECIPE
        tiny = tiny_lm.load_tiny_lm(cache_dir, progress=progress, recipe=recipe)
        tok = tiny.tokenizer
        fine, rest = ft.finetune_passages(tiny, num_train)
        model = ft.finetune(
            tiny.model,
            [tok(p.text)["input_ids"] for p in fine],
            finetune_recipe or ft.DEFAULT_FINETUNE,
        )
        train_seconds = time.perf_counter() - t0
        queries = pick_queries(rest, num_queries)
        train_texts = [p.text for p in fine]
        query_texts = [p.text for p in queries]
        train = encode(tok, train_texts)
        query = encode(tok, query_texts, prompts=[_prompt(t) for t in query_texts])
        heldout_ids = [tok(p.text)["input_ids"] for p in rest]
        heldout_loss = tiny_lm.mean_token_loss(model, heldout_ids)
        train_loss = tiny_lm.mean_token_loss(model, [tok(t)["input_ids"] for t in train_texts])
        task = CausalLMTask()
        with torch.no_grad():
            q_loss = task.token_losses(model, query)  # [Q, S] at w*
        result = attribute(model, train, query, task=task, config=cfg, progress=progress)
    result_dir = result.save(out_dir / "result")

    def strings(batch: dict[str, torch.Tensor], i: int) -> list[str]:
        n = int(batch["attention_mask"][i].sum())
        return token_strings(tok, batch["input_ids"][i, :n].tolist())

    q_mask = task.token_mask(query)
    losses = [
        [float(v) if m else float("nan") for v, m in zip(q_loss[i], q_mask[i], strict=True)][
            : int(query["attention_mask"][i].sum())
        ]
        for i in range(len(query_texts))
    ]
    save_token_text(
        result_dir,
        [strings(train, i) for i in range(num_train)],
        [strings(query, i) for i in range(len(query_texts))],
        losses,
        extra={
            "title": "bif demo: per-token influence in a tiny Shakespeare transformer",
            "note": f"The tiny LM, pretrained on 3,000 passages of all plays, was fine-tuned on "
            f"{num_train} unseen passages of {PLAY}; queries are other {PLAY} speeches, and only "
            "the speech (not the speaker's name) is attributed.",
            "report_meta": {
                "model": f"LlamaForCausalLM, {sum(p.numel() for p in model.parameters()):,}"
                " parameters (bif.bench.lm.tiny), fine-tuned (bif.bench.lm.finetune)",
                "fine-tuning loss (nats/token)": round(train_loss, 4),
                "held-out loss (nats/token)": round(heldout_loss, 4),
                "queries (speaker)": "; ".join(p.speaker for p in queries),
            },
            "train_speakers": [p.speaker for p in fine],
            "query_speakers": [p.speaker for p in queries],
        },
    )
    report = write_lm_report(result_dir, out_dir / "report.html", k=k)
    (out_dir / "demo-lm.json").write_text(
        json.dumps(
            {
                "train_seconds": train_seconds,
                "heldout_loss": heldout_loss,
                "train_loss": train_loss,
            },
            indent=1,
        )
    )
    return LMDemoOutput(
        out_dir, report, result_dir, result, train_texts, query_texts, heldout_loss,
        train_seconds, time.perf_counter() - t0,
    )  # fmt: skip
