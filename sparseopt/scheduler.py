"""``SupTicketsScheduler``: the Sup-tickets booster (Yin et al., UAI 2022) as an ``LRScheduler``.

It follows the optimizer's iteration count (``opt.step_count + opt.skipped_steps``, exact under
a ``GradScaler``) instead of guessing: a call with no optimizer step since the last one is a
repeat (Accelerate steps a scheduler once per process) and does nothing, and when the two counts
disagree after a step it names the loop mistake, once (``_warnings``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import Tensor
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
)

from . import _validate, _warnings
from .optimizer import SparseOptimizer
from .superposition import BNUpdate, Select

__all__ = ["BaseFactory", "SupTicketsPlan", "SupTicketsScheduler", "cyclic_lr"]

#: The paper's ratios of the phase-2 rates to each group's phase-1 peak (``initial_lr``):
#: ``lr_low=None`` is 1/100 of it and ``lr_high=None`` 1/20 (SGD at 0.1: exactly 0.001, 0.005).
LOW_RATIO, HIGH_RATIO = 100, 20

#: ``base=`` by name: ``"paper"`` (what ``None`` means) is x0.1 at 1/2 and 3/4 of phase 1, the
#: paper's and the official code's phase 1; ``"shared"`` is x0.1 at 1/2 and 3/4 of the whole run,
#: the base method's own schedule; ``"constant"`` keeps the rate (the default before 0.2).
BASE_NAMES = ("paper", "shared", "constant")


def cyclic_lr(i: int, cycle_steps: int, lr_low: float, lr_high: float) -> float:
    r"""Eq. 3 of the paper: the triangular rate of phase-2 iteration ``i`` (counted from 1).

    With ``t(i) = (mod(i - 1, C) + 1) / C``, the rate rises linearly from ``lr_low`` to
    ``lr_high`` at ``t = 1/2`` and falls back to ``lr_low`` at ``t = 1``, the last iteration of
    each cycle, where the ticket is taken.

    Args:
        i (int): the phase-2 iteration, counted from 1.
        cycle_steps (int): the cycle length ``C``.
        lr_low (float): the rate at the cycle ends.
        lr_high (float): the rate at mid-cycle.

    Returns:
        The learning rate of iteration ``i``.

    Raises:
        TypeError: if ``i`` or ``cycle_steps`` is not an int, or a rate is not a real number.
        ValueError: if ``i`` or ``cycle_steps`` is not positive.

    Examples:
        Two cycles of four steps:

        >>> [round(cyclic_lr(i, 4, 0.001, 0.005), 4) for i in range(1, 9)]
        [0.003, 0.005, 0.003, 0.001, 0.003, 0.005, 0.003, 0.001]
    """
    i = _validate.integer("i", i, 1)
    cycle_steps = _validate.integer("cycle_steps", cycle_steps, 1)
    lr_low, lr_high = _validate.real("lr_low", lr_low), _validate.real("lr_high", lr_high)
    return _triangle(i, cycle_steps, lr_low, lr_high)


def _triangle(i: int, cycle_steps: int, lr_low: Any, lr_high: Any) -> Any:
    """Eq. 3 unchecked: the scheduler's rates may be tensors (a tensor ``lr``)."""
    t = ((i - 1) % cycle_steps + 1) / cycle_steps
    if t <= 0.5:
        return (1.0 - 2.0 * t) * lr_low + 2.0 * t * lr_high
    return (2.0 - 2.0 * t) * lr_high + (2.0 * t - 1.0) * lr_low


def _positive_per_group(name: str, value: Any, groups: int) -> list[float]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if values is not None and len(values) != groups:
        raise ValueError(
            f"{name} must have the same length as optimizer.param_groups. "
            f"{name} has {len(values)} values, param_groups has {groups}."
        )
    return [
        _validate.real(name, v, 0, low_open=True)
        for v in (values if values is not None else [value])
    ]


class SupTicketsPlan(NamedTuple):
    """How Sup-tickets splits a training run: what [`SupTicketsScheduler.plan`][] returns.

    Attributes:
        phase1_steps (int): optimizer steps of phase 1 (the base method and ``base`` schedule).
        tickets (int): the number of cycles ``M``, one cheap ticket each.
        cycle_steps (int): steps per cycle ``C``.
    """

    phase1_steps: int
    tickets: int
    cycle_steps: int

    @property
    def total_steps(self) -> int:
        """``phase1_steps + tickets * cycle_steps``: the whole run."""
        return self.phase1_steps + self.tickets * self.cycle_steps

    @property
    def ticket_steps(self) -> list[int]:
        """The optimizer steps after which a ticket is consolidated (the cycle ends)."""
        return [self.phase1_steps + k * self.cycle_steps for k in range(1, self.tickets + 1)]


#: What ``base=`` takes besides a scheduler: ``factory(optimizer, phase1_steps) -> LRScheduler``,
#: called once by ``SupTicketsScheduler`` with the phase-1 length it computed.
BaseFactory = Callable[[Any, int], LRScheduler]


