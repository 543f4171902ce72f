"""The ``bif`` command line: ``bif demo``, ``bif show``, ``bif report``, ``bif diagnose``,
``bif bench``.

Hyperparameter flags (``--num-chains``, ``--step-size``, ...) are generated from the fields of
:class:`bif.config.BIFConfig` and their ``help`` metadata (:mod:`bif.flags`), so the CLI, the
config and :func:`bif.attribute` cannot drift apart. This module is the only place in bif that
prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bif._version import __version__
from bif.config import BIFConfig
from bif.errors import BIFError, ConfigError
from bif.flags import add_config_flags, config_overrides
from bif.result import BIFResult


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bif",
        description="Training data attribution with local Bayesian influence functions (BIF).",
    )
    parser.add_argument("--version", action="version", version=f"bif {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="the embedded demos: digits (MLP, image report) or lm (tiny transformer, token "
        "heatmaps)",
        description="digits (default): train a 64-64-10 MLP on 1,000 bundled 8x8 digits, "
        "attribute a few test digits with BIF, save the result and write a self-contained HTML "
        "report. lm: fine-tune a tiny Shakespeare transformer (pretrained once and cached) on "
        "128 Hamlet passages, attribute held-out speeches token by token, and write a token "
        "heatmap report.",
    )
    demo.add_argument("which", nargs="?", choices=["digits", "lm"], default="digits",
                      help="which demo (default: digits)")  # fmt: skip
    demo.add_argument("--out", type=Path, default=None, help="output directory "
                      "(default: bif-demo, or bif-demo-lm)")  # fmt: skip
    demo.add_argument("--num-queries", type=int, default=None,
                      help="queries to explain (default: 6 digits, 4 speeches)")  # fmt: skip
    demo.add_argument("--num-train", type=int, default=None,
                      help="lm only: fine-tuning passages attributed (default: 128)")  # fmt: skip
    demo.add_argument("-k", type=int, default=None,
                      help="proponents/opponents per query (default: 5 digits, 3 lm)")  # fmt: skip
    demo.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: 1 for digits, whose model is so small that threads "
        "only add overhead; torch's default for lm)",
    )  # fmt: skip
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(demo)

    show = sub.add_parser("show", help="print the top proponents/opponents of a saved result")
    show.add_argument("result_dir", type=Path, help="directory written by BIFResult.save")
    show.add_argument("--query", type=int, default=None, help="only this query (default: all)")
    show.add_argument("-k", type=int, default=5, help="proponents/opponents per query")

    report = sub.add_parser("report", help="(re)build the HTML report of a saved result")
    report.add_argument("result_dir", type=Path, help="directory written by BIFResult.save")
    report.add_argument("--out", type=Path, default=None, help="default: RESULT_DIR/report.html")
    report.add_argument("-k", type=int, default=5, help="proponents/opponents per query")

    diagnose = sub.add_parser(
        "diagnose",
        help="print the chain diagnostics of a saved result (R-hat, ESS, drift, Monte-Carlo "
        "error) and exit with its verdict",
        description="Print the chain diagnostics recorded with a saved result: the verdict "
        "(ok, warn or fail) with every finding and its fix, R-hat and bulk/tail ESS per trace "
        "group, the drift of the draw loss, the unresolved queries and how the standard errors "
        "were computed. A result saved without diagnostics (an older bif) is diagnosed from "
        "its saved traces.",
        epilog=f"exit status: {_EXIT['ok']} ok, {_EXIT['warn']} warn, {_EXIT['fail']} fail. Like "
        "every bif command, a user error (no saved result at RESULT_DIR, a damaged one) prints "
        "one line starting with 'error:' on stderr and exits 2; only then is stdout empty.",
    )
    diagnose.add_argument("result_dir", type=Path, help="directory written by BIFResult.save")
    diagnose.add_argument("--json", action="store_true",
                          help="print the diagnostics as JSON instead of text")  # fmt: skip

    run = sub.add_parser(
        "run",
        help="attribute your own model from a TOML configuration (an entry function, or a "
        "Hugging Face causal LM with JSONL data)",
        description='Read CONFIG.toml: entry = "FILE.py:FUNCTION" or "package.module:'
        'FUNCTION" (a function returning a dict with model, train, query and optionally task, '
        'observable), or hf_model = "DIR" with train/query JSONL files of {"text": ...} or '
        '{"prompt": ..., "completion": ...} lines; out = "DIR"; a [bif] table of '
        "hyperparameters. Writes OUT/run (checkpoints: running again resumes), OUT/result, "
        "OUT/report.html and OUT/config.toml (the configuration as run, automatic values "
        "resolved). See bif.runfile.",
    )
    run.add_argument("config", type=Path, help="the run configuration (.toml)")
    run.add_argument("--out", type=Path, default=None,
                     help="output directory (default: the file's out, relative to it)")  # fmt: skip
    run.add_argument("-k", type=int, default=5, help="proponents/opponents printed per query")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(run)  # flags override the file's [bif] table

    from bif.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


# Exit status of `bif diagnose` by verdict (an unknown verdict counts as fail).
_EXIT = {"ok": 0, "warn": 2, "fail": 3}


def unresolved_note(result: BIFResult, q: int) -> str:
    """``"  [unresolved: ...]"`` when query ``q``'s top scores are not resolved, else ``""``."""
    from bif.report.verdict import is_unresolved, relative_mcse_of, restore_nan, threshold

    diag = restore_nan(result.diagnostics)
    if not is_unresolved(diag, q):
        return ""
    rel = relative_mcse_of(diag, q)
    size = f"{100 * rel:.0f}%" if math.isfinite(rel) else "unknown"
    limit = 100 * threshold(diag, "max_relative_mcse")
    k = int(threshold(diag, "top_k"))
    return f"  [unresolved: top-{k} Monte-Carlo error {size} of the scores > {limit:.0f}%]"


