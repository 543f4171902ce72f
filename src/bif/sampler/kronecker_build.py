"""Building the Kronecker mass (:mod:`bif.sampler.kronecker`) from a fixed number of batches.

One pass (two with the eigenvalue correction) over ``num_batches`` batches of ``batch_size``
training examples at w*, a seeded subsample whose size does not grow with N. Public forward hooks
(``register_forward_hook``) on the factored modules record each call's input and output; one
``torch.autograd.grad`` of the summed per-example loss gives every output's gradient.

Targets (``fisher``): "sampled" (default) draws them from the model's predictive (categorical for
classification and causal LMs, N(f, I) for the ½-squared error), the Monte Carlo Fisher, whose
expectation is the Gauss-Newton matrix: exact for linear models with squared loss, and close to H
near a minimum. "empirical" uses the true labels: also PSD, but it scales with the residuals
(near zero at a well-fit checkpoint, where H is not), so it is only the fallback for tasks whose
predictive bif cannot sample (custom Tasks; logged). The targets of batch b come from
``torch.Generator(device).manual_seed(seed + b)`` (:func:`sample_targets`), the same in both passes.

Factors of dimension ``d <= max_exact_dim`` are accumulated exactly and eigendecomposed; larger
ones (an LM head's vocabulary) through a streaming Nyström sketch ``Y = F Ω`` with
``Ω [d, k + oversample]`` (Tropp et al. 2017), memory ``d·(k + oversample)``: exact when F has
rank <= k + oversample, otherwise an underestimate of the top eigenvalues (the tail takes the rest
of the trace), which only coarsens the preconditioner.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bif.data import DataSource
from bif.functional import FunctionalModel
from bif.lm.task import CausalLMTask
from bif.sampler.kronecker import (
    Factor,
    KroneckerBlock,
    KroneckerMass,
    LayerSpec,
    budget_rank,
    mass_floats,
    plan_layers,
)
from bif.task import ClassificationTask, RegressionTask, Task, forward, split_batch

log = logging.getLogger(__name__)


def sample_targets(task: Task, outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Targets drawn from the model's predictive at ``outputs``: categorical over the last dim
    of logits (classification ``[B, K]``, causal LM ``[B, S, V]``), or ``outputs + N(0, I)``
    for regression."""
    out = outputs.detach()
    if isinstance(task, RegressionTask):
        return out + torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    probs = torch.softmax(out.float(), dim=-1).reshape(-1, out.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(out.shape[:-1])


def can_sample(task: Task) -> bool:
    return isinstance(task, ClassificationTask | RegressionTask | CausalLMTask)


def _losses(task: Task, model: Any, batch: Any, sampled: bool, gen: torch.Generator) -> Tensor:
    """Per-example losses ``[B]``, at sampled targets or the batch's own."""
    if not sampled:
        return task.loss(model, batch)
    if isinstance(task, CausalLMTask):  # CausalLMTask.token_losses with drawn next tokens
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
        length = max(int(attn.sum(1).max()) if task.trim_padding else ids.shape[1], 2)
        ids_t = torch.where(attn, ids, torch.zeros_like(ids))[:, :length]
        if task.pass_attention_mask:
            out = model(input_ids=ids_t, attention_mask=attn[:, :length].long())
        else:
            out = model(ids_t)
        if not isinstance(out, Tensor):  # a Hugging Face output or a tuple led by the logits
            out = out.logits if hasattr(out, "logits") else out[0]
        logits = out[:, :-1].float()  # [B, L-1, V]
        nll = F.cross_entropy(
            logits.transpose(1, 2), sample_targets(task, logits, gen), reduction="none"
        )
        return (nll * task.token_mask(batch)[:, 1:length]).sum(-1)
    inputs, _ = split_batch(batch)
    out = forward(model, inputs)
    return task.loss_fn(out, sample_targets(task, out, gen))  # type: ignore[attr-defined]


class _Moment:
    """Streaming ``Σ z zᵀ`` of rows ``z [N, d]``: exact, or a Nyström sketch ``Σ z zᵀ Ω``."""

    def __init__(self, d: int, sketch: int, device: torch.device, dtype: torch.dtype,
                 seed: int) -> None:  # fmt: skip
        self.d, self.trace = d, 0.0
        self.omega = None
        if sketch:
            g = torch.Generator().manual_seed(seed)
            om = torch.linalg.qr(torch.randn(d, sketch, generator=g, dtype=torch.float64))[0]
            self.omega = om.to(device, dtype)
        self.sum = torch.zeros(d, sketch or d, device=device, dtype=dtype)

    def add(self, z: Tensor) -> None:
        z = z.to(self.sum.dtype)
        self.trace += float(z.pow(2).sum())
        self.sum.addmm_(z.T, z if self.omega is None else z @ self.omega)

    def factor(self, count: float, rank: int, dtype: torch.dtype) -> Factor:
        """Top ``min(d, rank)`` eigenpairs of ``Σ z zᵀ / count`` and the mean of the rest."""
        d, c = self.d, max(count, 1.0)
        if self.omega is None:
            vals, vecs = torch.linalg.eigh(self.sum / c)  # accumulation dtype: d³ work
            vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        else:
            vals, vecs = _nystrom(self.sum.double() / c, self.omega.double())
        k = min(d, rank, vals.numel())
        tail = (
            max(0.0, (self.trace / c - float(vals[:k].double().sum())) / (d - k)) if k < d else 0.0
        )
        return Factor(vals[:k].to(dtype), vecs[:, :k].to(dtype), tail, d)


def _nystrom(y: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Nyström approximation ``Y (ΩᵀY)⁺ Yᵀ`` of a PSD F from ``Y = F Ω``,
    stabilised by a shift ν (Tropp, Yurtsever, Udell, Cevher 2017, Alg. 3)."""
    nu = float(torch.finfo(y.dtype).eps * math.sqrt(y.shape[0]) * y.norm())
    yv = y + nu * omega
    b = omega.T @ yv
    vals, vecs = torch.linalg.eigh(0.5 * (b + b.T))
    keep = vals > vals.max().clamp_min(0) * 1e-12
    if not bool(keep.any()):
        return torch.zeros(omega.shape[1], dtype=y.dtype), torch.linalg.qr(omega)[0]
    e = yv @ (vecs[:, keep] / vals[keep].sqrt())  # E Eᵀ = Yv B⁺ Yvᵀ
    u, s, _ = torch.linalg.svd(e, full_matrices=False)
    return (s.pow(2) - nu).clamp_min(0), u


class _Layer:
    """Statistics of one factored layer during the build."""

    def __init__(self, i: int, spec: LayerSpec, mod: nn.Module, sketch: tuple[int, int],
                 device: torch.device, dtype: torch.dtype, seed: int) -> None:  # fmt: skip
        self.spec, self.mod, self.calls, self.positions = spec, mod, 0, 0
        self.sketch = any(sketch)
        emb = spec.kind == "embedding"
        self.a = None if emb else _Moment(spec.d_in, sketch[0], device, dtype, seed + 2 * i)
        self.counts = torch.zeros(spec.d_in, device=device, dtype=dtype) if emb else None
        self.g = _Moment(spec.d_out, sketch[1], device, dtype, seed + 2 * i + 1)
        self.factors: tuple[Factor, Factor] | None = None
        self.core: Tensor | None = None
        self.cur: Tensor | None = None  # this batch's per-example projected gradients
        self.per_example = not emb  # the eigenvalue correction applies

    def rows(self, inp: Tensor, out_grad: Tensor) -> tuple[Tensor, Tensor]:
        """One call's inputs ``[L, T, d_in]`` (bias column folded; embedding: ids ``[L, T]``)
        and output gradients ``[L, T, d_out]``, L the call's leading (example) dim."""
        s, m = self.spec, self.mod
        if s.kind == "conv2d":
            x, gy = (inp, out_grad) if inp.dim() == 4 else (inp[None], out_grad[None])
            pad = 0 if m.padding == "valid" else m.padding
            a = F.unfold(x, m.kernel_size, m.dilation, pad, m.stride).mT  # [L, patches, C·k·k]
            g = gy.reshape(*gy.shape[:2], -1).mT
        else:
            lead = inp.shape[0] if inp.dim() > 1 else 1
            a = (
                inp.reshape(lead, -1)
                if s.kind == "embedding"
                else inp.reshape(lead, -1, inp.shape[-1])
            )
            g = out_grad.reshape(lead, -1, s.d_out)
        if s.kind != "embedding":
            ones = a.new_ones(*a.shape[:2], 1)
            a = ones if s.weight is None else torch.cat([a, ones], -1) if s.bias else a
        return a, g

    def add(self, inp: Tensor, out_grad: Tensor, examples: int) -> None:
        """Pass 1: second moments. Pass 2 (``self.factors`` set): projected gradients."""
        a, g = self.rows(inp, out_grad)
        if self.factors is None:
            self.calls += 1
            g = g.reshape(-1, g.shape[-1])
            used = g.ne(0).any(-1)  # positions without a loss (masked, a causal LM's last)
            a = a.reshape(-1, *a.shape[2:])[used]
            self.positions += a.shape[0]
            if self.counts is not None:
                self.counts += torch.bincount(a, minlength=self.spec.d_in)
            else:
                assert self.a is not None
                self.a.add(a)
            self.g.add(g[used])
            return
        if not self.per_example or a.shape[0] != examples:
            self.per_example = False  # a call whose leading dim is not the examples
            return
        fa, fg = self.factors
        dt = fg.values.dtype
        assert fa.vectors is not None and fg.vectors is not None
        c = (g.to(dt) @ fg.vectors).mT @ (a.to(dt) @ fa.vectors)  # [B, k_G, k_A]
        self.cur = c if self.cur is None else self.cur + c

    def end_batch(self) -> None:
        if self.cur is not None and self.per_example:
            sq = self.cur.pow(2).sum(0)
            self.core = sq if self.core is None else self.core + sq
        self.cur = None

    def finish(self, examples: int, rank: int, dtype: torch.dtype) -> None:
        """Pass 1 -> the factors ``(A, G)`` (in ``dtype``)."""
        s = self.spec
        if self.counts is not None:
            pad = getattr(self.mod, "padding_idx", None)
            if pad is not None:
                self.counts[pad] = 0
            fa = Factor((self.counts / max(self.positions, 1)).to(dtype), None, 0.0, s.d_in)
        else:
            assert self.a is not None
            fa = self.a.factor(self.positions, rank, dtype)
        self.factors = (fa, self.g.factor(examples, rank, dtype))
        self.a = self.g = None  # type: ignore[assignment]


def build_kronecker_mass(
    model: FunctionalModel | nn.Module, task: Task, train: DataSource | Any, nbeta: float,
    gamma: float, num_batches: int = 8, batch_size: int = 32, *, rank: int = 128,
    budget_fraction: float | None = 0.1, budget_floor: int = 16 * 2**20,
    fisher: Literal["sampled", "empirical"] = "sampled", eigen_correction: bool = True,
    max_exact_dim: int = 4096, oversample: int = 16, seed: int = 0,
) -> tuple[KroneckerMass, dict[str, Any]]:  # fmt: skip
    """The K-FAC mass of the sampled parameters at w*, from ``num_batches`` fixed batches.

    Args:
        model: a :class:`FunctionalModel` (its ``w_star`` keys are the sampled parameters and
            their order the flat vector's) or an ``nn.Module`` (parameters with
            ``requires_grad=True`` are sampled). Run it in eval mode, as bif does.
        task: the per-example loss (and, for ``fisher='sampled'``, the predictive).
        train: a :class:`DataSource` or anything it accepts.
        nbeta, gamma: nβ and γ of the posterior (``mass._replace`` changes them for free).
        num_batches, batch_size: the examples used, a seeded subsample (all when fewer).
        rank: most eigenpairs kept per factor (a factor with d <= rank is kept whole).
        budget_fraction: lower the rank until the mass takes at most this fraction of the
            model's parameter and buffer bytes (None: no cap) or ``budget_floor`` bytes,
            whichever is more (a small model's whole factors are cheap in absolute terms).
        fisher: "sampled" targets (Gauss-Newton in expectation) or the "empirical" labels.
        eigen_correction: EK-FAC: a second pass for the Fisher's diagonal in the eigenbasis.
        max_exact_dim: larger factors are sketched instead of accumulated (d² memory).
        oversample: extra sketch columns.
        seed: subsample, targets and sketches.

    Returns:
        The mass and a cost/provenance dict for ``result.meta``.
    """
    t0 = time.perf_counter()
    fm = model if isinstance(model, FunctionalModel) else FunctionalModel(
        model, next(model.parameters()).device)  # fmt: skip
    w, dev = fm.w_star, fm.device
    dtype = next(iter(w.values())).dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    specs, reasons = plan_layers(fm.module, list(w))
    seen: dict[int, Tensor] = {id(t): t for t in [*fm.module.parameters(), *fm.module.buffers()]}
    replica = sum(t.nbytes for t in seen.values())
    size = torch.empty((), dtype=dtype).element_size()
    r = max(1, rank)
    if budget_fraction is not None:
        r = budget_rank(
            specs, r, eigen_correction, size, max(budget_fraction * replica, budget_floor)
        )
    data = train if isinstance(train, DataSource) else DataSource(train, "train", dev, dtype)
    n, total = len(data), num_batches * batch_size
    gperm = torch.Generator().manual_seed(seed)
    index = (
        torch.randperm(n, generator=gperm)[:total].sort().values if n > total else torch.arange(n)
    )
    sampled = fisher == "sampled" and can_sample(task)
    if fisher == "sampled" and not sampled:
        log.info("Kronecker mass: %s cannot be sampled from; empirical Fisher (true labels)",
                 type(task).__name__)  # fmt: skip
    mods = dict(fm.module.named_modules())
    sk = lambda d: min(d, r + oversample) if d > max_exact_dim and r < d else 0  # noqa: E731
    layers = [_Layer(i, s, mods[s.name], (0 if s.kind == "embedding" else sk(s.d_in), sk(s.d_out)),
                     dev, acc, seed * 100_003) for i, s in enumerate(specs)]  # fmt: skip
    records: list[tuple[int, Tensor, Tensor]] = []

    def hook(i: int, args: tuple, kw: dict, out: Tensor) -> None:
        records.append((i, args[0] if args else kw["input"], out))

    handles = [
        L.mod.register_forward_hook(lambda m, a, kw, o, i=i: hook(i, a, kw, o), with_kwargs=True)
        for i, L in enumerate(layers)
    ]
    examples = 0
    try:
        for stage in range(2 if eigen_correction else 1):
            for b, start in enumerate(range(0, len(index), batch_size)):
                batch = data.batch(index[start : start + batch_size])
                gen = torch.Generator(device=dev).manual_seed(seed + b)
                leaves = {k: v.detach().requires_grad_(True) for k, v in w.items()}
                records.clear()
                with torch.enable_grad():
                    losses = _losses(task, fm.model_fn(leaves), batch, sampled, gen)
                    live = [x for x in records if x[2].requires_grad]
                    grads = torch.autograd.grad(losses.sum(), [x[2] for x in live],
                                                allow_unused=True)  # fmt: skip
                examples += losses.shape[0] if stage == 0 else 0
                for (i, inp, out), g in zip(live, grads, strict=True):
                    layers[i].add(inp.detach(), torch.zeros_like(out) if g is None else g,
                                  losses.shape[0])  # fmt: skip
                for L in layers:
                    L.end_batch()
            if stage == 0:
                for L in layers:
                    if L.calls:
                        L.finish(examples, r, dtype)
                    for k in (L.spec.weight, L.spec.bias) if not L.calls else ():
                        if k is not None:
                            reasons[k] = "module never called in the forward pass"
    finally:
        for h in handles:
            h.remove()
        records.clear()
    layers = [L for L in layers if L.calls]
    offsets, o = {}, 0
    for k, v in w.items():
        offsets[k] = (o, o + v.numel())
        o += v.numel()
    blocks = []
    for L in layers:
        assert L.factors is not None
        core = L.core / examples if L.core is not None and L.per_example else None
        span = lambda k: None if k is None else offsets[k]  # noqa: E731
        blocks.append(KroneckerBlock(L.spec, span(L.spec.weight), span(L.spec.bias), *L.factors,
                                     None if core is None else core.to(dtype)))  # fmt: skip
    mass = KroneckerMass(float(nbeta), float(gamma), tuple(blocks), o, r)
    fallback = [k for k in w if k in reasons]
    if fallback:
        log.info("Kronecker mass: %d sampled tensors fall back to mass gamma*I: %s", len(fallback),
                 ", ".join(f"{k} ({reasons[k]})" for k in fallback))  # fmt: skip
    info = {
        "kind": "kronecker", "seconds": time.perf_counter() - t0,
        "batches": math.ceil(len(index) / batch_size), "examples": examples,
        "bytes": mass.memory_bytes(),
        "formula_bytes": size * sum(mass_floats([b.spec], r, b.core is not None) for b in blocks),
        "replica_bytes": replica, "rank": r, "requested_rank": rank,
        "fisher": "sampled" if sampled else "empirical",
        "eigen_correction": [b.spec.name for b in blocks if b.core is not None],
        "factored": [b.spec.name for b in blocks],
        "sketched": [L.spec.name for L in layers if L.sketch],
        "fallback": {k: reasons[k] for k in fallback},
        "factored_params": sum(b - a for bl in blocks for a, b in
                               filter(None, (bl.weight_span, bl.bias_span))),
    }  # fmt: skip
    return mass, info
