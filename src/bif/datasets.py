"""Small real data sets that ship inside the bif wheel (no network at run time)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Digits:
    """UCI optical handwritten digits (the copy scikit-learn ships), 1,797 images of 8×8 pixels.

    Attributes:
        images: ``[1797, 8, 8]`` uint8 intensities in 0..16.
        labels: ``[1797]`` int64 digit classes 0..9.
    """

    images: Tensor
    labels: Tensor

    def features(self) -> Tensor:
        """Flattened pixels scaled to [0, 1]: ``[1797, 64]`` float32."""
        return self.images.reshape(len(self.images), -1).float() / 16.0


def load_digits() -> Digits:
    """Load the embedded digits (``bif/assets/digits.npz``)."""
    with resources.files("bif.assets").joinpath("digits.npz").open("rb") as f:
        z = np.load(f)
        images, labels = z["images"], z["labels"]
    return Digits(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
