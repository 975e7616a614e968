"""What a method sees: the sparse layers and a small frozen context, never the optimizer itself.

A [`SparsityMethod`][sparseopt.methods.SparsityMethod] reads this and returns masks; the mask
engine applies them. This is the method author's whole contract (``docs/custom-methods.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..schedules import TopologySchedule
from ..structure import Structure

__all__ = ["MethodContext", "SparseLayer"]


@dataclass(eq=False)
class SparseLayer:
    """One sparse weight tensor as the optimizer sees it.

    Attributes:
        param: the parameter.
        name: its name (from ``model=`` or ``named_parameters()``), else ``"param{index}"``.
        index: its position in the optimizer's packing order, the key used in ``state_dict``.
        mask: bool tensor of the parameter's shape and device; ``True`` = active. For a DTensor
            parameter (FSDP2) a bool DTensor with the parameter's mesh and placements.
        count: the number of active connections, always equal to ``mask.sum()`` (over all
            shards: count masks with :func:`sparseopt.masks.count_active`, since a DTensor's
            ``mask.sum().item()`` is only the local shard's).
        target: the count the distribution assigns this layer at the target sparsity.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9,
        ...                       model=model, seed=0)
        >>> layer = opt.layers[0]
        >>> layer.name, layer.index, layer.count, layer.target, layer.numel
        ('weight', 0, 26, 26, 256)
    """

    param: Tensor
    name: str
    index: int
    mask: Tensor
    count: int
    target: int

    @property
    def numel(self) -> int:
        """The parameter's number of elements."""
        return self.param.numel()


@dataclass(frozen=True)
class MethodContext:
    """The optimizer's settings and layers, as a method may read them (and nothing else).

    The mask engine builds it afresh when the layers or ``total_steps`` change. The layers are
    the engine's own objects: read their masks and counts, return new masks, never write them.

    Attributes:
        layers: the sparse layers, in packing order.
        schedule: the periodic topology-update schedule (``update_every``, drop fraction).
        total_steps: the length of training in optimizer steps, or ``None`` if unknown.
        sparsity: the target sparsity over all sparse layers.
        structure: the mask structure (``N:M`` groups or constant fan-in rows), or ``None``:
            every mask a method returns must keep it (the engine checks).

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> from sparseopt.methods import SparsityMethod
        >>> class EveryOther(SparsityMethod):
        ...     name = "every-other"
        ...     def is_update_step(self, step, ctx):
        ...         return step % 2 == 0 and ctx.total_steps is not None
        >>> model = torch.nn.Linear(8, 8)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), EveryOther(), 0.5,
        ...                       total_steps=10)
        >>> [opt.method.is_update_step(s, opt.context) for s in (1, 2)]
        [False, True]
    """

    layers: tuple[SparseLayer, ...]
    schedule: TopologySchedule
    total_steps: int | None
    sparsity: float
    structure: Structure | None = None