def _plan(total_steps: Any, cycle_steps: Any, superpose_fraction: Any) -> SupTicketsPlan:
    total_steps = _validate.integer("total_steps", total_steps, 1)
    cycle_steps = _validate.integer("cycle_steps", cycle_steps, 1)
    superpose_fraction = _validate.real(
        "superpose_fraction", superpose_fraction, 0, 1, low_open=True, high_open=True
    )
    budget = superpose_fraction * total_steps
    tickets = math.floor(budget / cycle_steps + 1e-9)
    if tickets == 0:
        hint = (
            f"use cycle_steps <= {math.floor(budget + 1e-9)} for at least one ticket"
            if budget >= 1
            else "increase total_steps or superpose_fraction"
        )
        raise ValueError(
            f"cycle_steps={cycle_steps} is longer than superpose_fraction * total_steps = "
            f"{budget:g}, so there would be no ticket; {hint}"
        )
    return SupTicketsPlan(total_steps - tickets * cycle_steps, tickets, cycle_steps)


def _rates(name: str, value: Any, groups: int) -> list[float] | None:
    """``None`` (relative to each group's ``initial_lr``), or the absolute rates: one value (the
    first group's) or one per group; each positive."""
    if value is None:
        return None
    return _positive_per_group(name, value, groups)


def _peak(group: Mapping[str, Any]) -> Any:
    """A group's phase-1 peak: its ``initial_lr`` (its ``lr`` before any scheduler set one)."""
    return group.get("initial_lr", group["lr"])


def _group_rate(spec: list[float] | None, ratio: int, g: int, peaks: Sequence[Any]) -> Any:
    """The rate of group ``g``: ``peak / ratio`` when relative; else its listed value, or the
    first group's scaled by the initial-rate ratio (torch's ``base_lrs`` convention)."""
    if spec is None:
        return peaks[g] / ratio
    if len(spec) > 1 and g < len(spec):
        return spec[g]
    return spec[0] * (peaks[g] / peaks[0])


def _base_length(base: LRScheduler) -> tuple[int, str] | None:
    """How many optimizer steps a base's own schedule covers, and why (``None``: unbounded)."""
    if isinstance(base, OneCycleLR):
        return base.total_steps, f"total_steps={base.total_steps}"
    if isinstance(base, PolynomialLR):
        return base.total_iters, f"total_iters={base.total_iters}"
    if isinstance(base, CosineAnnealingLR):
        return base.T_max + 1, f"T_max={base.T_max}"
    return None


