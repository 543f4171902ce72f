"""Every fast path against its slow twin, on a tiny float64 MLP.

vmap over chains vs the plain loop, chunked vs single-pass evaluation, resumed vs uninterrupted
runs, tensors vs Dataset vs DataLoader inputs, and chain trajectories vs the number of chains.
In float64 the twins differ only by summation order, so they must agree to ~1e-12 relative; we
assert rtol 1e-8 (four orders of margin, still far below any statistical effect: the scores
themselves vary by O(1) relative between seeds, see ``test_different_seed_differs``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bif
import bif.sampler.recorder as recorder_mod
from bif.errors import ArtifactError

N, Q, DIN, K = 24, 5, 5, 3
KW: dict[str, Any] = dict(
    num_chains=3,
    num_draws=6,
    num_burnin=5,
    thin=2,
    step_size=1e-3,
    nbeta=24.0,
    gamma=100.0,
    progress=False,
)
RESULT_TENSORS = ("scores", "stderr", "correlation", "self_influence", "draw_loss", "step_loss")


def make_problem(seed: int = 0) -> tuple[nn.Module, tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIN, 8), nn.Tanh(), nn.Linear(8, K)).double().eval()
    x = torch.randn(N, DIN, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    xq = torch.randn(Q, DIN, generator=g, dtype=torch.float64)
    yq = torch.randint(0, K, (Q,), generator=g)
    return model, (x, y), (xq, yq)


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, tuple, tuple]:
    return make_problem()


def assert_same(r1: bif.BIFResult, r2: bif.BIFResult, rtol: float = 1e-8) -> None:
    for name in (*RESULT_TENSORS, "query_trace", "self_influence_stderr"):
        a, b = getattr(r1, name), getattr(r2, name)
        # atol is relative to the tensor's scale: scores near 0 have no meaningful rtol.
        atol = rtol * float(a.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_identical(r1: bif.BIFResult, r2: bif.BIFResult) -> None:
    for name in (*RESULT_TENSORS, "query_trace", "self_influence_stderr"):
        a, b = getattr(r1, name), getattr(r2, name)
        assert torch.equal(a, b), f"{name} differs by {float((a - b).abs().max())}"


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop", "kinetic"])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_vmap_matches_loop(problem, sampler: str, batch_size: int | None) -> None:
    model, train, query = problem
    kw = dict(KW, sampler=sampler, batch_size=batch_size)
    rv = bif.attribute(model, train, query, vmap_chains=True, **kw)
    rl = bif.attribute(model, train, query, vmap_chains=False, **kw)
    assert torch.isfinite(rv.scores).all() and float(rv.scores.abs().max()) > 0
    assert torch.isfinite(rv.stderr).all()
    assert_same(rv, rl)


def test_scores_match_traces(problem) -> None:
    """Streaming moments vs the stored traces: covariance is bilinear, so the mean over train
    examples of scores[q, :] must equal -Cov(draw_loss, query_trace[..., q]) (chain-averaged)."""
    model, train, query = problem
    r = bif.attribute(model, train, query, **KW)
    a = r.draw_loss  # [C, D]
    b = r.query_trace  # [C, D, Q]
    ac = a - a.mean(1, keepdim=True)
    bc = b - b.mean(1, keepdim=True)
    cov = torch.einsum("cd,cdq->cq", ac, bc) / (a.shape[1] - 1)  # [C, Q]
    torch.testing.assert_close(r.scores.mean(1), -cov.mean(0), rtol=1e-8, atol=1e-14)
    assert not torch.isnan(r.step_loss).any() and not torch.isnan(r.query_trace).any()


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_chunk_size_invariance(problem, chunk_size: int) -> None:
    model, train, query = problem
    ref = bif.attribute(model, train, query, chunk_size=10_000, **KW)
    r = bif.attribute(model, train, query, chunk_size=chunk_size, **KW)
    assert_same(r, ref)


def test_same_seed_identical(problem) -> None:
    model, train, query = problem
    r1 = bif.attribute(model, train, query, seed=3, batch_size=8, **KW)
    r2 = bif.attribute(model, train, query, seed=3, batch_size=8, **KW)
    assert_identical(r1, r2)


def test_different_seed_differs(problem) -> None:
    model, train, query = problem
    r1 = bif.attribute(model, train, query, seed=3, **KW)
    r2 = bif.attribute(model, train, query, seed=4, **KW)
    rel = (r1.scores - r2.scores).abs().max() / r1.scores.abs().max()
    assert rel > 1e-3
    assert not torch.equal(r1.step_loss, r2.step_loss)


@pytest.mark.parametrize("batch_size", [None, 8])
def test_chain_trajectory_independent_of_num_chains(problem, batch_size: int | None) -> None:
    model, train, query = problem
    kw = dict(KW, batch_size=batch_size)
    r2 = bif.attribute(model, train, query, **dict(kw, num_chains=2))
    r4 = bif.attribute(model, train, query, **dict(kw, num_chains=4))
    torch.testing.assert_close(r4.step_loss[:2], r2.step_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(r4.query_trace[:2], r2.query_trace, rtol=1e-10, atol=0)
    # The extra chains are genuinely different draws, not copies of the first ones.
    assert not torch.allclose(r4.step_loss[2], r4.step_loss[0])


def test_tensor_dataset_dataloader_agree(problem) -> None:
    model, (x, y), (xq, yq) = problem
    kw = dict(KW, batch_size=8)
    rt = bif.attribute(model, (x, y), (xq, yq), **kw)
    rd = bif.attribute(model, TensorDataset(x, y), TensorDataset(xq, yq), **kw)
    torch.manual_seed(123)  # the loaders' shuffling must be ignored, whatever the global seed
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    qloader = DataLoader(TensorDataset(xq, yq), batch_size=2, shuffle=True)
    rl = bif.attribute(model, loader, qloader, **kw)
    assert_identical(rt, rd)
    assert_identical(rt, rl)


# --- resume vs uninterrupted ---------------------------------------------------------------


class _Interrupt:
    """Replaces ``update_moments`` in the sampling loop; raises KeyboardInterrupt at call ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.real = recorder_mod.update_moments

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