def verdict_lines(result: BIFResult, result_dir: Path | str) -> list[str]:
    """The verdict in one line (and every finding with its fix when it is not ok)."""
    from bif.report.verdict import restore_nan

    diag = restore_nan(result.diagnostics)
    if diag is None:
        return [
            f"diagnostics: none recorded with this result (bif diagnose {result_dir} computes "
            "them from its saved traces)"
        ]
    more = f"(details: bif diagnose {result_dir})"
    if diag.verdict == "ok":
        rhats = [float(r.get("rhat_max", math.nan)) for r in diag.summary.values()]
        rhat = max((r for r in rhats if math.isfinite(r)), default=math.nan)
        ess = float(diag.summary.get("draw_loss", {}).get("ess_bulk_min", math.nan))
        lines = [
            f"diagnostics: ok (max R-hat {rhat:.3f}, bulk ESS of the draw loss {ess:.0f}) {more}"
        ]
    else:
        n = len(diag.reasons)
        lines = [f"diagnostics: {diag.verdict.upper()}, {n} finding{'s' * (n != 1)} {more}"]
        for r in diag.reasons:
            lines.append(f"  [{r.level}] {r.check}: {r.message}")
            lines.append(f"         fix: {r.fix}")
    if diag.unresolved:
        shown = ", ".join(map(str, diag.unresolved[:20]))
        extra = f" and {len(diag.unresolved) - 20} more" if len(diag.unresolved) > 20 else ""
        lines.append(f"  unresolved queries: {shown}{extra}")
    return lines


def _labels(info: dict[str, Any] | None) -> tuple[list[int] | None, list[str]]:
    """Training labels and query descriptions from a demo's ``demo.json`` (if any)."""
    if info is None:
        return None, []
    from bif.datasets import load_digits

    labels = load_digits().labels
    train = [int(labels[i]) for i in info["train_indices"]]
    queries = [
        f"test digit #{x['dataset_index']}: true {x['label']}, predicted {x['prediction']}"
        + ("" if x["label"] == x["prediction"] else "  (MISCLASSIFIED)")
        for x in info["queries"]
    ]
    return train, queries


