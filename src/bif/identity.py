"""What makes two calls the same run: hashes of everything a run's numbers depend on.

A run directory is resumed only by the run that made it (:func:`bif.checkpoint.open_run`), so
its identity covers every input of the computation, each as a separate component so that a
refusal can say which one changed:

- ``weights``: the sampled parameters (names, shapes, dtypes, values);
- ``fixed``: the frozen parameters and buffers the forward pass uses (BatchNorm statistics...);
- ``architecture``: the module's ``repr`` (the same weights in another architecture);
- ``train`` / ``query``: the content of every example, hashed chunk by chunk as it is collated;
- ``task`` / ``observable``: the functions and their settings (bytecode, constants, closure
  values and simple attributes), which catches edited lambdas and changed options;
- ``at_checkpoint``: the training losses and query observables at w*, which catches what code
  hashing cannot see (a global a loss function reads, an opaque callable object); compared
  with a tolerance because float rounding may change with the thread count;
- ``bif_version``: the library version that wrote the run.
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten_with_path

from bif._version import __version__

# Values at the checkpoint kept in the manifest (all of them up to this many, else a fixed,
# evenly spaced sample plus the total), and the relative tolerance they are compared with.
CHECKPOINT_VALUES = 256
CHECKPOINT_RTOL = 1e-4


def _new() -> Any:
    return hashlib.blake2b(digest_size=16)


def _update_tensor(h: Any, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.to("cpu").contiguous().flatten().view(torch.uint8).numpy().tobytes())


def hash_tensors(named: Mapping[str, Tensor]) -> str:
    """Hash of named tensors: names, shapes, dtypes and exact values."""
    h = _new()
    for k in sorted(named):
        h.update(k.encode())
        _update_tensor(h, named[k])
    return h.hexdigest()


class DataHasher:
    """Hash of a data set's content, fed one collated chunk at a time.

    Each leaf of the batch structure (``inputs``, ``targets``, ``input_ids``...) has its own
    running hash over its rows in order, so the digest does not depend on how the examples
    were chunked.
    """

    def __init__(self) -> None:
        self._leaves: dict[str, Any] = {}
        self._layout: dict[str, str] = {}
        self._count = 0

    def update(self, batch: Any, num_examples: int) -> None:
        self._count += num_examples
        for path, leaf in tree_flatten_with_path(batch)[0]:
            key = "".join(str(p) for p in path)
            h = self._leaves.setdefault(key, _new())
            if isinstance(leaf, Tensor):
                leaf = leaf.detach()
                # The row layout and dtype, whenever they change (not the row count, which
                # varies with the chunk): rows of another shape are other data.
                layout = f"{tuple(leaf.shape[1:])}:{leaf.dtype}"
                if self._layout.get(key) != layout:
                    h.update(layout.encode())
                    self._layout[key] = layout
                h.update(leaf.to("cpu").contiguous().flatten().view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(leaf).encode())

    def hexdigest(self) -> str:
        h = _new()
        h.update(str(self._count).encode())
        for key in sorted(self._leaves):
            h.update(key.encode())
            h.update(self._leaves[key].digest())
        return h.hexdigest()


def describe(obj: Any, depth: int = 0) -> str:
    """A stable text of what a function or settings object computes (not where it lives).

    Functions: qualified name, bytecode, constants, global names, defaults and closure values
    (nested code objects included). Objects: their class and simple attributes. Bound methods:
    the function and the object. Anything else: its type.
    """
    if depth > 4:
        return type(obj).__qualname__
    d = depth + 1
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return repr(obj)
    if isinstance(obj, Tensor):
        return "tensor:" + hash_tensors({"": obj})
    if isinstance(obj, tuple | list):
        return "[" + ",".join(describe(x, d) for x in obj) + "]"
    if isinstance(obj, Mapping):
        return "{" + ",".join(f"{k!r}:{describe(obj[k], d)}" for k in sorted(obj, key=repr)) + "}"
    if isinstance(obj, functools.partial):
        return (
            f"partial({describe(obj.func, d)},{describe(obj.args, d)},{describe(obj.keywords, d)})"
        )
    if isinstance(obj, types.MethodType):
        return f"method({describe(obj.__func__, d)},{describe(obj.__self__, d)})"
    if isinstance(obj, types.FunctionType):
        cells = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
        return (
            f"fn:{obj.__module__}.{obj.__qualname__}:{_code(obj.__code__)}"
            f":{describe(obj.__defaults__, d)}:{describe(obj.__kwdefaults__, d)}"
            f":{describe(cells, d)}"
        )
    if isinstance(obj, types.BuiltinFunctionType | types.ModuleType):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj.__name__)}"
    cls = type(obj)
    name = f"{cls.__module__}.{cls.__qualname__}"
    attrs = _simple_attributes(obj)
    if isinstance(obj, nn.Module):  # a loss module: its options, not its (hashed) tensors
        attrs = {k: v for k, v in attrs.items() if not k.startswith("_")}
    return f"{name}({describe(attrs, d)})"


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a closure variable not assigned yet)
        return False
    return True


def _code(code: types.CodeType) -> str:
    h = _new()
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        h.update(_code(c).encode() if isinstance(c, types.CodeType) else repr(c).encode())
    return h.hexdigest()


def _simple_attributes(obj: Any) -> dict[str, Any]:
    """Instance attributes that are settings (numbers, strings, tensors, callables...)."""
    try:
        attrs = vars(obj)
    except TypeError:
        return {}
    keep = (bool, int, float, str, bytes, type(None), tuple, list, Tensor, types.FunctionType,
            types.MethodType, functools.partial)  # fmt: skip
    return {k: v for k, v in attrs.items() if isinstance(v, keep)}


def task_identity(task: Any) -> tuple[str, str]:
    """Hashes of a task's training loss and of its query observable."""
    from bif.task import OutputLossTask

    if isinstance(task, OutputLossTask):
        loss: Any = (type(task), task.loss_fn)
        observable: Any = task.observable_fn
    else:
        loss = (describe(task), getattr(task, "loss", None), getattr(task, "token_losses", None))
        observable = getattr(task, "observable", None)
    return _hash_text(describe(loss)), _hash_text(describe(observable))


