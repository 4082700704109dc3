"""napari sample data: the demo's synthetic cells, with the bundled model named in the layer metadata."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..demo import DEFAULT_MODEL
from ..synthetic import make_image


def demo_cells() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """A 256 x 256 image of 30 synthetic cells (the `embedseg-run demo` image)."""
    image, _ = make_image((256, 256), 30, np.random.default_rng(0))
    meta = {"embedseg_model": str(DEFAULT_MODEL)}
    return [(image, {"name": "demo cells", "metadata": meta}, "image")]
