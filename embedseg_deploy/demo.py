"""``embedseg-run demo``: segment a synthetic image with the bundled 2D model, offline, in seconds.

Makes an image with known objects (:mod:`embedseg_deploy.synthetic`), segments it, writes the image, the
labels and a PNG overlay, and reports the object count, the accuracy (AP at IoU 0.5, as EmbedSeg reports
it) against the synthetic truth, and timings.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "demo2d.onnx"


class DemoError(RuntimeError):
    """The demo cannot run (no bundled model, or a model that is not 2D)."""


@dataclass
class DemoResult:
    n_objects: int
    n_true: int
    ap50: float
    files: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike = "embedseg-demo",
    model: str | os.PathLike | None = None,
    backend: str = "auto",
    seed: int = 0,
    shape: tuple[int, int] = (256, 256),
    n_objects: int = 30,
    threads: int | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir``; ``model`` defaults to the bundled ``models/demo2d.onnx``."""
    from .io import write_tiff_atomic
    from .metrics import matching
    from .png import overlay, write_png
    from .predict import Predictor, label_dtype
    from .synthetic import make_image

    model_path = Path(model) if model is not None else DEFAULT_MODEL
    if not model_path.is_file():
        if model is None:
            raise DemoError(
                f"the demo model is not bundled with this installation ({DEFAULT_MODEL} is missing); "
                "pass --model PATH to a 2D EmbedSeg ONNX model (embedseg-export onnx)"
            )
        raise DemoError(f"{model_path}: model file not found")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image, truth = make_image(shape, n_objects, np.random.default_rng(seed))
    timings["synthesize"] = time.perf_counter() - t0
    predictor = Predictor(model_path, backend=backend, threads=threads)
    if predictor.contract.ndim != 2:
        raise DemoError(f"{model_path}: the demo needs a 2D model, this one is {predictor.contract.ndim}D")
    timings["load_model"] = predictor.load_seconds
    t0 = time.perf_counter()
    from .cluster import warm_up

    warm_up()  # numba compile or cache load, reported apart from the clustering itself
    timings["jit_warm_up"] = time.perf_counter() - t0
    result = predictor.run(image)
    timings.update(result.timings)
    labels = result.labels.astype(label_dtype(result.n_objects))
    ap50 = float(matching(truth, labels, thresh=0.5).accuracy)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "image": str(write_tiff_atomic(out / "demo_image.tif", image, overwrite=True)),
        "truth": str(write_tiff_atomic(out / "demo_truth.tif", truth, overwrite=True)),
        "labels": str(write_tiff_atomic(out / "demo_labels.tif", labels, overwrite=True)),
        "overlay": str(write_png(out / "demo_overlay.png", overlay(image, labels))),
    }
    timings["write"] = time.perf_counter() - t0
    return DemoResult(
        n_objects=len(np.unique(labels[labels > 0])),
        n_true=len(np.unique(truth[truth > 0])),
        ap50=ap50,
        files=files,
        timings=timings,
        backend=predictor.backend.describe(),
    )
