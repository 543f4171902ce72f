"""``python -m bif.bench.large`` at a toy size: it runs, and its formula is in the right range."""

from __future__ import annotations

import json
from pathlib import Path

from bif.bench.large import main, predicted_bytes


def test_formula_terms_add_up() -> None:
    t = predicted_bytes(1000, 100, 4, 2, 2, 8, True, 5.0)
    assert t["process"] == 0 and t["model"] == 4000 and t["frozen_forward_copy"] == 1800
    assert t["w_star_and_grad_star"] == 800 and t["sampler_state"] == 800
    assert t["step_work"] == 100 * (24 + 4) and t["mass_basis"] == 3200
    assert t["total"] == sum(v for k, v in t.items() if k != "total")


def test_large_bench_runs_at_toy_size(tmp_path: Path, capsys) -> None:
    argv = ["--hidden", "64", "--layers", "2", "--vocab", "256", "--blocks", "1",
            "--draws", "2", "--burnin", "1", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    rec = json.loads((tmp_path / "large.json").read_text())
    assert rec["scores_finite"]
    assert 0 < rec["model"]["sampled_params"] < rec["model"]["total_params"]
    assert rec["predicted_mb"]["total"] > 0 and rec["peak_rss_mb"] > 0
    assert "measured / predicted" in capsys.readouterr().out
