"""False-alarm rate of the diagnostics on healthy default runs (slow: ``make test-slow``).

Twenty default runs (8 chains × 2,000 draws, every rule automatic) of the digits setting's reference
MLP, seeds 0-19: at most 5% may end with a verdict other than "ok".
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bif
from bif import demo

SEEDS = 20


@pytest.mark.slow
def test_false_alarm_rate_on_default_digits_runs() -> None:
    torch.set_num_threads(1)
    s = demo.split_digits()
    model = demo.train_model(demo.build_model(), s.x_train, s.y_train)
    verdicts = []
    for seed in range(SEEDS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bif.DiagnosticWarning)
            res = bif.attribute(model, (s.x_train, s.y_train), (s.x_test[:50], s.y_test[:50]),
                                seed=seed, progress=False)  # fmt: skip
        d = res.diagnostics
        verdicts.append((seed, d.verdict, [r.check for r in d.reasons]))
    alarms = [v for v in verdicts if v[1] != "ok"]
    print("verdicts:", verdicts)
    assert len(alarms) <= 0.05 * SEEDS, alarms
