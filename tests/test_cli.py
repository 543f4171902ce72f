"""The `bif` command line: generated flags, `bif show`, `bif report`, one-line errors."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest

from bif import BIFConfig, BIFResult, __version__
from bif.cli import build_parser, config_overrides, main


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
        (["demo", "--out", "{missing}", "--num-queries", "0"], "num_queries must be a positive"),
        (["demo", "--out", "{missing}", "--num-queries", "798"], "at most the test-set size 797"),
        (["demo", "--out", "{missing}", "--threads", "0"], "--threads must be a positive"),
        (["demo", "--out", "{missing}", "--nbeta", "inf"], "nbeta must be finite and > 0"),
    ],
)
def test_user_errors_are_one_line(argv, message, demo_run, tmp_path, capsys) -> None:
    fill = {"missing": str(tmp_path / "nothing"), "result": str(demo_run.result_dir)}
    assert main([a.format(**fill) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert out == "" and not (tmp_path / "nothing").exists()  # failed before doing anything
