"""The one configuration object of a BIF run, with validation and help text.

Every field is also a keyword argument of :func:`bif.attribute` and a ``--flag`` of the CLI
(generated from the ``help`` metadata below), so the three can never drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from bif.errors import ConfigError

SamplerName = Literal["sgld", "rmsprop", "kinetic"]
Centering = Literal["chain", "pooled"]
# Numeric fields that may be "auto": bif.attribute resolves them at the checkpoint.
AUTO_NUMBERS = ("step_size", "nbeta", "gamma")
AUTO_FIELDS = ("friction", "gamma", "nbeta", "step_size")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BIFConfig:
    """Hyperparameters of the local posterior, the sampler and the evaluation.

    The local posterior is ``p(w) ∝ exp(-nbeta · L_n(w) - gamma/2 · ||w - w*||²)`` with ``L_n`` the
    MEAN training loss; its damping in classical-influence terms is ``gamma / nbeta``.
    Defaults are explained in the README ("Choosing hyperparameters").
    """

    num_chains: int = _f(8, "independent chains, all started at w*; >= 2 gives standard errors")
    num_draws: int | Literal["auto"] = _f(
        2000,
        "draws recorded per chain after burn-in, or 'auto': draw in blocks of check_every until "
        "the scores are resolved (target_mcse, target_rhat, target_ess) or the budget "
        "(max_draws, max_seconds) is spent",
    )
    max_draws: int = _f(20000, "with num_draws='auto': the most draws per chain")
    max_seconds: float | None = _f(
        None, "with num_draws='auto': stop after this much sampling time (None: no limit)"
    )
    check_every: int = _f(
        250, "with num_draws='auto': draws per chain between two checks of the targets"
    )
    target_mcse: float = _f(
        0.1,
        "with num_draws='auto': largest standard error of each query's top-5 scores relative "
        "to their mean magnitude",
    )
    target_rhat: float = _f(
        1.01, "with num_draws='auto': largest R-hat of the draw loss and the query traces"
    )
    target_ess: float = _f(
        400.0, "with num_draws='auto': smallest bulk ESS of the draw loss and the query traces"
    )
    num_burnin: int = _f(200, "sampler steps discarded before the first draw")
    thin: int = _f(1, "sampler steps between two recorded draws")
    step_size: float | Literal["auto"] = _f(
        "auto",
        "step size (ε for 'sgld'/'rmsprop', time step h for 'kinetic'), or 'auto' from a "
        "power-iteration estimate of the top Hessian eigenvalue λ_max at w*: h = "
        "1/sqrt(nβ·λ_max + γ), ε = 0.5/(nβ·λ_max + γ) (×rmsprop_eps for 'rmsprop'); lower it "
        "if a chain diverges",
    )
    nbeta: float | Literal["auto"] = _f(
        "auto",
        "inverse temperature nβ multiplying the mean training loss, or 'auto' = γ·condition/"
        "λ_max: the damping γ/nβ is then λ_max(H)/condition",
    )
    gamma: float | Literal["auto"] = _f(
        "auto",
        "localisation strength γ pulling samples towards w*, or 'auto' = P/(radius²·||w*||²): "
        "flat directions spread by radius × the weights' RMS",
    )
    condition: float = _f(
        500.0,
        "with nbeta='auto': target condition number λ_max(H)/damping of the sampled posterior "
        "(lowered if the Hessian's negative curvature would make the local posterior improper)",
    )
    radius: float = _f(
        0.1,
        "with gamma='auto': per-coordinate spread of flat directions relative to the RMS of w*",
    )
    batch_size: int | None = _f(
        None, "minibatch size for SGLD gradients; None = full batch (exact gradients)"
    )
    sampler: SamplerName = _f(
        "kinetic",
        "'sgld', 'rmsprop' (RMSProp-preconditioned SGLD) or 'kinetic' (underdamped Langevin, "
        "BAOAB; step_size is then its time step h)",
    )
    friction: float | Literal["auto"] = _f(
        "auto",
        "friction f of the 'kinetic' sampler, or 'auto': 2 with the low-rank mass (critical "
        "damping of the bulk of directions, whose frequency the mass sets to 1), 2·sqrt(γ) with "
        "unit mass",
    )
    precondition_rank: int = _f(
        64,
        "'kinetic' sampler: mass matrix γI + the top-k Hessian eigenpairs at w* (Lanczos on "
        "HVPs), which moves every direction at the same frequency; 0 = unit mass",
    )
    preconditioner: Literal["auto", "lowrank", "kronecker"] = _f(
        "auto",
        "'kinetic' sampler's mass matrix: 'lowrank' (γI + the top k Hessian eigenpairs, dense "
        "[P, k]), 'kronecker' (one K-FAC block nβ·G⊗A + γI per Linear, Conv2d or Embedding "
        "weight, k eigenpairs per factor, γI elsewhere; memory linear in the layer widths), or "
        "'auto': lowrank where its Lanczos workspace holds rank k, kronecker beyond",
    )
    negative_curvature: Literal["lower", "localise"] = _f(
        "localise",
        "preconditioned 'kinetic' sampler, where nβ·H + γI is not safely positive: 'localise' "
        "adds prior precision 2nβ|μ| along the (up to precondition_rank/2) negatively curved "
        "directions (sampling |H| there), then 'lower' nβ (nbeta='auto') until it is",
    )
    pilot_steps: int = _f(
        100,
        "with an 'auto' step size or nβ: steps of a short pilot run (4 chains, own seeds) that "
        "checks the automatic settings before sampling and repairs them if a chain diverges or "
        "leaves w* (at most a fifth of the run's steps, at least 30); 0: no pilot",
    )
    rmsprop_alpha: float = _f(0.99, "RMSProp decay α of the squared-gradient average")
    rmsprop_eps: float = _f(0.1, "RMSProp ε in the preconditioner 1/(sqrt(V)+ε)")
    chunk_size: int = _f(512, "examples per forward pass when evaluating losses at a draw")
    vmap_chains: bool = _f(True, "run all chains at once with torch.func.vmap (False: one by one)")
    parallel: Literal["chains", "data"] = _f(
        "chains",
        "inside a torch.distributed process group (torchrun): 'chains' splits the chains over "
        "the processes (the one-process result bit for bit); 'data' splits the training set "
        "and all-reduces the gradient (large N; equal up to float64 summation order)",
    )
    centering: Centering = _f(
        "chain", "'chain': average per-chain covariances; 'pooled': one covariance of all draws"
    )
    forward_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(
        None,
        "run forward passes in this dtype (e.g. bfloat16 on a GPU) while the sampled weights "
        "stay in the model's dtype; None: the model's dtype",
    )
    center_gradient: bool = _f(
        True,
        "remove nβ·∇L_n(w*) from the potential so w* is stationary when it is not a minimum of "
        "the attributed data's loss (early stopping, weight decay, a subset of the data); the "
        "posterior is then centred on w* with the same Hessian",
    )
    stderr_blocks: int = _f(
        8,
        "slots of batch means per chain (even; block length doubles when full): the reported "
        "standard error pools the across-chain spread with the spread of block estimates "
        "inside each chain (bif.mcse); 0: the spread across chains only",
    )
    trace_sample: int = _f(
        64,
        "training examples (evenly spaced) whose loss traces are kept for the diagnostics "
        "(R-hat, ESS); 0: none",
    )
    seed: int = _f(0, "seed of every chain's noise and minibatches (chain c uses seed, c)")
    max_token_trace_mb: float = _f(
        4096.0,
        "causal-LM tasks: refuse to start if the per-token traces (4 bytes per token per draw) "
        "would exceed this many MB",
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field and how to fix it."""
        ints = {
            "num_chains": 1,
            "num_draws": 2,
            "max_draws": 2,
            "check_every": 2,
            "num_burnin": 0,
            "thin": 1,
            "chunk_size": 1,
            "pilot_steps": 0,
            "stderr_blocks": 0,
            "trace_sample": 0,
        }
        for name, low in ints.items():
            v = getattr(self, name)
            if name == "num_draws" and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an integer, got {v!r}.")
            if v < low:
                raise ConfigError(f"{name} must be >= {low}, got {v}.")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(
                "batch_size must be a positive integer or None (full batch), "
                f"got {self.batch_size!r}."
            )
        for name in AUTO_NUMBERS:
            v = getattr(self, name)
            if v != "auto" and isinstance(v, str):
                raise ConfigError(f"{name} must be a number or 'auto', got {v!r}.")
        hints = {
            "step_size": "use 'auto', or try 1e-4 and lower it further if chains diverge",
            "nbeta": "a typical value is of the order of the training-set size",
            "gamma": "larger gamma keeps samples closer to the checkpoint",
            "rmsprop_eps": "the authors' default is 0.1",
        }
        hints["condition"] = "500 means damping = λ_max/500"
        hints["radius"] = "0.1 lets flat directions move by 10% of the weights' RMS"
        hints["max_token_trace_mb"] = "traces are kept in memory; restrict the tokens instead"
        hints["target_mcse"] = "0.1 asks for each query's top scores to 10%"
        hints["target_ess"] = "400 is the usual minimum (Vehtari et al. 2021)"
        for name, hint in hints.items():
            v = getattr(self, name)
            if name in AUTO_NUMBERS and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{name} must be a number, got {v!r}.")
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be finite and > 0, got {v!r}; {hint}.")
        if not (0.0 < self.rmsprop_alpha < 1.0):
            raise ConfigError(f"rmsprop_alpha must lie in (0, 1), got {self.rmsprop_alpha!r}.")
        if self.sampler not in ("sgld", "rmsprop", "kinetic"):
            raise ConfigError(
                f"sampler must be 'sgld', 'rmsprop' or 'kinetic', got {self.sampler!r}."
            )
        if self.friction != "auto" and (
            isinstance(self.friction, bool)
            or not isinstance(self.friction, int | float)
            or not math.isfinite(self.friction)
            or self.friction <= 0
        ):
            raise ConfigError(
                f"friction must be a positive number or 'auto', got {self.friction!r}."
            )
        if self.centering not in ("chain", "pooled"):
            raise ConfigError(f"centering must be 'chain' or 'pooled', got {self.centering!r}.")
        if self.forward_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(
                "forward_dtype must be None, 'float32', 'bfloat16' or 'float16', got "
                f"{self.forward_dtype!r}."
            )
        for name in ("vmap_chains", "center_gradient"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.negative_curvature not in ("lower", "localise"):
            raise ConfigError(
                "negative_curvature must be 'lower' or 'localise', got "
                f"{self.negative_curvature!r}."
            )
        if self.preconditioner not in ("auto", "lowrank", "kronecker"):
            raise ConfigError(
                "preconditioner must be 'auto', 'lowrank' or 'kronecker', got "
                f"{self.preconditioner!r}."
            )
        r = self.precondition_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(
                f"precondition_rank must be an integer >= 0 (0 = no preconditioning), got {r!r}."
            )
        if not (isinstance(self.target_rhat, int | float) and self.target_rhat > 1):
            raise ConfigError(f"target_rhat must be a number > 1, got {self.target_rhat!r}.")
        ms = self.max_seconds
        if ms is not None and (
            isinstance(ms, bool) or not isinstance(ms, int | float) or not ms > 0
        ):
            raise ConfigError(f"max_seconds must be a positive number or None, got {ms!r}.")
        if self.num_draws == "auto" and not self.vmap_chains:
            raise ConfigError(
                "num_draws='auto' needs vmap_chains=True (all chains advance together between "
                "checks); with vmap_chains=False give a number of draws."
            )
        if self.stderr_blocks % 2:
            raise ConfigError(
                f"stderr_blocks must be an even number (0 = off), got {self.stderr_blocks}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}.")
        # numpy's SeedSequence (each chain's seed) refuses negative seeds and torch's
        # generators 64-bit overflow; the pilot adds an offset, hence the margin below 2**63.
        if not 0 <= self.seed < 2**62:
            raise ConfigError(
                f"seed must be an integer in [0, 2**62), got {self.seed}; e.g. seed=0."
            )

    @property
    def damping(self) -> float:
        """Equivalent damping λ = γ / nβ of the classical influence function (nan while either
        is still 'auto', i.e. before :func:`bif.attribute` resolves them)."""
        if isinstance(self.gamma, str) or isinstance(self.nbeta, str):
            return math.nan
        return self.gamma / self.nbeta

    @property
    def adaptive(self) -> bool:
        """True when the run length is decided by the targets (``num_draws='auto'``)."""
        return self.num_draws == "auto"

    @property
    def draws_capacity(self) -> int:
        """Draws per chain the run may record: ``num_draws``, or ``max_draws`` when 'auto'."""
        return self.max_draws if self.num_draws == "auto" else int(self.num_draws)

    @property
    def steps_per_chain(self) -> int:
        """Sampler steps per chain (at most, with ``num_draws='auto'``)."""
        return self.num_burnin + self.draws_capacity * self.thin

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BIFConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(names)}.")
        return cls(**d)

    def replace(self, **changes: Any) -> BIFConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(
                f"unknown hyperparameter(s) {unknown}; known: "
                f"{sorted(f.name for f in dataclasses.fields(self))}."
            )
        return dataclasses.replace(self, **changes)


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable lines ``name: a -> b`` for the keys whose values differ."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
