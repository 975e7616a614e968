"""Gradual magnitude pruning: GMP (Zhu & Gupta 2017) and GraNet (Liu et al. 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..masks import count_active, drop_and_grow, select_largest_across
from ..schedules import cubic_density
from .rigl import RigL

if TYPE_CHECKING:
    from ..optimizer import SparseOptimizer

__all__ = ["GMP", "GraNet"]


def _fraction(name: str, value: Any, low_open: bool, high_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"Expected {name} in {interval}, but got {value!r}")
    return float(value)


class GMP(RigL):
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
        initial_density (float): the density of the initial masks, in (0, 1], at least the target
            density. Default: 1.0.
        prune_start (float): fraction of ``total_steps`` where the window opens. Default: 0.0.
        prune_end (float): fraction of ``total_steps`` where it closes. Default: 0.5 (GraNet's
            CIFAR script: epoch 80 of 160).
        **options: rejected (no other options).

    Raises:
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
    regrow = False
    uses_gradient = False

    def __init__(
        self,
        initial_density: float = 1.0,
        prune_start: float = 0.0,
        prune_end: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.initial_density = _fraction("initial_density", initial_density, True, False)
        self.prune_start = _fraction("prune_start", prune_start, False, True)
        self.prune_end = _fraction("prune_end", prune_end, True, False)
        if self.prune_end <= self.prune_start:
            raise ValueError(
                f"Expected prune_end > prune_start, but got prune_start={prune_start}, "
                f"prune_end={prune_end}"
            )

    def options(self) -> dict[str, Any]:
        return {
            "initial_density": self.initial_density,
            "prune_start": self.prune_start,
            "prune_end": self.prune_end,
        }

    def start_density(self, density: float) -> float:
        if self.initial_density < density - 1e-12:
            raise ValueError(
                f"initial_density={self.initial_density} is below the target density {density:g} "
                f"(sparsity {1 - density:g}); {self.name} only prunes, so it must start denser"
            )
        return self.initial_density

    def window(self, opt: SparseOptimizer) -> tuple[int, int, int]:
        """``(c0, cf, update_every)``: pruning events are the steps ``c * update_every``,
        ``c0 < c <= cf``.

        Args:
            opt (SparseOptimizer): the optimizer (its ``total_steps`` and ``update_every``).

        Raises:
            ValueError: without ``total_steps``, or if the window holds no multiple of
                ``update_every``.
        """
        total = opt.total_steps
        if total is None:
            raise ValueError(f"method {self.name!r} needs total_steps to place its pruning window")
        every = opt.schedule.update_every
        c0 = math.floor(self.prune_start * total + 1e-9) // every
        cf = math.floor(self.prune_end * total + 1e-9) // every
        if cf <= c0:
            raise ValueError(
                f"the pruning window of {self.name!r} (steps {self.prune_start * total:g} to "
                f"{self.prune_end * total:g} of total_steps={total}) holds no multiple of "
                f"update_every={every}; widen prune_start/prune_end or lower update_every"
            )
        return c0, cf, every

    def check(self, opt: SparseOptimizer) -> None:
        if opt.total_steps is not None:
            self.window(opt)

    def density_final_step(self, opt: SparseOptimizer) -> int | None:
        _, cf, every = self.window(opt)
        return cf * every

    def is_pruning_step(self, step: int, opt: SparseOptimizer) -> bool:
        """A scheduled event, or any step after the window while the target is not reached yet
        (the last event was skipped, e.g. for non-finite gradients).

        Args:
            step (int): the optimizer step that is running.
            opt (SparseOptimizer): the optimizer.
        """
        c0, cf, every = self.window(opt)
        if step % every == 0 and c0 < step // every <= cf:
            return True
        if step > cf * every:
            layers = opt.layers
            return sum(layer.count for layer in layers) > sum(layer.target for layer in layers)
        return False

    def density_at(self, step: int, opt: SparseOptimizer) -> float:
        """The cubic schedule's overall density after the pruning event at ``step``.

        Args:
            step (int): the optimizer step.
            opt (SparseOptimizer): the optimizer.
        """
        c0, cf, every = self.window(opt)
        return cubic_density(step, c0 * every, cf * every, self.initial_density, 1 - opt.sparsity)

    def is_update_step(self, step: int, opt: SparseOptimizer) -> bool:
        if self.is_pruning_step(step, opt):
            return True
        _, cf, every = self.window(opt)
        return self.periodic and step > cf * every and opt.schedule.is_update_step(step)

    def prune(self, opt: SparseOptimizer, step: int) -> list[Tensor]:
        """Global magnitude pruning of the active weights to the schedule's count at ``step``.

        Args:
            opt (SparseOptimizer): the optimizer; ``opt.layers`` holds the current masks.
            step (int): the pruning event's step.

        Returns:
            The pruned masks, one per layer.
        """
        layers = opt.layers
        _, cf, every = self.window(opt)
        if step >= cf * every:
            keep = sum(layer.target for layer in layers)  # exactly the target total
        else:
            keep = round(self.density_at(step, opt) * sum(layer.numel for layer in layers))
        keep = min(keep, sum(layer.count for layer in layers))
        scores = [
            torch.where(layer.mask, layer.param.detach().abs().float(), float("-inf"))
            for layer in layers
        ]
        return select_largest_across(scores, keep)

    def new_masks(
        self,
        opt: SparseOptimizer,
        rate: float,
        grow_scores: Sequence[Tensor | None],
        step: int | None,
    ) -> list[Tensor]:
        if step is None or not self.is_pruning_step(step, opt):
            return super().new_masks(opt, rate, grow_scores, step)
        pruned = self.prune(opt, step)
        if not self.regrow:
            return pruned
        out = []
        actives = count_active(pruned)
        for layer, mask, scores, active in zip(
            opt.layers, pruned, grow_scores, actives, strict=True
        ):
            k = min(math.floor(rate * active + 1e-9), layer.numel - active)
            out.append(drop_and_grow(mask, self.drop_scores(layer), scores, k)[0])
        return out


class GraNet(GMP):
    """GraNet: gradual magnitude pruning with zero-cost neuroregeneration (Liu et al. 2021).

    GMP's global cubic pruning events, each followed at once by a per-layer regrowth: drop the
    ``floor(rate * active)`` smallest ``|w|`` of each layer and grow as many by the largest
    ``|grad|`` of the current batch (RigL), so the per-layer counts stay as the pruning left them.
    After ``prune_end`` it keeps doing RigL updates at the final density on the optimizer's
    schedule. A weight pruned and regrown in the same event keeps its value.

    Args:
        initial_density (float): the density of the initial masks, in (0, 1]. Default: 0.5
            (GraNet's "s_i = 0.5"); 1.0 starts dense.
        prune_start (float): fraction of ``total_steps`` where pruning starts. Default: 0.0.
        prune_end (float): fraction of ``total_steps`` where it reaches the target. Default: 0.5.
        **options: rejected (no other options).

    Raises:
        ValueError: as for [`GMP`][sparseopt.methods.GMP].

    Examples:
        From density 0.5 to 0.1 in four events, with regrowth after each:

        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "granet", 0.9,
        ...                       update_every=1, total_steps=4, prune_end=1.0, prune_rate=0.5,
        ...                       seed=0)
        >>> densities = [opt.density]
        >>> for _ in range(4):
        ...     model(torch.randn(4, 16)).square().sum().backward()
        ...     opt.step(); opt.zero_grad()
        ...     densities.append(round(opt.density, 4))
        >>> densities[0], densities[-1], opt.layers[0].count
        (0.5, 0.1016, 26)
    """

    name = "granet"
    periodic = True
    regrow = True
    uses_gradient = True

    def __init__(
        self,
        initial_density: float = 0.5,
        prune_start: float = 0.0,
        prune_end: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(initial_density, prune_start, prune_end, **options)
