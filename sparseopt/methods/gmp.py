"""GMP: gradual magnitude pruning (Zhu & Gupta 2017), dense (or denser) to sparse, no regrowth."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _validate
from .._compat import override
from ..context import MethodContext
from ..masks import count_active, drop_and_grow, select_largest_across
from ..update_schedule import cubic_density
from .base import Scores, SparsityMethod

__all__ = ["GMP"]


class GMP(SparsityMethod):
    """Gradual magnitude pruning, dense (or denser) to sparse, with no regrowth.

    Masks start at ``initial_density`` (ERK or the chosen distribution; 1.0 = dense). Pruning
    events fall on the multiples of ``update_every`` in ``(prune_start * T, prune_end * T]``
    (``T = total_steps``). At event ``c`` of the window ``(c0, cf]`` the overall density follows
    the cubic schedule of Zhu & Gupta,
    ``d(c) = d_f + (d_i - d_f) * (1 - (c - c0) / (cf - c0)) ** 3``, reaching the target ``d_f``
    exactly at the last event ``cf`` (the reference code stops one event short; if that event is
    skipped for non-finite gradients, the next step with finite ones prunes to it). Each event keeps
    the ``round(d(c) * N)`` largest ``|w|`` among the active weights of all sparse layers (global
    magnitude, ties to the lowest index in packing order). The density never changes afterwards.

    Args:
        initial_density (float | None): the density of the initial masks, in (0, 1], at least
            the target density; ``None`` takes the class's ``default_initial_density`` (1.0).
            Default: None.
        prune_start (float): fraction of ``total_steps`` where the window opens. Default: 0.0.
        prune_end (float): fraction of ``total_steps`` where it closes. Default: 0.5 (GraNet's
            CIFAR script: epoch 80 of 160).
        growth (str | None): how an exploration (Sup-tickets, ``explore()``) grows:
            ``"gradient"`` (the default) or ``"random"``. Pruning events never grow.
        **options: rejected (no other options).

    Raises:
        TypeError: for a fraction that is not a real number.
        ValueError: for a value outside its interval, or ``prune_end <= prune_start``; when the
            optimizer is built, for an ``initial_density`` below the target density or a window
            that holds no multiple of ``update_every``.

    Examples:
        Dense to 90% sparse over four pruning events:

        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "gmp", 0.9,
        ...                       update_every=1, total_steps=4, prune_end=1.0, seed=0)
        >>> densities = [opt.density]
        >>> for _ in range(4):
        ...     model(torch.randn(4, 16)).square().sum().backward()
        ...     opt.step(); opt.zero_grad()
        ...     densities.append(round(opt.density, 4))
        >>> densities
        [1.0, 0.4805, 0.2109, 0.1133, 0.1016]
    """

    name = "gmp"
    periodic = False
    regrow: ClassVar[bool] = False
    default_growth = "gradient"
    default_initial_density: ClassVar[float] = 1.0
    structures = ()  # the density moves: N:M fixes it, and fan-in rows would need per-row pruning

    def __init__(
        self,
        initial_density: float | None = None,
        prune_start: float = 0.0,
        prune_end: float = 0.5,
        *,
        growth: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(growth=growth, **options)
        if initial_density is None:
            initial_density = self.default_initial_density
        self.initial_density = _validate.real(
            "initial_density", initial_density, 0, 1, low_open=True
        )
        self.prune_start = _validate.real("prune_start", prune_start, 0, 1, high_open=True)
        self.prune_end = _validate.real("prune_end", prune_end, 0, 1, low_open=True)
        if self.prune_end <= self.prune_start:
            raise ValueError(
                f"Expected prune_end > prune_start, but got prune_start={prune_start}, "
                f"prune_end={prune_end}"
            )

    @override
    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "initial_density": self.initial_density,
            "prune_start": self.prune_start,
            "prune_end": self.prune_end,
        }

    @override
    def start_density(self, density: float) -> float:
        if self.initial_density < density - 1e-12:
            raise ValueError(
                f"initial_density={self.initial_density} is below the target density {density:g} "
                f"(sparsity {1 - density:g}); {self.name} only prunes, so it must start denser"
            )
        return self.initial_density

    def window(self, ctx: MethodContext) -> tuple[int, int, int]:
        """``(c0, cf, update_every)``: pruning events are the steps ``c * update_every``,
        ``c0 < c <= cf``.

        Args:
            ctx (MethodContext): the settings (``total_steps``, the schedule's ``update_every``).

        Raises:
            ValueError: without ``total_steps``, or if the window holds no multiple of
                ``update_every``.
        """
        total = ctx.total_steps
        if total is None:
            raise ValueError(f"method {self.name!r} needs total_steps to place its pruning window")
        every = ctx.schedule.update_every
        c0 = math.floor(self.prune_start * total + 1e-9) // every
        cf = math.floor(self.prune_end * total + 1e-9) // every
        if cf <= c0:
            raise ValueError(
                f"the pruning window of {self.name!r} (steps {self.prune_start * total:g} to "
                f"{self.prune_end * total:g} of total_steps={total}) holds no multiple of "
                f"update_every={every}; widen prune_start/prune_end or lower update_every"
            )
        return c0, cf, every

    @override
    def check(self, ctx: MethodContext) -> None:
        if ctx.total_steps is not None:
            self.window(ctx)

    @override
    def density_final_step(self, ctx: MethodContext) -> int | None:
        _, cf, every = self.window(ctx)
        return cf * every

    def is_pruning_step(self, step: int, ctx: MethodContext) -> bool:
        """A scheduled event, or any step after the window while the target is not reached yet
        (the last event was skipped, e.g. for non-finite gradients).

        Args:
            step (int): the optimizer step that is running.
            ctx (MethodContext): the settings.
        """
        c0, cf, every = self.window(ctx)
        if step % every == 0 and c0 < step // every <= cf:
            return True
        if step > cf * every:
            layers = ctx.layers
            return sum(layer.count for layer in layers) > sum(layer.target for layer in layers)
        return False

    def density_at(self, step: int, ctx: MethodContext) -> float:
        """The cubic schedule's overall density after the pruning event at ``step``.

        Args:
            step (int): the optimizer step.
            ctx (MethodContext): the settings.
        """
        c0, cf, every = self.window(ctx)
        return cubic_density(step, c0 * every, cf * every, self.initial_density, 1 - ctx.sparsity)

    @override
    def is_update_step(self, step: int, ctx: MethodContext) -> bool:
        if self.is_pruning_step(step, ctx):
            return True
        _, cf, every = self.window(ctx)
        return self.periodic and step > cf * every and ctx.schedule.is_update_step(step)

    @override
    def reads_gradient(self, step: int | None, ctx: MethodContext) -> bool:
        """A pruning event reads the gradient only to regrow by it (GraNet); an exploration or
        a periodic update after the window grows by ``growth``.

        Args:
            step (int | None): the step of a scheduled update, ``None`` for an exploration.
            ctx (MethodContext): the settings.
        """
        if step is not None and self.is_pruning_step(step, ctx):
            return self.regrow and self.uses_gradient
        return self.uses_gradient

    def prune(self, ctx: MethodContext, step: int) -> list[Tensor]:
        """Global magnitude pruning of the active weights to the schedule's count at ``step``.

        Args:
            ctx (MethodContext): ``ctx.layers`` holds the current masks.
            step (int): the pruning event's step.

        Returns:
            The pruned masks, one per layer.
        """
        layers = ctx.layers
        _, cf, every = self.window(ctx)
        if step >= cf * every:
            keep = sum(layer.target for layer in layers)  # exactly the target total
        else:
            keep = round(self.density_at(step, ctx) * sum(layer.numel for layer in layers))
        keep = min(keep, sum(layer.count for layer in layers))
        scores = [
            torch.where(layer.mask, layer.param.detach().abs().float(), float("-inf"))
            for layer in layers
        ]
        return select_largest_across(scores, keep)

    @override
    def new_masks(
        self, ctx: MethodContext, rate: float, grow_scores: Scores, step: int | None
    ) -> list[Tensor]:
        if step is None or not self.is_pruning_step(step, ctx):
            return super().new_masks(ctx, rate, grow_scores, step)
        pruned = self.prune(ctx, step)
        if not self.regrow:
            return pruned
        out = []
        actives = count_active(pruned)
        for layer, mask, scores, active in zip(
            ctx.layers, pruned, grow_scores, actives, strict=True
        ):
            k = min(math.floor(rate * active + 1e-9), layer.numel - active)
            out.append(drop_and_grow(mask, self.drop_scores(layer), scores, k)[0])
        return out
