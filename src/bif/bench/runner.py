"""``bif bench``: attribution methods on a benchmark setting, scored by LDS against retraining.

Every method runs behind the :class:`~bif.baselines.base.Attributor` interface on the same
reference model, so the evaluation never knows who made the scores. Each row reports the LDS
with its bootstrap interval over queries, the method's wall time and its peak memory (peak
resident set size of the process while the method ran, reset before each method via
``/proc/self/clear_refs``; on CUDA, the peak allocated device memory).

Where the ground truth has per-token targets (``token_targets``, causal-lm), methods with a
``token_scores(ctx, tokens)`` (BIF, grad-dot, grad-cos, EK-FAC) also get the token-level LDS
(:func:`bif.eval.metrics.token_lds`) over the ground truth's token sample, in extra columns.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from bif._version import __version__
from bif.baselines.base import AttributionContext, Attributor
from bif.bench.memory import measured
from bif.bench.settings import Setting, load_setting
from bif.config import BIFConfig
from bif.errors import BIFError, ConfigError
from bif.eval.ground_truth import GroundTruth
from bif.eval.metrics import lds, token_lds
from bif.eval.retrain import load_ground_truth, train_reference

log = logging.getLogger(__name__)

# Damping of the classical influence functions (mean-loss scale), fixed across settings rather
# than tuned on the ground truth: small enough to be close to the undamped IF on well-fit models.
IF_DAMPING = 1e-3


def _bif(**kw: Any) -> Attributor:
    from bif.baselines.bif_method import BIFAttributor

    return BIFAttributor(**kw)


def _influence(kind: str) -> Callable[..., Attributor]:
    def make(**kw: Any) -> Attributor:
        from bif.baselines import influence

        cls = {"exact": influence.ExactInfluence, "cg": influence.CGInfluence,
               "lissa": influence.LiSSAInfluence}[kind]  # fmt: skip
        return cls(**{"damping": IF_DAMPING, **kw})

    return make


def _gradsim(kind: str) -> Callable[..., Attributor]:
    def make(**kw: Any) -> Attributor:
        from bif.baselines import gradsim

        return (gradsim.GradientDot if kind == "dot" else gradsim.GradientCosine)(**kw)

    return make


def _peer(module: str, cls: str) -> Callable[..., Attributor]:
    def make(**kw: Any) -> Attributor:
        import importlib

        return getattr(importlib.import_module(f"bif.baselines.{module}"), cls)(**kw)

    return make


# name -> factory(**options). Peers (trak, tracin, ekfac) need `make compare-install`.
METHODS: dict[str, Callable[..., Attributor]] = {
    "bif": _bif,
    "grad-dot": _gradsim("dot"),
    "grad-cos": _gradsim("cos"),
    "if-exact": _influence("exact"),
    "if-cg": _influence("cg"),
    "if-lissa": _influence("lissa"),
    "tracin": _peer("dattri_methods", "TracIn"),
    "trak": _peer("dattri_methods", "TRAK"),
    "ekfac": _peer("kronfluence_methods", "EKFAC"),
}
DEFAULT_METHODS = ("bif", "grad-dot", "grad-cos", "if-exact", "if-cg", "tracin", "trak", "ekfac")
TRACIN_CHECKPOINTS = 5
# Per-setting defaults of method options (user options override them key by key).
# shakespeare: the library's default BIF run (8 chains x 5,200 steps) takes ~1 s a step on 2
# CPU cores; a shorter run keeps the library's rules (auto nβ, γ, step size, friction), with the
# centred gradient of the LM demo (fine-tuning leaves a gradient at w*). TRAK's kernel needs
# proj_dim < N = 128.
SETTING_METHODS: dict[str, tuple[str, ...]] = {"shakespeare": ("bif", "grad-dot", "grad-cos",
                                                                "ekfac", "trak")}  # fmt: skip
SETTING_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "shakespeare": {
        # Unit mass, as in `bif demo lm` (bif.demo_lm.DEMO_CONFIG says why).
        "bif": dict(
            num_chains=8,
            num_burnin=100,
            num_draws=200,
            thin=5,
            center_gradient=True,
            precondition_rank=0,
            condition=150.0,
        ),
        "trak": dict(proj_dim=64),
    },
}


def method_options_for(
    setting_name: str, user: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """The setting's default method options overridden by ``user``'s, method by method."""
    out = {m: dict(o) for m, o in SETTING_OPTIONS.get(setting_name, {}).items()}
    for m, o in (user or {}).items():
        out[m] = {**out.get(m, {}), **o}
    return out


@dataclass
class BenchRow:
    method: str
    lds: float
    ci_low: float
    ci_high: float
    seconds: float
    peak_mb: float
    excluded_queries: int
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)  # e.g. BIF's draw-loss trace
    # token-level LDS over the ground truth's token sample (NaN: no token targets or no
    # per-token scores for this method); token_seconds: the extra time of the token scores
    token_lds: float = float("nan")
    token_ci_low: float = float("nan")
    token_ci_high: float = float("nan")
    token_seconds: float = float("nan")
    excluded_tokens: int = 0


def make_context(setting: Setting, model: torch.nn.Module) -> AttributionContext:
    """The shared inputs of every method: reference model, data, recipe and trajectory (none
    for settings without a bif.bench.training recipe, e.g. causal-lm: TracIn then skips)."""
    if setting.training is None:
        checkpoints, lrs = [], []
    else:
        checkpoints, lrs = trajectory(setting, TRACIN_CHECKPOINTS)
    return AttributionContext(
        model=model,
        x_train=setting.x_train,
        y_train=setting.y_train,
        x_query=setting.x_query,
        y_query=setting.y_query,
        task=setting.task,
        checkpoints=checkpoints,
        learning_rates=lrs,
        build_model=setting.build_model,
        train_fn=setting.train,
    )


def trajectory(setting: Setting, count: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """``count`` evenly spaced checkpoints of the reference training run (for TracIn)."""
    from bif.bench.training import train_single

    seed = setting.reference_seed
    total = setting.training.num_steps(setting.num_train)
    keep = {round(total * (i + 1) / count) for i in range(count)}
    saved: list[dict[str, torch.Tensor]] = []

    def callback(step: int, model: torch.nn.Module) -> None:
        if step in keep:
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    train_single(setting.build_model(seed), setting.x_train, setting.y_train, seed,
                 setting.training, callback=callback)  # fmt: skip
    return saved, [setting.training.lr] * len(saved)


def run_method(
    name: str, ctx: AttributionContext, gt_masks: torch.Tensor, gt_targets: torch.Tensor,
    options: dict[str, Any] | None = None, n_boot: int = 1000,
    token_gt: GroundTruth | None = None,
) -> BenchRow:  # fmt: skip
    """Score one method; errors become a row with ``error`` set instead of aborting the table.

    With ``token_gt`` (a ground truth with token targets) a method that has ``token_scores``
    also gets the token-level LDS (scores ``[K, N]`` for ``token_gt.token_index`` ``[K, 2]``).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}.")
    options = dict(options or {})
    try:
        method = METHODS[name](**options)
        scores, seconds, peak_mb = measured(lambda: method.scores(ctx))
        res = lds(scores, gt_masks, gt_targets, n_boot=n_boot)
        diag = method.diagnostics() if callable(getattr(method, "diagnostics", None)) else {}
        row = BenchRow(name, res.mean, res.ci_low, res.ci_high, seconds, peak_mb,
                       res.num_excluded, options, diagnostics=diag)  # fmt: skip
        if token_gt is not None and callable(getattr(method, "token_scores", None)):
            try:
                index = token_gt.token_index
                tok, row.token_seconds, _ = measured(lambda: method.token_scores(ctx, index))
                t = token_lds(tok, token_gt, n_boot=n_boot)
                row.token_lds, row.token_ci_low, row.token_ci_high = t.mean, t.ci_low, t.ci_high
                row.excluded_tokens = t.num_excluded
            except (ImportError, BIFError) as e:  # keep the sequence-level row
                log.warning("%s: no token-level LDS: %s", name, e)
        return row
    except (ImportError, ConfigError) as e:
        log.warning("%s skipped: %s", name, e)
        nan = float("nan")
        return BenchRow(name, nan, nan, nan, nan, nan, 0, options, error=str(e))


