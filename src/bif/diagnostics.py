"""Chain diagnostics of a BIF run and their verdict (pure functions of the saved traces).

What is checked, on the draw loss ``[C, D]``, every query trace ``[C, D, Q]``, a fixed sample of
training-loss traces ``[C, D, S]`` and (for language models) a sample of token traces:

- **R-hat**: ArviZ's rank-normalised split R-hat (Vehtari et al. 2021, the max of the bulk and
  folded versions). Chains that disagree (one started elsewhere, one stuck, no mixing) give
  R-hat > 1.
- **ESS**: ArviZ's bulk and tail effective sample sizes. Frozen or slowly mixing chains have an
  ESS of a few per chain whatever the number of draws.
- **Drift**: the draw loss regressed on the draw index in each chain. Under a stationary chain the
  trend explains ~1/ESS of the variance and its sign is random across chains; a chain still
  sliding (a burn-in too short, a checkpoint that is not a minimum) has one sign in every chain
  and explains most of the variance. The test statistic is Geweke's: the first 10% of each
  chain against its last 50%, each mean's error from its own ESS, pooled over chains.
- **Energy** ``U(w) - U(w*)`` of the draws, which sits near ``P/2`` at equilibrium for a locally
  quadratic posterior: a mean below 0 means the chains settled below the checkpoint (not a local
  posterior); a spike far above the chain's median marks a sampler near its stability limit.
- **Error of the scores**: the reported standard error of each query's top-k scores relative to
  their size. A query whose top scores are not resolved (relative error >
  :data:`MAX_RELATIVE_MCSE`) is listed; the verdict warns when the median query is beyond
  :data:`MEDIAN_MCSE_WARN`.

The verdict is ``"fail"`` if any check fails, else ``"warn"`` if any warns, else ``"ok"``; every
reason carries the fix it suggests. Thresholds are module constants; the false-alarm rate of the
defaults is measured by ``tests/test_diagnostics_calibration.py`` (slow marker).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Vehtari et al. (2021): R-hat below 1.01 and bulk/tail ESS above 100 per chain for reliable
# estimates. The warn levels follow them; the fail levels mark chains that are plainly broken.
# R-hat is noisy at O(1/ESS): the 1.01 level applies to the draw loss and to the median query
# trace; the max over many sampled traces warns only beyond RHAT_WARN_MAX.
RHAT_WARN = 1.01
RHAT_WARN_MAX = 1.05
RHAT_FAIL = 1.1
ESS_WARN_PER_CHAIN = 25  # ESS below 25·C on the draw loss: few effective draws
ESS_FAIL = 20  # total ESS below 20: essentially frozen chains
# Drift: Geweke's pooled |z| beyond this (two-sided p ≈ 5e-4) AND a trend explaining this share
# of each chain's variance on average.
DRIFT_Z = 3.5
DRIFT_R2_WARN = 0.1
DRIFT_R2_FAIL = 0.5
# Monte-Carlo error of the top-k scores of a query relative to their mean magnitude.
MAX_RELATIVE_MCSE = 0.1
TOP_K = 5
# The verdict warns when the median query's top-k error exceeds this (scores not resolved even
# in their order); single unresolved queries are listed and marked, not part of the verdict.
MEDIAN_MCSE_WARN = 0.3
# Energy: a mean of U(w) - U(w*) below 0 means the chains found lower ground than w* (the
# posterior is not centred on the checkpoint); a draw whose energy lies beyond ENERGY_SPIKE
# robust standard deviations (median/MAD, per chain) above the chain's median is a spike of a
# sampler near its stability limit (healthy chains: max about 4 over 2,000 draws).
ENERGY_SPIKE = 8.0
# Token traces sampled for language models.
TOKEN_SAMPLE = 64


def robust_location_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-chain median and normal-consistent robust scale (1.4826·MAD) of ``[C, D]`` draws;
    both ``[C, 1]``. The energy-spike check measures excursions in these units."""
    med = np.median(x, axis=1, keepdims=True)
    return med, 1.4826 * np.median(np.abs(x - med), axis=1, keepdims=True)


