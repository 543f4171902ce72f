"""Mislabel detection (``bif bench --mislabel``) on a reduced digits setting with 20% flips.

The reduced setting is digits with its first 10 queries (queries do not enter self-influence;
fewer make BIF's per-draw evaluation cheaper), registered under its own name for the test. The
bounds are not hand-picked: a method "finds flipped labels" when the lower end of its 95%
bootstrap interval of the AUC lies above chance (0.5).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bif.bench import mislabel
from bif.bench.mislabel import (
    MislabelRow,
    bootstrap_auc_ci,
    format_mislabel_table,
    recall_at,
    run_mislabel,
)
from bif.bench.settings import SETTINGS, load_setting
from bif.cli import main
from bif.errors import ConfigError
from bif.eval.correlation import roc_auc

NAME = "digits-reduced"
NUM_QUERIES = 10
FRACTION = 0.2
SMALL_BIF = {"num_chains": 4, "num_draws": 50, "thin": 2, "num_burnin": 100}


def _reduced_digits():
    s = load_setting("digits")
    return dataclasses.replace(
        s, name=NAME, x_query=s.x_query[:NUM_QUERIES], y_query=s.y_query[:NUM_QUERIES]
    )


def _needs_missing_package(**kw):
    raise ImportError("needs the package 'not-installed'")


@pytest.fixture
def reduced(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(SETTINGS, NAME, _reduced_digits)
    return NAME


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mislabel")
    seen: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SETTINGS, NAME, _reduced_digits)
        mp.setitem(mislabel.MISLABEL_METHODS, "needs-pkg", _needs_missing_package)
        rows = run_mislabel(NAME, ("loss", "grad-dot", "bif", "if-cg", "needs-pkg"), FRACTION,
                            seed=0, out_dir=out, method_options={"bif": SMALL_BIF},
                            on_row=lambda r: seen.append(r.method))  # fmt: skip
    return {row.method: row for row in rows}, out, seen


@pytest.mark.parametrize("method", ["loss", "grad-dot", "bif"])
def test_methods_find_flipped_labels(experiment, method: str) -> None:
    rows, _, _ = experiment
    r = rows[method]
    assert r.error is None
    assert math.isfinite(r.auc) and r.ci_low <= r.auc <= r.ci_high
    assert r.ci_low > 0.5, f"{method}: AUC {r.auc:.3f}, 95% interval [{r.ci_low:.3f}, ...]"
    # 10% inspected out of 20% flipped: at most half of the flipped can be found.
    assert 0.0 < r.recall_at_10 <= 0.5
    assert r.seconds >= 0 and r.peak_mb > 0


def test_directions(experiment) -> None:
    rows, _, _ = experiment
    assert rows["loss"].direction == "positive"
    assert rows["bif"].direction == rows["grad-dot"].direction == "negative"
    assert rows["bif"].options == SMALL_BIF


def test_failing_methods_become_error_rows(experiment) -> None:
    rows, _, seen = experiment
    assert "not-installed" in rows["needs-pkg"].error
    assert "no self-influence" in rows["if-cg"].error
    for name in ("needs-pkg", "if-cg"):
        assert math.isnan(rows[name].auc) and math.isnan(rows[name].seconds)
    assert seen == ["loss", "grad-dot", "bif", "if-cg", "needs-pkg"]


def test_json_written(experiment) -> None:
    rows, out, _ = experiment
    doc = json.loads((out / f"{NAME}-mislabel.json").read_text())
    meta = doc["meta"]
    assert meta["setting"] == NAME and meta["num_train"] == 1000
    assert meta["fraction"] == FRACTION and meta["num_flipped"] == 200 and meta["seed"] == 0
    assert len(meta["flipped_indices"]) == 200
    assert 0.5 < meta["test_accuracy"] <= 1.0
    assert {"bif_version", "torch", "python"} <= set(meta)
    assert [r["method"] for r in doc["rows"]] == list(rows)
    assert doc["rows"][0]["auc"] == pytest.approx(rows["loss"].auc)
    assert doc["rows"][4]["error"] == rows["needs-pkg"].error


def test_regression_setting_and_bad_arguments_raise(monkeypatch, tmp_path) -> None:
    reg = lambda: dataclasses.replace(_reduced_digits(), task="regression")  # noqa: E731
    monkeypatch.setitem(SETTINGS, "digits-regression", reg)
    with pytest.raises(ConfigError, match="classification"):
        run_mislabel("digits-regression", ("loss",), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown method"):
        run_mislabel("digits", ("loss", "nope"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="flips 0 of 1000"):
        run_mislabel("digits", ("loss",), fraction=1e-4, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_bootstrap_auc_and_recall() -> None:
    g = torch.Generator().manual_seed(0)
    flipped = torch.zeros(200, dtype=torch.bool)
    flipped[:40] = True
    suspicion = torch.randn(200, generator=g, dtype=torch.float64) + 1.5 * flipped
    auc = roc_auc(suspicion, flipped)
    lo, hi = bootstrap_auc_ci(suspicion, flipped, n_boot=500, seed=1)
    assert lo < auc < hi and lo > 0.5 and hi < 1.0
    assert (lo, hi) == bootstrap_auc_ci(suspicion, flipped, n_boot=500, seed=1)
    # perfect separation: every resample has AUC 1; top 10% (20 examples) are all flipped
    perfect = flipped.double()
    assert bootstrap_auc_ci(perfect, flipped, 200) == (1.0, 1.0)
    assert recall_at(perfect, flipped, 0.1) == pytest.approx(20 / 40)
    assert recall_at(perfect, flipped, 0.5) == 1.0
    assert recall_at(-perfect, flipped, 0.1) == 0.0


def test_format_mislabel_table() -> None:
    nan = float("nan")
    rows = [
        MislabelRow("bif", 0.9, 0.85, 0.95, 0.4, 2.0, 150.0, "negative"),
        MislabelRow("ekfac", nan, nan, nan, nan, nan, nan, "negative", error="needs kronfluence"),
    ]
    text = format_mislabel_table(rows)
    assert "recall@10%" in text.splitlines()[0]
    assert "0.900" in text and "[0.850, 0.950]" in text and "0.400" in text
    assert "skipped: needs kronfluence" in text


def test_cli_mislabel(reduced: str, tmp_path, capsys) -> None:
    argv = ["bench", reduced, "--mislabel", "--methods", "loss,grad-dot", "--flip-fraction",
            "0.2", "--n-boot", "200", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recall@10%" in out and "grad-dot" in out
    assert (tmp_path / f"{reduced}-mislabel.json").is_file()
    assert main(["bench", reduced, "--mislabel", "--sweep"]) == 2
    assert main(["bench", reduced, "--mislabel", "--methods", "loss,nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_cli_default_methods_and_bif_flags(reduced: str, monkeypatch, tmp_path, capsys) -> None:
    # --methods left at the LDS default -> the mislabel default (shortened here for speed), and
    # the BIF hyperparameter flags reach the bif method as in the LDS bench.
    monkeypatch.setattr(mislabel, "DEFAULT_MISLABEL_METHODS", ("loss", "bif"))
    flags = ["--num-chains", "2", "--num-draws", "10", "--num-burnin", "20", "--thin", "1"]
    argv = ["bench", reduced, "--mislabel", *flags, "--n-boot", "100", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "flipped; loss, bif" in capsys.readouterr().out
    doc = json.loads((tmp_path / f"{reduced}-mislabel.json").read_text())
    assert doc["meta"]["fraction"] == 0.1 and doc["meta"]["num_flipped"] == 100
    assert [r["method"] for r in doc["rows"]] == ["loss", "bif"]
    assert doc["rows"][1]["options"] == {"num_chains": 2, "num_draws": 10, "num_burnin": 20,
                                         "thin": 1}  # fmt: skip


@pytest.mark.slow  # ~60 s (two full mislabel CLI runs); `make test-slow`
def test_cli_if_damping_reaches_the_influence_functions(reduced: str, tmp_path, capsys) -> None:
    argv = ["bench", reduced, "--mislabel", "--methods", "if-exact", "--if-damping", "0.05",
            "--n-boot", "50", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / f"{reduced}-mislabel.json").read_text())
    assert doc["rows"][0]["options"] == {"damping": 0.05}
    assert doc["rows"][0]["error"] is None
    assert main(["bench", reduced, "--if-damping", "0", "--methods", "grad-dot"]) == 2
    assert "--if-damping must be > 0" in capsys.readouterr().err
