"""How one example looks in a report: an image and/or a text, a caption and tags.

Views are supplied by whoever knows the data (the demo knows digits; a language-model workflow
would know tokens); the report itself only knows indices and scores.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ExampleView:
    """What to show for one training example or query.

    Attributes:
        caption: short text under the example (e.g. ``"label 3"``); escaped when rendered.
        image: ``[H, W]`` intensities in [0, 1] drawn with ``cmap`` (default: 0 white, 1 black),
            or ``[H, W, 3]`` RGB in [0, 1] (float) or 0..255 (uint8). None: no image.
        text: plain text shown in a monospaced block (e.g. a sequence); escaped when rendered.
        tags: short labels shown as badges; each also becomes a CSS class ``tag-<tag>``.
        cmap: matplotlib colormap name for grayscale images.
    """

    caption: str = ""
    image: Any = None
    text: str | None = None
    tags: tuple[str, ...] = ()
    cmap: str = "gray_r"


ViewSource = Sequence[ExampleView] | Callable[[int], ExampleView]
"""A view per example index: a sequence, or a function (lazy, for large data sets)."""


def get_view(source: ViewSource | None, index: int) -> ExampleView:
    """The view of example ``index`` (an empty view when no source is given)."""
    if source is None:
        return ExampleView()
    if callable(source):
        return source(index)
    return source[index]


def png_data_uri(image: Any, cmap: str = "gray_r", min_size: int = 64) -> str:
    """Encode an image as a ``data:image/png;base64,...`` URI (no external file).

    Small images are enlarged by an integer nearest-neighbour factor so that their shorter side
    is at least ``min_size`` pixels: browsers would otherwise blur an 8×8 digit when scaling it.

    Args:
        image: ``[H, W]`` in [0, 1] or ``[H, W, 3]`` RGB (float in [0, 1] or uint8).
        cmap: colormap for grayscale images.
        min_size: smallest side, in pixels, of the encoded PNG.
    """
    from matplotlib.image import imsave  # lazy: matplotlib takes ~0.5 s to import

    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"an image must be [H, W] or [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0)
    factor = max(1, -(-min_size // max(1, min(arr.shape[:2]))))
    arr = arr.repeat(factor, axis=0).repeat(factor, axis=1)
    buf = io.BytesIO()
    if arr.ndim == 2:
        imsave(buf, arr, cmap=cmap, vmin=0.0, vmax=1.0, format="png")
    else:
        imsave(buf, arr, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