def energy_spike_limit(num_params: int, num_draws: int) -> float:
    """The spike threshold in robust standard deviations: :data:`ENERGY_SPIKE`, or for few
    parameters the largest of ``num_draws`` healthy draws, whichever is higher.

    At equilibrium on a locally quadratic posterior ``U(w) - U(w*) ~ Gamma(P/2, 1)``, whose
    right tail in median/MAD units is long when P is small (P = 5: the largest of 16,000 draws
    lies about 10 robust SDs above the median). The limit is that Gamma's ``1 - 1e-3/num_draws``
    quantile in the same units (independent draws: conservative for correlated ones); it falls
    below 8 from about P = 40 on.
    """
    from scipy import stats

    k = max(float(num_params), 1.0) / 2
    med = float(stats.gamma.median(k))
    # MAD of Gamma(k): the m with P(|X - med| <= m) = 1/2, by bisection on [0, 4 med + 10].
    a, b = 0.0, 4 * med + 10.0
    for _ in range(60):
        m = (a + b) / 2
        inside = stats.gamma.cdf(med + m, k) - stats.gamma.cdf(max(med - m, 0.0), k)
        a, b = (m, b) if inside < 0.5 else (a, m)
    mad = 1.4826 * (a + b) / 2
    top = float(stats.gamma.ppf(1 - 1e-3 / max(num_draws, 1), k))
    return max(ENERGY_SPIKE, (top - med) / mad)


class DiagnosticWarning(UserWarning):
    """A BIF run whose chain diagnostics are not ``"ok"`` (see ``result.diagnostics``)."""


@dataclass(frozen=True)
class Reason:
    """One finding behind a non-ok verdict."""

    level: str  # "warn" | "fail"
    check: str  # "rhat" | "ess" | "drift" | "mcse" | ...
    message: str
    fix: str


@dataclass
class Diagnostics:
    """The diagnostics of one run (JSON-serialisable via :meth:`to_dict`).

    Attributes:
        verdict: "ok", "warn" or "fail".
        reasons: what made it so, each with a suggested fix.
        summary: one row per trace group (``draw_loss``, ``query``, ``train_sample``,
            ``tokens``) with the max R-hat and the min bulk/tail ESS over its traces.
        query: per-query R-hat, bulk ESS and relative Monte-Carlo error of the top-k scores.
        unresolved: queries whose top-k scores are not resolved.
        drift: Geweke z per chain, the pooled z, and the mean R² of the linear trend.
        energy: mean energy U(w) - U(w*) of the draws relative to P/2 (≈ 1 at equilibrium for a
            locally quadratic posterior), per chain; informative, not part of the verdict.
    """

    verdict: str
    reasons: list[Reason]
    summary: dict[str, dict[str, float]]
    query: dict[str, list[float]]
    unresolved: list[int]
    drift: dict[str, Any]
    energy: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnostics:
        d = dict(d)
        d["reasons"] = [Reason(**r) for r in d.get("reasons", [])]
        return cls(**d)

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}"]
        for r in self.reasons:
            lines.append(f"  [{r.level}] {r.check}: {r.message}")
            lines.append(f"         fix: {r.fix}")
        lines.append(f"  {'traces':<14}{'max R-hat':>10}{'min bulk ESS':>14}{'min tail ESS':>14}")
        for name, row in self.summary.items():
            lines.append(
                f"  {name:<14}{row['rhat_max']:>10.3f}{row['ess_bulk_min']:>14.0f}"
                f"{row['ess_tail_min']:>14.0f}"
            )
        d = self.drift
        lines.append(
            f"  drift: Geweke z = {d.get('z', math.nan):+.2f}, trend R² = "
            f"{d.get('r2_mean', math.nan):.3f} (mean over chains)"
        )
        if self.unresolved:
            shown = ", ".join(map(str, self.unresolved[:20]))
            more = f" and {len(self.unresolved) - 20} more" if len(self.unresolved) > 20 else ""
            lines.append(f"  unresolved queries: {shown}{more}")
        return "\n".join(lines)


