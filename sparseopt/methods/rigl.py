"""RigL (Evci et al. 2020): magnitude drop, growth by the dense gradient's magnitude."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SparseLayer
from .set import SET

__all__ = ["RigL"]


class RigL(SET):
    """Rigging the Lottery: grow the inactive connections with the largest ``|grad|``.

    The gradient is the dense gradient of the current batch, read inside ``step()`` before the
    optimizer masks it. A layer without a gradient grows by index order (all scores zero).
    """

    name = "rigl"
    uses_gradient = True

    def grow_scores(
        self, layer: SparseLayer, grad: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        if grad is None:
            return torch.zeros_like(layer.param, dtype=torch.float32)
        return grad.detach().abs()
