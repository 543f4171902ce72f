"""The process that ``test_run_dir`` kills: preloaded once into a multiprocessing forkserver.

Importing this module warms torch up (the first ``bif.attribute`` of a process spends seconds
importing torch.func's machinery), so that every forked child starts at full speed and the
random kill moments fall inside the run rather than inside start-up. One torch thread: the
server forks children, and no OpenMP pool must exist in it.
"""

from __future__ import annotations

import torch

import bif
from bif import diagnostics
from test_run_dir import KILL, make_problem

torch.set_num_threads(1)


def child(run_dir: str) -> None:
    """A whole run with a checkpoint after every draw (killed by the parent at some moment)."""
    model, train, query = make_problem()
    bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=1, **KILL)


def lm_child(run_dir: str) -> None:
    """The tiny causal LM of test_lm with per-token traces on disk (killed by test_tracestore)."""
    from test_tracestore import LM_KILL, lm_problem

    model, train, query = lm_problem()
    bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=1, **LM_KILL)


def _warm_up() -> None:
    model, train, query = make_problem()
    bif.attribute(model, train, query, **dict(KILL, num_draws=2, num_burnin=0))
    # The diagnostics' first ArviZ call imports scipy.signal and friends (~0.4 s): warm it too,
    # or most kills would land in the diagnostics after the last checkpoint.
    diagnostics.diagnose(torch.randn(2, 30), torch.randn(2, 30, 3), torch.randn(3, 5), None)


_warm_up()
