"""bioimage.io model packages: export (validated by bioimageio.spec, tested by bioimageio.core, offline),
`embedseg-run predict model.zip` equal to the ONNX model, and clear errors for packages we cannot run."""

from __future__ import annotations

import importlib.util
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from embedseg_deploy.backends import BackendError, create_backend
from embedseg_deploy.bioimageio import extract_onnx
from embedseg_deploy.cli import main as run_main
from embedseg_deploy.engine_cache import onnx_contract
from embedseg_deploy.io import write_tiff_atomic
from embedseg_deploy.predict import Predictor
from embedseg_deploy.synthetic import make_image
from embedseg_exporters.bioimageio import BioimageioError, export_bioimageio
from embedseg_exporters.cli import main as export_main

from .conftest import REPO, upstream_case

DEMO = REPO / "embedseg_deploy" / "models" / "demo2d.onnx"
HAVE_CORE = importlib.util.find_spec("bioimageio") is not None and importlib.util.find_spec("bioimageio.core")


@pytest.fixture(autouse=True)
def package_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDSEG_PACKAGE_CACHE", str(tmp_path / "package-cache"))


@pytest.fixture(scope="module")
def demo_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bioimageio") / "demo.zip"
    package = export_bioimageio(DEMO, out, authors=["A. Tester"])
    if HAVE_CORE:
        assert package.validation["bioimageio.spec"].startswith("passed")
        assert package.validation["bioimageio.core"] == "model test passed"
    return out


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the package ``src`` with its rdf.yaml passed through ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "rdf.yaml":
                doc = yaml.safe_load(data)
                change(doc)
                data = yaml.safe_dump(doc).encode()
            zout.writestr(item, data)
    return dst


@pytest.mark.skipif(not HAVE_CORE, reason="bioimageio.core is not installed (the bioimageio extra)")
def test_demo_package_validates_and_passes_the_core_model_test(demo_package):
    """Re-checked here apart from the exporter: bioimageio.spec loads it as a valid 0.5 model and
    bioimageio.core's model test (its own ONNX run on the test tensors, preprocessing included) passes."""
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    descr = load_description(demo_package, perform_io_checks=True)
    assert type(descr).__name__ == "ModelDescr" and descr.validation_summary.status != "failed"
    assert str(descr.format_version).startswith("0.5")
    assert test_model(demo_package).status == "passed"


