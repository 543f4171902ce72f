"""Charts of benchmark results (PNG, matplotlib's non-interactive backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def lds_chart(rows: Sequence[Any], title: str, path: Path) -> None:
    """Horizontal bars of LDS with their bootstrap intervals, one per method."""
    ok = [r for r in rows if not r.error and math.isfinite(r.lds)]
    fig, ax = plt.subplots(figsize=(6, 0.45 * max(len(ok), 1) + 1.2))
    names = [r.method for r in ok]
    vals = [r.lds for r in ok]
    err = [[r.lds - r.ci_low for r in ok], [r.ci_high - r.lds for r in ok]]
    colors = ["#2b8a3e" if n.startswith("bif") else "#868e96" for n in names]
    ax.barh(names, vals, xerr=err, color=colors, capsize=3)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("LDS (Spearman, mean over queries; 95% bootstrap interval)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_chart(points: Sequence[Any], title: str, path: Path) -> None:
    """BIF's LDS against compute (chains × draws), one line per number of chains."""
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = [p for p in points if not getattr(p, "adaptive", False)]
    for chains in sorted({p.num_chains for p in grid}):
        pts = sorted((p for p in grid if p.num_chains == chains), key=lambda p: p.num_draws)
        x = [p.num_chains * p.num_draws for p in pts]
        ax.errorbar(x, [p.lds for p in pts],
                    yerr=[[p.lds - p.ci_low for p in pts], [p.ci_high - p.lds for p in pts]],
                    marker="o", capsize=3, label=f"{chains} chains")  # fmt: skip
    for p in points:
        if getattr(p, "adaptive", False):
            ax.errorbar([p.num_chains * p.num_draws], [p.lds],
                        yerr=[[p.lds - p.ci_low], [p.ci_high - p.lds]], marker="*",
                        markersize=14, color="black", capsize=3,
                        label=f"num_draws='auto' ({p.num_chains}×{p.num_draws})")  # fmt: skip
    ax.set_xscale("log")
    # Plain numbers at the measured totals; matplotlib's minor log labels collide here.
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    totals = sorted({p.num_chains * p.num_draws for p in points})
    ax.xaxis.set_major_locator(FixedLocator(totals))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("draws in total (chains × draws per chain)")
    ax.set_ylabel("LDS")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
