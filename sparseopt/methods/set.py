"""SET (Mocanu et al. 2018): magnitude drop, random growth."""

from __future__ import annotations

import torch
from torch import Tensor

from .._dtensor import shard_like
from .base import SparseLayer, SparsityMethod

__all__ = ["SET"]


class SET(SparsityMethod):
    """Sparse Evolutionary Training: every update drops the smallest ``|w|`` and grows at random.

    The random growth draws from the optimizer's own ``torch.Generator`` (on CPU, whatever the
    parameter's device), so the same seed gives the same masks on every rank and every device.
    A sharded (FSDP2) parameter draws the full-size scores too and keeps its shard's chunk, so
    the masks are the single-process ones.
    """

    name = "set"

    def grow_scores(
        self, layer: SparseLayer, grad: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        scores = torch.rand(layer.param.shape, generator=generator)
        return shard_like(scores, layer.param)