def _hash_text(text: str) -> str:
    h = _new()
    h.update(text.encode())
    return h.hexdigest()


def checkpoint_values(train: Tensor, query: Tensor) -> dict[str, list[float]]:
    """A fixed sample of the values at w* (all up to CHECKPOINT_VALUES) and their sums."""

    def sample(v: Tensor) -> list[float]:
        v = v.to(torch.float64).flatten()
        if v.numel() > CHECKPOINT_VALUES:
            idx = torch.linspace(0, v.numel() - 1, CHECKPOINT_VALUES).round().long()
            return [*v[idx].tolist(), float(v.sum())]
        return v.tolist()

    return {"train": sample(train), "query": sample(query)}


def values_match(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Whether two :func:`checkpoint_values` agree up to CHECKPOINT_RTOL (float rounding)."""
    for side in ("train", "query"):
        x, y = a.get(side), b.get(side)
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
            return False
        scale = max((abs(v) for v in x + y if math.isfinite(v)), default=1.0)
        for u, v in zip(x, y, strict=True):
            if not math.isclose(u, v, rel_tol=CHECKPOINT_RTOL, abs_tol=1e-6 * scale):
                return False
    return True


def run_identity(
    model: nn.Module,
    w_star: Mapping[str, Tensor],
    fixed: Mapping[str, Tensor],
    task: Any,
    train_hash: str,
    query_hash: str,
) -> dict[str, str]:
    """Component -> hash of everything a run depends on (the module docstring lists them)."""
    loss, observable = task_identity(task)
    return {
        "weights": hash_tensors(w_star),
        "fixed": hash_tensors(fixed),
        "architecture": _hash_text(repr(model)),
        "train": train_hash,
        "query": query_hash,
        "task": loss,
        "observable": observable,
        "bif_version": __version__,
    }


def digest(identity: Mapping[str, str]) -> str:
    """One short hash of a whole identity (stored in checkpoints and ``result.meta``)."""
    return _hash_text(repr(sorted(identity.items())))[:16]
