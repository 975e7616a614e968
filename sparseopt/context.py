"""What a method sees: frozen sparse layers and a frozen context, never the optimizer itself.

A [`SparsityMethod`][sparseopt.methods.SparsityMethod] reads these and returns masks; the mask
engine applies them. The engine builds both, keeps the layers in a tuple, and builds new objects
(``dataclasses.replace``) whenever a count or the settings change: a method cannot write a field
(they are frozen), and the engine refuses a method that writes a mask or a weight in place (it
compares the tensors' version counters around every hook it calls at an update). This is the
method author's whole contract (``docs/custom-methods.md``); ``sparseopt.methods`` re-exports both
names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .settings import SparseSettings
from .structure import Structure
from .update_schedule import TopologySchedule

__all__ = ["MethodContext", "SparseLayer"]


@dataclass(frozen=True, eq=False)
class SparseLayer:
    """One sparse weight tensor as the optimizer sees it (frozen: read it, never write it).

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
        >>> lin = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), "set", 0.9,
        ...                       model=lin, seed=0)
        >>> layer = opt.layers[0]
        >>> layer.name, layer.index, layer.count, layer.target, layer.numel
        ('weight', 0, 26, 26, 256)
        >>> layer.count = 30
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'count'
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

    The mask engine builds a new one whenever the layers or the settings change (a new count, a
    new ``total_steps``); every hook that takes a context gets this object.

    Built from two fields, ``layers`` and ``settings``; the others are read from the settings.

    Attributes:
        layers: the sparse layers, in packing order (frozen
            [`SparseLayer`][sparseopt.methods.SparseLayer]s).
        settings: the optimizer's frozen [`SparseSettings`][sparseopt.settings.SparseSettings].
        schedule: ``settings.schedule``, the periodic topology-update schedule
            (``update_every``, drop fraction).
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
        >>> opt.context.settings is opt.settings, opt.context.schedule.update_every
        (True, 100)
    """

    layers: tuple[SparseLayer, ...]
    settings: SparseSettings
    schedule: TopologySchedule = field(init=False, repr=False, compare=False)
    total_steps: int | None = field(init=False, repr=False, compare=False)
    sparsity: float = field(init=False, repr=False, compare=False)
    structure: Structure | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # read from the settings once, as plain attributes: hooks read them per layer
        s = self.settings
        for name, value in (
            ("schedule", s.schedule),
            ("total_steps", s.total_steps),
            ("sparsity", s.sparsity),
            ("structure", s.structure),
        ):
            object.__setattr__(self, name, value)
