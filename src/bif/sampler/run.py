"""The sampling loop: the one imperative shell around the pure steps.

Chains are processed in groups: one group of all ``C`` chains vmapped together, or ``C`` groups
of one chain run one after another (memory of a single replica). Chain ``c`` draws its noise
and its minibatches from its own generators seeded by ``(seed, c)``, so both schedules, and any
number of chains, give chain ``c`` the same trajectory.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bif import checkpoint, distributed, stopping
from bif.config import AUTO_FIELDS, BIFConfig
from bif.data import DataSource, stack_chain_batches
from bif.distributed import Partition, Shard
from bif.errors import ConfigError
from bif.estimator import Moments
from bif.functional import (
    FunctionalModel,
    Params,
    mean_loss_and_grad,
    mean_loss_grad_and_losses,
    per_chain,
)
from bif.lm.task import CausalLMTask, is_token_task
from bif.mcse import Blocks
from bif.observables import Evaluator, query_observables, train_losses
from bif.posterior import LocalPosterior
from bif.sampler import divergence, kinetic, rmsprop, sgld
from bif.sampler.mass import LowRankMass
from bif.sampler.recorder import Recorder, exchange_store
from bif.sampler.rng import ChainRandom
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

# What an adaptive check needs of every chain (the token traces stay where they are).
_CHECK_TENSORS = ("moments.", "blocks.", "draw_loss", "query_trace")


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
    mass: LowRankMass | None = None,
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
    # parallel='data': every process runs every chain on its own slice of the training set.
    shard = distributed.shard(N) if partition is not None and cfg.parallel == "data" else None
    vm = cfg.vmap_chains
    groups = [part.chains] if vm else [[c] for c in part.chains]
    tokens = is_token_task(task)
    local = train.slice(shard.start, shard.stop) if shard is not None else train
    eval_train = Evaluator(fmodel, task, local, train_losses, cfg.chunk_size, vm, tokens)
    eval_query = Evaluator(fmodel, task, query, query_observables, cfg.chunk_size, vm, tokens)
    train_tokens, token_widths = _train_token_index(eval_train, shard) if tokens else (None, [])

    def gathered(a: Tensor, a_tok: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """This process's slice's losses -> every training example's (data-parallel)."""
        if shard is not None:
            a = distributed.gather_columns(a, shard.sizes)
            if a_tok is not None:
                a_tok = distributed.gather_columns(a_tok, token_widths)
        return a, a_tok

    def evaluate_train(params: Params) -> tuple[Tensor, Tensor | None]:
        """Every training example's loss [G, N] (and token losses [G, Kn]) at ``params``."""
        return gathered(*eval_train.evaluate(params))

    def full_grad(
        fn: Any, params: Params, keep: bool = False
    ) -> tuple[Params, Tensor, list[Tensor] | None]:
        """∇L_n over the whole training set: this process's slice, summed over processes;
        with ``keep`` (a fused ``fn``) also the per-chunk values of its forward passes."""
        g, loss, values = _full_batch_grad(fn, params, eval_train.chunks(), N, keep)
        if shard is None:
            return g, loss, values
        *vals, loss = distributed.sum_over_ranks([*g.values(), loss])
        return dict(zip(g, vals, strict=True)), loss, values

    def train_values(values: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """What :func:`evaluate_train` returns, from a fused gradient pass's values."""
        return gathered(*eval_train.assemble(values))

    token_sizes = None
    if tokens:
        assert train_tokens is not None
        kn, kq = len(train_tokens), len(eval_query.token_index)
        mb = C * D * (kn + kq) * 4 / 2**20
        if mb > cfg.max_token_trace_mb:
            raise ConfigError(
                f"per-token traces of {kn} train + {kq} query tokens over {C}x{D} draws need "
                f"{mb:.0f} MB (max_token_trace_mb={cfg.max_token_trace_mb:g}); attribute fewer "
                "sequences or positions (loss_mask), take fewer draws, or raise the limit."
            )
        token_sizes = (kn, kq)
    w_star_1 = {k: v.unsqueeze(0) for k, v in fmodel.w_star.items()}
    grad_star = None
    if cfg.center_gradient:
        # ∇L_n(w*) over the full attributed set, once (chain dim 1 broadcasts over chains).
        full_fn = per_chain(mean_loss_and_grad(fmodel, task.loss), vm, batch_in_dim=None)
        grad_star, _, _ = full_grad(full_fn, w_star_1)
        grad_star = {k: v.detach() for k, v in grad_star.items()}
    if saddle is not None:
        ref = next(iter(fmodel.w_star.values()))
        saddle = (saddle[0].to(device, ref.dtype), saddle[1].to(device, ref.dtype))
    # A process of a chain-parallel run computes its group's products as if it held all C
    # chains (bif.sampler.mass.group_matmul): the single-process rounding, bit for bit.
    rows = C if part.distributed and vm else 0
    if mass is not None:
        mass = mass._replace(rows=rows)
    posterior = LocalPosterior(cfg.nbeta, cfg.gamma, fmodel.w_star, grad_star, saddle, rows)
    energy_star = float(posterior.potential(w_star_1, evaluate_train(w_star_1)[0].double().mean(1)))
    full_batch = cfg.batch_size is None or cfg.batch_size >= N
    # Fused: a full-batch gradient pass already evaluates every training loss, so the draw's
    # losses are taken from the next step's pass instead of a second forward at the draw.
    fused = FUSED and full_batch and (not tokens or type(task).loss is CausalLMTask.loss)
    if fused:
        one = mean_loss_grad_and_losses(
            fmodel, task.token_losses if tokens else task.loss,  # type: ignore[attr-defined]
            (lambda t: t.sum(-1)) if tokens else None,
        )  # fmt: skip
    else:
        one = mean_loss_and_grad(fmodel, task.loss)
    grad_fn = per_chain(one, vm, batch_in_dim=None if full_batch else 0)

    slots = block_slots(cfg, N, Q)
    first = cfg.check_every if cfg.adaptive else D  # blocks double as the run grows
    config_dict = cfg.to_dict()
    owners = [part.owner(r) for r in range(part.world)]
    names = [checkpoint.state_file((o.start, o.stop)) for o in owners]
    state_name = names[part.rank] if part.distributed else checkpoint.STATE_FILE
    siblings = tuple(n for r, n in enumerate(names) if part.distributed and r != part.rank)
    # Data-parallel processes hold the same state: rank 0 writes it, and reads it for all.
    writer = shard is None or shard.rank == 0
    stores = None
    if token_sizes is not None:
        pin = {"config": config_dict, "identity": identity}
        stem = state_name.removesuffix(".safetensors").replace("state", "tokens", 1)
        stores = tuple(
            TraceStore(
                (C, D, k), run_dir / f"{stem}.{side}.f32" if run_dir and writer else None, pin,
                buffer_draws=checkpoint_every,
            )
            for side, k in zip(("train", "query"), token_sizes, strict=True)
        )  # fmt: skip
    rec = Recorder(
        (C, D, T, N, Q), device, slots, -(-first // slots) if slots else 0,
        trace_index(N, cfg.trace_sample), stores,  # type: ignore[arg-type]
    )  # fmt: skip
    done_groups: list[int] = []
    stop: dict[str, Any] | None = None
    seconds_before = 0.0  # sampling time of the processes before a resume
    resume_group: dict[str, Any] | None = None
    saved: dict[str, Tensor] = {}
    if run_dir is not None:
        loaded = None
        if writer:
            loaded = checkpoint.load(run_dir, config_dict, identity, state_name, siblings)
        if shard is not None:
            loaded = distributed.broadcast(loaded)
        if loaded is not None:
            saved, meta = loaded
            rec.load(saved, part.rows)
            done_groups = meta["done_groups"]
            resume_group = meta.get("active")
            stop = meta.get("stop")
            seconds_before = float(meta.get("seconds", 0.0))
            log.info("resuming from %s: %d chain group(s) done", run_dir, len(done_groups))
    resumed = bool(saved)
    checked = _checks_made(part, cfg, done_groups, resume_group, stop, D)
    if part.distributed and cfg.adaptive:
        # A stop that any rank recorded holds for all (it was decided on rank 0 for every one).
        stop = distributed.first_not_none(stop)
    started = time.monotonic()

    def elapsed() -> float:
        return seconds_before + time.monotonic() - started

    def save(active: dict[str, Any] | None, extra: dict[str, Tensor]) -> None:
        if run_dir is None or not writer:
            return
        meta = {
            "config": config_dict,
            "identity": identity,
            "done_groups": done_groups,
            "active": active,
            "stop": stop,
            "seconds": elapsed(),
        }
        checkpoint.save(run_dir, {**rec.state(part.rows), **extra}, meta, state_name)

    bar = tqdm(
        total=len(groups) * T,
        disable=not progress or not distributed.is_main(),
        desc=desc,
        # In logs (no terminal) every redraw is a new chunk of text: redraw rarely there.
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
        unit="step",
        dynamic_ncols=True,
    )
    bar.update(len(done_groups) * T)
    try:
        for gi, chains in enumerate(groups):
            if gi in done_groups:
                continue
            idx = torch.tensor(chains, device=device)
            rng = ChainRandom(cfg.seed, chains, device)
            state = _init_state(cfg, fmodel, len(chains))
            t0 = 0
            if resume_group is not None and resume_group["group"] == gi:
                t0 = resume_group["step"]
                state = _unflatten_state(state, saved, device)
                rng.restore(saved)
                bar.update(t0)

            def snapshot(step: int, state: Any, rng: ChainRandom = rng, gi: int = gi) -> None:
                save({"group": gi, "step": step}, {**_flatten_state(state), **rng.states()})

            last_save = time.monotonic()

            def record(
                d: int, t: int, a: Tensor, a_tok: Tensor | None, state: Any, resume_at: int,
                idx: Tensor = idx, chains: list[int] = chains, snapshot: Any = snapshot,
            ) -> bool:  # fmt: skip
                """Draw ``d`` (made by step ``t``) at ``state``: check and record it, maybe
                checkpoint (resuming at step ``resume_at``); True if the run stops here."""
                nonlocal stop, last_save
                b, b_tok = eval_query.evaluate(state.params)
                energy = posterior.potential(state.params, a.double().mean(1)) - energy_star
                divergence.check_draw(chains, a, b, energy, t, cfg, fmodel.num_params)
                toks = (a_tok, b_tok) if a_tok is not None and b_tok is not None else None
                rec.draw(idx, chains, d, a, b, energy, toks)
                if d % 10 == 0:
                    bar.set_postfix(loss=f"{float(a.mean()):.4g}")
                if cfg.adaptive and stop is not None:  # recorded before a resume
                    if d + 1 >= stop["draws"]:
                        return True
                elif cfg.adaptive and ((d + 1) % cfg.check_every == 0 or d + 1 == D):
                    if d + 1 > checked:
                        stop = _check_all(rec, part, owners, d + 1, cfg, elapsed(), shard)
                    if stop is not None:
                        return True
                if run_dir is not None and (
                    (d + 1) % checkpoint_every == 0 or time.monotonic() - last_save > 60
                ):
                    snapshot(resume_at, state)
                    last_save = time.monotonic()
                return False

            pending: int | None = None  # fused: the draw the current state is, unrecorded
            for t in range(t0, T):
                if full_batch:
                    grads, loss, values = full_grad(grad_fn, state.params, keep=fused)
                else:
                    grads, loss = _minibatch_grad(
                        grad_fn, state.params, train, rng.indices(N, cfg.batch_size),
                        len(chains), shard,
                    )  # fmt: skip
                if pending is not None:
                    assert values is not None
                    # This step's forward pass is the draw's evaluation; a checkpoint here
                    # resumes at step t (before its update), with the draw recorded.
                    if record(pending, t - 1, *train_values(values), state, t):
                        break
                    pending = None
                divergence.check_step(chains, loss, t, cfg)
                noise = rng.normal_like(state.params)
                pgrad = posterior.potential_grad(state.params, grads)
                state = _step(cfg, state, pgrad, grads, noise, mass)
                rec.step(chains, t, loss)
                bar.update(1)
                k = t + 1 - cfg.num_burnin
                if k <= 0 or k % cfg.thin:
                    continue
                d = k // cfg.thin - 1
                if fused and t + 1 < T:
                    pending = d
                    continue
                if record(d, t, *evaluate_train(state.params), state, t + 1):
                    break
            done_groups.append(gi)
            save(None, {})
    except BaseException as e:
        # Chain-parallel ranks meet only at check points, so a failing one can tell the others.
        # (Data-parallel ones meet at every step's all-reduce: there the launcher ends them.)
        if part.distributed:
            distributed.agree(e)
        raise
    finally:
        bar.close()
    if part.distributed:
        distributed.agree()
        rec.share(owners, distributed.exchange_rows)
        resumed = distributed.any_true(resumed)  # the run resumed if any rank did
    elif shard is not None and stores is not None and distributed.any_true(resumed):
        # Data-parallel: only rank 0 kept the draws made before the resume on disk.
        for store in stores:
            exchange_store(store, slice(0, C), 0, distributed.exchange_rows)
    if cfg.adaptive:
        assert stop is not None
        used = stop["draws"]
        rec.trim(used, cfg.num_burnin + used * cfg.thin)
    traces = None
    if rec.token_train is not None and rec.token_query is not None:
        assert train_tokens is not None
        traces = TokenTraces(rec.token_train, rec.token_query, train_tokens, eval_query.token_index)
    return RunOutput(
        rec.moments, rec.draw_loss, rec.step_loss, rec.query_trace, resumed, traces, rec.energy,
        rec.blocks, rec.train_trace, rec.train_index, stop,
    )  # fmt: skip


def _train_token_index(ev: Evaluator, shard: Shard | None) -> tuple[Tensor, list[int]]:
    """(sequence, position) ``[Kn, 2]`` of every attributed training token, and how many
    tokens each data-parallel process evaluates (its slice's index, offset to global rows)."""
    index = ev.token_index
    if shard is None:
        return index, [len(index)]
    offset = index + torch.tensor([shard.start, 0])
    parts = distributed.gather_objects(offset)
    return torch.cat(parts), [len(p) for p in parts]


def _minibatch_grad(
    grad_fn: Any, params: Params, train: DataSource, index: Tensor, groups: int,
    shard: Shard | None,
) -> tuple[Params, Tensor]:  # fmt: skip
    """Mean loss and gradient over each chain's minibatch ``index [G·B]``. Data-parallel:
    this process takes every ``world``-th example of each chain's batch, and the size-weighted
    parts are summed over the processes."""
    if shard is None:
        return grad_fn(params, stack_chain_batches(train.batch(index), groups))
    per_chain = index.view(groups, -1)
    mine = per_chain[:, shard.rank :: shard.world]
    g, loss = grad_fn(params, stack_chain_batches(train.batch(mine.reshape(-1)), groups))
    w = mine.shape[1] / per_chain.shape[1]
    *vals, loss = distributed.sum_over_ranks([*(w * v for v in g.values()), w * loss])
    return dict(zip(g, vals, strict=True)), loss


def _checks_made(
    part: Partition, cfg: BIFConfig, done_groups: list[int],
    active: dict[str, Any] | None, stop: dict[str, Any] | None, capacity: int,
) -> int:  # fmt: skip
    """Draws up to which the adaptive checks were already made before a resume.

    The checks of a distributed run are collective, so a rank that resumes from an older
    checkpoint than another must not repeat the checks the other has passed: every check up to
    the furthest rank's draw was made (and said "go on")."""
    if not (part.distributed and cfg.adaptive):
        return 0
    draws = 0
    if done_groups:
        draws = int((stop or {}).get("draws", capacity))
    elif active is not None:
        draws = max(0, active["step"] - cfg.num_burnin) // cfg.thin
    return distributed.max_int(draws)


def _init_state(cfg: BIFConfig, fmodel: FunctionalModel, num: int) -> Any:
    """The sampler state of ``num`` chains, all at ``w*``."""
    stacked = {k: v.unsqueeze(0).expand(num, *v.shape).clone() for k, v in fmodel.w_star.items()}
    init = {"sgld": sgld.init, "rmsprop": rmsprop.init, "kinetic": kinetic.init}[cfg.sampler]
    return init(stacked)


def _step(
    cfg: BIFConfig, state: Any, pgrad: Params, grads: Params, noise: Params,
    mass: LowRankMass | None,
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


def _check_all(
    rec: Recorder, part: Partition, owners: list[slice], draws: int, cfg: BIFConfig,
    seconds: float, shard: Shard | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """An adaptive check over every chain. Chain-parallel processes fetch the others' moments
    first; in any process group rank 0 decides for all (its clock decides ``max_seconds``)."""
    if part.distributed:
        distributed.agree()
        rec.share(owners, distributed.exchange_rows, _CHECK_TENSORS)
    stop = None
    if distributed.is_main():
        stop = _adaptive_stop(
            rec.moments, rec.blocks, rec.draw_loss, rec.query_trace, draws, cfg, seconds
        )
    return distributed.broadcast(stop) if part.distributed or shard is not None else stop


def _adaptive_stop(
    moments: Moments,
    blocks: Blocks | None,
    draw_loss: Tensor,
    query_trace: Tensor,
    draws: int,
    cfg: BIFConfig,
    seconds: float,
) -> dict[str, Any] | None:
    """``num_draws='auto'``: the stop record if the targets or the budget end the run here."""
    status = stopping.check(moments, blocks, draw_loss[:, :draws], query_trace[:, :draws], cfg)
    if status["met"]:
        reason = "targets_met"
    elif draws >= cfg.max_draws:
        reason = "max_draws"
    elif cfg.max_seconds is not None and seconds >= cfg.max_seconds:
        reason = "max_seconds"
    else:
        log.info("num_draws='auto': %d draws, not yet: %s", draws, status)
        return None
    stop = {"reason": reason, "draws": draws, "seconds": seconds, "status": status}
    log.info("num_draws='auto': %s", stopping.describe(stop, cfg))
    return stop


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


def _flatten_state(state: Any) -> dict[str, Tensor]:
    """Sampler state NamedTuple -> flat ``sampler.<field>[.<param>]`` tensors for safetensors."""
    out: dict[str, Tensor] = {}
    for f in type(state)._fields:
        v = getattr(state, f)
        if isinstance(v, dict):
            out.update({f"sampler.{f}.{k}": t for k, t in v.items()})
        else:
            out[f"sampler.{f}"] = v
    return out


def _unflatten_state(template: Any, saved: dict[str, Tensor], device: torch.device) -> Any:
    """Inverse of :func:`_flatten_state`, shaped like ``template``."""
    values = []
    for f in type(template)._fields:
        v = getattr(template, f)
        if isinstance(v, dict):
            values.append({k: saved[f"sampler.{f}.{k}"].to(device) for k in v})
        else:
            values.append(saved[f"sampler.{f}"].to(device))
    return type(template)(*values)


def _full_batch_grad(
    grad_fn: Any, params: Params, chunks: list[Any], n: int, keep: bool = False
) -> tuple[Params, Tensor, list[Tensor] | None]:
    """Exact ∇L_n as a size-weighted sum of chunk gradients (bounded activation memory).
    With ``keep``, ``grad_fn`` is fused (:func:`bif.functional.mean_loss_grad_and_losses`)
    and its per-chunk values are returned too."""
    total_g: Params | None = None
    total_l: Tensor | None = None
    values: list[Tensor] = []
    for chunk in chunks:
        if keep:
            g, (loss, v) = grad_fn(params, chunk)
            values.append(v)
        else:
            g, loss = grad_fn(params, chunk)
        w = _batch_len(chunk) / n
        total_g = (
            {k: w * v for k, v in g.items()}
            if total_g is None
            else {k: total_g[k] + w * v for k, v in g.items()}
        )
        total_l = w * loss if total_l is None else total_l + w * loss
    assert total_g is not None and total_l is not None
    return total_g, total_l, values if keep else None


def _batch_len(batch: Any) -> int:
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("cannot infer the batch size of a batch without tensors")
