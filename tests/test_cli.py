"""The `bif` command line: generated flags, `bif show`, `bif report`, `bif diagnose`, one-line
errors."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess

import pytest
import torch

from bif import BIFConfig, BIFResult, __version__
from bif.cli import build_parser, config_overrides, main
from bif.diagnostics import Reason, diagnose


def _demo_args(*flags: str):
    return build_parser().parse_args(["demo", *flags])


def test_version(bif_cmd) -> None:
    proc = subprocess.run([*bif_cmd, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bif {__version__}"


def test_help_lists_every_config_field(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for f in dataclasses.fields(BIFConfig):
        assert f"--{f.name.replace('_', '-')}" in text
        assert " ".join(f.metadata["help"].split()) in text
    assert "--no-vmap-chains" in text and "{sgld,rmsprop,kinetic}" in text
    assert "{chain,pooled}" in text


def test_flag_types_follow_the_config() -> None:
    assert config_overrides(_demo_args()) == {}  # unset flags keep the library defaults
    args = _demo_args(
        "--num-chains", "3", "--step-size", "2e-5", "--batch-size", "full", "--sampler",
        "rmsprop", "--no-vmap-chains", "--centering", "pooled", "--nbeta", "50",
    )  # fmt: skip
    over = config_overrides(args)
    assert over == dict(
        num_chains=3, step_size=2e-5, batch_size=None, sampler="rmsprop", vmap_chains=False,
        centering="pooled", nbeta=50.0,
    )  # fmt: skip
    cfg = BIFConfig(**over)
    assert cfg.batch_size is None and cfg.nbeta == 50.0
    assert config_overrides(_demo_args("--batch-size", "32")) == {"batch_size": 32}
    assert config_overrides(_demo_args("--batch-size", "None")) == {"batch_size": None}
    assert config_overrides(_demo_args("--step-size", "auto")) == {"step_size": "auto"}


@pytest.mark.parametrize(
    "flags",
    [("--batch-size", "lots"), ("--num-chains", "2.5"), ("--sampler", "hmc"), ("--step-size", "x")],
)
def test_unparseable_flags_exit_2(flags, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _demo_args(*flags)
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_bad_value_is_one_line_config_error(bif_cmd, tmp_path) -> None:
    """The real script: a ConfigError prints one line, exits 2, and no work is done."""
    out = tmp_path / "never"
    proc = subprocess.run(
        [*bif_cmd, "demo", "--out", str(out), "--step-size", "-1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: step_size must be finite and > 0, got -1.0")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_show(demo_run, capsys) -> None:
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    result = BIFResult.load(demo_run.result_dir)
    assert main(["show", str(demo_run.result_dir), "--query", "1", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^query (\d+)", out, flags=re.M) == ["1"]
    assert "true " in out and "predicted " in out  # demo results know their labels
    rows = re.findall(r"^ {4}#(\d+)\s+label \d\s+(\S+) ± (\S+)$", out, flags=re.M)
    top = result.top(1, 3)
    expected = top.proponents + top.opponents
    assert [(int(i), s, e) for i, s, e in rows] == [
        (x.index, f"{x.score:+.3g}", f"{x.stderr:.2g}") for x in expected
    ]
    assert main(["show", str(demo_run.result_dir)]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^query (\d+)", out, flags=re.M) == [str(q) for q in range(6)]


def test_show_and_report_of_a_plain_result(demo_run, tmp_path, capsys) -> None:
    """A result without the demo's labels: indices only, and a report without images."""
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("result.safetensors", "result.json"):
        shutil.copy(demo_run.result_dir / name, plain / name)
    assert main(["show", str(plain), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "label" not in out and len(re.findall(r"^ {4}#\d+\s+\S+ ± \S+$", out, flags=re.M)) == 24
    assert main(["report", str(plain)]) == 0
    html = (plain / "report.html").read_text()
    assert html.count('class="query"') == 6 and "<img" in html  # plots still have images
    assert 'class="query-image"' not in html


def test_report_regenerates_the_demo_page(demo_run, tmp_path, capsys) -> None:
    """The page depends only on the saved files: rebuilding it gives the same bytes."""
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    out = tmp_path / "again.html"
    assert main(["report", str(demo_run.result_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    assert out.read_text() == demo_run.report.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "{missing}"], "is not a saved BIF result"),
        (["show", "{result}", "--query", "6"], "--query must lie in [0, 5]"),
        (["show", "{result}", "-k", "0"], "-k must be a positive integer"),
        (["report", "{missing}"], "is not a saved BIF result"),
        (["diagnose", "{missing}"], "is not a saved BIF result"),
        (["demo", "--out", "{missing}", "--num-queries", "0"], "num_queries must be a positive"),
        (["demo", "--out", "{missing}", "--num-queries", "798"], "at most the test-set size 797"),
        (["demo", "--out", "{missing}", "--threads", "0"], "--threads must be a positive"),
        (
            ["bench", "calibration", "--on", "nope", "--out", "{missing}"],
            "unknown calibration setting(s) ['nope']",
        ),
        (
            ["bench", "calibration", "--replicates", "2", "--out", "{missing}"],
            "--replicates must be >= 3",
        ),
        (
            ["bench", "digits", "--time-to-ekfac", "--sweep", "--out", "{missing}"],
            "separate experiments",
        ),
        (
            ["bench", "digits", "--time-to-ekfac", "--grid", "8-500", "--out", "{missing}"],
            "--grid entries are CHAINSxDRAWS",
        ),
        (["demo", "--out", "{missing}", "--nbeta", "inf"], "nbeta must be finite and > 0"),
    ],
)
def test_user_errors_are_one_line(argv, message, demo_run, tmp_path, capsys) -> None:
    fill = {"missing": str(tmp_path / "nothing"), "result": str(demo_run.result_dir)}
    assert main([a.format(**fill) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert out == "" and not (tmp_path / "nothing").exists()  # failed before doing anything


# --- `bif diagnose` -------------------------------------------------------------------------


def _tiny_result(diagnostics: str | None = "ok") -> BIFResult:
    """4 chains × 60 draws of noise, 3 queries, 10 training examples; diagnostics computed from
    the traces, then given the verdict ``diagnostics`` by hand (None: saved without them)."""
    g = torch.Generator().manual_seed(0)
    c, d, q, n = 4, 60, 3, 10
    scores = torch.randn(q, n, generator=g, dtype=torch.float64)
    result = BIFResult(
        scores=scores, stderr=0.01 * scores.abs(), correlation=scores.clamp(-1, 1).neg(),
        self_influence=-scores.abs().mean(0), self_influence_stderr=torch.full((n,), 0.1),
        draw_loss=torch.randn(c, d, generator=g, dtype=torch.float64),
        step_loss=torch.randn(c, d + 5, generator=g, dtype=torch.float64),
        query_trace=torch.randn(c, d, q, generator=g, dtype=torch.float64),
        train_loss_star=torch.rand(n, dtype=torch.float64), query_star=torch.rand(q),
        config=BIFConfig(num_chains=c, num_draws=d, num_burnin=5, thin=1),
        mcse=0.01 * scores.abs(),
    )  # fmt: skip
    if diagnostics is None:
        return result
    diag = diagnose(result.draw_loss, result.query_trace, result.scores, result.mcse)
    reasons = {
        "ok": [],
        "warn": [Reason("warn", "ess", "few effective draws <here>", "take more draws")],
        "fail": [
            Reason("warn", "ess", "few effective draws", "take more draws"),
            Reason("fail", "rhat", "R-hat 1.3 on the query traces", "raise num_burnin"),
        ],
    }[diagnostics]
    result.diagnostics = dataclasses.replace(
        diag, verdict=diagnostics, reasons=reasons, unresolved=[1] if reasons else []
    )
    return result


@pytest.mark.parametrize(("verdict", "code"), [("ok", 0), ("warn", 2), ("fail", 3)])
def test_diagnose_exit_status_follows_the_verdict(verdict, code, tmp_path, capsys) -> None:
    result = _tiny_result(verdict)
    path = result.save(tmp_path / "r")
    assert main(["diagnose", str(path)]) == code
    out, err = capsys.readouterr()
    assert err == ""
    assert f"verdict: {verdict}" in out and f"(exit status {code})" in out
    assert "standard errors: across-chain (not recorded" in out  # meta has no stderr_method
    assert "draw_loss" in out and "query" in out  # the R-hat/ESS rows
    for r in result.diagnostics.reasons:
        assert f"[{r.level}] {r.check}: {r.message}" in out and f"fix: {r.fix}" in out
    if verdict != "ok":
        assert "unresolved queries: 1" in out
    assert "saved without diagnostics" not in out
    # --json: the saved diagnostics, machine-readable, same exit status.
    assert main(["diagnose", str(path), "--json"]) == code
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == verdict and data["exit_status"] == code
    assert data["computed_now"] is False
    assert [x["check"] for x in data["reasons"]] == [r.check for r in result.diagnostics.reasons]


def test_diagnose_without_saved_diagnostics_computes_them(tmp_path, capsys) -> None:
    """A result from before diagnostics existed: diagnosed from its saved traces."""
    result = _tiny_result(None)
    result.meta["stderr_method"] = "across-chain"
    path = result.save(tmp_path / "old")
    assert BIFResult.load(path).diagnostics is None
    expected = diagnose(result.draw_loss, result.query_trace, result.scores, result.mcse)
    code = {"ok": 0, "warn": 2, "fail": 3}[expected.verdict]
    assert main(["diagnose", str(path)]) == code
    out = capsys.readouterr().out
    assert "saved without diagnostics" in out and "computed them now" in out
    assert f"verdict: {expected.verdict}" in out and "standard errors: across-chain\n" in out
    assert main(["diagnose", str(path), "--json"]) == code
    data = json.loads(capsys.readouterr().out)
    assert data["computed_now"] is True and data["query"]["relative_mcse"] == pytest.approx(
        expected.query["relative_mcse"]
    )
    # `bif show` says that none were recorded and how to get them.
    assert main(["show", str(path), "-k", "1"]) == 0
    assert f"diagnostics: none recorded with this result (bif diagnose {path}" in (
        capsys.readouterr().out
    )


def test_show_prints_the_verdict_and_marks_unresolved_queries(tmp_path, capsys) -> None:
    path = _tiny_result("fail").save(tmp_path / "r")
    assert main(["show", str(path), "-k", "2"]) == 0
    out = capsys.readouterr().out
    heads = re.findall(r"^query (\d+).*$", out, flags=re.M)
    assert heads == ["0", "1", "2"]
    marked = [line for line in out.splitlines() if "[unresolved: top-5" in line]
    assert len(marked) == 1 and marked[0].startswith("query 1 ")
    tail = out.rstrip().splitlines()[-6:]
    assert tail[0] == f"diagnostics: FAIL, 2 findings (details: bif diagnose {path})"
    assert tail[1] == "  [warn] ess: few effective draws" and tail[2].endswith(
        "fix: take more draws"
    )
    assert tail[3] == "  [fail] rhat: R-hat 1.3 on the query traces"
    assert tail[5] == "  unresolved queries: 1"
    # ok: one short line.
    ok = _tiny_result("ok").save(tmp_path / "ok")
    assert main(["show", str(ok), "-k", "1"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        rf"diagnostics: ok \(max R-hat \d\.\d{{3}}, bulk ESS of the draw loss \d+\) "
        rf"\(details: bif diagnose {re.escape(str(ok))}\)",
        last,
    ), last


def test_demo_prints_its_verdict(demo_run) -> None:
    assert demo_run.proc.returncode == 0, demo_run.proc.stderr[-3000:]
    result = BIFResult.load(demo_run.result_dir)
    assert result.diagnostics is not None
    verdict = result.diagnostics.verdict
    assert f"diagnostics: {verdict if verdict == 'ok' else verdict.upper()}" in demo_run.proc.stdout
    assert f"bif diagnose {demo_run.result_dir}" in demo_run.proc.stdout
