"""An exponential moving average of a network's weights (Polyak averaging), kept beside the trained one.

Late in a short run the weights still move from step to step, and on small data that motion alone moves
the test AP of successive epochs by several nuclei. The average sits in the middle of that motion. The
optimiser steps the live weights; validation, ``best.pth`` and the callbacks see the average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

WARMUP = 10  # the decay of update n is at most (1 + n) / (WARMUP + n): early averages follow the weights


class WeightAverage:
    """``module``: a copy of ``model`` whose weights and BatchNorm statistics are the running average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be within (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (WARMUP + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s weights (after an optimiser step)."""
        self.updates += 1
        keep = self.current_decay()
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(live[name], 1.0 - keep)  # state_dict tensors are detached already
            else:  # counters such as BatchNorm's num_batches_tracked
                avg.copy_(live[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.module.load_state_dict(state["weights"], strict=True)
