"""Chain-parallel runs over a 2-process gloo group equal the single-process run bit for bit.

- chains split 2 + 1 (one chain per group) and 2 + 2 (vmapped groups), the automatic rules
  resolved on rank 0 and sent to rank 1, and an adaptive run (collective checks): every result
  field ``torch.equal`` to the same run in one process;
- a rank that fails (bad data on one rank only) stops the other with :class:`RankError`
  instead of a hang; ranks that load different data refuse;
- one rank killed mid-run (``os._exit``), the group relaunched: it resumes from each rank's own
  checkpoint without recomputing finished draws, to the uninterrupted result; a relaunch on
  another number of processes refuses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bif
from bif.errors import ArtifactError
from bif.lm import CausalLMTask
from test_lm import FAST, TinyLM
from test_lm import _data as lm_data
from test_run_dir import FIXED, assert_same_run, make_problem

WORLD = 2
# The tiny causal LM of test_lm in data-parallel: 10 sequences in chunks of 4 (rank 0 takes
# sequences 0-4 in chunks of 4 + 1, rank 1 sequences 5-9), per-token traces gathered.
LM: dict[str, Any] = dict(FAST, task=CausalLMTask(), chunk_size=4, parallel="data")
SCENARIOS: dict[str, dict[str, Any]] = {
    # 3 chains over 2 ranks (2 + 1), each chain its own group: the split is uneven on purpose.
    "loop": dict(FIXED, num_chains=3, vmap_chains=False),
    # vmapped groups of 2 per rank (a single process vmaps all 4).
    "vmap": dict(FIXED, num_chains=4, vmap_chains=True),
    # automatic step size, nβ, γ and mass (rank 0 resolves and pilots, rank 1 receives).
    "auto": dict(num_chains=2, num_draws=8, num_burnin=4, precondition_rank=4, progress=False),
    # adaptive length: the checks gather every chain's moments; rank 0 decides.
    "adaptive": dict(
        FIXED, num_chains=4, num_draws="auto", check_every=4, max_draws=12, stderr_blocks=2
    ),
}
# parallel='data': each rank differentiates half of the 24 training examples (full batch), or
# half of each chain's minibatch; the gradient is all-reduced, the draw's losses gathered.
DATA: dict[str, dict[str, Any]] = {
    "data": dict(FIXED, num_chains=2, parallel="data"),
    "data-minibatch": dict(FIXED, num_chains=2, parallel="data", batch_size=8),
    "data-auto": dict(SCENARIOS["auto"], parallel="data"),
}
KILL = dict(FIXED, num_chains=4, vmap_chains=False, num_draws=12, num_burnin=2)


def _single(*args: Any, **kw: Any) -> bif.BIFResult:
    """The one-process run, on one thread as the ranks are (the thread count changes the
    rounding of reductions, e.g. in the curvature pass)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bif.attribute(*args, **kw)
    finally:
        torch.set_num_threads(threads)


def _meta_free(a: bif.BIFResult, b: bif.BIFResult) -> None:
    for r in (a, b):
        r.meta.pop("processes", None)
        r.meta.pop("parallel", None)
        if r.meta.get("adaptive"):
            r.meta["adaptive"].pop("seconds", None)  # the stop's clock reading
    assert_same_run(a, b)


