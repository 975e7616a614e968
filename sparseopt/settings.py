"""The settings of a sparse optimizer: one frozen object, validated once where it is built.

``SparseOptimizer`` builds a [`SparseSettings`][sparseopt.settings.SparseSettings] from its
keyword arguments, and a new one (``dataclasses.replace``) when ``total_steps`` is set; every lower
floor (the mask engine, the methods through their ``MethodContext``) reads it and checks nothing
again.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _validate
from .structure import Structure, parse_structure
from .update_schedule import PRUNE_SCHEDULES, TopologySchedule

__all__ = ["REMASK", "SparseSettings"]

REMASK = ("auto", "always")
"""The accepted values of ``remask``."""


def _sparsity(sparsity: Any, structure: Structure | None) -> float:
    """``sparsity`` checked; left out, 0.9, or under a structure that fixes the density (``N:M``)
    its ``1 - density``."""
    fixed = None if structure is None else structure.fixed_density
    if fixed is None:
        if sparsity is None:
            return 0.9
        return float(_validate.real("sparsity", sparsity, 0, 1, high_open=True))
    implied = 1.0 - fixed
    if sparsity is None:
        return implied
    value = _validate.real("sparsity", sparsity, 0, 1, high_open=True)
    if abs(value - implied) > 1e-9:
        raise ValueError(
            f"Expected sparsity to be left out or {implied:g} with structure='{structure}', but "
            f"got {sparsity!r}: every sparse layer of a {structure} structure has density "
            f"{fixed:g}"
        )
    return implied


@dataclass(frozen=True)
class SparseSettings:
    """What a ``SparseOptimizer`` was asked for, checked once and frozen (``opt.settings``).

    The arguments are those of [`SparseOptimizer`][sparseopt.SparseOptimizer], which documents
    them; the optimizer builds this object from them. Values come out normalized: ``sparsity``
    resolved (0.9 when left out, ``1 - N/M`` under an ``N:M`` structure), ``structure`` parsed,
    ``seed`` an int (``torch.initial_seed()`` when left out), a ``distribution`` mapping copied
    into a read-only one. ``schedule`` is the periodic
    [`TopologySchedule`][sparseopt.update_schedule.TopologySchedule] these settings give: it is
    built here, and it is the one check of ``update_every``, ``prune_rate`` and of
    ``prune_schedule="cosine"`` needing ``total_steps``.

    Change a setting with ``dataclasses.replace(settings, total_steps=...)``, which checks the
    new object again; the optimizer itself only lets ``total_steps`` change after it is built.

    Args:
        sparsity (float | None): target fraction of zeros, in [0, 1). Default: None (0.9, or
            ``1 - N/M`` under ``N:M``).
        structure (str | Structure | None): ``"N:M"``, ``"fan_in"`` or None. Default: None.
        distribution (str | Mapping[str, float]): ``"erk"``, ``"er"``, ``"uniform"`` or a mapping
            parameter name -> density (its names and densities are checked against the layers
            when they are registered). Default: ``"erk"``.
        update_every (int): optimizer steps between topology updates. Default: 100.
        prune_rate (float): drop fraction of the first update, in [0, 1]. Default: 0.3.
        prune_schedule (str | None): ``"cosine"``, ``"constant"`` or None (cosine when
            ``total_steps`` is known, else constant). Default: None.
        stop_fraction (float): periodic updates stop after ``stop_fraction * total_steps``
            steps, in (0, 1]. Default: 0.75.
        total_steps (int | None): the length of training in optimizer steps. Default: None.
        seed (int | None): seeds the optimizer's own CPU generator. Default: None.
        remask (str): ``"auto"`` or ``"always"``. Default: ``"auto"``.

    Raises:
        TypeError: for an argument of the wrong type.
        ValueError: for a value out of range or an unknown name, or ``prune_schedule="cosine"``
            without ``total_steps``.

    Examples:
        >>> import dataclasses
        >>> from sparseopt.settings import SparseSettings
        >>> s = SparseSettings(sparsity=0.8, update_every=10, total_steps=1000, seed=0)
        >>> s.schedule
        TopologySchedule(update_every=10, prune_rate=0.3, decay='cosine', end_step=750)
        >>> dataclasses.replace(s, total_steps=100).schedule.end_step
        75
        >>> SparseSettings(structure="2:4").sparsity
        0.5
        >>> s.sparsity = 0.5
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'sparsity'
    """

    sparsity: float | None = None
    structure: str | Structure | None = None
    distribution: str | Mapping[str, float] = "erk"
    update_every: int = 100
    prune_rate: float = 0.3
    prune_schedule: str | None = None
    stop_fraction: float = 0.75
    total_steps: int | None = None
    seed: int | None = None
    remask: str = "auto"
    schedule: TopologySchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # a frozen dataclass: its fields are written once, here
        structure = parse_structure(self.structure)
        set_(self, "structure", structure)
        set_(self, "sparsity", _sparsity(self.sparsity, structure))
        distribution = self.distribution
        if not isinstance(distribution, (str, Mapping)):
            raise TypeError(
                "Expected distribution to be 'erk', 'er', 'uniform' or a mapping name -> density, "
                f"but got {_validate.type_of(distribution)}"
            )
        if isinstance(distribution, Mapping):
            set_(self, "distribution", types.MappingProxyType(dict(distribution)))
        if self.prune_schedule is not None:
            _validate.choice("prune_schedule", self.prune_schedule, PRUNE_SCHEDULES)
        stop = _validate.real("stop_fraction", self.stop_fraction, 0, 1, low_open=True)
        set_(self, "stop_fraction", float(stop))
        _validate.choice("remask", self.remask, REMASK)
        if self.seed is None:
            set_(self, "seed", torch.initial_seed())
        else:  # the range torch.Generator.manual_seed takes
            set_(self, "seed", _validate.integer("seed", self.seed, -(2**63), 2**64 - 1))
        total = self.total_steps
        if total is not None:
            total = _validate.integer("total_steps", total, 1)
            set_(self, "total_steps", total)
        decay = self.prune_schedule or ("cosine" if total is not None else "constant")
        end = None if total is None else math.floor(self.stop_fraction * total)
        schedule = TopologySchedule(self.update_every, self.prune_rate, decay, end)
        set_(self, "update_every", schedule.update_every)
        set_(self, "prune_rate", schedule.prune_rate)
        set_(self, "schedule", schedule)

    # a read-only mapping does not pickle or deepcopy: travel as a dict, come back read-only
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.distribution, Mapping):
            state["distribution"] = dict(self.distribution)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["distribution"], Mapping):
            state = {**state, "distribution": types.MappingProxyType(state["distribution"])}
        for key, value in state.items():
            object.__setattr__(self, key, value)
