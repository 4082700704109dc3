"""A TIFF holding several images (embedseg_deploy.io): only the first series is read, and the user is told.

Pyramid levels, reduced-resolution copies, thumbnails, slide labels and macro photos are not images of
their own, so they bring no note.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from embedseg_deploy.io import read_tiff, series_note, write_tiff_atomic

FIRST = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)


def test_two_appended_images(tmp_path):
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, FIRST)
    tifffile.imwrite(path, np.ones((32, 48), np.uint8), append=True)
    t = read_tiff(path)
    np.testing.assert_array_equal(t.data, FIRST)
    assert t.notes == (
        f"{path}: holds 2 separate images (TIFF series); only the first (shape (64, 64), axes YX) is used",
    )


@pytest.mark.parametrize("ome", [False, True], ids=["shaped", "ome"])
def test_three_series_of_one_shape(tmp_path, ome):
    path = tmp_path / "three.tif"
    with tifffile.TiffWriter(path, ome=ome) as tif:
        for k in range(3):
            tif.write(np.full((4, 16, 16), k, np.uint16), photometric="minisblack", metadata={"axes": "ZYX"})
    t = read_tiff(path)
    assert t.data.shape == (4, 16, 16) and (t.data == 0).all()
    (note,) = t.notes
    assert note.startswith(f"{path}: holds 3 separate images") and "(shape (4, 16, 16), axes ZYX)" in note
    with tifffile.TiffFile(path) as tif:  # the same note for a reader that keeps the file open (bigimage)
        assert series_note(tif, path) == note


def _one_image(path):
    write_tiff_atomic(path, FIRST, (0.5, 0.5))


def _pyramid(path):
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(FIRST, subifds=2, metadata={"axes": "YX"})
        tif.write(FIRST[::2, ::2], subfiletype=1)
        tif.write(FIRST[::4, ::4], subfiletype=1)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 1 and len(tif.series[0].levels) == 3


def _reduced_thumbnail(path):
    with tifffile.TiffWriter(path) as tif:
        tif.write(FIRST, photometric="minisblack", metadata=None)
        tif.write(np.zeros((16, 16, 3), np.uint8), photometric="rgb", subfiletype=1, metadata=None)
    with tifffile.TiffFile(path) as tif:
        assert [s.shape for s in tif.series] == [(64, 64), (16, 16, 3)]


def _slide(path):
    """An Aperio SVS-like slide: tifffile lists its thumbnail, label and macro photo as series."""
    aperio = "Aperio Image Library v12.0.15 \n256x256 "
    rgb = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            np.zeros((256, 256, 3), np.uint8), tile=(128, 128), description=aperio + "|MPP = 0.5", **rgb
        )
        tif.write(np.zeros((64, 64, 3), np.uint8), description=aperio + "-> 64x64", **rgb)
        tif.write(np.zeros((128, 128, 3), np.uint8), tile=(64, 64), description=aperio + "-> 128x128", **rgb)
        tif.write(np.zeros((32, 32, 3), np.uint8), subfiletype=1, description=aperio + "\nlabel", **rgb)
        tif.write(np.zeros((32, 48, 3), np.uint8), subfiletype=9, description=aperio + "\nmacro", **rgb)
    with tifffile.TiffFile(path) as tif:
        assert [s.name for s in tif.series] == ["Baseline", "Thumbnail", "Label", "Macro"]


@pytest.mark.parametrize("write", [_one_image, _pyramid, _reduced_thumbnail, _slide])
def test_one_image_with_levels_or_thumbnails_has_no_note(tmp_path, write):
    path = tmp_path / "a.tif"
    write(path)
    assert read_tiff(path).notes == ()
