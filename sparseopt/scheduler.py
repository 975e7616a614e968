"""``SupTicketsScheduler``: the Sup-tickets booster (Yin et al., UAI 2022) as an ``LRScheduler``."""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from . import _compat, _validate
from .optimizer import SparseOptimizer
from .superposition import BNUpdate, check_bn_update, check_superposition_args

__all__ = ["BaseFactory", "SupTicketsPlan", "SupTicketsScheduler", "cyclic_lr"]


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


def _build_base(base: Any, optimizer: Any, phase1_steps: int) -> LRScheduler | None:
    """``base`` itself, or what a factory ``base(optimizer, phase1_steps)`` builds; checked."""
    if base is None:
        return None
    if callable(base) and not isinstance(base, LRScheduler):
        try:
            inspect.signature(base).bind(optimizer, phase1_steps)
        except (TypeError, ValueError):
            raise TypeError(
                "Expected base to be an LRScheduler stepped once per iteration, or a factory "
                "(optimizer, phase1_steps) -> LRScheduler, but got a callable that does not take "
                "those two arguments"
            ) from None
        built = base(optimizer, phase1_steps)
        if isinstance(built, ReduceLROnPlateau) or not isinstance(built, LRScheduler):
            raise TypeError(
                "Expected the base factory to return an LRScheduler stepped once per iteration "
                f"without arguments, but it returned {type(built).__name__}"
            )
        base = built
    if isinstance(base, ReduceLROnPlateau) or not isinstance(base, LRScheduler):
        raise TypeError(
            "Expected base to be an LRScheduler stepped once per iteration without "
            f"arguments, or a factory (optimizer, phase1_steps) -> LRScheduler, but got "
            f"{type(base).__name__}"
        )
    if base.optimizer is not optimizer and base.optimizer is not optimizer.optimizer:
        raise ValueError("base must be built on the same optimizer as this scheduler")
    return base


