"""TIFF reading/writing and the channel rule (embedseg_deploy.io)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from embedseg_deploy import io
from embedseg_deploy.io import (
    InputError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    read_provenance,
    read_tiff,
    sha256_file,
    temp_file_beside,
    tiff_files,
    tiff_stem,
    to_channels_first,
    write_tiff_atomic,
)


def _image(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 200).astype(dtype)


# ---------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "int32", "uint32", "float64"])
@pytest.mark.parametrize(("shape", "pixel_size"), [((20, 30), (0.5, 0.25)), ((4, 20, 30), (2.0, 0.5, 0.25))])
def test_round_trip_keeps_pixels_and_pixel_size(tmp_path, dtype, shape, pixel_size):
    a = _image(shape, dtype)
    path = write_tiff_atomic(tmp_path / "a.tif", a, pixel_size)
    t = read_tiff(path)
    assert t.data.dtype == a.dtype
    np.testing.assert_array_equal(t.data, a)
    assert t.pixel_size == pytest.approx(pixel_size)
    assert t.axes == ("YX" if len(shape) == 2 else "ZYX")
    assert t.path == path


def test_imagej_metadata_for_fiji(tmp_path):
    write_tiff_atomic(tmp_path / "a.tif", _image((3, 8, 9), "uint16"), (2.0, 0.5, 0.25))
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.is_imagej
        assert tif.imagej_metadata["unit"] == "micron"
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)
        xres = tif.pages.first.tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(4.0)  # pixels per micron along x


def test_non_imagej_dtype_goes_to_ome_with_physical_size(tmp_path):
    write_tiff_atomic(tmp_path / "a.tif", _image((3, 8, 9), "int32"), (2.0, 0.5, 0.25))
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.is_ome and not tif.is_imagej
        assert 'PhysicalSizeZ="2.0"' in tif.ome_metadata


def test_bool_is_written_as_uint8(tmp_path):
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:4] = True
    t = read_tiff(write_tiff_atomic(tmp_path / "m.tif", mask))
    assert t.data.dtype == np.uint8
    np.testing.assert_array_equal(t.data, mask)


def test_channels_first_3d_is_readable_back(tmp_path):
    a = _image((2, 4, 10, 12), "uint16")  # CZYX; ImageJ stores ZCYX
    t = read_tiff(write_tiff_atomic(tmp_path / "c.tif", a, (2.0, 1.0, 1.0), axes="CZYX"))
    np.testing.assert_array_equal(to_channels_first(t.data, 3, axes=t.axes), a)


def test_refuses_to_overwrite(tmp_path):
    path = write_tiff_atomic(tmp_path / "a.tif", _image((8, 8), "uint8"))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"a\.tif"):
        write_tiff_atomic(path, _image((8, 8), "uint8", seed=1))
    assert path.read_bytes() == before
    write_tiff_atomic(path, _image((8, 8), "uint8", seed=1), overwrite=True)
    assert path.read_bytes() != before


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = write_tiff_atomic(tmp_path / "a.tif", _image((8, 8), "uint8"))
    before = path.read_bytes()

    def broken(fh, *args, **kwargs):
        fh.write(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_tiff_atomic(path, _image((8, 8), "uint8", seed=1), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_tiff_atomic(tmp_path / "new.tif", _image((8, 8), "uint8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]
    assert path.read_bytes() == before


PROVENANCE = {"model_sha256": "ab" * 32, "seed_thresh": np.float32(0.5), "min_object_size": np.int64(36)}


@pytest.mark.parametrize(("dtype", "kind"), [("uint16", "imagej"), ("uint32", "ome")])
@pytest.mark.parametrize(("shape", "pixel_size"), [((20, 30), (0.5, 0.25)), ((4, 20, 30), (2.0, 0.5, 0.25))])
def test_provenance_round_trip_keeps_pixels_and_pixel_size(tmp_path, dtype, kind, shape, pixel_size):
    labels = _image(shape, dtype)
    path = write_tiff_atomic(tmp_path / "labels.tif", labels, pixel_size, provenance=PROVENANCE)
    assert read_provenance(path) == {"model_sha256": "ab" * 32, "seed_thresh": 0.5, "min_object_size": 36}
    with tifffile.TiffFile(path) as tif:
        assert (tif.is_imagej, tif.is_ome) == (kind == "imagej", kind == "ome")
    t = read_tiff(path)
    np.testing.assert_array_equal(t.data, labels)
    assert t.pixel_size == pytest.approx(pixel_size)


def test_read_provenance_is_none_without_the_tag(tmp_path):
    assert read_provenance(write_tiff_atomic(tmp_path / "plain.tif", _image((8, 8), "uint16"))) is None
    (tmp_path / "notes.tif").write_text("not a TIFF")
    assert read_provenance(tmp_path / "notes.tif") is None
    assert read_provenance(tmp_path / "missing.tif") is None
    tifffile.imwrite(
        tmp_path / "other.tif", _image((8, 8), "uint8"), extratags=[(io.PROVENANCE_TAG, "s", 0, "[1]", True)]
    )
    assert read_provenance(tmp_path / "other.tif") is None  # the tag, but not a JSON object


def test_written_file_has_normal_permissions(tmp_path):
    path = write_tiff_atomic(tmp_path / "a.tif", _image((8, 8), "uint8"))
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_write_rejects_bad_pixel_size_and_missing_folder(tmp_path):
    with pytest.raises(InputError, match="pixel_size"):
        write_tiff_atomic(tmp_path / "a.tif", _image((8, 8), "uint8"), (1.0, -1.0))
    with pytest.raises(InputError, match="does not exist"):
        write_tiff_atomic(tmp_path / "no" / "a.tif", _image((8, 8), "uint8"))
    assert list(tmp_path.iterdir()) == []


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_atomic_text_json_and_bytes(tmp_path):
    text = atomic_write_text(tmp_path / "a.csv", "x,y\r\n1,2\n")
    assert text.read_bytes() == b"x,y\r\n1,2\n"  # line endings as given, on every platform
    doc = {"n": np.int64(3), "v": np.float32(0.5), "a": np.arange(2), "p": Path("x/y.tif")}
    data = json.loads(atomic_write_json(tmp_path / "a.json", doc).read_text())
    assert data == {"n": 3, "v": 0.5, "a": [0, 1], "p": str(Path("x/y.tif"))}
    atomic_write_bytes(tmp_path / "a.json", b"new")  # replaces by default
    assert (tmp_path / "a.json").read_bytes() == b"new"
    with pytest.raises(FileExistsError, match=r"a\.json: exists"):
        atomic_write_bytes(tmp_path / "a.json", b"other", overwrite=False)
    with pytest.raises(FileNotFoundError, match=r"no/b\.txt: folder .* does not exist"):
        atomic_write_text(tmp_path / "no" / "b.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json"]
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sha256_file(tmp_path / "a.json") == hashlib.sha256(b"new").hexdigest()


def test_temp_file_beside_is_new_hidden_and_normally_readable(tmp_path):
    a, b = temp_file_beside(tmp_path / "labels.tif", "u32"), temp_file_beside(tmp_path / "labels.tif", "u32")
    assert a != b and a.parent == tmp_path and a.name.startswith(".labels.tif.") and a.suffix == ".u32"
    assert a.stat().st_size == 0 and a.stat().st_mode & 0o777 == 0o666 & ~_umask()  # mkstemp: 0o600


def test_atomic_writer_failure_keeps_the_old_file(tmp_path):
    path = atomic_write_bytes(tmp_path / "m.bin", b"old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_writer(path) as fh:
        fh.write(b"half of the new")
        assert path.read_bytes() == b"old"  # readers see the old file while it is written
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.bin"]


# ---------------------------------------------------------------------------------------------- reading


def test_pixel_size_sources(tmp_path):
    a = _image((16, 16), "uint16")
    tifffile.imwrite(tmp_path / "cm.tif", a, resolution=(1e4 / 0.3, 1e4 / 0.4), resolutionunit="CENTIMETER")
    assert read_tiff(tmp_path / "cm.tif").pixel_size == pytest.approx((0.4, 0.3))
    tifffile.imwrite(tmp_path / "dpi.tif", a, resolution=(72, 72))  # a default, not a pixel size
    assert read_tiff(tmp_path / "dpi.tif").pixel_size is None
    tifffile.imwrite(tmp_path / "none.tif", a)
    assert read_tiff(tmp_path / "none.tif").pixel_size is None
    tifffile.imwrite(
        tmp_path / "nm.tif",
        _image((3, 16, 16), "uint8"),
        imagej=True,
        resolution=(1 / 200, 1 / 100),
        metadata={"axes": "ZYX", "spacing": 500, "unit": "nm"},
    )
    assert read_tiff(tmp_path / "nm.tif").pixel_size == pytest.approx((0.5, 0.1, 0.2))
    tifffile.imwrite(
        tmp_path / "o.ome.tif",
        _image((3, 16, 16), "uint8"),
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5},
    )
    assert read_tiff(tmp_path / "o.ome.tif").pixel_size == pytest.approx((1.5, 0.3, 0.2))


def test_missing_and_not_a_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.tif: file not found"):
        read_tiff(tmp_path / "nope.tif")
    with pytest.raises(InputError, match="not a file"):
        read_tiff(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a tiff" * 4, b"II*\x00"])
def test_garbage_is_an_input_error(tmp_path, content):
    path = tmp_path / "bad.tif"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.tif: .*(corrupt|truncated|no image)"):
        read_tiff(path)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: tifffile.imwrite(p, _image((64, 64), "uint16")),
        lambda p: tifffile.imwrite(p, _image((64, 64), "uint16"), compression="zlib"),
        lambda p: tifffile.imwrite(p, _image((6, 32, 32), "uint16"), photometric="minisblack"),
        lambda p: tifffile.imwrite(
            p, _image((6, 32, 32), "uint16"), photometric="minisblack", compression="zlib"
        ),
        # ImageJ stacks: tifffile alone would silently return the first plane of a truncated file
        lambda p: write_tiff_atomic(p, _image((6, 32, 32), "uint16"), (2.0, 1.0, 1.0)),
    ],
    ids=["plain", "zlib", "stack", "stack-zlib", "imagej-stack"],
)
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_tiff(tmp_path, write, keep):
    full = tmp_path / "full.tif"
    write(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match=r"cut\.tif: .*(truncated|corrupt)"):
        read_tiff(cut)


def test_warnings_of_a_read_in_another_thread_are_not_blamed_on_this_file(tmp_path, monkeypatch):
    path = write_tiff_atomic(tmp_path / "good.tif", _image((6, 16, 16), "uint16"), (2.0, 1.0, 1.0))
    real = io.tifffile.TiffFile

    def opened_while_another_thread_reads_a_broken_file(*args, **kwargs):
        other = threading.Thread(
            target=logging.getLogger("tifffile").warning, args=("<TiffFile 'x.tif'> invalid page offset 99",)
        )
        other.start()
        other.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(io.tifffile, "TiffFile", opened_while_another_thread_reads_a_broken_file)
    assert read_tiff(path).data.shape == (6, 16, 16)


def test_unsupported_dtype(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.ones((4, 4), np.complex64))
    with pytest.raises(InputError, match=r"c\.tif: unsupported pixel type complex64"):
        read_tiff(tmp_path / "c.tif")


def test_huge_declared_size_is_refused_before_reading(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "big.tif", _image((64, 64), "uint16"))
    monkeypatch.setattr(io.tifffile.TiffPageSeries, "asarray", lambda *a, **k: pytest.fail("read the pixels"))
    with pytest.raises(InputError, match=r"big\.tif: declared image \(64, 64\) uint16 needs 8.0 KiB"):
        read_tiff(tmp_path / "big.tif", max_bytes=4096)


def test_empty_array(tmp_path):
    with pytest.warns(UserWarning):
        tifffile.imwrite(tmp_path / "e.tif", np.zeros((0, 5), np.uint8))
    with pytest.raises(InputError, match=r"e\.tif: .*(empty|no image)"):
        read_tiff(tmp_path / "e.tif")


# ---------------------------------------------------------------------------------------------- folders


def test_tiff_stem_and_folder_listing(tmp_path):
    assert [tiff_stem(n) for n in ("a.tif", "b.TIFF", "c.ome.tif", "d.OME.TIFF", "e.x.tif", "f.png")] == [
        "a",
        "b",
        "c",
        "d",
        "e.x",
        "f",
    ]
    for name in ("b.tif", "a.ome.tiff", ".hidden.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.tif").mkdir()
    assert tiff_files(tmp_path) == {"a": tmp_path / "a.ome.tiff", "b": tmp_path / "b.tif"}
    (tmp_path / "a.tif").write_bytes(b"")
    with pytest.raises(InputError, match=r"a\.tif: same name as .*a\.ome\.tiff.*keep one"):
        tiff_files(tmp_path)


# ---------------------------------------------------------------------------------------------- channels


@pytest.mark.parametrize(
    ("shape", "ndim", "kwargs", "axis"),
    [
        ((10, 12), 2, {}, None),
        ((5, 10, 12), 3, {}, None),
        ((3, 10, 12), 2, {}, 0),  # CYX
        ((10, 12, 2), 2, {}, 2),  # YXC
        ((2, 5, 10, 12), 3, {}, 0),  # CZYX
        ((5, 10, 12, 3), 3, {}, 3),  # ZYXC
        ((10, 5, 12), 2, {"in_channels": 5}, 1),  # the only axis of size in_channels
        ((10, 5, 12), 2, {"channel_axis": 1}, 1),
        ((6, 10, 12), 2, {"channel_axis": -3}, 0),
        ((4, 2, 10, 12), 3, {"axes": "ZCYX"}, 1),  # the file names its channel axis
        ((32, 10, 12), 2, {"axes": "ZYX", "channel_axis": 0, "in_channels": 32}, 0),  # the user overrides
        ((2, 10, 12), 2, {"axes": "ZYX"}, 0),  # write_tiff_atomic declares ZYX for any 3D array: it fits
        ((3, 10, 12), 2, {"axes": "ZYX", "in_channels": 3}, 0),
        ((8, 10, 12), 3, {"axes": "TYX"}, None),  # a 3D model takes frames as a volume
        ((2, 10, 12), 3, {"axes": "CYX"}, None),  # tifffile's ImageJ/OME default axes for any 3D array
    ],
)
def test_channel_rule(shape, ndim, kwargs, axis):
    a = np.arange(np.prod(shape)).reshape(shape)
    expected = a[np.newaxis] if axis is None else np.moveaxis(a, axis, 0)
    np.testing.assert_array_equal(to_channels_first(a, ndim, **kwargs), expected)


@pytest.mark.parametrize(
    ("shape", "ndim", "kwargs", "match"),
    [
        ((10, 3, 12), 2, {}, "cannot tell which axis"),  # small axis in the middle
        ((3, 10, 3), 2, {}, "cannot tell which axis"),  # two candidates
        ((8, 10, 12), 2, {}, "cannot tell which axis"),  # smallest axis too large
        ((10, 12), 3, {}, "wrong number of dimensions"),
        ((2, 3, 10, 12), 2, {}, "wrong number of dimensions"),
        ((3, 10, 12), 2, {"in_channels": 2}, "expected 2"),
        ((3, 10, 12), 2, {"channel_axis": 5}, "out of range"),
        ((10, 12), 3, {}, r"the image is 2D \(shape \(10, 12\)\) but the model is 3D; use a 2D model"),
        ((10, 12, 3), 3, {"axes": "YXS"}, r"the image is 2D with 3 samples per pixel .* the model is 3D"),
        (
            (32, 10, 12),
            2,
            {"axes": "ZYX", "in_channels": 1},
            r"the image is 3D \(32 z slices; axes ZYX, shape \(32, 10, 12\)\) but the model is 2D: "
            r"split it into 2D images or use a 3D model$",
        ),
        ((3, 10, 12), 2, {"axes": "ZYX", "in_channels": 1}, r"image is 3D \(3 z slices.*model is 2D"),
        ((8, 10, 12), 2, {"axes": "TYX"}, r"image is 3D \(8 time points.*model is 2D: split it into 2D"),
        ((4, 2, 10, 12), 2, {"axes": "ZCYX"}, r"image is 3D \(4 z slices; axes ZCYX.*use a 3D model$"),
        ((3, 5, 10, 12), 3, {"axes": "TZYX", "in_channels": 1}, r"image is 4D \(3 time points of 5 z slices"),
        (
            (32, 10, 12),
            2,
            {"axes": "ZYX", "channel_axis": 0, "in_channels": 1},
            "has 32 channels, expected 1",
        ),
    ],
)
def test_channel_rule_errors_name_the_file(shape, ndim, kwargs, match):
    with pytest.raises(InputError, match=match) as err:
        to_channels_first(np.zeros(shape), ndim, path="some/file.tif", **kwargs)
    assert str(err.value).startswith("some/file.tif: ")


@pytest.mark.parametrize("write", ["imagej", "ome"])
def test_z_stack_file_for_a_2d_model_is_called_3d(tmp_path, write):
    stack = _image((32, 16, 16), "uint16")
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, **{write: True}, metadata={"axes": "ZYX"})
    t = read_tiff(path)
    with pytest.raises(
        InputError, match=r"stack\.tif: the image is 3D \(32 z slices.*the model is 2D"
    ) as err:
        to_channels_first(t.data, 2, in_channels=1, path=path, axes=t.axes)
    assert "channels, expected" not in str(err.value)
    assert to_channels_first(t.data, 3, in_channels=1, path=path, axes=t.axes).shape == (1, 32, 16, 16)


def test_channel_rule_does_not_copy_or_modify():
    a = np.zeros((10, 12, 2))
    out = to_channels_first(a, 2)
    assert np.shares_memory(a, out) and a.shape == (10, 12, 2)


# ---------------------------------------------------------------------------------------------- torch-free


def test_io_and_synthetic_import_without_torch(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        from embedseg_deploy import io, synthetic
        root = synthetic.write_dataset({str(tmp_path / "d")!r}, ndim=2, n_train=1, n_val=1, n_test=1,
                                       shape=(48, 48), n_objects=(3, 5))
        t = io.read_tiff(root / "train" / "images" / "img000.tif")
        assert t.data.shape == (48, 48)
        loaded = [m for m, v in sys.modules.items() if v is not None]
        assert not any(m == "torch" or m.startswith("torch.") for m in loaded)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
