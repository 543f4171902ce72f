"""``bif bench --mislabel``: find flipped training labels by self-influence.

A known fraction of the TRAINING labels of a classification setting is flipped to another class
(:func:`bif.eval.metrics.flip_labels`), the reference model is retrained on the flipped labels
with the setting's own recipe, and every method ranks the N training examples by its
self-influence ``[N]`` at that checkpoint. Each row reports

- the ROC AUC of the ranking for "label was flipped" (:func:`bif.eval.metrics.mislabel_auc`) with
  a 95% percentile bootstrap interval (resampling the N examples, seeded);
- recall@10%: the share of flipped examples among the 10% most suspicious examples, i.e. what a
  person finds who inspects a tenth of the data in the method's order;
- the method's wall time and peak memory (as in :func:`bif.bench.runner.run_method`).

Which end of a self-influence is suspicious (:data:`DIRECTIONS`): bif's ``-Var_p(l_n)``, the
gradient dot product's ``-||∇l_n||²`` and the exact influence function's
``-∇l_nᵀ(H + λI)⁻¹∇l_n`` are all ≤ 0 and MORE NEGATIVE = more suspicious. The ``loss`` baseline
(each example's training loss at the checkpoint) is ≥ 0 and LARGER = more suspicious.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from bif.baselines.base import AttributionContext
from bif.baselines.gradients import eval_mode
from bif.bench.memory import measured
from bif.bench.runner import METHODS, collect_rows, environment_meta, make_context
from bif.bench.settings import load_setting
from bif.errors import ConfigError, DataError
from bif.eval.correlation import rankdata, roc_auc
from bif.eval.metrics import check_flip_pair, flip_labels, suspicion
from bif.eval.retrain import train_reference
from bif.task import make_task

log = logging.getLogger(__name__)

F64 = torch.float64
Direction = Literal["negative", "positive"]
RECALL_SHARE = 0.1  # recall@10%: the share of the data a person inspects


class TrainingLoss:
    """The standard baseline: each example's training loss at the checkpoint.

    A flipped label disagrees with what the other examples teach, so the model fits it worse:
    a LARGER loss is more suspicious (direction "positive").

    Args:
        chunk_size: examples per forward pass.
    """

    name = "loss"

    def __init__(self, chunk_size: int = 4096) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        self.chunk_size = chunk_size

    @torch.no_grad()
    def self_influence(self, ctx: AttributionContext) -> Tensor:
        """Per-example training loss ``l_n(w*)`` ``[N]`` (float64, CPU; larger = suspicious)."""
        task = make_task(ctx.task)
        first = next(ctx.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        parts = []
        with eval_mode(ctx.model):
            for start in range(0, ctx.x_train.shape[0], self.chunk_size):
                xb = ctx.x_train[start : start + self.chunk_size].to(device)
                yb = ctx.y_train[start : start + self.chunk_size].to(device)
                parts.append(task.loss(ctx.model, (xb, yb)).to(F64))
        return torch.cat(parts).cpu()


# name -> factory(**options): every benchmark method (those without ``self_influence`` become
# error rows) plus the loss baseline.
MISLABEL_METHODS: dict[str, Callable[..., Any]] = {**METHODS, "loss": TrainingLoss}
DEFAULT_MISLABEL_METHODS = ("bif", "grad-dot", "if-exact", "loss")
# Suspicious end of each method's self-influence (see the module docstring); methods not listed
# follow the project's convention for self-influence, "negative".
DIRECTIONS: dict[str, Direction] = {
    "bif": "negative",
    "grad-dot": "negative",
    "if-exact": "negative",
    "loss": "positive",
}


@dataclass
class MislabelRow:
    """One method's mislabel-detection result.

    Attributes:
        method: name in :data:`MISLABEL_METHODS`.
        auc: ROC AUC of the suspicion ranking for "label flipped" (0.5 = chance, 1 = perfect).
        ci_low, ci_high: 95% percentile bootstrap interval of ``auc`` (examples resampled).
        recall_at_10: share of the flipped examples among the 10% most suspicious examples.
        seconds: wall time of the self-influence computation.
        peak_mb: peak memory while it ran (:class:`~bif.bench.memory.PeakMemory`).
        direction: the suspicious end of the method's self-influence.
        options: the options the method was built with.
        error: why the method was skipped (other fields NaN), or None.
    """

    method: str
    auc: float
    ci_low: float
    ci_high: float
    recall_at_10: float
    seconds: float
    peak_mb: float
    direction: str
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _check_pair(suspicion: Tensor, is_flipped: Tensor) -> None:
    check_flip_pair(suspicion, is_flipped, "suspicion")
    n_pos = int(is_flipped.sum())
    if n_pos == 0 or n_pos == is_flipped.numel():
        raise DataError(f"need both flipped and clean examples; got {n_pos} of "
                        f"{is_flipped.numel()} flipped.")  # fmt: skip


def recall_at(suspicion: Tensor, is_flipped: Tensor, share: float = RECALL_SHARE) -> float:
    """Share of flipped examples among the ``round(share · N)`` (at least 1) most suspicious.

    Args:
        suspicion: ``[N]``, larger = more suspicious (ties keep index order).
        is_flipped: ``[N]`` bool.
        share: inspected share of the data, in (0, 1].
    """
    _check_pair(suspicion, is_flipped)
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"share must lie in (0, 1], got {share!r}.")
    k = max(1, round(share * suspicion.numel()))
    top = suspicion.to(F64).cpu().argsort(descending=True, stable=True)[:k]
    return float(is_flipped.cpu()[top].sum()) / float(is_flipped.sum())


def bootstrap_auc_ci(
    suspicion: Tensor,
    is_flipped: Tensor,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC, resampling the N examples with replacement.

    The AUC of each resample is the Mann-Whitney statistic with average ranks for ties (as
    :func:`bif.eval.correlation.roc_auc`), computed for a block of resamples at once. Resamples
    without a flipped or without a clean example have no AUC and are dropped (vanishingly rare
    unless N · fraction is tiny).

    Args:
        suspicion: ``[N]``, larger = more suspicious.
        is_flipped: ``[N]`` bool.
        n_boot: resamples.
        confidence: level of the interval.
        seed: seed of the resampling (a CPU ``torch.Generator``).

    Returns:
        ``(low, high)``.
    """
    _check_pair(suspicion, is_flipped)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}.")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence!r}.")
    s, pos = suspicion.to("cpu", F64), is_flipped.cpu()
    n = s.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)  # [B, N]
    block = max(1, 2**20 // n)  # resamples per block: ~8 MB per float64 [block, N] tensor
    aucs = []
    for start in range(0, n_boot, block):
        rows = idx[start : start + block]
        p = pos[rows]  # [b, N]
        n_pos = p.sum(1).to(F64)
        n_neg = n - n_pos
        u = (rankdata(s[rows], dim=1) * p).sum(1) - n_pos * (n_pos + 1) / 2  # [b]
        defined = (n_pos > 0) & (n_neg > 0)
        aucs.append(u[defined] / (n_pos * n_neg)[defined])
    auc = torch.cat(aucs)
    if auc.numel() == 0:
        raise DataError("no bootstrap resample holds both flipped and clean examples.")
    tail = (1.0 - confidence) / 2
    lo, hi = torch.quantile(auc, torch.tensor([tail, 1.0 - tail], dtype=F64)).tolist()
    return lo, hi


def _skipped(name: str, options: dict[str, Any], error: str) -> MislabelRow:
    nan = float("nan")
    return MislabelRow(name, nan, nan, nan, nan, nan, nan, DIRECTIONS.get(name, "negative"),
                       options, error=error)  # fmt: skip


def run_mislabel_method(
    name: str,
    ctx: AttributionContext,
    is_flipped: Tensor,
    options: dict[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> MislabelRow:
    """Self-influence of one method on ``ctx`` (flipped labels) scored against ``is_flipped [N]``.

    ImportError and ConfigError (a missing package, a method without ``self_influence``, a
    damped Hessian that is not positive definite, ...) become a row with ``error`` set.

    Raises:
        ConfigError: ``name`` is not in :data:`MISLABEL_METHODS`.
    """
    if name not in MISLABEL_METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(MISLABEL_METHODS)}.")
    options = dict(options or {})
    direction = DIRECTIONS.get(name, "negative")
    try:
        method = MISLABEL_METHODS[name](**options)
        compute = getattr(method, "self_influence", None)
        if compute is None:
            raise ConfigError(f"{name} has no self-influence; mislabel detection needs one.")
        self_influence, seconds, peak_mb = measured(lambda: compute(ctx))
    except (ImportError, ConfigError) as e:
        log.warning("%s skipped: %s", name, e)
        return _skipped(name, options, str(e))
    susp = suspicion(self_influence, is_flipped, direction)
    auc = roc_auc(susp, is_flipped)  # = mislabel_auc(self_influence, is_flipped, direction)
    lo, hi = bootstrap_auc_ci(susp, is_flipped, n_boot, 0.95, seed)
    recall = recall_at(susp, is_flipped, RECALL_SHARE)
    return MislabelRow(name, auc, lo, hi, recall, seconds, peak_mb, direction, options)


def run_mislabel(
    setting_name: str,
    methods: tuple[str, ...] = DEFAULT_MISLABEL_METHODS,
    fraction: float = 0.1,
    seed: int = 0,
    out_dir: str | Path = "bif-bench",
    method_options: dict[str, dict[str, Any]] | None = None,
    on_row: Callable[[MislabelRow], None] | None = None,
    n_boot: int = 1000,
) -> list[MislabelRow]:
    """Flip ``fraction`` of a setting's training labels, retrain, rank examples by self-influence.

    Args:
        setting_name: a classification setting (:func:`bif.bench.settings.load_setting`).
        methods: names in :data:`MISLABEL_METHODS`.
        fraction: share of the N training labels flipped (``round(fraction · N)`` examples).
        seed: seed of the flips and of the bootstrap (the model keeps the setting's seed).
        out_dir: ``out_dir/<setting>-mislabel.json`` is written (meta and rows).
        method_options: per-method keyword options, e.g. ``{"bif": {"num_chains": 4}}``.
        on_row: called with each row as soon as it is done.
        n_boot: bootstrap resamples of the AUC interval.

    Returns:
        One :class:`MislabelRow` per method, in order.

    Raises:
        ConfigError: unknown method, a regression setting, or a fraction that flips no example
            (or every one).
    """
    unknown = [m for m in methods if m not in MISLABEL_METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {sorted(MISLABEL_METHODS)}.")
    setting = load_setting(setting_name)
    if setting.task != "classification":
        raise ConfigError(f"mislabel detection flips class labels, but setting {setting_name!r} "
                          f"has task {setting.task!r}; use a classification setting.")  # fmt: skip
    n = setting.num_train
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or math.isnan(fraction):
        raise ConfigError(f"fraction must be a number in (0, 1), got {fraction!r}.")
    if not 0 < round(fraction * n) < n:
        raise ConfigError(f"fraction={fraction} flips {round(fraction * n)} of {n} labels; choose "
                          "a fraction that flips some but not all of them.")  # fmt: skip
    num_classes = int(max(setting.y_train.max(), setting.y_test.max())) + 1
    y_flipped, is_flipped = flip_labels(setting.y_train, fraction, num_classes, seed)
    flipped = dataclasses.replace(setting, y_train=y_flipped)
    model = train_reference(flipped)  # the setting's own recipe, on the flipped labels
    ctx = make_context(flipped, model)
    options = method_options or {}

    def run_one(name: str) -> MislabelRow:
        return run_mislabel_method(name, ctx, is_flipped, options.get(name), n_boot, seed)

    rows = collect_rows(methods, run_one, on_row)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "setting": setting_name,
        "num_train": n,
        "num_classes": num_classes,
        "fraction": fraction,
        "num_flipped": int(is_flipped.sum()),
        "seed": seed,
        "n_boot": n_boot,
        "recall_share": RECALL_SHARE,
        "test_accuracy": flipped.accuracy(model),
        "train_accuracy_on_flipped_labels": flipped.accuracy(model, "train"),
        "flipped_indices": is_flipped.nonzero().squeeze(1).tolist(),
        **environment_meta(),
    }
    doc = {"meta": meta, "rows": [asdict(r) for r in rows]}
    (out / f"{setting_name}-mislabel.json").write_text(json.dumps(doc, indent=1))
    return rows


def format_mislabel_table(rows: list[MislabelRow]) -> str:
    """A fixed-width table: method, AUC [interval], recall@10%, wall time, peak memory."""
    head = (f"{'method':<10} {'AUC':>7}  {'95% interval':<17} {'recall@10%':>10} "
            f"{'time (s)':>9} {'peak MB':>8}")  # fmt: skip
    lines = [head]
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<10} {'—':>7}  skipped: {r.error[:60]}")
            continue
        ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]"
        lines.append(f"{r.method:<10} {r.auc:7.3f}  {ci:<17} {r.recall_at_10:10.3f} "
                     f"{r.seconds:9.1f} {r.peak_mb:8.0f}")  # fmt: skip
    return "\n".join(lines)
