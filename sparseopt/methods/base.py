"""The base class of sparse-training methods and the per-layer view they work on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..masks import drop_and_grow

if TYPE_CHECKING:
    from ..optimizer import SparseOptimizer

__all__ = ["SparseLayer", "SparsityMethod"]


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


class SparsityMethod:
    """A sparse-training method: how masks start and how one topology update moves them.

    Subclasses override one or two scoring hooks (the jaxpruner pattern):

    - [`drop_scores`][]: connections with the smallest scores are dropped. Default ``|w|``.
    - [`grow_scores`][]: inactive connections with the largest scores are grown. It is called
      inside ``step()`` *before* the gradients are masked, so ``grad`` is the dense gradient of the
      current batch. Must be overridden.

    Methods that change the density or the timing (GraNet, SNIP) also override
    [`start_density`][], [`is_update_step`][] and [`new_masks`][].

    Attributes:
        name: the registry name.
        periodic: whether the method updates the topology every ``update_every`` steps.
        uses_gradient: whether an update reads the dense gradient (FLOPs accounting).

    Methods are configured through their constructor's keyword arguments; ``SparseOptimizer``
    forwards its unknown keyword arguments there. [`options`][] must return them as plain data,
    so that a checkpoint can record and check them.

    Args:
        **options: the method's hyper-parameters; the base class accepts none.

    Raises:
        TypeError: for an unexpected keyword argument.

    Examples:
        A subclass overrides ``grow_scores`` (this one is RigL's criterion) and can be passed as
        an instance; ``register_method`` makes it available by name:

        >>> import torch
        >>> from sparseopt import SparseOptimizer, SparsityMethod
        >>> class GradientGrowth(SparsityMethod):
        ...     name = "gradient-growth"
        ...     uses_gradient = True
        ...     def grow_scores(self, layer, grad, generator):
        ...         return grad.abs()
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), GradientGrowth(),
        ...                       0.9, update_every=1, prune_rate=0.5, seed=0)
        >>> model(torch.randn(4, 16)).square().sum().backward(); opt.step()
        >>> opt.report()["updates"]["updates"], opt.layers[0].count
        (1, 26)
    """

    name: ClassVar[str] = "base"
    periodic: ClassVar[bool] = True
    uses_gradient: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(
                f"method {self.name!r} got unexpected keyword arguments {sorted(options)}"
            )

    # --- configuration -------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The method's hyper-parameters as plain data (recorded in checkpoints).

        ``load_state_dict`` refuses a checkpoint whose options differ.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Mutable method state as plain data (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what [`state_dict`][] returned.

        Args:
            state (dict): the saved state.
        """

    # --- when --------------------------------------------------------------------------------
    def start_density(self, density: float) -> float:
        """The overall density of the initial masks, given the target ``density``.

        Args:
            density (float): the target density ``1 - sparsity``.
        """
        return density

    def check(self, opt: SparseOptimizer) -> None:
        """Raise ``ValueError`` if the method cannot run with ``opt``'s settings.

        Called when the optimizer is built and whenever its ``total_steps`` changes.

        Args:
            opt (SparseOptimizer): the optimizer.

        Raises:
            ValueError: if the settings do not fit the method.
        """

    def is_update_step(self, step: int, opt: SparseOptimizer) -> bool:
        """Whether a scheduled topology update runs at optimizer step ``step`` (from 1).

        Args:
            step (int): the optimizer step that is running.
            opt (SparseOptimizer): the optimizer (``opt.schedule`` is its periodic schedule).
        """
        return self.periodic and opt.schedule.is_update_step(step)

    def updates_before_step(self, step: int) -> bool:
        """Whether the update at ``step`` applies its masks before the inner step (SNIP's init).

        Args:
            step (int): the optimizer step that is running.
        """
        return False

    def density_final_step(self, opt: SparseOptimizer) -> int | None:
        """The step from which the density no longer changes (``None``: it never changes).

        ``SupTicketsScheduler`` refuses a schedule whose phase 2 starts before it.

        Args:
            opt (SparseOptimizer): the optimizer.
        """
        return None

    # --- masks ---------------------------------------------------------------------------------
    def drop_scores(self, layer: SparseLayer) -> Tensor:
        """Scores for dropping: the smallest-scoring active connections go first.

        Called after the inner step, on the updated weights; ``layer.param.grad`` then holds the
        masked gradient, which is the dense one at every active position.

        Args:
            layer (SparseLayer): the layer.

        Returns:
            A tensor of the parameter's shape; only active positions are read. Default ``|w|``.
        """
        return layer.param.detach().abs()

    def grow_scores(
        self, layer: SparseLayer, grad: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        """Scores for growing, read from the dense gradient before it is masked.

        Args:
            layer (SparseLayer): the layer.
            grad (Tensor | None): the dense gradient of the current batch, or ``None`` if the
                parameter has none.
            generator (torch.Generator): the optimizer's own CPU generator, for random scores.

        Returns:
            A tensor of the parameter's shape; the largest scores among the inactive (and the
            just-dropped) positions are grown.

        Raises:
            NotImplementedError: in the base class; every method overrides it.
        """
        raise NotImplementedError

    def num_to_drop(self, layer: SparseLayer, rate: float) -> int:
        """How many connections an update at drop fraction ``rate`` exchanges in ``layer``.

        ``floor(rate * count)``, as in RigL, capped by the inactive positions.

        Args:
            layer (SparseLayer): the layer.
            rate (float): the drop fraction.
        """
        return min(math.floor(rate * layer.count + 1e-9), layer.numel - layer.count, layer.count)

    def update_layer(
        self, layer: SparseLayer, rate: float, grow_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Drop and grow in one layer; returns ``(new_mask, dropped, grown)``.

        Args:
            layer (SparseLayer): the layer.
            rate (float): the drop fraction.
            grow_scores (Tensor): what [`grow_scores`][] returned for it.
        """
        k = self.num_to_drop(layer, rate)
        return drop_and_grow(layer.mask, self.drop_scores(layer), grow_scores, k)

    def new_masks(
        self,
        opt: SparseOptimizer,
        rate: float,
        grow_scores: Sequence[Tensor | None],
        step: int | None,
    ) -> list[Tensor]:
        """The masks after one topology update (the optimizer zeroes what changed).

        Args:
            opt: the optimizer; ``opt.layers`` holds the current masks and counts.
            rate: the drop fraction (the schedule's, or the one an exploration asked for).
            grow_scores: what [`grow_scores`][] returned per layer, before gradient masking.
            step: the optimizer step of a scheduled update, or ``None`` for an exploration.

        Returns:
            One bool mask per layer, in the order of ``opt.layers``.
        """
        return [
            self.update_layer(layer, rate, scores)[0]
            for layer, scores in zip(opt.layers, grow_scores, strict=True)
        ]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
