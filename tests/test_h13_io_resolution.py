"""Pixel sizes from TIFF resolution tags (embedseg_deploy.io): inch-based resolutions are pixel sizes that
predict carries into its output; generic writer defaults (72/96/300/1 dpi) are not."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from embedseg_deploy.io import read_tiff, write_tiff_atomic
from embedseg_deploy.predict import output_pixel_size

UM_PER_INCH = 25400.0


def _carry(src, dst, ndim: int):
    """What ``embedseg-run predict`` does with the input's pixel size: read, output_pixel_size, write."""
    image = read_tiff(src)
    px = output_pixel_size(image.pixel_size, ndim)
    return read_tiff(write_tiff_atomic(dst, np.zeros(image.data.shape, np.uint16), px)).pixel_size


@pytest.mark.parametrize(
    "resolution",
    [(UM_PER_INCH / 0.65, UM_PER_INCH / 0.65), (UM_PER_INCH / 0.5, UM_PER_INCH / 0.25)],
    ids=["0.65um", "0.25x0.5um"],
)
def test_inch_resolution_is_a_pixel_size_and_reaches_the_output(tmp_path, resolution):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.ones((16, 16), np.uint16), resolution=resolution, resolutionunit="INCH")
    expected = (UM_PER_INCH / resolution[1], UM_PER_INCH / resolution[0])
    assert read_tiff(src).pixel_size == pytest.approx(expected)
    assert _carry(src, tmp_path / "out.tif", 2) == pytest.approx(expected)


def test_whole_dpi_and_imagej_inch_unit(tmp_path):
    """39077 dpi as a whole number (how many writers round it), and ImageJ's own unit=inch with spacing."""
    tifffile.imwrite(tmp_path / "dpi.tif", np.ones((16, 16), np.uint16), resolution=(39077, 39077))
    assert read_tiff(tmp_path / "dpi.tif").pixel_size == pytest.approx((0.65, 0.65), rel=1e-5)
    stack = np.ones((3, 16, 16), np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        stack,
        imagej=True,
        resolution=(UM_PER_INCH / 0.65, UM_PER_INCH / 0.65),
        metadata={"axes": "ZYX", "unit": "inch", "spacing": 2.0 / UM_PER_INCH},
    )
    assert _carry(tmp_path / "ij.tif", tmp_path / "out.tif", 3) == pytest.approx((2.0, 0.65, 0.65))


@pytest.mark.parametrize("dpi", [1, 72, 96, 300])
def test_default_dpi_is_no_pixel_size(tmp_path, dpi):
    tifffile.imwrite(
        tmp_path / "a.tif", np.ones((16, 16), np.uint16), resolution=(dpi, dpi), resolutionunit="INCH"
    )
    assert read_tiff(tmp_path / "a.tif").pixel_size is None
    assert _carry(tmp_path / "a.tif", tmp_path / "out.tif", 2) is None


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
@pytest.mark.parametrize("pixel_size", [(0.65, 0.65), (0.1, 0.3), (2.0, 0.65, 0.65)])
def test_written_pixel_size_reads_back_exactly(tmp_path, dtype, pixel_size):
    """1 / 0.65 is stored as the rational 20/13; reading 13/20 back must give 0.65, not 0.6499999999999999
    (which summary.json and every later round trip would carry on)."""
    shape = (3, 8, 8) if len(pixel_size) == 3 else (8, 8)
    path = write_tiff_atomic(tmp_path / "a.tif", np.zeros(shape, dtype), pixel_size)
    assert read_tiff(path).pixel_size == pixel_size
