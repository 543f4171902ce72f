"""`bif demo`: the real default command once (session fixture), plus its pure pieces."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bif import BIFResult, ConfigError
from bif.demo import (
    DEMO_FILE,
    build_model,
    pick_queries,
    run_demo,
    split_digits,
    torch_threads,
)


def test_default_demo_command(demo_run) -> None:
    """`bif demo --out DIR` exits 0, prints the influences and writes a report and a result."""
    proc = demo_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    result = BIFResult.load(demo_run.result_dir)
    assert (result.num_queries, result.num_train) == (6, 1000)
    assert bool(torch.isfinite(result.scores).all()) and bool(torch.isfinite(result.stderr).all())
    assert demo_run.report.stat().st_size > 10_000
    assert f"report: {demo_run.report}" in out
    assert f"result: {demo_run.result_dir}" in out
    assert re.search(r"wall time: \d+\.\d s", out)
    assert out.count("proponents (BIF < 0") == 6 and out.count("opponents  (BIF > 0") == 6
    # The progress bar is on (stderr) without --quiet.
    assert "BIF sampling" in proc.stderr
    # Every printed row is the saved result's top-5, in order, with score ± stderr.
    blocks = re.split(r"^query (\d+) ", out, flags=re.M)[1:]
    assert len(blocks) == 2 * result.num_queries
    for q_text, block in zip(blocks[::2], blocks[1::2], strict=True):
        q = int(q_text)
        rows = re.findall(r"^ {4}#(\d+)\s+label (\d)\s+(\S+) ± (\S+)$", block, flags=re.M)
        top = result.top(q, 5)
        expected = top.proponents + top.opponents
        assert [int(r[0]) for r in rows] == [x.index for x in expected]
        assert [r[2] for r in rows] == [f"{x.score:+.3g}" for x in expected]
        assert [r[3] for r in rows] == [f"{x.stderr:.2g}" for x in expected]
        assert all(x.score < 0 for x in top.proponents) and all(x.score > 0 for x in top.opponents)


def test_default_demo_model_and_queries(demo_run) -> None:
    """The fixed recipe's accuracy, and the query rule: half misclassified, each with a twin."""
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    info = json.loads((demo_run.result_dir / DEMO_FILE).read_text())
    assert info["test_accuracy"] > 0.95 and info["train_accuracy"] > 0.99
    qs = info["queries"]
    wrong = [x for x in qs if x["label"] != x["prediction"]]
    assert len(wrong) == 3
    for twin, miss in zip(qs[::2], qs[1::2], strict=True):
        assert twin["label"] == twin["prediction"] == miss["label"] != miss["prediction"]
    assert [x["loss"] for x in wrong] == sorted((x["loss"] for x in wrong), reverse=True)
    result = BIFResult.load(demo_run.result_dir)
    torch.testing.assert_close(
        result.query_star, torch.tensor([x["loss"] for x in qs], dtype=result.query_star.dtype)
    )
    # A misclassified digit's loss is high, so its influences are larger than its twin's.
    mag = result.scores.abs().amax(1)
    assert all(mag[2 * i + 1] > mag[2 * i] for i in range(3))


def test_pick_queries_rule() -> None:
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    preds = torch.tensor([0, 1, 2, 2, 0, 0, 1, 0])  # wrong: positions 2 (1→2) and 5 (2→0)
    losses = torch.tensor([0.1, 0.2, 3.0, 0.1, 0.1, 5.0, 0.1, 0.3])
    # Highest-loss wrong first (5), preceded by its correct twin of label 2 (3); then 2 with twin 1.
    assert pick_queries(labels, preds, losses, 4) == [3, 5, 1, 2]
    # Odd count: one pair, then correct digits round-robin over classes (0 first).
    assert pick_queries(labels, preds, losses, 3) == [3, 5, 0]
    assert pick_queries(labels, preds, losses, 8) == [3, 5, 1, 2, 0, 4, 6, 7]
    assert sorted(pick_queries(labels, preds, losses, 8)) == list(range(8))
    for bad in (0, 9, True):
        with pytest.raises(ConfigError, match="num_queries"):
            pick_queries(labels, preds, losses, bad)


def test_split_and_model_do_not_depend_on_global_seed() -> None:
    torch.manual_seed(123)
    a, sa = build_model(), split_digits()
    torch.manual_seed(456)
    b, sb = build_model(), split_digits()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(sa.train_idx, sb.train_idx)
    assert len(sa.train_idx) == 1000 and len(sa.test_idx) == 797
    assert not set(sa.train_idx.tolist()) & set(sa.test_idx.tolist())


def test_torch_threads_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError), torch_threads(0):
        pass


def test_run_demo_with_overrides(tmp_path) -> None:
    """The importable entry point with reduced hyperparameters (seconds, not the full run)."""
    small = dict(num_chains=2, num_draws=4, num_burnin=2, thin=1, seed=3)
    out = run_demo(tmp_path / "d", num_queries=3, progress=False, k=2, threads=1, **small)
    assert out.report_path.exists() and out.result_dir == tmp_path / "d" / "result"
    assert [x.label == x.prediction for x in out.queries] == [True, False, True]
    saved = BIFResult.load(out.result_dir)
    assert {k: saved.config.to_dict()[k] for k in small} == small
    torch.testing.assert_close(saved.scores, out.result.scores)
    assert out.test_accuracy > 0.95 and len(out.train_labels) == 1000
    assert 'data-k="2"' in out.report_path.read_text()
    with pytest.raises(ConfigError, match="step_size"):
        run_demo(tmp_path / "bad", step_size=-1.0, progress=False)
    assert not (tmp_path / "bad").exists()  # validated before any work
