"""Update timing: when topology updates run, the fraction they move, and the cubic density schedule.

Formerly ``sparseopt.schedules``; that name still imports, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import _validate

__all__ = ["PRUNE_SCHEDULES", "TopologySchedule", "cubic_density"]

PRUNE_SCHEDULES = ("constant", "cosine")
"""The accepted values of ``prune_schedule``: how the drop fraction decays over training."""


@dataclass(frozen=True)
class TopologySchedule:
    """When periodic topology updates run, and the drop fraction ("prune rate") of each.

    An update runs after optimizer step ``t`` (counted from 1) when ``t % update_every == 0`` and,
    if ``end_step`` is set, ``t <= end_step``. The drop fraction is ``prune_rate`` (``"constant"``)
    or ``prune_rate * (1 + cos(pi * t / end_step)) / 2`` (``"cosine"``, as in RigL), so it reaches
    0 at ``end_step``.

    [`SparseSettings`][sparseopt.settings.SparseSettings] builds one from ``update_every``,
    ``prune_rate``, ``prune_schedule`` and ``stop_fraction * total_steps``; ``opt.schedule`` is
    that object. It is the one place that checks those values. It is frozen: a new
    ``total_steps`` builds a new one.

    Args:
        update_every (int): optimizer steps between updates (ΔT).
        prune_rate (float): drop fraction at step 0, in [0, 1].
        decay (str): ``"constant"`` or ``"cosine"``.
        end_step (int | None): last step that may update; ``None`` for no end (constant only).

    Raises:
        ValueError: for a non-positive ``update_every``, a ``prune_rate`` outside [0, 1], an
            unknown ``decay``, a negative ``end_step``, or ``"cosine"`` without ``end_step``.
        TypeError: if ``update_every`` or ``end_step`` is not an int, ``prune_rate`` not a real
            number, or ``decay`` not a string.

    Examples:
        RigL's schedule for 1,000 steps: ΔT = 100, α = 0.3, cosine decay, stop at 75%:

        >>> s = TopologySchedule(100, 0.3, "cosine", 750)
        >>> s.is_update_step(100), s.is_update_step(150), s.is_update_step(800)
        (True, False, False)
        >>> s.rate(375), s.rate(750)
        (0.15, 0.0)
    """

    update_every: int
    prune_rate: float
    decay: str
    end_step: int | None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # a frozen dataclass: its fields are written once, here
        set_(self, "update_every", _validate.integer("update_every", self.update_every, 1))
        set_(self, "prune_rate", float(_validate.real("prune_rate", self.prune_rate, 0, 1)))
        _validate.choice("decay", self.decay, PRUNE_SCHEDULES)
        if self.end_step is not None:  # 0: no update (stop_fraction * total_steps < 1)
            set_(self, "end_step", _validate.integer("end_step", self.end_step, 0))
        if self.decay == "cosine" and self.end_step is None:
            raise ValueError(
                "Expected end_step with decay='cosine' (prune_schedule='cosine' needs total_steps "
                "to know where it ends), but got None"
            )

    def is_update_step(self, step: int) -> bool:
        """Whether a periodic update runs after optimizer step ``step`` (1-based).

        Args:
            step (int): the optimizer step, counted from 1.

        Examples:
            >>> TopologySchedule(10, 0.3, "constant", None).is_update_step(20)
            True
        """
        if step % self.update_every:
            return False
        return self.end_step is None or step <= self.end_step

    def rate(self, step: int) -> float:
        """The drop fraction at optimizer step ``step``.

        Args:
            step (int): the optimizer step, counted from 1; past ``end_step`` it is held there.

        Examples:
            >>> TopologySchedule(10, 0.3, "cosine", 100).rate(50)
            0.15
        """
        if self.decay == "constant":
            return self.prune_rate
        t = min(step, self.end_step)
        if t >= self.end_step:  # the end (0 there; also for end_step 0, where no update runs)
            return 0.0
        return self.prune_rate * 0.5 * (1.0 + math.cos(math.pi * t / self.end_step))


def cubic_density(
    step: int, start: int, end: int, initial_density: float, final_density: float
) -> float:
    """Zhu & Gupta's cubic schedule: density ``initial`` at ``start``, ``final`` from ``end`` on.

    In between, ``d = final + (initial - final) * (1 - (step - start) / (end - start)) ** 3``:
    fast pruning first, slow near the end. GMP and GraNet evaluate it at their pruning events.

    Args:
        step (int): the step at which to evaluate.
        start (int): the step where pruning starts.
        end (int): the step where the density reaches ``final_density``; ``end > start``.
        initial_density (float): the density at ``start``.
        final_density (float): the density from ``end`` on.

    Returns:
        The density at ``step``.

    Examples:
        >>> [round(cubic_density(t, 0, 400, 0.5, 0.1), 4) for t in (0, 100, 200, 400, 500)]
        [0.5, 0.2688, 0.15, 0.1, 0.1]
    """
    if step <= start:
        return initial_density
    if step >= end:
        return final_density
    frac = 1.0 - (step - start) / (end - start)
    return final_density + (initial_density - final_density) * frac**3