RESUME_CASES = [
    # vmap: one group, one update per draw (6 draws); checkpoints after draws 2, 4, 6.
    (True, "sgld", None, [4, 2]),
    (True, "rmsprop", 8, [3]),
    (True, "kinetic", None, [5]),
    # loop: 3 groups of 6 updates; interrupt mid chain 0, at the first draw of chain 1 (last
    # save = end of chain 0), then mid chain 2 on the second resumed call.
    (False, "sgld", 8, [4, 4, 7]),
    (False, "rmsprop", None, [11, 7]),
    (False, "kinetic", 8, [9]),
]


@pytest.mark.parametrize(("vmap", "sampler", "batch_size", "interrupts"), RESUME_CASES)
def test_resume_matches_uninterrupted(
    problem, tmp_path, monkeypatch, vmap: bool, sampler: str, batch_size, interrupts: list[int]
) -> None:
    model, train, query = problem
    kw = dict(KW, vmap_chains=vmap, sampler=sampler, batch_size=batch_size)
    ref = bif.attribute(model, train, query, **kw)
    run_dir = tmp_path / "run"
    for at in interrupts:
        stopper = _Interrupt(at)
        monkeypatch.setattr(recorder_mod, "update_moments", stopper)
        with pytest.raises(KeyboardInterrupt):
            bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=2, **kw)
        assert stopper.calls == at
        assert (run_dir / "state.safetensors").exists()
    monkeypatch.undo()
    resumed = bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=2, **kw)
    assert resumed.meta["resumed"] is True
    assert_identical(resumed, ref)
    # A finished run_dir returns the same result again without sampling.
    again = bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=2, **kw)
    assert_identical(again, ref)


