"""Generate (or resume) the shipped LDS retraining ground truth of one benchmark setting.

    python scripts/make_ground_truth.py digits --m 100 --r 3
    python scripts/make_ground_truth.py mnist  --m 100 --r 3
    python scripts/make_ground_truth.py fmnist --m 100 --r 3
    python scripts/make_ground_truth.py shakespeare --m 100 --r 3 --batch 10 --tokens 300

Writes ``src/bif/bench/ground_truth/SETTING.{safetensors,json}`` (``--out`` to change the folder).
(shakespeare fine-tunes one model at a time, so ``--batch`` only sets how often it saves;
``--tokens K`` also records the loss of K query tokens, :func:`bif.bench.lm.setting.token_sample`
with ``--token-seed``, for the token-level LDS.)
Killing it loses at most one batch of models; rerunning the same command resumes. Prints the
full-data reference model's test accuracy and the wall time at the end.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from bif.bench.settings import SETTINGS, load_setting
from bif.eval.retrain import run_retraining, train_reference

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "bif" / "bench" / "ground_truth"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("setting", choices=sorted(SETTINGS))
    p.add_argument("--m", type=int, default=100, help="number of random subsets M")
    p.add_argument("--r", type=int, default=3, help="training seeds per subset R")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction")
    p.add_argument("--seed", type=int, default=0, help="draws the subsets and model seeds")
    p.add_argument("--output", choices=("loss", "margin"), default="loss")
    p.add_argument("--batch", type=int, default=50, help="models trained at once")
    p.add_argument(
        "--tokens",
        type=int,
        default=0,
        help="causal-lm: also record this many sampled query tokens' losses (0: none)",
    )
    p.add_argument("--token-seed", type=int, default=0, help="seed of the token sample")
    # One thread: on 2 shared cores OpenMP barriers make two threads far slower for small models.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="artefact folder")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    command = shlex.join(
        ["python", "scripts/make_ground_truth.py", a.setting, "--m", str(a.m), "--r", str(a.r),
         "--alpha", str(a.alpha), "--seed", str(a.seed), "--output", a.output,
         "--batch", str(a.batch)]
        + (["--tokens", str(a.tokens), "--token-seed", str(a.token_seed)] if a.tokens else [])
    )  # fmt: skip
    setting = load_setting(a.setting)
    tokens = None
    if a.tokens:
        from bif.bench.lm.setting import token_sample

        tokens = token_sample(setting, a.tokens, a.token_seed)
    t0 = time.perf_counter()
    ref = train_reference(setting)
    print(
        f"{a.setting}: N={setting.num_train} Q={setting.num_query}; reference model "
        f"(seed {setting.reference_seed}) test accuracy {setting.accuracy(ref):.4f} on "
        f"{len(setting.y_test)}{' (next-token)' if setting.task == 'causal-lm' else ''}, "
        f"trained in {time.perf_counter() - t0:.1f} s"
    )
    t0 = time.perf_counter()
    gt = run_retraining(
        setting, a.out / a.setting, alpha=a.alpha, num_subsets=a.m, num_seeds=a.r, seed=a.seed,
        output=a.output, tokens=tokens, models_per_batch=a.batch, command=command,
    )  # fmt: skip
    print(
        f"{a.setting}: {int(gt.done.sum())}/{gt.done.numel()} models; this run "
        f"{time.perf_counter() - t0:.0f} s, total training {gt.meta['wall_seconds']:.0f} s; "
        f"retrained query accuracy {gt.query_accuracy.nanmean():.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