class SupTicketsScheduler(LRScheduler):
    r"""Sup-tickets: cheap tickets in the last cycles of training, superposed into one.

    Step it once per optimizer step, after ``optimizer.step()``, like any per-iteration
    ``LRScheduler``. It counts iterations: a step that a ``GradScaler`` skipped still advances it,
    so a loop of ``total_steps`` iterations ends on ``finalize()``. A call that repeats the last
    one within the same iteration (no optimizer step, backward, ``zero_grad`` or unscale in
    between), as Accelerate makes once per process, is ignored. Training is split in two phases:

    - **Phase 1**, the first ``total_steps - M * cycle_steps`` steps, where
      ``M = floor(superpose_fraction * total_steps / cycle_steps)``: the ``base`` scheduler (any
      per-iteration ``LRScheduler``; a constant rate when ``None``) sets the learning rate and the
      sparse method trains as usual.
    - **Phase 2**, ``M`` cycles of ``cycle_steps``: periodic topology updates stop; each cycle
      starts with one exploration (drop and grow at ``explore_rate`` with the method's own growth
      criterion, on the dense gradient of the cycle's first batch); the rate follows Eq. 3
      ([`cyclic_lr`][sparseopt.cyclic_lr]: ``lr_low`` -> ``lr_high`` at mid-cycle ->
      ``lr_low``); each cycle ends with ``optimizer.consolidate()``. After the last step it
      calls ``optimizer.finalize()``: the model then holds the superposed "ultimate ticket" at
      exactly the target sparsity.

    Per-group rates: a scalar ``lr_low``/``lr_high`` is the first group's; the other groups scale
    it by their initial-rate ratio to the first group, as torch schedulers scale by ``base_lrs``.
    A list gives one value per group.

    Args:
        optimizer (SparseOptimizer): the sparse optimizer.
        total_steps (int): the length of training in optimizer steps. Fills in the optimizer's
            ``total_steps`` if it has none, and must equal it otherwise.
        cycle_steps (int): steps per cycle (the paper: 8 epochs on CIFAR, 2 on ImageNet).
        base (LRScheduler | Callable | None): the phase-1 scheduler, built on the same optimizer
            (or its inner one) before this one; or a factory ``base(optimizer, phase1_steps)``
            that builds it, called once here with the phase-1 length of
            [`plan`][sparseopt.SupTicketsScheduler.plan], e.g.
            ``lambda opt, n: MultiStepLR(opt, [n // 2, 3 * n // 4], 0.1)``. Default: None.
        superpose_fraction (float): the share of training given to the cycles, in (0, 1).
            Default: 0.1.
        lr_low (float | list[float]): the rate at the cycle ends. Default: 0.001.
        lr_high (float | list[float]): the rate at mid-cycle. Default: 0.005.
        explore_rate (float): drop fraction of the exploration that opens each cycle, in [0, 1].
            Default: 0.5.
        averaging (str): ``"cia"``, ``"caa"`` or ``"cima"``. Default: ``"cia"``.
        beta (float): the CIMA decay in [0, 1). Default: 0.8.
        reprune (str): ``"layer"`` or ``"global"``; see
            [`SparseOptimizer.consolidate`][sparseopt.SparseOptimizer.consolidate].
            Default: ``"layer"``.
        include_phase1 (bool): count the model at the end of phase 1 as ticket 0, as the
            official code does: it is consolidated before the first exploration, so the first
            cycle's ticket is averaged with it (``S_1 = prune((T_0 + T_1) / 2)`` under CIA) and
            ``optimizer.tickets`` ends at ``num_tickets + 1``. Default: False.
        bn_update (Iterable | Callable | None): recompute the BatchNorm running statistics of
            the superposed copy after every consolidate, from these batches (the official
            code's ``--update_bn``), instead of averaging them; see
            [`SparseOptimizer.consolidate`][sparseopt.SparseOptimizer.consolidate]. It must be
            iterable again at every ticket (a ``DataLoader``, a list) or a callable that runs
            the forward passes. It is not part of ``state_dict()``: pass it again on resume.
            Default: None.
        last_epoch (int): as for every ``LRScheduler``. Default: -1.

    Raises:
        TypeError: for a number or name of the wrong type (a string ``lr_low``, a float
            ``last_epoch``), or if ``optimizer`` is not a ``SparseOptimizer``, ``base`` is not an
            ``LRScheduler`` stepped per iteration (``ReduceLROnPlateau`` is refused),
            ``include_phase1`` is not a bool, or ``bn_update`` is neither callable nor
            re-iterable.
        ValueError: for a non-positive ``total_steps``/``cycle_steps``/``lr_low``/``lr_high``,
            a ``superpose_fraction`` outside (0, 1), an ``explore_rate`` outside [0, 1], a bad
            ``averaging``/``beta``/``reprune``, a list of rates whose length is not the number
            of param groups, a ``base`` built on another optimizer, a cycle longer than
            ``superpose_fraction * total_steps`` (no ticket), a ``total_steps`` that differs
            from the optimizer's, a method whose pruning reaches into phase 2, a ``bn_update``
            on an optimizer without ``model=``, or ``include_phase1`` on a scheduler built after
            phase 1 ended (``last_epoch >= phase1_steps``: the phase-1 model is gone), or a
            ``last_epoch`` below -1.

    Warns:
        UserWarning: at the first phase-2 step, if the rate at the end of phase 1 is more than
            2x away from ``lr_low``.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer, SupTicketsScheduler
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.001), "rigl", 0.5)
        >>> sched = SupTicketsScheduler(opt, total_steps=100, cycle_steps=4)
        >>> sched.num_tickets, sched.phase1_steps, sched.ticket_steps
        (2, 92, [96, 100])

        The learning rate over a short run with two 4-step cycles (``lr`` after each step):

        >>> model = torch.nn.Linear(16, 4)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.001), "rigl", 0.5,
        ...                       model=model, seed=0)
        >>> sched = SupTicketsScheduler(opt, total_steps=20, cycle_steps=4, superpose_fraction=0.4)
        >>> lrs = []
        >>> for _ in range(20):
        ...     model(torch.randn(2, 16)).sum().backward()
        ...     opt.step(); opt.zero_grad(); sched.step()
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        >>> lrs[10:]
        [0.001, 0.003, 0.005, 0.003, 0.001, 0.003, 0.005, 0.003, 0.001, 0.001]
        >>> opt.tickets, [int(m.sum()) for m in opt.masks.values()]
        (2, [32])
    """

    def __init__(
        self,
        optimizer: SparseOptimizer,
        total_steps: int,
        cycle_steps: int,
        *,
        base: LRScheduler | BaseFactory | None = None,
        superpose_fraction: float = 0.1,
        lr_low: float | Sequence[float] = 0.001,
        lr_high: float | Sequence[float] = 0.005,
        explore_rate: float = 0.5,
        averaging: str = "cia",
        beta: float = 0.8,
        reprune: str = "layer",
        include_phase1: bool = False,
        bn_update: BNUpdate | None = None,
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
        groups = len(optimizer.param_groups)
        lows = _positive_per_group("lr_low", lr_low, groups)
        highs = _positive_per_group("lr_high", lr_high, groups)
        explore_rate = _validate.real("explore_rate", explore_rate, 0, 1)
        check_superposition_args(averaging, beta, reprune, optimizer.structure)
        include_phase1 = _validate.boolean("include_phase1", include_phase1)
        check_bn_update(bn_update)
        if bn_update is not None and optimizer.model is None:
            raise ValueError(
                "bn_update recomputes the BatchNorm statistics of the superposed copy, which "
                "needs the model: pass model= to SparseOptimizer"
            )
        if isinstance(base, LRScheduler) or not callable(base):  # a factory is built below
            _build_base(base, optimizer, 0)
        if optimizer.total_steps is None:
            optimizer.total_steps = total_steps
        elif optimizer.total_steps != total_steps:
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
        settled = optimizer.method.density_final_step(optimizer.context)
        if settled is not None and settled > phase1:
            raise ValueError(
                f"method {optimizer.method.name!r} prunes until step {settled}, but phase 2 of "
                f"Sup-tickets starts after step {phase1}; pruning must finish before phase 2: "
                f"lower prune_end to at most {phase1 / total_steps:.4f}"
            )

        # LRScheduler.__init__ ends with a first step(), so every attribute is set before it.
        self.base = _build_base(base, optimizer, phase1)
        self.total_steps = total_steps
        self.cycle_steps = cycle_steps
        self.superpose_fraction = _validate.real(
            "superpose_fraction", superpose_fraction, 0, 1, low_open=True, high_open=True
        )
        self.num_tickets = num_tickets
        self.phase1_steps = phase1
        self.lr_low = lows
        self.lr_high = highs
        self.explore_rate = float(explore_rate)
        self.averaging = averaging
        self.beta = float(beta)
        self.reprune = reprune
        self.include_phase1 = include_phase1
        self.bn_update = bn_update
        self._last_call: tuple[int, weakref.ref, int] | None = None
        super().__init__(optimizer, last_epoch)

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
        are its README's, 0.001 -> 0.005 -> 0.001. See ``docs/sup-tickets.md`` for what this
        measured against the defaults and the base method.

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
            >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.001), "rigl", 0.8,
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

    @property
    def ticket_steps(self) -> list[int]:
        """The optimizer steps after which a ticket is consolidated."""
        return [self.phase1_steps + k * self.cycle_steps for k in range(1, self.num_tickets + 1)]

    @property
    def in_phase2(self) -> bool:
        """Whether the next optimizer step belongs to the cycles."""
        return self.last_epoch >= self.phase1_steps

    def _phase2_lrs(self, i: int) -> list[float]:
        ratios = [b / self.base_lrs[0] for b in self.base_lrs]
        out = []
        for g in range(len(self.optimizer.param_groups)):
            low = self.lr_low[g] if len(self.lr_low) > 1 else self.lr_low[0] * ratios[g]
            high = self.lr_high[g] if len(self.lr_high) > 1 else self.lr_high[0] * ratios[g]
            done = i > self.num_tickets * self.cycle_steps
            out.append(low if done else _triangle(i, self.cycle_steps, low, high))
        return out

    def get_lr(self) -> list[float]:
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
        elif step == self.phase1_steps + 1:
            last, low = float(self.optimizer.param_groups[0]["lr"]), self.lr_low[0]
            if not 0.5 <= last / low <= 2.0:
                warnings.warn(
                    f"the learning rate at the end of phase 1 ({last:g}) is far from lr_low "
                    f"({low:g}): phase 2 starts with a jump that the paper's schedule avoids; "
                    "let the base schedule end near lr_low",
                    UserWarning,
                    stacklevel=3,
                )

    def step(self, epoch: int | None = None) -> None:
        """Advance one optimizer step: set the next rate; explore, consolidate, finalize on time.

        At the end of phase 1 it stops the optimizer's periodic updates, consolidates the phase-1
        model as ticket 0 if ``include_phase1``, and asks for the first exploration; at each
        ticket step it calls ``consolidate()`` and asks for the next exploration, or, after the
        last step, calls ``finalize()``.

        Args:
            epoch (None): must be ``None``; the schedule is indexed by optimizer steps.

        Raises:
            ValueError: if ``epoch`` is given.
        """
        if epoch is not None:
            raise ValueError(
                "SupTicketsScheduler.step() takes no epoch; step it once per optimizer step"
            )
        if self._repeated_call():
            return
        self._before_rates(self.last_epoch + 1)
        super().step()
        done = self.last_epoch
        opt: SparseOptimizer = self.optimizer  # type: ignore[assignment]
        if done == self.phase1_steps:
            opt.periodic_updates = False
            if self.include_phase1:
                self._consolidate()
            opt.explore(self.explore_rate)
        elif done in self.ticket_steps:
            self._consolidate()
            if done < self.total_steps:
                opt.explore(self.explore_rate)
            else:
                opt.finalize()

    def _consolidate(self) -> None:
        options = {"averaging": self.averaging, "beta": self.beta, "reprune": self.reprune}
        if self.bn_update is not None:
            options["bn_update"] = self.bn_update
        self.optimizer.consolidate(**options)  # type: ignore[attr-defined]

    def _repeated_call(self) -> bool:
        """Whether this call repeats the last one within the same training iteration.

        A call counts when the optimizer stepped since the last one, or when a backward, a
        ``zero_grad`` or an unscale touched the gradients (a step that a ``GradScaler`` skipped
        still counts: the schedule counts iterations). A call with none of these in between is a
        repetition, as Accelerate's ``AcceleratedScheduler`` makes once per process on every
        optimizer step; it is ignored. With no gradient to look at, every call counts.
        """
        opt: SparseOptimizer = self.optimizer  # type: ignore[assignment]
        grad = next(
            (p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None), None
        )
        last, self._last_call = (
            self._last_call,
            None
            if grad is None
            else (opt.step_count, weakref.ref(grad), _compat.tensor_version(grad)),
        )
        return (
            last is not None
            and grad is not None
            and last[0] == opt.step_count
            and last[1]() is grad
            and last[2] == _compat.tensor_version(grad)
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last_call": None}  # a weak reference does not pickle

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, the base scheduler's nested under ``"base"``.

        ``bn_update`` (the user's batches) is not part of it: pass it again when rebuilding.
        """
        skip = ("optimizer", "base", "_last_call", "bn_update")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
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
                ``include_phase1``), or
                with a ``base`` where this one has none, or the reverse.
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
        if (base is None) != (self.base is None):
            saved = "a base scheduler" if base is not None else "no base scheduler"
            mine = "one" if self.base is not None else "none"
            raise ValueError(f"the state dict was saved with {saved}; this scheduler has {mine}")
        self.__dict__.update(state)
        if self.base is not None:
            self.base.load_state_dict(base)
