"""Regenerate src/bif/assets/digits.npz from scikit-learn's copy of the UCI optical digits.

The demo must run without scikit-learn and without network, so bif ships this 1,797-image copy
(8x8 pixels, intensities 0..16) inside its own wheel. tests/test_datasets.py checks it is identical
to scikit-learn's.

    python scripts/embed_digits.py
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

out = Path(__file__).resolve().parents[1] / "src" / "bif" / "assets" / "digits.npz"
d = load_digits()
np.savez_compressed(out, images=d.images.astype(np.uint8), labels=d.target.astype(np.uint8))
print(f"wrote {out} ({out.stat().st_size} bytes)")
