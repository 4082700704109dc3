"""The napari dock widget: choose a model and an image layer, run the network in a background thread with
a progress bar and a cancel button, get a Labels layer with the image's scale; moving a threshold
re-clusters the cached network output at once, without running the network again.

Built from magicgui widgets over :class:`.session.Session`; it needs only the viewer's ``layers``,
``add_labels`` and ``add_image``, so tests drive it with a ``napari.components.ViewerModel``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QObject, Signal
from superqt.utils import create_worker

from ..demo import DEFAULT_MODEL
from .session import Cancelled, ModelError, NetworkOutput, Session, layer_problem, read_contract

BACKEND_CHOICES = ["auto", "onnx-cpu", "onnx-cuda", "onnx-trt", "tensorrt"]


def _warm_up() -> None:
    from ..cluster import warm_up

    warm_up()


class _Bridge(QObject):
    """Carries progress from the worker thread to the widget (a queued signal)."""

    progress = Signal(int, int)


class SegmentWidget(Container):
    """EmbedSeg instance segmentation of an image layer."""

    def __init__(self, napari_viewer: Any):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.session = Session()
        self.output: NetworkOutput | None = None
        self.output_layer: Any = None  # the image layer the cached output belongs to
        self.worker: Any = None
        self._cancel = threading.Event()
        self._run_id = 0
        self.network_runs = 0

        self.model = FileEdit(label="model", value=str(DEFAULT_MODEL), filter="*.onnx *.engine *.zip")
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.backend = ComboBox(label="backend", choices=BACKEND_CHOICES, value="auto")
        self.tile = SpinBox(label="tile (0: whole)", value=0, min=0, max=16384, step=8)
        self.tta = CheckBox(label="test-time augmentation", value=False)
        self.seed_thresh = FloatSlider(label="seed threshold", min=0.0, max=1.0, step=0.01, value=0.9)
        self.fg_thresh = FloatSlider(label="foreground threshold", min=0.0, max=1.0, step=0.01, value=0.5)
        self.min_object_size = SpinBox(label="min object size (px)", value=36, min=0, max=10**7)
        self.show_seeds = CheckBox(label="seediness layer", value=False)
        self.run_button = PushButton(text="Segment")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self.status = Label(label="", value="")
        self.extend(
            [
                self.model,
                self.image,
                self.backend,
                self.tile,
                self.tta,
                self.seed_thresh,
                self.fg_thresh,
                self.min_object_size,
                self.show_seeds,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
            ]
        )
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._on_progress)
        self.model.changed.connect(self._on_model)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        for widget in (self.seed_thresh, self.fg_thresh, self.min_object_size):
            widget.changed.connect(self._recluster)
        self.show_seeds.changed.connect(self._recluster)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(lambda *_: self.image.reset_choices())
        self._on_model()
        threading.Thread(target=_warm_up, daemon=True).start()  # numba's clustering, before it is needed

    # ------------------------------------------------------------------------------------------ state
    def _image_layers(self, *_: Any) -> list[str]:
        return [layer.name for layer in self.viewer.layers if type(layer).__name__ == "Image"]

    def thresholds(self) -> dict[str, float]:
        return {
            "seed_thresh": float(self.seed_thresh.value),
            "fg_thresh": float(self.fg_thresh.value),
            "min_object_size": int(self.min_object_size.value),
        }

    def _say(self, text: str) -> None:
        self.status.value = text

    def _on_model(self, *_: Any) -> None:
        """A new model: its contract's thresholds, or the reason it cannot be used (never a crash)."""
        try:
            contract = read_contract(self.model.value)
        except ModelError as exc:
            self._say(f"cannot use this model: {exc}")
            self.run_button.enabled = False
            return
        t = contract.thresholds
        self.output = self.output_layer = None  # the cached output belongs to the previous model
        with contextlib.ExitStack() as quiet:
            for widget in (self.seed_thresh, self.fg_thresh, self.min_object_size):
                quiet.enter_context(widget.changed.blocked())
            self.seed_thresh.value = t.seed_thresh
            self.fg_thresh.value = t.fg_thresh
            self.min_object_size.value = t.min_object_size
        self.run_button.enabled = self.worker is None
        self._say(f"{contract.ndim}D model, {contract.in_channels} channel(s); choose an image and Segment")

    # ------------------------------------------------------------------------------------------- run
    def run(self, *_: Any) -> None:
        """Start the network run in a worker thread; returns at once."""
        if self.worker is not None:
            return
        name = self.image.value
        layer = next((lay for lay in self.viewer.layers if lay.name == name), None)
        if layer is None:
            self._say("no image layer chosen")
            return
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        model, backend = str(self.model.value), str(self.backend.value)
        tile, tta = int(self.tile.value) or None, bool(self.tta.value)
        rgb = bool(getattr(layer, "rgb", False))
        try:
            problem = layer_problem(name, tuple(data.shape), rgb, read_contract(model))
        except ModelError as exc:
            problem = f"cannot use this model: {exc}"
        if problem:
            self._say(problem)
            return
        self._run_id += 1
        run_id = self._run_id
        self._cancel.clear()
        bridge = self._bridge

        def work() -> NetworkOutput:
            return self.session.run_network(
                data, model, backend, tile, tta, rgb, lambda d, t: bridge.progress.emit(d, t), self._cancel
            )

        self.worker = create_worker(work, _start_thread=False, _ignore_errors=True)  # errors: _failed
        self.worker.returned.connect(lambda out: self._finished(run_id, layer, model, out))
        self.worker.errored.connect(lambda exc: self._failed(run_id, exc))
        self.worker.finished.connect(self._idle)
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value, self.progress.max = 0, 1
        self._say(f"running the network on {name} ...")
        self._t0 = time.perf_counter()
        self.network_runs += 1
        self.worker.start()

    def cancel(self, *_: Any) -> None:
        self._cancel.set()
        self._say("cancelling after the current tile ...")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = min(done, self.progress.max)

    def _idle(self) -> None:
        self.worker = None
        self.cancel_button.enabled = False
        self.run_button.enabled = True

    def _failed(self, run_id: int, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._say("cancelled")
        else:
            self._say(f"failed: {exc}")

    def _finished(self, run_id: int, layer: Any, model: str, output: NetworkOutput) -> None:
        if run_id != self._run_id:
            return
        if str(self.model.value) != model:
            self._say(
                f"the model changed during the run: {Path(model).name}'s result discarded; Segment again"
            )
            return
        self.output, self.output_layer = output, layer
        seconds = time.perf_counter() - self._t0
        self._recluster(network_seconds=seconds)

    # ---------------------------------------------------------------------------------------- labels
    def _recluster(self, *_: Any, network_seconds: float | None = None) -> None:
        """Labels of the cached network output with the current thresholds (no network run)."""
        if self.output is None or self.output_layer is None:
            return
        t0 = time.perf_counter()
        labels, n = self.session.labels(self.output, self.thresholds())
        ms = 1e3 * (time.perf_counter() - t0)
        layer = self.output_layer
        meta = {"embedseg": {"model": self.output.model, **self.thresholds()}}
        self._show(f"{layer.name} labels", labels, "labels", layer, meta)
        if self.show_seeds.value:
            self._show(f"{layer.name} seediness", self.session.seediness(self.output), "image", layer, {})
        network = f"network {network_seconds:.1f} s, " if network_seconds is not None else ""
        self._say(f"{n} objects ({network}clustering {ms:.0f} ms)")

    def _show(self, name: str, data: np.ndarray, kind: str, like: Any, metadata: dict) -> None:
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
            self.viewer.layers[name].metadata.update(metadata)
            return
        place = {"scale": like.scale, "translate": like.translate}
        if kind == "labels":
            self.viewer.add_labels(data, name=name, metadata=metadata, **place)
        else:
            self.viewer.add_image(data, name=name, colormap="magma", blending="additive", **place)
