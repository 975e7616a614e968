"""Structured masks as pure tensor kernels: N:M groups and constant fan-in rows.

Every function here works on the *GEMM view* of a weight, ``w.reshape(w.shape[0], -1)``: a
``Linear`` weight ``(out, in)`` as it is, a convolution's ``(out, in, kh, kw)`` as
``(out, in * kh * kw)``. Two structures are known:

- ``"N:M"`` (e.g. ``"2:4"``): every group of ``M`` consecutive weights along the last dimension
  of that view holds exactly ``N`` active weights. Groups never straddle two rows.
- ``"fan_in"`` (constant fan-in, as SRigL, Lasby et al. 2024): every row of that view holds
  exactly ``k`` active weights, the same ``k`` for the whole layer.

All selections are exact and deterministic: ties go to the lowest index (inside a group or row
for the per-group selections, over the flat layer for the layer-wide drop), a ``-inf`` or NaN
score is taken last (NaN counts as ``-inf`` for growth, ``+inf`` for the drop), ``-0.0`` ties
with ``0.0``, and nothing depends on how a kernel orders equal values. No selection sorts: a
``topk`` finds the threshold and ties at it are filled in index order. The functions
take tensors on any device and give their masks back on that device; only
[`random_structured`][sparseopt.structure.random_structured] draws from a CPU generator and
returns a CPU mask (so that a seed means the same mask on every device).

This module imports only torch, the standard library and ``sparseopt._validate``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import _validate

__all__ = [
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


@dataclass(frozen=True)
class Structure:
    """A mask structure: ``N:M`` groups or constant fan-in rows (build it with
    [`parse_structure`][sparseopt.structure.parse_structure]).

    Attributes:
        kind (str): ``"nm"`` or ``"fan_in"``.
        n (int | None): active weights per group (``"nm"``); ``None`` for ``"fan_in"``.
        m (int | None): the group size (``"nm"``); ``None`` for ``"fan_in"``.

    Raises:
        TypeError: if ``kind`` is not a string, or ``n``, ``m`` are not ints for ``"nm"``.
        ValueError: if ``kind`` is unknown, or ``n``, ``m`` do not satisfy ``0 < n < m`` for
            ``"nm"``, or are given for ``"fan_in"``.

    Examples:
        >>> s = Structure("nm", 2, 4)
        >>> str(s), s == parse_structure("2:4")
        ('2:4', True)
        >>> str(Structure("fan_in", None, None))
        'fan_in'
    """

    kind: Literal["nm", "fan_in"]
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        _validate.choice("kind", self.kind, ("nm", "fan_in"))
        if self.kind == "fan_in":
            if self.n is not None or self.m is not None:
                raise ValueError(
                    f"Expected n and m to be None for 'fan_in', but got n={self.n}, m={self.m}"
                )
            return
        n, m = _validate.integer("n", self.n), _validate.integer("m", self.m)
        if not 0 < n < m:
            raise ValueError(_PARSE_ERROR.format(f"{n}:{m}"))
        object.__setattr__(self, "n", n)  # numpy integers become ints: one hash, one repr
        object.__setattr__(self, "m", m)

    def __str__(self) -> str:
        return "fan_in" if self.kind == "fan_in" else f"{self.n}:{self.m}"


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
        Structure(kind='nm', n=2, m=4)
        >>> parse_structure("fan_in"), parse_structure(None)
        (Structure(kind='fan_in', n=None, m=None), None)
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
        return Structure("fan_in")
    match = _NM.fullmatch(value)
    if match is None:
        raise ValueError(_PARSE_ERROR.format(value))
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(_PARSE_ERROR.format(value))
    return Structure("nm", n, m)


def _structure(value: str | Structure | None) -> Structure:
    s = parse_structure(value)
    if s is None:
        raise ValueError("Expected a structure ('fan_in' or 'N:M'), but got None")
    return s


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


def fits(shape: Sequence[int], structure: str | Structure | None) -> bool:
    """Whether a weight of ``shape`` can hold ``structure``.

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
    if s is None:
        return True
    if len(shape) < 2 or any(d < 1 for d in shape):
        return False
    _, fan_in = gemm_shape(shape)
    return s.kind == "fan_in" or fan_in % s.m == 0


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
    if s.kind != "nm":
        raise ValueError(
            "Expected an 'N:M' structure, but got 'fan_in' (its density is per layer: "
            "see row_count)"
        )
    return s.n / s.m


