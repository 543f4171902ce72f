"""``bif.attribute``: the one-call entry point."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bif import checkpoint, distributed, stopping, validate
from bif._version import __version__
from bif.auto import Curvature, curvature_to, resolve_auto
from bif.config import AUTO_FIELDS, BIFConfig
from bif.data import DataSource
from bif.diagnostics import TOKEN_SAMPLE, diagnose, warn_if_not_ok
from bif.errors import ConfigError, DataError, ModelError
from bif.estimator import estimate
from bif.functional import FunctionalModel
from bif.identity import DataHasher, checkpoint_values, digest, run_identity
from bif.observables import check_per_sample
from bif.pilot import guard
from bif.result import BIFResult
from bif.sampler.run import run_chains, trace_index
from bif.task import OutputLossFn, Task, make_task, observable_name, task_observable

log = logging.getLogger(__name__)


def attribute(
    model: nn.Module,
    train: Any,
    query: Any,
    task: str | Task | OutputLossFn = "classification",
    *,
    observable: str | OutputLossFn | None = None,
    config: BIFConfig | dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    **hyperparams: Any,
) -> BIFResult:
    """Bayesian influence of every training example on every query.

    Samples the local posterior ``p(w) ∝ exp(-nβ·L_n(w) - γ/2·||w - w*||²)`` around the model's
    current weights ``w*`` (by default with the preconditioned kinetic Langevin sampler, BAOAB
    with a low-rank mass; ``sampler="sgld"`` or ``"rmsprop"`` for SGLD) and returns
    ``BIF = -Cov_p(l_n(w), φ_q(w))``.

    Args:
        model: any ``nn.Module`` at its trained checkpoint. Parameters with
            ``requires_grad=False`` are held fixed. It is run in eval mode and never modified.
        train: training examples to attribute (their mean loss also defines the posterior):
            ``(inputs, targets)`` tensors, a map-style ``Dataset`` or a ``DataLoader``.
        query: the examples whose observable is explained, same forms as ``train``.
        task: "classification" (cross-entropy), "regression" (½ squared error), a per-sample
            loss ``fn(outputs, targets) -> [B]``, or a :class:`bif.Task`.
        observable: what to explain on the queries: None/"loss", "margin", or
            ``fn(outputs, targets) -> [B]`` (e.g. one logit).
        config: a :class:`BIFConfig`; keyword ``hyperparams`` override its fields
            (``num_chains``, ``num_draws``, ``num_burnin``, ``thin``, ``step_size``, ``nbeta``,
            ``gamma``, ``batch_size``, ``seed``, ``sampler``, ...).
        device: where to sample (default: the model's device).
        dtype: cast floating weights and inputs (default: keep the model's dtype).
        progress: show a progress bar.
        run_dir: if given, checkpoint the run there and resume from it after a crash or kill.
            The directory is pinned to this run (weights, frozen tensors, architecture, data
            content, task, observable, config, bif version): another run refuses to use it.
        checkpoint_every: draws between checkpoints when ``run_dir`` is set.

    Returns:
        :class:`BIFResult` with ``scores`` and ``stderr`` of shape ``[Q, N]``.

    Raises:
        ConfigError, DataError, ShapeError: invalid input, with a message saying what to change.
        ModelError: the model's weights hold NaN/inf, or the pilot run (:mod:`bif.pilot`) found
            no stable automatic settings (raised before sampling).
        DivergenceError: a chain produced NaN/inf (lower ``step_size``).
        ArtifactError: ``run_dir`` holds another run (the message says what differs), or a
            damaged file.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    # Typos and unavailable devices fail here, in milliseconds, with the fix named.
    config, device = validate.coerce_config(config), validate.coerce_device(device)
    dtype = validate.coerce_dtype(dtype)
    validate.check_run_dir(run_dir)
    cfg = (config or BIFConfig()).replace(**hyperparams) if hyperparams else config or BIFConfig()
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or (checkpoint_every < 1)
    ):
        raise ConfigError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}.")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    the_task = make_task(task, observable)
    requested = cfg
    if cfg.num_chains < 2:
        warnings.warn(
            "num_chains=1 gives no standard errors (they come from the spread across chains).",
            stacklevel=2,
        )

    # Any submodule in training mode counts (a Dropout left in training mode inside an eval-mode
    # parent would otherwise draw random masks inside vmap); each module's own mode is restored.
    modes = {m: m.training for m in model.modules()}
    was_training = any(modes.values())
    if was_training:
        warnings.warn(
            "bif put the model in eval mode for sampling (dropout off, BatchNorm statistics "
            "frozen) and will restore training mode afterwards. Call model.eval() first to "
            "silence this.",
            stacklevel=2,
        )
        model.eval()
    try:
        group = distributed.active()  # inside a torch.distributed group of > 1 processes
        chains = cfg.parallel == "chains"
        part = (
            distributed.partition(cfg.num_chains) if chains else distributed.single(cfg.num_chains)
        )
        try:
            fwd = getattr(torch, cfg.forward_dtype) if cfg.forward_dtype is not None else None
            fmodel = FunctionalModel(model, device, dtype, forward_dtype=fwd)
            dt = dtype if dtype is not None else next(iter(fmodel.w_star.values())).dtype
            train_src = DataSource(train, "train", device, dt)
            query_src = DataSource(query, "query", device, dt)
            _check_weights(fmodel)
            train_star, query_star, hashes = _preflight(fmodel, the_task, train_src, query_src, cfg)
            task_name = getattr(the_task, "name", type(the_task).__name__)
            ident = run_identity(model, fmodel.w_star, fmodel.fixed, the_task, *hashes)
            dig = digest(ident)
        except BaseException as e:
            if group:
                distributed.agree(e)  # the other ranks stop too instead of waiting for this one
            raise
        if group:
            distributed.agree()
            _same_run_everywhere(dig, requested)
        t0 = time.perf_counter()
        rd = Path(run_dir) if run_dir is not None else None
        # Rank 0 alone writes the run directory's shared files, resolves the automatic
        # settings and pilots them; the other ranks take its config and curvature.
        shared, failure = None, None
        if distributed.is_main():
            try:
                if rd is not None:
                    values = checkpoint_values(train_star, query_star)
                    checkpoint.open_run(rd, ident, values, requested.to_dict())
                cfg, curv = resolve_auto(cfg, fmodel, the_task, train_src, rd, dig, progress)
                eig, kron = curv.eigenpairs, curv.kronecker

                def again(c: BIFConfig) -> tuple[BIFConfig, Curvature]:
                    return resolve_auto(c, fmodel, the_task, train_src, rd, dig, False, eig, kron)

                cfg, curv = guard(
                    requested, cfg, curv, fmodel, the_task, train_src, query_src, again, progress
                )
                shared = (cfg, curv)
            except BaseException as e:
                failure = e
                if not group:
                    raise
        if group:
            distributed.agree(failure)
            got = distributed.broadcast(
                (shared[0], curvature_to(shared[1], "cpu")) if shared else None
            )
            cfg, curv = got[0], curvature_to(got[1], device)
        out = run_chains(
            fmodel, the_task, train_src, query_src, cfg, progress=progress, run_dir=rd,
            checkpoint_every=checkpoint_every, identity=dig, mass=curv.mass,
            saddle=curv.saddle, partition=part if group else None,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        for m, mode in modes.items():
            m.training = mode
    est = estimate(out.moments, cfg.centering, out.blocks)
    adaptive = None
    if out.stop is not None:
        # The result records the draws actually taken; meta says why the run stopped there.
        adaptive = dict(out.stop, description=stopping.describe(out.stop, cfg))
        cfg = cfg.replace(num_draws=int(out.stop["draws"]))
    meta = {
        "bif_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "num_params_sampled": fmodel.num_params,
        "num_train": len(train_src),
        "num_query": len(query_src),
        "task": task_name,
        "observable": observable_name(the_task, observable),
        "damping": cfg.damping,
        "step_size_rule": "auto" if requested.step_size == "auto" else "given",
        "auto": [k for k in AUTO_FIELDS if getattr(requested, k) == "auto"],
        "lambda_max": curv.lambda_max,
        "preconditioner": curv.info,
        "sampling_seconds": wall,
        "resumed": out.resumed,
        "processes": distributed.world_size(),
        "parallel": cfg.parallel if group else None,
        "identity": dig,
        "model_was_training": was_training,
        "per_token": out.tokens is not None,
        "stderr_method": est.stderr_method,
        "stderr_dof": est.stderr_dof,
        "adaptive": adaptive,
    }
    token_sample = None
    if out.tokens is not None:
        tt = out.tokens.train
        pick = trace_index(tt.shape[-1], TOKEN_SAMPLE)
        token_sample = tt[..., pick]
    diag = diagnose(
        out.draw_loss, out.query_trace, est.scores.cpu(),
        est.stderr.cpu(),
        out.train_trace, token_sample, out.energy, fmodel.num_params,
    )  # fmt: skip
    if distributed.is_main():  # one process warns for the group
        warn_if_not_ok(diag)
    return BIFResult(
        scores=est.scores.cpu(),
        stderr=est.stderr.cpu(),
        correlation=est.correlation.cpu(),
        self_influence=est.self_influence.cpu(),
        self_influence_stderr=est.self_influence_stderr.cpu(),
        draw_loss=out.draw_loss,
        step_loss=out.step_loss,
        query_trace=out.query_trace,
        train_loss_star=train_star,
        query_star=query_star,
        config=cfg,
        meta=meta,
        tokens=out.tokens,
        mcse=est.mcse.cpu() if est.mcse is not None else None,
        stderr_chains=est.stderr_chains.cpu() if est.stderr_chains is not None else None,
        train_trace=out.train_trace,
        train_index=out.train_index,
        energy=out.energy,
        diagnostics=diag,
    )


def _same_run_everywhere(dig: str, requested: BIFConfig) -> None:
    """Every rank of a process group must attribute the same model, data and config."""
    fix = (
        "every process must load the same checkpoint and the same data in the same order, "
        "and pass the same settings (seed any random data loading alike on every rank)."
    )
    distributed.same_everywhere(dig, "model, data, task or observable", fix)
    conf = hashlib.blake2b(
        json.dumps(requested.to_dict(), sort_keys=True, default=str).encode(), digest_size=8
    ).hexdigest()
    distributed.same_everywhere(conf, "config", fix)


def _check_weights(fmodel: FunctionalModel) -> None:
    """Non-finite weights are the model's fault, not the data's: say so before anything runs."""
    for kind, tensors in (("parameter", fmodel.w_star), ("frozen tensor", fmodel.fixed)):
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ModelError(
                    f"the model's {kind} {name!r} has {bad} NaN/inf value(s) of {t.numel()}: "
                    "bif samples around the weights as they are. Load a finite checkpoint (a "
                    "diverged training run leaves NaN weights), or freeze and reset that tensor."
                )


@torch.no_grad()
def _preflight(
    fmodel: FunctionalModel, task: Task, train: DataSource, query: DataSource, cfg: BIFConfig
) -> tuple[Tensor, Tensor, tuple[str, str]]:
    """Check the task on real batches at w* (outside vmap) and return the losses there.

    Returns:
        train losses [N] and query observables [Q] at the checkpoint, float64 on the CPU, and
        the content hashes of the train and query data (:class:`bif.identity.DataHasher`).
    """
    model = fmodel.model_fn(fmodel.w_star)
    check = getattr(task, "check", None)
    out, hashes = [], []
    for src, fn, what in (
        (train, task.loss, "task's loss"),
        (query, lambda m, b: task_observable(task, m, b), "query observable"),
    ):
        values = []
        hasher = DataHasher()
        for start, batch in src.chunks(cfg.chunk_size):
            n = min(cfg.chunk_size, len(src) - start)
            # Every chunk, not only the first: a bad label anywhere would otherwise surface as
            # an opaque IndexError deep inside the sampler.
            with validate.model_call(src.name, start, n, batch, fmodel.module):
                if check is not None:
                    check(model, batch)
                v = check_per_sample(fn(model, batch), n, what)
            hasher.update(batch, n)
            values.append(v.to("cpu", torch.float64))
        hashes.append(hasher.hexdigest())
        vals = torch.cat(values)
        if not bool(torch.isfinite(vals).all()):
            bad = int((~torch.isfinite(vals)).nonzero()[0, 0])
            raise DataError(
                f"the {what} is not finite at the checkpoint for {src.name} example {bad} "
                f"(value {float(vals[bad])}); check that example's inputs and targets."
            )
        out.append(vals)
    if not math.isfinite(float(out[0].mean())):
        raise DataError("the mean training loss at the checkpoint is not finite.")
    return out[0], out[1], (hashes[0], hashes[1])
