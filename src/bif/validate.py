"""Coercion and validation of the arguments a user passes to :func:`bif.attribute` (and to a
result's queries, such as ``k``).

Each helper either returns the argument in the one form the rest of bif expects (a
``torch.device``, a ``torch.dtype``, a :class:`BIFConfig`) or raises a typed error from
:mod:`bif.errors` whose message says what to pass instead. They run before any sampling, so a
typo costs milliseconds, not a burn-in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bif.config import BIFConfig
from bif.errors import ArtifactError, BIFError, ConfigError, DataError, ShapeError

# The dtypes bif samples in; integer or complex weights have no Langevin dynamics.
FLOATING_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALLOWED = ", ".join(repr(k) for k in FLOATING_DTYPES)
_CUDA_FIX = (
    'pass device="cpu", or install a CUDA build of torch '
    "(https://pytorch.org/get-started/locally/) on a machine with an NVIDIA GPU"
)


def coerce_config(config: Any) -> BIFConfig:
    """``None``, a :class:`BIFConfig` or a dict of its fields, as a :class:`BIFConfig`.

    Raises:
        ConfigError: an unknown field in the dict (the message lists the known ones), an
            invalid value, or a config of another type.
    """
    if config is None:
        return BIFConfig()
    if isinstance(config, BIFConfig):
        return config
    if isinstance(config, Mapping):
        keys = [k for k in config if not isinstance(k, str)]
        if keys:
            raise ConfigError(
                f"config keys must be field names (strings), got {keys!r}; e.g. "
                "config={'num_chains': 4}."
            )
        return BIFConfig.from_dict(dict(config))
    raise ConfigError(
        f"config must be a bif.BIFConfig or a dict of its fields, got {type(config).__name__}; "
        "e.g. config=bif.BIFConfig(num_chains=4), config={'num_chains': 4}, or num_chains=4 "
        "as a keyword argument."
    )


def coerce_device(device: Any) -> torch.device | None:
    """A device string, index or ``torch.device`` as a ``torch.device`` that exists here.

    ``torch.device("cuda")`` is created happily on a machine without CUDA and fails later, deep
    inside the first ``.to()``; this checks availability up front.

    Raises:
        ConfigError: a string torch does not parse, or a CUDA/MPS device this machine lacks.
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, str | int | torch.device):
        raise ConfigError(
            f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device; got "
            f"{type(device).__name__}."
        )
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(
            f"device {device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:0' or "
            "'mps' (or leave device=None to sample where the model is)."
        ) from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "has no CUDA support" if torch.version.cuda is None else "sees no CUDA GPU"
            raise ConfigError(f"device={device!r}, but this torch build {why}: {_CUDA_FIX}.")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise ConfigError(
                f"device={device!r}, but only {count} CUDA device(s) are visible: use "
                f"'cuda:0' to 'cuda:{count - 1}', or device='cpu'."
            )
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device={device!r}, but MPS (Apple GPU) is not available here: pass "
            'device="cpu" (or "cuda" on a machine with an NVIDIA GPU).'
        )
    return d


def coerce_dtype(dtype: Any) -> torch.dtype | None:
    """A floating ``torch.dtype``, its name ("float64", "torch.float32", "bfloat16") or a numpy
    floating dtype, as a ``torch.dtype``.

    Raises:
        ConfigError: an unknown name, or a dtype that is not one of the floating dtypes bif
            samples in (the message lists them).
    """
    if dtype is None:
        return None
    d: Any = dtype
    if isinstance(dtype, str):
        name = dtype.strip().removeprefix("torch.")
        d = getattr(torch, name, None) if name.isidentifier() else None
        if not isinstance(d, torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype; use one of {_ALLOWED}.")
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        try:
            d = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype
        except TypeError as e:
            raise ConfigError(f"dtype {dtype!r} has no torch equivalent; use {_ALLOWED}.") from e
    if not isinstance(d, torch.dtype):
        raise ConfigError(
            f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}; use one of "
            f"{_ALLOWED} (e.g. dtype=torch.float64)."
        )
    if d not in FLOATING_DTYPES.values():
        raise ConfigError(
            f"dtype must be a floating dtype, one of {_ALLOWED}; got {d}. It casts the model's "
            "weights and floating inputs (integer labels and token ids are left alone)."
        )
    return d


