"""Optional torch backend: runs a training checkpoint directly (no export step).

Imported only when ``--backend torch`` is chosen (or a ``.pth``/``.pt`` model is given), so the runtime
keeps working where torch is absent. Needs the training tier (``embedseg-deploy[train]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import Backend, BackendError, ShapeSpec


class TorchBackend(Backend):
    """A checkpoint loaded with ``embedseg_training.checkpoint.load_model`` (weights only)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        tf32: bool = False,
    ):
        path = Path(model_path)
        if not path.is_file():
            raise BackendError(f"{path}: checkpoint file not found")
        try:
            import torch

            from embedseg_training.checkpoint import load_model
        except ImportError as exc:
            raise BackendError(
                f"{path}: the torch backend needs torch and the training tier: "
                "pip install 'embedseg-deploy[train]'"
            ) from exc
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA was asked for but torch sees no CUDA device")
        if threads:
            torch.set_num_threads(int(threads))
        try:
            model, contract = load_model(path)
        except Exception as exc:
            text = str(exc).replace(f"{path}: ", "")
            raise BackendError(f"{path}: cannot load the checkpoint: {text}") from None
        self._torch = torch
        self._model = model.eval().to(device)
        on_gpu = device.startswith("cuda")
        if on_gpu:  # torch lets cuDNN convolutions use TF32 by default; "fp32" means fp32 on every backend
            torch.backends.cudnn.allow_tf32 = bool(tf32)
            torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        super().__init__(
            name="torch",
            device=device,
            precision="tf32" if on_gpu and tf32 else "fp32",
            contract=contract,
            shapes=ShapeSpec(contract.ndim, contract.tile_multiple),
            model_path=path,
            info={"torch": torch.__version__, "threads": threads},
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self._model(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()


class ModuleBackend(TorchBackend):
    """A network being trained, seen through the runtime: training validates with the full pipeline.

    The module is used as it is (no copy); each call runs it in eval mode and puts back the mode it had.
    """

    def __init__(self, module, contract, device: str = "cpu"):
        import torch

        self._torch = torch
        self._model = module
        Backend.__init__(
            self,
            name="torch-module",
            device=str(device),
            precision="fp32",
            contract=contract,
            shapes=ShapeSpec(contract.ndim, contract.tile_multiple),
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        was_training = self._model.training
        self._model.eval()
        try:
            return super()._run(batch)
        finally:
            self._model.train(was_training)
