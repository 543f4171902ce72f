"""Uniform random access to the user's data: tensors, a ``Dataset`` or a ``DataLoader``.

bif needs two kinds of access: fixed, ordered chunks for evaluating every example at each draw,
and random minibatches for the SGLD gradient. A ``DataLoader`` contributes its dataset and its
``collate_fn``; its own sampler and shuffling are ignored because evaluation sets must be fixed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

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


class DataSource:
    """A fixed, indexable collection of examples yielding collated batches on ``device``.

    Args:
        data: ``(inputs, targets)`` tensors with a common first dimension, a dict of such
            tensors (batches are then dicts, e.g. ``input_ids``/``attention_mask``), a map-style
            ``Dataset``, or a ``DataLoader`` over one.
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

    def batch(self, index: Tensor) -> Batch:
        """Examples ``index`` (1-D long tensor) collated into one batch on the device."""
        if self._tensors is not None:
            idx = index.to(self._tensors[0].device)
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
