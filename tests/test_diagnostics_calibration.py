"""Calibrated errors and the diagnostics' false-alarm rate on healthy default runs (slow:
``make test-slow``; the same runs as ``bif bench calibration``).

- Linear regression (exact answer known, :func:`bif.bench.calibration.linear_replicates`), 60
  replicate seeds: the z-scores of the reported (pooled) error have variance in [0.8, 1.25].
- Digits (the demo's MLP, 50 test digits, every rule automatic, 8 chains × 2,000 draws), 20
  replicate seeds: the same band, and at most 5% of the runs end with a verdict other than "ok".
"""

from __future__ import annotations

import pytest
import torch

from bif.bench.calibration import (
    REPLICATES,
    digits_replicates,
    false_alarms,
    linear_replicates,
    summarise,
)

BAND = (0.8, 1.25)  # the target for the reported error's z-variance


def _pooled(reps):
    rows = {r.error: r for r in summarise(reps)}
    print({k: (round(r.variance, 3), round(r.ci_low, 3), round(r.ci_high, 3))
           for k, r in rows.items()})  # fmt: skip
    return rows["stderr"]


@pytest.mark.slow
def test_linear_regression_errors_are_calibrated() -> None:
    torch.set_num_threads(1)
    row = _pooled(linear_replicates(REPLICATES["linear"]))
    assert BAND[0] <= row.variance <= BAND[1], row


@pytest.mark.slow
def test_digits_errors_are_calibrated_and_default_runs_are_not_flagged() -> None:
    torch.set_num_threads(1)
    reps = digits_replicates(REPLICATES["digits"])
    print("verdicts:", reps.verdicts)
    alarms, runs = false_alarms(reps)
    assert alarms <= 0.05 * runs, reps.verdicts
    row = _pooled(reps)
    assert BAND[0] <= row.variance <= BAND[1], row