def row_count(shape: Sequence[int], density: float) -> int:
    """Active weights per row of a constant fan-in layer: ``round(density * fan_in)``, in
    ``[1, fan_in]``.

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


# --- the shared machinery ------------------------------------------------------------------------
def _rows_view(shape: Sequence[int], s: Structure) -> tuple[int, int]:
    """``(groups, length)``: the flat weight as ``groups`` segments of ``length`` consecutive
    weights, each a unit that holds a fixed count (an N:M group, or a fan-in row)."""
    if not fits(shape, s):
        if s.kind == "nm" and fits(shape, "fan_in"):
            _, fan_in = gemm_shape(shape)
            raise ValueError(
                f"Expected a weight whose fan-in is a multiple of {s.m} for {s}, but got shape "
                f"{tuple(shape)} (fan-in {fan_in})"
            )
        raise ValueError(
            f"Expected a weight shape with ndim >= 2 and no dim 0 for {s}, but got {tuple(shape)}"
        )
    rows, fan_in = gemm_shape(shape)
    if s.kind == "nm":
        return rows * (fan_in // s.m), s.m
    return rows, fan_in


def _per_unit(shape: Sequence[int], s: Structure, k: int | None) -> int:
    """How many active weights each unit (group or row) holds."""
    _, fan_in = gemm_shape(shape)
    if k is not None:
        k = _validate.integer("k", k)
    if s.kind == "nm":
        per_row = fan_in // s.m * s.n
        if k is not None and k != per_row:
            raise ValueError(
                f"Expected k to be None or {per_row} (the per-row count of {s} over fan-in "
                f"{fan_in}), but got {k}"
            )
        return s.n
    if k is None:
        raise ValueError("Expected k (active weights per row) for 'fan_in', but got None")
    if not 0 <= k <= fan_in:
        raise ValueError(f"Expected 0 <= k <= {fan_in} (the fan-in), but got k={k}")
    return k


def _as_sortable(scores: Tensor) -> Tensor:
    """Scores as float32/float64, NaN as ``-inf`` (so that both are taken last)."""
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.double() if scores.dtype == torch.int64 else scores.float()
    return torch.where(torch.isnan(scores), float("-inf"), scores)


def _fill_ties(better: Tensor, tied: Tensor, need: Tensor | int, dim: int = -1) -> Tensor:
    """``better`` plus, in each line along ``dim``, the first ``need - better.sum()`` of ``tied``
    in index order: an exact selection with ties to the lowest index, without a sort."""
    room = need - better.sum(dim, keepdim=True)
    return better | (tied & (torch.cumsum(tied, dim, dtype=torch.int32) <= room))


def _top_per_unit(scores: Tensor, count: Tensor | int, candidates: Tensor | None = None) -> Tensor:
    """Bool mask of the ``count`` largest entries of each row of a 2-D ``scores`` (no NaN),
    among ``candidates`` if given, ties to the lowest column. ``count`` is an int or a per-row
    int tensor, at most the number of candidates of its row.

    One ``topk`` of the largest count finds each row's threshold (the ``count``-th largest);
    everything above it is taken, and ties at it fill the rest in column order. No sort: this
    is O(length) per row, against O(length log length) for a stable sort.
    """
    units = scores.shape[0]
    need = (
        torch.full((units, 1), count, device=scores.device)
        if isinstance(count, int)
        else count.reshape(units, 1)
    )
    kmax = count if isinstance(count, int) else (int(count.max()) if units else 0)
    if kmax == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if candidates is not None:
        scores = torch.where(candidates, scores, float("-inf"))
    top = torch.topk(scores, kmax, dim=1, sorted=True).values
    threshold = top.gather(1, (need - 1).clamp(min=0))
    better = scores > threshold  # a non-candidate (-inf) is never above
    tied = scores == threshold
    if candidates is not None:
        tied &= candidates
    return _fill_ties(better, tied, need, dim=1)


def _check_tensor(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Expected {name} to be a tensor, but got {type(t).__name__}")


def _check_mask(mask: Tensor, name: str = "mask") -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected {name} to be a bool tensor, but got {got}")


# --- selection -----------------------------------------------------------------------------------
def select_structured(scores: Tensor, structure: str | Structure, k: int | None = None) -> Tensor:
    """The structured mask of the largest ``scores``: the top ``N`` of every group (``N:M``) or
    the top ``k`` of every row (``"fan_in"``).

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
    units, length = _rows_view(scores.shape, s)
    count = _per_unit(scores.shape, s, k)
    flat = _as_sortable(scores.detach()).reshape(units, length)
    return _top_per_unit(flat, count).view(scores.shape)


