"""Resolving the 'auto' rules and the kinetic sampler's mass matrix at the checkpoint.

One curvature pass at w* serves every rule: the top Hessian eigenvalue λ_max (power iteration,
or the first of the top-k eigenpairs when the sampler is preconditioned) fixes nβ and the step
size; the eigenpairs give the low-rank mass (:mod:`bif.sampler.mass`). With a ``run_dir`` the
eigenpairs are stored there (``curvature.safetensors``) so that a resumed run samples with
bit-identical settings instead of re-running the eigensolver.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bif import checkpoint
from bif.config import BIFConfig
from bif.curvature import (
    KINETIC_STEP_FACTOR,
    CountedHVP,
    auto_friction,
    auto_gamma,
    auto_nbeta,
    auto_step_size,
    hessian_operator,
    power_iteration,
)
from bif.data import DataSource
from bif.errors import DataError
from bif.functional import FunctionalModel
from bif.sampler.kronecker import KroneckerMass
from bif.sampler.kronecker_build import build_kronecker_mass
from bif.sampler.mass import LowRankMass, flatten, unflatten
from bif.spectrum import (
    localised_directions,
    lowrank_mass,
    preconditioned_extremes,
    top_hessian_eigenpairs,
)
from bif.task import Task

log = logging.getLogger(__name__)

# Curvature on at most this many training examples: the mean loss's Hessian is a smooth
# average, and a fixed subsample keeps the cost independent of the data set size.
LAMBDA_MAX_EXAMPLES = 4096
# Lanczos keeps about 2k+1 float64 vectors of P entries; the rank is lowered to fit this budget
# (a 7M-parameter model gets k ~ 8; below 2 the sampler runs with unit mass).
LANCZOS_BUDGET_MB = 2048
# With nbeta='auto', nβ is lowered (the condition with it) until the flattest direction of the
# preconditioned posterior has at least this curvature relative to the prior's: a Hessian
# eigenvalue mu < 0 gives that direction 1 + nβ·mu/γ, and at or below 0 the local posterior
# does not exist (chains leave w* along it). 0.5: the likelihood may cancel at most half of the
# localisation in any direction.
KMIN_FLOOR = 0.5


@dataclass
class Curvature:
    """What the curvature pass found (recorded in ``result.meta``)."""

    lambda_max: float | None = None
    mass: LowRankMass | KroneckerMass | None = None
    saddle: tuple[torch.Tensor, torch.Tensor] | None = None  # see bif.posterior
    info: dict[str, Any] = field(default_factory=dict)
    # top Hessian eigenpairs (values [k], vectors [P, k]): they do not depend on nβ or γ, so
    # re-resolving the rules at another nβ (bif.pilot) reuses them
    eigenpairs: tuple[torch.Tensor, torch.Tensor] | None = None
    # the Kronecker factors (nβ and γ only scale them: re-resolving reuses them too)
    kronecker: KroneckerMass | None = None


def curvature_to(curv: Curvature, device: torch.device | str) -> Curvature:
    """``curv`` with its tensors on ``device`` (to send it to another process, or receive it)."""
    mass = curv.mass
    if isinstance(mass, KroneckerMass):
        mass = mass.to(device)
    elif mass is not None:
        mass = mass._replace(basis=mass.basis.to(device), curvature=mass.curvature.to(device))
    pair = lambda p: None if p is None else (p[0].to(device), p[1].to(device))  # noqa: E731
    return dataclasses.replace(
        curv, mass=mass, saddle=pair(curv.saddle), eigenpairs=pair(curv.eigenpairs)
    )


def preconditioned(cfg: BIFConfig) -> bool:
    return cfg.sampler == "kinetic" and cfg.precondition_rank > 0


def choose_preconditioner(cfg: BIFConfig, num_params: int) -> tuple[str, str]:
    """The mass of a preconditioned kinetic sampler, ``(kind, why)``.

    ``preconditioner='auto'``: the dense low-rank mass where the Lanczos workspace of its
    eigensolver, ``(2k + 1)·P`` float64 numbers, holds the requested rank k within
    :data:`LANCZOS_BUDGET_MB` (P up to about 2 M parameters at k = 64): it is exact on the
    top-k eigendirections of the Hessian. Beyond, the Kronecker mass
    (:mod:`bif.sampler.kronecker`), whose memory grows with the layer widths, not with P·k.
    """
    k = cfg.precondition_rank
    if cfg.preconditioner != "auto":
        return cfg.preconditioner, "requested"
    mb = (2 * k + 1) * 8 * num_params / 2**20
    if affordable_rank(k, num_params) >= min(k, num_params - 1):
        return "lowrank", f"rank-{k} Lanczos workspace {mb:.0f} MB fits {LANCZOS_BUDGET_MB} MB"
    return "kronecker", f"rank-{k} Lanczos workspace {mb:.0f} MB exceeds {LANCZOS_BUDGET_MB} MB"


def affordable_rank(rank: int, num_params: int) -> int:
    """The largest rank <= ``rank`` whose Lanczos workspace fits LANCZOS_BUDGET_MB (and < P)."""
    fit = int((LANCZOS_BUDGET_MB * 2**20 / (8 * num_params) - 1) // 2)
    return max(0, min(rank, fit, num_params - 1))


def resolve_auto(
    cfg: BIFConfig,
    fmodel: FunctionalModel,
    task: Task,
    train: DataSource,
    run_dir: Path | None = None,
    identity: str = "",
    progress: bool = False,
    eigenpairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    kronecker: KroneckerMass | None = None,
) -> tuple[BIFConfig, Curvature]:
    """Replace every 'auto' field by its rule, in dependency order (γ -> nβ -> mass -> step
    size and friction), and build the mass matrix of a preconditioned kinetic sampler.

    Without preconditioning: h = 1/sqrt(nβ·λ_max + γ), f = 2·sqrt(γ) (unit mass). With it, the
    same rules in the mass's frame: h = 1/sqrt(k'_max) with k'_max the top eigenvalue of
    ``M^-½ (nβH + γI) M^-½`` (power iteration), and f = 2, critical damping of the bulk of
    directions, whose frequency the mass sets to 1. The bottom eigenvalue k'_min exposes
    negative curvature: with nbeta='auto' the condition is lowered until k'_min >= KMIN_FLOOR;
    with a given nβ a non-normalisable posterior (k'_min <= 0) is warned about.
    """
    pre = preconditioned(cfg)
    kind, why = choose_preconditioner(cfg, fmodel.num_params) if pre else ("identity", "")
    rank = cfg.precondition_rank
    if kind == "lowrank":
        rank = affordable_rank(cfg.precondition_rank, fmodel.num_params)
        if rank < 2:
            warnings.warn(
                f"precondition_rank={cfg.precondition_rank} needs a Lanczos workspace of "
                f"~{(2 * cfg.precondition_rank + 1) * 8 * fmodel.num_params / 2**20:.0f} MB "
                f"for {fmodel.num_params} parameters (budget {LANCZOS_BUDGET_MB} MB): sampling "
                "with unit mass instead. Sample fewer parameters (freeze the rest) to get the "
                "preconditioner, or pass precondition_rank=0 to silence this.",
                stacklevel=3,
            )
            pre, kind = False, "identity"
        elif rank < cfg.precondition_rank:
            log.warning("precondition_rank lowered from %d to %d to fit the Lanczos budget",
                        cfg.precondition_rank, rank)  # fmt: skip
    need_lambda = cfg.step_size == "auto" or cfg.nbeta == "auto"
    curv = Curvature(
        eigenpairs=eigenpairs if kind == "lowrank" else None,
        kronecker=kronecker if kind == "kronecker" else None,
    )
    if pre:
        log.info("preconditioner: %s (%s)", kind, why)
        curv.info["mass"] = {"kind": kind, "why": why}
    t0 = time.perf_counter()
    # The subsample's batches are only built when a rule or the mass needs HVPs.
    counted = (
        CountedHVP(hessian_operator(fmodel, task, *_curvature_chunks(train, cfg)), progress)
        if pre or need_lambda
        else None
    )
    try:
        cfg = _resolve(
            cfg, curv, fmodel, counted, kind, rank if pre else 0, run_dir, identity, task, train
        )  # fmt: skip
    finally:
        if counted is not None:
            counted.close()
    if curv.lambda_max is None:
        return cfg, curv
    assert counted is not None
    curv.info["hvps"] = counted.count
    curv.info["seconds"] = time.perf_counter() - t0
    log.info("λ_max(H) = %.4g: nβ = %.4g, γ = %.4g, damping = %.3g, step_size = %.4g %s",
             curv.lambda_max, cfg.nbeta, cfg.gamma, cfg.damping, cfg.step_size,
             curv.info)  # fmt: skip
    return cfg, curv


def _resolve(
    cfg: BIFConfig, curv: Curvature, fmodel: FunctionalModel, counted: CountedHVP | None,
    kind: str, rank: int, run_dir: Path | None, identity: str, task: Task, train: DataSource,
) -> BIFConfig:  # fmt: skip
    """The body of :func:`resolve_auto`: fills ``curv`` and returns the resolved config."""
    w = fmodel.w_star
    hvp: Any = counted
    pre = kind != "identity"
    if kind == "lowrank":
        assert counted is not None
        counted.set_stage(f"top {rank} Hessian eigenpairs")
        before = counted.count
        if curv.eigenpairs is None:
            curv.eigenpairs = _eigenpairs(counted, fmodel, cfg, rank, run_dir, identity)
        vals, vecs = curv.eigenpairs
        curv.lambda_max = float(vals[0])
        # HVPs of the eigensolver (0: read from run_dir); "hvps" counts the whole pass
        curv.info.update(rank=int(vals.numel()), eigenpair_hvps=counted.count - before)
    elif counted is not None:
        counted.set_stage("top Hessian eigenvalue")
        curv.lambda_max = power_iteration(counted, w, seed=cfg.seed)
    if curv.lambda_max is not None and not math.isfinite(curv.lambda_max):
        raise _hessian_not_finite()
    if cfg.gamma == "auto":
        cfg = cfg.replace(gamma=auto_gamma(w, cfg.radius))
    requested_nbeta_auto = cfg.nbeta == "auto"
    if cfg.nbeta == "auto":
        assert not isinstance(cfg.gamma, str) and curv.lambda_max is not None
        cfg = cfg.replace(nbeta=auto_nbeta(cfg.gamma, curv.lambda_max, cfg.condition))
    assert not isinstance(cfg.gamma, str) and not isinstance(cfg.nbeta, str)
    if pre:
        assert hvp is not None
        nbeta_rule = requested_nbeta_auto
        saddle_v = saddle_mu = None
        if kind == "kronecker":
            curv.kronecker = _kronecker(curv, fmodel, task, train, cfg, rank)
        for _ in range(4):
            assert counted is not None
            if kind == "kronecker":
                assert curv.kronecker is not None
                curv.mass = curv.kronecker._replace(nbeta=cfg.nbeta, gamma=cfg.gamma)
                # The posterior's own smallest curvature (unit mass): the Kronecker blocks are
                # not the Hessian's eigenbasis, so k'_min in their frame does not give μ_min.
                counted.set_stage("smallest curvature of the posterior")
                unit = LowRankMass(cfg.gamma, *vals_empty(w))
                kmin = preconditioned_extremes(
                    hvp, unit, cfg.nbeta, cfg.gamma, w, KMIN_FLOOR, seed=cfg.seed
                ).kmin
            else:
                curv.mass = lowrank_mass(vals, vecs, cfg.nbeta, cfg.gamma, w)
            counted.set_stage("extreme eigenvalues of the preconditioned precision")
            ext = preconditioned_extremes(
                hvp, curv.mass, cfg.nbeta, cfg.gamma, w, KMIN_FLOOR, seed=cfg.seed
            )
            kmax = ext.kmax
            if kind == "lowrank":
                kmin = ext.kmin
            if not (math.isfinite(kmax) and math.isfinite(kmin)):
                raise _hessian_not_finite()
            if kmin >= KMIN_FLOOR:
                break
            if kind == "lowrank" and cfg.negative_curvature == "localise" and saddle_v is None:
                counted.set_stage("negatively curved directions")
                v, nb_mu = localised_directions(
                    hvp, curv.mass, cfg.nbeta, cfg.gamma, w,
                    ext.low[:, : max(8, rank // 2)], KMIN_FLOOR,
                )  # fmt: skip
                if v.shape[1]:
                    # prior precision 2nβ|μ| along v: curvature γ + nβ|μ|, which the mass gets too
                    saddle_v, saddle_mu = v, (-nb_mu / cfg.nbeta).clamp_min(0.0)
                    vecs = torch.cat([vecs, v.to(vecs.dtype)], dim=1)
                    vals = torch.cat([vals, saddle_mu.to(vals.dtype)])
                    curv.info["localised_directions"] = int(v.shape[1])
                    curv.info["localised_mu"] = (-saddle_mu).tolist()
                    hvp = _with_saddle(hvp, v, 2.0 * saddle_mu, w)
                    continue
            if not nbeta_rule:
                break
            # A negatively curved direction mu < 0 lies outside the basis (mass γ; with the
            # Kronecker mass kmin is measured at unit mass), so k'_min = 1 + nβ·mu/γ: lower nβ
            # until k'_min = KMIN_FLOOR.
            mu = (kmin - 1) * cfg.gamma / cfg.nbeta
            cfg = cfg.replace(nbeta=(1 - KMIN_FLOOR) * cfg.gamma / -mu)
            curv.info["condition_lowered_to"] = cfg.nbeta * curv.lambda_max / cfg.gamma
        if saddle_v is not None and saddle_mu is not None:
            curv.saddle = (saddle_v, 2.0 * cfg.nbeta * saddle_mu)
        if "condition_lowered_to" in curv.info:
            log.warning(
                "condition lowered from %g to %.3g: the Hessian at w* has a negative eigenvalue "
                "that the damping must dominate for the local posterior to exist",
                cfg.condition, curv.info["condition_lowered_to"],
            )  # fmt: skip
        mass = curv.mass
        smallest = 1.0
        if isinstance(mass, LowRankMass) and mass.rank:
            smallest = float(mass.curvature.min()) / cfg.gamma
        curv.info.update(kmax_preconditioned=kmax, kmin_preconditioned=ext.kmin,
                         kmin_posterior=kmin,
                         smallest_captured=smallest,
                         condition_unpreconditioned=(cfg.nbeta * curv.lambda_max + cfg.gamma)
                         / cfg.gamma)  # fmt: skip
        if kmin <= 0:
            mu = (kmin - 1) * cfg.gamma / cfg.nbeta
            warnings.warn(
                f"the local posterior is not normalisable at w*: the Hessian has an eigenvalue "
                f"near {mu:.3g}, below -γ/nβ = -{cfg.damping:.3g}, so chains leave w* along it "
                "(w* is not near a minimum of the training loss). Strengthen the localisation: "
                f"a lower nbeta (now {cfg.nbeta:.4g}; nbeta='auto' lowers it itself) or a "
                "larger gamma.",
                stacklevel=3,
            )
        if cfg.step_size == "auto":
            cfg = cfg.replace(step_size=KINETIC_STEP_FACTOR / math.sqrt(max(kmax, 1.0)))
        if cfg.friction == "auto":
            cfg = cfg.replace(friction=2.0)
    else:
        if cfg.step_size == "auto":
            assert curv.lambda_max is not None
            cfg = cfg.replace(step_size=auto_step_size(curv.lambda_max, cfg))
        if cfg.friction == "auto":
            cfg = cfg.replace(friction=auto_friction(cfg))
    return cfg


def _hessian_not_finite() -> DataError:
    return DataError(
        "the Hessian of the training loss at the checkpoint is not finite; check the model and "
        "data, or pass a numeric step_size."
    )


def _with_saddle(hvp: Any, v: torch.Tensor, c: torch.Tensor, like: dict) -> Any:
    """``x -> (H + V diag(c) Vᵀ) x``: the Hessian with the saddle localisation folded in (per
    unit nβ), so that k'_max and k'_min see the posterior that is sampled."""
    ref = next(iter(like.values()))
    v, c = v.to(ref.device, ref.dtype), c.to(ref.device, ref.dtype)

    def op(x: dict) -> dict:
        hx = hvp(x)
        extra = unflatten(((flatten(x, chain_dim=False) @ v) * c) @ v.T, x)
        return {k: hx[k] + extra[k] for k in hx}

    return op


def _curvature_chunks(train: DataSource, cfg: BIFConfig) -> tuple[list[Any], list[int]]:
    """Chunks of at most LAMBDA_MAX_EXAMPLES training examples (a seeded subsample)."""
    n = len(train)
    if n > LAMBDA_MAX_EXAMPLES:
        g = torch.Generator().manual_seed(cfg.seed)
        index = torch.randperm(n, generator=g)[:LAMBDA_MAX_EXAMPLES].sort().values
    else:
        index = torch.arange(n)
    chunks, sizes = [], []
    for start in range(0, len(index), cfg.chunk_size):
        part = index[start : start + cfg.chunk_size]
        chunks.append(train.batch(part))
        sizes.append(len(part))
    return chunks, sizes


def _eigenpairs(
    hvp: Any, fmodel: FunctionalModel, cfg: BIFConfig, rank: int, run_dir: Path | None,
    identity: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top ``rank`` Hessian eigenpairs, read from / written to ``run_dir``."""
    key = {"identity": identity, "rank": rank, "seed": cfg.seed,
           "chunk_size": cfg.chunk_size}  # fmt: skip
    if run_dir is not None:
        saved = checkpoint.load_curvature(run_dir, key)
        if saved is not None:
            log.info("preconditioner eigenpairs read from %s", run_dir / checkpoint.CURVATURE_FILE)
            return saved["values"], saved["vectors"]
    vals, vecs, _ = top_hessian_eigenpairs(hvp, fmodel.w_star, rank, seed=cfg.seed)
    if run_dir is not None:
        checkpoint.save_curvature(run_dir, key, {"values": vals, "vectors": vecs})
    return vals, vecs


def vals_empty(like: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty basis ``[P, 0]`` and its ``[0]`` curvatures: with them LowRankMass is γI."""
    ref = next(iter(like.values()))
    num = sum(v.numel() for v in like.values())
    return (
        torch.zeros(num, 0, dtype=ref.dtype, device=ref.device),
        torch.zeros(0, dtype=ref.dtype, device=ref.device),
    )


# The Kronecker factors from a fixed number of batches (independent of the data set size).
KRONECKER_BATCHES = 8
KRONECKER_BATCH_SIZE = 32


def _kronecker(
    curv: Curvature, fmodel: FunctionalModel, task: Task, train: DataSource, cfg: BIFConfig,
    rank: int,
) -> KroneckerMass:  # fmt: skip
    """The Kronecker mass's factors (reused from ``curv`` when re-resolving); its build cost
    goes into ``curv.info["mass"]``."""
    assert not isinstance(cfg.nbeta, str) and not isinstance(cfg.gamma, str)
    if curv.kronecker is not None:
        return curv.kronecker
    mass, info = build_kronecker_mass(
        fmodel, task, train, cfg.nbeta, cfg.gamma, num_batches=KRONECKER_BATCHES,
        batch_size=KRONECKER_BATCH_SIZE, rank=rank, seed=cfg.seed,
    )  # fmt: skip
    # Counts rather than the layer lists (an LM has hundreds); the log line names the fallbacks.
    keep = {k: v for k, v in info.items() if k not in ("kind", "factored", "eigen_correction")}
    keep.update(
        factored_layers=len(info["factored"]), corrected_layers=len(info["eigen_correction"]),
        fallback=sorted(info["fallback"]),
    )  # fmt: skip
    curv.info["mass"].update(keep)
    return mass
