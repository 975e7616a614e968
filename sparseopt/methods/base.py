"""The base class of sparse-training methods and the per-layer view they work on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..masks import drop_and_grow

__all__ = ["SparseLayer", "SparsityMethod"]


@dataclass(eq=False)
class SparseLayer:
    """One sparse weight tensor as the optimizer sees it.

    Attributes:
        param: the parameter.
        name: its name (from ``model=`` or ``named_parameters()``), else ``"param{index}"``.
        index: its position in the optimizer's packing order, the key used in ``state_dict``.
        mask: bool tensor of the parameter's shape and device; ``True`` = active.
        count: the number of active connections, always equal to ``mask.sum()``.
    """

    param: Tensor
    name: str
    index: int
    mask: Tensor
    count: int

    @property
    def numel(self) -> int:
        return self.param.numel()


class SparsityMethod:
    """A sparse-training method: how masks start and how one topology update moves them.

    Subclasses override one or two scoring hooks (the jaxpruner pattern):

    - :meth:`drop_scores`: connections with the smallest scores are dropped. Default ``|w|``.
    - :meth:`grow_scores`: inactive connections with the largest scores are grown. It is called
      inside ``step()`` *before* the gradients are masked, so ``grad`` is the dense gradient of the
      current batch. Must be overridden.

    Class attributes:
        name: the registry name.
        periodic: whether the method updates the topology every ``update_every`` steps.

    Methods are configured through their constructor's keyword arguments; ``SparseOptimizer``
    forwards its unknown keyword arguments there. :meth:`options` must return them as plain data,
    so that a checkpoint can record and check them.
    """

    name: ClassVar[str] = "base"
    periodic: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(
                f"method {self.name!r} got unexpected keyword arguments {sorted(options)}"
            )

    # --- configuration -------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The method's hyper-parameters as plain data (recorded in checkpoints)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Mutable method state as plain data (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # --- masks ---------------------------------------------------------------------------------
    def drop_scores(self, layer: SparseLayer) -> Tensor:
        """Scores for dropping: the smallest-scoring active connections go first."""
        return layer.param.detach().abs()

    def grow_scores(
        self, layer: SparseLayer, grad: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        """Scores for growing, read from the dense gradient before it is masked."""
        raise NotImplementedError

    def num_to_drop(self, layer: SparseLayer, rate: float) -> int:
        """How many connections an update at drop fraction ``rate`` exchanges in ``layer``."""
        return min(math.floor(rate * layer.count + 1e-9), layer.numel - layer.count, layer.count)

    def update_layer(
        self, layer: SparseLayer, rate: float, grow_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Drop and grow in one layer; returns ``(new_mask, dropped, grown)``."""
        k = self.num_to_drop(layer, rate)
        return drop_and_grow(layer.mask, self.drop_scores(layer), grow_scores, k)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