R = TypeVar("R")


def collect_rows(
    methods: tuple[str, ...], run_one: Callable[[str], R], on_row: Callable[[R], None] | None
) -> list[R]:
    """``run_one(name)`` for every method in order, reporting each row as soon as it is done."""
    rows = []
    for name in methods:
        row = run_one(name)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def environment_meta() -> dict[str, Any]:
    """Library versions and torch threads, recorded with every benchmark artefact."""
    return {
        "bif_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def run_bench(
    setting_name: str,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    out_dir: str | Path = "bif-bench",
    method_options: dict[str, dict[str, Any]] | None = None,
    n_boot: int = 1000,
    on_row: Callable[[BenchRow], None] | None = None,
) -> list[BenchRow]:
    """Run ``methods`` on a setting and write ``out_dir/<setting>.json`` and ``.png``."""
    setting = load_setting(setting_name)
    gt = load_ground_truth(setting_name)
    gt.check_setting(setting)
    model = train_reference(setting)
    ctx = make_context(setting, model)
    options = method_options_for(setting_name, method_options)
    masks, targets = gt.masks, gt.mean_targets()

    token_gt = gt if gt.has_tokens else None

    def run_one(name: str) -> BenchRow:
        return run_method(name, ctx, masks, targets, options.get(name), n_boot, token_gt)

    rows = collect_rows(methods, run_one, on_row)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "setting": setting_name,
        "num_train": setting.num_train,
        "num_query": setting.num_query,
        "num_subsets": gt.num_subsets,
        "num_seeds": gt.num_seeds,
        "num_tokens": 0 if token_gt is None else len(gt.token_index),
        "test_accuracy": setting.accuracy(model),
        "task": setting.task,
        "method_options": options,
        **environment_meta(),
    }
    doc = {"meta": meta, "rows": [asdict(r) for r in rows]}
    (out / f"{setting_name}.json").write_text(json.dumps(doc, indent=1))
    from bif.bench.plots import lds_chart

    lds_chart(rows, f"{setting_name}: LDS (M={gt.num_subsets}, R={gt.num_seeds})",
              out / f"{setting_name}.png")  # fmt: skip
    return rows


