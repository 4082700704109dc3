"""The one small interface every inference backend implements.

A backend is created from a model file and a device, knows the model's contract, and turns a batch of
normalised tiles ``(N, C, *spatial)`` float32 into the network's raw output ``(N, 2*ndim+1, *spatial)``
float32 (pre-tanh/sigmoid). It states which shapes it accepts (:class:`ShapeSpec`) so the tiler can choose
tiles that fit, and it never falls back to another device silently: a backend that cannot run where it
was asked raises :class:`BackendError`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import Contract


class BackendError(RuntimeError):
    """A backend cannot be created or cannot run (missing library, no GPU, not a model, bad shape)."""


@dataclass(frozen=True)
class ShapeSpec:
    """The input shapes a backend accepts: spatial sizes (array order) and batch size."""

    ndim: int
    multiple: int = 8
    min_spatial: tuple[int, ...] | None = None
    max_spatial: tuple[int, ...] | None = None
    max_batch: int | None = None

    def problem(self, spatial: Sequence[int], batch: int = 1) -> str | None:
        """Why ``spatial`` (and ``batch``) cannot run, or None when they can."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != self.ndim:
            return f"expected {self.ndim} spatial dims, got {len(spatial)} ({spatial})"
        if any(s % self.multiple for s in spatial):
            return f"spatial size {spatial} must be a multiple of {self.multiple}"
        if self.min_spatial and any(s < m for s, m in zip(spatial, self.min_spatial, strict=True)):
            return f"spatial size {spatial} is below the smallest supported {self.min_spatial}"
        if self.max_spatial and any(s > m for s, m in zip(spatial, self.max_spatial, strict=True)):
            return f"spatial size {spatial} exceeds the largest supported {self.max_spatial}"
        if self.max_batch is not None and batch > self.max_batch:
            return f"batch {batch} exceeds the largest supported batch {self.max_batch}"
        return None

    def fit_tile(self, tile: Sequence[int]) -> list[int]:
        """``tile`` clamped into [min, max] and rounded to the multiple (down from max, up from min)."""
        m = self.multiple
        out = []
        for i, t in enumerate(tile):
            t = max(m, -(-int(t) // m) * m)
            if self.max_spatial:
                t = min(t, self.max_spatial[i] // m * m)
            if self.min_spatial:
                t = max(t, -(-self.min_spatial[i] // m) * m)
            out.append(t)
        return out


@dataclass
class Backend(ABC):
    """Base class: subclasses set the fields in ``__init__`` and implement :meth:`_run`."""

    name: str
    device: str
    precision: str
    contract: Contract
    shapes: ShapeSpec
    model_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    #: True when :meth:`submit` returns before the network has run (a GPU backend with its own stream):
    #: the tiler then prepares the next tile while this one runs.
    asynchronous = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw network output for ``batch`` (N, C, *spatial); shapes are checked first."""
        return self.submit(batch)()

    def submit(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Start the network on ``batch``; the returned function waits for and returns its output."""
        batch = self._checked(batch)
        expected = (batch.shape[0], self.contract.out_channels, *batch.shape[2:])
        wait = self._submit(batch)

        def result() -> np.ndarray:
            out = wait()
            if tuple(out.shape) != expected:
                raise BackendError(
                    f"{self.name}: model returned shape {tuple(out.shape)}, expected {expected}"
                )
            return np.asarray(out, dtype=np.float32)

        return result

    def _submit(self, batch: np.ndarray) -> Callable[[], np.ndarray]:
        """Run now (subclasses with a stream override this to return before the network has run)."""
        out = self._run(batch)
        return lambda: out

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        c = self.contract
        if batch.ndim != c.ndim + 2:
            raise BackendError(
                f"{self.name}: batch must be (N, C, *spatial) with {c.ndim} spatial dims, got {batch.shape}"
            )
        if batch.shape[1] != c.in_channels:
            raise BackendError(
                f"{self.name}: model takes {c.in_channels} channel(s), batch has {batch.shape[1]}"
            )
        problem = self.shapes.problem(batch.shape[2:], batch.shape[0])
        if problem:
            raise BackendError(f"{self.name}: {problem}")
        return batch

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray: ...

    @property
    def kind(self) -> str:
        """'gpu' or 'cpu': which of the contract's recommended tiles applies."""
        return "cpu" if self.device == "cpu" else "gpu"

    def describe(self) -> dict[str, Any]:
        """What ran, for run summaries and `embedseg-run info`."""
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "model": str(self.model_path) if self.model_path else None,
            "tile_multiple": self.shapes.multiple,
            "min_spatial": list(self.shapes.min_spatial) if self.shapes.min_spatial else None,
            "max_spatial": list(self.shapes.max_spatial) if self.shapes.max_spatial else None,
            "max_batch": self.shapes.max_batch,
            **self.info,
        }

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release sessions and device memory (optional)."""