def format_query(
    result: BIFResult, q: int, k: int, train_labels: list[int] | None, title: str = ""
) -> list[str]:
    """Lines describing query ``q``: its top ``k`` proponents and opponents (score ± stderr)."""
    top = result.top(q, k)
    phi = result.observable
    head = f"query {q}" + (f"  {title}" if title else "")
    lines = [f"{head}  ({phi} at w* {float(result.query_star[q]):.4g}){unresolved_note(result, q)}"]

    def row(x: Any) -> str:
        lab = f"  label {train_labels[x.index]}" if train_labels is not None else ""
        return f"    #{x.index:<5d}{lab}  {x.score:+.3g} ± {x.stderr:.2g}"

    lines.append(f"  proponents (BIF < 0: training on them lowers this query's {phi})")
    lines += [row(x) for x in top.proponents] or ["    (none)"]
    lines.append(f"  opponents  (BIF > 0: training on them raises this query's {phi})")
    lines += [row(x) for x in top.opponents] or ["    (none)"]
    return lines


def _check_positive(flag: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value}.")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.which == "lm":
        return _cmd_demo_lm(args)
    from bif.demo import check_num_queries, run_demo, split_digits  # lazy: fast `bif --help`

    args.out = args.out or Path("bif-demo")
    args.num_queries = 6 if args.num_queries is None else args.num_queries
    args.k = 5 if args.k is None else args.k
    args.threads = 1 if args.threads is None else args.threads
    if args.num_train is not None:
        raise ConfigError("--num-train applies to `bif demo lm` only.")
    # Fail on a bad flag before printing anything or training.
    _check_positive("-k", args.k)
    _check_positive("--threads", args.threads)
    overrides = config_overrides(args)
    BIFConfig().replace(**overrides)
    check_num_queries(args.num_queries, len(split_digits().test_idx))
    t0 = time.perf_counter()
    print(
        f"bif demo: training a 64-64-10 MLP on 1,000 digits, then attributing "
        f"{args.num_queries} test digits (output: {args.out})",
        flush=True,
    )
    out = run_demo(
        args.out, args.num_queries, progress=not args.quiet, k=args.k, threads=args.threads,
        **overrides,
    )  # fmt: skip
    r = out.result
    print(
        f"model: train accuracy {out.train_accuracy:.1%}, test accuracy {out.test_accuracy:.1%} "
        f"on {out.num_test} test digits (trained in {out.train_seconds:.1f} s)"
    )
    lam = r.meta.get("lambda_max")
    rule = f" (auto: λ_max(H) = {lam:.3g})" if isinstance(lam, float) else ""
    print(
        f"BIF: {r.config.num_chains} chains × {r.config.num_draws} draws, step size "
        f"{r.config.step_size:.3g}{rule}, nβ = {r.config.nbeta:g}, γ = {r.config.gamma:g}; "
        f"sampling {r.meta.get('sampling_seconds', float('nan')):.1f} s\n"
    )
    for q, info in enumerate(out.queries):
        verdict = "correct" if info.label == info.prediction else "MISCLASSIFIED"
        title = (
            f"test digit #{info.dataset_index}: true {info.label}, "
            f"predicted {info.prediction} ({verdict})"
        )
        print("\n".join(format_query(r, q, args.k, out.train_labels, title)) + "\n")
    print("\n".join(verdict_lines(r, out.result_dir)) + "\n")
    print(f"report: {out.report_path}")
    print(f"result: {out.result_dir}   (bif show {out.result_dir})")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_demo_lm(args: argparse.Namespace) -> int:
    from bif.demo_lm import NUM_QUERIES, NUM_TRAIN, PLAY, run_lm_demo

    out_dir = args.out or Path("bif-demo-lm")
    nq = NUM_QUERIES if args.num_queries is None else args.num_queries
    nt = NUM_TRAIN if args.num_train is None else args.num_train
    k = 3 if args.k is None else args.k
    for flag, v in (("-k", k), ("--num-queries", nq), ("--num-train", nt)):
        _check_positive(flag, v)
    if args.threads is not None:
        _check_positive("--threads", args.threads)
    overrides = config_overrides(args)
    BIFConfig().replace(**overrides)
    t0 = time.perf_counter()
    print(
        f"bif demo lm: tiny Shakespeare transformer (pretrained once, then cached), fine-tuned on "
        f"{nt} {PLAY} passages; attributing {nq} held-out speeches token by token "
        f"(output: {out_dir})",
        flush=True,
    )
    out = run_lm_demo(
        out_dir, nq, nt, k=k, progress=not args.quiet, threads=args.threads, **overrides
    )
    r = out.result
    print(
        f"model ready in {out.train_seconds:.1f} s; held-out loss {out.heldout_loss:.3f} "
        f"nats/token\nBIF: {r.config.num_chains} chains × {r.config.num_draws} draws, "
        f"nβ = {r.config.nbeta:.4g}, γ = {r.config.gamma:.4g}, step size "
        f"{r.config.step_size:.3g}; sampling {r.meta.get('sampling_seconds', float('nan')):.1f} s\n"
    )
    from bif.lm.text import load_token_text

    tok, text_of = r.tokens, load_token_text(out.result_dir)
    assert tok is not None and text_of is not None
    for q, text in enumerate(out.query_texts):
        lines = text.splitlines()
        print(f"query {q}: {lines[0]} {' / '.join(lines[1:])[:90]}{unresolved_note(r, q)}")
        for kind, sign in (("proponents", 1), ("opponents", -1)):
            order = [i for i in (sign * r.scores[q]).argsort()[:k].tolist()
                     if sign * float(r.scores[q, i]) < 0]  # fmt: skip
            print(f"  {kind}:" + ("" if order else " (none)"))
            for i in order:
                snippet = " / ".join(out.train_texts[i].splitlines())[:80]
                print(f"    #{i:<4d} {float(r.scores[q, i]):+.3g} ± {float(r.stderr[q, i]):.2g}"
                      f"  {snippet}")  # fmt: skip
        top = tok.top_train_tokens(q, k=5)
        words = [
            f"{text_of['train_tokens'][t.sequence][t.position]!r} (#{t.sequence})" for t in top
        ]
        print("  training tokens that most lower this speech's loss: " + ", ".join(words))
        print()
    print("\n".join(verdict_lines(r, out.result_dir)) + "\n")
    print(f"report: {out.report_path}")
    print(f"result: {out.result_dir}   (bif report {out.result_dir})")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from bif.demo import load_demo_info

    _check_positive("-k", args.k)
    result = BIFResult.load(args.result_dir)
    if args.query is not None and not 0 <= args.query < result.num_queries:
        raise ConfigError(
            f"--query must lie in [0, {result.num_queries - 1}] for this result, got {args.query}."
        )
    train_labels, titles = _labels(load_demo_info(args.result_dir))
    qs = range(result.num_queries) if args.query is None else [args.query]
    c = result.config
    print(
        f"{result.num_train} training examples, {result.num_queries} queries, "
        f"{c.num_chains} chains × {c.num_draws} draws; BIF < 0 = proponent\n"
    )
    for q in qs:
        title = titles[q] if q < len(titles) else ""
        print("\n".join(format_query(result, q, args.k, train_labels, title)) + "\n")
    print("\n".join(verdict_lines(result, args.result_dir)))
    return 0


