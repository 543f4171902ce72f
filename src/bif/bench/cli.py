"""``bif bench`` (registered by :mod:`bif.cli`): the LDS table of a setting, a BIF sweep, or
mislabel detection (``--mislabel``, :mod:`bif.bench.mislabel`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bif.errors import ConfigError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench_parser(sub: Any, add_config_flags: Any) -> None:
    from bif.bench.runner import DEFAULT_METHODS, METHODS

    bench = sub.add_parser(
        "bench",
        help="LDS benchmark of BIF and baselines on a setting (digits, mnist, fmnist, shakespeare)",
        description="Score attribution methods by the linear datamodeling score against the "
        "retraining ground truth shipped with bif; prints a table and writes JSON and a PNG chart. "
        "BIF hyperparameter flags apply to the 'bif' method.",
    )
    bench.add_argument(
        "setting", help="benchmark setting: digits, mnist, fmnist or shakespeare (language model)"
    )
    bench.add_argument(
        "--methods", default=None,
        help=f"comma-separated methods among {','.join(sorted(METHODS))} (default: "
        f"{','.join(DEFAULT_METHODS)}; shakespeare: bif,grad-dot,grad-cos,ekfac,trak)",
    )  # fmt: skip
    bench.add_argument("--out", type=Path, default=Path("bif-bench"), help="output directory")
    bench.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CI")
    bench.add_argument("--sweep", action="store_true", help="BIF LDS vs chains × draws instead")
    bench.add_argument("--chains", type=_ints, default=(2, 4, 8, 16), help="sweep: chain counts")
    bench.add_argument("--draws", type=_ints, default=(25, 50, 100, 200, 400), help="sweep: draws")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
    if args.sweep and args.mislabel:
        raise ConfigError("--sweep and --mislabel are separate experiments; choose one.")
    if args.mislabel and args.setting == "shakespeare":
        raise ConfigError("--mislabel flips class labels; the shakespeare setting has none.")
    if args.mislabel:
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
    elif args.sweep:
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
