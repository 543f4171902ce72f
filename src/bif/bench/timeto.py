"""Time to a baseline's LDS (``bif bench SETTING --time-to-ekfac``): the cheapest BIF run that
reaches EK-FAC's LDS on a setting, against EK-FAC's own wall time in the same process.

The reference method runs first; then BIF runs at each ``chains × draws`` point of a grid in
order of sampler cost, ``chains · (num_burnin + draws)`` steps, until one reaches the reference's
LDS (point estimate against point estimate); optionally the ``num_draws="auto"`` run too. Every
BIF row records its diagnostics verdict. Times are whole ``Attributor.scores`` calls (curvature
pass, pilot, sampling, estimator), so the ratio is what a user waits for, measured in one process
(one torch thread: ``--threads 1``) so that both sides see the same machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bif.config import BIFConfig
from bif.errors import ConfigError

DEFAULT_GRID = ((4, 250), (8, 250), (8, 500), (8, 1000), (8, 2000))


@dataclass
class TimePoint:
    """One run: BIF at ``num_chains × num_draws`` (``adaptive``: the draws it took), or the
    reference (``method`` other than ``"bif"``)."""

    method: str
    num_chains: int
    num_draws: int
    lds: float
    ci_low: float
    ci_high: float
    seconds: float
    verdict: str = ""
    adaptive: bool = False
    reached: bool = False  # LDS ≥ the reference's


def parse_grid(text: str) -> tuple[tuple[int, int], ...]:
    """``"4x250,8x500"`` → ``((4, 250), (8, 500))``."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            c, d = (int(v) for v in part.lower().split("x"))
        except ValueError as e:
            raise ConfigError(f"--grid entries are CHAINSxDRAWS (e.g. 8x500), got {part!r}.") from e
        if c < 2 or d < 1:
            raise ConfigError(f"--grid needs chains >= 2 and draws >= 1, got {part!r}.")
        out.append((c, d))
    if not out:
        raise ConfigError("--grid is empty; give e.g. 4x250,8x500.")
    return tuple(out)


def by_cost(grid: tuple[tuple[int, int], ...], burnin: int) -> list[tuple[int, int]]:
    """Grid points cheapest first: ``chains · (burnin + draws)`` sampler steps."""
    return sorted(set(grid), key=lambda p: (p[0] * (burnin + p[1]), p[0]))


def run_time_to(
    setting_name: str,
    reference: str = "ekfac",
    grid: tuple[tuple[int, int], ...] = DEFAULT_GRID,
    adaptive: bool = False,
    out_dir: str | Path = "bif-bench",
    n_boot: int = 1000,
    on_point: Callable[[TimePoint], None] | None = None,
    **bif_options: Any,
) -> dict[str, Any]:
    """Run the reference, then BIF up the grid until it reaches the reference's LDS.

    Returns (and writes as ``out_dir/<setting>-time-to-<reference>.json``) ``{"setting",
    "reference": TimePoint, "points": [TimePoint], "first": index of the first BIF point that
    reached the reference or None, "ratio": its seconds / the reference's, "adaptive_ratio"}``.
    """
    from bif.bench.runner import make_context, method_options_for, run_method
    from bif.bench.settings import load_setting
    from bif.eval.retrain import load_ground_truth, train_reference

    setting = load_setting(setting_name)
    gt = load_ground_truth(setting_name)
    gt.check_setting(setting)
    ctx = make_context(setting, train_reference(setting))
    options = method_options_for(setting_name, None)
    bif_options = {**options.get("bif", {}), **bif_options}
    burnin = int(bif_options.get("num_burnin", BIFConfig().num_burnin))

    def point(method: str, opts: dict[str, Any], chains: int = 0, draws: int = 0) -> TimePoint:
        row = run_method(method, ctx, gt.masks, gt.mean_targets(), opts, n_boot)
        if row.error:
            raise ConfigError(f"{method}: {row.error}")
        diag = row.diagnostics or {}
        auto = opts.get("num_draws") == "auto"
        draws = int(diag.get("num_draws", draws)) if auto else draws
        return TimePoint(method, chains, draws, row.lds, row.ci_low, row.ci_high, row.seconds,
                         str(diag.get("verdict", "")), auto)  # fmt: skip

    ref = point(reference, options.get(reference, {}))
    if on_point is not None:
        on_point(ref)
    points: list[TimePoint] = []
    first = None
    for c, d in by_cost(grid, burnin):
        p = point("bif", {**bif_options, "num_chains": c, "num_draws": d}, c, d)
        p.reached = p.lds >= ref.lds
        points.append(p)
        if on_point is not None:
            on_point(p)
        if p.reached:
            first = len(points) - 1
            break
    adaptive_ratio = math.nan
    if adaptive:
        c = int(bif_options.get("num_chains", BIFConfig().num_chains))
        p = point("bif", {**bif_options, "num_draws": "auto"}, c)
        p.reached = p.lds >= ref.lds
        points.append(p)
        adaptive_ratio = p.seconds / ref.seconds
        if on_point is not None:
            on_point(p)
    ratio = points[first].seconds / ref.seconds if first is not None else math.nan
    doc = {
        "setting": setting_name,
        "reference": asdict(ref),
        "points": [asdict(p) for p in points],
        "first": first,
        "ratio": ratio,
        "adaptive_ratio": adaptive_ratio,
        "options": bif_options,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{setting_name}-time-to-{reference}.json").write_text(json.dumps(doc, indent=1))
    return doc
