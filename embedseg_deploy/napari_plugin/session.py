"""The napari plugin's state and work, without Qt: open a model, run its network on an image once, and
cluster that output with any thresholds (milliseconds, so threshold changes feel live).

The labels are those of `embedseg-run predict` with the same model and settings: the same Predictor
prepares, tiles and runs the network, and the padded output is clustered and then cropped, as there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import ENGINE_SUFFIXES, BackendError, model_kind
from ..contract import Contract, ContractError
from ..io import InputError

MODEL_SUFFIXES = (".onnx", ".zip", *ENGINE_SUFFIXES)


class ModelError(ValueError):
    """The chosen model file cannot be used; the message names it and says why."""


def layer_problem(name: str, shape: tuple[int, ...], rgb: bool, contract: Contract) -> str | None:
    """Why an image layer of ``shape`` cannot go to this model (its dimensionality), or None."""
    spatial = len(shape) - (1 if rgb else 0)
    if spatial == contract.ndim or (contract.in_channels > 1 and spatial == contract.ndim + 1):
        return None
    size = "x".join(map(str, shape))
    return (
        f"image layer {name!r} is {spatial}D ({size}); the model segments {contract.ndim}D images: choose a "
        f"{contract.ndim}D layer or a {spatial}D model"
    )


class Cancelled(Exception):
    """The user cancelled the network run."""


def read_contract(model: str | Path) -> Contract:
    """The contract of a model file without opening a backend (cheap: the widget's thresholds)."""
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelError(
            f"{path}: the plugin runs .onnx models, TensorRT .engine files and bioimage.io .zip packages"
        )
    kind = model_kind(path)
    try:
        if kind == "package":
            from ..bioimageio import check_description, read_description

            return check_description(read_description(path)[0], str(path))[1]
        if kind == "engine":
            from ..engine_cache import read_sidecar

            return Contract.from_dict(read_sidecar(path)["contract"])
        if kind == "onnx":
            from ..engine_cache import onnx_contract

            return onnx_contract(path)
    except (ValueError, RuntimeError) as exc:  # EngineError, PackageError, ContractError
        raise ModelError(str(exc)) from None
    raise ModelError(
        f"{path}: the plugin runs .onnx models, TensorRT .engine files and bioimage.io .zip packages"
    )


@dataclass
class NetworkOutput:
    """The padded raw output of one network run, where the image lies in it, and what made it."""

    raw: np.ndarray
    keep: tuple[slice, ...]
    contract: Contract
    model: str
    key: tuple


class Session:
    """One model at a time (reopened only when the model or its run settings change), the last output."""

    def __init__(self) -> None:
        self._predictor: Any = None
        self._predictor_key: tuple | None = None
        self.output: NetworkOutput | None = None

    def predictor(self, model: str, backend: str = "auto", tile: int | None = None, tta: bool = False):
        from ..predict import Predictor

        key = (str(model), backend, tile, tta)
        if key != self._predictor_key:
            read_contract(model)  # a clear error for files that are not models
            try:
                self._predictor = Predictor(model, backend=backend, tile=tile, tta=tta)
            except (BackendError, ContractError, ValueError) as exc:
                raise ModelError(str(exc)) from None
            self._predictor_key = key
        return self._predictor

    def run_network(
        self,
        image: np.ndarray,
        model: str,
        backend: str = "auto",
        tile: int | None = None,
        tta: bool = False,
        rgb: bool = False,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> NetworkOutput:
        """The network's output for ``image`` (a layer's data; ``rgb``: channels last). Safe to call in a
        worker thread; ``cancel`` stops it after the current tile (:class:`Cancelled`)."""
        predictor = self.predictor(model, backend, tile, tta)

        def step(done: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            if progress is not None:
                progress(done, total)

        predictor.progress = step
        try:
            x = predictor.prepare(np.asarray(image), channel_axis=-1 if rgb else None)
            step(0, 1)
            raw = predictor.predict_raw(x)
        except InputError as exc:
            raise ModelError(str(exc)) from None
        finally:
            predictor.progress = None
        key = (str(model), backend, tile, tta)
        return NetworkOutput(raw, predictor.crop(x.shape[1:]), predictor.contract, str(model), key)

    @staticmethod
    def labels(
        output: NetworkOutput, thresholds: Mapping[str, float] | None = None
    ) -> tuple[np.ndarray, int]:
        """Instance labels of ``output`` with the contract's thresholds, ``thresholds`` overriding; n."""
        from ..cluster import cluster, consecutive_labels

        c = output.contract
        settings = {**vars(c.thresholds), **{k: v for k, v in (thresholds or {}).items() if v is not None}}
        settings["min_object_size"] = int(settings["min_object_size"])
        labels = np.asarray(cluster(output.raw, c.spacing, **settings))[output.keep]
        return consecutive_labels(labels)

    @staticmethod
    def seediness(output: NetworkOutput) -> np.ndarray:
        from ..cluster import seediness_map

        return seediness_map(output.raw[-1][output.keep])
