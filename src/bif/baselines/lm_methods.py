"""The baselines on causal language models (contexts with ``task="causal-lm"``).

The context's data are :func:`bif.lm.encode` dicts (``input_ids``/``attention_mask``/
``loss_mask`` ``[N, S]``, right-padded); every method attributes the SEQUENCE loss, the sum of a
sequence's next-token losses over its attributed tokens (:meth:`bif.lm.task.CausalLMTask.loss`),
both for the training sequences and for the queries. Scores follow bif's convention (negative =
training on n lowers query q's loss).

- grad-dot / grad-cos: per-sequence gradients, one sequence (trimmed to its length) at a time,
  over every trainable parameter (a tied embedding / lm_head matrix counted once, with the
  gradient of both uses).
- EK-FAC (kronfluence): every ``nn.Linear`` is tracked, i.e. the attention and MLP projections
  of each block and ``lm_head``. In the tiny Llama ``lm_head`` shares its weight with the input
  embedding; kronfluence sees it as a Linear, so its factors and gradients cover the OUTPUT use
  of the matrix only. The input-embedding use and the RMSNorm weights are not tracked.
- TRAK (dattri): randomly projected gradients of the sequence loss (the language-model analogue
  of the classification adapter's loss branch: no probability re-weighting), one model.

The GradientDot/GradientCosine, EKFAC and TRAK classes dispatch here for causal-lm contexts.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bif.baselines.base import AttributionContext
from bif.baselines.gradients import F64, eval_mode, normalise
from bif.baselines.peers import (
    bif_scores,
    model_device,
    projector_kwargs,
    quiet_dattri,
    seeded,
    with_projector,
)
from bif.errors import ConfigError, DataError
from bif.lm.task import CausalLMTask

Batch = dict[str, Tensor]


def is_lm_context(ctx: AttributionContext) -> bool:
    return ctx.task == "causal-lm" or isinstance(ctx.x_train, dict)


def num_rows(batch: Batch) -> int:
    return int(batch["input_ids"].shape[0])


def lm_sizes(ctx: AttributionContext) -> tuple[int, int]:
    """``(Q, N)`` of a causal-LM context."""
    for name in ("x_train", "x_query"):
        b = getattr(ctx, name)
        if not isinstance(b, dict) or "input_ids" not in b:
            raise DataError(f"a causal-lm context needs {name} as a bif.lm.encode dict batch.")
    q, n = num_rows(ctx.x_query), num_rows(ctx.x_train)
    if q == 0 or n == 0:
        raise DataError(f"need at least one training sequence and one query, got N={n}, Q={q}.")
    return q, n


def _row(batch: Batch, i: int) -> Batch:
    """Sequence ``i`` as a batch of one, trimmed to its real length."""
    n = int(batch["attention_mask"][i].sum()) if "attention_mask" in batch else None
    return {k: v[i : i + 1, :n] for k, v in batch.items()}


# --- grad-dot / grad-cos -----------------------------------------------------------------------


def sequence_gradients(model: nn.Module, batch: Batch) -> Iterator[Tensor]:
    """Per-sequence gradients of the sequence loss, flattened ``[P]`` (float32), in order."""
    task = CausalLMTask()
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(num_rows(batch)):
        loss = task.loss(model, _row(batch, i)).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        yield torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        ).float()


def gradsim_scores(ctx: AttributionContext, cosine: bool) -> Tensor:
    """``-<g_q, g_n>`` (or ``-cos``) ``[Q, N]`` float64 from sequence-loss gradients at w*."""
    q, n = lm_sizes(ctx)
    with eval_mode(ctx.model):
        gq = torch.stack(list(sequence_gradients(ctx.model, ctx.x_query))).to(F64)
        if cosine:
            gq = normalise(gq)
        out = torch.empty(q, n, dtype=F64)
        for j, g in enumerate(sequence_gradients(ctx.model, ctx.x_train)):
            g = g.to(F64).unsqueeze(0)
            if cosine:
                g = normalise(g)
            out[:, j] = -(gq @ g.T).squeeze(1)
    return out


# --- EK-FAC through kronfluence ----------------------------------------------------------------


def _sequence_losses(logits: Tensor, batch: Batch, targets: Tensor | None = None) -> Tensor:
    """Summed next-token losses ``[B]`` over the attributed tokens, from logits ``[B, S, V]``."""
    mask = CausalLMTask().token_mask(batch)[:, 1:]
    ids = batch["input_ids"][:, 1:] if targets is None else targets
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids, reduction="none")
    return (ce * mask).sum(-1)


def _kron_task(base: type, seed: int) -> Any:
    """A kronfluence Task for encode-dict batches: summed sequence losses, query sequence loss.

    ``sample=True`` (true Fisher) draws every next token from the model's own distribution.
    """
    generator = torch.Generator().manual_seed(seed)

    def logits_of(model: nn.Module, batch: Batch) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    class LMTask(base):  # type: ignore[misc, valid-type]
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            logits = logits_of(model, batch)
            if not sample:
                return _sequence_losses(logits, batch).sum()
            with torch.no_grad():
                probs = F.softmax(logits[:, :-1].detach().double(), dim=-1).cpu()
                flat = probs.reshape(-1, probs.shape[-1])
                drawn = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:2])
            return _sequence_losses(logits, batch, drawn.to(logits.device)).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return _sequence_losses(logits_of(model, batch), batch).sum()

        def get_attention_mask(self, batch: Any) -> Tensor:
            return batch["attention_mask"]

    return LMTask()


def _rows(batch: Batch) -> list[Batch]:
    return [{k: v[i] for k, v in batch.items()} for i in range(num_rows(batch))]


def ekfac_scores(method: Any, ctx: AttributionContext) -> Tensor:
    """EK-FAC scores ``[Q, N]`` of a causal-LM context (``method``: a configured ``EKFAC``)."""
    q, n = lm_sizes(ctx)
    task = _kron_task(__import__("kronfluence.task", fromlist=["Task"]).Task, method.seed)
    raw = kron_pairwise(method, ctx, task, _rows(ctx.x_query))
    return bif_scores(raw, q, n, "EK-FAC", negate=True)


def kron_pairwise(method: Any, ctx: AttributionContext, task: Any, query: list[Any]) -> Tensor:
    """kronfluence's raw pairwise scores ``[len(query), N]`` (its sign: positive = helpful):
    factors fitted on the context's training sequences with ``task``, then one measurement
    (``task.compute_measurement``) per item of ``query``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    _, n = lm_sizes(ctx)
    model = prepare_model(copy.deepcopy(ctx.model).eval(), task)
    device = next(model.parameters()).device
    train = _rows(ctx.x_train)
    with (
        tempfile.TemporaryDirectory(prefix="bif-kronfluence-") as out_dir,
        seeded(method.seed),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*torch.cuda.amp.GradScaler")
        analyzer = Analyzer(
            analysis_name="bif-lm", model=model, task=task, cpu=device.type == "cpu",
            log_level=logging.WARNING, disable_tqdm=True, output_dir=out_dir,
        )  # fmt: skip
        analyzer.fit_all_factors(
            factors_name=method.strategy,
            dataset=train,
            per_device_batch_size=min(method.batch_size, n),
            factor_args=FactorArguments(
                strategy=method.strategy, use_empirical_fisher=method.use_empirical_fisher
            ),
        )
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name=method.strategy,
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=min(method.query_batch_size, len(query)),
            per_device_train_batch_size=min(method.batch_size, n),
            score_args=ScoreArguments(damping_factor=method.damping),
        )
        return analyzer.load_pairwise_scores("pairwise")["all_modules"]


