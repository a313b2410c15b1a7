"""An exponential moving average of the weights (Polyak & Juditsky 1992; the "EMA" of modern recipes).

Evaluating the average of the last few thousand steps' weights instead of the last step's smooths
out the noise of the final steps: typically a few hundredths of a point of accuracy for free.
Batch-norm statistics are averaged the same way. The decay ramps up as (1 + t) / (10 + t) over
the first steps (TensorFlow's ExponentialMovingAverage with num_updates), so the average does
not start as a long memory of the random initialisation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lenet5.models import DigitClassifier


class WeightAverage:
    def __init__(self, model: DigitClassifier, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: DigitClassifier) -> None:
        """Move the average towards `model`'s current weights (one call per optimizer step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = [], []
        for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values()):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                mine.copy_(theirs)  # counters such as batch norm's num_batches_tracked
        torch._foreach_lerp_(averaged, current, 1 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