def random_structured(
    shape: Sequence[int],
    structure: str | Structure,
    generator: torch.Generator,
    k: int | None = None,
) -> Tensor:
    """A CPU structured mask whose active positions are uniformly random inside each group
    (``N:M``) or row (``"fan_in"``).

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
    units, length = _rows_view(shape, s)
    count = _per_unit(shape, s, k)
    draws = torch.rand((units, length), generator=generator, device="cpu")
    return _top_per_unit(draws, count).view(shape)


# --- drop and grow -------------------------------------------------------------------------------
def structured_drop_and_grow(
    mask: Tensor,
    drop_scores: Tensor,
    grow_scores: Tensor,
    structure: str | Structure,
    k_drop: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One prune-and-regrow exchange that keeps every group's (or row's) count.

    1. Drop: among the active positions of the whole layer, the ``k_drop`` with the smallest
       ``drop_scores`` (ties to the lowest flat index; NaN counts as ``+inf``).
    2. Grow: inside each ``N:M`` group (``"fan_in"``: each row) that lost ``d`` weights, the
       ``d`` positions with the largest ``grow_scores`` among the group's inactive positions,
       the just-dropped ones included (ties to the lowest index; ``-inf`` and NaN taken last).
       A weight dropped and grown again is in neither ``dropped`` nor ``grown``.

    So each group or row holds exactly as many active weights as before, whatever that count
    was (the input mask is not checked against the structure; use
    [`check_structured`][sparseopt.structure.check_structured]).

    Args:
        mask (Tensor): the current bool mask, a weight's shape.
        drop_scores (Tensor): scores of that shape (e.g. ``|w|``); only active positions count.
        grow_scores (Tensor): scores of that shape (e.g. ``|grad|``, or random).
        structure (str | Structure): ``"N:M"`` or ``"fan_in"``.
        k_drop (int): how many to drop over the whole layer, in ``[0, active count]``.

    Returns:
        ``(new, dropped, grown)``, bool masks of ``mask``'s shape and device:
        ``dropped = mask & ~new`` and ``grown = new & ~mask`` (equal counts).

    Raises:
        TypeError: if ``mask`` is not a bool tensor, the scores not tensors or ``k_drop`` not an
            int.
        ValueError: if the shapes differ or do not fit the structure, or ``k_drop`` is outside
            ``[0, active count]``.

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
    _check_mask(mask)
    for name, t in (("drop_scores", drop_scores), ("grow_scores", grow_scores)):
        _check_tensor(t, name)
        if t.shape != mask.shape:
            raise ValueError(
                f"Expected {name} of the mask's shape {tuple(mask.shape)}, but got {tuple(t.shape)}"
            )
    k_drop = _validate.integer("k_drop", k_drop)
    units, length = _rows_view(mask.shape, s)
    flat_mask = mask.reshape(-1)
    active = flat_mask.nonzero().reshape(-1)  # increasing flat indices
    if not 0 <= k_drop <= active.numel():
        raise ValueError(f"Expected 0 <= k_drop <= {active.numel()} (active), but got {k_drop}")
    if k_drop == 0:
        empty = torch.zeros_like(mask)
        return mask.clone(), empty, empty.clone()
    drop = drop_scores.detach().reshape(-1)[active]
    if drop.dtype not in (torch.float32, torch.float64):
        drop = drop.double() if drop.dtype == torch.int64 else drop.float()
    drop = torch.where(torch.isnan(drop), float("inf"), drop)  # NaN: dropped last, as +inf
    # the k_drop-th smallest: the largest of the k_drop smallest (no kthvalue: CUDA flags it as
    # nondeterministic under torch.use_deterministic_algorithms)
    kth = torch.topk(drop, k_drop, largest=False, sorted=False).values.max()
    chosen = _fill_ties(drop < kth, drop == kth, k_drop)
    dropped_now = torch.zeros_like(flat_mask)
    dropped_now[active[chosen]] = True
    kept = (flat_mask & ~dropped_now).view(units, length)
    need = dropped_now.view(units, length).sum(1)
    grow = _as_sortable(grow_scores.detach()).reshape(units, length)
    grown_now = _top_per_unit(grow, need, candidates=~kept)
    new = (kept | grown_now).view(mask.shape)
    return new, mask & ~new, new & ~mask


# --- checks --------------------------------------------------------------------------------------
def _unit_counts(mask: Tensor, s: Structure, k: int | None) -> tuple[Tensor, int]:
    _check_mask(mask)
    units, length = _rows_view(mask.shape, s)
    counts = mask.reshape(units, length).sum(1)
    if s.kind == "fan_in" and k is None:
        want = int(torch.mode(counts.cpu()).values) if units else 0  # the most common count
    else:
        want = _per_unit(mask.shape, s, k)
    return counts, want


def structure_violations(mask: Tensor, structure: str | Structure, k: int | None = None) -> int:
    """How many groups (``N:M``) or rows (``"fan_in"``) do not hold their count.

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
    counts, want = _unit_counts(mask, s, k)
    return int((counts != want).sum())


def check_structured(mask: Tensor, structure: str | Structure, k: int | None = None) -> None:
    """Raise unless every group (``N:M``) or row (``"fan_in"``) of ``mask`` holds its count.

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
        ValueError: Expected every group of 4 ... but row 1, columns 0..3 holds 3 (1 bad group of 2)
    """
    s = _structure(structure)
    counts, want = _unit_counts(mask, s, k)
    bad = (counts != want).nonzero().reshape(-1)
    if bad.numel() == 0:
        return
    first = int(bad[0])
    got = int(counts[first])
    if s.kind == "nm":
        _, fan_in = gemm_shape(mask.shape)
        per_row = fan_in // s.m
        row, col = divmod(first, per_row)
        start = col * s.m
        raise ValueError(
            f"Expected every group of {s.m} consecutive weights along the input dimension to "
            f"hold {s.n} active, but row {row}, columns {start}..{start + s.m - 1} holds {got} "
            f"({bad.numel()} bad group{'s' if bad.numel() > 1 else ''} of {counts.numel()})"
        )
    raise ValueError(
        f"Expected every row to hold {want} active (constant fan-in), but row {first} holds "
        f"{got} ({bad.numel()} bad row{'s' if bad.numel() > 1 else ''} of {counts.numel()})"
    )
