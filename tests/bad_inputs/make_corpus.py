"""Write the bad-input corpus for ``embedseg-run`` (tests/test_bad_inputs.py) into ``corpus/``.

Run ``python tests/bad_inputs/make_corpus.py`` to regenerate; the output is deterministic and small
(< 100 kB), and committed. :data:`CASES` lists every file with what it is and what the runtime must do:
``"fail"`` = a clear message naming the file, the batch goes on, exit code 1; ``"ok"`` = it is odd but valid
and gets segmented (a warning where one is due). Model files (``model_*``, ``engine_*``, ``checkpoint_*``)
must stop the run before any image is touched, with exit code 2.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# file -> (what it is, expected outcome, regex the message must match)
CASES: dict[str, tuple[str, str, str]] = {
    "empty.tif": ("0-byte file", "fail", r"empty\.tif: .*(empty|no image|corrupt)"),
    "truncated.tif": ("valid TIFF cut in half", "fail", r"truncated\.tif: .*(truncated|corrupt)"),
    "truncated_tail.tif": (
        "last 100 bytes of pixel data missing",
        "fail",
        r"truncated_tail\.tif: .*truncated",
    ),
    "corrupt_header.tif": (
        "TIFF magic, garbage IFD offset",
        "fail",
        r"corrupt_header\.tif: .*(corrupt|no image)",
    ),
    "corrupt_ifd.tif": ("IFD entry count overwritten", "fail", r"corrupt_ifd\.tif: "),
    "not_a_tiff.tif": ("a text file named .tif", "fail", r"not_a_tiff\.tif: .*(unreadable|corrupt)"),
    "png_named_tif.tif": ("PNG bytes named .tif", "fail", r"png_named_tif\.tif: .*(unreadable|corrupt)"),
    "wrong_ndim_4d.tif": (
        "4D stack for a 2D model",
        "fail",
        r"wrong_ndim_4d\.tif: wrong number of dimensions",
    ),
    "wrong_ndim_1d.tif": ("a 1D signal", "fail", r"wrong_ndim_1d\.tif: wrong number of dimensions"),
    "channels_3_first.tif": (
        "3 channels (CYX) for a 1-channel model",
        "fail",
        r"channels_3_first\.tif: .*channel",
    ),
    "channels_rgb.tif": ("RGB uint8 (YXS) for a 1-channel model", "fail", r"channels_rgb\.tif: .*channel"),
    "stack_5_slices.tif": ("5-slice stack for a 2D model", "fail", r"stack_5_slices\.tif: .*channel"),
    "nan.tif": ("float32 with a NaN", "fail", r"nan\.tif: .*NaN"),
    "inf.tif": ("float32 with +inf", "fail", r"inf\.tif: .*(NaN or infinite)"),
    "complex.tif": ("complex64 pixels", "fail", r"complex\.tif: unsupported pixel type complex64"),
    "huge_declared.tif": (
        "header says 200000 x 200000 uint16",
        "fail",
        r"huge_declared\.tif: .*declared image",
    ),
    "zero_width.tif": ("header says width 0", "fail", r"zero_width\.tif: "),
    "constant.tif": ("every pixel 7", "ok", r"constant"),
    "one_pixel.tif": ("a 1 x 1 image", "ok", r""),
    "tiny_3x5.tif": ("a 3 x 5 image (smaller than one tile multiple)", "ok", r""),
    "int32_negative.tif": ("int32 with negative values", "ok", r""),
    "float64.tif": ("float64 pixels", "ok", r""),
    "uint8.tif": ("uint8 pixels", "ok", r""),
    "pixel_size_mismatch.tif": ("3 µm pixels for a 1 µm model", "ok", r"pixel size .* differs"),
    "ome.ome.tif": ("a valid OME-TIFF", "ok", r""),
    "model_text.onnx": (
        "a text file named .onnx",
        "model",
        r"model_text\.onnx: cannot create an onnxruntime",
    ),
    "model_empty.onnx": ("a 0-byte .onnx", "model", r"model_empty\.onnx: cannot create an onnxruntime"),
    "model_nocontract.onnx": (
        "an ONNX model without the contract",
        "model",
        r"model_nocontract\.onnx: .*no EmbedSeg contract",
    ),
    "model_badcontract.onnx": (
        "contract metadata that is not JSON",
        "model",
        r"model_badcontract\.onnx: bad contract",
    ),
    "engine_other_gpu.engine": (
        "engine + sidecar built for a Tesla T4",
        "model",
        r"engine_other_gpu\.engine",
    ),
    "checkpoint_garbage.pth": ("random bytes named .pth", "model", r"checkpoint_garbage\.pth"),
}


def _png_bytes() -> bytes:
    sys.path.insert(0, str(HERE.parents[1]))
    from embedseg_deploy.png import encode_png

    return encode_png(np.full((8, 8, 3), 200, np.uint8))


def _image(seed: int = 0, shape=(32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    disc = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < 36
    return (100 + 900 * disc + rng.normal(0, 10, shape)).clip(0).astype(np.uint16)


def _plain_tiff(path: Path, data: np.ndarray) -> bytes:
    tifffile.imwrite(path, data, photometric="minisblack", software=None)
    return path.read_bytes()


def _patch_dims(raw: bytes, width: int, height: int) -> bytes:
    """Rewrite ImageWidth/ImageLength of a classic little-endian TIFF as LONG values."""
    buf = bytearray(raw)
    ifd = struct.unpack_from("<I", buf, 4)[0]
    (count,) = struct.unpack_from("<H", buf, ifd)
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", buf, at)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", buf, at, tag, 4, 1, width if tag == 256 else height)
    return bytes(buf)


def _onnx_with_metadata(path: Path, metadata: dict[str, str] | None) -> None:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["N", 5, "H", "W"])
    w = numpy_helper.from_array(np.zeros((5, 1, 1, 1), np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "W"], ["raw"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    path.write_bytes(model.SerializeToString())


def make(folder: Path = CORPUS) -> Path:
    """Write every file of :data:`CASES` into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    f = folder
    good = _plain_tiff(f / "truncated.tif", _image())
    (f / "empty.tif").write_bytes(b"")
    (f / "truncated.tif").write_bytes(good[: len(good) // 2])
    big = _plain_tiff(f / "truncated_tail.tif", _image(1, (64, 64)))
    assert struct.unpack_from("<I", big, 4)[0] < 1000  # tifffile writes the IFD first, pixel data last
    (f / "truncated_tail.tif").write_bytes(big[:-100])
    (f / "corrupt_header.tif").write_bytes(b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + good[8:])
    bad_ifd = bytearray(good)
    struct.pack_into("<H", bad_ifd, struct.unpack_from("<I", good, 4)[0], 0xFFFF)
    (f / "corrupt_ifd.tif").write_bytes(bytes(bad_ifd))
    (f / "not_a_tiff.tif").write_text("this is a text file, not an image\n")
    (f / "png_named_tif.tif").write_bytes(_png_bytes())
    tifffile.imwrite(f / "wrong_ndim_4d.tif", np.zeros((2, 2, 16, 16), np.uint16), software=None)
    tifffile.imwrite(f / "wrong_ndim_1d.tif", np.arange(64, dtype=np.uint16), software=None)
    tifffile.imwrite(f / "channels_3_first.tif", np.stack([_image(i) for i in range(3)]), software=None)
    tifffile.imwrite(
        f / "channels_rgb.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb", software=None
    )
    tifffile.imwrite(f / "stack_5_slices.tif", np.stack([_image(i) for i in range(5)]), software=None)
    nan = _image().astype(np.float32)
    nan[5, 5] = np.nan
    tifffile.imwrite(f / "nan.tif", nan, software=None)
    inf = _image().astype(np.float32)
    inf[7, 9] = np.inf
    tifffile.imwrite(f / "inf.tif", inf, software=None)
    tifffile.imwrite(f / "complex.tif", np.zeros((16, 16), np.complex64), software=None)
    small = _plain_tiff(f / "huge_declared.tif", np.zeros((8, 8), np.uint16))
    (f / "huge_declared.tif").write_bytes(_patch_dims(small, 200_000, 200_000))
    (f / "zero_width.tif").write_bytes(_patch_dims(small, 0, 8))
    tifffile.imwrite(f / "constant.tif", np.full((32, 32), 7, np.uint16), software=None)
    tifffile.imwrite(f / "one_pixel.tif", np.full((1, 1), 500, np.uint16), software=None)
    tifffile.imwrite(f / "tiny_3x5.tif", _image(2, (3, 5)), software=None)
    tifffile.imwrite(f / "int32_negative.tif", _image(3).astype(np.int32) - 5000, software=None)
    tifffile.imwrite(f / "float64.tif", _image(4).astype(np.float64) / 1000, software=None)
    tifffile.imwrite(f / "uint8.tif", (_image(5) // 8).astype(np.uint8), software=None)
    tifffile.imwrite(
        f / "pixel_size_mismatch.tif", _image(6), imagej=True, resolution=(1 / 3, 1 / 3),
        metadata={"unit": "micron"}, software=None,
    )  # fmt: skip
    ome = {"axes": "YX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0}
    tifffile.imwrite(f / "ome.ome.tif", _image(7), ome=True, metadata=ome, software=None)
    ome_bytes = (f / "ome.ome.tif").read_bytes()  # fix the random UUID so the corpus is reproducible
    (f / "ome.ome.tif").write_bytes(re.sub(rb"urn:uuid:[0-9a-f-]{36}", b"urn:uuid:" + b"0" * 36, ome_bytes))
    (f / "model_text.onnx").write_text("not a model\n")
    (f / "model_empty.onnx").write_bytes(b"")
    _onnx_with_metadata(f / "model_nocontract.onnx", None)
    _onnx_with_metadata(f / "model_badcontract.onnx", {"embedseg_contract": "{this is not json"})
    (f / "engine_other_gpu.engine").write_bytes(bytes(range(256)) * 4)
    sys.path.insert(0, str(HERE.parents[1]))
    from embedseg_deploy.contract import Contract

    facts = {
        "tensorrt_version": "10.13.0.35", "gpu_name": "Tesla T4", "compute_capability": "7.5",
        "precision": "fp32",
        "profiles": [{"min": [1, 1, 8, 8], "opt": [1, 1, 256, 256], "max": [1, 1, 512, 512]}],
        "input": "image", "output": "raw", "version_compatible": False, "hardware_compatibility": "none",
    }  # fmt: skip
    contract = Contract(ndim=2, spacing=[1 / 1023, 1 / 1023]).to_dict()
    sidecar = {"kind": "embedseg-tensorrt-engine", "contract": contract, "engine": facts}
    (f / "engine_other_gpu.engine.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    (f / "checkpoint_garbage.pth").write_bytes(np.random.default_rng(9).bytes(512))
    folder_as_file = f / "folder_named.tif"
    folder_as_file.mkdir(exist_ok=True)
    (folder_as_file / "README").write_text("a folder whose name looks like an image file; it holds no TIFF\n")
    return folder


if __name__ == "__main__":
    out = make()
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(CASES)} cases to {out} ({total} bytes)")