def test_resume_rejects_other_config(problem, tmp_path) -> None:
    model, train, query = problem
    bif.attribute(model, train, query, run_dir=tmp_path, **KW)
    with pytest.raises(ArtifactError, match=r"different config") as info:
        bif.attribute(model, train, query, run_dir=tmp_path, **dict(KW, step_size=2e-3))
    assert "step_size: 0.001 -> 0.002" in str(info.value)
    assert "new run_dir" in str(info.value)


def test_resume_rejects_other_model(problem, tmp_path) -> None:
    model, train, query = problem
    bif.attribute(model, train, query, run_dir=tmp_path, **KW)
    other, _, _ = make_problem(seed=1)
    with pytest.raises(ArtifactError, match=r"different sampled weights"):
        bif.attribute(other, train, query, run_dir=tmp_path, **KW)
    # Same weights in another dtype are another run too (its numerics differ).
    with pytest.raises(ArtifactError, match=r"sampled weights \(or their dtype\)"):
        bif.attribute(model, train, query, run_dir=tmp_path, dtype=torch.float32, **KW)
    # Other data (fewer training examples) as well.
    x, y = train
    with pytest.raises(ArtifactError, match=r"different training data"):
        bif.attribute(model, (x[:-1], y[:-1]), query, run_dir=tmp_path, **KW)


# -- fused evaluation ------------------------------------------------------------------------


def _fused_and_separate(monkeypatch, *args: Any, **kw: Any) -> tuple[bif.BIFResult, bif.BIFResult]:
    import bif.sampler.run as run_mod

    fused = bif.attribute(*args, **kw)
    monkeypatch.setattr(run_mod, "FUSED", False)
    separate = bif.attribute(*args, **kw)
    monkeypatch.undo()
    return fused, separate


@pytest.mark.parametrize("vmap", [True, False])
@pytest.mark.parametrize("thin", [1, 2])
def test_fused_evaluation_equals_a_separate_forward(problem, monkeypatch, vmap, thin) -> None:
    """A draw's training losses taken from the next step's gradient pass are bit for bit those
    of a separate forward pass at the draw (the slow twin), with the mass and centring on."""
    model, train, query = problem
    kw = dict(KW, vmap_chains=vmap, thin=thin, sampler="kinetic", precondition_rank=4)
    fused, separate = _fused_and_separate(monkeypatch, model, train, query, **kw)
    assert_identical(fused, separate)
    assert torch.equal(fused.train_trace, separate.train_trace)
    assert torch.equal(fused.energy, separate.energy)


def test_fused_evaluation_equals_a_separate_forward_lm(monkeypatch) -> None:
    """Per-token losses from the gradient pass of a causal LM equal the separate evaluation's."""
    from bif.lm import CausalLMTask
    from test_lm import FAST, TinyLM
    from test_lm import _data as lm_data

    train, query = lm_data()
    kw = dict(FAST, task=CausalLMTask(), chunk_size=4)
    fused, separate = _fused_and_separate(monkeypatch, TinyLM().eval(), train, query, **kw)
    assert_identical(fused, separate)
    assert fused.tokens is not None and separate.tokens is not None
    assert torch.equal(fused.tokens.train, separate.tokens.train)
    assert torch.equal(fused.tokens.query, separate.tokens.query)


def test_fused_adaptive_stop_equals_separate(problem, monkeypatch) -> None:
    """num_draws='auto' stops at the same draw with the same record either way."""
    model, train, query = problem
    kw = dict(KW, num_draws="auto", check_every=4, max_draws=12, stderr_blocks=2, thin=1)
    fused, separate = _fused_and_separate(monkeypatch, model, train, query, **kw)
    assert_identical(fused, separate)
    assert fused.meta["adaptive"]["draws"] == separate.meta["adaptive"]["draws"]
