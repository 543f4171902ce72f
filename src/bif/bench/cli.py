"""``bif bench`` (registered by :mod:`bif.cli`): the LDS table of a setting, a BIF sweep,
mislabel detection (``--mislabel``, :mod:`bif.bench.mislabel`), or the loop's speed against its
bare fused work (``bif bench speed``, :mod:`bif.bench.speed`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bif.errors import ConfigError
from bif.flags import add_config_flags

SWEEP_CHAINS = (2, 4, 8, 16)
SWEEP_DRAWS = (25, 50, 100, 200, 400)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench_parser(sub: Any) -> None:
    from bif.bench.runner import DEFAULT_METHODS, METHODS

    bench = sub.add_parser(
        "bench",
        help="LDS benchmark of BIF and baselines on a setting (digits, mnist, fmnist, shakespeare)",
        description="Score attribution methods by the linear datamodeling score against the "
        "retraining ground truth shipped with bif; prints a table and writes JSON and a PNG chart. "
        "BIF hyperparameter flags apply to the 'bif' method.",
    )
    bench.add_argument(
        "setting",
        help="benchmark setting: digits, mnist, fmnist or shakespeare (language model); or "
        "'calibration': are the standard errors right (z-score variance over replicate runs "
        "on linear regression and digits, and the diagnostics' false alarms); or 'speed': "
        "the default run's time against the bare fused work of its maths",
    )
    bench.add_argument("speed_on", nargs="?", default=None, metavar="SPEED_SETTING",
                       help="speed: digits, mnist, tiny-lm or a comma list (default: all "
                       "three)")  # fmt: skip
    bench.add_argument(
        "--methods", default=None,
        help=f"comma-separated methods among {','.join(sorted(METHODS))} (default: "
        f"{','.join(DEFAULT_METHODS)}; shakespeare: bif,grad-dot,grad-cos,ekfac,trak)",
    )  # fmt: skip
    bench.add_argument("--out", type=Path, default=Path("bif-bench"), help="output directory")
    bench.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CI")
    bench.add_argument("--sweep", action="store_true", help="BIF LDS vs chains × draws instead")
    bench.add_argument("--chains", type=_ints, default=None,
                       help="sweep: chain counts (default 2,4,8,16); speed: one")  # fmt: skip
    bench.add_argument("--draws", type=_ints, default=None,
                       help="sweep: draws (default 25,50,100,200,400); speed: one")  # fmt: skip
    bench.add_argument("--burnin", type=int, default=None, help="speed: num_burnin")
    bench.add_argument("--repeats", type=int, default=1,
                       help="speed: times to run each phase, alternating")  # fmt: skip
    bench.add_argument("--quick", action="store_true",
                       help="speed: tiny sizes, a smoke check (not a figure)")  # fmt: skip
    bench.add_argument("--device", default=None,
                       help="speed: where to sample (default: cuda if available)")  # fmt: skip
    bench.add_argument(
        "--time-to-ekfac", action="store_true",
        help="time to EK-FAC's LDS instead: EK-FAC, then BIF at each --grid point (cheapest "
        "first) until its LDS reaches EK-FAC's; prints both wall times and their ratio",
    )  # fmt: skip
    bench.add_argument("--grid", default="4x250,8x250,8x500,8x1000,8x2000",
                       help="--time-to-ekfac: CHAINSxDRAWS points")  # fmt: skip
    bench.add_argument("--adaptive", action="store_true",
                       help="--time-to-ekfac: also time the num_draws='auto' run")  # fmt: skip
    bench.add_argument("--replicates", type=int, default=None,
                       help="calibration: replicate runs per setting (default: linear 60, "
                       "digits 20)")  # fmt: skip
    bench.add_argument("--on", default="linear,digits",
                       help="calibration: settings (linear, digits)")  # fmt: skip
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (speed: default 1)")  # fmt: skip
    bench.add_argument(
        "--mislabel", action="store_true",
        help="mislabel detection instead: flip --flip-fraction of the training labels, retrain, "
        "rank examples by self-influence (AUC, recall@10%%); methods default to "
        "bif,grad-dot,if-exact,loss ('loss' = training loss, a baseline for this mode only)",
    )  # fmt: skip
    bench.add_argument(
        "--if-damping", type=float, default=None,
        help="damping λ of if-exact, if-cg and if-lissa (default: the bench's fixed 1e-3)",
    )  # fmt: skip
    bench.add_argument("--flip-fraction", type=float, default=0.1,
                       help="--mislabel: share of training labels flipped")  # fmt: skip
    add_config_flags(bench)


def cmd_bench(args: argparse.Namespace, bif_options: dict[str, Any]) -> int:
    import torch

    from bif.bench.runner import (
        DEFAULT_METHODS,
        METHODS,
        SETTING_METHODS,
        format_table,
        run_bench,
        run_sweep,
    )

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    options: dict[str, dict[str, Any]] = {"bif": bif_options}
    if args.if_damping is not None:
        if not args.if_damping > 0:
            raise ConfigError(f"--if-damping must be > 0, got {args.if_damping}.")
        options.update({m: {"damping": args.if_damping} for m in ("if-exact", "if-cg", "if-lissa")})
    if sum(map(bool, (args.sweep, args.mislabel, args.time_to_ekfac))) > 1:
        raise ConfigError(
            "--sweep, --mislabel and --time-to-ekfac are separate experiments; choose one."
        )
    if args.speed_on is not None and args.setting != "speed":
        raise ConfigError(f"a second setting ({args.speed_on!r}) is for `bif bench speed` only.")
    if args.mislabel and args.setting == "shakespeare":
        raise ConfigError("--mislabel flips class labels; the shakespeare setting has none.")
    if args.setting == "speed":
        _cmd_speed(args, bif_options)
    elif args.setting == "calibration":
        from bif.bench.calibration import check_request, format_rows, run_calibration

        on = tuple(x.strip() for x in args.on.split(",") if x.strip())
        check_request(on, args.replicates)
        print(f"bif bench calibration: {', '.join(on)}", flush=True)

        def show_rep(name: str, seed: int, res: Any, dt: float) -> None:
            d = res.diagnostics
            print(f"  {name} seed {seed}: {dt:.1f} s, verdict {d.verdict if d else '?'}",
                  flush=True)  # fmt: skip

        doc = run_calibration(on, args.replicates, args.out, on_replicate=show_rep,
                              **bif_options)  # fmt: skip
        from bif.bench.calibration import ZRow

        print(format_rows([ZRow(**r) for r in doc["rows"]]))
        for name, part in doc["settings"].items():
            print(f"{name}: {part['false_alarms']} of {part['runs']} runs not ok")
        print(f"wrote {args.out / 'calibration.json'}")
    elif args.mislabel:
        from bif.bench.mislabel import (
            DEFAULT_MISLABEL_METHODS,
            MISLABEL_METHODS,
            format_mislabel_table,
            run_mislabel,
        )
        from bif.bench.runner import DEFAULT_METHODS

        text = args.methods or ",".join(DEFAULT_METHODS)
        methods = tuple(m.strip() for m in text.split(",") if m.strip())
        if text == ",".join(DEFAULT_METHODS):  # --methods left at the LDS default
            methods = DEFAULT_MISLABEL_METHODS
        unknown = [m for m in methods if m not in MISLABEL_METHODS]
        if unknown:
            raise ConfigError(
                f"unknown method(s) {unknown}; choose from {sorted(MISLABEL_METHODS)}."
            )
        print(f"bif bench {args.setting} --mislabel: {args.flip_fraction:g} of the training "
              f"labels flipped; {', '.join(methods)}", flush=True)  # fmt: skip
        rows = run_mislabel(args.setting, methods, args.flip_fraction, out_dir=args.out,
                            method_options=options,
                            on_row=lambda r: print(f"  done {r.method}", flush=True),
                            n_boot=args.n_boot)  # fmt: skip
        print(format_mislabel_table(rows))
        print(f"wrote {args.out / (args.setting + '-mislabel.json')}")
    elif args.time_to_ekfac:
        from bif.bench.timeto import parse_grid, run_time_to

        grid = parse_grid(args.grid)
        print(f"bif bench {args.setting} --time-to-ekfac: ekfac, then bif at {args.grid}")
        print(f"{'method':<8} {'chains':>6} {'draws':>6} {'LDS':>7}  {'95% interval':<17} "
              f"{'time (s)':>9}  verdict")  # fmt: skip

        def show_time(p: Any) -> None:
            ci = f"[{p.ci_low:.3f}, {p.ci_high:.3f}]"
            tag = "  (auto)" if p.adaptive else ""
            tag += "  reaches ekfac" if p.reached else ""
            print(f"{p.method:<8} {p.num_chains:6d} {p.num_draws:6d} {p.lds:7.3f}  {ci:<17} "
                  f"{p.seconds:9.1f}  {p.verdict}{tag}", flush=True)  # fmt: skip

        doc = run_time_to(args.setting, "ekfac", grid, args.adaptive, args.out, args.n_boot,
                          show_time, **bif_options)  # fmt: skip
        if doc["first"] is None:
            print(f"no grid point reached EK-FAC's LDS {doc['reference']['lds']:.3f}")
        else:
            p = doc["points"][doc["first"]]
            print(f"time to EK-FAC's LDS: {p['seconds']:.1f} s ({p['num_chains']} × "
                  f"{p['num_draws']}) vs EK-FAC {doc['reference']['seconds']:.1f} s: "
                  f"{doc['ratio']:.1f}×")  # fmt: skip
        print(f"wrote {args.out / (args.setting + '-time-to-ekfac.json')}")
    elif args.sweep:
        args.chains, args.draws = args.chains or SWEEP_CHAINS, args.draws or SWEEP_DRAWS
        print(f"bif bench {args.setting} --sweep: chains {args.chains} × draws {args.draws}")
        print(f"{'chains':>6} {'draws':>6} {'LDS':>7}  {'95% interval':<17} {'time (s)':>9}")

        def show(p: Any) -> None:
            ci = f"[{p.ci_low:.3f}, {p.ci_high:.3f}]"
            auto = f"  num_draws='auto' ({p.stop})" if p.adaptive else ""
            print(f"{p.num_chains:6d} {p.num_draws:6d} {p.lds:7.3f}  {ci:<17} {p.seconds:9.1f}"
                  f"{auto}", flush=True)  # fmt: skip

        run_sweep(args.setting, args.chains, args.draws, args.out, args.n_boot, show,
                  **bif_options)  # fmt: skip
        print(f"wrote {args.out / (args.setting + '-sweep.json')} and .png")
    else:
        text = args.methods or ",".join(SETTING_METHODS.get(args.setting, DEFAULT_METHODS))
        methods = tuple(m.strip() for m in text.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}.")
        print(f"bif bench {args.setting}: {', '.join(methods)}", flush=True)
        rows = run_bench(args.setting, methods, args.out, options, args.n_boot,
                         on_row=lambda r: print(f"  done {r.method}", flush=True))  # fmt: skip
        print(format_table(rows))
        print(f"wrote {args.out / (args.setting + '.json')} and .png")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_speed(args: argparse.Namespace, bif_options: dict[str, Any]) -> None:
    """``bif bench speed [SETTING]``: print the table, write speed.json and speed.txt."""
    from bif.bench.speed import SPEED_FILE, TABLE_FILE, parse_settings, run_speed

    names = parse_settings(args.speed_on)
    options = dict(bif_options)
    for flag, name in (("chains", "num_chains"), ("draws", "num_draws")):
        values = getattr(args, flag)
        if values is not None:
            if len(values) != 1:
                raise ConfigError(f"speed: --{flag} takes one number, got {values}.")
            options[name] = values[0]
    if args.burnin is not None:
        options["num_burnin"] = args.burnin
    threads = args.threads if args.threads is not None else 1
    print(f"bif bench speed: {', '.join(names)} ({threads} thread(s)"
          f"{', quick' if args.quick else ''})", flush=True)  # fmt: skip
    doc = run_speed(names, args.out, options, quick=args.quick, repeats=args.repeats,
                    threads=threads, device=args.device,
                    on_event=lambda line: print(line, flush=True))  # fmt: skip
    print(doc["table"])
    print(f"wrote {args.out / SPEED_FILE} and {args.out / TABLE_FILE}")
