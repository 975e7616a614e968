"""Mask structures: a small protocol, and its two structures, N:M groups and constant fan-in rows.

A structure works on the *GEMM view* of a weight, ``w.reshape(w.shape[0], -1)``: a ``Linear``
weight ``(out, in)`` as it is, a convolution's ``(out, in, kh, kw)`` as ``(out, in * kh * kw)``.
It splits the weight into *units* and fixes how many active weights each unit holds:

- [`NM`][sparseopt.structure.NM] (``"N:M"``, e.g. ``"2:4"``): the units are the groups of ``M``
  consecutive weights along the last dimension of that view (never straddling two rows); each
  holds exactly ``N``.
- [`FanIn`][sparseopt.structure.FanIn] (``"fan_in"``, constant fan-in, as SRigL, Lasby et al.
  2024): the units are the rows; each holds exactly ``k``, the same for the whole layer
  ([`row_count`][sparseopt.structure.row_count]).

Everything the library does with a structure (initial masks, the paired drop-and-grow of an
update, SNIP's selection, the Sup-tickets re-prune, the checks, the export) goes through the
methods of [`Structure`][sparseopt.structure.Structure]. A new structure is one subclass that says
which shapes it fits, what its units are and how many each holds; no other file changes
(``tests/test_structure.py`` trains with one defined in the test).

Selections follow the one rule of ``sparseopt._select``: exact counts, ties to the lowest index
inside the unit (over the flat layer for the layer-wide drop), ``-0.0`` equal to ``0.0``, and NaN
the worst score (with ``-inf`` for growth, ``+inf`` for the drop). Masks come back on the scores'
device; only [`Structure.random`][sparseopt.structure.Structure.random] draws from a CPU generator
and returns a CPU mask (so that a seed means the same mask on every device).

The module functions (``select_structured``, ``random_structured``, ``structured_drop_and_grow``,
``check_structured``, ...) are the same operations by structure name, with ``k`` active weights
per row. This module imports only torch, the standard library, ``sparseopt._validate`` and
``sparseopt._select``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _select, _validate

__all__ = [
    "NM",
    "FanIn",
    "Structure",
    "check_structured",
    "density",
    "fits",
    "gemm_shape",
    "parse_structure",
    "random_structured",
    "row_count",
    "select_structured",
    "structure_violations",
    "structured_drop_and_grow",
]

_NM = re.compile(r"(\d+):(\d+)")
_PARSE_ERROR = "Expected structure to be None, 'fan_in' or 'N:M' with 0 < N < M, but got {!r}"
_BUILT_IN_KINDS = ("nm", "fan_in")


def gemm_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The shape of a weight's GEMM view: ``(shape[0], prod(shape[1:]))``.

    Args:
        shape (Sequence[int]): the weight's shape (``torch.Size`` or a tuple), ``ndim >= 2``.

    Returns:
        ``(rows, fan_in)``: output units and inputs per unit.

    Raises:
        TypeError: if ``shape`` is not a sequence of ints.
        ValueError: if ``shape`` has fewer than 2 dimensions or a negative one.

    Examples:
        >>> gemm_shape((64, 32)), gemm_shape((64, 16, 3, 3))
        ((64, 32), (64, 144))
    """
    shape = _validate.shape("shape", shape)
    if len(shape) < 2:
        raise ValueError(f"Expected a weight shape with ndim >= 2, but got {shape}")
    return shape[0], math.prod(shape[1:])


def _check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Expected {name} to be a tensor, but got {type(t).__name__}")


def _check_mask(mask: Any, name: str = "mask") -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected {name} to be a bool tensor, but got {got}")