def check_dir_target(path: Path, what: str, writes: str) -> None:
    """Refuse a directory path that is, or lies under, an existing file.

    Args:
        path: where a directory will be created or reused.
        what: the argument's name in messages ("run_dir", "result.save path").
        writes: what bif writes there, to say why a file cannot be used.

    Raises:
        ArtifactError: ``path`` or one of its parents is an existing file.
    """
    for p in (path, *path.parents):
        if p.exists():
            if p.is_dir():
                return
            where = "is an existing file" if p == path else f"lies under {p}, which is a file"
            raise ArtifactError(
                f"{what} {path} {where}, not a directory: bif writes {writes} into a "
                "directory there. Pass a directory path (a new one is created), or move the "
                "file away."
            )


def check_run_dir(run_dir: Any) -> None:
    """``run_dir`` must be None or a directory path that is not an existing file.

    Raises:
        ConfigError: not a path, or an empty string.
        ArtifactError: an existing file (checked before any sampling, which would otherwise
            fail at the first checkpoint).
    """
    if run_dir is None:
        return
    if not isinstance(run_dir, str | os.PathLike):
        raise ConfigError(
            f"run_dir must be a directory path (str or pathlib.Path) or None, got "
            f"{type(run_dir).__name__}."
        )
    if isinstance(run_dir, str) and not run_dir.strip():
        raise ConfigError("run_dir is an empty string; pass a directory path, or None.")
    check_dir_target(Path(run_dir), "run_dir", "the run's checkpoints")


def describe_batch(batch: Any) -> str:
    """Shapes and dtypes of a batch's tensors, e.g. ``inputs (64, 5) float32, targets (64,)
    int64``: what a user compares with what the model was built for."""

    def one(t: Any) -> str:
        if isinstance(t, Tensor):
            return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        return type(t).__name__

    if isinstance(batch, Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in batch.items())
    if isinstance(batch, tuple | list):
        if len(batch) == 2:
            return f"inputs {one(batch[0])}, targets {one(batch[1])}"
        return ", ".join(f"[{i}] {one(v)}" for i, v in enumerate(batch))
    return f"inputs {one(batch)}"


_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")


def _first_layer(module: nn.Module | None) -> str:
    """What the model's first linear or convolutional layer expects, if it has one."""
    if module is None:
        return ""
    for name, m in module.named_modules():
        label = f"layer {name!r}" if name else "the model itself"
        if isinstance(getattr(m, "in_features", None), int):
            return (
                f" The model's first linear layer ({label}) expects {m.in_features} input features."
            )
        if isinstance(getattr(m, "in_channels", None), int):
            return (
                f" The model's first convolution ({label}) expects {m.in_channels} input channels."
            )
    return ""


def model_failure(
    error: Exception, name: str, start: int, count: int, batch: Any, module: nn.Module | None
) -> BIFError:
    """A typed error for a model (or task) that fails on real data, naming the data set, the
    examples and the shapes involved.

    Args:
        error: what torch (or the user's code) raised; the caller chains it (``from error``).
        name: "train" or "query".
        start, count: the failing chunk's first example and its number of examples.
        batch: that chunk, for its shapes.
        module: the user's model, to say what its first layer expects.
    """
    examples = f"example {start}" if count == 1 else f"examples {start}-{start + count - 1}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"the model or task failed on {name} {examples} ({describe_batch(batch)}): {text}."
    if "target dtype" in text or "expected scalar type Long" in text:
        return DataError(f"{where} Classification labels must be int64: pass y.long().")
    if "must have the same dtype" in text or "expected scalar type" in text:
        return DataError(
            f"{where} Floating inputs follow the model's dtype, integer ones are passed as "
            "they are: convert integer features (e.g. x.float())."
        )
    m = _MATMUL.search(text)
    expects = ""
    if m:
        got, want = int(m.group(2)), int(m.group(3))
        expects = f" A linear layer expects {want} input features, the inputs have {got}."
    expects = expects or _first_layer(module)
    return ShapeError(
        f"{where}{expects} Pass {name} inputs of the shape the model was built for (or a "
        "task=... whose loss fits the model's outputs)."
    )


@contextmanager
def model_call(
    name: str, start: int, count: int, batch: Any, module: nn.Module | None = None
) -> Iterator[None]:
    """Turn a bare torch error raised inside the block into :func:`model_failure`'s typed one.

    bif's own errors pass through untouched: they already say what to change.
    """
    try:
        yield
    except BIFError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise model_failure(e, name, start, count, batch, module) from e


def check_k(k: object) -> None:
    """``k`` (how many top examples or tokens to list) must be a positive integer."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer (how many to list), got {k!r}.")