def _group(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _scenarios(rank: int, init_file: str, out: str) -> None:
    _group(rank, init_file)
    try:
        model, train, query = make_problem()
        for name, kw in {**SCENARIOS, **DATA}.items():
            r = bif.attribute(model, train, query, **kw)
            r.save(Path(out) / f"{name}.rank{rank}")
        lm_train, lm_query = lm_data()
        r = bif.attribute(TinyLM().eval(), lm_train, lm_query, **LM)
        r.save(Path(out) / f"data-lm.rank{rank}")
        # One rank's data is bad: both ranks raise, neither waits forever.
        x, y = train
        bad = (x, y.clone().fill_(99)) if rank == 1 else train
        try:
            bif.attribute(model, bad, query, **SCENARIOS["loop"])
        except bif.BIFError as e:
            (Path(out) / f"bad.rank{rank}").write_text(f"{type(e).__name__}: {e}")
        # Different (valid) data on the two ranks: both refuse.
        other = make_problem(seed=rank)[1]
        try:
            bif.attribute(model, other, query, **SCENARIOS["loop"])
        except bif.BIFError as e:
            (Path(out) / f"differ.rank{rank}").write_text(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


def _spawn(fn: Any, tmp: Path, *args: Any) -> None:
    init = tmp / f"init-{len(list(tmp.glob('init-*')))}"
    mp.start_processes(fn, args=(str(init), *args), nprocs=WORLD, start_method="spawn")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    _spawn(_scenarios, tmp, str(tmp))
    return tmp


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_chain_parallel_equals_single_process(runs: Path, name: str) -> None:
    model, train, query = make_problem()
    single = _single(model, train, query, **SCENARIOS[name])
    for rank in range(WORLD):
        r = bif.BIFResult.load(runs / f"{name}.rank{rank}")
        assert r.meta["processes"] == WORLD
        _meta_free(r, single)


def test_one_failing_rank_stops_the_group(runs: Path) -> None:
    own = (runs / "bad.rank1").read_text()
    other = (runs / "bad.rank0").read_text()
    assert own.startswith("DataError") or own.startswith("ShapeError"), own
    assert other.startswith("RankError") and "rank 1" in other, other


def test_ranks_with_different_data_refuse(runs: Path) -> None:
    for rank in range(WORLD):
        text = (runs / f"differ.rank{rank}").read_text()
        assert text.startswith("ConfigError") and "rank 1 has a different model, data" in text


@pytest.mark.parametrize("name", list(DATA))
def test_data_parallel_equals_single_process_to_summation_order(runs: Path, name: str) -> None:
    """float64 model: the all-reduced gradient differs from the one-process chunk sum in the
    last bits only, and the localised chains do not amplify that (1e-9 relative on scores)."""
    model, train, query = make_problem()
    single = _single(model, train, query, **DATA[name])
    for rank in range(WORLD):
        r = bif.BIFResult.load(runs / f"{name}.rank{rank}")
        assert r.meta["processes"] == WORLD and r.meta["parallel"] == "data"
        assert r.config == single.config
        scale = float(single.scores.abs().max())
        torch.testing.assert_close(r.scores, single.scores, rtol=1e-9, atol=1e-9 * scale)
        torch.testing.assert_close(r.draw_loss, single.draw_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(r.stderr, single.stderr, rtol=1e-7, atol=1e-9 * scale)


def test_data_parallel_token_traces(runs: Path) -> None:
    """A causal LM (float32) in data-parallel: the token traces are gathered in the order of the
    one-process run, to float32 summation order."""
    lm_train, lm_query = lm_data()
    single = _single(TinyLM().eval(), lm_train, lm_query, **LM)
    r = bif.BIFResult.load(runs / "data-lm.rank1")
    assert r.tokens is not None and single.tokens is not None
    assert torch.equal(r.tokens.train_index, single.tokens.train_index)
    torch.testing.assert_close(r.tokens.train, single.tokens.train, rtol=1e-5, atol=1e-6)
    scale = float(single.scores.abs().max())
    torch.testing.assert_close(r.scores, single.scores, rtol=1e-5, atol=1e-5 * scale)


# -- kill one rank, relaunch -------------------------------------------------------------------


def _killed(rank: int, init_file: str, run_dir: str, kill_after: int, log: str) -> None:
    """Rank 1 dies (no clean-up, like a SIGKILL) after ``kill_after`` draws; rank 0 is taken
    down by the launcher. With ``kill_after=0`` nobody dies: the relaunch, counting draws."""
    import bif.sampler.recorder as recorder_mod

    _group(rank, init_file)
    real, draws = recorder_mod.update_moments, {"n": 0}

    def counted(*a: Any, **k: Any) -> Any:
        draws["n"] += 1
        if rank == 1 and kill_after and draws["n"] > kill_after:
            os._exit(3)
        return real(*a, **k)

    recorder_mod.update_moments = counted
    r = bif.attribute(*make_problem(), run_dir=run_dir, checkpoint_every=1, **KILL)
    if rank == 0:
        r.save(Path(log) / "result")
    (Path(log) / f"draws.rank{rank}").write_text(json.dumps(draws["n"]))
    dist.destroy_process_group()


def test_kill_one_rank_and_relaunch_resumes(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    # Rank 1 owns chains 2 and 3 (12 draws each, one group per chain): it dies in chain 2.
    with pytest.raises(mp.ProcessExitedException):
        _spawn(_killed, tmp_path, str(run_dir), 5, str(log))
    states = {p.name for p in run_dir.glob("state*.safetensors")}
    # Rank 1 checkpointed each of its draws; rank 0 too, unless the launcher took it down first.
    assert "state.chains-2-3.safetensors" in states
    assert states <= {"state.chains-0-1.safetensors", "state.chains-2-3.safetensors"}
    _spawn(_killed, tmp_path, str(run_dir), 0, str(log))
    resumed = bif.BIFResult.load(log / "result")
    assert resumed.meta["resumed"]
    total = KILL["num_draws"] * 2  # draws per rank
    again = [json.loads((log / f"draws.rank{r}").read_text()) for r in range(WORLD)]
    assert again[1] <= total - 5, again  # rank 1 redid none of its first 5 checkpointed draws
    if "state.chains-0-1.safetensors" in states:
        assert again[0] < total, again  # rank 0 resumed its own checkpoint too
    single = _single(*make_problem(), **KILL)
    _meta_free(resumed, single)
    # The same directory in one process: another split of the chains, refused with the fix.
    with pytest.raises(ArtifactError, match="number of processes"):
        bif.attribute(*make_problem(), run_dir=run_dir, **KILL)


# -- torchrun -m bif run -----------------------------------------------------------------------

ENTRY = """
import torch
from torch import nn


def build():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return {"model": model, "train": (x, y), "query": (x[:3], y[:3])}
"""


def test_torchrun_bif_run_equals_one_process(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m bif run CONFIG.toml``: the launcher's group is created
    by ``bif run``, chains 0-1 and 2 run on two ranks, rank 0 writes the result."""
    import subprocess
    import sys

    (tmp_path / "model.py").write_text(ENTRY)
    fixed = {k: v for k, v in FIXED.items() if k != "progress"}
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dict(fixed, num_chains=3).items())
    (tmp_path / "bif.toml").write_text(f'entry = "model.py:build"\nout = "out"\n[bif]\n{table}\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bif", "run", str(tmp_path / "bif.toml"), "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r = bif.BIFResult.load(tmp_path / "out" / "result")
    assert r.meta["processes"] == 2
    states = sorted(p.name for p in (tmp_path / "out" / "run").glob("state*"))
    assert states == ["state.chains-0-1.safetensors", "state.chains-2-2.safetensors"]
    sys.path.insert(0, str(tmp_path))
    try:
        import model as entry  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    built = entry.build()
    single = _single(built["model"], built["train"], built["query"], **dict(FIXED, num_chains=3))
    assert torch.equal(r.scores, single.scores)
    assert torch.equal(r.stderr, single.stderr)
