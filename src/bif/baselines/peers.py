"""What the adapters over the field's libraries (dattri, kronfluence) share.

The libraries are optional (``make compare-install``); they are imported lazily by
:func:`require`, which turns a missing install into a :class:`~bif.errors.ConfigError` that
says how to install it. Everything here is plain torch so that importing bif never needs them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bif.baselines.base import AttributionContext
from bif.errors import ConfigError, DataError, ShapeError
from bif.task import OutputLossTask, Task, make_task

# kronfluence declares torchvision, which would drag in a CUDA build of torch: hence --no-deps.
INSTALL_HINT = (
    "install the comparison extra with `make compare-install`, i.e. "
    "`pip install 'bif[compare]' && pip install --no-deps kronfluence==1.0.1`"
)

Params = dict[str, Tensor]
LossFn = Callable[[Params, tuple[Tensor, Tensor]], Tensor]


def require(module: str, method: str) -> ModuleType:
    """Import an optional peer library, or raise a ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{method} needs the `{module}` package ({err}); {INSTALL_HINT}") from err


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def non_negative(value: Any, name: str) -> float:
    """``value`` as a finite float >= 0, or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not (value >= 0.0 and value < float("inf")):
        raise ConfigError(f"{name} must be finite and >= 0, got {value!r}.")
    return value


def check_context(ctx: AttributionContext) -> tuple[int, int]:
    """Validate the data of ``ctx``; returns ``(Q, N)``."""
    n, q = len(ctx.x_train), len(ctx.x_query)
    if n == 0 or q == 0:
        raise DataError(f"need at least one training example and one query, got N={n}, Q={q}.")
    if len(ctx.y_train) != n or len(ctx.y_query) != q:
        raise DataError(
            f"inputs and targets differ in length: x_train {n} vs y_train {len(ctx.y_train)}, "
            f"x_query {q} vs y_query {len(ctx.y_query)}."
        )
    return q, n


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def resolve_task(ctx: AttributionContext) -> Task:
    """The bif Task of ``ctx.task`` (its per-sample loss is the one the model was trained on)."""
    return make_task(ctx.task)


def is_classification(task: Task) -> bool:
    return isinstance(task, OutputLossTask) and task.name == "classification"


def functional_sample_loss(model: nn.Module, task: Task) -> LossFn:
    """``(params, (x [...], y [])) -> loss`` of ONE unbatched example (dattri vmaps over dim 0)."""
    mean_loss = functional_mean_loss(model, task)

    def loss(params: Params, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return mean_loss(params, (x.unsqueeze(0), y.unsqueeze(0)))

    return loss


def functional_mean_loss(model: nn.Module, task: Task) -> LossFn:
    """``(params, (x [B, ...], y [B])) -> mean per-sample loss`` at the given parameters.

    Labels are cast back to integers for classification because dattri's LiSSA collates every
    data tensor to float before calling the loss.
    """
    cast = is_classification(task)

    def loss(params: Params, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        if cast:
            y = y.long()
        return task.loss(lambda inp: functional_call(model, params, (inp,)), (x, y)).mean()

    return loss


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    """An unshuffled loader over ``(x, y)`` (the libraries index scores by loader order)."""
    return DataLoader(TensorDataset(x, y), batch_size=min(batch_size, len(x)), shuffle=False)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run library code that draws from torch's global RNG reproducibly, without disturbing it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def bif_scores(raw: Tensor, q: int, n: int, method: str, negate: bool) -> Tensor:
    """Check a library's ``[Q, N]`` scores and convert them to bif's sign convention.

    Args:
        raw: scores ``[Q, N]`` in the library's convention.
        negate: True where the library's positive score means "training on n LOWERS the
            query loss" (helpful); bif's negative score means that.

    Returns:
        float64 CPU scores ``[Q, N]``.
    """
    if tuple(raw.shape) != (q, n):
        raise ShapeError(
            f"{method} returned scores of shape {tuple(raw.shape)}, expected {(q, n)}."
        )
    out = raw.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise ConfigError(
            f"{method} returned {bad} non-finite scores: its solver diverged or broke down; "
            "increase damping (LiSSA: or scaling; CG: or lower max_iter once converged)."
        )
    return -out if negate else out


# --- dattri (TRAK, TracIn; classification and causal-lm adapters) ---------------------------


def projector_kwargs(dim: int, seed: int, device: torch.device, kind: str) -> dict[str, Any]:
    """dattri's ``projector_kwargs`` for a random projection to ``dim`` (every key is given, so
    nothing comes from dattri's shared, mutable defaults)."""
    return {
        "proj_dim": dim,
        "proj_max_batch_size": 32,
        "proj_seed": seed,
        "proj_type": kind,
        "device": device.type,
    }


def with_projector(cls: type, **kwargs: Any) -> Any:
    """Construct a dattri attributor that takes ``projector_kwargs`` without leaking them.

    dattri's TRAK and TracIn update their module-level ``DEFAULT_PROJECTOR_KWARGS`` in place;
    this restores the defaults and gives the attributor its own copy.
    """
    defaults = importlib.import_module(cls.__module__).DEFAULT_PROJECTOR_KWARGS
    saved = dict(defaults)
    try:
        attributor = cls(**kwargs)
        attributor.projector_kwargs = dict(attributor.projector_kwargs)
    finally:
        defaults.clear()
        defaults.update(saved)
    return attributor


@contextmanager
def quiet_dattri() -> Iterator[None]:
    """Silence dattri's progress bars (it has no switch; bif logs instead of printing)."""
    names = ("dattri.algorithm.base", "dattri.algorithm.trak", "dattri.algorithm.tracin")
    modules = [importlib.import_module(name) for name in names]
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]
    for module, bar in saved:
        module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for module, bar in saved:
            module.tqdm = bar