def format_table(rows: list[BenchRow]) -> str:
    """A fixed-width table: method, LDS [interval], wall time, peak memory; and, when any row
    has one, the token-level LDS [interval] ("—" for methods without per-token scores)."""
    tokens = any(r.token_lds == r.token_lds for r in rows)  # any non-NaN
    head = f"{'method':<10} {'LDS':>7}  {'95% interval':<17} {'time (s)':>9} {'peak MB':>8}"
    lines = [head + (f"  {'token LDS':>9}  {'95% interval':<17}" if tokens else "")]
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<10} {'—':>7}  skipped: {r.error[:60]}")
            continue
        ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]"
        line = f"{r.method:<10} {r.lds:7.3f}  {ci:<17} {r.seconds:9.1f} {r.peak_mb:8.0f}"
        if tokens and r.token_lds == r.token_lds:
            line += f"  {r.token_lds:9.3f}  [{r.token_ci_low:.3f}, {r.token_ci_high:.3f}]"
        elif tokens:
            line += f"  {'—':>9}"
        lines.append(line)
    return "\n".join(lines)


@dataclass
class SweepPoint:
    num_chains: int
    num_draws: int
    lds: float
    ci_low: float
    ci_high: float
    seconds: float
    adaptive: bool = False  # num_draws='auto' (num_draws: the draws it took)
    stop: str = ""  # adaptive: why it stopped


def run_sweep(
    setting_name: str,
    chains: tuple[int, ...] = (2, 4, 8, 16),
    draws: tuple[int, ...] = (25, 50, 100, 200, 400),
    out_dir: str | Path = "bif-bench",
    n_boot: int = 1000,
    on_point: Callable[[SweepPoint], None] | None = None,
    adaptive: bool = True,
    **bif_options: Any,
) -> list[SweepPoint]:
    """BIF's LDS on a grid of chains × draws (all else at the defaults) to show where it saturates,
    and (``adaptive``) the point where a ``num_draws='auto'`` run stops by itself.

    Writes ``out_dir/<setting>-sweep.json`` and ``.png``.
    """
    setting = load_setting(setting_name)
    gt = load_ground_truth(setting_name)
    gt.check_setting(setting)
    ctx = make_context(setting, train_reference(setting))
    bif_options = {**method_options_for(setting_name, None).get("bif", {}), **bif_options}
    points = []
    for c in chains:
        for d in draws:
            row = run_method("bif", ctx, gt.masks, gt.mean_targets(),
                             {**bif_options, "num_chains": c, "num_draws": d}, n_boot)  # fmt: skip
            if row.error:
                raise ConfigError(row.error)
            p = SweepPoint(c, d, row.lds, row.ci_low, row.ci_high, row.seconds)
            points.append(p)
            if on_point is not None:
                on_point(p)
    if adaptive:
        # The adaptive run at the default chains: where it stops on the same axes.
        opts = {**bif_options, "num_draws": "auto"}
        row = run_method("bif", ctx, gt.masks, gt.mean_targets(), opts, n_boot)
        if row.error:
            raise ConfigError(row.error)
        stop = row.diagnostics.get("adaptive") or {}
        c = int(opts.get("num_chains", BIFConfig().num_chains))
        p = SweepPoint(c, int(row.diagnostics["num_draws"]), row.lds, row.ci_low, row.ci_high,
                       row.seconds, True, str(stop.get("reason", "")))  # fmt: skip
        points.append(p)
        if on_point is not None:
            on_point(p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"setting": setting_name, "options": bif_options, "points": [asdict(p) for p in points]}
    (out / f"{setting_name}-sweep.json").write_text(json.dumps(doc, indent=1))
    from bif.bench.plots import sweep_chart

    sweep_chart(points, f"{setting_name}: BIF LDS vs compute", out / f"{setting_name}-sweep.png")
    return points