class Structure:
    """A mask structure: how a weight splits into units, and how many active weights each holds.

    The protocol has two halves. A structure **defines** [`why_not`][] (the shapes it cannot
    hold), [`units`][] (how many units and of what size), [`per_unit`][] (each unit's count for
    a layer's count), [`layer_count`][] (a layer's count at a density) and ``__str__``; and, when
    its units are not runs of consecutive weights of the flat tensor, [`to_units`][] and
    [`from_units`][]. Everything the library **uses** is built on those: [`fits`][],
    [`select`][] (exact top-k per unit), [`random`][], [`exchange`][] (the paired
    drop-and-grow), [`violations`][], [`check`][] and [`kept_by`][]. Selections follow the rule
    of the module docstring.

    A subclass may keep its own constructor (a frozen dataclass is simplest). The optimizer
    refuses a method that cannot keep a structure: a method names the kinds it keeps in
    ``SparsityMethod.structures``, and one that keeps both built-in kinds keeps every structure
    (see [`kept_by`][]). Checkpoints record ``str(structure)``.

    ``Structure(kind, n=None, m=None)`` builds a built-in structure by kind: ``NM(n, m)`` for
    ``"nm"``, ``FanIn()`` for ``"fan_in"`` (as
    [`parse_structure`][sparseopt.structure.parse_structure] builds them from ``"N:M"`` and
    ``"fan_in"``).

    Args:
        kind (str): ``"nm"`` or ``"fan_in"``.
        n (int | None): active weights per group (``"nm"``); ``None`` for ``"fan_in"``.
        m (int | None): the group size (``"nm"``); ``None`` for ``"fan_in"``.

    Attributes:
        kind (str): the structure's kind: ``"nm"``, ``"fan_in"``, or a subclass's own.
        unit_noun (str): what a unit is called in messages (``"group"``, ``"row"``).

    Raises:
        TypeError: if ``kind`` is not a string, or ``n``, ``m`` are not ints for ``"nm"``.
        ValueError: if ``kind`` is unknown, or ``n``, ``m`` do not satisfy ``0 < n < m`` for
            ``"nm"``, or are given for ``"fan_in"``.

    Examples:
        >>> s = Structure("nm", 2, 4)
        >>> s, str(s), s == parse_structure("2:4") == NM(2, 4)
        (NM(n=2, m=4), '2:4', True)
        >>> str(Structure("fan_in", None, None))
        'fan_in'
        >>> import torch
        >>> s.select(torch.tensor([[4.0, 1.0, 3.0, 3.0, 0.0, 2.0, 1.0, 5.0]]), 4).int()
        tensor([[1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.int32)
    """

    __slots__ = ()
    kind: ClassVar[str] = ""
    unit_noun: ClassVar[str] = "unit"

    def __new__(cls, *args: Any, **kwargs: Any) -> Structure:
        if cls is Structure:
            return _by_kind(*args, **kwargs)
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = None  # type: ignore[attr-defined]  # the subclass's own signature

    def __str__(self) -> str:
        return type(self).__name__

    # --- what a structure defines -----------------------------------------------------------
    def why_not(self, shape: Sequence[int]) -> str | None:
        """Why a weight of ``shape`` cannot hold this structure, or ``None`` if it can.

        The base class refuses what has no GEMM view (``ndim < 2``, an empty dimension); a
        subclass adds its own conditions after ``super().why_not(shape)``.

        Args:
            shape (Sequence[int]): the weight's shape.

        Returns:
            A short reason (the optimizer's report shows it for a layer left dense), or ``None``.
        """
        if len(shape) < 2 or any(d < 1 for d in shape):
            return f"a weight needs ndim >= 2 and no empty dimension, not shape {tuple(shape)}"
        return None

    def units(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(units, size)``: the weight as ``units`` units of ``size`` weights each.

        Args:
            shape (Sequence[int]): a shape that fits (see [`fits`][]).

        Returns:
            The number of units and their size.
        """
        raise NotImplementedError

    def per_unit(self, shape: Sequence[int], count: int | None = None) -> int | None:
        """How many active weights each unit holds in a layer of ``count`` active.

        Args:
            shape (Sequence[int]): a shape that fits.
            count (int | None): the layer's active count. Default: ``None``: the count the
                structure fixes, or ``None`` when it has none (then a check compares each unit
                with the count most units hold).

        Returns:
            The per-unit count, or ``None``.
        """
        raise NotImplementedError

    def layer_count(self, shape: Sequence[int], density: float) -> int:
        """A layer's active count at ``density``, rounded to whole units by the structure's rule.

        Args:
            shape (Sequence[int]): a shape that fits.
            density (float): the density the distribution gives the layer.

        Returns:
            The count (a multiple of the units' count).
        """
        raise NotImplementedError

    @property
    def fixed_density(self) -> float | None:
        """The density every layer of this structure has (``N / M``), or ``None`` when the
        layer distribution decides it."""
        return None

    def to_units(self, t: Tensor) -> Tensor:
        """``t`` (a weight's shape) as a ``(units, size)`` tensor, one unit a row.

        The base class reshapes (a unit is a run of consecutive weights of the flat tensor); a
        structure whose units are not overrides this and [`from_units`][].

        Args:
            t (Tensor): a tensor of a shape that fits.

        Returns:
            The ``(units, size)`` view or copy.
        """
        return t.reshape(self.units(t.shape))

    def from_units(self, u: Tensor, shape: Sequence[int]) -> Tensor:
        """The inverse of [`to_units`][]: a ``(units, size)`` tensor back in ``shape``.

        Args:
            u (Tensor): ``(units, size)``.
            shape (Sequence[int]): the weight's shape.

        Returns:
            A tensor of ``shape``.
        """
        return u.reshape(tuple(shape))

    def unit_name(self, shape: Sequence[int], index: int) -> str:
        """Where unit ``index`` lies, for messages (``"row 1, columns 0..3"``).

        Args:
            shape (Sequence[int]): the weight's shape.
            index (int): the unit's index in [`to_units`][]' order.

        Returns:
            A short description.
        """
        return f"{self.unit_noun} {index}"

    # --- what the house uses ----------------------------------------------------------------
    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a weight of ``shape`` can hold this structure.

        Args:
            shape (Sequence[int]): the weight's shape.

        Returns:
            ``True`` if [`why_not`][] has no reason.

        Raises:
            TypeError: if ``shape`` is not a sequence of ints.
            ValueError: if ``shape`` has a negative dimension.
        """
        return self.why_not(_validate.shape("shape", shape)) is None

    def _size(self, shape: Sequence[int]) -> tuple[int, int]:
        """[`units`][], or a ``ValueError`` that names the shape and why it does not fit."""
        why = self.why_not(shape)
        if why is not None:
            raise ValueError(
                f"Expected a weight shape that holds {self}, but got {tuple(shape)}: {why}"
            )
        return self.units(shape)

    def _need(self, shape: Sequence[int], count: int) -> int:
        per = self.per_unit(shape, _validate.integer("count", count))
        if per is None:
            raise ValueError(f"Expected a count that {self} can hold, but got {count}")
        return per

    def select(self, scores: Tensor, count: int) -> Tensor:
        """The mask of the ``count`` largest ``scores`` that holds the structure: the top
        [`per_unit`][] of every unit.

        Args:
            scores (Tensor): a weight's shape, any real dtype and device.
            count (int): the layer's active count.

        Returns:
            A bool mask of ``scores``' shape and device.

        Raises:
            TypeError: if ``scores`` is not a tensor or ``count`` not an int.
            ValueError: if the shape does not fit or ``count`` is not a count the structure
                holds.
        """
        _check_tensor(scores, "scores")
        self._size(scores.shape)
        per = self._need(scores.shape, count)
        units = self.to_units(scores.detach())
        return self.from_units(_select.largest_per_unit(units, per), scores.shape)

    def random(self, shape: Sequence[int], count: int, generator: torch.Generator) -> Tensor:
        """A CPU mask of ``count`` active weights, uniformly random inside each unit.

        Args:
            shape (Sequence[int]): the weight's shape.
            count (int): the layer's active count.
            generator (torch.Generator): a CPU generator; the same state gives the same mask.

        Returns:
            A bool tensor of ``shape`` on the CPU (move it to the weight's device).

        Raises:
            TypeError: if ``generator`` is not a CPU ``torch.Generator`` or ``count`` not an int.
            ValueError: if the shape does not fit or ``count`` is not a count it holds.
        """
        _validate.cpu_generator("generator", generator)
        shape = _validate.shape("shape", shape)
        units, size = self._size(shape)
        per = self._need(shape, count)
        draws = torch.rand((units, size), generator=generator, device="cpu")
        return self.from_units(_select.largest_per_unit(draws, per), shape)

    def exchange(
        self, mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One prune-and-regrow exchange that keeps every unit's count.

        1. Drop: among the active positions of the whole layer, the ``k`` with the smallest
           ``drop_scores`` (ties to the lowest flat index; NaN ranks with ``+inf``).
        2. Grow: inside each unit that lost ``d`` weights, the ``d`` positions with the largest
           ``grow_scores`` among the unit's inactive positions, the just-dropped ones included
           (ties to the lowest index in the unit; NaN ranks with ``-inf``). A weight dropped and
           grown again is in neither ``dropped`` nor ``grown``.

        So each unit holds exactly as many active weights as before, whatever that count was
        (the input mask is not checked against the structure; see [`check`][]).

        Args:
            mask (Tensor): the current bool mask, a weight's shape.
            drop_scores (Tensor): scores of that shape (e.g. ``|w|``); only active ones count.
            grow_scores (Tensor): scores of that shape (e.g. ``|grad|``, or random).
            k (int): how many to drop over the whole layer, in ``[0, active count]``.

        Returns:
            ``(new, dropped, grown)``, bool masks of ``mask``'s shape and device:
            ``dropped = mask & ~new`` and ``grown = new & ~mask`` (equal counts).

        Raises:
            TypeError: if ``mask`` is not a bool tensor, the scores not tensors or ``k`` not an
                int.
            ValueError: if the shapes differ or do not fit, or ``k`` is outside
                ``[0, active count]``.
        """
        return self._exchange(mask, drop_scores, grow_scores, k, "k")

    def _exchange(
        self, mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, k: int, name: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_mask(mask)
        for arg, t in (("drop_scores", drop_scores), ("grow_scores", grow_scores)):
            _check_tensor(t, arg)
            if t.shape != mask.shape:
                raise ValueError(
                    f"Expected {arg} of the mask's shape {tuple(mask.shape)}, but got "
                    f"{tuple(t.shape)}"
                )
        k = _validate.integer(name, k)
        self._size(mask.shape)
        flat_mask = mask.reshape(-1)
        active = flat_mask.nonzero().reshape(-1)  # increasing flat indices
        if not 0 <= k <= active.numel():
            raise ValueError(f"Expected 0 <= {name} <= {active.numel()} (active), but got {k}")
        if k == 0:
            empty = torch.zeros_like(mask)
            return mask.clone(), empty, empty.clone()
        dropped_now = torch.zeros_like(flat_mask)
        dropped_now[active[_select.smallest(drop_scores.detach().reshape(-1)[active], k)]] = True
        kept = (flat_mask & ~dropped_now).view(mask.shape)
        need = self.to_units(dropped_now.view(mask.shape)).sum(1)
        grow = self.to_units(grow_scores.detach())
        grown = _select.largest_per_unit(grow, need, candidates=~self.to_units(kept))
        new = kept | self.from_units(grown, mask.shape)
        return new, mask & ~new, new & ~mask

    def _counts(self, mask: Tensor, count: int | None) -> tuple[Tensor, int]:
        """Each unit's active count, and the count every unit should hold."""
        _check_mask(mask)
        units, _ = self._size(mask.shape)
        counts = self.to_units(mask).sum(1)
        want = self.per_unit(mask.shape, count)
        if want is None:  # the count most units hold (ties: the smallest)
            want = int(torch.mode(counts.cpu()).values) if units else 0
        return counts, want

    def violations(self, mask: Tensor, count: int | None = None) -> int:
        """How many units do not hold their count.

        Args:
            mask (Tensor): a bool mask of a weight's shape.
            count (int | None): the layer's active count. Default: ``None``: the count the
                structure fixes, or else the count most units hold.

        Returns:
            The number of bad units (0: the mask holds the structure).

        Raises:
            TypeError: if ``mask`` is not a bool tensor.
            ValueError: if the shape does not fit or ``count`` is not a count it holds.
        """
        counts, want = self._counts(mask, count)
        return int((counts != want).sum())

    def check(self, mask: Tensor, count: int | None = None) -> None:
        """Raise unless every unit of ``mask`` holds its count.

        Args:
            mask (Tensor): a bool mask of a weight's shape.
            count (int | None): as for [`violations`][]. Default: ``None``.

        Raises:
            TypeError: if ``mask`` is not a bool tensor.
            ValueError: if the shape does not fit, or a unit holds another count (the message
                names the first one, by [`unit_name`][], and how many are bad).
        """
        counts, want = self._counts(mask, count)
        bad = (counts != want).nonzero().reshape(-1)
        if bad.numel() == 0:
            return
        first, many = int(bad[0]), bad.numel()
        noun = self.unit_noun
        raise ValueError(
            f"Expected every {noun} to hold {want} active under {self}, but "
            f"{self.unit_name(mask.shape, first)} holds {int(counts[first])} ({many} bad "
            f"{noun}{'s' if many > 1 else ''} of {counts.numel()})"
        )

    def kept_by(self, method: Any) -> bool:
        """Whether ``method`` keeps this structure through its updates.

        A method lists the kinds it keeps in ``SparsityMethod.structures``. Drop-and-grow
        methods keep both built-in kinds (``"nm"`` and ``"fan_in"``): every update goes through
        [`exchange`][], which pairs each drop with a grow inside the unit, whatever the units
        are; so a method that keeps both keeps every structure. A method that moves the density
        (GMP, GraNet) keeps none.

        Args:
            method (SparsityMethod): the method.

        Returns:
            ``True`` if the method keeps it.
        """
        keeps = set(getattr(method, "structures", ()))
        return self.kind in keeps or set(_BUILT_IN_KINDS) <= keeps


def _by_kind(kind: str, n: int | None = None, m: int | None = None) -> Structure:
    """``Structure(kind, n, m)``: the built-in structure of that kind."""
    _validate.choice("kind", kind, _BUILT_IN_KINDS)
    if kind == "nm":
        return NM(n, m)
    if n is not None or m is not None:
        raise ValueError(f"Expected n and m to be None for 'fan_in', but got n={n}, m={m}")
    return FanIn()


Structure.__signature__ = inspect.signature(_by_kind)  # type: ignore[attr-defined]


class _Frozen(Structure):
    """Immutable built-in structures: equal and hashed by their type and fields."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self._values(), strict=True))
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self._values()


class NM(_Frozen):
    """``"N:M"``: every group of ``m`` consecutive weights along the GEMM view's input dimension
    holds exactly ``n`` active (``0 < n < m``). The density is ``n / m`` in every layer.

    A weight fits when its fan-in (``prod(shape[1:])``) is a multiple of ``m``; the groups never
    straddle two rows.

    Args:
        n (int): active weights per group.
        m (int): the group size.

    Attributes:
        kind (str): ``"nm"``.
        n (int): active weights per group.
        m (int): the group size.

    Raises:
        TypeError: if ``n`` or ``m`` is not an int.
        ValueError: unless ``0 < n < m``.

    Examples:
        >>> s = NM(2, 4)
        >>> str(s), s.fixed_density, s.units((8, 12)), s.why_not((8, 10))
        ('2:4', 0.5, (24, 4), 'input dimension 10 is not a multiple of 4')
    """

    __slots__ = ("m", "n")
    kind = "nm"
    unit_noun = "group"
    _fields = ("n", "m")

    def __new__(cls, n: int, m: int) -> NM:
        n, m = _validate.integer("n", n), _validate.integer("m", m)
        if not 0 < n < m:
            raise ValueError(_PARSE_ERROR.format(f"{n}:{m}"))
        self = object.__new__(cls)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        return self

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def fixed_density(self) -> float:
        return self.n / self.m

    def why_not(self, shape: Sequence[int]) -> str | None:
        why = super().why_not(shape)
        if why is None and math.prod(shape[1:]) % self.m:
            why = f"input dimension {math.prod(shape[1:])} is not a multiple of {self.m}"
        return why

    def units(self, shape: Sequence[int]) -> tuple[int, int]:
        rows, fan_in = gemm_shape(shape)
        return rows * (fan_in // self.m), self.m

    def per_unit(self, shape: Sequence[int], count: int | None = None) -> int:
        units, _ = self.units(shape)
        if count is not None and count != units * self.n:
            raise ValueError(
                f"Expected count to be {units * self.n} ({self.n} in each of {units} groups of "
                f"{self.m}) under {self}, but got {count}"
            )
        return self.n

    def layer_count(self, shape: Sequence[int], density: float) -> int:
        return self.units(shape)[0] * self.n

    def unit_name(self, shape: Sequence[int], index: int) -> str:
        row, col = divmod(index, gemm_shape(shape)[1] // self.m)
        start = col * self.m
        return f"row {row}, columns {start}..{start + self.m - 1}"


class FanIn(_Frozen):
    """``"fan_in"`` (constant fan-in): every row of the GEMM view holds exactly ``k`` active, the
    same ``k`` for the whole layer: ``k = round(density * fan_in)``, in ``[1, fan_in]``
    ([`row_count`][sparseopt.structure.row_count]), with the density from the layer
    distribution. Every weight with ``ndim >= 2`` fits.

    Attributes:
        kind (str): ``"fan_in"``.
        n (None): ``None`` (no group size: kept for ``Structure.n``).
        m (None): ``None``.

    Raises:
        ValueError: from ``per_unit``, for a layer count that is not a multiple of the rows.

    Examples:
        >>> s = FanIn()
        >>> str(s), s.units((8, 3, 3, 3)), s.layer_count((8, 100), 0.1), s.per_unit((8, 100), 80)
        ('fan_in', (8, 27), 80, 10)
    """

    __slots__ = ()
    kind = "fan_in"
    unit_noun = "row"
    n = None
    m = None

    def __new__(cls) -> FanIn:
        return object.__new__(cls)

    def __str__(self) -> str:
        return "fan_in"

    def units(self, shape: Sequence[int]) -> tuple[int, int]:
        return gemm_shape(shape)

    def per_unit(self, shape: Sequence[int], count: int | None = None) -> int | None:
        if count is None:
            return None
        rows, fan_in = gemm_shape(shape)
        if count % rows or not 0 <= count <= rows * fan_in:
            raise ValueError(
                f"Expected count to be a multiple of the {rows} rows in [0, {rows * fan_in}] "
                f"under {self}, but got {count}"
            )
        return count // rows

    def layer_count(self, shape: Sequence[int], density: float) -> int:
        return gemm_shape(shape)[0] * row_count(shape, density)

    def unit_name(self, shape: Sequence[int], index: int) -> str:
        return f"row {index}"


def parse_structure(value: str | Structure | None) -> Structure | None:
    """The [`Structure`][sparseopt.structure.Structure] named by ``value``.

    ``N == M`` is refused: every weight would be active (a dense layer), which is not a sparse
    structure; leave ``structure`` out for a dense or unstructured layer instead.

    Args:
        value (str | Structure | None): ``None`` (no structure), ``"fan_in"``, ``"N:M"`` with
            ``0 < N < M`` (``"2:4"``, ``"1:4"``, ``"4:8"``, ...), or a ``Structure`` (returned
            as it is).

    Returns:
        The structure, or ``None`` for ``None``.

    Raises:
        TypeError: if ``value`` is neither ``None``, a str nor a ``Structure``.
        ValueError: if the string is not ``"fan_in"`` or ``"N:M"`` with ``0 < N < M``.

    Examples:
        >>> parse_structure("2:4")
        NM(n=2, m=4)
        >>> parse_structure("fan_in"), parse_structure(None)
        (FanIn(), None)
        >>> parse_structure("3:2")
        Traceback (most recent call last):
        ...
        ValueError: Expected structure to be None, 'fan_in' or 'N:M' with 0 < N < M, but got '3:2'
    """
    if value is None or isinstance(value, Structure):
        return value
    if not isinstance(value, str):
        raise TypeError(
            "Expected structure to be None, 'fan_in' or an 'N:M' string, but got "
            f"{type(value).__name__}"
        )
    if value == "fan_in":
        return FanIn()
    match = _NM.fullmatch(value)
    if match is None:
        raise ValueError(_PARSE_ERROR.format(value))
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(_PARSE_ERROR.format(value))
    return NM(n, m)


def _structure(value: str | Structure | None) -> Structure:
    s = parse_structure(value)
    if s is None:
        raise ValueError("Expected a structure ('fan_in' or 'N:M'), but got None")
    return s


def fits(shape: Sequence[int], structure: str | Structure | None) -> bool:
    """Whether a weight of ``shape`` can hold ``structure``
    ([`Structure.fits`][sparseopt.structure.Structure.fits]).

    Any shape with ``ndim >= 2`` and no empty dimension fits ``"fan_in"``; ``"N:M"`` also needs
    the fan-in (``prod(shape[1:])``) to be a multiple of ``M``. ``None`` (unstructured) fits every
    shape.

    Args:
        shape (Sequence[int]): the weight's shape.
        structure (str | Structure | None): the structure.

    Returns:
        ``True`` if it fits.

    Raises:
        TypeError: if ``shape`` is not a sequence of ints or ``structure`` is not a structure.
        ValueError: if ``shape`` has a negative dimension or ``structure`` is an unknown name.

    Examples:
        >>> fits((8, 12), "2:4"), fits((8, 10), "2:4"), fits((8, 3, 3, 3), "fan_in")
        (True, False, True)
        >>> fits((8,), "fan_in")
        False
    """
    shape = _validate.shape("shape", shape)
    s = parse_structure(structure)
    return True if s is None else s.fits(shape)


def density(structure: str | Structure) -> float:
    """The density an ``N:M`` structure fixes: ``N / M``.

    Args:
        structure (str | Structure): an ``N:M`` structure.

    Returns:
        ``N / M`` as a float (``n / m`` in Python, the nearest double).

    Raises:
        ValueError: for ``"fan_in"`` (its density comes from the layer distribution) or ``None``.

    Examples:
        >>> density("2:4"), density("1:8")
        (0.5, 0.125)
    """
    s = _structure(structure)
    if s.fixed_density is None:
        raise ValueError(
            f"Expected an 'N:M' structure, but got '{s}' (its density is per layer: see row_count)"
        )
    return s.fixed_density


def row_count(shape: Sequence[int], density: float) -> int:
    """Active weights per row of a constant fan-in layer: ``round(density * fan_in)``, in
    ``[1, fan_in]``: the one place this rule is written.

    ``round`` is Python's (half to even), as everywhere else in the library's counts.

    Args:
        shape (Sequence[int]): the weight's shape, ``ndim >= 2``.
        density (float): the layer's density, in ``[0, 1]``.

    Returns:
        ``k``, at least 1 and at most ``fan_in = prod(shape[1:])``.

    Raises:
        TypeError: if ``density`` is not a real number.
        ValueError: if ``density`` is outside ``[0, 1]`` or ``shape`` has ``ndim < 2`` or an
            empty dimension.

    Examples:
        >>> row_count((64, 100), 0.1), row_count((64, 16, 3, 3), 0.1), row_count((4, 5), 0.01)
        (10, 14, 1)
    """
    density = _validate.real("density", density, 0, 1)
    if not fits(shape, "fan_in"):
        raise ValueError(f"Expected a weight shape with ndim >= 2, no dim 0, but got {shape}")
    _, fan_in = gemm_shape(shape)
    return min(fan_in, max(1, round(density * fan_in)))


def _count_of(shape: Sequence[int], s: Structure, k: Any, required: bool = True) -> int | None:
    """The layer count for ``k`` active per row (the module functions' argument): ``None`` for
    ``k=None`` when the structure fixes no count, unless ``required``."""
    rows, fan_in = gemm_shape(shape)
    s._size(shape)
    per = s.per_unit(shape)
    fixed = None if per is None else s.units(shape)[0] * per
    if k is None:
        if fixed is None and required:
            raise ValueError(f"Expected k (active weights per row) for '{s}', but got None")
        return fixed
    k = _validate.integer("k", k)
    if fixed is not None and rows * k != fixed:
        raise ValueError(
            f"Expected k to be None or {fixed // rows} (the per-row count of {s} over fan-in "
            f"{fan_in}), but got {k}"
        )
    if not 0 <= k <= fan_in:
        raise ValueError(f"Expected 0 <= k <= {fan_in} (the fan-in), but got k={k}")
    return rows * k


def select_structured(scores: Tensor, structure: str | Structure, k: int | None = None) -> Tensor:
    """The structured mask of the largest ``scores``: the top ``N`` of every group (``N:M``) or
    the top ``k`` of every row (``"fan_in"``)
    ([`Structure.select`][sparseopt.structure.Structure.select]).

    Ties go to the lowest index inside the group or row; ``-inf`` (and NaN) scores are taken
    last. Low-precision scores are compared in float32 (the same order).

    Args:
        scores (Tensor): scores of a weight's shape (``ndim >= 2``, a conv's 4-D shape included),
            any float dtype and device.
        structure (str | Structure): ``"N:M"`` or ``"fan_in"``.
        k (int | None): active weights per row; required for ``"fan_in"``. For ``N:M`` it may
            be left out; if given it must equal ``fan_in // M * N``.

    Returns:
        A bool mask of ``scores``' shape and device.

    Raises:
        TypeError: if ``scores`` is not a tensor or ``k`` is not an int.
        ValueError: if the shape does not fit the structure, or ``k`` is missing, out of
            ``[0, fan_in]`` or disagrees with ``N:M``.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([[4.0, 1.0, 3.0, 3.0, 0.0, 2.0, 1.0, 5.0]])
        >>> select_structured(scores, "2:4").int()
        tensor([[1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.int32)
        >>> select_structured(scores, "fan_in", k=3).int()
        tensor([[1, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.int32)
    """
    _check_tensor(scores, "scores")
    s = _structure(structure)
    return s.select(scores, _count_of(scores.shape, s, k))


def random_structured(
    shape: Sequence[int],
    structure: str | Structure,
    generator: torch.Generator,
    k: int | None = None,
) -> Tensor:
    """A CPU structured mask whose active positions are uniformly random inside each group
    (``N:M``) or row (``"fan_in"``) ([`Structure.random`][sparseopt.structure.Structure.random]).

    Args:
        shape (Sequence[int]): the weight's shape.
        structure (str | Structure): ``"N:M"`` or ``"fan_in"``.
        generator (torch.Generator): a CPU generator; the same state gives the same mask.
        k (int | None): active weights per row, required for ``"fan_in"`` (see
            [`select_structured`][sparseopt.structure.select_structured]).

    Returns:
        A bool tensor of ``shape`` on the CPU (move it to the weight's device).

    Raises:
        TypeError: if ``generator`` is not a CPU ``torch.Generator`` or ``k`` not an int.
        ValueError: if the shape does not fit the structure or ``k`` is invalid.

    Examples:
        >>> import torch
        >>> mask = random_structured((3, 8), "2:4", torch.Generator().manual_seed(0))
        >>> mask.view(3, 2, 4).sum(-1).tolist()
        [[2, 2], [2, 2], [2, 2]]
        >>> again = random_structured((3, 8), "2:4", torch.Generator().manual_seed(0))
        >>> torch.equal(mask, again)
        True
    """
    _validate.cpu_generator("generator", generator)
    s = _structure(structure)
    shape = _validate.shape("shape", shape)
    return s.random(shape, _count_of(shape, s, k), generator)


def structured_drop_and_grow(
    mask: Tensor,
    drop_scores: Tensor,
    grow_scores: Tensor,
    structure: str | Structure,
    k_drop: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One prune-and-regrow exchange of ``k_drop`` weights that keeps every group's (or row's)
    count: [`Structure.exchange`][sparseopt.structure.Structure.exchange] by structure name.

    The ``k_drop`` active weights with the smallest ``drop_scores`` of the layer go (NaN counts
    as ``+inf``); each ``N:M`` group (``"fan_in"``: each row) regrows as many as it lost, by the
    largest ``grow_scores`` among its inactive positions, the just-dropped ones included.

    Args:
        mask (Tensor): the current bool mask.
        drop_scores (Tensor): e.g. ``|w|``, the mask's shape.
        grow_scores (Tensor): e.g. ``|grad|``, the mask's shape.
        structure (str | Structure): ``"N:M"`` or ``"fan_in"``.
        k_drop (int): how many to drop, in ``[0, active count]``.

    Returns:
        ``(new, dropped, grown)``, as ``Structure.exchange`` returns them.

    Raises:
        TypeError: for a mask that is not a bool tensor, scores that are not tensors, or a
            ``k_drop`` that is not an int.
        ValueError: for scores of another shape, a shape the structure does not fit, or a
            ``k_drop`` outside ``[0, active count]``.

    Examples:
        One 2:4 row with two groups; the smallest active weight (0.1, in group 0) is dropped
        and the largest gradient of that group regrows:

        >>> import torch
        >>> mask = torch.tensor([[True, True, False, False, True, False, True, False]])
        >>> w = torch.tensor([[0.5, 0.1, 0.0, 0.0, 0.7, 0.0, 0.9, 0.0]])
        >>> g = torch.tensor([[0.0, 0.0, 0.2, 0.3, 0.0, 0.9, 0.0, 0.8]])
        >>> new, dropped, grown = structured_drop_and_grow(mask, w.abs(), g.abs(), "2:4", 1)
        >>> new.int().tolist(), dropped.nonzero()[:, 1].tolist(), grown.nonzero()[:, 1].tolist()
        ([[1, 0, 0, 1, 1, 0, 1, 0]], [1], [3])
    """
    s = _structure(structure)
    return s._exchange(mask, drop_scores, grow_scores, k_drop, "k_drop")


def structure_violations(mask: Tensor, structure: str | Structure, k: int | None = None) -> int:
    """How many groups (``N:M``) or rows (``"fan_in"``) do not hold their count
    ([`Structure.violations`][sparseopt.structure.Structure.violations]).

    Args:
        mask (Tensor): a bool mask of a weight's shape.
        structure (str | Structure): ``"N:M"`` or ``"fan_in"``.
        k (int | None): the per-row count for ``"fan_in"``. Default: ``None``, the count most
            rows hold (ties: the smallest), i.e. the rows that differ from the majority.

    Returns:
        The number of bad groups or rows (0: the mask holds the structure).

    Raises:
        TypeError: if ``mask`` is not a bool tensor.
        ValueError: if the shape does not fit the structure or ``k`` is invalid.

    Examples:
        >>> import torch
        >>> mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
        >>> structure_violations(mask, "2:4"), structure_violations(mask, "fan_in", k=5)
        (1, 0)
    """
    s = _structure(structure)
    _check_mask(mask)
    return s.violations(mask, _count_of(mask.shape, s, k, required=False))


def check_structured(mask: Tensor, structure: str | Structure, k: int | None = None) -> None:
    """Raise unless every group (``N:M``) or row (``"fan_in"``) of ``mask`` holds its count
    ([`Structure.check`][sparseopt.structure.Structure.check]).

    Args:
        mask (Tensor): a bool mask of a weight's shape.
        structure (str | Structure): ``"N:M"`` or ``"fan_in"``.
        k (int | None): the per-row count for ``"fan_in"``. Default: ``None``: every row must
            hold the count most rows hold.

    Raises:
        TypeError: if ``mask`` is not a bool tensor.
        ValueError: if the shape does not fit, or a group or row holds another count (the
            message names the first one, in the GEMM view ``(out, prod(shape[1:]))``, and how
            many are bad).

    Examples:
        >>> import torch
        >>> check_structured(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), "2:4")
        >>> bad = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
        >>> check_structured(bad, "2:4")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected every group to hold 2 active under 2:4, but row 1, ... of 2)
    """
    s = _structure(structure)
    _check_mask(mask)
    s.check(mask, _count_of(mask.shape, s, k, required=False))