def diagnose_result(result: BIFResult) -> tuple[Any, bool]:
    """The result's diagnostics, computed from its saved traces when it was saved without them
    (an older bif); returns them and whether they were computed here."""
    from bif.diagnostics import diagnose
    from bif.errors import ArtifactError
    from bif.report.verdict import restore_nan

    if result.diagnostics is not None:
        return restore_nan(result.diagnostics), False
    if result.draw_loss.numel() == 0 or result.query_trace.numel() == 0:
        raise ArtifactError(
            "this result was saved without diagnostics and holds no draws to compute them from."
        )
    err = result.mcse if result.mcse is not None else result.stderr
    if not bool(err.isfinite().any()):  # one chain and no batch-means error: no error at all
        err = None
    diag = diagnose(
        result.draw_loss, result.query_trace, result.scores, err, result.train_trace, None,
        result.energy, result.meta.get("num_params_sampled"),
    )  # fmt: skip
    return diag, True


def _cmd_diagnose(args: argparse.Namespace) -> int:
    result = BIFResult.load(args.result_dir)
    diag, computed = diagnose_result(result)
    code = _EXIT.get(diag.verdict, _EXIT["fail"])
    if args.json:
        print(json.dumps({**diag.to_dict(), "computed_now": computed, "exit_status": code}))
        return code
    c = result.config
    method = result.meta.get("stderr_method") or "across-chain (not recorded: an older result)"
    print(
        f"{args.result_dir}: {result.num_train} training examples, {result.num_queries} "
        f"queries, {c.num_chains} chains × {c.num_draws} draws"
    )
    if computed:
        used = ["draw loss", "query traces"]
        used += ["sampled training losses"] * (result.train_trace is not None)
        used += ["energy"] * (result.energy is not None)
        print(
            "note: this result was saved without diagnostics (an older bif); computed them now "
            f"from its saved {', '.join(used)}."
        )
    print(f"standard errors: {method}")
    print(str(diag))
    word = {"ok": "ok", "warn": "WARN: check the findings above before trusting the scores"}
    print(f"=> {word.get(diag.verdict, 'FAIL: the scores are not reliable')} (exit status {code})")
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    """The page that fits the saved result: the digits demo's (demo.json), token heatmaps for a
    result with per-token traces (with its lm.json text, or tokens by position), else cards."""
    from bif.demo import load_demo_info, write_demo_report
    from bif.lm.text import LM_FILE, load_token_text
    from bif.report import write_report
    from bif.report.lm import write_lm_report
    from bif.tokens import TOKENS_FILE

    _check_positive("-k", args.k)
    out = args.out or args.result_dir / "report.html"
    if load_demo_info(args.result_dir) is not None:
        path = write_demo_report(args.result_dir, out, k=args.k)
    elif (args.result_dir / TOKENS_FILE).exists():
        path = write_lm_report(args.result_dir, out, k=args.k)
        if load_token_text(args.result_dir) is None:
            print(
                f"note: no {LM_FILE} next to the result, so tokens are shown by position; the "
                "page says how to save the text (bif.lm.save_lm_text)."
            )
    else:
        path = write_report(out, BIFResult.load(args.result_dir), k=args.k)
    print(f"report: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from bif.runfile import run_config

    _check_positive("-k", args.k)
    t0 = time.perf_counter()
    out = run_config(args.config, config_overrides(args), out=args.out, progress=not args.quiet)
    if not out.is_main:  # ranks > 0 of a distributed run: rank 0 reports
        return 0
    r, c = out.result, out.result.config
    resumed = f" (resumed from {out.out_dir / 'run'})" if r.meta.get("resumed") else ""
    print(
        f"bif run {args.config}: {r.num_train} training examples, {r.num_queries} queries; "
        f"{c.num_chains} chains × {c.num_draws} draws, step size {c.step_size:.3g}, "
        f"nβ = {c.nbeta:.4g}, γ = {c.gamma:.4g}{resumed}\n"
    )
    shown = min(r.num_queries, 5)
    for q in range(shown):
        print("\n".join(format_query(r, q, args.k, None)) + "\n")
    if shown < r.num_queries:
        print(f"... and {r.num_queries - shown} more queries (bif show {out.result_dir})\n")
    print("\n".join(verdict_lines(r, out.result_dir or out.out_dir)) + "\n")
    print(f"report: {out.report_path}")
    print(f"result: {out.result_dir}   (bif show {out.result_dir})")
    print(f"config: {out.config_path}   (the configuration as run)")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from bif.bench.cli import cmd_bench

    return cmd_bench(args, config_overrides(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bif`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="bif: %(levelname)s: %(message)s")
    commands = {
        "demo": _cmd_demo, "show": _cmd_show, "report": _cmd_report, "diagnose": _cmd_diagnose,
        "bench": _cmd_bench, "run": _cmd_run,
    }  # fmt: skip
    try:
        return commands[args.command](args)
    except BIFError as err:
        # One line, no traceback: these errors are the user's to fix and say how.
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `bif show ... | head`: stop quietly; point stdout at devnull so the interpreter's
        # final flush does not raise again (the recipe of the Python signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
