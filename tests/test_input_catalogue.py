"""Every bad input bif knows, with the typed error it raises and the words that name the fix.

``CATALOGUE`` reads as documentation: one :class:`Case` per input a user might pass, the error
type they can catch, and a fragment of the message that says what to change. ``WORKS`` lists
the forms that are simply accepted (numpy arrays, lists of pairs, dtype names, a config dict).
Every case runs on one tiny model (a few dozen parameters) and fails before or within a handful
of sampler steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bif
from bif.errors import (
    ArtifactError,
    BIFError,
    ConfigError,
    DataError,
    DivergenceError,
    ModelError,
    SelectionError,
    ShapeError,
)
from bif.result import META_FILE, TENSORS_FILE

N, Q, DIN, K = 12, 3, 4, 3
# Unit mass (precondition_rank=0): no Lanczos, so each sampling case costs a few milliseconds.
KW: dict[str, Any] = dict(
    num_chains=2, num_draws=3, num_burnin=2, thin=1, step_size=1e-3, nbeta=12.0, gamma=100.0,
    precondition_rank=0,
)  # fmt: skip


@dataclass
class Fx:
    """The one tiny problem every case starts from (fresh per case: cases may edit it)."""

    model: nn.Module
    x: Tensor
    y: Tensor
    xq: Tensor
    yq: Tensor
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def run(self, **overrides: Any) -> bif.BIFResult:
        """``bif.attribute`` on the problem, with any argument (model, train, ...) overridden."""
        model = overrides.pop("model", self.model)
        train = overrides.pop("train", (self.x, self.y))
        query = overrides.pop("query", (self.xq, self.yq))
        kw = {**KW, "progress": False, **overrides}
        if "config" in kw:  # the config then carries the hyperparameters
            kw = {k: v for k, v in kw.items() if k not in KW}
        return bif.attribute(model, train, query, **kw)

    def result(self) -> bif.BIFResult:
        """A result built directly (no sampling), for the cases about results."""
        z = torch.zeros
        return bif.BIFResult(
            scores=torch.randn(Q, N), stderr=torch.ones(Q, N), correlation=z(Q, N),
            self_influence=z(N), self_influence_stderr=z(N), draw_loss=z(2, 3),
            step_loss=z(2, 4), query_trace=z(2, 3, Q), train_loss_star=z(N), query_star=z(Q),
            config=bif.BIFConfig(),
        )  # fmt: skip

    def saved(self) -> Path:
        return self.result().save(self.tmp / "res")

    def file(self, name: str = "a_file") -> Path:
        path = self.tmp / name
        path.write_text("not a directory")
        return path


@pytest.fixture
def fx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fx:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIN, 5), nn.Tanh(), nn.Linear(5, K)).eval()
    x, y = torch.randn(N, DIN, generator=g), torch.randint(0, K, (N,), generator=g)
    xq, yq = torch.randn(Q, DIN, generator=g), torch.randint(0, K, (Q,), generator=g)
    return Fx(model, x, y, xq, yq, tmp_path, monkeypatch)


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(fx)`` must raise ``error`` with ``match`` (a regex) in its message."""

    name: str
    call: Callable[[Fx], object]
    error: type[BIFError]
    match: str


# --- helpers that build a bad input -----------------------------------------------------------


def _with(t: Tensor, index: tuple[int, ...], value: float) -> Tensor:
    t = t.clone()
    t[index] = value
    return t


def _nan_weight(fx: Fx) -> nn.Module:
    with torch.no_grad():
        fx.model[2].weight[1, 3] = math.nan
    return fx.model


def _no_cuda(fx: Fx) -> None:
    fx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_cuda(fx: Fx) -> None:
    fx.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fx.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _no_mps(fx: Fx) -> None:
    fx.monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


class _NoLen:
    """Indexable but without ``__len__`` (an iterable-style source)."""

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(DIN), torch.tensor(0)


