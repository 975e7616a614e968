"""The base class of sparse-training methods: when an update runs, what it drops and grows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor

from .. import _validate
from .._dtensor import shard_like
from ..context import MethodContext, SparseLayer
from ..masks import exchange
from ..structure import Structure

__all__ = ["GROWTH", "Scores", "SparseLayer", "SparsityMethod"]

Scores: TypeAlias = Sequence[Tensor | None]
"""What [`SparsityMethod.new_masks`][sparseopt.methods.SparsityMethod.new_masks] receives: one
growth-score tensor per layer of the context (``None`` where ``grow_scores`` returned none)."""

GROWTH = ("random", "gradient")
"""How an update grows connections: uniformly at random (SET) or by the largest ``|grad|`` of the
current batch's dense gradient (RigL)."""


class SparsityMethod:
    """A sparse-training method: how masks start and how one topology update moves them.

    Two separate choices make a method:

    - **when** an update runs and at which density: [`is_update_step`][] (every
      ``update_every`` steps by default, per the optimizer's schedule), [`start_density`][],
      [`density_final_step`][], and [`new_masks`][] for methods that prune (GMP, GraNet, SNIP);
    - **how** it drops and grows: [`drop_scores`][] (smallest ``|w|`` dropped first) and
      [`grow_scores`][], which follows the ``growth`` strategy: ``"random"`` (SET) or
      ``"gradient"`` (RigL: the largest ``|grad|`` of the dense gradient, read inside ``step()``
      before the gradients are masked). Override ``grow_scores`` for another criterion.

    A method sees a [`MethodContext`][sparseopt.methods.MethodContext] (the layers, the schedule,
    ``total_steps``, the sparsity), never the optimizer, and returns masks; the optimizer applies
    them and zeroes what changed.

    Attributes:
        name: the registry name.
        periodic: whether the method updates the topology every ``update_every`` steps.
        default_growth: the growth strategy when ``growth`` is not given.
        structures: the mask structures the method keeps (``"nm"``, ``"fan_in"``); the
            optimizer refuses any other. Drop-and-grow keeps both: each group or row regrows
            what it lost.
        growth: the growth strategy of this instance.
        uses_gradient: whether a drop-and-grow update reads the dense gradient
            (``growth == "gradient"``); FLOPs accounting reads [`reads_gradient`][] per update.

    Methods are configured through their constructor's keyword arguments; ``SparseOptimizer``
    forwards its unknown keyword arguments there. [`options`][] must return them as plain data,
    so that a checkpoint can record and check them.

    Args:
        growth (str | None): ``"random"`` or ``"gradient"``; ``None`` takes the method's
            ``default_growth``. Default: None.
        **options: the method's other hyper-parameters; the base class accepts none.

    Raises:
        TypeError: for an unexpected keyword argument, or a ``growth`` that is not a string.
        ValueError: for an unknown ``growth``.

    Examples:
        A subclass overrides ``grow_scores`` (this one grows by ``|grad * w|``) and can be
        passed as an instance; ``register_method`` makes it available by name:

        >>> import torch
        >>> from sparseopt import SparseOptimizer, SparsityMethod
        >>> class Sensitivity(SparsityMethod):
        ...     name = "sensitivity"
        ...     uses_gradient = True
        ...     def grow_scores(self, layer, grad, generator):
        ...         return (grad * layer.param).abs()
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Sensitivity(),
        ...                       0.9, update_every=1, prune_rate=0.5, seed=0)
        >>> model(torch.randn(4, 16)).square().sum().backward(); opt.step()
        >>> opt.report()["updates"]["updates"], opt.layers[0].count
        (1, 26)

        Every built-in method takes ``growth``: RigL's schedule with SET's random growth (on
        another model: a parameter is sparsified by one optimizer at a time):

        >>> other = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), "rigl", 0.9,
        ...                       growth="random")
        >>> opt.method, opt.method.uses_gradient
        (RigL(growth='random'), False)
    """

    name: ClassVar[str] = "base"
    periodic: ClassVar[bool] = True
    default_growth: ClassVar[str] = "random"
    structures: ClassVar[tuple[str, ...]] = ("nm", "fan_in")

    def __init__(self, *, growth: str | None = None, **options: Any) -> None:
        if options:
            raise TypeError(
                f"method {self.name!r} got unexpected keyword arguments {sorted(options)}"
            )
        self.growth = (
            self.default_growth if growth is None else _validate.choice("growth", growth, GROWTH)
        )

    @property
    def uses_gradient(self) -> bool:
        """Whether a drop-and-grow update reads the dense gradient: ``growth == "gradient"``."""
        return self.growth == "gradient"

    # --- configuration -------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The method's hyper-parameters as plain data (recorded in checkpoints).

        ``load_state_dict`` refuses a checkpoint whose options differ. ``growth`` is listed
        only when it differs from the method's default (so checkpoints of 0.1.0 still fit).
        """
        return {} if self.growth == self.default_growth else {"growth": self.growth}

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

    def check(self, ctx: MethodContext) -> None:
        """Raise ``ValueError`` if the method cannot run with these settings.

        Called when the optimizer is built and whenever its ``total_steps`` changes.

        Args:
            ctx (MethodContext): the optimizer's settings and layers.

        Raises:
            ValueError: if the settings do not fit the method.
        """

    def is_update_step(self, step: int, ctx: MethodContext) -> bool:
        """Whether a scheduled topology update runs at optimizer step ``step`` (from 1).

        Args:
            step (int): the optimizer step that is running.
            ctx (MethodContext): the settings (``ctx.schedule`` is the periodic schedule).
        """
        return self.periodic and ctx.schedule.is_update_step(step)

    def updates_before_step(self, step: int) -> bool:
        """Whether the update at ``step`` applies its masks before the inner step (SNIP's init).

        Args:
            step (int): the optimizer step that is running.
        """
        return False

    def density_final_step(self, ctx: MethodContext) -> int | None:
        """The step from which the density no longer changes (``None``: it never changes).

        ``SupTicketsScheduler`` refuses a schedule whose phase 2 starts before it.

        Args:
            ctx (MethodContext): the settings.
        """
        return None

    def reads_gradient(self, step: int | None, ctx: MethodContext) -> bool:
        """Whether the update at ``step`` reads the dense gradient (FLOPs accounting).

        Called before [`new_masks`][]. Default: ``uses_gradient``.

        Args:
            step (int | None): the optimizer step of a scheduled update, ``None`` for an
                exploration.
            ctx (MethodContext): the settings.
        """
        return self.uses_gradient

    # --- how -----------------------------------------------------------------------------------
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
    ) -> Tensor | None:
        """Scores for growing, by the ``growth`` strategy; read before the gradient is masked.

        ``"random"``: uniform scores drawn full-size from ``generator`` on the CPU (a sharded
        parameter keeps its chunk, so the masks are the single-process ones). ``"gradient"``:
        ``|grad|``, or zeros (growth in index order) for a layer without a gradient.

        Args:
            layer (SparseLayer): the layer.
            grad (Tensor | None): the dense gradient of the current batch, or ``None`` if the
                parameter has none.
            generator (torch.Generator): the optimizer's own CPU generator, for random scores.

        Returns:
            A tensor of the parameter's shape; the largest scores among the inactive (and the
            just-dropped) positions are grown.
        """
        if self.growth == "gradient":
            if grad is None:
                return torch.zeros_like(layer.param, dtype=torch.float32)
            return grad.detach().abs()
        scores = torch.rand(layer.param.shape, generator=generator, device="cpu")
        return shard_like(scores, layer.param)

    def num_to_drop(self, layer: SparseLayer, rate: float) -> int:
        """How many connections an update at drop fraction ``rate`` exchanges in ``layer``.

        ``floor(rate * count)``, as in RigL, capped by the inactive positions.

        Args:
            layer (SparseLayer): the layer.
            rate (float): the drop fraction.
        """
        return min(math.floor(rate * layer.count + 1e-9), layer.numel - layer.count, layer.count)

    def update_layer(
        self,
        layer: SparseLayer,
        rate: float,
        grow_scores: Tensor,
        structure: Structure | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Drop and grow in one layer; returns ``(new_mask, dropped, grown)``.

        Under a structure, drops and grows are paired inside each ``N:M`` group or fan-in row
        (SRigL's per-neuron rule; [`exchange`][sparseopt.masks.exchange]).

        Args:
            layer (SparseLayer): the layer.
            rate (float): the drop fraction.
            grow_scores (Tensor): what [`grow_scores`][] returned for it.
            structure (Structure | None): the optimizer's structure. Default: None.
        """
        k = self.num_to_drop(layer, rate)
        return exchange(layer.mask, self.drop_scores(layer), grow_scores, k, structure)

    def new_masks(
        self, ctx: MethodContext, rate: float, grow_scores: Scores, step: int | None
    ) -> list[Tensor]:
        """The masks after one topology update (the optimizer zeroes what changed).

        Args:
            ctx (MethodContext): ``ctx.layers`` holds the current masks and counts.
            rate (float): the drop fraction (the schedule's, or the one an exploration asked
                for).
            grow_scores (Sequence[Tensor | None]): what [`grow_scores`][] returned per layer,
                before gradient masking.
            step (int | None): the optimizer step of a scheduled update, or ``None`` for an
                exploration.

        Returns:
            One bool mask per layer, in the order of ``ctx.layers``.
        """
        return [
            self.update_layer(layer, rate, scores, ctx.structure)[0]
            for layer, scores in zip(ctx.layers, grow_scores, strict=True)
        ]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
