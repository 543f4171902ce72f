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
from bif.distributed import Partition
from bif.errors import ConfigError
from bif.estimator import Moments
from bif.functional import FunctionalModel, Params, mean_loss_and_grad, per_chain
from bif.lm.task import is_token_task
from bif.mcse import Blocks
from bif.observables import Evaluator, query_observables, train_losses
from bif.posterior import LocalPosterior
from bif.sampler import divergence, kinetic, rmsprop, sgld
from bif.sampler.mass import LowRankMass
from bif.sampler.recorder import Recorder
from bif.sampler.rng import ChainRandom
from bif.task import Task
from bif.tokens import TokenTraces

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
    vm = cfg.vmap_chains
    groups = [part.chains] if vm else [[c] for c in part.chains]
    tokens = is_token_task(task)
    eval_train = Evaluator(fmodel, task, train, train_losses, cfg.chunk_size, vm, tokens)
    eval_query = Evaluator(fmodel, task, query, query_observables, cfg.chunk_size, vm, tokens)
    token_sizes = None
    if tokens:
        kn, kq = len(eval_train.token_index), len(eval_query.token_index)
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
        grad_star, _ = _full_batch_grad(full_fn, w_star_1, eval_train.chunks(), N)
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
    energy_star = float(posterior.potential(w_star_1, eval_train(w_star_1).double().mean(1)))
    full_batch = cfg.batch_size is None or cfg.batch_size >= N
    grad_fn = per_chain(
        mean_loss_and_grad(fmodel, task.loss), vm, batch_in_dim=None if full_batch else 0
    )

    slots = block_slots(cfg, N, Q)
    first = cfg.check_every if cfg.adaptive else D  # blocks double as the run grows
    rec = Recorder(
        (C, D, T, N, Q), device, slots, -(-first // slots) if slots else 0,
        trace_index(N, cfg.trace_sample), token_sizes,
    )  # fmt: skip
    done_groups: list[int] = []
    stop: dict[str, Any] | None = None
    seconds_before = 0.0  # sampling time of the processes before a resume
    resume_group: dict[str, Any] | None = None
    saved: dict[str, Tensor] = {}
    config_dict = cfg.to_dict()
    owners = [part.owner(r) for r in range(part.world)]
    names = [checkpoint.state_file((o.start, o.stop)) for o in owners]
    state_name = names[part.rank] if part.distributed else checkpoint.STATE_FILE
    siblings = tuple(n for r, n in enumerate(names) if part.distributed and r != part.rank)
    if run_dir is not None:
        loaded = checkpoint.load(run_dir, config_dict, identity, state_name, siblings)
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
        if run_dir is None:
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
        disable=not progress or part.rank != 0,
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
            for t in range(t0, T):
                if full_batch:
                    grads, loss = _full_batch_grad(grad_fn, state.params, eval_train.chunks(), N)
                else:
                    batch = train.batch(rng.indices(N, cfg.batch_size))
                    grads, loss = grad_fn(state.params, stack_chain_batches(batch, len(chains)))
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
                (a, a_tok), (b, b_tok) = (
                    eval_train.evaluate(state.params),
                    eval_query.evaluate(state.params),
                )
                energy = posterior.potential(state.params, a.double().mean(1)) - energy_star
                divergence.check_draw(chains, a, b, energy, t, cfg, fmodel.num_params)
                toks = (a_tok, b_tok) if a_tok is not None and b_tok is not None else None
                rec.draw(idx, chains, d, a, b, energy, toks)
                if d % 10 == 0:
                    bar.set_postfix(loss=f"{float(a.mean()):.4g}")
                if cfg.adaptive and stop is not None:  # recorded before a resume
                    if d + 1 >= stop["draws"]:
                        break
                elif cfg.adaptive and ((d + 1) % cfg.check_every == 0 or d + 1 == D):
                    if d + 1 > checked:
                        stop = _check_all(rec, part, owners, d + 1, cfg, elapsed())
                    if stop is not None:
                        break
                if run_dir is not None and (
                    (d + 1) % checkpoint_every == 0 or time.monotonic() - last_save > 60
                ):
                    snapshot(t + 1, state)
                    last_save = time.monotonic()
            done_groups.append(gi)
            save(None, {})
    except BaseException as e:
        if part.distributed:
            distributed.agree(e)  # tells the other ranks, then re-raises here
        raise
    finally:
        bar.close()
    if part.distributed:
        distributed.agree()
        rec.share(owners, distributed.exchange_rows)
    if cfg.adaptive:
        assert stop is not None
        used = stop["draws"]
        rec.trim(used, cfg.num_burnin + used * cfg.thin)
    traces = None
    if rec.token_train is not None and rec.token_query is not None:
        traces = TokenTraces(
            rec.token_train, rec.token_query, eval_train.token_index, eval_query.token_index
        )
    return RunOutput(
        rec.moments, rec.draw_loss, rec.step_loss, rec.query_trace, resumed, traces, rec.energy,
        rec.blocks, rec.train_trace, rec.train_index, stop,
    )  # fmt: skip


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
    seconds: float,
) -> dict[str, Any] | None:  # fmt: skip
    """An adaptive check over every chain. With several processes the others' moments are
    fetched first, and rank 0 decides for all (its clock decides ``max_seconds``)."""
    if part.distributed:
        distributed.agree()
        rec.share(owners, distributed.exchange_rows, _CHECK_TENSORS)
    stop = None
    if part.rank == 0:
        stop = _adaptive_stop(
            rec.moments, rec.blocks, rec.draw_loss, rec.query_trace, draws, cfg, seconds
        )
    return distributed.broadcast(stop) if part.distributed else stop


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
    grad_fn: Any, params: Params, chunks: list[Any], n: int
) -> tuple[Params, Tensor]:
    """Exact ∇L_n as a size-weighted sum of chunk gradients (bounded activation memory)."""
    total_g: Params | None = None
    total_l: Tensor | None = None
    for chunk in chunks:
        g, loss = grad_fn(params, chunk)
        w = _batch_len(chunk) / n
        total_g = (
            {k: w * v for k, v in g.items()}
            if total_g is None
            else {k: total_g[k] + w * v for k, v in g.items()}
        )
        total_l = w * loss if total_l is None else total_l + w * loss
    assert total_g is not None and total_l is not None
    return total_g, total_l


def _batch_len(batch: Any) -> int:
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("cannot infer the batch size of a batch without tensors")
