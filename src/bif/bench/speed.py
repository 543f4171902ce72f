"""``bif bench speed``: the default ``bif.attribute`` run against the bare fused work of its maths.

For each setting (``digits``: the demo's MLP, ``mnist``: the MNIST MLP, ``tiny-lm``: the tiny
Shakespeare transformer of ``bif demo lm``) one process times

- the **run**: ``bif.attribute`` at the library's defaults (``tiny-lm``: the LM demo's pinned
  :data:`bif.demo_lm.DEMO_CONFIG`, as ``bif demo lm`` runs it). Its wall time is reported whole
  (``total``), as ``meta["sampling_seconds"]`` (curvature pass, pilot and sampling loop), and
  as the sampling loop alone (``sampling_only``: ``sampling_seconds`` minus the curvature pass's
  ``meta["preconditioner"]["seconds"]`` and the pilot's ``meta["preconditioner"]["pilot"]
  ["seconds"]``). The ratio uses ``sampling_only``. (After a pilot repair that re-ran the
  rules, the meta holds the re-run's curvature seconds, also inside the pilot's: the record's
  ``pilot_attempts`` > 1 flags that ``sampling_only`` is then approximate.)
- the **bare fused work** (:class:`BareTwin`): the same number of chains, sampler steps, draws,
  dtype and chunking, read from the run's resolved ``result.config`` afterwards, written
  directly with ``torch.func`` and independent of bif's loop: per step ONE vmapped-over-chains
  forward+backward of the per-sample training losses (full batch in chunks of ``chunk_size``,
  or a per-chain minibatch of ``batch_size``), whose per-sample losses are kept as the draw's
  training losses (fused: no second forward pass at a draw); at each draw the query forward and
  the float64 streaming sums the covariance needs (Σa, Σb, Σ b aᵀ per chain; token tasks: also
  the per-token losses into ``[C, D, K]`` buffers, as the result keeps them); the update is an
  SGLD-like tensor op on flat parameters, ``w ← w − ε(nβ(∇L − ∇L(w*)) + γ(w − w*)) + √(2ε)ξ``.
  A minibatch run cannot fuse: its draws add a full forward pass over the training set.
  Also timed: ``∇L(w*)`` once (the centred gradient, as the run computes it). The ε of the
  update is the SGLD rule ``0.5 / (nβ·λ_max + γ)`` at the run's nβ, γ and λ_max, so the twin
  stays near ``w*`` whatever sampler the run used (the figures of a diverging loop would time
  NaN arithmetic). A draw keeps the losses of the forward pass at the start of its step (the
  weights after the previous update): the same D draws, without an extra forward pass at the
  end. One untimed warm-up step comes first, as the run's curvature pass and pilot warm the
  same kernels before its loop.

``ratio = run sampling_only / bare``; the targets are ≤ 1.3 on every setting and ≤ 1.15 on
``mnist`` and ``tiny-lm``. With ``repeats > 1`` the two alternate (run, bare, bare, run, ...)
and the medians are compared.

Peak memory: each phase is wrapped in :class:`PhaseMemory`: the RSS high-water mark is reset on
entry (``/proc/self/clear_refs``, as :class:`bif.bench.memory.PeakMemory` does), so ``peak_rss``
is the peak while the phase ran, and ``rss_growth`` is that peak minus the RSS on entry (what
the phase itself added; the process-wide ``ru_maxrss`` cannot separate phases). Where the reset
is refused, a background thread samples ``/proc/self/statm`` every 5 ms instead. On CUDA,
``torch.cuda.max_memory_allocated`` over the phase is reported too.
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bif._version import __version__
from bif.bench.memory import PeakMemory
from bif.config import BIFConfig
from bif.errors import ConfigError, DataError

SPEED_SETTINGS = ("digits", "mnist", "tiny-lm")
TARGET_ALL = 1.3
TARGETS = {"digits": TARGET_ALL, "mnist": 1.15, "tiny-lm": 1.15}
# --quick: tiny sizes for tests and smoke checks (a run of a few steps, no pilot); the figures
# then measure fixed costs, not the loop. The run length overrides a setting's pinned values,
# the rules (a rank-4 mass instead of 64) only where the setting pins none.
QUICK_CONFIG: dict[str, Any] = dict(num_chains=2, num_draws=4, num_burnin=2, thin=1, pilot_steps=0)
QUICK_RULES: dict[str, Any] = dict(precondition_rank=4)
QUICK_TRAIN = {"digits": 64, "mnist": 64, "tiny-lm": 6}
QUICK_QUERY = {"digits": 8, "mnist": 8, "tiny-lm": 2}
SPEED_FILE = "speed.json"
TABLE_FILE = "speed.txt"


# --- workloads -----------------------------------------------------------------------------


@dataclass
class Workload:
    """What one setting attributes: a trained model, its data, the task and pinned settings.

    Attributes:
        train, query: ``(x, y)`` tensors, or (causal LM) :func:`bif.lm.encode` dicts.
        kind: "classification" or "causal-lm".
        pinned: BIFConfig fields the setting fixes (the LM demo's run length and rules).
        notes: what differs from the benchmark proper (printed and stored).
    """

    name: str
    model: nn.Module
    train: Any
    query: Any
    kind: str
    pinned: dict[str, Any]
    description: str
    notes: list[str] = field(default_factory=list)


def load_workload(name: str, quick: bool = False) -> Workload:
    """The model and data of setting ``name`` (trained or fine-tuned here; not timed).

    Raises:
        ConfigError: unknown name.
        DataError: the setting's data is not installed (the message says how to install it).
    """
    if name in ("digits", "mnist"):
        return _image_workload(name, quick)
    if name == "tiny-lm":
        return _lm_workload(quick)
    raise ConfigError(f"unknown speed setting {name!r}; choose from {', '.join(SPEED_SETTINGS)}.")


def _image_workload(name: str, quick: bool) -> Workload:
    from bif.bench import settings
    from bif.eval.retrain import train_reference

    s = settings.digits() if name == "digits" else settings.mnist()
    model = train_reference(s)  # the benchmark's reference model, full-batch AdamW, seconds
    n = QUICK_TRAIN[name] if quick else s.num_train
    q = QUICK_QUERY[name] if quick else s.num_query
    params = sum(p.numel() for p in model.parameters())
    notes = [f"--quick: first {n} training examples, {q} queries"] if quick else []
    return Workload(
        name, model, (s.x_train[:n], s.y_train[:n]), (s.x_query[:q], s.y_query[:q]),
        "classification", {}, f"{name} MLP ({params:,} parameters), {n} train, {q} queries",
        notes,
    )  # fmt: skip


def _lm_workload(quick: bool) -> Workload:
    try:
        from bif.bench.lm.finetune import DEFAULT_FINETUNE, finetune, finetune_passages
        from bif.bench.lm.tiny import load_tiny_lm
        from bif.demo_lm import DEMO_CONFIG, NUM_QUERIES, NUM_TRAIN, pick_queries
        from bif.lm.task import encode
    except ImportError as e:  # transformers is an optional dependency
        raise DataError(f"the tiny LM needs transformers ({e}): pip install 'bif[lm]'.") from e

    # The shipped pretrained model (bif/bench/lm/assets), fine-tuned as `bif demo lm` does it.
    tiny = load_tiny_lm(progress=False)
    tok = tiny.tokenizer
    notes = ["run config: the LM demo's DEMO_CONFIG (bif demo lm), not the library default"]
    if quick:
        # Passages stored with the model (no corpus tokenisation, no fine-tuning: seconds
        # saved; the centred gradient makes the pretrained weights stationary anyway).
        n, q = QUICK_TRAIN["tiny-lm"], QUICK_QUERY["tiny-lm"]
        pool = tiny.split.heldout
        model = tiny.model
        texts, queries = [p.text for p in pool[:n]], [p.text for p in pool[n : n + q]]
        notes.append(f"--quick: {n} held-out passages of the pretrained model (not fine-tuned), "
                     f"{q} queries")  # fmt: skip
    else:
        n, q = NUM_TRAIN, NUM_QUERIES
        fine, rest = finetune_passages(tiny, n)
        model = finetune(tiny.model, [tok(p.text)["input_ids"] for p in fine], DEFAULT_FINETUNE)
        texts, queries = [p.text for p in fine], [p.text for p in pick_queries(rest, q)]
    prompts = [t.partition("\n")[0] + "\n" for t in queries]  # the speaker: context only
    train = encode(tok, texts)
    query = encode(tok, queries, prompts=prompts)
    params = sum(p.numel() for p in model.parameters())
    return Workload(
        "tiny-lm", model, train, query, "causal-lm", dict(DEMO_CONFIG),
        f"tiny Shakespeare Llama ({params:,} parameters), {n} "
        f"{'held-out' if quick else 'Hamlet'} passages, {q} queries",
        notes,
    )  # fmt: skip


# --- memory --------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size of this process in MB (``/proc/self/statm``; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    import resource

    return pages * resource.getpagesize() / 2**20


class PhaseMemory:
    """``with PhaseMemory() as m: ...``: ``peak_rss_mb``, ``rss_growth_mb``, ``peak_cuda_mb``.

    The peak comes from the kernel's high-water mark, reset on entry (exact, no sampling cost
    during the timed phase); where the reset is refused a thread samples the RSS every 5 ms.
    """

    def __init__(self) -> None:
        self.start_rss_mb = math.nan
        self.peak_rss_mb = math.nan
        self.rss_growth_mb = math.nan
        self.peak_cuda_mb: float | None = None
        self.method = ""
        self._peak = PeakMemory()
        self._stop = threading.Event()
        self._sampled = 0.0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, rss_mb())

    def __enter__(self) -> PhaseMemory:
        self.start_rss_mb = rss_mb()
        self._peak.__enter__()
        if self._peak.exact:
            self.method = "VmHWM reset via /proc/self/clear_refs"
        else:
            self.method = "RSS sampled every 5 ms (/proc/self/statm)"
            self._sampled = self.start_rss_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._peak.__exit__(exc_type, exc, tb)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_rss_mb = max(self._sampled, rss_mb())
        else:
            self.peak_rss_mb = self._peak.peak_mb
        # The entry RSS is read just before the reset: a page freed in between must not make
        # the growth negative.
        self.rss_growth_mb = max(0.0, self.peak_rss_mb - self.start_rss_mb)
        self.peak_cuda_mb = self._peak.peak_cuda_mb

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_mb": self.peak_rss_mb,
            "rss_growth_mb": self.rss_growth_mb,
            "start_rss_mb": self.start_rss_mb,
            "peak_cuda_mb": self.peak_cuda_mb,
        }


# --- the bare fused work ------------------------------------------------------------------


def _chunks(data: Any, size: int, device: torch.device, dtype: torch.dtype) -> list[Any]:
    """``data`` ((x, y) or a dict of ``[N, ...]`` tensors) in consecutive chunks on ``device``."""

    def move(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() else t

    n = _length(data)
    if isinstance(data, dict):
        return [{k: move(v[s : s + size]) for k, v in data.items()} for s in range(0, n, size)]
    return [tuple(move(t[s : s + size]) for t in data) for s in range(0, n, size)]


def _length(data: Any) -> int:
    first = next(iter(data.values())) if isinstance(data, dict) else data[0]
    return int(first.shape[0])


def _rows(data: Any, idx: Tensor) -> Any:
    """Examples ``idx`` (any shape) of ``data``: ``[*idx.shape, ...]`` tensors."""
    if isinstance(data, dict):
        return {k: v[idx] for k, v in data.items()}
    return tuple(t[idx] for t in data)


def _token_mask(batch: dict[str, Tensor]) -> Tensor:
    """Attributed positions ``[B, S]``: real, inside ``loss_mask``, never position 0."""
    attn = batch["attention_mask"].bool()
    lm = batch.get("loss_mask")
    mask = attn if lm is None else attn & lm.bool()
    mask = mask.clone()
    mask[:, 0] = False
    return mask


class BareTwin:
    """The bare fused work of a run of ``cfg`` on ``model``, written directly with torch.func.

    Args:
        model: the module at ``w*`` (only read).
        train, query: ``(x, y)`` tensors, or causal-LM dicts (``input_ids``, ``attention_mask``,
            ``loss_mask``).
        kind: "classification" or "causal-lm".
        cfg: the run's resolved config (numeric nβ, γ); chains, steps, draws, thin, chunking,
            minibatch, vmap and forward dtype are taken from it.
        step: the SGLD ε of the update (see :func:`sgld_step`).
        device, dtype: where and in which dtype the weights live (the run's).
    """

    def __init__(
        self, model: nn.Module, train: Any, query: Any, kind: str, cfg: BIFConfig,
        step: float, device: torch.device | str, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.kind, self.cfg, self.step = kind, cfg, step
        self.device = torch.device(device)
        self.module = model
        named = dict(model.named_parameters())
        sampled = {k: p for k, p in named.items() if p.requires_grad}
        self.names = list(sampled)
        self.shapes = [p.shape for p in sampled.values()]
        self.sizes = [p.numel() for p in sampled.values()]
        self.w_star = torch.cat(
            [p.detach().to(self.device, dtype).reshape(-1) for p in sampled.values()]
        )
        fd = getattr(torch, cfg.forward_dtype) if cfg.forward_dtype is not None else None
        self.forward_dtype = fd

        def fixed(t: Tensor) -> Tensor:
            t = t.detach().to(self.device)
            return t.to(fd or dtype) if t.is_floating_point() else t

        self.fixed = {k: fixed(p) for k, p in named.items() if not p.requires_grad}
        self.fixed.update({k: fixed(b) for k, b in model.named_buffers()})
        self.num_train, self.num_query = _length(train), _length(query)
        # The whole set in one piece, only for a minibatch run's per-chain gathers.
        minibatch = cfg.batch_size is not None and cfg.batch_size < self.num_train
        self.train_data = (
            _chunks(train, self.num_train, self.device, dtype)[0] if minibatch else None
        )
        self.train_chunks = _chunks(train, cfg.chunk_size, self.device, dtype)
        self.query_chunks = _chunks(query, cfg.chunk_size, self.device, dtype)
        self.tokens = kind == "causal-lm"
        if self.tokens:
            self.train_masks = [_token_mask(b) for b in self.train_chunks]
            self.query_masks = [_token_mask(b) for b in self.query_chunks]
            self.train_tokens = int(sum(int(b["attention_mask"].sum()) for b in self.train_chunks))
            self.num_train_tokens = int(sum(int(m.sum()) for m in self.train_masks))
            self.num_query_tokens = int(sum(int(m.sum()) for m in self.query_masks))

    # -- the per-sample maths (one chain; vmapped over chains below) -------------------------

    def _params(self, flat: Tensor) -> dict[str, Tensor]:
        views = torch.split(flat, self.sizes)
        fd = self.forward_dtype
        out = {
            k: (v.to(fd) if fd is not None else v).view(s)
            for k, v, s in zip(self.names, views, self.shapes, strict=True)
        }
        return {**out, **self.fixed}

    def kept(self, flat: Tensor, batch: Any, trim: bool = True) -> Tensor:
        """What a draw keeps of one forward pass (one chain): per-sample losses ``[B]``
        (classification) or per-token losses ``[B, S]``, 0 where not attributed (causal LM).
        ``trim=False`` for a batch already trimmed outside vmap (a per-chain minibatch)."""
        params = self._params(flat)
        if not self.tokens:
            x, y = batch
            logits = functional_call(self.module, params, (x,))
            return F.cross_entropy(logits.float(), y, reduction="none")
        ids, attn = batch["input_ids"], batch["attention_mask"].bool()
        mask = _token_mask(batch)
        s = ids.shape[1]
        # Trim each batch to its longest real sequence (the batch is shared by all chains, so
        # this is a plain int under vmap): padding would otherwise cost as much as text.
        length = max(int(attn.sum(1).max()), 2) if trim else s
        ids_t = torch.where(attn, ids, torch.zeros_like(ids))[:, :length]
        kw = {"input_ids": ids_t, "attention_mask": attn[:, :length].long()}
        logits = functional_call(self.module, params, (), kw).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids_t[:, 1:], reduction="none")
        per_token = F.pad(nll, (1, s - length))
        return torch.where(mask, per_token, torch.zeros_like(per_token))

    def _sum_loss(
        self, flat: Tensor, batch: Any, scale: float, trim: bool = True
    ) -> tuple[Tensor, Tensor]:
        kept = self.kept(flat, batch, trim)
        values = kept.sum(-1) if self.tokens else kept
        return values.sum() * scale, kept

    def grad_fn(self, minibatch: bool) -> Callable[[Tensor, Any, float], tuple[Tensor, Tensor]]:
        """``(flat [G, P], batch, scale) -> (∇ scale·Σ losses [G, P], kept [G, B, ...])``."""
        g = grad(functools.partial(self._sum_loss, trim=not minibatch), has_aux=True)
        in_dims = (0, 0 if minibatch else None, None)
        if self.cfg.vmap_chains:
            return vmap(g, in_dims=in_dims, randomness="error")

        def looped(flat: Tensor, batch: Any, scale: float) -> tuple[Tensor, Tensor]:
            outs = [
                g(flat[c], batch if not minibatch else _rows_at(batch, c), scale)
                for c in range(flat.shape[0])
            ]
            return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

        return looped

    def forward_fn(self) -> Callable[[Tensor, Any], Tensor]:
        """``(flat [G, P], batch) -> kept [G, B, ...]`` without gradients."""
        if self.cfg.vmap_chains:
            return vmap(self.kept, in_dims=(0, None), randomness="error")
        return lambda flat, batch: torch.stack([self.kept(f, batch) for f in flat])

    def train_kept(self, flat: Tensor) -> Tensor:
        """``[G, N]`` per-sample training losses of the fused forward+backward at ``flat``
        (the values a draw keeps), for checking the twin against the library."""
        fn = self.grad_fn(minibatch=False)
        parts = [fn(flat, b, 1.0 / self.num_train)[1].detach() for b in self.train_chunks]
        values = [p.double().sum(-1) if self.tokens else p.double() for p in parts]
        return torch.cat(values, dim=1)

    def _minibatch(self, idx: Tensor) -> Any:
        """Per-chain minibatches ``[G, b, ...]`` of examples ``idx`` ``[G, b]``; a causal-LM
        batch is trimmed here, outside vmap, where its length is a plain number."""
        assert self.train_data is not None
        return _trimmed(_rows(self.train_data, idx))

    # -- the loop ------------------------------------------------------------------------------

    def run(self, warmup: bool = True) -> dict[str, Any]:
        """Run the bare loop of every chain group; returns its seconds and what it computed.

        One untimed warm-up step comes first (``warmup``): the run's curvature pass and pilot
        warm the same kernels before its own sampling loop starts.
        """
        cfg = self.cfg
        C = cfg.num_chains
        groups = [list(range(C))] if cfg.vmap_chains else [[c] for c in range(C)]
        if warmup:
            self._group(len(groups[0]), 1, 0, timed=False)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        outs = [self._group(len(g), cfg.steps_per_chain, cfg.draws_capacity) for g in groups]
        sync()
        seconds = time.perf_counter() - t0
        sums = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return {"seconds": seconds, **sums, "draws": int(sums["draws"][0])}

    def _group(self, G: int, T: int, D: int, timed: bool = True) -> dict[str, Tensor]:
        cfg = self.cfg
        N, Q = self.num_train, self.num_query
        minibatch = cfg.batch_size is not None and cfg.batch_size < N
        full_fn = self.grad_fn(minibatch=False)
        step_fn = self.grad_fn(minibatch=True) if minibatch else full_fn
        fwd = self.forward_fn()
        gen = torch.Generator(self.device).manual_seed(cfg.seed)
        w_star = self.w_star
        flat = w_star.unsqueeze(0).expand(G, -1).clone()
        dev = self.device
        f64 = torch.float64
        sum_a = torch.zeros(G, N, dtype=f64, device=dev)
        sum_b = torch.zeros(G, Q, dtype=f64, device=dev)
        sum_ba = torch.zeros(G, Q, N, dtype=f64, device=dev)
        tok_a = tok_b = None
        draws = torch.zeros(1, dtype=torch.long)
        if self.tokens:
            tok_a = torch.zeros(G, D, self.num_train_tokens, dtype=torch.float32, device=dev)
            tok_b = torch.zeros(G, D, self.num_query_tokens, dtype=torch.float32, device=dev)

        def full_batch(params: Tensor, keep: bool) -> tuple[Tensor, list[Tensor]]:
            total: Tensor | None = None
            kept: list[Tensor] = []
            for b in self.train_chunks:
                g, k = full_fn(params, b, 1.0 / N)
                total = g if total is None else total + g
                if keep:
                    kept.append(k.detach())
            assert total is not None
            return total, kept

        g_star = torch.zeros_like(flat[:1])
        if cfg.center_gradient:  # ∇L_n(w*) once: the centred potential makes w* stationary
            g_star = full_batch(w_star.unsqueeze(0), keep=False)[0]
        assert not isinstance(cfg.nbeta, str) and not isinstance(cfg.gamma, str)
        nbeta, gamma, eps = float(cfg.nbeta), float(cfg.gamma), self.step
        noise = math.sqrt(2 * eps)
        burn, thin = cfg.num_burnin, cfg.thin
        for t in range(T):
            k = t + 1 - burn
            # The draw keeps the losses at the weights this step's forward pass ran at (the
            # state after the previous update): the same D draws, no extra forward pass.
            draw = timed and k > 0 and k % thin == 0
            d = k // thin - 1
            if minibatch:
                assert cfg.batch_size is not None
                idx = torch.randint(N, (G, cfg.batch_size), generator=gen, device=dev)
                grads, _ = step_fn(flat, self._minibatch(idx), 1.0 / cfg.batch_size)
                kept = [fwd(flat, b) for b in self.train_chunks] if draw else []
            else:
                grads, kept = full_batch(flat, keep=draw)
            if draw or not timed:
                qk = [fwd(flat, b) for b in self.query_chunks]
                if self.tokens:
                    a = torch.cat([x.double().sum(-1) for x in kept], dim=1) if kept else None
                    b_ = torch.cat([x.double().sum(-1) for x in qk], dim=1)
                else:
                    a = torch.cat(kept, dim=1).double() if kept else None
                    b_ = torch.cat(qk, dim=1).double()
                if a is not None:
                    draws += 1
                    sum_a += a
                    sum_b += b_
                    sum_ba.baddbmm_(b_.unsqueeze(2), a.unsqueeze(1))
                    if tok_a is not None and tok_b is not None:
                        tok_a[:, d] = torch.cat(
                            [x[:, m] for x, m in zip(kept, self.train_masks, strict=True)], 1
                        )
                        tok_b[:, d] = torch.cat(
                            [x[:, m] for x, m in zip(qk, self.query_masks, strict=True)], 1
                        )
            pgrad = nbeta * (grads - g_star) + gamma * (flat - w_star)
            xi = torch.randn(flat.shape, generator=gen, device=dev, dtype=flat.dtype)
            flat = flat - eps * pgrad + noise * xi
        return {"sum_a": sum_a, "sum_b": sum_b, "sum_ba": sum_ba, "draws": draws.expand(G)}


def _trimmed(batch: Any) -> Any:
    """A causal-LM batch cut to its longest real sequence (at least 2 positions)."""
    if not isinstance(batch, dict):
        return batch
    length = max(int(batch["attention_mask"].sum(-1).max()), 2)
    return {k: v[..., :length] for k, v in batch.items()}


def _rows_at(batch: Any, c: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[c] for k, v in batch.items()}
    return tuple(t[c] for t in batch)


def sgld_step(cfg: BIFConfig, lambda_max: float | None) -> float:
    """The bare update's ε: the SGLD rule ``0.5 / (nβ·λ_max + γ)`` at the run's nβ and γ (stable
    whatever sampler the run used), else the run's step (squared and halved for the kinetic
    time step h, the overdamped limit of BAOAB)."""
    assert not isinstance(cfg.nbeta, str) and not isinstance(cfg.gamma, str)
    if lambda_max is not None and math.isfinite(lambda_max) and lambda_max > 0:
        return 0.5 / (cfg.nbeta * lambda_max + cfg.gamma)
    assert not isinstance(cfg.step_size, str)
    return cfg.step_size**2 / 2 if cfg.sampler == "kinetic" else cfg.step_size


# --- measuring one setting -------------------------------------------------------------------


def prep_seconds(meta: dict[str, Any]) -> float:
    """Seconds of ``meta["sampling_seconds"]`` spent before the loop: the curvature pass and
    the pilot (0 for what the meta does not record)."""
    pre = meta.get("preconditioner") or {}
    pilot = pre.get("pilot") or {}
    return float(pre.get("seconds") or 0.0) + float(pilot.get("seconds") or 0.0)


def _run_once(w: Workload, options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import bif

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    task: Any = "classification"
    if w.kind == "causal-lm":
        from bif.lm.task import CausalLMTask

        task = CausalLMTask()
    with warnings.catch_warnings(record=True) as caught, PhaseMemory() as mem:
        warnings.simplefilter("always")
        sync()
        t0 = time.perf_counter()
        result = bif.attribute(w.model, w.train, w.query, task=task, device=device,
                               progress=False, **options)  # fmt: skip
        sync()
        total = time.perf_counter() - t0
    sampling = float(result.meta.get("sampling_seconds", math.nan))
    prep = prep_seconds(result.meta)
    return {
        "result": result,
        "total_seconds": total,
        "sampling_seconds": sampling,
        "prep_seconds": prep,
        "sampling_only_seconds": max(sampling - prep, 0.0),
        "memory": mem,
        "warnings": sorted({str(c.message).splitlines()[0][:200] for c in caught}),
    }


def _bare_once(twin: BareTwin) -> dict[str, Any]:
    with PhaseMemory() as mem:
        out = twin.run()
    return {"seconds": out["seconds"], "memory": mem}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def measure_setting(
    w: Workload, options: dict[str, Any], device: torch.device, repeats: int = 1,
    on_phase: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Time the run and its bare twin ``repeats`` times each, alternating the order.

    Returns the setting's JSON record (see :func:`run_speed` for the keys).
    """
    runs: list[dict[str, Any]] = []
    bares: list[dict[str, Any]] = []
    twin: BareTwin | None = None
    lam: float | None = None

    def do_run() -> None:
        runs.append(_run_once(w, options, device))
        if on_phase is not None:
            on_phase("run", runs[-1]["sampling_only_seconds"])

    def do_bare() -> None:
        assert twin is not None
        bares.append(_bare_once(twin))
        if on_phase is not None:
            on_phase("bare", bares[-1]["seconds"])

    for r in range(repeats):
        # The bare twin needs the run's resolved config, so the first run goes first; later
        # repeats alternate so that neither phase always runs on the warmer caches.
        order = ("run", "bare") if r % 2 == 0 else ("bare", "run")
        for phase in order:
            if phase == "run":
                do_run()
                if twin is None:
                    result = runs[0]["result"]
                    cfg = result.config
                    lam = result.meta.get("lambda_max")
                    wdtype = next(w.model.parameters()).dtype
                    twin = BareTwin(w.model, w.train, w.query, w.kind, cfg, sgld_step(cfg, lam),
                                    device, wdtype)  # fmt: skip
            else:
                do_bare()
    assert twin is not None
    result = runs[0]["result"]
    cfg: BIFConfig = result.config
    run_s = [r["sampling_only_seconds"] for r in runs]
    bare_s = [b["seconds"] for b in bares]
    ratio = _median(run_s) / _median(bare_s) if bare_s and _median(bare_s) > 0 else math.nan
    target = TARGETS.get(w.name, TARGET_ALL)
    steps = cfg.steps_per_chain
    tokens = None
    if twin.tokens:
        # Real (non-padding) training tokens through a forward+backward pass per step, per chain.
        per = steps * twin.train_tokens
        tokens = {
            "train_tokens_per_step": twin.train_tokens,
            "run": per / _median(run_s) if _median(run_s) > 0 else math.nan,
            "bare": per / _median(bare_s) if _median(bare_s) > 0 else math.nan,
        }
    mem_run, mem_bare = runs[0]["memory"], bares[0]["memory"]
    return {
        "status": "ok",
        "description": w.description,
        "notes": w.notes,
        "num_train": twin.num_train,
        "num_query": twin.num_query,
        "num_params": int(twin.w_star.numel()),
        "config": cfg.to_dict(),
        "schedule": {
            "num_chains": cfg.num_chains,
            "steps_per_chain": steps,
            "num_draws": cfg.draws_capacity,
            "num_burnin": cfg.num_burnin,
            "thin": cfg.thin,
            "chunk_size": cfg.chunk_size,
            "batch_size": cfg.batch_size,
            "vmap_chains": cfg.vmap_chains,
            "dtype": str(twin.w_star.dtype).removeprefix("torch."),
            "forward_dtype": cfg.forward_dtype,
            "sampler": cfg.sampler,
            "bare_step": twin.step,
        },
        "run": {
            "total_seconds": [r["total_seconds"] for r in runs],
            "sampling_seconds": [r["sampling_seconds"] for r in runs],
            "prep_seconds": [r["prep_seconds"] for r in runs],
            "sampling_only_seconds": run_s,
            "median_sampling_only_seconds": _median(run_s),
            "memory": mem_run.as_dict(),
            "pilot_attempts": len(
                ((result.meta.get("preconditioner") or {}).get("pilot") or {}).get("attempts", [])
            ),
            "warnings": runs[0]["warnings"],
            "diagnostics_verdict": getattr(result.diagnostics, "verdict", None),
        },
        "bare": {
            "seconds": bare_s,
            "median_seconds": _median(bare_s),
            "memory": mem_bare.as_dict(),
        },
        "ratio": ratio,
        "target": target,
        "ok": bool(ratio <= target),
        "tokens_per_second_per_chain": tokens,
        "memory_method": mem_run.method,
    }


