"""Uniform random access to the user's data: tensors, a ``Dataset`` or a ``DataLoader``.

bif needs two kinds of access: fixed, ordered chunks for evaluating every example at each draw,
and random minibatches for the SGLD gradient. A ``DataLoader`` contributes its dataset and its
``collate_fn``; its own sampler and shuffling are ignored because evaluation sets must be fixed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from bif.errors import DataError

Batch = Any


def _to(x: Any, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    return tree_map(move, x)


def _from_numpy(a: Any, name: str) -> Tensor:
    """A numpy array (or scalar) as a tensor: floating arrays keep their dtype here (the caller
    casts them to the model's, as it does tensors) and integer arrays become ``long``, the dtype
    ``cross_entropy`` and ``nn.Embedding`` need (numpy's default int is int32 on Windows)."""
    arr = np.asarray(a)
    try:
        # A copy: the user's array stays theirs, and read-only arrays need no special case.
        t = torch.tensor(arr)
    except TypeError as e:
        raise DataError(
            f"{name} holds a numpy array of dtype {arr.dtype}, which torch cannot convert; pass "
            "a numeric array (e.g. X.astype(np.float32), y.astype(np.int64))."
        ) from e
    if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        t = t.long()
    return t


def _numbers(v: Any) -> bool:
    """A number or a (nested) list of numbers: what ``np.asarray`` makes one array of."""
    if isinstance(v, np.generic | int | float):
        return True
    return isinstance(v, list | tuple) and all(_numbers(u) for u in v)


def _is_field(v: Any) -> bool:
    """One field of one example that bif can stack itself: a tensor, array, number, or a
    (nested) list of numbers. A tuple of tensors (a multi-input model) is not one: it keeps
    ``default_collate``'s tuple of stacked tensors."""
    return isinstance(v, Tensor | np.ndarray) or _numbers(v)


def _field_tensor(v: Any, name: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.ndarray | np.generic):
        return _from_numpy(v, name)
    try:
        # Through numpy, as default_collate does: python floats stay float64 until the cast to
        # the model's dtype (torch.as_tensor would round them to float32 first).
        return _from_numpy(np.asarray(v), name)
    except (ValueError, TypeError) as e:
        raise DataError(
            f"{name} holds a field {v!r:.60} that is not a rectangular list of numbers; pass "
            "tensors or numpy arrays."
        ) from e


def _examples_collate(name: str) -> Any:
    """Collate for a plain list of ``(x, y)`` examples.

    ``default_collate`` transposes a list-valued field into a list of per-feature tensors (the
    model then receives a list) and keeps numpy int32 labels int32 (``cross_entropy`` refuses
    them): stack each field into one tensor instead, with :func:`_from_numpy`'s rules.
    """

    def collate(items: list[Any]) -> Any:
        fields = list(zip(*items, strict=True))
        out = []
        for i, values in enumerate(fields):
            if not all(_is_field(v) for v in values):
                out.append(default_collate(list(values)))  # dicts, strings: torch's rules
                continue
            ts = [_field_tensor(v, name) for v in values]
            shapes = {tuple(t.shape) for t in ts}
            if len(shapes) != 1:
                raise DataError(
                    f"{name} examples' field {i} has different shapes {sorted(shapes)}; every "
                    "example's inputs (and targets) must have one shape. Pad or resize them."
                )
            out.append(torch.stack(ts))
        return tuple(out)

    return collate


def _coerce(data: Any, name: str) -> tuple[Any, bool]:
    """The forms a user naturally passes, in the form :class:`DataSource` reads.

    Returns:
        the data (numpy columns as tensors; a tuple of equal-length lists as tensor columns)
        and whether it is a plain sequence of ``(x, y)`` examples to stack with
        :func:`_examples_collate`.
    """
    if isinstance(data, Mapping) and any(isinstance(v, np.ndarray) for v in data.values()):
        return {k: _from_numpy(v, name) if isinstance(v, np.ndarray) else v
                for k, v in data.items()}, False  # fmt: skip
    if not isinstance(data, tuple | list) or not data or isinstance(data, Dataset):
        return data, False
    if all(isinstance(t, Tensor | np.ndarray) for t in data):
        # (X, y) as numpy arrays: columns, as tensors are (a mix of the two too).
        return tuple(_from_numpy(t, name) if isinstance(t, np.ndarray) else t for t in data), False
    if (
        isinstance(data, tuple)
        and all(isinstance(c, list) for c in data)
        and len({len(c) for c in data}) == 1
    ):
        # (X.tolist(), y.tolist()): columns of python lists (a list of examples is a *list* of
        # tuples, so this reading is not ambiguous).
        return tuple(_field_tensor(c, name) for c in data), False
    pairs = all(isinstance(e, tuple | list) for e in data) and len({len(e) for e in data}) == 1
    return data, pairs


class DataSource:
    """A fixed, indexable collection of examples yielding collated batches on ``device``.

    Args:
        data: ``(inputs, targets)`` tensors with a common first dimension, a dict of such
            tensors (batches are then dicts, e.g. ``input_ids``/``attention_mask``), a map-style
            ``Dataset``, or a ``DataLoader`` over one. Numpy arrays stand for tensors (integer
            arrays become ``long``), and a plain list of ``(x, y)`` examples (tensors, arrays,
            numbers or lists of numbers) is stacked field by field.
        name: used in error messages ("train", "query").
        device: where batches are placed.
        dtype: floating tensors are cast to it (integer labels and token ids are left alone).
    """

    def __init__(
        self,
        data: Any,
        name: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self._tensors: tuple[Tensor, ...] | None = None
        self._dataset: Dataset | None = None
        self._collate = default_collate
        self._mapping_keys: tuple[str, ...] | None = None
        data, examples = _coerce(data, name)
        if examples:
            self._collate = _examples_collate(name)
        if isinstance(data, DataLoader):
            self._dataset = data.dataset
            if data.collate_fn is not None:
                self._collate = data.collate_fn
        elif isinstance(data, Mapping) and all(isinstance(t, Tensor) for t in data.values()):
            # A dict of tensors, e.g. {"input_ids": [N, S], "attention_mask": [N, S]} for an LM.
            self._mapping_keys = tuple(data)
            data = tuple(data.values())
            lengths = {int(t.shape[0]) if t.dim() else -1 for t in data}
            if len(lengths) != 1 or -1 in lengths:
                shapes = {k: tuple(t.shape) for k, t in zip(self._mapping_keys, data, strict=True)}
                raise DataError(
                    f"{name} tensors must share their first (example) dimension; got {shapes}."
                )
            self._tensors = tuple(_to(t, self.device, dtype) for t in data)
        elif isinstance(data, tuple | list) and all(isinstance(t, Tensor) for t in data):
            if len(data) == 0:
                raise DataError(f"{name} data is an empty tuple; pass (inputs, targets).")
            lengths = {int(t.shape[0]) if t.dim() else -1 for t in data}
            if len(lengths) != 1 or -1 in lengths:
                shapes = [tuple(t.shape) for t in data]
                raise DataError(
                    f"{name} tensors must share their first (example) dimension; "
                    f"got shapes {shapes}."
                )
            self._tensors = tuple(_to(t, self.device, dtype) for t in data)
        elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
            self._dataset = data
        else:
            raise DataError(
                f"{name} data must be a pair of tensors (inputs, targets), a dict of tensors "
                f"(e.g. input_ids and attention_mask), a torch Dataset or a DataLoader; got "
                f"{type(data).__name__}."
            )
        if self._dataset is not None:
            try:
                n = len(self._dataset)  # type: ignore[arg-type]
            except TypeError as e:
                raise DataError(
                    f"{name} dataset has no len(); bif needs a map-style Dataset (with __len__ and "
                    "__getitem__) because every example is re-evaluated at each draw."
                ) from e
            self._len = int(n)
        else:
            assert self._tensors is not None
            self._len = int(self._tensors[0].shape[0])
        if self._len == 0:
            raise DataError(f"{name} data is empty; attribution needs at least one example.")

    def __len__(self) -> int:
        return self._len

    def head(self, n: int) -> DataSource:
        """The first ``n`` examples (same device, dtype and collation)."""
        out = copy.copy(self)
        out._len = min(n, self._len)
        if self._tensors is not None:
            out._tensors = tuple(t[: out._len] for t in self._tensors)
        else:
            assert self._dataset is not None
            out._dataset = Subset(self._dataset, range(out._len))
        return out

    def slice(self, start: int, stop: int) -> DataSource:
        """Examples ``start .. stop - 1`` (same device, dtype and collation)."""
        out = copy.copy(self)
        start, stop = max(0, start), min(stop, self._len)
        out._len = max(0, stop - start)
        if self._tensors is not None:
            out._tensors = tuple(t[start:stop] for t in self._tensors)
        else:
            assert self._dataset is not None
            out._dataset = Subset(self._dataset, range(start, stop))
        return out

    def batch(self, index: Tensor) -> Batch:
        """Examples ``index`` (1-D long tensor) collated into one batch on the device."""
        if self._tensors is not None:
            dev = self._tensors[0].device
            if dev.type == "cuda" and index.device.type == "cpu":
                # Pinned and non-blocking: a pageable copy would wait for the device.
                idx = index.pin_memory().to(dev, non_blocking=True)
            else:
                idx = index.to(dev)
            parts = tuple(t[idx] for t in self._tensors)
            if self._mapping_keys is not None:
                return dict(zip(self._mapping_keys, parts, strict=True))
            return parts if len(parts) != 1 else parts[0]
        assert self._dataset is not None
        items = [self._dataset[int(i)] for i in index.tolist()]
        return _to(self._collate(items), self.device, self.dtype)

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, Batch]]:
        """Yield ``(start, batch)`` over all examples in order, ``chunk_size`` at a time."""
        for start in range(0, self._len, chunk_size):
            stop = min(start + chunk_size, self._len)
            yield start, self.batch(torch.arange(start, stop))


def stack_chain_batches(batch: Batch, num_chains: int) -> Batch:
    """Reshape a batch of ``C·B`` examples into a leading chain dimension ``[C, B, ...]``."""
    return tree_map(
        lambda t: t.reshape(num_chains, -1, *t.shape[1:]) if isinstance(t, Tensor) else t, batch
    )
