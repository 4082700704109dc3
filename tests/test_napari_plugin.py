"""The napari plugin, headless (Qt offscreen, a ViewerModel: no OpenGL needed): it segments like
`embedseg-run predict`, re-clusters on a threshold change without the network, keeps the event loop free,
and reports bad models, wrong layers, cancels and model changes in the widget instead of crashing."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
napari = pytest.importorskip("napari", reason="napari is not installed (the napari extra)")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")

from napari.components import ViewerModel  # noqa: E402

from embedseg_deploy.backends.onnx_backend import OnnxRuntimeBackend  # noqa: E402
from embedseg_deploy.demo import DEFAULT_MODEL  # noqa: E402
from embedseg_deploy.napari_plugin.reader import get_reader  # noqa: E402
from embedseg_deploy.napari_plugin.sample import demo_cells  # noqa: E402
from embedseg_deploy.napari_plugin.widget import SegmentWidget  # noqa: E402
from embedseg_deploy.predict import Predictor  # noqa: E402

from .conftest import REPO  # noqa: E402

WAIT_MS = 60_000


@pytest.fixture
def viewer():
    v = ViewerModel()
    data, meta, _ = demo_cells()[0]
    v.add_image(data, scale=(0.5, 0.25), **meta)
    return v


@pytest.fixture
def widget(viewer, qtbot):
    w = SegmentWidget(viewer)
    qtbot.addWidget(w.native)
    return w


@pytest.fixture
def slow_network(monkeypatch):
    """Every network call takes 0.3 s more, so a run lasts long enough to act during it."""
    real = OnnxRuntimeBackend._run

    def slow(self, batch):
        time.sleep(0.3)
        return real(self, batch)

    monkeypatch.setattr(OnnxRuntimeBackend, "_run", slow)


def _segment(widget, qtbot) -> None:
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)


def test_manifest_is_valid_and_registered():
    import npe2
    from npe2.manifest.utils import import_python_name

    manifest = npe2.PluginManifest.from_file(REPO / "embedseg_deploy" / "napari_plugin" / "napari.yaml")
    assert manifest.name == "embedseg-deploy"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Segment"}
    pm = npe2.PluginManager.instance()
    pm.discover()
    installed = pm.get_manifest("embedseg-deploy")  # found through the installed package's entry point
    assert installed.contributions.sample_data[0].key == "demo-cells"
    # the commands it names import and are what they say
    for command in installed.contributions.commands:
        assert callable(import_python_name(command.python_name))


def test_widget_segments_the_sample_as_embedseg_run_does(widget, viewer, qtbot):
    assert widget.image.value == "demo cells" and str(widget.model.value) == str(DEFAULT_MODEL)
    _segment(widget, qtbot)
    labels = viewer.layers["demo cells labels"]
    expected = Predictor(DEFAULT_MODEL, "onnx-cpu").predict(viewer.layers["demo cells"].data)
    np.testing.assert_array_equal(labels.data, expected)
    assert expected.max() >= 20 and f"{expected.max()} objects" in widget.status.value
    assert tuple(labels.scale) == (0.5, 0.25)  # the image's scale
    assert widget.progress.value == widget.progress.max


def test_threshold_change_reclusters_without_running_the_network(widget, viewer, qtbot, monkeypatch):
    expected = Predictor(DEFAULT_MODEL, "onnx-cpu", thresholds={"min_object_size": 400}).predict(
        viewer.layers["demo cells"].data
    )
    _segment(widget, qtbot)
    before = viewer.layers["demo cells labels"].data.max()
    calls = []
    monkeypatch.setattr(OnnxRuntimeBackend, "_run", lambda self, b: calls.append(1))
    widget.min_object_size.value = 400  # most demo cells are smaller
    after = viewer.layers["demo cells labels"].data
    assert calls == [] and widget.network_runs == 1
    np.testing.assert_array_equal(after, expected)
    assert 0 <= after.max() < before
    widget.show_seeds.value = True
    seeds = viewer.layers["demo cells seediness"].data
    assert seeds.shape == after.shape and seeds.min() >= 0 and seeds.max() <= 1


def test_a_bad_model_file_is_reported_in_the_widget(widget, tmp_path):
    for bad, reason in (
        (tmp_path / "notes.onnx", "not a valid ONNX model"),
        (tmp_path / "missing.onnx", "model file not found"),
        (tmp_path / "image.tif", "the plugin runs .onnx models"),
    ):
        if bad.suffix:
            bad.write_text("not a model") if bad.name != "missing.onnx" else None
        widget.model.value = bad
        assert widget.status.value.startswith("cannot use this model") and reason in widget.status.value
        assert not widget.run_button.enabled
    widget.model.value = DEFAULT_MODEL
    assert widget.run_button.enabled and "2D model" in widget.status.value


def test_the_network_runs_off_the_event_loop_with_progress_and_cancel(widget, viewer, qtbot, slow_network):
    widget.tile.value = 64  # 256 x 256 in several tiles, 0.3 s each
    t0 = time.perf_counter()
    widget.run()
    assert time.perf_counter() - t0 < 0.25 and widget.worker is not None  # returned at once
    ticks = []
    qtbot.waitUntil(lambda: widget.progress.value >= 2 and ticks.append(1) is None, timeout=WAIT_MS)
    assert widget.worker is not None  # progress arrived through the event loop while the network ran
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert widget.status.value == "cancelled" and "demo cells labels" not in viewer.layers
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_a_model_change_during_a_run_discards_its_result(widget, viewer, qtbot, slow_network, tmp_path):
    other = tmp_path / "other.onnx"
    shutil.copyfile(DEFAULT_MODEL, other)
    widget.run()  # one tile: 0.3 s
    widget.model.value = other
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert "model changed during the run" in widget.status.value
    assert "demo cells labels" not in viewer.layers


def test_an_image_layer_of_the_wrong_ndim_is_reported(widget, viewer, qtbot):
    viewer.add_image(np.random.default_rng(0).random((5, 64, 64), dtype=np.float32), name="stack")
    widget.image.value = "stack"
    _segment(widget, qtbot)
    assert "image layer 'stack' is 3D (5x64x64); the model segments 2D images" in widget.status.value
    assert "stack labels" not in viewer.layers and widget.network_runs == 0


def test_reader_opens_embedseg_run_outputs_only(tmp_path):
    from click.testing import CliRunner

    from embedseg_deploy.cli import main
    from embedseg_deploy.io import write_tiff_atomic

    image = write_tiff_atomic(tmp_path / "cells.tif", demo_cells()[0][0], pixel_size=(0.5, 0.5))
    result = CliRunner().invoke(
        main, ["predict", str(DEFAULT_MODEL), str(image), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert get_reader(str(image)) is None  # an ordinary image: napari's own reader takes it
    reader = get_reader(str(tmp_path / "out" / "cells.tif"))
    ((data, meta, kind),) = reader(str(tmp_path / "out" / "cells.tif"))
    assert kind == "labels" and data.max() >= 20 and meta["scale"] == [0.5, 0.5]
    assert meta["metadata"]["embedseg"]["model_sha256"]