class _Custom:
    """A custom Task object (it defines its own loss, so observable= cannot apply)."""

    def loss(self, model: Callable, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")


def _unknown_field_in_saved(fx: Fx) -> bif.BIFResult:
    path = fx.saved()
    meta = json.loads((path / META_FILE).read_text())
    meta["config"]["temperature"] = 1.0
    (path / META_FILE).write_text(json.dumps(meta))
    return bif.BIFResult.load(path)


def _interrupted_save(fx: Fx) -> bif.BIFResult:
    path = fx.saved()
    (path / META_FILE).unlink()
    return bif.BIFResult.load(path)


def _damaged_save(fx: Fx) -> bif.BIFResult:
    path = fx.saved()
    data = (path / TENSORS_FILE).read_bytes()
    (path / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    return bif.BIFResult.load(path)


def _older_run_dir(fx: Fx) -> bif.BIFResult:
    (fx.tmp / "state.json").write_text("{}")
    return fx.run(run_dir=fx.tmp)


def _two_columns(out: Tensor, y: Tensor) -> Tensor:
    return torch.stack([F.cross_entropy(out, y, reduction="none")] * 2, dim=1)


C = Case
# fmt: off
CATALOGUE: list[Case] = [
    # --- hyperparameters (BIFConfig, a keyword of bif.attribute, or a --flag) -----------------
    C("step_size nan", lambda f: bif.BIFConfig(step_size=math.nan), ConfigError,
      r"step_size must be finite and > 0.*use 'auto'"),
    C("step_size 0", lambda f: f.run(step_size=0.0), ConfigError, r"step_size must be finite"),
    C("nbeta 0", lambda f: f.run(nbeta=0.0), ConfigError,
      "nbeta must be finite and > 0.*order of the training-set size"),
    C("gamma -1", lambda f: f.run(gamma=-1.0), ConfigError, "gamma.*closer to the checkpoint"),
    C("gamma inf", lambda f: bif.BIFConfig(gamma=math.inf), ConfigError, "gamma must be finite"),
    C("nbeta a word", lambda f: bif.BIFConfig(nbeta="big"), ConfigError,
      "nbeta must be a number or 'auto'"),
    C("num_chains 0", lambda f: f.run(num_chains=0), ConfigError, "num_chains must be >= 1"),
    C("num_draws 1", lambda f: f.run(num_draws=1), ConfigError, "num_draws must be >= 2"),
    C("num_draws 2.5", lambda f: f.run(num_draws=2.5), ConfigError,
      "num_draws must be an integer"),
    C("thin 0", lambda f: f.run(thin=0), ConfigError, "thin must be >= 1"),
    C("num_burnin -1", lambda f: f.run(num_burnin=-1), ConfigError, "num_burnin must be >= 0"),
    C("chunk_size 0", lambda f: f.run(chunk_size=0), ConfigError, "chunk_size must be >= 1"),
    C("batch_size 0", lambda f: f.run(batch_size=0), ConfigError,
      "batch_size must be a positive integer or None"),
    C("sampler adam", lambda f: f.run(sampler="adam"), ConfigError,
      "sampler must be 'sgld', 'rmsprop' or 'kinetic'"),
    C("friction -1", lambda f: f.run(friction=-1.0), ConfigError,
      "friction must be a positive number or 'auto'"),
    C("centering none", lambda f: f.run(centering="none"), ConfigError,
      "centering must be 'chain' or 'pooled'"),
    C("rmsprop_alpha 1", lambda f: f.run(rmsprop_alpha=1.0), ConfigError,
      r"rmsprop_alpha must lie in \(0, 1\)"),
    C("condition 0", lambda f: bif.BIFConfig(condition=0.0), ConfigError,
      "condition must be finite and > 0.*500 means damping"),
    C("radius -0.1", lambda f: bif.BIFConfig(radius=-0.1), ConfigError,
      "radius must be finite and > 0"),
    C("precondition_rank -1", lambda f: bif.BIFConfig(precondition_rank=-1), ConfigError,
      r"precondition_rank must be an integer >= 0 \(0 = no preconditioning\)"),
    C("negative_curvature flip", lambda f: bif.BIFConfig(negative_curvature="flip"),
      ConfigError, "negative_curvature must be 'lower' or 'localise'"),
    C("adaptive without vmap", lambda f: bif.BIFConfig(num_draws="auto", vmap_chains=False),
      ConfigError, "needs vmap_chains=True"),
    C("forward_dtype int8", lambda f: bif.BIFConfig(forward_dtype="int8"), ConfigError,
      "forward_dtype must be None, 'float32', 'bfloat16' or 'float16'"),
    C("stderr_blocks odd", lambda f: bif.BIFConfig(stderr_blocks=3), ConfigError,
      r"stderr_blocks must be an even number \(0 = off\)"),
    C("target_rhat 1", lambda f: bif.BIFConfig(target_rhat=1.0), ConfigError,
      "target_rhat must be a number > 1"),
    C("max_seconds 0", lambda f: bif.BIFConfig(max_seconds=0), ConfigError,
      "max_seconds must be a positive number or None"),
    C("vmap_chains a word", lambda f: bif.BIFConfig(vmap_chains="yes"), ConfigError,
      "vmap_chains must be True or False"),
    C("seed -1", lambda f: f.run(seed=-1), ConfigError, r"seed must be an integer in \[0.*seed=0"),
    C("seed 2**64", lambda f: bif.BIFConfig(seed=2**64), ConfigError, r"seed must be .*\[0, 2"),
    C("seed 1.5", lambda f: f.run(seed=1.5), ConfigError, "seed must be an integer"),
    C("seed a string", lambda f: bif.BIFConfig(seed="0"), ConfigError, "seed must be an integer"),
    C("unknown hyperparameter", lambda f: f.run(stepsize=1e-3), ConfigError,
      r"unknown hyperparameter\(s\) \['stepsize'\]; known: .*'step_size'"),
    C("config dict, unknown key", lambda f: f.run(config={"num_chain": 2}), ConfigError,
      r"unknown config field\(s\) \['num_chain'\]; known: .*'num_chains'"),
    C("config dict, bad value", lambda f: f.run(config={"num_chains": 0}), ConfigError,
      "num_chains must be >= 1"),
    C("config dict, int key", lambda f: f.run(config={1: 2}), ConfigError,
      r"config keys must be field names.*config=\{'num_chains': 4\}"),
    C("config a list", lambda f: f.run(config=[("num_chains", 2)]), ConfigError,
      r"config must be a bif.BIFConfig or a dict.*config=bif.BIFConfig\(num_chains=4\)"),
    C("checkpoint_every 0", lambda f: f.run(run_dir=f.tmp, checkpoint_every=0), ConfigError,
      "checkpoint_every must be a positive integer"),
    # --- task and observable ------------------------------------------------------------------
    C("task typo", lambda f: f.run(task="classifcation"), ConfigError,
      r"unknown task 'classifcation'; use 'classification', 'regression'"),
    C("observable typo", lambda f: f.run(observable="margn"), ConfigError,
      r"unknown observable 'margn'; use one of \['loss', 'margin'\]"),
    C("task a number", lambda f: f.run(task=42), ConfigError,
      "task must be a string, a Task or a callable"),
    C("observable with a Task", lambda f: f.run(task=_Custom(), observable="margin"),
      ConfigError, "implement Task.observable instead"),
    # --- the model ----------------------------------------------------------------------------
    C("model a function", lambda f: f.run(model=lambda x: x), ConfigError,
      r"model must be a torch\.nn\.Module"),
    C("model all frozen", lambda f: f.run(model=f.model.requires_grad_(False)), ConfigError,
      "no parameter with requires_grad=True.*Enable gradients"),
    C("model NaN weight", lambda f: f.run(model=_nan_weight(f)), ModelError,
      "'2.weight' has 1 NaN/inf.*Load a finite checkpoint"),
    # --- device and dtype ---------------------------------------------------------------------
    C("device cuda without CUDA", lambda f: (_no_cuda(f), f.run(device="cuda")), ConfigError,
      r'device=\'cuda\', but .*pass device="cpu", or install a CUDA build'),
    C("device cuda:7 of one GPU", lambda f: (_one_cuda(f), f.run(device="cuda:7")),
      ConfigError, r"only 1 CUDA device\(s\) are visible: use 'cuda:0'"),
    C("device mps without MPS", lambda f: (_no_mps(f), f.run(device="mps")), ConfigError,
      r'MPS \(Apple GPU\) is not available here: pass device="cpu"'),
    C("device gpu", lambda f: f.run(device="gpu"), ConfigError,
      "'gpu' is not a device torch knows; use 'cpu', 'cuda'"),
    C("device a float", lambda f: f.run(device=1.5), ConfigError,
      "device must be a string such as 'cpu'"),
    C("dtype int64", lambda f: f.run(dtype=torch.int64), ConfigError,
      "dtype must be a floating dtype, one of 'float32', 'float64'"),
    C("dtype 'int32'", lambda f: f.run(dtype="int32"), ConfigError,
      "dtype must be a floating dtype"),
    C("dtype typo", lambda f: f.run(dtype="float65"), ConfigError,
      "'float65' is not a torch dtype; use one of 'float32'"),
    C("dtype a number", lambda f: f.run(dtype=64), ConfigError,
      r"dtype must be a torch.dtype or its name.*dtype=torch.float64"),
    C("dtype numpy int", lambda f: f.run(dtype=np.int32), ConfigError,
      "dtype must be a floating dtype"),
    # --- the data -----------------------------------------------------------------------------
    C("empty train", lambda f: f.run(train=(f.x[:0], f.y[:0])), DataError,
      "train data is empty; attribution needs at least one example"),
    C("empty query", lambda f: f.run(query=(f.xq[:0], f.yq[:0])), DataError,
      "query data is empty"),
    C("empty Dataset", lambda f: f.run(query=torch.utils.data.TensorDataset(torch.zeros(0, 4))),
      DataError, "query data is empty"),
    C("empty tuple", lambda f: f.run(train=()), DataError, r"empty tuple; pass \(inputs"),
    C("lengths differ", lambda f: f.run(train=(f.x, f.y[:-1])), DataError,
      r"must share their first \(example\) dimension; got shapes \[\(12, 4\), \(11,\)\]"),
    C("numpy lengths differ", lambda f: f.run(train=(f.x.numpy(), f.y[:-1].numpy())),
      DataError, r"must share their first \(example\) dimension"),
    C("data a number", lambda f: f.run(train=42), DataError,
      "must be a pair of tensors .*a torch Dataset or a DataLoader"),
    C("Dataset without len", lambda f: f.run(train=_NoLen()), DataError,
      r"no len\(\); bif needs a map-style Dataset"),
    C("pairs of ragged shapes", lambda f: f.run(train=[(torch.zeros(4), 0), (torch.zeros(5), 1)]),
      DataError, r"different shapes \[\(4,\), \(5,\)\].*Pad or resize"),
    C("numpy object array", lambda f: f.run(train=(np.array([None] * N), f.y.numpy())),
      DataError, r"numpy array of dtype object.*X.astype\(np.float32\)"),
    C("NaN train input", lambda f: f.run(train=(_with(f.x, (5, 0), math.nan), f.y)), DataError,
      "not finite at the checkpoint for train example 5.*check that example"),
    C("NaN query input", lambda f: f.run(query=(_with(f.xq, (2, 1), math.nan), f.yq)),
      DataError, "not finite at the checkpoint for query example 2"),
    C("integer features", lambda f: f.run(train=(f.x.long(), f.y)), DataError,
      r"train examples 0-11.*convert integer features \(e.g. x.float\(\)\)"),
    C("int32 label tensor", lambda f: f.run(train=(f.x, f.y.int())), DataError,
      r"train examples 0-11 .*targets \(12,\) int32.*must be int64: pass y.long\(\)"),
    # --- shapes: model, targets, loss ---------------------------------------------------------
    C("wrong input width (train)", lambda f: f.run(train=(torch.randn(N, 5), f.y)), ShapeError,
      r"train examples 0-11 \(inputs \(12, 5\) float32.*expects 4 input features.*Pass train "
      "inputs of the shape"),
    C("wrong input width (query)", lambda f: f.run(query=(torch.randn(Q, 6), f.yq)),
      ShapeError, r"query examples 0-2 .*expects 4 input features, the inputs have 6"),
    C("wrong width, second chunk", lambda f: f.run(
        train=[(torch.zeros(DIN if i < 6 else 5), 0) for i in range(N)], chunk_size=6),
      ShapeError, r"train examples 6-11 \(inputs \(6, 5\)"),
    C("outputs with an extra dim",
      lambda f: f.run(model=nn.Sequential(nn.Linear(DIN, K), nn.Unflatten(1, (K, 1))).eval()),
      ShapeError, r"shape \[B, num_classes\], got \(12, 3, 1\).*Return raw logits"),
    C("label out of range", lambda f: f.run(train=(f.x, _with(f.y, (-1,), K)), chunk_size=2),
      ShapeError, r"labels must lie in \[0, 2\] for a model with 3 outputs"),
    C("negative label", lambda f: f.run(query=(f.xq, _with(f.yq, (0,), -1))), ShapeError,
      r"labels must lie in \[0, 2\]"),
    C("float labels", lambda f: f.run(train=(f.x, f.y.float())), ShapeError,
      "labels must be integers"),
    C("labels [B, 1]", lambda f: f.run(train=(f.x, f.y[:, None])), ShapeError,
      r"integer labels of shape \[B\], got \(12, 1\)"),
    C("not a pair", lambda f: f.run(train=(f.x,)), ShapeError,
      r"pair \(inputs, targets\).*Yield \(inputs, targets\) from your Dataset"),
    C("regression targets [N]", lambda f: f.run(model=nn.Linear(DIN, 1).eval(), task="regression",
      train=(f.x, torch.randn(N)), query=(f.xq, torch.zeros(Q))), ShapeError,
      r"must have the same shape \(reshape targets, e.g. y.unsqueeze\(-1\)"),
    C("loss returning a scalar", lambda f: f.run(task=lambda o, y: F.cross_entropy(o, y)),
      ShapeError, "reduction='none'"),
    C("loss returning [B, 2]", lambda f: f.run(task=_two_columns), ShapeError,
      r"shape \[12\], got \(12, 2\).*Reduce every dimension"),
    C("observable returning a scalar", lambda f: f.run(observable=lambda o, y: o.sum()),
      ShapeError, "query observable must return one value per example"),
    # --- run_dir ------------------------------------------------------------------------------
    C("run_dir an existing file", lambda f: f.run(run_dir=f.file()), ArtifactError,
      "run_dir .*a_file is an existing file, not a directory.*Pass a directory path"),
    C("run_dir under a file", lambda f: f.run(run_dir=f.file() / "run"), ArtifactError,
      "lies under .*a_file, which is a file.*move the file away"),
    C("run_dir a number", lambda f: f.run(run_dir=7), ConfigError,
      r"run_dir must be a directory path \(str or pathlib.Path\) or None"),
    C("run_dir empty string", lambda f: f.run(run_dir=""), ConfigError,
      "run_dir is an empty string; pass a directory path, or None"),
    C("run_dir of an older bif", _older_run_dir, ArtifactError, "older version of bif"),
    # --- results ------------------------------------------------------------------------------
    C("save onto a file", lambda f: f.result().save(f.file()), ArtifactError,
      r"result.save path .*a_file is an existing file.*Pass a directory path"),
    C("load a non-result", lambda f: bif.BIFResult.load(f.tmp), ArtifactError,
      r"is not a saved BIF result \(expected result.safetensors and result.json\)"),
    C("load an interrupted save", _interrupted_save, ArtifactError,
      "save did not finish. The result .* must be recomputed"),
    C("load a damaged save", _damaged_save, ArtifactError, "is damaged.*must be recomputed"),
    C("load an unknown config field", _unknown_field_in_saved, ArtifactError,
      r"unknown config field\(s\) \['temperature'\]"),
    C("top of query -1", lambda f: f.result().top(-1), SelectionError,
      r"query index -1 out of range: this result has 3 queries \(0 to 2\)"),
    C("top of query Q", lambda f: f.result().top(Q), SelectionError, r"\(0 to 2\)"),
    C("top k=0", lambda f: f.result().top(0, k=0), ConfigError,
      r"k must be a positive integer \(how many to list\)"),
    C("top k=2.0", lambda f: f.result().top(0, k=2.0), ConfigError,
      "k must be a positive integer"),
    # --- sampling -----------------------------------------------------------------------------
    C("step too large", lambda f: f.run(step_size=1.0, num_burnin=2),
      DivergenceError, r"Lower step_size \(now 1; try"),
]
# fmt: on


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input_raises_typed_error_naming_the_fix(case: Case, fx: Fx) -> None:
    with pytest.raises(case.error, match=case.match) as info:
        case.call(fx)
    # The type the user catches is also bif's base class, whatever the subclass.
    assert isinstance(info.value, BIFError)


def test_catalogue_names_are_unique_and_cover_every_error_type() -> None:
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE) >= 40
    kinds = {ArtifactError, ConfigError, DataError, DivergenceError, ModelError, SelectionError}
    assert kinds | {ShapeError} <= {c.error for c in CATALOGUE}


def test_model_failure_chains_the_torch_error(fx: Fx) -> None:
    with pytest.raises(ShapeError) as info:
        fx.run(train=(torch.randn(N, 5), fx.y))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "mat1 and mat2" in str(info.value.__cause__)


# --- what simply works ------------------------------------------------------------------------


@dataclass(frozen=True)
class Works:
    """An input that is accepted; ``same`` when it must give the tensors' scores exactly."""

    name: str
    call: Callable[[Fx], bif.BIFResult]
    same: bool = True


def _numpy(fx: Fx) -> tuple[np.ndarray, np.ndarray]:
    # float64 features and int32 labels, as numpy makes them on some platforms.
    return fx.x.double().numpy(), fx.y.numpy().astype(np.int32)


def _resave(fx: Fx) -> bif.BIFResult:
    r = fx.run()
    r.save(fx.tmp / "res")
    return bif.BIFResult.load(r.save(fx.tmp / "res"))  # onto a result directory: replaced


# fmt: off
WORKS: list[Works] = [
    Works("numpy (X, y)", lambda f: f.run(train=_numpy(f))),
    Works("numpy [X, y] and numpy query", lambda f: f.run(
        train=list(_numpy(f)), query=(f.xq.numpy(), f.yq.numpy()))),
    Works("list of tensor pairs", lambda f: f.run(train=[(f.x[i], int(f.y[i])) for i in range(N)])),
    Works("list of numpy pairs", lambda f: f.run(
        train=[(a, b) for a, b in zip(*_numpy(f), strict=True)])),
    Works("list of python-list pairs", lambda f: f.run(
        train=[(f.x[i].double().tolist(), int(f.y[i])) for i in range(N)])),
    Works("tuple of python lists", lambda f: f.run(
        train=(f.x.double().tolist(), f.y.tolist()))),
    Works("dtype 'float64'", lambda f: f.run(dtype="float64"), same=False),
    Works("dtype 'torch.float32'", lambda f: f.run(dtype="torch.float32")),
    Works("dtype numpy float32", lambda f: f.run(dtype=np.float32)),
    Works("dtype 'bfloat16'", lambda f: f.run(dtype="bfloat16", step_size=1e-4), same=False),
    Works("config dict", lambda f: f.run(config={**KW})),
    Works("config dict with a keyword override",
          lambda f: bif.attribute(f.model, (f.x, f.y), (f.xq, f.yq), config={**KW, "seed": 5},
                                  seed=0, progress=False)),
    Works("device 'cpu'", lambda f: f.run(device="cpu")),
    Works("device torch.device", lambda f: f.run(device=torch.device("cpu"))),
    Works("run_dir nested new path", lambda f: f.run(run_dir=f.tmp / "a" / "b")),
    Works("large seed", lambda f: f.run(seed=2**40), same=False),
    Works("save onto a saved result", _resave),
]
# fmt: on


@pytest.fixture
def reference(fx: Fx) -> Tensor:
    return fx.run().scores


@pytest.mark.parametrize("case", WORKS, ids=[c.name for c in WORKS])
def test_natural_input_simply_works(case: Works, fx: Fx, reference: Tensor) -> None:
    res = case.call(fx)
    assert res.scores.shape == (Q, N)
    assert bool(torch.isfinite(res.scores).all())
    if case.same:  # a conversion, not another computation: bit-identical scores
        torch.testing.assert_close(res.scores, reference, rtol=0, atol=0)
