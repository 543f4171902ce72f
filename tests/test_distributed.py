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
from test_run_dir import FIXED, assert_same_run, make_problem

WORLD = 2
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
        for name, kw in SCENARIOS.items():
            r = bif.attribute(model, train, query, **kw)
            r.save(Path(out) / f"{name}.rank{rank}")
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
