"""Argument checks, one rule for the whole library: a wrong type is a ``TypeError``, a value out
of range is a ``ValueError``, and both say "Expected <name> ..., but got <value>".

Numbers: a real argument takes any ``numbers.Real`` (Python ``int`` and ``float``, numpy's floating
and integer scalars, ``fractions.Fraction``) except ``bool``; an integer argument takes any
``numbers.Integral`` (Python ``int``, numpy's integer scalars) except ``bool``. A tensor, even a
0-d one, is not a number here: it would silently keep a graph or a device alive.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any

__all__ = ["boolean", "choice", "integer", "is_real", "real", "shape", "type_of"]


def type_of(value: Any) -> str:
    """``repr(value)`` with its type: what every message shows of a rejected value."""
    return f"{value!r} ({type(value).__name__})"


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (numpy scalars included, ``bool`` excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # an int bound exactly, however large


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{_bound(low)}"
    right = "inf)" if high is None else f"{_bound(high)}{')' if high_open else ']'}"
    return f"{left}, {right}"


def real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a ``float`` if it is a real number inside the interval.

    Raises:
        TypeError: if ``value`` is not a real number (``bool`` and tensors included).
        ValueError: if it is NaN or outside the interval.
    """
    if not is_real(value):
        raise TypeError(f"Expected {name} to be a real number, but got {type_of(value)}")
    x = float(value)
    inside = not math.isnan(x)
    if inside and low is not None:
        inside = x > low if low_open else x >= low
    if inside and high is not None:
        inside = x < high if high_open else x <= high
    if not inside:
        where = _interval(low, high, low_open, high_open)
        raise ValueError(f"Expected {name} in {where}, but got {value!r}")
    return x


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer in ``[low, high]``.

    Raises:
        TypeError: if ``value`` is not an integer (``bool``, ``2.0`` and tensors included).
        ValueError: if it is outside ``[low, high]``.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"Expected {name} to be an int, but got {type_of(value)}")
    n = int(value)
    if (low is not None and n < low) or (high is not None and n > high):
        if high is None and low == 1:
            raise ValueError(f"Expected {name} to be a positive int, but got {value!r}")
        where = _interval(low, high, False, False)
        raise ValueError(f"Expected {name} in {where}, but got {value!r}")
    return n


def choice(name: str, value: Any, options: Collection[str], *, fold_case: bool = False) -> str:
    """``value`` if it is one of ``options`` (lower-cased first with ``fold_case``).

    Raises:
        TypeError: if ``value`` is not a string.
        ValueError: if it is not one of ``options``; the message lists them.
    """
    if not isinstance(value, str):
        raise TypeError(f"Expected {name} to be one of {tuple(options)}, but got {type_of(value)}")
    key = value.lower() if fold_case else value
    if key not in options:
        raise ValueError(f"Expected {name} in {tuple(options)}, but got {value!r}")
    return key


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (numpy's ``bool_``, named ``bool`` since numpy 2, included).

    Raises:
        TypeError: for anything else, ``0`` and ``1`` included.
    """
    kind = type(value)
    if isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    ):
        return bool(value)
    raise TypeError(f"Expected {name} to be a bool, but got {type_of(value)}")


def shape(name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a tuple of ``int`` if it is a shape: a sequence (``torch.Size``, tuple, list)
    of non-negative integers.

    Raises:
        TypeError: if ``value`` is not a sequence of integers (a string, a float dimension).
        ValueError: if a dimension is negative.
    """
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    if not ok or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in value
    ):
        raise TypeError(f"Expected {name} to be a sequence of ints, but got {type_of(value)}")
    dims = tuple(int(d) for d in value)
    if any(d < 0 for d in dims):
        raise ValueError(f"Expected {name} to have no negative dimension, but got {dims}")
    return dims


def cpu_generator(name: str, value: Any) -> Any:
    """``value`` if it is a ``torch.Generator`` on the CPU (what seeds masks the same everywhere).

    Raises:
        TypeError: for anything else, a CUDA generator included.
    """
    import torch

    if isinstance(value, torch.Generator) and value.device.type == "cpu":
        return value
    got = (
        f"a generator on {value.device}"
        if isinstance(value, torch.Generator)
        else type(value).__name__
    )
    raise TypeError(f"Expected {name} to be a CPU torch.Generator, but got {got}")
