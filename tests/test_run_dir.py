"""A run directory resumes only its own run, survives a kill at any moment, and refuses (never
crashes on, never trusts) damaged files.

- identity: another query set, other training data of the same size, other frozen tensors or
  buffers, another observable, task, architecture or library version all refuse with an
  ``ArtifactError`` naming what differs; the same run resumes;
- kills: ≥ 20 ``SIGKILL`` at random moments of a run with ``checkpoint_every=1`` (curvature
  pass and sampling), and a crash injected at every commit (the new file written but not yet
  renamed, or just renamed), each resumed to a result identical on every field;
- damaged files: truncated, garbage and empty copies of every artefact raise ``ArtifactError``
  naming the file, also through ``bif show``.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bif
from bif import checkpoint
from bif.checkpoint import CURVATURE_FILE, RUN_FILE, STATE_FILE
from bif.errors import ArtifactError
from bif.result import META_FILE, TENSORS_FILE
from bif.tokens import TOKENS_FILE

N, Q, DIN, H, K = 24, 3, 5, 6, 3
# Fixed rules (no curvature pass) for the identity cases: as in the user's report, where the
# resolved config could not tell two data sets of the same size apart.
FIXED = dict(num_chains=2, num_draws=6, num_burnin=2, step_size=1e-3, nbeta=24.0, gamma=100.0,
             precondition_rank=0, progress=False)  # fmt: skip
# The automatic rules and the mass (a curvature pass, stored in curvature.safetensors).
AUTO = dict(num_chains=2, num_draws=30, num_burnin=10, progress=False)
# A run with every kind of artefact (manifest, curvature, states) that is cheap enough to be
# killed dozens of times: a rank-4 mass under fixed rules.
KILL = dict(FIXED, num_draws=30, num_burnin=10, precondition_rank=4)


def make_problem(seed: int = 0) -> tuple[nn.Module, tuple, tuple]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIN, H), nn.Tanh(), nn.Linear(H, K)).double().eval()
    x = torch.randn(N, DIN, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    xq = torch.randn(Q, DIN, generator=g, dtype=torch.float64)
    yq = torch.randint(0, K, (Q,), generator=g)
    return model, (x, y), (xq, yq)


def assert_same_run(a: bif.BIFResult, b: bif.BIFResult) -> None:
    """Every tensor field bit for bit, the config, and the meta apart from timings."""
    for name in bif.BIFResult._TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), name
    assert a.config == b.config
    skip = {"sampling_seconds", "resumed"}
    ma = {k: v for k, v in a.meta.items() if k not in skip}
    mb = {k: v for k, v in b.meta.items() if k not in skip}
    for m in (ma, mb):
        if isinstance(m.get("preconditioner"), dict):
            m["preconditioner"] = {
                k: v
                for k, v in m["preconditioner"].items()
                if k not in ("seconds", "hvps", "eigenpair_hvps")
            }
            if "pilot" in m["preconditioner"]:  # the same attempts, other timings
                m["preconditioner"]["pilot"] = m["preconditioner"]["pilot"]["attempts"]
    assert ma == mb


# -- identity ------------------------------------------------------------------------------


def test_reused_run_dir_with_other_queries_refuses(tmp_path) -> None:
    """The user's reproduction: the flipped queries used to return the first run's scores."""
    m, (x, y), (xq, yq) = make_problem()
    kw = dict(num_chains=2, num_draws=40, num_burnin=5, progress=False)
    bif.attribute(m, (x, y), (xq, yq), run_dir=tmp_path, **kw)
    with pytest.raises(ArtifactError, match="different query data") as e:
        bif.attribute(m, (x, y), (xq.flip(0), yq.flip(0)), run_dir=tmp_path, **kw)
    assert "new run_dir" in str(e.value)


def _obs_logit(j: int) -> Any:
    return lambda out, y: out[:, j]  # same code, another closure value


class OpaqueObservable:
    """Its setting hides in a numpy array, which code hashing does not read."""

    def __init__(self, j: int) -> None:
        self.which = np.array([j])

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out[:, int(self.which[0])]


def _smoothed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none", label_smoothing=0.1)


def _other_train(model, train, query):
    x, y = train
    return model, (x + 0.01, y), query  # same size, other content


def _frozen(model, train, query):
    model = _copy(model)
    model[0].bias.requires_grad_(False)
    return model, train, query


def _frozen_changed(model, train, query):
    model, train, query = _frozen(model, train, query)
    with torch.no_grad():
        model[0].bias.add_(0.05)
    return model, train, query


def _copy(model: nn.Module) -> nn.Module:
    other = make_problem()[0]
    other.load_state_dict(model.state_dict())
    return other


def _architecture(model, train, query):
    other = nn.Sequential(nn.Linear(DIN, H), nn.ReLU(), nn.Linear(H, K)).double().eval()
    other.load_state_dict(model.state_dict())  # the same weights, another function
    return other, train, query


CASES = {
    "other training data": (_other_train, {}, "training data"),
    "other query data": (lambda m, t, q: (m, t, (q[0] + 0.01, q[1])), {}, "query data"),
    "other labels": (lambda m, t, q: (m, (t[0], (t[1] + 1) % K), q), {}, "training data"),
    "architecture": (_architecture, {}, "model architecture"),
    "observable margin": (None, {"observable": "margin"}, "query observable"),
    "observable closure": (None, {"observable": _obs_logit(1)}, "query observable"),
    "task": (None, {"task": _smoothed}, "task"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_dir_refuses_another_run(tmp_path, case: str) -> None:
    change, extra, phrase = CASES[case]
    model, train, query = make_problem()
    base = {"observable": _obs_logit(0)} if case == "observable closure" else {}
    first = bif.attribute(model, train, query, run_dir=tmp_path, **base, **FIXED)
    args = change(model, train, query) if change else (model, train, query)
    with pytest.raises(ArtifactError, match=phrase):
        bif.attribute(*args, run_dir=tmp_path, **{**base, **extra}, **FIXED)
    # Without the run_dir the changed run is indeed another run (the refusal was needed).
    other = bif.attribute(*args, **{**base, **extra}, **FIXED)
    assert not torch.equal(other.scores, first.scores)


def test_run_dir_refuses_other_frozen_tensors_and_buffers(tmp_path) -> None:
    model, train, query = _frozen(*make_problem())
    bif.attribute(model, train, query, run_dir=tmp_path / "a", **FIXED)
    with pytest.raises(ArtifactError, match="frozen parameters or buffers"):
        bif.attribute(*_frozen_changed(*make_problem()), run_dir=tmp_path / "a", **FIXED)
    # A BatchNorm running statistic is a buffer: the forward pass in eval mode reads it.
    bn = nn.Sequential(nn.Linear(DIN, H), nn.BatchNorm1d(H), nn.Tanh(), nn.Linear(H, K))
    bn = bn.double().eval()
    bif.attribute(bn, train, query, run_dir=tmp_path / "b", **FIXED)
    with torch.no_grad():
        bn[1].running_mean.add_(0.1)
    with pytest.raises(ArtifactError, match="frozen parameters or buffers"):
        bif.attribute(bn, train, query, run_dir=tmp_path / "b", **FIXED)


def test_run_dir_refuses_opaque_observable_by_its_values(tmp_path) -> None:
    model, train, query = make_problem()
    bif.attribute(model, train, query, observable=OpaqueObservable(0), run_dir=tmp_path, **FIXED)
    with pytest.raises(ArtifactError, match="observables at the checkpoint"):
        bif.attribute(
            model, train, query, observable=OpaqueObservable(1), run_dir=tmp_path, **FIXED
        )


def test_run_dir_refuses_other_bif_version(tmp_path, monkeypatch) -> None:
    model, train, query = make_problem()
    bif.attribute(model, train, query, run_dir=tmp_path, **FIXED)
    monkeypatch.setattr("bif.identity.__version__", "99.0")
    with pytest.raises(ArtifactError, match=r"written by bif .*, this is 99\.0"):
        bif.attribute(model, train, query, run_dir=tmp_path, **FIXED)


def test_same_run_resumes_with_equal_copies(tmp_path) -> None:
    """Equal content in new objects (reloaded data, a rebuilt model) is the same run."""
    model, train, query = make_problem()
    first = bif.attribute(model, train, query, run_dir=tmp_path, **AUTO)
    model2, train2, query2 = make_problem()
    as_dataset = torch.utils.data.TensorDataset(*train2)  # same examples, collated
    again = bif.attribute(model2, as_dataset, query2, run_dir=tmp_path, **AUTO)
    assert again.meta["resumed"] is True
    assert_same_run(first, again)


def test_run_dir_of_an_older_bif_refuses(tmp_path) -> None:
    model, train, query = make_problem()
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(ArtifactError, match="older version of bif"):
        bif.attribute(model, train, query, run_dir=tmp_path, **FIXED)


def test_data_hash_is_content_not_chunking() -> None:
    from bif.data import DataSource
    from bif.identity import DataHasher

    _, (x, y), _ = make_problem()

    def digest(data: Any, chunk: int) -> str:
        h = DataHasher()
        src = DataSource(data, "train")
        for start, batch in src.chunks(chunk):
            h.update(batch, min(chunk, len(src) - start))
        return h.hexdigest()

    base = digest((x, y), 5)
    assert digest((x, y), 7) == base == digest(torch.utils.data.TensorDataset(x, y), 24)
    x2 = x.clone()
    x2[17, 3] += 1e-12  # one value of one example
    assert digest((x2, y), 5) != base
    assert digest((x.float(), y), 5) != base  # the dtype too


def test_describe_sees_code_constants_and_closures() -> None:
    from bif.identity import describe

    assert describe(_obs_logit(0)) == describe(_obs_logit(0))
    assert describe(_obs_logit(0)) != describe(_obs_logit(1))
    assert describe(lambda o, y: o[:, 0]) != describe(lambda o, y: o[:, 0] * 2)
    ce = nn.CrossEntropyLoss(reduction="none")
    assert describe(ce) != describe(nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1))


# -- kills and crashes ---------------------------------------------------------------------


def _progress(run_dir: Path) -> str:
    """Where the committed checkpoint stands: 'none', 'manifest', 'curvature', 'step S'."""
    if (run_dir / STATE_FILE).exists():
        _, meta = checkpoint.load_tensors(run_dir / STATE_FILE, "")
        active = meta.get("active")
        done = meta.get("done_groups")
        return f"step {active['step']}" if active else f"groups {done} done"
    for name, what in ((CURVATURE_FILE, "curvature"), (RUN_FILE, "manifest")):
        if (run_dir / name).exists():
            return what
    return "none"


def test_sigkill_at_random_moments_resumes_identically(tmp_path, monkeypatch) -> None:
    trials = int(os.environ.get("BIF_KILL_TRIALS", "20"))
    model, train, query = make_problem()
    ref = bif.attribute(model, train, query, **KILL)
    assert ref.meta["preconditioner"]["rank"] == 4  # the curvature pass is part of the run
    ctx = multiprocessing.get_context("forkserver")
    # The server imports and warms up torch and bif once; each child is a fork of it. It finds
    # the worker through PYTHONPATH (Python 3.11's forkserver does not inherit sys.path).
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    ctx.set_forkserver_preload(["kill_worker"])
    from kill_worker import child

    warm = ctx.Process(target=child, args=(str(tmp_path / "warm"),))  # starts the server
    warm.start()
    warm.join()
    t0 = time.perf_counter()
    full = ctx.Process(target=child, args=(str(tmp_path / "full"),))
    full.start()
    full.join()
    duration = time.perf_counter() - t0
    assert full.exitcode == 0
    assert_same_run(ref, bif.attribute(model, train, query, run_dir=tmp_path / "full", **KILL))
    rng = random.Random(0)
    landed = []
    for i in range(trials):
        run_dir = tmp_path / f"kill{i}"
        p = ctx.Process(target=child, args=(str(run_dir),))
        p.start()
        time.sleep(rng.uniform(0.0, duration))
        p.kill()
        p.join()
        landed.append(_progress(run_dir) if p.exitcode != 0 else "finished")
        resumed = bif.attribute(model, train, query, run_dir=run_dir, **KILL)
        assert_same_run(ref, resumed)
    print("kill points:", landed)  # shown with -s: where each kill found the run directory
    # Most kills must land inside the run (not all before it started or after it ended).
    inside = [x for x in landed if x.startswith(("step", "curvature", "manifest"))]
    assert len(inside) >= trials // 2, landed


class _Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


class _CrashingOS:
    """``os`` for :mod:`bif.checkpoint` that dies at its ``at``-th ``os.replace``, before the
    rename (a whole new file beside the old one) or, with ``after``, right after it."""

    def __init__(self, at: int, after: bool) -> None:
        self.at, self.after, self.calls = at, after, 0

    def __getattr__(self, name: str) -> Any:
        return self.replace if name == "replace" else getattr(os, name)

    def replace(self, *args: Any) -> None:
        self.calls += 1
        if self.calls == self.at and not self.after:
            raise _Crash
        os.replace(*args)
        if self.calls == self.at:
            raise _Crash


def test_crash_at_every_commit_resumes_identically(tmp_path, monkeypatch) -> None:
    model, train, query = make_problem()
    kw = dict(KILL, num_draws=6, num_burnin=3)
    ref = bif.attribute(model, train, query, **kw)
    counter = _CrashingOS(at=-1, after=False)
    monkeypatch.setattr(checkpoint, "os", counter)
    bif.attribute(model, train, query, run_dir=tmp_path / "count", checkpoint_every=1, **kw)
    commits = counter.calls
    assert commits == 1 + 1 + 6 + 1  # manifest, curvature, a state per draw and at the end
    for at in range(1, commits + 1):
        for after in (False, True):
            run_dir = tmp_path / f"crash{at}{after}"
            monkeypatch.setattr(checkpoint, "os", _CrashingOS(at, after))
            with pytest.raises(_Crash):
                bif.attribute(model, train, query, run_dir=run_dir, checkpoint_every=1, **kw)
            monkeypatch.setattr(checkpoint, "os", os)
            assert_same_run(ref, bif.attribute(model, train, query, run_dir=run_dir, **kw))


# -- damaged files -------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(len(data))))
    else:
        path.write_bytes(b"")


DAMAGE = ("truncated", "garbage", "empty")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    model, train, query = make_problem()
    bif.attribute(model, train, query, run_dir=run_dir, **AUTO)
    return run_dir


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", [RUN_FILE, STATE_FILE, CURVATURE_FILE])
def test_damaged_run_file_refuses(finished_run, tmp_path, name: str, how: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in finished_run.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    _damage(run_dir / name, how)
    model, train, query = make_problem()
    with pytest.raises(ArtifactError, match=rf"{name} is damaged.*Delete") as e:
        bif.attribute(model, train, query, run_dir=run_dir, **AUTO)
    assert str(run_dir) in str(e.value)


def test_leftover_temporary_files_are_ignored(finished_run, tmp_path) -> None:
    """A kill mid-write leaves ``*.tmp`` files: they are never read, and overwritten."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in finished_run.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    for name in (RUN_FILE, STATE_FILE, CURVATURE_FILE):
        (run_dir / (name + ".tmp")).write_bytes(b"half a file")
    model, train, query = make_problem()
    assert bif.attribute(model, train, query, run_dir=run_dir, **AUTO).meta["resumed"]