def _named_base(
    name: str, optimizer: Any, phase1_steps: int, total_steps: int
) -> MultiStepLR | None:
    if name == "constant":
        return None
    length = phase1_steps if name == "paper" else total_steps
    milestones = [max(1, length // 2), max(1, 3 * length // 4)]
    return MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def _check_base(base: Any) -> None:
    """A ``TypeError``/``ValueError`` unless ``base`` is a name, a per-iteration scheduler or a
    factory taking ``(optimizer, phase1_steps)``."""
    if base is None or isinstance(base, str):
        if isinstance(base, str) and base not in BASE_NAMES:
            raise ValueError(
                "Expected base to be an LRScheduler stepped once per iteration, a factory "
                f"(optimizer, phase1_steps) -> LRScheduler, None or one of {BASE_NAMES}, but got "
                f"{base!r}"
            )
        return
    if callable(base) and not isinstance(base, LRScheduler):
        try:
            inspect.signature(base).bind(object(), 0)
        except (TypeError, ValueError):
            raise TypeError(
                "Expected base to be an LRScheduler stepped once per iteration, or a factory "
                "(optimizer, phase1_steps) -> LRScheduler, but got a callable that does not take "
                "those two arguments"
            ) from None
        return
    if isinstance(base, ReduceLROnPlateau) or not isinstance(base, LRScheduler):
        raise TypeError(
            "Expected base to be an LRScheduler stepped once per iteration without "
            f"arguments, or a factory (optimizer, phase1_steps) -> LRScheduler, but got "
            f"{type(base).__name__}"
        )


def _build_base(base: Any, optimizer: Any, plan: SupTicketsPlan) -> LRScheduler | None:
    """``base`` itself, what a factory ``base(optimizer, phase1_steps)`` builds, or the named
    schedule; checked (its own length must cover phase 1)."""
    phase1 = plan.phase1_steps
    if base is None or isinstance(base, str):
        return _named_base(base or "paper", optimizer, phase1, plan.total_steps)
    if callable(base) and not isinstance(base, LRScheduler):
        built = base(optimizer, phase1)
        if isinstance(built, ReduceLROnPlateau) or not isinstance(built, LRScheduler):
            raise TypeError(
                "Expected the base factory to return an LRScheduler stepped once per iteration "
                f"without arguments, but it returned {type(built).__name__}"
            )
        base = built
    if base.optimizer is not optimizer and base.optimizer is not optimizer.optimizer:
        raise ValueError("base must be built on the same optimizer as this scheduler")
    length = _base_length(base)
    if length is not None and length[0] < phase1:
        raise ValueError(
            f"Expected a base whose own schedule covers phase 1 ({phase1} steps), but "
            f"{type(base).__name__} ends after {length[0]} ({length[1]}); build it for "
            "phase 1, e.g. with a factory base=lambda opt, n: ... that gets n = phase1_steps"
        )
    return base


class SupTicketsScheduler(LRScheduler):
    r"""Sup-tickets: cheap tickets in the last cycles of training, superposed into one.

    Step it once per optimizer step, right after ``optimizer.step()``, like any per-iteration
    ``LRScheduler``. It follows the optimizer's iteration count (``step_count +
    skipped_steps``: a step that a ``GradScaler`` skipped is an iteration too), so a loop of
    ``total_steps`` iterations ends on ``finalize()``; a call with no optimizer step since the
    last one (Accelerate makes one per process) does nothing. Training is split in two phases
    ([`plan`][sparseopt.SupTicketsScheduler.plan]):

    - **Phase 1**, the first ``total_steps - M * cycle_steps`` steps, where
      ``M = floor(superpose_fraction * total_steps / cycle_steps)``: the ``base`` scheduler sets
      the learning rate and the sparse method trains as usual.
    - **Phase 2**, ``M`` cycles of ``cycle_steps``: periodic topology updates stop; each cycle
      starts with one exploration (drop and grow at ``explore_rate`` with the method's own growth
      criterion, on the dense gradient of the cycle's first batch); the rate follows Eq. 3
      ([`cyclic_lr`][sparseopt.cyclic_lr]: ``lr_low`` -> ``lr_high`` at mid-cycle ->
      ``lr_low``); each cycle ends with ``optimizer.consolidate()``. After the last step it
      calls ``optimizer.finalize()``: the model then holds the "ultimate ticket" at exactly the
      target sparsity.

    **Rates follow the optimizer.** ``lr_low=None`` and ``lr_high=None`` are 1/100 and 1/20 of
    each param group's phase-1 peak (its ``initial_lr``): SGD at 0.1 gets exactly the paper's
    0.001 and 0.005, AdamW at 1e-3 gets 1e-5 and 5e-5. A float is absolute: the first group's
    rate, which the other groups scale by their initial-rate ratio (as torch schedulers scale by
    ``base_lrs``); a list gives one value per group. A group added with ``add_param_group``
    after this scheduler was built takes its ``lr`` at that time as its peak and gets its own
    rates by the same rules (a list's first value, scaled).

    **The phase-1 schedule.** ``base=None`` is the paper's: x0.1 at 1/2 and 3/4 of phase 1, as
    the paper and the official code do. It ends exactly at the relative ``lr_low``, so phase 2
    continues phase 1 without a jump. ``base="shared"`` puts the milestones at 1/2 and 3/4 of
    the whole run (the base method's own schedule: phase 1 is then its first steps unchanged),
    ``base="constant"`` keeps the rate (the default before 0.2).

    Args:
        optimizer (SparseOptimizer): the sparse optimizer.
        total_steps (int): the length of training in optimizer steps. Fills in the optimizer's
            ``total_steps`` if it has none, and must equal it otherwise.
        cycle_steps (int): steps per cycle (the paper: 8 epochs on CIFAR, 2 on ImageNet).
        base (LRScheduler | Callable | str | None): the phase-1 scheduler, built on the same
            optimizer (or its inner one) before this one and stepped by this one (not by the
            loop); or a factory ``base(optimizer, phase1_steps)`` that builds it, called once
            here with the phase-1 length, e.g.
            ``lambda opt, n: MultiStepLR(opt, [n // 2, 3 * n // 4], 0.1)``; or ``"paper"``,
            ``"shared"``, ``"constant"``. A scheduler whose own length is shorter than phase 1
            (``OneCycleLR``'s ``total_steps``, ``PolynomialLR``'s ``total_iters``,
            ``CosineAnnealingLR``'s ``T_max + 1``) is refused. Default: None (``"paper"``).
        superpose_fraction (float): the share of training given to the cycles, in (0, 1).
            Default: 0.1.
        lr_low (float | list[float] | None): the rate at the cycle ends. Default: None (1/100
            of each group's ``initial_lr``).
        lr_high (float | list[float] | None): the rate at mid-cycle, at least ``lr_low``.
            Default: None (1/20 of each group's ``initial_lr``).
        explore_rate (float): drop fraction of the exploration that opens each cycle, in [0, 1].
            Default: 0.5.
        averaging (str): ``"cia"``, ``"caa"`` or ``"cima"``. Default: ``"cia"``.
        beta (float): the CIMA decay in [0, 1). Default: 0.8.
        reprune (str): ``"layer"`` or ``"global"``; see
            [`SparseOptimizer.configure_superposition`][sparseopt.SparseOptimizer.configure_superposition].
            Default: ``"layer"``.
        include_phase1 (bool): count the model at the end of phase 1 as ticket 0, as the
            official code does: it is consolidated before the first exploration, so the first
            cycle's ticket is averaged with it (``S_1 = prune((T_0 + T_1) / 2)`` under CIA) and
            ``optimizer.tickets`` ends at ``num_tickets + 1``. Default: False.
        bn_update (Iterable | Callable | None): recompute the BatchNorm running statistics of
            the superposed copy after every consolidate from these batches (the official
            code's ``--update_bn``) instead of averaging them. It must be iterable again at every
            ticket (a ``DataLoader``, a list) or a callable that runs the forward passes. It is
            not part of ``state_dict()``: pass it again on resume. Default: None.
        select (Callable | None): ``fn(model) -> float``, higher is better (validation accuracy,
            minus a validation loss): at the end, the best-scoring of the phase-1 model, every
            live ticket at its cycle end, their greedy soup and the superposition becomes the
            ultimate ticket, so it never scores below any of them (``docs/sup-tickets.md``). The
            phase-1 model is kept and scored with ``include_phase1=False`` too. Not part of
            ``state_dict()``: pass it again on resume. Default: None.
        last_epoch (int): as for every ``LRScheduler``. Default: -1.

    Raises:
        TypeError: for a number or name of the wrong type (a string ``lr_low``, a float
            ``last_epoch``), or if ``optimizer`` is not a ``SparseOptimizer``, ``base`` is not an
            ``LRScheduler`` stepped per iteration (``ReduceLROnPlateau`` is refused) nor a
            factory nor a name, ``include_phase1`` is not a bool, ``bn_update`` is neither
            callable nor re-iterable, or ``select`` is not callable.
        ValueError: for a non-positive ``total_steps``/``cycle_steps``/``lr_low``/``lr_high``,
            ``lr_high < lr_low``, a ``superpose_fraction`` outside (0, 1), an ``explore_rate``
            outside [0, 1], a bad ``averaging``/``beta``/``reprune``, a list of rates whose
            length is not the number of param groups, an unknown ``base`` name, a ``base`` built
            on another optimizer or shorter than phase 1, a cycle longer than
            ``superpose_fraction * total_steps`` (no ticket), a ``total_steps`` that differs from
            the optimizer's, a method whose pruning reaches into phase 2, ``bn_update`` or
            ``select`` on an optimizer without ``model=``, settings that differ from a
            superposition that holds tickets already, ``include_phase1`` on a scheduler built
            after phase 1 ended, or a ``last_epoch`` below -1.

    Warns:
        UserWarning: once each, naming the mistake and the fix, at the user's line: one ticket
            (``M == 1``: nothing is averaged), at construction; the rate at the end of phase 1
            more than 2x away from ``lr_low``; ``step()`` before the first ``opt.step()``;
            ``step()`` called less often than the optimizer steps (once per epoch); a resume
            that restored the optimizer but not this scheduler (or the reverse); a base
            scheduler stepped from outside.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer, SupTicketsScheduler
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.5)
        >>> sched = SupTicketsScheduler(opt, total_steps=100, cycle_steps=4)
        >>> sched.num_tickets, sched.phase1_steps, sched.ticket_steps
        (2, 92, [96, 100])

        The learning rate of each step of a short run with two 4-step cycles: the paper's phase
        1 (x0.1 after steps 6 and 9 of 12) ends at 0.1 / 100, and the cycles climb to 0.1 / 20.

        >>> model = torch.nn.Linear(16, 4)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.5,
        ...                       model=model, seed=0)
        >>> sched = SupTicketsScheduler(opt, total_steps=20, cycle_steps=4, superpose_fraction=0.4)
        >>> lrs = []
        >>> for _ in range(20):
        ...     model(torch.randn(2, 16)).sum().backward()
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step(); opt.zero_grad(); sched.step()
        >>> lrs[:12]
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001]
        >>> lrs[12:]
        [0.003, 0.005, 0.003, 0.001, 0.003, 0.005, 0.003, 0.001]
        >>> opt.tickets, [int(m.sum()) for m in opt.masks.values()]
        (2, [32])
    """

    def __init__(
        self,
        optimizer: SparseOptimizer,
        total_steps: int,
        cycle_steps: int,
        *,
        base: LRScheduler | BaseFactory | str | None = None,
        superpose_fraction: float = 0.1,
        lr_low: float | Sequence[float] | None = None,
        lr_high: float | Sequence[float] | None = None,
        explore_rate: float = 0.5,
        averaging: str = "cia",
        beta: float = 0.8,
        reprune: str = "layer",
        include_phase1: bool = False,
        bn_update: BNUpdate | None = None,
        select: Select | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(
                "Expected optimizer to be a SparseOptimizer, but got "
                f"{type(optimizer).__name__}; wrap it: SparseOptimizer(optimizer, ...)"
            )
        plan = _plan(total_steps, cycle_steps, superpose_fraction)
        total_steps, cycle_steps, num_tickets = plan.total_steps, plan.cycle_steps, plan.tickets
        last_epoch = _validate.integer("last_epoch", last_epoch, -1)
        groups = optimizer.param_groups
        lows, highs = _rates("lr_low", lr_low, len(groups)), _rates("lr_high", lr_high, len(groups))
        peaks = [_peak(g) for g in groups]
        for g in range(len(groups)):
            low = float(_group_rate(lows, LOW_RATIO, g, peaks))
            high = float(_group_rate(highs, HIGH_RATIO, g, peaks))
            if high < low:
                where = f" for param group {g}" if len(groups) > 1 else ""
                raise ValueError(
                    f"Expected lr_high >= lr_low{where}, but got lr_high={high:g} < "
                    f"lr_low={low:g}: the cycles would run upside down (from lr_low down to "
                    "lr_high and back)"
                )
        explore_rate = _validate.real("explore_rate", explore_rate, 0, 1)
        include_phase1 = _validate.boolean("include_phase1", include_phase1)
        _check_base(base)
        if optimizer.total_steps is not None and optimizer.total_steps != total_steps:
            raise ValueError(
                f"total_steps={total_steps} differs from the optimizer's "
                f"total_steps={optimizer.total_steps}"
            )
        phase1 = plan.phase1_steps
        if include_phase1 and last_epoch >= phase1:
            raise ValueError(
                f"include_phase1=True counts the model at the end of phase 1 (step {phase1}) as "
                f"ticket 0, but this scheduler starts at last_epoch={last_epoch}, after phase 1"
            )
        # the superposition's settings are checked (once) and fixed here
        optimizer.configure_superposition(
            averaging=averaging, beta=beta, reprune=reprune, bn_update=bn_update, select=select
        )
        if optimizer.total_steps is None:
            optimizer.total_steps = total_steps
        settled = optimizer.method.density_final_step(optimizer.context)
        if settled is not None and settled > phase1:
            raise ValueError(
                f"method {optimizer.method.name!r} prunes until step {settled}, but phase 2 of "
                f"Sup-tickets starts after step {phase1}; pruning must finish before phase 2: "
                f"lower prune_end to at most {phase1 / total_steps:.4f}"
            )
        self._once = _warnings.Once()
        if num_tickets == 1 and not include_phase1:
            two = math.floor(superpose_fraction * total_steps / 2 + 1e-9)
            self._once.warn(
                "one-ticket",
                f"Sup-tickets with one ticket (M = floor({superpose_fraction:g} * {total_steps} / "
                f"{cycle_steps}) = 1): nothing is averaged, and the ultimate ticket is the last "
                f"live ticket re-pruned; for two tickets use cycle_steps <= {two} or a larger "
                "superpose_fraction (or include_phase1=True)",
            )

        # LRScheduler.__init__ ends with a first step(), so every attribute is set before it.
        self.base = _build_base(base, optimizer, plan)
        self._default_base = base is None  # the paper's schedule, because nothing was asked
        self.total_steps = total_steps
        self.cycle_steps = cycle_steps
        self.superpose_fraction = float(superpose_fraction)
        self.num_tickets = num_tickets
        self.phase1_steps = phase1
        self.lr_low = lows
        self.lr_high = highs
        self.explore_rate = float(explore_rate)
        self.include_phase1 = include_phase1
        self._initializing = True
        super().__init__(optimizer, last_epoch)
        self._initializing = False
        self._sync()

    #: The official code's phase 2 (luuyin/Sup-tickets, its CIFAR README), as options.
    OFFICIAL: Mapping[str, Any] = MappingProxyType(
        {
            "include_phase1": True,
            "reprune": "global",
            "averaging": "cia",
            "explore_rate": 0.5,
            "lr_low": 0.001,
            "lr_high": 0.005,
        }
    )

    @staticmethod
    def plan(total_steps: int, cycle_steps: int, superpose_fraction: float = 0.1) -> SupTicketsPlan:
        """The split of a run into phase 1 and ``M`` cycles: the one place it is computed.

        ``M = floor(superpose_fraction * total_steps / cycle_steps)`` tickets, and phase 1 is the
        first ``total_steps - M * cycle_steps`` steps. The scheduler uses it; so can a script
        that needs the phase-1 length before the scheduler exists (or pass ``base=`` a factory).

        Args:
            total_steps (int): the length of training in optimizer steps.
            cycle_steps (int): steps per cycle.
            superpose_fraction (float): the share of training given to the cycles, in (0, 1).
                Default: 0.1.

        Returns:
            A [`SupTicketsPlan`][sparseopt.scheduler.SupTicketsPlan]
            ``(phase1_steps, tickets, cycle_steps)``.

        Raises:
            TypeError: for a step count that is not an int, or a fraction that is not real.
            ValueError: for a non-positive step count, a fraction outside (0, 1), or a cycle
                longer than ``superpose_fraction * total_steps`` (no ticket).

        Examples:
            >>> from sparseopt import SupTicketsScheduler
            >>> plan = SupTicketsScheduler.plan(1000, 30)
            >>> plan
            SupTicketsPlan(phase1_steps=910, tickets=3, cycle_steps=30)
            >>> plan.ticket_steps
            [940, 970, 1000]
        """
        return _plan(total_steps, cycle_steps, superpose_fraction)

    @classmethod
    def official(
        cls,
        optimizer: SparseOptimizer,
        total_steps: int,
        cycle_steps: int,
        bn_update: BNUpdate | None,
        **overrides: Any,
    ) -> SupTicketsScheduler:
        """The phase 2 that the official code runs, which differs from the paper's text.

        The phase-1 model is ticket 0 (``include_phase1=True``); the BatchNorm statistics of the
        superposed copy are recomputed from ``bn_update`` after every consolidate (its
        ``--update_bn``; ``None`` averages them instead); the re-prune is global
        (``reprune="global"``); each cycle opens with an exploration at rate 0.5 with the
        method's growth (``--large-death-rate 0.5``); the running mean over the pruned previous
        copy and the new ticket is what the code calls CAA and this library ``"cia"``; the rates
        are its README's, 0.001 -> 0.005 -> 0.001, absolute (they assume SGD at 0.1). See
        ``docs/sup-tickets.md`` for what this measured against the defaults and the base method.

        Args:
            optimizer (SparseOptimizer): the sparse optimizer (with ``model=`` for
                ``bn_update``).
            total_steps (int): the length of training in optimizer steps.
            cycle_steps (int): steps per cycle.
            bn_update (Iterable | Callable | None): the batches that recompute the BatchNorm
                statistics (the official code: one pass over the training loader).
            **overrides: any other argument of the constructor (``base``,
                ``superpose_fraction``, ...), or one of the options above to change it.

        Returns:
            The scheduler.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer, SupTicketsScheduler
            >>> nn = torch.nn
            >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.8,
            ...                       model=model)
            >>> batches = [torch.randn(8, 8) for _ in range(4)]
            >>> sched = SupTicketsScheduler.official(opt, 100, 5, batches)
            >>> sched.include_phase1, sched.reprune, sched.explore_rate, sched.num_tickets
            (True, 'global', 0.5, 2)
        """
        return cls(
            optimizer,
            total_steps,
            cycle_steps,
            bn_update=bn_update,
            **{**cls.OFFICIAL, **overrides},
        )

    @classmethod
    def recommended(
        cls,
        optimizer: SparseOptimizer,
        total_steps: int,
        cycle_steps: int,
        *,
        select: Select,
        bn_update: BNUpdate | None,
        **overrides: Any,
    ) -> SupTicketsScheduler:
        """The setting our study recommends, and a validated ultimate ticket: Sup-tickets that
        never ends below its own phase-1 model or live tickets on ``select``'s score.

        - ``explore_rate=0.1``: a small exploration at each cycle start (the paper's 0.5 is what
          costs 2 to 22 points at the scales we measured);
        - ``lr_high`` half of each group's ``initial_lr`` (0.05 for SGD at 0.1), ``lr_low`` the
          relative default (1/100);
        - ``bn_update``: the BatchNorm statistics of every superposition and soup recomputed;
        - ``base="shared"``: phase 1 keeps the base method's own schedule (x0.1 at 1/2 and 3/4
          of the whole run), so it is the base run's first steps;
        - ``select``: the best-scoring of the phase-1 model, the live tickets, their greedy soup
          and the superposition is the ultimate ticket.

        The evidence (``docs/study/short.md``, ``short-shared.md`` and ``wide.md``, "Choice on
        validation", rerun after the study's branching fix): this setting
        (``high0.05-explore0.1-bn``) was the best of every variant on validation in all three
        regimes: +0.40 (95% CI [-0.00, +0.81]) and +0.41 ([-0.42, +1.24]) points over the base
        method where phase 1 keeps its schedule, -0.38 where the paper compresses it; on test
        +0.20, +0.24 and -0.30. ``select`` is what keeps a bad cell from ending below its own
        candidates. On the SET paper's wide MLP (``docs/study/wide-mlp.md``) validation chose
        ``explore_rate=0.0`` with ``lr_high`` a fifth of the peak instead (+0.10 on test over 13
        pairs, this preset -0.09).

        Args:
            optimizer (SparseOptimizer): the sparse optimizer, with ``model=``.
            total_steps (int): the length of training in optimizer steps.
            cycle_steps (int): steps per cycle.
            select (Callable): ``fn(model) -> float``, higher is better, e.g. accuracy on a
                validation split (not the test split).
            bn_update (Iterable | Callable | None): the batches that recompute the BatchNorm
                statistics (``None`` averages them; the study recomputed them).
            **overrides: any other argument of the constructor, or one of the settings above.

        Returns:
            The scheduler.

        Examples:
            >>> import torch
            >>> from sparseopt import SparseOptimizer, SupTicketsScheduler
            >>> model = torch.nn.Linear(8, 2)
            >>> opt = SparseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), "rigl",
            ...                       0.8, model=model)
            >>> sched = SupTicketsScheduler.recommended(opt, 100, 5, select=lambda m: 0.0,
            ...                                         bn_update=None)
            >>> sched.explore_rate, sched.lr_high, sched.base.milestones
            (0.1, [0.0005], Counter({50: 1, 75: 1}))
        """
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(
                "Expected optimizer to be a SparseOptimizer, but got "
                f"{type(optimizer).__name__}; wrap it: SparseOptimizer(optimizer, ...)"
            )
        if select is None:
            raise TypeError(
                "Expected select to be a callable fn(model) -> float (higher is better): the "
                "recommended setting validates the ultimate ticket with it, but got None"
            )
        options: dict[str, Any] = {
            "explore_rate": 0.1,
            "base": "shared",
            "lr_high": [_peak(g) / 2 for g in optimizer.param_groups],
        }
        return cls(
            optimizer,
            total_steps,
            cycle_steps,
            select=select,
            bn_update=bn_update,
            **{**options, **overrides},
        )

    # --- the superposition's settings, as the optimizer holds them ------------------------------
    def _settings(self) -> Any:
        return self.optimizer.superposition.settings  # type: ignore[attr-defined]

    @property
    def averaging(self) -> str:
        """The superposition's averaging rule."""
        return self._settings().averaging

    @property
    def beta(self) -> float:
        """The superposition's CIMA decay."""
        return self._settings().beta

    @property
    def reprune(self) -> str:
        """The superposition's re-prune."""
        return self._settings().reprune

    @property
    def bn_update(self) -> BNUpdate | None:
        """The batches (or callable) that recompute the BatchNorm statistics, or ``None``."""
        return self._settings().bn_update

    @property
    def select(self) -> Select | None:
        """The scorer of the validated ultimate ticket, or ``None``."""
        return self._settings().select

    @property
    def ticket_steps(self) -> list[int]:
        """The optimizer steps after which a ticket is consolidated."""
        return [self.phase1_steps + k * self.cycle_steps for k in range(1, self.num_tickets + 1)]

    @property
    def in_phase2(self) -> bool:
        """Whether the next optimizer step belongs to the cycles."""
        return self.last_epoch >= self.phase1_steps

    # --- the rates ------------------------------------------------------------------------------
    def _phase2_lrs(self, i: int) -> list[Any]:
        groups = self.optimizer.param_groups
        peaks = [_peak(group) for group in groups]
        done = i > self.num_tickets * self.cycle_steps
        out = []
        for g in range(len(groups)):
            low = _group_rate(self.lr_low, LOW_RATIO, g, peaks)
            high = _group_rate(self.lr_high, HIGH_RATIO, g, peaks)
            out.append(low if done else _triangle(i, self.cycle_steps, low, high))
        return out

    def get_lr(self) -> list[Any]:
        """The rates for the next optimizer step (``last_epoch + 1``, counted from 1).

        It only computes, as torch's schedulers do: in phase 1 the rates the base scheduler (or
        the constant rate) has set, which [`step`][sparseopt.SupTicketsScheduler.step] advanced
        before calling it; in phase 2 Eq. 3.
        """
        step = self.last_epoch + 1
        if step <= self.phase1_steps:
            return [group["lr"] for group in self.optimizer.param_groups]
        return self._phase2_lrs(step - self.phase1_steps)

    def _before_rates(self, epoch: int) -> None:
        """What must happen before the rates of ``last_epoch = epoch`` are computed: step the
        base scheduler in phase 1; warn at the jump into phase 2."""
        step = epoch + 1
        if step <= self.phase1_steps:
            if self.base is not None and epoch > 0:
                self.base.step()
                self._base_epoch = self.base.last_epoch
        elif step == self.phase1_steps + 1:
            group = self.optimizer.param_groups[0]
            last = float(group["lr"])
            low = float(_group_rate(self.lr_low, LOW_RATIO, 0, [group.get("initial_lr", last)]))
            if not 0.5 <= last / low <= 2.0:
                self._once.warn(
                    "jump",
                    f"the learning rate at the end of phase 1 ({last:g}) is far from lr_low "
                    f"({low:g}): phase 2 starts with a jump that the paper's schedule avoids; "
                    "let the base schedule end near lr_low (base=None, the paper's schedule, "
                    "ends at the relative lr_low)",
                )

    # --- the loop -------------------------------------------------------------------------------
    def _iterations(self) -> int:
        """The optimizer's training iterations: its steps and the ones a GradScaler skipped."""
        opt: SparseOptimizer = self.optimizer  # type: ignore[assignment]
        return opt.step_count + opt.skipped_steps

    def _sync(self) -> None:
        """After construction or a load: the next call counts if the optimizer is ahead."""
        self._calls_seen: int | None = None
        self._calls_built = self.optimizer._suptickets.step_calls  # type: ignore[attr-defined]
        self._base_epoch = None if self.base is None else self.base.last_epoch

    def _counts(self) -> tuple[bool, int]:
        """Whether this call is a new iteration, and the optimizer's step() calls since the last
        counted one (this process)."""
        calls = self.optimizer._suptickets.step_calls  # type: ignore[attr-defined]
        if self._calls_seen is not None:
            since = calls - self._calls_seen
        else:  # the first call since construction or a load
            since = calls - self._calls_built
            behind = self._iterations() - self.last_epoch
            if since == 0 and behind <= 0:
                if behind < 0:
                    self._warn_ahead()
                else:
                    self._once.warn(
                        "before-step",
                        "SupTicketsScheduler.step() was called before optimizer.step(): the call "
                        "is ignored (no iteration happened yet); call sched.step() after "
                        "opt.step(), or the last ticket is never consolidated and finalize() "
                        "never runs",
                    )
                return False, 0
        if since == 0 and self._calls_seen is not None:
            return False, 0  # a repeat within the same iteration (Accelerate, one per process)
        self._calls_seen = calls
        return True, since

    def _warn_ahead(self) -> None:
        self._once.warn(
            "ahead",
            f"this scheduler is at step {self.last_epoch}, ahead of the optimizer's "
            f"{self._iterations()} training iterations: a resume that restored the scheduler's "
            "state but not the optimizer's (load both), or sched.step() called before "
            "opt.step() (call it after)",
        )

    def _check_loop(self, since: int) -> None:
        """After a counted step: the scheduler and the optimizer must agree."""
        iterations = self._iterations()
        if self.last_epoch < iterations and since > 1:
            self._once.warn(
                "per-epoch",
                f"the optimizer made {since} steps since the last SupTicketsScheduler.step(): it "
                "counts optimizer steps, not epochs; call sched.step() after every "
                "opt.step(), inside the batch loop, or the cycles, tickets and finalize() fall "
                "on the wrong steps",
            )
        elif self.last_epoch < iterations:
            self._once.warn(
                "resume",
                f"the optimizer has made {iterations} training iterations, but this scheduler "
                f"is at step {self.last_epoch}: a resume that restored the optimizer's state but "
                "not the scheduler's; build the scheduler as before and load its state too "
                "(sched.load_state_dict(saved['sched']))",
            )
        elif self.last_epoch > iterations:
            self._warn_ahead()

    def _check_base(self) -> None:
        """Before this scheduler steps the base: nobody else may have."""
        if self.base is not None and self.base.last_epoch != self._base_epoch:
            self._once.warn(
                "base-outside",
                f"the base scheduler ({type(self.base).__name__}) was stepped from outside: "
                "SupTicketsScheduler steps base= itself, once per optimizer step in phase 1; "
                "remove base.step() from the loop (it moves phase 1's rate twice as fast, and "
                "phase 2 overrides it)",
            )
            self._base_epoch = self.base.last_epoch

    def step(self, epoch: int | None = None) -> None:
        """Advance one optimizer step: set the next rate; explore, consolidate, finalize on time.

        At the end of phase 1 it stops the optimizer's periodic updates, consolidates the phase-1
        model as ticket 0 if ``include_phase1`` (and keeps it for ``select``), and asks for the
        first exploration; at each ticket step it calls ``consolidate()`` and asks for the next
        exploration, or, after the last step, calls ``finalize()``. A call with no optimizer step
        since the last one does nothing.

        Args:
            epoch (None): must be ``None``; the schedule is indexed by optimizer steps.

        Raises:
            ValueError: if ``epoch`` is given.
        """
        if epoch is not None:
            raise ValueError(
                "SupTicketsScheduler.step() takes no epoch; step it once per optimizer step"
            )
        if self._initializing:
            self._before_rates(self.last_epoch + 1)
            super().step()
            return
        new, since = self._counts()
        if not new:
            return
        self._check_base()
        for group in self.optimizer.param_groups:  # a group added since: its lr now is its peak
            if "initial_lr" not in group:
                lr = group["lr"]
                group["initial_lr"] = lr.clone() if isinstance(lr, Tensor) else lr
        self._before_rates(self.last_epoch + 1)
        super().step()
        done = self.last_epoch
        opt: SparseOptimizer = self.optimizer  # type: ignore[assignment]
        if done == self.phase1_steps:
            opt.periodic_updates = False
            if self.include_phase1 or self.select is not None:
                opt._suptickets.take_ticket(fold=self.include_phase1, name="phase 1")
            opt.explore(self.explore_rate)
        elif done in self.ticket_steps:
            opt.consolidate()
            if done < self.total_steps:
                opt.explore(self.explore_rate)
            else:
                opt.finalize()
        self._check_loop(since)

    # --- state and printing ---------------------------------------------------------------------
    _NOT_SAVED = (
        "optimizer", "base", "_once", "_initializing", "_calls_seen", "_calls_built",
        "_base_epoch", "_default_base",
    )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, the base scheduler's nested under ``"base"``.

        ``bn_update`` and ``select`` (the user's objects) are not part of it: pass them again
        when rebuilding.
        """
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_SAVED}
        settings = self._settings()
        state.update(averaging=settings.averaging, beta=settings.beta, reprune=settings.reprune)
        state["base"] = None if self.base is None else self.base.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what [`state_dict`][sparseopt.SupTicketsScheduler.state_dict] returned.

        Build this scheduler (and its ``base``) as before, then load.

        Args:
            state_dict (dict): the saved state.

        Raises:
            TypeError: if ``state_dict`` is not a mapping.
            ValueError: if the state was saved by a scheduler with another schedule
                (``total_steps``, ``cycle_steps``, the split, ``averaging``, ``reprune``,
                ``include_phase1``), or with a ``base`` where this one has none, or the reverse
                (but a state saved without a base, by sparseopt 0.1's default, loads into a
                scheduler built with ``base=None``: its phase 1 stays constant).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "Expected state_dict to be a dict made by SupTicketsScheduler.state_dict(), but "
                f"got {type(state_dict).__name__}"
            )
        state = dict(state_dict)
        keys = (
            "total_steps",
            "cycle_steps",
            "num_tickets",
            "phase1_steps",
            "averaging",
            "reprune",
            "include_phase1",
        )
        differ = [
            f"{k}={state[k]!r} vs this scheduler's {getattr(self, k)!r}"
            for k in keys
            if k in state and state[k] != getattr(self, k)
        ]
        if differ:
            raise ValueError(
                "the state dict was saved by a scheduler with another schedule: "
                + "; ".join(differ)
            )
        base = state.pop("base", None)
        if base is None and self.base is not None and self._default_base:
            self.base = None  # saved by sparseopt 0.1 without a base: its constant phase 1
        if (base is None) != (self.base is None):
            if base is None:
                raise ValueError(
                    "the state dict was saved with no base scheduler (a constant phase 1, the "
                    "default before sparseopt 0.2); this scheduler has one: build it with "
                    "base='constant' to resume that run"
                )
            raise ValueError("the state dict was saved with a base scheduler; this one has none")
        for key in ("averaging", "beta", "reprune", "bn_update", "_last_call"):
            state.pop(key, None)  # the optimizer holds the settings; 0.1.0's guess is gone
        self.__dict__.update(state)
        if self.base is not None:
            self.base.load_state_dict(base)
        self._sync()

    def __repr__(self) -> str:
        opt: SparseOptimizer = self.optimizer  # type: ignore[assignment]

        def rate(spec: list[float] | None, ratio: int) -> str:
            if spec is None:
                return f"initial_lr/{ratio}"
            return (
                f"{spec[0]:g}" if len(spec) == 1 else "[" + ", ".join(f"{v:g}" for v in spec) + "]"
            )

        phase = "phase 2" if self.in_phase2 else "phase 1"
        base = "constant" if self.base is None else type(self.base).__name__
        done = (
            ", finalized" if opt.superposition is not None and opt.superposition.finalized else ""
        )
        return (
            f"SupTicketsScheduler(step={self.last_epoch}/{self.total_steps} ({phase}{done}), "
            f"phase1_steps={self.phase1_steps}, tickets={opt.tickets}/{self.num_tickets} of "
            f"{self.cycle_steps} steps, base={base}, lr_low={rate(self.lr_low, LOW_RATIO)}, "
            f"lr_high={rate(self.lr_high, HIGH_RATIO)}, explore_rate={self.explore_rate}, "
            f"include_phase1={self.include_phase1}, {self._settings().describe()})"
        )
