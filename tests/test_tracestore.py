"""Per-token traces on disk (:mod:`bif.tracestore`): written as draws arrive, only new draws per
checkpoint, pinned to their run, identical after kill -9 at random moments and a resume."""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import bif
from bif.errors import ArtifactError
from bif.lm import CausalLMTask
from bif.tracestore import TraceStore
from test_lm import FAST, TinyLM
from test_lm import _data as lm_data

LM_KILL: dict[str, Any] = dict(FAST, task=CausalLMTask(), chunk_size=4, num_draws=40)


def lm_problem() -> tuple[Any, Any, Any]:
    train, query = lm_data()
    return TinyLM().eval(), train, query


def test_store_roundtrip_and_done_mask(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    store = TraceStore((3, 5, 4), path, {"config": {"a": 1}}, buffer_draws=2)
    v = torch.arange(12, dtype=torch.float32).view(3, 4)
    for d in range(5):
        store.write([0, 1, 2], d, v + d)
    store.flush()
    assert bool(store.done.all())
    t = store.tensor()
    assert torch.equal(t[:, 3], v + 3)
    # The file holds exactly C·D·K float32 values; a second store on it reads the same.
    assert path.stat().st_size == 3 * 5 * 4 * 4
    again = TraceStore((3, 5, 4), path, {"config": {"a": 1}})
    assert torch.equal(again.tensor(), t)


def test_store_of_another_config_refuses_with_a_diff(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    TraceStore((2, 3, 4), path, {"config": {"num_draws": 3}, "identity": "x"}).flush()
    with pytest.raises(ArtifactError, match="num_draws"):
        TraceStore((2, 3, 4), path, {"config": {"num_draws": 9}, "identity": "x"})
    with pytest.raises(ArtifactError, match="shape"):
        TraceStore((2, 4, 4), path, {"config": {"num_draws": 3}, "identity": "x"})


def test_checkpoint_holds_no_traces_and_writes_only_new_draws(tmp_path: Path) -> None:
    model, train, query = lm_problem()
    run_dir = tmp_path / "run"
    r = bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=5, **LM_KILL)
    state = bif.checkpoint.load_tensors(run_dir / "state.safetensors", "")[0]
    assert not any(k.startswith("token_") for k in state), "traces must live in their files"
    assert bool(state["tokens.done.train"].all()) and bool(state["tokens.done.query"].all())
    c, d = LM_KILL["num_chains"], LM_KILL["num_draws"]
    kn = r.tokens.train.shape[-1]
    assert (run_dir / "tokens.train.f32").stat().st_size == c * d * kn * 4
    # The in-memory twin: a run without run_dir (temporary file) gives the same traces.
    plain = bif.attribute(*lm_problem(), **LM_KILL)
    assert torch.equal(plain.tokens.train, r.tokens.train)
    assert torch.equal(plain.tokens.query, r.tokens.query)
    assert torch.equal(plain.scores, r.scores)
    # The result written and read back keeps them.
    saved = bif.BIFResult.load(r.save(tmp_path / "result"))
    assert torch.equal(saved.tokens.train, r.tokens.train)


def test_sigkill_at_random_moments_gives_identical_traces(tmp_path: Path, monkeypatch) -> None:
    trials = int(os.environ.get("BIF_KILL_TRIALS", "5"))
    ref = bif.attribute(*lm_problem(), **LM_KILL)
    ctx = multiprocessing.get_context("forkserver")
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    ctx.set_forkserver_preload(["kill_worker"])
    from kill_worker import lm_child

    t0 = time.perf_counter()
    full = ctx.Process(target=lm_child, args=(str(tmp_path / "full"),))
    full.start()
    full.join()
    duration = time.perf_counter() - t0
    assert full.exitcode == 0
    rng = random.Random(1)
    for i in range(trials):
        run_dir = tmp_path / f"kill{i}"
        p = ctx.Process(target=lm_child, args=(str(run_dir),))
        p.start()
        time.sleep(rng.uniform(0.2, duration))
        p.kill()
        p.join()
        resumed = bif.attribute(*lm_problem(), run_dir=run_dir, checkpoint_every=1, **LM_KILL)
        assert torch.equal(resumed.tokens.train, ref.tokens.train), i
        assert torch.equal(resumed.tokens.query, ref.tokens.query), i
        assert torch.equal(resumed.scores, ref.scores), i
