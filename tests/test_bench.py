"""End-to-end LDS regression on the shipped digits ground truth, and the bench runner's plumbing.

The margin is not a hand-picked number: BIF must beat the gradient dot product on the SAME
queries with the lower end of a paired bootstrap interval of the per-query LDS difference above
zero (99%), i.e. a difference the interval resolves.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bif.bench.runner import (
    BenchRow,
    format_table,
    make_context,
    run_bench,
    run_method,
)
from bif.bench.settings import load_setting
from bif.eval.correlation import bootstrap_mean_ci
from bif.eval.metrics import lds
from bif.eval.retrain import load_ground_truth, train_reference

NUM_QUERIES = 40  # a reduced digits setting: the first 40 of the shipped 200 queries


@pytest.fixture(scope="module")
def digits_reduced():
    setting = load_setting("digits")
    gt = load_ground_truth("digits")
    gt.check_setting(setting)
    model = train_reference(setting)
    ctx = make_context(setting, model)
    ctx = dataclasses.replace(
        ctx, x_query=ctx.x_query[:NUM_QUERIES], y_query=ctx.y_query[:NUM_QUERIES]
    )
    targets = gt.mean_targets()[:, :NUM_QUERIES]
    return ctx, gt.masks, targets


def test_bif_beats_gradient_dot_product_on_digits(digits_reduced) -> None:
    ctx, masks, targets = digits_reduced
    from bif.baselines.bif_method import BIFAttributor
    from bif.baselines.gradsim import GradientDot

    bif_lds = lds(BIFAttributor().scores(ctx), masks, targets, n_boot=200)
    dot_lds = lds(GradientDot().scores(ctx), masks, targets, n_boot=200)
    diff = bif_lds.per_query - dot_lds.per_query  # [Q], paired by query
    keep = torch.isfinite(diff)
    assert int(keep.sum()) >= NUM_QUERIES - 2
    low, high = bootstrap_mean_ci(diff[keep], n_boot=2000, seed=0, confidence=0.99)
    assert low > 0, (
        f"BIF LDS {bif_lds.mean:.3f} vs grad-dot {dot_lds.mean:.3f}: "
        f"99% interval of the paired difference [{low:.3f}, {high:.3f}] includes 0"
    )


def test_run_method_row_and_unknown_method(digits_reduced) -> None:
    ctx, masks, targets = digits_reduced
    row = run_method("grad-dot", ctx, masks, targets, n_boot=50)
    assert row.error is None and row.ci_low <= row.lds <= row.ci_high
    assert row.seconds >= 0 and row.peak_mb > 0
    from bif.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method"):
        run_method("nope", ctx, masks, targets)


def test_format_table_marks_skipped_methods() -> None:
    nan = float("nan")
    rows = [
        BenchRow("bif", 0.5, 0.4, 0.6, 1.0, 100.0, 0),
        BenchRow("ekfac", nan, nan, nan, nan, nan, 0, error="needs kronfluence"),
    ]
    text = format_table(rows)
    assert "0.500" in text and "[0.400, 0.600]" in text
    assert "skipped: needs kronfluence" in text


def test_run_bench_writes_json_and_png(tmp_path) -> None:
    rows = run_bench("digits", ("grad-dot", "grad-cos"), tmp_path, n_boot=50)
    doc = json.loads((tmp_path / "digits.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["grad-dot", "grad-cos"]
    assert doc["meta"]["num_subsets"] >= 100 and doc["meta"]["num_seeds"] >= 3
    assert doc["rows"][0]["lds"] == pytest.approx(rows[0].lds)
    assert (tmp_path / "digits.png").stat().st_size > 1000


def test_sweep_adds_the_adaptive_point(tmp_path) -> None:
    from bif.bench.runner import run_sweep

    points = run_sweep("digits", (2,), (20,), tmp_path, n_boot=50, num_burnin=20,
                       check_every=20, max_draws=40)  # fmt: skip
    grid, auto = points[0], points[-1]
    assert not grid.adaptive and (grid.num_chains, grid.num_draws) == (2, 20)
    assert auto.adaptive and auto.num_chains == 8 and auto.num_draws in (20, 40)
    assert auto.stop in ("targets_met", "max_draws")
    doc = json.loads((tmp_path / "digits-sweep.json").read_text())
    assert doc["points"][-1]["adaptive"] is True
    assert (tmp_path / "digits-sweep.png").stat().st_size > 1000