def test_package_carries_the_contract_axes_and_normalisation(demo_package):
    with zipfile.ZipFile(demo_package) as zf:
        doc = yaml.safe_load(zf.read("rdf.yaml"))
        names = set(zf.namelist())
        test_in = np.load(io.BytesIO(zf.read("test_input.npy")))
    contract = onnx_contract(DEMO)
    assert doc["format_version"].startswith("0.5.") and doc["type"] == "model"
    assert {"rdf.yaml", "demo2d.onnx", "README.md", "cover.png", "test_input.npy", "test_output.npy"} <= names
    assert doc["config"]["embedseg"]["contract"] == contract.to_dict()
    (tensor,) = doc["inputs"]
    steps = {s["id"]: s.get("kwargs", {}) for s in tensor["preprocessing"]}
    assert steps["scale_range"]["min_percentile"] == contract.normalization.pmin == 1.0
    assert steps["scale_range"]["max_percentile"] == contract.normalization.pmax == 99.8
    assert steps["scale_range"]["axes"] == ["y", "x"]  # per channel, over the image
    space = [a for a in tensor["axes"] if a["type"] == "space"]
    assert [a["scale"] for a in space] == contract.pixel_size and space[0]["size"] == {"min": 16, "step": 8}
    assert doc["outputs"][0]["axes"][1]["channel_names"] == contract.channels
    assert any(c.get("doi") == "10.1016/j.media.2022.102523" for c in doc["cite"])
    assert doc["authors"] == [{"name": "A. Tester"}] and doc["weights"]["onnx"]["opset_version"] >= 17
    assert test_in.shape == (1, 1, 256, 256) and test_in.dtype == np.float32
    with zipfile.ZipFile(demo_package) as zf:
        assert zf.read("cover.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_on_a_package_equals_predict_on_its_onnx_model(demo_package, tmp_path):
    """Same labels through the Python API and the CLI, on a size that is not a multiple of 8."""
    image, _ = make_image((203, 250), 30, np.random.default_rng(4))
    expected = Predictor(DEMO, "onnx-cpu").predict(image)
    packaged = Predictor(demo_package, "onnx-cpu")
    assert packaged.backend.info["package"] == str(demo_package)
    np.testing.assert_array_equal(packaged.predict(image), expected)
    assert expected.max() >= 10
    path = write_tiff_atomic(tmp_path / "cells.tif", image)
    result = CliRunner().invoke(
        run_main, ["predict", str(demo_package), str(path), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "cells.tif"), expected)
    # the package is extracted once: a second open reuses the file (same path, same model hash)
    assert extract_onnx(demo_package) == extract_onnx(demo_package)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("broken zip", "not a readable zip file"),
        ("no description", "without rdf.yaml or bioimageio.yaml"),
        ("spec 0.4", "bioimage.io spec version 0.4.10; embedseg-run reads model packages of spec 0.5"),
        ("pytorch weights only", "has no ONNX weights (it has: pytorch_state_dict)"),
        ("no contract", "not an EmbedSeg model package: its config has no 'embedseg.contract'"),
        ("bad yaml", "not valid YAML"),
    ],
)
def test_packages_we_cannot_run_are_refused_with_the_reason(case, message, demo_package, tmp_path):
    bad = tmp_path / "bad.zip"
    if case == "broken zip":
        bad.write_bytes(demo_package.read_bytes()[: demo_package.stat().st_size // 2])
    elif case == "no description":
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("model.onnx", DEMO.read_bytes())
    elif case == "bad yaml":
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("rdf.yaml", "format_version: [0.5\n")
    else:
        change = {
            "spec 0.4": lambda d: d.update(format_version="0.4.10"),
            "pytorch weights only": lambda d: d.update(
                weights={"pytorch_state_dict": {"source": "weights.pt", "sha256": "0" * 64}}
            ),
            "no contract": lambda d: d["config"].pop("embedseg"),
        }[case]
        _rewrite(demo_package, bad, change)
    with pytest.raises(BackendError, match=re.escape(message)) as info:
        create_backend(bad, "onnx-cpu")
    assert str(bad) in str(info.value)
    image = write_tiff_atomic(tmp_path / "img.tif", np.zeros((32, 32), np.uint16))
    result = CliRunner().invoke(run_main, ["predict", str(bad), str(image), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output  # the CLI's exit status for a bad model


def test_export_refuses_overwrite_and_writes_nothing_that_fails_validation(
    demo_package, tmp_path, monkeypatch
):
    with pytest.raises(BioimageioError, match="exists; pass --force"):
        export_bioimageio(DEMO, demo_package)
    with pytest.raises(BioimageioError, match=r"is a \.zip file"):
        export_bioimageio(DEMO, tmp_path / "model.tar")
    if not HAVE_CORE:
        pytest.skip("bioimageio.core is not installed: validation failures cannot be produced")
    import embedseg_exporters.bioimageio as bio

    real = bio.describe

    def too_long_name(*args, **kwargs):
        doc = real(*args, **kwargs)
        doc["outputs"][0]["description"] = "x" * 500  # the spec allows 128 characters
        return doc

    monkeypatch.setattr(bio, "describe", too_long_name)
    with pytest.raises(BioimageioError, match="validation failed") as info:
        export_bioimageio(DEMO, tmp_path / "bad.zip")
    assert "outputs.0.description" in str(info.value)
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".*"))  # no package, no temp file


def test_export_cli_from_a_checkpoint_and_a_test_image(tmp_path):
    """From the upstream 3D fixture checkpoint (exported, verified, packaged) with its own test image."""
    import tifffile

    case = upstream_case(3)
    image = tmp_path / "stack.tif"
    tifffile.imwrite(image, tifffile.imread(case / "image.tif")[:, :90, :100])
    out = tmp_path / "nuclei3d.zip"
    result = CliRunner().invoke(
        export_main,
        [
            "bioimageio",
            str(case / "checkpoint.pth"),
            "-o",
            str(out),
            "--test-image",
            str(image),
            "--name",
            "nuclei 3D",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file()
    with zipfile.ZipFile(out) as zf:
        doc = yaml.safe_load(zf.read("rdf.yaml"))
        test_in = np.load(io.BytesIO(zf.read("test_input.npy")))
    assert doc["name"] == "nuclei 3D" and test_in.shape == (1, 1, 24, 88, 88)  # 30x90x90 cut to 8s
    assert [a["id"] for a in doc["inputs"][0]["axes"] if a["type"] == "space"] == ["z", "y", "x"]
    if HAVE_CORE:
        assert "model test passed" in result.output
    result = CliRunner().invoke(export_main, ["bioimageio", str(image), "-o", str(tmp_path / "x.zip")])
    assert result.exit_code == 1 and "a TIFF image, not a model" in result.output