# --- TRAK through dattri -----------------------------------------------------------------------


def trak_scores(method: Any, ctx: AttributionContext) -> Tensor:
    """TRAK scores ``[Q, N]`` of a causal-LM context (``method``: a configured ``TRAK``)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    q, n = lm_sizes(ctx)
    if method.ensemble_size != 1:
        raise ConfigError("TRAK on a causal LM supports ensemble_size=1 (the checkpoint) only.")
    if method.proj_dim > n and method.damping == 0.0:
        raise ConfigError(
            f"TRAK's kernel is singular when proj_dim ({method.proj_dim}) exceeds the number of "
            f"training sequences ({n}): lower proj_dim or set damping > 0."
        )
    model = copy.deepcopy(ctx.model).eval()
    device = model_device(model)
    # Right padding + causal attention: real tokens never attend to the padding after them,
    # so the model runs without its attention mask (vmappable, no data-dependent shapes).
    task = CausalLMTask(pass_attention_mask=False, trim_padding=False)

    def output(params: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
        ids, attn, lmask = data
        batch = {"input_ids": ids[None], "attention_mask": attn[None], "loss_mask": lmask[None]}
        return task.loss(lambda x: functional_call(model, params, (x,)), batch)[0]

    def p_correct(params: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
        return torch.zeros((), device=device)

    def loader(b: Batch) -> DataLoader:
        lm = b.get("loss_mask", b["attention_mask"])
        ds = TensorDataset(b["input_ids"], b["attention_mask"], lm)
        return DataLoader(ds, batch_size=method.batch_size, shuffle=False)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atask = AttributionTask(loss_func=output, model=model, checkpoints=[state])
    attributor = with_projector(
        TRAKAttributor,
        task=atask,
        correct_probability_func=p_correct,
        projector_kwargs=projector_kwargs(method.proj_dim, method.seed, device, "normal"),
        device=device.type,
        regularization=method.damping,
    )
    with seeded(method.seed), quiet_dattri():
        attributor.cache(loader(ctx.x_train))
        raw = attributor.attribute(loader(ctx.x_query))
    return bif_scores(raw.T, q, n, "TRAK", negate=True)
