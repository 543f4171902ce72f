"""Fast paths of the sampling loop against their slow twins.

The whole-run co-moment derived from the batch-means blocks (``recorder.DERIVE_COMOMENT``)
against the streaming one, and the deferred host reads of an accelerator's loop, run on a CPU
against the immediate twin.

On CUDA the loop reads its divergence checks and copies its traces to the host only every
``SYNC_EVERY`` steps (:class:`bif.sampler.divergence.Guard`, ``Recorder(defer=True)``), so no
step waits for the device. The same code runs here with ``SYNC_EVERY = 3``: every result must be
bit for bit the immediate one, and a divergence must raise the same error (chain, step, text).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bif
import bif.sampler.recorder as recorder_mod
import bif.sampler.run as run_mod
from bif.errors import DivergenceError
from test_errors import KW as ERR_KW
from test_errors import data  # noqa: F401 (fixture)
from test_errors import run as err_run
from test_twins import KW, assert_identical, problem  # noqa: F401 (fixture)


@pytest.mark.parametrize("num_draws", [6, "auto"])
def test_comoment_from_blocks_equals_streaming(problem, monkeypatch, num_draws):  # noqa: F811
    """Chan's merge of the blocks is the streaming co-moment up to float64 rounding (the
    blocks double once in the adaptive run: merged slots too)."""
    model, train, query = problem
    kw = dict(KW, num_draws=num_draws, check_every=4, max_draws=12, stderr_blocks=2, thin=1)
    derived = bif.attribute(model, train, query, **kw)
    monkeypatch.setattr(recorder_mod, "DERIVE_COMOMENT", False)
    streamed = bif.attribute(model, train, query, **kw)
    for name in ("scores", "stderr", "correlation", "self_influence"):
        a, b = getattr(derived, name), getattr(streamed, name)
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale, msg=name)
    assert not torch.equal(derived.scores, -derived.scores)  # not all zero


def _both(monkeypatch, fn: Any) -> tuple[Any, Any]:
    """``fn()`` with immediate reads, then with reads every 3 steps."""
    immediate = fn()
    monkeypatch.setattr(run_mod, "SYNC_EVERY", 3)
    deferred = fn()
    monkeypatch.undo()
    return immediate, deferred


@pytest.mark.parametrize("vmap", [True, False])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_deferred_reads_give_the_same_result(problem, monkeypatch, vmap, batch_size):  # noqa: F811
    model, train, query = problem
    kw = dict(KW, vmap_chains=vmap, batch_size=batch_size, sampler="kinetic", precondition_rank=4)
    a, b = _both(monkeypatch, lambda: bif.attribute(model, train, query, **kw))
    assert_identical(a, b)
    for name in ("train_trace", "energy"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_deferred_reads_adaptive_and_resume(problem, monkeypatch, tmp_path):  # noqa: F811
    """num_draws='auto' stops at the same draw; a run killed after a deferred checkpoint
    resumes to the uninterrupted result."""
    model, train, query = problem
    kw = dict(KW, num_draws="auto", check_every=4, max_draws=12, stderr_blocks=2, thin=1)
    a, b = _both(monkeypatch, lambda: bif.attribute(model, train, query, **kw))
    assert_identical(a, b)
    assert a.meta["adaptive"]["draws"] == b.meta["adaptive"]["draws"]

    monkeypatch.setattr(run_mod, "SYNC_EVERY", 3)
    calls = {"n": 0}
    real = run_mod.Keeper.__call__

    def dies(self: Any, state: Any, info: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint of draw 4
            raise KeyboardInterrupt
        return real(self, state, info)

    kwr = dict(KW, thin=1)
    monkeypatch.setattr(run_mod.Keeper, "__call__", dies)
    with pytest.raises(KeyboardInterrupt):
        bif.attribute(model, train, query, run_dir=tmp_path, checkpoint_every=4, **kwr)
    monkeypatch.setattr(run_mod.Keeper, "__call__", real)
    resumed = bif.attribute(model, train, query, run_dir=tmp_path, checkpoint_every=4, **kwr)
    monkeypatch.undo()
    assert resumed.meta["resumed"]
    assert_identical(resumed, bif.attribute(model, train, query, **kwr))


def test_deferred_reads_lm_tokens(monkeypatch) -> None:
    from bif.lm import CausalLMTask
    from test_lm import FAST, TinyLM
    from test_lm import _data as lm_data

    train, query = lm_data()
    kw = dict(FAST, task=CausalLMTask(), chunk_size=4)
    a, b = _both(monkeypatch, lambda: bif.attribute(TinyLM().eval(), train, query, **kw))
    assert_identical(a, b)
    assert a.tokens is not None and b.tokens is not None
    assert torch.equal(a.tokens.train, b.tokens.train)
    assert torch.equal(a.tokens.query, b.tokens.query)


def _error(monkeypatch, setup: Any, **kw: Any) -> tuple[DivergenceError, DivergenceError]:
    def fail() -> DivergenceError:
        with pytest.raises(DivergenceError) as e:
            err_run(setup, **kw)
        return e.value

    return _both(monkeypatch, fail)


@pytest.mark.parametrize("vmap", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        # float overflow in the burn-in: a NaN/inf training loss at a step
        dict(step_size=10.0, num_burnin=60, precondition_rank=64),
        # a finite runaway: its energy trips at the first draw
        dict(step_size=1.0, num_burnin=2, num_draws=3, precondition_rank=0),
    ],
    ids=["nan-loss", "runaway-energy"],
)
def test_deferred_divergence_is_the_same_error(data, monkeypatch, vmap, kw):  # noqa: F811
    immediate, deferred = _error(monkeypatch, data, vmap_chains=vmap, **kw)
    assert (deferred.chain, deferred.step) == (immediate.chain, immediate.step)
    assert str(deferred) == str(immediate)
    assert 0 <= immediate.chain < ERR_KW["num_chains"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")
def test_cuda_steps_do_not_synchronise(problem, monkeypatch):  # noqa: F811
    """On CUDA the loop waits for the device only at its reads (every SYNC_EVERY steps, the
    checkpoints and the end), not at every step: count torch's synchronisation warnings."""
    import warnings

    model, train, query = problem
    kw = dict(KW, num_draws=40, num_burnin=8, thin=1, device="cuda", sampler="kinetic")
    bif.attribute(model, train, query, **kw)  # warm up (compilation, allocator)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bif.attribute(model, train, query, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    steps = kw["num_burnin"] + kw["num_draws"]
    assert syncs < steps / 4, f"{syncs} synchronisations in {steps} steps"
