"""``embedseg-export bioimageio``: an EmbedSeg ONNX model (or checkpoint) as a bioimage.io model package.

The package follows the bioimage.io model spec 0.5 (:data:`FORMAT_VERSION`): ONNX weights, input and
output tensors with their axes and pixel sizes, the contract's normalisation as preprocessing (percentile
-> ``scale_range``, absolute -> ``scale_linear``, mean-std -> ``zero_mean_unit_variance``), test tensors
(the raw test image and the network's output for it), a cover (the test image beside its labels),
documentation, the EmbedSeg citations, and the model contract in ``config.embedseg`` so that the
clustering settings travel with the package. The network's output is the raw EmbedSeg output (offsets,
sigma and seed logits): turning it into instance labels is the clustering that embedseg-deploy runs
(``embedseg-run predict model.zip``, the napari plugin).

Everything is written to a temporary zip beside the output and validated before it is renamed into
place: with ``bioimageio.spec`` installed the description is validated, with ``bioimageio.core`` the
model test (its own ONNX run on the test tensors) must pass too. Neither is needed to write a package.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedseg_deploy.bioimageio import CONFIG_KEY
from embedseg_deploy.contract import Contract
from embedseg_deploy.engine_cache import onnx_contract, read_onnx_header

FORMAT_VERSION = "0.5.4"
SPATIAL_IDS = {2: ["y", "x"], 3: ["z", "y", "x"]}
INPUT_ID, OUTPUT_ID = "image", "embedding"
CITATIONS = [
    {
        "text": "Lalit, M., Tomancak, P., Jug, F. Embedding-based Instance Segmentation in Microscopy. "
        "Proceedings of the Fourth Conference on Medical Imaging with Deep Learning (MIDL), PMLR 143 (2021)",
        "url": "https://proceedings.mlr.press/v143/lalit21a.html",
    },
    {
        "text": "Lalit, M., Tomancak, P., Jug, F. EmbedSeg: Embedding-based Instance Segmentation for "
        "Biomedical Microscopy Data. Medical Image Analysis 81, 102523 (2022)",
        "doi": "10.1016/j.media.2022.102523",
    },
]


class BioimageioError(ValueError):
    """The package cannot be made, or fails its validation; names the file and the problem."""


@dataclass
class Package:
    path: Path
    description: dict[str, Any]
    n_objects: int
    validation: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def preprocessing(contract: Contract) -> list[dict[str, Any]]:
    """The contract's normalisation as bioimage.io 0.5 preprocessing steps (after a cast to float32)."""
    norm = contract.normalization
    axes = SPATIAL_IDS[contract.ndim] + ([] if norm.per_channel else ["channel"])
    steps: list[dict[str, Any]] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if norm.kind == "percentile":
        kwargs = {"axes": axes, "min_percentile": norm.pmin, "max_percentile": norm.pmax, "eps": 1e-6}
        steps.append({"id": "scale_range", "kwargs": kwargs})
        if norm.clip:
            steps.append({"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}})
    elif norm.kind == "absolute":
        steps.append({"id": "scale_linear", "kwargs": {"gain": 1.0 / float(norm.divisor), "offset": 0.0}})
    elif norm.kind == "mean-std":
        steps.append({"id": "zero_mean_unit_variance", "kwargs": {"axes": axes, "eps": 1e-6}})
    return steps


def _space_axes(contract: Contract, reference: str | None = None) -> list[dict[str, Any]]:
    pixel = contract.pixel_size or [1.0] * contract.ndim
    axes = []
    for axis, scale in zip(SPATIAL_IDS[contract.ndim], pixel, strict=True):
        size: Any = (
            {"min": 2 * contract.tile_multiple, "step": contract.tile_multiple}
            if reference is None
            else {"tensor_id": reference, "axis_id": axis}
        )
        axes.append({"type": "space", "id": axis, "size": size, "scale": float(scale), "unit": "micrometer"})
    return axes


def describe(
    contract: Contract,
    onnx_name: str,
    onnx_sha256: str,
    opset: int,
    files: dict[str, str],
    name: str,
    description: str,
    authors: list[str],
    license: str,
    tags: list[str],
) -> dict[str, Any]:
    """The ``rdf.yaml`` document (a plain dict) of a package whose other files are ``files`` (role ->
    file name; their sha256 under role + '_sha256')."""
    ndim = contract.ndim
    batch = {"type": "batch"}
    in_channels = {"type": "channel", "channel_names": [f"channel{i}" for i in range(contract.in_channels)]}
    return {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": name,
        "description": description,
        "authors": [{"name": a} for a in authors],
        "cite": CITATIONS,
        "license": license,
        "tags": ["embedseg", "instance-segmentation", f"{ndim}d", "onnx", *tags],
        "documentation": files["documentation"],
        "covers": [files["cover"]],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "inputs": [
            {
                "id": INPUT_ID,
                "description": "raw image; normalised by the preprocessing (the model contract's rule)",
                "axes": [batch, in_channels, *_space_axes(contract)],
                "test_tensor": {"source": files["test_input"], "sha256": files["test_input_sha256"]},
                "sample_tensor": {"source": files["sample_input"], "sha256": files["sample_input_sha256"]},
                "data": {"type": "float32"},
                "preprocessing": preprocessing(contract),
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_ID,
                "description": "EmbedSeg raw output (offsets, sigma and seed logits); cluster it with the "
                "settings in config.embedseg",
                "axes": [
                    batch,
                    {"type": "channel", "channel_names": contract.channels},
                    *_space_axes(contract, INPUT_ID),
                ],
                "test_tensor": {"source": files["test_output"], "sha256": files["test_output_sha256"]},
                "sample_tensor": {"source": files["sample_output"], "sha256": files["sample_output_sha256"]},
                "data": {"type": "float32"},
            }
        ],
        "weights": {"onnx": {"source": onnx_name, "sha256": onnx_sha256, "opset_version": int(opset)}},
        "config": {
            CONFIG_KEY: {
                "contract": contract.to_dict(),
                "usage": "pip install embedseg-deploy; embedseg-run predict THIS.zip IMAGES -o OUT",
            }
        },
    }


def documentation(contract: Contract, name: str, n_objects: int) -> str:
    t, norm = contract.thresholds, contract.normalization
    return f"""# {name}

An [EmbedSeg](https://github.com/juglab/EmbedSeg) instance segmentation model ({contract.ndim}D,
{contract.in_channels} input channel(s)), packaged by embedseg-deploy.

The network predicts, for every pixel, an offset to its object's centre, a clustering bandwidth (sigma)
and a seediness. Its output (`{OUTPUT_ID}`, channels {", ".join(contract.channels)}) is not a label image:
EmbedSeg's greedy clustering turns it into instance labels. With embedseg-deploy (no PyTorch needed):

    pip install "embedseg-deploy[cpu]"
    embedseg-run predict this-package.zip images/ -o labels/

or in napari with the embedseg-deploy plugin. The clustering settings travel in `config.embedseg` of
`rdf.yaml`: seed threshold {t.seed_thresh}, foreground threshold {t.fg_thresh}, smallest object
{t.min_object_size} pixels; embedding spacing {contract.spacing}; pixel size {contract.pixel_size} µm.

Input normalisation: {norm.kind} ({norm.pmin}-{norm.pmax} percentiles for "percentile"), as the
preprocessing in `rdf.yaml` says. Image sizes are multiples of
{contract.tile_multiple} per axis (embedseg-deploy pads and tiles any size).

The test image gives {n_objects} objects (the cover shows them).

## Validation

Before it was packaged, the ONNX model was verified by embedseg-export against the PyTorch checkpoint it
came from (raw outputs in the clustering's units, then labels). The package's test tensors are the raw
test image and the network's output for it (ONNX Runtime, CPU); `bioimageio.core`'s model test reproduces
that output from the package alone. The test image and its labels are the sample tensors.

## Citation

{CITATIONS[0]["text"]}. {CITATIONS[0]["url"]}

{CITATIONS[1]["text"]}. https://doi.org/{CITATIONS[1]["doi"]}
"""


def test_image(contract: Contract, image: np.ndarray | None) -> np.ndarray:
    """The raw test input ``(C, *spatial)`` float32: the given image (channels first, cropped to the tile
    multiple per axis) or a synthetic one of nuclei-like objects."""
    from embedseg_deploy.io import to_channels_first
    from embedseg_deploy.synthetic import make_image

    if image is None:
        shape, n = ((256, 256), 40) if contract.ndim == 2 else ((32, 128, 128), 20)
        image, _ = make_image(shape, n, np.random.default_rng(0))
        image = np.repeat(image[None], contract.in_channels, axis=0)
    x = to_channels_first(np.asarray(image), contract.ndim, contract.in_channels)
    m = contract.tile_multiple
    if any(s < 2 * m for s in x.shape[1:]):
        raise BioimageioError(f"test image {x.shape[1:]} is smaller than {2 * m} pixels along an axis")
    crop = tuple(slice(0, s // m * m) for s in x.shape[1:])
    return np.ascontiguousarray(x[(slice(None), *crop)], dtype=np.float32)


def cover(contract: Contract, x: np.ndarray, labels: np.ndarray) -> bytes:
    """PNG: the test image (middle plane in 3D) beside its labels (2:1)."""
    from embedseg_deploy.png import encode_png, overlay

    plane = x[0] if contract.ndim == 2 else x[0, x.shape[1] // 2]
    lab = labels if contract.ndim == 2 else labels[labels.shape[0] // 2]
    grey = overlay(plane, np.zeros_like(lab))
    return encode_png(np.concatenate([grey, overlay(plane, lab)], axis=1))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _tif(array: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def export_bioimageio(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    license: str = "CC-BY-4.0",
    tags: list[str] | None = None,
    image: np.ndarray | None = None,
    force: bool = False,
    validate: bool = True,
) -> Package:
    """Write a bioimage.io package for the EmbedSeg ONNX model ``model`` to ``out`` (a .zip)."""
    from embedseg_deploy.backends import create_backend
    from embedseg_deploy.cluster import cluster_from_contract, consecutive_labels
    from embedseg_deploy.normalize import normalize

    t0 = time.perf_counter()
    model, out = Path(model), Path(out)
    if out.suffix.lower() != ".zip":
        raise BioimageioError(f"{out}: a bioimage.io package is a .zip file")
    if out.exists() and not force:
        raise BioimageioError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise BioimageioError(f"{out}: folder {out.parent} does not exist")
    contract = onnx_contract(model)
    opset = read_onnx_header(model)["opset"].get("ai.onnx", 17)
    backend = create_backend(model, "onnx-cpu")
    x = test_image(contract, image)
    raw = backend.run(normalize(x, contract.normalization, channel_axis=0)[None])
    labels, n_objects = consecutive_labels(cluster_from_contract(raw[0], contract))
    name = name or f"EmbedSeg {contract.ndim}D {model.stem}"
    files = {
        "documentation": "README.md",
        "cover": "cover.png",
        "test_input": "test_input.npy",
        "test_output": "test_output.npy",
        "sample_input": "sample_input.tif",
        "sample_output": "sample_output.tif",
    }
    payload = {
        files["documentation"]: documentation(contract, name, n_objects).encode(),
        files["cover"]: cover(contract, x, labels),
        files["test_input"]: _npy(x[None]),
        files["test_output"]: _npy(raw),
        files["sample_input"]: _tif(x[None]),
        files["sample_output"]: _tif(raw),
    }
    for role in ("test_input", "test_output", "sample_input", "sample_output"):
        files[f"{role}_sha256"] = hashlib.sha256(payload[files[role]]).hexdigest()
    onnx_bytes = model.read_bytes()
    doc = describe(
        contract,
        model.name,
        hashlib.sha256(onnx_bytes).hexdigest(),
        opset,
        files,
        name,
        description
        or f"EmbedSeg instance segmentation of {contract.ndim}D microscopy images (embedseg-deploy)",
        authors or ["embedseg-deploy"],
        license,
        tags or [],
    )
    import yaml

    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".zip", dir=out.parent)[1])
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("rdf.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
            zf.writestr(model.name, onnx_bytes)
            for file_name, data in payload.items():
                zf.writestr(file_name, data)
        checks = validate_package(tmp) if validate else {}
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Package(out, doc, n_objects, checks, time.perf_counter() - t0)


def validate_package(path: Path) -> dict[str, str]:
    """``bioimageio.spec`` validation and ``bioimageio.core``'s model test, each where installed; a
    BioimageioError with their summary when either fails."""
    import importlib.util

    done: dict[str, str] = {}
    if importlib.util.find_spec("bioimageio") is None or importlib.util.find_spec("bioimageio.spec") is None:
        return {"bioimageio.spec": "not installed: description not validated"}
    from bioimageio.spec import load_description

    with tempfile.TemporaryDirectory() as folder:
        zip_copy = Path(folder) / "package.zip"  # the validators cache by name; a fresh path each time
        shutil.copyfile(path, zip_copy)
        descr = load_description(zip_copy, perform_io_checks=True)
        summary = descr.validation_summary
        if summary.status == "failed" or type(descr).__name__ == "InvalidDescr":
            raise BioimageioError(f"{path}: bioimage.io validation failed:\n{_summary_text(summary)}")
        done["bioimageio.spec"] = f"passed (format {descr.format_version})"
        if importlib.util.find_spec("bioimageio.core") is None:
            done["bioimageio.core"] = "not installed: model test not run"
            return done
        from bioimageio.core import test_model

        tested = test_model(zip_copy)
        if tested.status != "passed":
            raise BioimageioError(f"{path}: bioimage.io model test failed:\n{_summary_text(tested)}")
        done["bioimageio.core"] = "model test passed"
    return done


def _summary_text(summary: Any) -> str:
    """A validation summary as text (its markdown table where the library offers one)."""
    fmt = getattr(summary, "format_md", None) or getattr(summary, "format", None)
    return str(fmt() if callable(fmt) else summary)[-4000:]