# --- the command -----------------------------------------------------------------------------


def parse_settings(text: str | None) -> tuple[str, ...]:
    """``None`` or "all": every speed setting; else a comma-separated subset."""
    if text is None or text == "all":
        return SPEED_SETTINGS
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SPEED_SETTINGS]
    if unknown or not names:
        raise ConfigError(
            f"unknown speed setting(s) {unknown or text!r}; choose from "
            f"{', '.join(SPEED_SETTINGS)}."
        )
    return names


def run_speed(
    names: tuple[str, ...],
    out_dir: Path,
    options: dict[str, Any] | None = None,
    *,
    quick: bool = False,
    repeats: int = 1,
    threads: int = 1,
    device: str | torch.device | None = None,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every setting of ``names``; write ``out_dir/speed.json`` and ``speed.txt``.

    Args:
        names: settings among :data:`SPEED_SETTINGS`.
        options: BIFConfig fields overriding the run's defaults (and the setting's pinned ones).
        quick: tiny sizes (:data:`QUICK_CONFIG`, few examples): a smoke check, not a figure.
        repeats: run and bare each this many times, alternating the order.
        threads: ``torch.set_num_threads`` for the whole measurement.
        device: where to sample (default: CUDA if available, else the CPU).
        on_event: receives one line per step of progress (the CLI prints them).

    Returns:
        The JSON document: ``bif_version``, ``torch_version``, ``python_version``, ``device``,
        ``threads``, ``quick``, ``repeats``, ``targets``, ``ratio_definition``,
        ``memory_definition``, ``settings`` (name -> record: ``status`` "ok" or "skipped"
        with ``reason``; for "ok" ``description``, ``notes``, ``num_train``, ``num_query``,
        ``num_params``, ``config``, ``schedule``, ``run``, ``bare``, ``ratio``, ``target``,
        ``ok``, ``tokens_per_second_per_chain``, ``memory_method``) and ``table``.
    """
    import json

    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}.")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}.")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = on_event or (lambda _: None)
    torch.set_num_threads(threads)
    records: dict[str, Any] = {}
    for name in names:
        try:
            w = load_workload(name, quick)
        except DataError as e:
            records[name] = {"status": "skipped", "reason": str(e)}
            say(f"{name}: skipped: {e}")
            continue
        quick_run, quick_rules = (QUICK_CONFIG, QUICK_RULES) if quick else ({}, {})
        opts = {**quick_rules, **w.pinned, **quick_run, **(options or {})}
        say(f"{name}: {w.description}")

        def phase(kind: str, seconds: float, name: str = name) -> None:
            say(f"  {name} {kind}: {seconds:.2f} s")

        records[name] = measure_setting(w, opts, dev, repeats, phase)
    doc: dict[str, Any] = {
        "bif_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(dev),
        "threads": threads,
        "quick": quick,
        "repeats": repeats,
        "targets": {"all": TARGET_ALL, **TARGETS},
        "ratio_definition": "run sampling-only seconds (meta sampling_seconds minus the "
        "curvature pass and pilot) / bare fused work seconds, medians over repeats",
        "memory_definition": "per phase: peak RSS while it ran (high-water mark reset on "
        "entry) and its growth over the RSS on entry; CUDA: max_memory_allocated",
        "settings": records,
    }
    doc["table"] = format_table(doc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEED_FILE).write_text(json.dumps(_jsonable(doc), indent=1))
    (out_dir / TABLE_FILE).write_text(doc["table"] + "\n")
    return doc


def _jsonable(x: Any) -> Any:
    """NaN/inf as None (strict JSON), tuples as lists."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def format_table(doc: dict[str, Any]) -> str:
    """The speed table as text (one row per setting, then the notes)."""
    head = (
        f"{'setting':<8} {'chains':>6} {'steps':>6} {'draws':>6} {'total s':>8} "
        f"{'sampling s':>10} {'bare s':>8} {'ratio':>6} {'target':>7} {'':<4} "
        f"{'tok/s/chain run|bare':>21} {'RSS+ MB run|bare':>17}"
    )
    lines = [head]
    notes: list[str] = []
    for name, r in doc["settings"].items():
        if r["status"] != "ok":
            lines.append(f"{name:<8} skipped: {r['reason']}")
            continue
        s, run, bare = r["schedule"], r["run"], r["bare"]
        tok = r["tokens_per_second_per_chain"]
        tok_txt = f"{tok['run']:.0f} | {tok['bare']:.0f}" if tok else "-"
        mem = f"{run['memory']['rss_growth_mb']:.0f} | {bare['memory']['rss_growth_mb']:.0f}"
        verdict = "ok" if r["ok"] else "over"
        lines.append(
            f"{name:<8} {s['num_chains']:>6} {s['steps_per_chain']:>6} {s['num_draws']:>6} "
            f"{_median(run['total_seconds']):8.2f} {run['median_sampling_only_seconds']:10.2f} "
            f"{bare['median_seconds']:8.2f} {r['ratio']:6.2f} {'≤ ' + str(r['target']):>7} "
            f"{verdict:<4} {tok_txt:>21} {mem:>17}"
        )
        cuda = run["memory"]["peak_cuda_mb"]
        if cuda is not None:
            notes.append(f"{name}: peak CUDA MB run {cuda:.0f}, bare "
                         f"{bare['memory']['peak_cuda_mb']:.0f}")  # fmt: skip
        notes += [f"{name}: {n}" for n in r["notes"]]
    lines.append(
        "ratio = run sampling-only time (sampling_seconds minus curvature pass and pilot) / "
        "bare fused work; 'total s' is the whole bif.attribute call."
    )
    lines.append(
        "RSS+ = peak resident set while the phase ran minus the RSS on entry; tok/s/chain = "
        "real training tokens through forward+backward per second per chain."
    )
    if doc.get("quick"):
        lines.append("--quick: tiny sizes, the figures measure fixed costs, not the loop.")
    return "\n".join(lines + notes)