def _clean(x: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python numbers, for strict JSON."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _np(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def rhat(x: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat (ArviZ) of traces ``[C, D, ...]`` -> ``[...]``."""
    from arviz_stats.base import array_stats

    return np.asarray(array_stats.rhat(x, chain_axis=0, draw_axis=1, method="rank"))


def ess(x: np.ndarray, method: str = "bulk") -> np.ndarray:
    """Bulk or tail effective sample size (ArviZ) of traces ``[C, D, ...]`` -> ``[...]``."""
    from arviz_stats.base import array_stats

    kw: dict[str, Any] = {"prob": (0.05, 0.95)} if method == "tail" else {}
    return np.asarray(array_stats.ess(x, chain_axis=0, draw_axis=1, method=method, **kw))


def _finite_draws(x: np.ndarray) -> np.ndarray:
    """Drop trailing draws that no chain recorded (NaN rows of a partial run)."""
    ok = np.isfinite(x.reshape(x.shape[0], x.shape[1], -1)).all(axis=(0, 2))
    return x[:, : int(ok.sum())] if ok.all() or not ok.any() else x[:, ok]


def _group(x: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """R-hat and bulk/tail ESS of traces [C, D, K]; constant traces (zero spread) are left out."""
    const = x.std(axis=(0, 1)) == 0
    x = x[..., ~const]
    if x.shape[-1] == 0 or x.shape[0] * x.shape[1] < 8:
        nan, empty = math.nan, np.array([])
        return {"rhat_max": nan, "ess_bulk_min": nan, "ess_tail_min": nan}, empty, empty
    r, eb, et = rhat(x), ess(x, "bulk"), ess(x, "tail")
    return (
        {
            "rhat_max": float(np.nanmax(r)),
            "rhat_median": float(np.nanmedian(r)),
            "ess_bulk_min": float(np.nanmin(eb)),
            "ess_bulk_median": float(np.nanmedian(eb)),
            "ess_tail_min": float(np.nanmin(et)),
            "traces": int(x.shape[-1]),
        },
        r,
        eb,
    )


def drift(draw_loss: np.ndarray) -> dict[str, Any]:
    """Geweke's test (first 10% vs last 50% of each chain) and the linear-trend R² per chain.

    Each part's mean error is ``sd / sqrt(ESS)`` with ESS from ArviZ on that part alone; the
    chains' z-scores are pooled as ``Σ z_c / sqrt(C)`` (independent chains).
    """
    c, d = draw_loss.shape
    if d < 20:
        return {"z": math.nan, "z_chain": [], "r2": [], "r2_mean": math.nan, "slope_sign": []}
    a, b = draw_loss[:, : max(2, d // 10)], draw_loss[:, d // 2 :]
    zs, r2s, signs = [], [], []
    t = np.arange(d, dtype=np.float64)
    for i in range(c):
        se2 = 0.0
        for part in (a[i], b[i]):
            v = part.var(ddof=1)
            n_eff = float(ess(part[None, :, None], "mean")[0]) if v > 0 else len(part)
            n_eff = min(max(n_eff, 1.0), len(part)) if math.isfinite(n_eff) else 1.0
            se2 += v / n_eff
        diff = b[i].mean() - a[i].mean()
        zs.append(diff / math.sqrt(se2) if se2 > 0 else 0.0)
        y = draw_loss[i]
        r = np.corrcoef(t, y)[0, 1] if y.std() > 0 else 0.0
        r2s.append(float(r * r))
        signs.append(float(np.sign(r)))
    z = float(np.sum(zs) / math.sqrt(c))
    return {
        "z": z,
        "z_chain": [float(v) for v in zs],
        "r2": r2s,
        "r2_mean": float(np.mean(r2s)),
        "slope_sign": signs,
    }


def relative_mcse(scores: Tensor, mcse: Tensor, k: int = TOP_K) -> np.ndarray:
    """Per query, the mean Monte-Carlo error of its ``k`` largest-|score| entries relative to
    their mean magnitude ``[Q]`` (NaN where the error is unknown)."""
    k = min(k, scores.shape[1])
    top = scores.abs().topk(k, dim=1).indices
    mag = scores.abs().gather(1, top).mean(1)
    err = mcse.gather(1, top).mean(1)
    # A query whose observable never moved (all scores and errors 0) is resolved: nothing to
    # attribute. Zero scores with a nonzero error are not.
    zero = torch.where(err > 0, torch.full_like(mag, math.inf), torch.zeros_like(mag))
    return _np(torch.where(mag > 0, err / mag, zero))


def diagnose(
    draw_loss: Tensor,
    query_trace: Tensor,
    scores: Tensor,
    stderr: Tensor | None,
    train_trace: Tensor | None = None,
    token_trace: Tensor | None = None,
    energy: Tensor | None = None,
    num_params: int | None = None,
) -> Diagnostics:
    """Diagnostics and verdict of one run.

    Args:
        draw_loss: ``[C, D]`` mean training loss at each draw.
        query_trace: ``[C, D, Q]`` the query observables at each draw.
        scores: ``[Q, N]`` the BIF.
        stderr: ``[Q, N]`` the reported standard error of the scores (``None``: no error check).
        train_trace: ``[C, D, S]`` sampled training-loss traces.
        token_trace: ``[C, D, K]`` sampled per-token loss traces (language models).
        energy: ``[C, D]`` U(w) - U(w*) at each draw; ``num_params``: P.
    """
    reasons: list[Reason] = []
    dl = _finite_draws(_np(draw_loss))
    c, d = dl.shape
    groups = {"draw_loss": dl[..., None], "query": _finite_draws(_np(query_trace))}
    if train_trace is not None and train_trace.shape[-1] > 0:
        groups["train_sample"] = _finite_draws(_np(train_trace))
    if token_trace is not None and token_trace.shape[-1] > 0:
        groups["tokens"] = _finite_draws(_np(token_trace))
    summary: dict[str, dict[str, float]] = {}
    per_query: dict[str, list[float]] = {}
    for name, x in groups.items():
        summary[name], r, eb = _group(x)
        if name == "query":
            const = x.std(axis=(0, 1)) == 0
            rq = np.full(x.shape[-1], math.nan)
            eq = np.full(x.shape[-1], math.nan)
            if r.size:
                rq[~const], eq[~const] = r, eb
            per_query["rhat"], per_query["ess_bulk"] = rq.tolist(), eq.tolist()

    # R-hat over every trace group: chains that disagree.
    worst = max(
        ((row["rhat_max"], n) for n, row in summary.items() if math.isfinite(row["rhat_max"])),
        default=(math.nan, ""),
    )
    loss_r = summary["draw_loss"]["rhat_max"]
    med_q = summary.get("query", {}).get("rhat_median", math.nan)
    soft = max((v for v in (loss_r, med_q) if math.isfinite(v)), default=math.nan)
    if worst[0] > RHAT_FAIL:
        reasons.append(Reason(
            "fail", "rhat",
            f"R-hat {worst[0]:.3f} on the {worst[1]} traces (> {RHAT_FAIL}): the chains sample "
            "different distributions (one stuck, started elsewhere, or not mixing)",
            "raise num_burnin and num_draws; keep step_size='auto'; check that the model is at a "
            "trained checkpoint",
        ))  # fmt: skip
    elif worst[0] > RHAT_WARN_MAX or soft > RHAT_WARN:
        what = (
            f"R-hat {worst[0]:.3f} on the {worst[1]} traces (> {RHAT_WARN_MAX})"
            if worst[0] > RHAT_WARN_MAX
            else f"R-hat {soft:.3f} of the draw loss or the median query trace (> {RHAT_WARN})"
        )
        reasons.append(Reason(
            "warn", "rhat",
            f"{what}: the chains do not yet agree",
            "take more draws (num_draws) or a longer burn-in (num_burnin)",
        ))  # fmt: skip

    # ESS of the draw loss: the slowest-mixing summary of the whole training set.
    e_loss = summary["draw_loss"]["ess_bulk_min"]
    e_all = min(
        (row["ess_bulk_min"] for row in summary.values() if math.isfinite(row["ess_bulk_min"])),
        default=math.nan,
    )
    if math.isfinite(e_all) and e_all < ESS_FAIL:
        reasons.append(Reason(
            "fail", "ess",
            f"effective sample size {e_all:.0f} (< {ESS_FAIL}) from {c}×{d} draws: the chains "
            "hardly move",
            "let the step size be automatic (step_size='auto'); a given step_size may be far too "
            "small for this sampler",
        ))  # fmt: skip
    elif math.isfinite(e_loss) and e_loss < ESS_WARN_PER_CHAIN * c:
        reasons.append(Reason(
            "warn", "ess",
            f"bulk ESS of the draw loss {e_loss:.0f} (< {ESS_WARN_PER_CHAIN}·C = "
            f"{ESS_WARN_PER_CHAIN * c}) from {c}×{d} draws",
            "take more draws (num_draws), or num_draws='auto' to run until resolved",
        ))  # fmt: skip

    dr = drift(dl)
    z, r2 = dr["z"], dr["r2_mean"]
    if math.isfinite(z) and abs(z) > DRIFT_Z and r2 > DRIFT_R2_WARN:
        level = "fail" if r2 > DRIFT_R2_FAIL else "warn"
        way = "upward" if z > 0 else "downward"
        reasons.append(Reason(
            level, "drift",
            f"the draw loss drifts {way} (Geweke z = {z:+.1f}; the trend explains "
            f"{100 * r2:.0f}% of each chain's variance): the chains are not stationary, and a "
            "shared trend inflates every covariance",
            "raise num_burnin; if the checkpoint is not a minimum of the training loss keep "
            "center_gradient=True; a larger gamma keeps the chains nearer w*",
        ))  # fmt: skip

    unresolved: list[int] = []
    if stderr is not None:
        rel = relative_mcse(scores.double(), stderr.double())
        per_query["relative_mcse"] = rel.tolist()
        unresolved = [int(q) for q in np.nonzero(~(rel <= MAX_RELATIVE_MCSE))[0]]
        med = float(np.median(np.where(np.isfinite(rel), rel, np.inf))) if rel.size else 0.0
        if med > MEDIAN_MCSE_WARN:
            reasons.append(Reason(
                "warn", "mcse",
                f"the median query's top-{TOP_K} scores have a standard error of "
                f"{100 * med:.0f}% of their size (> {100 * MEDIAN_MCSE_WARN:.0f}%); "
                f"{len(unresolved)} of {scores.shape[0]} queries are above "
                f"{100 * MAX_RELATIVE_MCSE:.0f}%",
                "take more draws (num_draws), or num_draws='auto' to run until resolved",
            ))  # fmt: skip

    en: dict[str, Any] = {}
    if energy is not None and num_params:
        e = _finite_draws(_np(energy))
        if e.size:
            ratio = e[:, e.shape[1] // 2 :].mean(1) / (num_params / 2)
            med, mad = robust_location_scale(e)
            spike = np.where(mad[:, 0] > 0, ((e - med) / np.where(mad > 0, mad, 1)).max(1), 0.0)
            spike_limit = energy_spike_limit(num_params, e.size)
            en = {
                "relative_to_half_p": ratio.tolist(),
                "mean": float(ratio.mean()),
                "spike": spike.tolist(),
            }
            if ratio.mean() < 0:
                reasons.append(Reason(
                    "warn", "energy",
                    f"the draws sit below the checkpoint's energy (mean U(w) - U(w*) = "
                    f"{ratio.mean():.2f}·P/2): w* is not a minimum of the sampled potential, so "
                    "the chains sample a basin next to the checkpoint rather than around it",
                    "keep center_gradient=True (the default); localise harder (smaller radius, "
                    "larger gamma); or attribute a checkpoint trained to convergence",
                ))  # fmt: skip
            en["spike_limit"] = spike_limit
            if e.shape[1] >= 20 and float(spike.max()) > spike_limit:
                c_bad = int(spike.argmax())
                reasons.append(Reason(
                    "warn", "energy",
                    f"chain {c_bad}'s energy spiked {spike.max():.1f} robust standard deviations "
                    f"above its median (> {spike_limit:.3g}): the sampler is near its stability "
                    "limit",
                    "let the step size be automatic (step_size='auto'), or lower step_size",
                ))  # fmt: skip

    level = "fail" if any(r.level == "fail" for r in reasons) else (
        "warn" if reasons else "ok"
    )  # fmt: skip
    thresholds = {
        "rhat_warn": RHAT_WARN, "rhat_fail": RHAT_FAIL, "ess_warn_per_chain": ESS_WARN_PER_CHAIN,
        "ess_fail": ESS_FAIL, "rhat_warn_max": RHAT_WARN_MAX, "energy_spike": ENERGY_SPIKE,
        "median_mcse_warn": MEDIAN_MCSE_WARN, "drift_z": DRIFT_Z, "drift_r2_warn": DRIFT_R2_WARN,
        "drift_r2_fail": DRIFT_R2_FAIL, "max_relative_mcse": MAX_RELATIVE_MCSE, "top_k": TOP_K,
    }  # fmt: skip
    return Diagnostics(level, reasons, summary, per_query, unresolved, dr, en, thresholds)


def warn_if_not_ok(diag: Diagnostics, stacklevel: int = 3) -> None:
    """Raise a :class:`DiagnosticWarning` for a non-ok verdict (its reasons and fixes)."""
    if diag.verdict == "ok":
        return
    text = "; ".join(f"{r.check}: {r.message} (fix: {r.fix})" for r in diag.reasons)
    warnings.warn(
        f"BIF diagnostics verdict {diag.verdict!r}: {text}. See result.diagnostics.",
        DiagnosticWarning,
        stacklevel=stacklevel,
    )
