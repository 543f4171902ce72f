"""The sampling loop: the one imperative shell around the pure steps.

Chains are processed in groups: one group of all ``C`` chains vmapped together, or ``C`` groups
of one chain run one after another (memory of a single replica). Chain ``c`` draws its noise
and its minibatches from its own generators seeded by ``(seed, c)``, so both schedules, and any
number of chains, give chain ``c`` the same trajectory.

The loop only steps and hands each draw to :class:`Keeper` (blackjax's ``transform(state,
info)`` hook): everything else is a piece it calls, one file each —

- :class:`bif.sampler.work.Work`: gradients and evaluations, and how they are split over
  processes (one process, chain-parallel, data-parallel);
- :class:`bif.sampler.recorder.Recorder`: moments, batch-means blocks, traces, token stores;
- :class:`bif.sampler.checkpointer.Checkpointer`: what a checkpoint holds and when it is due;
- :class:`bif.sampler.divergence.Guard`: NaN and runaway checks, read every few steps;
- :class:`bif.sampler.adaptive.Stopper`: ``num_draws='auto'``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bif import distributed
from bif.config import AUTO_FIELDS, BIFConfig
from bif.data import DataSource
from bif.distributed import Partition
from bif.errors import ConfigError
from bif.estimator import Moments
from bif.functional import FunctionalModel, Params
from bif.mcse import Blocks
from bif.posterior import LocalPosterior
from bif.sampler import kinetic, rmsprop, sgld
from bif.sampler.adaptive import Stopper, checks_made
from bif.sampler.checkpointer import Checkpointer, Resume, unflatten_state
from bif.sampler.divergence import Guard
from bif.sampler.mass import Mass
from bif.sampler.recorder import Recorder, exchange_store
from bif.sampler.rng import ChainRandom
from bif.sampler.work import Work
from bif.task import Task
from bif.tokens import TokenTraces
from bif.tracestore import TraceStore

log = logging.getLogger(__name__)


@dataclass
class RunOutput:
    moments: Moments
    draw_loss: Tensor  # [C, D] mean attributed-train loss at each draw
    step_loss: Tensor  # [C, T] minibatch (or full-batch) mean loss at each sampler step
    query_trace: Tensor  # [C, D, Q] query observables at each draw
    resumed: bool
    tokens: TokenTraces | None = None  # per-token traces, for tasks with token_losses
    energy: Tensor | None = None  # [C, D] U(w) - U(w*) at each draw
    blocks: Blocks | None = None  # batch-means moments (bif.mcse), None if disabled
    train_trace: Tensor | None = None  # [C, D, S] train losses of the examples train_index
    train_index: Tensor | None = None  # [S] which training examples train_trace follows
    stop: dict[str, Any] | None = None  # num_draws='auto': why and when the run stopped


# The fused evaluation (a draw's training losses from the next step's gradient pass). False:
# the slow twin, a separate forward pass at each draw; the tests check both agree exactly.
FUSED = True

# Steps between host reads of the divergence checks and trace copies (bif.sampler.divergence.
# Guard). None: 1 on a CPU (a read costs nothing there), 16 on an accelerator (each read waits
# for the device). The tests run the deferred path on a CPU too and check it agrees exactly.
SYNC_EVERY: int | None = None


class DrawInfo(NamedTuple):
    """What the loop knows of a draw when it hands it to the :class:`Keeper`."""

    draw: int  # d, 0-based
    step: int  # the sampler step that made it
    resume_at: int  # the step a checkpoint taken here resumes at
    train: Tensor  # [G, N] every training example's loss
    train_tokens: Tensor | None  # [G, Kn] per-token training losses (token tasks)


def run_chains(
    fmodel: FunctionalModel,
    task: Task,
    train: DataSource,
    query: DataSource,
    cfg: BIFConfig,
    progress: bool = True,
    run_dir: Path | None = None,
    checkpoint_every: int = 50,
    identity: str = "",
    mass: Mass | None = None,
    saddle: tuple[Tensor, Tensor] | None = None,
    desc: str = "BIF sampling",
    partition: Partition | None = None,
) -> RunOutput:
    """Sample ``cfg.num_chains`` chains and stream their draws into per-chain moments.

    ``mass`` is the kinetic sampler's mass matrix and ``saddle`` the extra localisation along
    negatively curved directions (:func:`bif.auto.resolve_auto` builds both).
    With ``run_dir``, the state is saved every ``checkpoint_every`` draws and at the end of each
    chain group; a later call with the same config and model resumes from it.
    With a ``partition`` (:func:`bif.distributed.partition`) this process runs only its own
    chains, checkpoints them in its own file and, at the end, fetches the other processes'
    rows: every process returns the output of all chains.
    """
    unresolved = [k for k in AUTO_FIELDS if getattr(cfg, k) == "auto"]
    if unresolved:
        raise ConfigError(
            f"run_chains needs numeric {unresolved}; bif.attribute resolves 'auto' values."
        )
    device = fmodel.device
    C, D, T = cfg.num_chains, cfg.draws_capacity, cfg.steps_per_chain
    N, Q = len(train), len(query)
    part = partition or distributed.single(C)
    work = Work(fmodel, task, train, query, cfg, partition, FUSED)
    shard = work.shard
    groups = [part.chains] if cfg.vmap_chains else [[c] for c in part.chains]
    every = SYNC_EVERY if SYNC_EVERY is not None else (1 if device.type == "cpu" else 16)
    token_sizes = _token_sizes(work, cfg) if work.tokens else None

    w_star_1 = {k: v.unsqueeze(0) for k, v in fmodel.w_star.items()}
    grad_star = work.centre_gradient(w_star_1) if cfg.center_gradient else None
    if saddle is not None:
        ref = next(iter(fmodel.w_star.values()))
        saddle = (saddle[0].to(device, ref.dtype), saddle[1].to(device, ref.dtype))
    # A process of a chain-parallel run computes its group's products as if it held all C
    # chains (bif.sampler.mass.group_matmul): the single-process rounding, bit for bit.
    rows = C if part.distributed and cfg.vmap_chains else 0
    if mass is not None:
        mass = mass._replace(rows=rows)
    posterior = LocalPosterior(cfg.nbeta, cfg.gamma, fmodel.w_star, grad_star, saddle, rows)

    config_dict = cfg.to_dict()
    ckpt = Checkpointer(
        run_dir, config_dict, identity, part, shard is None or shard.rank == 0, checkpoint_every
    )  # fmt: skip
    stores = None
    if token_sizes is not None:
        pin = {"config": config_dict, "identity": identity}
        stores = tuple(
            TraceStore(
                (C, D, k), run_dir / f"{ckpt.token_stem}.{side}.f32" if run_dir and ckpt.writer
                else None, pin, buffer_draws=checkpoint_every,
            )
            for side, k in zip(("train", "query"), token_sizes, strict=True)
        )  # fmt: skip
    slots = block_slots(cfg, N, Q)
    first = cfg.check_every if cfg.adaptive else D  # blocks double as the run grows
    rec = Recorder(
        (C, D, T, N, Q), device, slots, -(-first // slots) if slots else 0,
        trace_index(N, cfg.trace_sample), stores, defer=every > 1,  # type: ignore[arg-type]
    )  # fmt: skip
    resume = ckpt.load(rec, broadcast=shard is not None)
    checked = checks_made(part, cfg, resume.done_groups, resume.active, resume.stop)
    stopper = Stopper(cfg, part, resume.stop, checked, part.distributed or shard is not None)
    energy_star = float(posterior.potential(w_star_1, work.train(w_star_1)[0].double().mean(1)))
    clock = _Clock(resume.seconds)

    bar = tqdm(
        total=len(groups) * T,
        disable=not progress or not distributed.is_main(),
        desc=desc,
        # In logs (no terminal) every redraw is a new chunk of text: redraw rarely there.
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
        unit="step",
        dynamic_ncols=True,
    )
    bar.update(len(resume.done_groups) * T)
    try:
        for gi, chains in enumerate(groups):
            if gi in resume.done_groups:
                continue
            rng = ChainRandom(cfg.seed, chains, device)
            state = _init_state(cfg, fmodel, len(chains))
            t0 = 0
            if resume.active is not None and resume.active["group"] == gi:
                t0 = resume.active["step"]
                state = unflatten_state(state, resume.saved, device)
                rng.restore(resume.saved)
                bar.update(t0)
            guard = Guard(chains, cfg, fmodel.num_params, every)
            keeper = Keeper(
                gi, chains, rng, work, posterior, energy_star, guard, rec, ckpt, resume,
                stopper, clock, bar, cfg,
            )  # fmt: skip
            _sample_group(state, t0, chains, work, rng, posterior, mass, guard, keeper, cfg)
            keeper.sync()  # a divergence anywhere in the group raises before it is saved
            resume.done_groups.append(gi)
            ckpt.save(rec, resume, clock(), stopper.stop)
    except BaseException as e:
        # Chain-parallel ranks meet only at check points, so a failing one can tell the others.
        # (Data-parallel ones meet at every step's all-reduce: there the launcher ends them.)
        if part.distributed:
            distributed.agree(e)
        raise
    finally:
        bar.close()
    resumed = resume.resumed
    rec.flush()
    if part.distributed:
        distributed.agree()
        rec.share([part.owner(r) for r in range(part.world)], distributed.exchange_rows)
        resumed = distributed.any_true(resumed)  # the run resumed if any rank did
    elif shard is not None and stores is not None and distributed.any_true(resumed):
        # Data-parallel: only rank 0 kept the draws made before the resume on disk.
        for store in stores:
            exchange_store(store, slice(0, C), 0, distributed.exchange_rows)
    stop = stopper.stop
    if cfg.adaptive:
        assert stop is not None
        rec.trim(stop["draws"], cfg.num_burnin + stop["draws"] * cfg.thin)
    traces = None
    if rec.token_train is not None and rec.token_query is not None:
        assert work.train_tokens is not None and work.query_tokens is not None
        traces = TokenTraces(rec.token_train, rec.token_query, work.train_tokens, work.query_tokens)
    return RunOutput(
        rec.moments, rec.draw_loss, rec.step_loss, rec.query_trace, resumed, traces, rec.energy,
        rec.blocks, rec.train_trace, rec.train_index, stop,
    )  # fmt: skip


def _sample_group(
    state: Any, t0: int, chains: list[int], work: Work, rng: ChainRandom,
    posterior: LocalPosterior, mass: Mass | None, guard: Guard, keeper: Keeper,
    cfg: BIFConfig,
) -> None:  # fmt: skip
    """Steps ``t0 .. T-1`` of one chain group, each draw handed to ``keeper`` (which may stop
    the run). Fused: the draw made by step ``t`` is handed over at step ``t + 1``, whose
    gradient pass evaluated its training losses; a checkpoint there resumes at ``t + 1``
    (before its update) with the draw recorded."""
    T = cfg.steps_per_chain
    pending: int | None = None  # fused: the draw the current state is, not yet handed over
    for t in range(t0, T):
        grads, loss, values = work.gradient(state.params, rng, len(chains))
        if pending is not None:
            assert values is not None
            if keeper(state, DrawInfo(pending, t - 1, t, *work.train_from(values))):
                return
            pending = None
        guard.step(loss, t)
        noise = rng.normal_like(state.params)
        pgrad = posterior.potential_grad(state.params, grads)
        state = _step(cfg, state, pgrad, grads, noise, mass)
        keeper.step(t, loss)
        k = t + 1 - cfg.num_burnin
        if k <= 0 or k % cfg.thin:
            continue
        d = k // cfg.thin - 1
        if work.fused and t + 1 < T:
            pending = d
            continue
        if keeper(state, DrawInfo(d, t, t + 1, *work.train(state.params))):
            return


class Keeper:
    """The loop's ``transform(state, info)``: what happens to each draw of one chain group.

    It evaluates the queries, checks the draw (:class:`Guard`), records it (:class:`Recorder`),
    asks the :class:`Stopper` and takes a checkpoint when one is due. ``__call__`` returns True
    when the run stops after this draw.
    """

    def __init__(
        self, group: int, chains: list[int], rng: ChainRandom, work: Work,
        posterior: LocalPosterior, energy_star: float, guard: Guard, rec: Recorder,
        ckpt: Checkpointer, resume: Resume, stopper: Stopper, clock: _Clock, bar: Any,
        cfg: BIFConfig,
    ) -> None:  # fmt: skip
        self.group, self.chains, self.rng, self.work = group, chains, rng, work
        self.posterior, self.energy_star, self.guard, self.rec = posterior, energy_star, guard, rec
        self.ckpt, self.resume, self.stopper, self.clock = ckpt, resume, stopper, clock
        self.bar, self.cfg = bar, cfg

    def step(self, t: int, loss: Tensor) -> None:
        """After sampler step ``t`` (its minibatch loss ``[G]``)."""
        self.rec.step(self.chains, t, loss)
        self.bar.update(1)
        if self.guard.due(t):
            self.sync()

    def sync(self) -> None:
        """Read the deferred checks (raises on a divergence) and copy the traces to the host."""
        self.guard.read()
        self.rec.flush()
        d = self.rec.last_draw
        if self.guard.every > 1 and d >= 0:
            self.bar.set_postfix(loss=f"{float(self.rec.draw_loss[self.chains, d].mean()):.4g}")

    def __call__(self, state: Any, info: DrawInfo) -> bool:
        d, a = info.draw, info.train
        b, b_tok = self.work.query(state.params)
        energy = self.posterior.potential(state.params, a.double().mean(1)) - self.energy_star
        self.guard.draw(a, b, energy, info.step)
        toks = (info.train_tokens, b_tok) if info.train_tokens is not None else None
        self.rec.draw(self.chains, d, a, b, energy, toks)  # type: ignore[arg-type]
        if self.guard.every == 1 and d % 10 == 0:
            self.bar.set_postfix(loss=f"{float(a.mean()):.4g}")
        if self.stopper.after(d, self.rec, self.clock(), self.sync):
            return True
        if self.ckpt.due(d):
            self.sync()
            active = {"group": self.group, "step": info.resume_at}
            self.ckpt.save(
                self.rec, self.resume, self.clock(), self.stopper.stop, active, state, self.rng
            )  # fmt: skip
        return False


class _Clock:
    """Sampling seconds of this run, counting those before a resume."""

    def __init__(self, before: float) -> None:
        self.before, self.started = before, time.monotonic()

    def __call__(self) -> float:
        return self.before + time.monotonic() - self.started


def _token_sizes(work: Work, cfg: BIFConfig) -> tuple[int, int]:
    """``(Kn, Kq)`` attributed train and query tokens, within ``cfg.max_token_trace_mb``."""
    assert work.train_tokens is not None and work.query_tokens is not None
    C, D = cfg.num_chains, cfg.draws_capacity
    kn, kq = len(work.train_tokens), len(work.query_tokens)
    mb = C * D * (kn + kq) * 4 / 2**20
    if mb > cfg.max_token_trace_mb:
        raise ConfigError(
            f"per-token traces of {kn} train + {kq} query tokens over {C}x{D} draws need "
            f"{mb:.0f} MB (max_token_trace_mb={cfg.max_token_trace_mb:g}); attribute fewer "
            "sequences or positions (loss_mask), take fewer draws, or raise the limit."
        )
    return kn, kq


def _init_state(cfg: BIFConfig, fmodel: FunctionalModel, num: int) -> Any:
    """The sampler state of ``num`` chains, all at ``w*``."""
    stacked = {k: v.unsqueeze(0).expand(num, *v.shape).clone() for k, v in fmodel.w_star.items()}
    init = {"sgld": sgld.init, "rmsprop": rmsprop.init, "kinetic": kinetic.init}[cfg.sampler]
    return init(stacked)


def _step(
    cfg: BIFConfig, state: Any, pgrad: Params, grads: Params, noise: Params,
    mass: Mass | None,
) -> Any:  # fmt: skip
    """One step of ``cfg.sampler`` from the posterior gradient ``pgrad`` (the loss gradient
    ``grads`` feeds RMSProp's preconditioner)."""
    if cfg.sampler == "sgld":
        return sgld.step(state, pgrad, noise, cfg.step_size)[0]
    if cfg.sampler == "kinetic":
        return kinetic.step(state, pgrad, noise, cfg.step_size, cfg.friction, mass)[0]
    return rmsprop.step(
        state, pgrad, grads, noise, cfg.step_size, cfg.rmsprop_alpha, cfg.rmsprop_eps
    )[0]


# Memory the batch-means blocks may take ([C, K, Q, N] float64); fewer slots beyond it.
MAX_BLOCK_BYTES = 2 * 2**30


def block_slots(cfg: BIFConfig, num_train: int, num_query: int) -> int:
    """Slots of the batch-means blocks: ``cfg.stderr_blocks``, halved (down to 2) while
    ``K · C · Q · N · 8`` bytes exceed :data:`MAX_BLOCK_BYTES`; 0 if even 2 slots would."""
    k = cfg.stderr_blocks
    per_slot = cfg.num_chains * num_query * num_train * 8
    while k >= 2 and k * per_slot > MAX_BLOCK_BYTES:
        k //= 2
        k -= k % 2
    if k < cfg.stderr_blocks:
        log.warning(
            "batch-means standard errors: %d of %d slots fit in %.0f MB (C·Q·N = %d); %s",
            k, cfg.stderr_blocks, MAX_BLOCK_BYTES / 2**20, per_slot // 8,
            "the reported errors are across-chain only" if k < 2 else "blocks are longer",
        )  # fmt: skip
    return k if k >= 2 else 0


def trace_index(num_train: int, sample: int) -> Tensor:
    """The training examples whose loss traces are kept for diagnostics: ``sample`` of them,
    evenly spaced over the data set (deterministic, so a resumed run keeps the same ones)."""
    if sample <= 0 or num_train == 0:
        return torch.zeros(0, dtype=torch.long)
    if sample >= num_train:
        return torch.arange(num_train)
    return torch.linspace(0, num_train - 1, sample).round().long().unique()