@pytest.fixture(scope="module")
def saved_result(tmp_path_factory) -> Path:
    model, train, query = make_problem()
    r = bif.attribute(model, train, query, **FIXED)
    n_tok, q_tok = 4, 2  # per-token traces of a made-up LM run: only their file matters here
    gen = torch.Generator().manual_seed(0)
    r.tokens = bif.TokenTraces(
        torch.randn(2, 6, n_tok, generator=gen), torch.randn(2, 6, q_tok, generator=gen),
        torch.tensor([[0, 1], [0, 2], [1, 1], [2, 1]]), torch.tensor([[0, 1], [1, 1]]),
    )  # fmt: skip
    return r.save(tmp_path_factory.mktemp("result"))


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", [META_FILE, TENSORS_FILE, TOKENS_FILE])
def test_damaged_result_refuses(saved_result, tmp_path, capsys, name: str, how: str) -> None:
    for f in saved_result.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    bif.BIFResult.load(tmp_path)  # the copy is whole
    _damage(tmp_path / name, how)
    with pytest.raises(ArtifactError, match=rf"{name} is damaged.*recomputed"):
        bif.BIFResult.load(tmp_path)
    from bif.cli import main

    assert main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and name in err and "Traceback" not in err


def test_interrupted_result_save_is_not_a_result(saved_result, tmp_path) -> None:
    for f in saved_result.iterdir():
        if f.name != META_FILE:  # the save died before its last write
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ArtifactError, match="save did not finish"):
        bif.BIFResult.load(tmp_path)
