"""Layer-wise density distributions: how a global sparsity is spread over the sparse layers.

Every distribution has the same signature, ``fn(shapes, density) -> list[float]``: given the shapes
of the sparse tensors and the overall target density ``1 - sparsity``, it returns one density per
tensor such that ``sum(d_l * n_l) == density * sum(n_l)`` (in real numbers).
[`exact_counts`][sparseopt.distributions.exact_counts] then turns densities into integer counts
whose total is exactly ``round(density * N)``.

- ``uniform``: every layer gets the same density.
- ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020). Layer ``l`` gets density proportional to
  ``sum(shape_l) / prod(shape_l)``, kernel dimensions included; layers whose density would exceed 1
  are made dense and the rest re-scaled (the dense-capping loop of the RigL reference code).
- ``er``: Erdős–Rényi (Mocanu et al. 2018): the same loop with ``(n_out + n_in) / (n_out * n_in)``,
  kernel dimensions ignored.
- a mapping ``name -> density``: the named layers get exactly that density; the unnamed ones share
  the remaining budget uniformly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from . import _validate

__all__ = [
    "DISTRIBUTIONS",
    "er",
    "erk",
    "exact_counts",
    "from_mapping",
    "layer_densities",
    "uniform",
]

Shape = Sequence[int]


def _check_density(density: float) -> None:
    _validate.real("density", density, 0, 1, low_open=True)


def uniform(shapes: Sequence[Shape], density: float) -> list[float]:
    """The same density for every layer.

    Args:
        shapes (Sequence[Sequence[int]]): the shapes of the sparse tensors.
        density (float): the overall target density ``1 - sparsity``, in (0, 1].

    Returns:
        One density per tensor, all equal to ``density``.

    Raises:
        TypeError: if ``density`` is not a real number.
        ValueError: if ``density`` is outside (0, 1].

    Examples:
        >>> uniform([(64, 32), (10, 64)], 0.1)
        [0.1, 0.1]
    """
    _check_density(density)
    return [float(density)] * len(shapes)


def _capped_proportional(
    raw: Sequence[float], numels: Sequence[int], density: float
) -> list[float]:
    """Densities proportional to ``raw``, with layers that would exceed 1 made dense.

    This is the loop of RigL's ``get_sparsities_erdos_renyi``: find ``eps`` such that
    ``sum(eps * raw_l * n_l)`` over the non-dense layers plus the dense layers' ``n_l`` equals
    ``density * N``; while some ``eps * raw_l > 1``, make the layers with the largest ``raw_l``
    dense and solve again.
    """
    _check_density(density)
    dense: set[int] = set()
    total = sum(numels)
    while True:
        budget = density * total - sum(numels[i] for i in dense)
        divisor = sum(raw[i] * numels[i] for i in range(len(raw)) if i not in dense)
        if divisor <= 0:  # every layer is dense
            return [1.0] * len(raw)
        eps = budget / divisor
        free = [i for i in range(len(raw)) if i not in dense]
        largest = max(raw[i] for i in free)
        if eps * largest > 1.0:
            dense.update(i for i in free if raw[i] == largest)
        else:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(raw))]


def erk(shapes: Sequence[Shape], density: float) -> list[float]:
    """Erdős–Rényi-Kernel: density proportional to ``sum(shape) / prod(shape)``.

    Evci et al. 2020 (RigL), the default distribution of ``SparseOptimizer``. Kernel dimensions
    count: a 3x3 conv ``(c_out, c_in, 3, 3)`` scores ``(c_out + c_in + 6) / (9 c_out c_in)``.
    Layers whose density would exceed 1 are made dense, and the others share the rest of the
    budget (RigL's dense-capping loop), so the overall density is exactly ``density``.

    Args:
        shapes (Sequence[Sequence[int]]): the shapes of the sparse tensors.
        density (float): the overall target density ``1 - sparsity``, in (0, 1].

    Returns:
        One density per tensor, in [0, 1]; ``sum(d_l * n_l) == density * sum(n_l)``.

    Raises:
        TypeError: if ``density`` is not a real number.
        ValueError: if ``density`` is outside (0, 1].

    Examples:
        Small layers get a higher density than large ones:

        >>> [round(d, 4) for d in erk([(16, 3, 3, 3), (32, 16, 3, 3), (10, 32)], 0.1)]
        [0.2564, 0.0519, 0.5814]
    """
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    return _capped_proportional(raw, numels, density)


def er(shapes: Sequence[Shape], density: float) -> list[float]:
    """Erdős–Rényi: density proportional to ``(n_out + n_in) / (n_out * n_in)``, kernels ignored.

    Mocanu et al. 2018 (SET), with the same dense-capping loop as
    [`erk`][sparseopt.distributions.erk]. For 2-D weights it equals ERK.

    Args:
        shapes (Sequence[Sequence[int]]): the shapes of the sparse tensors (at least 2-D).
        density (float): the overall target density ``1 - sparsity``, in (0, 1].

    Returns:
        One density per tensor, in [0, 1].

    Raises:
        TypeError: if ``density`` is not a real number.
        ValueError: if ``density`` is outside (0, 1].

    Examples:
        >>> [round(d, 4) for d in er([(64, 32), (10, 64)], 0.1)]
        [0.0741, 0.1828]
    """
    numels = [math.prod(s) for s in shapes]
    raw = [(s[0] + s[1]) / (s[0] * s[1]) for s in shapes]
    return _capped_proportional(raw, numels, density)


def from_mapping(
    mapping: Mapping[str, float], names: Sequence[str], shapes: Sequence[Shape], density: float
) -> list[float]:
    """Densities from an explicit ``name -> density`` mapping.

    Named layers get their density exactly. Layers the mapping does not name share what remains of
    the budget ``density * N`` uniformly. If the mapping names every layer, its overall density
    must agree with ``density`` (within 1e-3), otherwise the request is contradictory.

    Args:
        mapping (Mapping[str, float]): parameter name -> density in [0, 1].
        names (Sequence[str]): the names of the sparse tensors, in order.
        shapes (Sequence[Sequence[int]]): their shapes.
        density (float): the overall target density ``1 - sparsity``, in (0, 1].

    Returns:
        One density per tensor, in the order of ``names``.

    Raises:
        TypeError: if ``mapping`` is not a mapping, one of its densities or ``density`` is not a
            real number.
        ValueError: for an unknown name, a density outside [0, 1], or an impossible budget.

    Examples:
        Keep the classifier at 25% and let the first layer take what is left of a 10% budget:

        >>> d = from_mapping({"fc2.weight": 0.25}, ["fc1.weight", "fc2.weight"],
        ...                  [(64, 32), (10, 64)], 0.1)
        >>> [round(x, 4) for x in d]
        [0.0531, 0.25]
    """
    _check_density(density)
    if not isinstance(mapping, Mapping):
        raise TypeError(
            "Expected mapping to be a mapping name -> density, but got "
            f"{_validate.type_of(mapping)}"
        )
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ValueError(
            f"distribution mapping names unknown sparse parameters {unknown}; "
            f"the sparse parameters are {list(names)}"
        )
    for name, d in mapping.items():
        if not _validate.is_real(d):
            raise TypeError(
                f"Expected distribution[{name!r}] to be a density (a real number), but got "
                f"{_validate.type_of(d)}"
            )
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"distribution[{name!r}] must be a density in [0, 1], but got {d!r}")
    numels = [math.prod(s) for s in shapes]
    total = sum(numels)
    fixed = sum(mapping[n] * k for n, k in zip(names, numels, strict=True) if n in mapping)
    rest = sum(k for n, k in zip(names, numels, strict=True) if n not in mapping)
    if rest == 0:
        if abs(fixed / total - density) > 1e-3:
            raise ValueError(
                f"distribution mapping gives overall density {fixed / total:.6f}, but "
                f"sparsity asks for {density:.6f}; make them agree or leave a layer unnamed"
            )
        return [float(mapping[n]) for n in names]
    fill = (density * total - fixed) / rest
    if not -1e-12 <= fill <= 1.0 + 1e-12:
        raise ValueError(
            f"distribution mapping is impossible at density {density:.6g}: the unnamed layers "
            f"would need density {fill:.6g}, outside [0, 1]"
        )
    fill = min(max(fill, 0.0), 1.0)
    return [float(mapping[n]) if n in mapping else fill for n in names]


DISTRIBUTIONS: dict[str, Callable[[Sequence[Shape], float], list[float]]] = {
    "uniform": uniform,
    "er": er,
    "erk": erk,
}
"""The named distributions, ``name -> fn(shapes, density)``: what ``distribution="..."`` selects."""


def layer_densities(
    distribution: str | Mapping[str, float],
    shapes: Sequence[Shape],
    density: float,
    names: Sequence[str] | None = None,
) -> list[float]:
    """Per-layer densities for ``distribution``: a name in ``DISTRIBUTIONS``, or a mapping.

    Args:
        distribution (str | Mapping[str, float]): ``"erk"``, ``"er"``, ``"uniform"``
            (case-insensitive), or a mapping name -> density (see
            [`from_mapping`][sparseopt.distributions.from_mapping]).
        shapes (Sequence[Sequence[int]]): the shapes of the sparse tensors.
        density (float): the overall target density ``1 - sparsity``, in (0, 1].
        names (Sequence[str] | None): the tensors' names; needed for a mapping. Default: None.

    Returns:
        One density per tensor.

    Raises:
        ValueError: for an unknown name, a mapping without ``names``, or a ``density`` outside
            (0, 1].
        TypeError: if ``distribution`` is neither a string nor a mapping, or ``density`` is not
            a real number.

    Examples:
        >>> [round(d, 4) for d in layer_densities("erk", [(64, 32), (10, 64)], 0.1)]
        [0.0741, 0.1828]
    """
    if isinstance(distribution, Mapping):
        if names is None:
            raise ValueError("a distribution mapping needs parameter names")
        return from_mapping(distribution, names, shapes, density)
    if not isinstance(distribution, str):
        raise TypeError(
            "Expected distribution to be one of 'erk', 'er', 'uniform' or a mapping name -> "
            f"density, but got {distribution!r}"
        )
    fn = DISTRIBUTIONS.get(distribution.lower())
    if fn is None:
        raise ValueError(
            f"Expected distribution to be one of {sorted(DISTRIBUTIONS)} or a mapping "
            f"name -> density, but got {distribution!r}"
        )
    return fn(shapes, density)


def exact_counts(densities: Sequence[float], numels: Sequence[int], density: float) -> list[int]:
    """Integer active counts per layer whose total is exactly ``round(density * N)``.

    Each layer gets ``floor(d_l * n_l)``; the remaining units go to the layers with the largest
    fractional parts (ties to the earlier layer), never above ``n_l``. This is the largest-
    remainder method, so each count is within one of ``d_l * n_l``. Fractional parts are compared
    at 1e-9, so float noise never decides a tie. ``round`` is Python's (half to even).

    Args:
        densities (Sequence[float]): one density per tensor (from a distribution).
        numels (Sequence[int]): the tensors' numbers of elements.
        density (float): the overall target density; the counts sum to ``round(density * N)``.

    Returns:
        One integer count per tensor, each in ``[0, n_l]``.

    Raises:
        TypeError: if ``density`` is not a real number.
        ValueError: if ``densities`` and ``numels`` differ in length, or ``density`` is outside
            [0, 1].

    Examples:
        ``1.5`` and ``2.5`` active weights round to ``2 + 2 = round(0.5 * 8)``; the tie for the
        extra unit goes to the earlier layer:

        >>> exact_counts([0.5, 0.5], [3, 5], 0.5)
        [2, 2]
        >>> exact_counts(erk([(64, 32), (10, 64)], 0.1), [2048, 640], 0.1)
        [152, 117]
    """
    density = _validate.real("density", density, 0, 1)
    if len(densities) != len(numels):
        raise ValueError(
            f"Expected densities and numels of the same length, but got {len(densities)} "
            f"densities and {len(numels)} numels"
        )
    target = round(density * sum(numels))
    raw = [d * n for d, n in zip(densities, numels, strict=True)]

    def frac(x: float) -> float:
        return x - math.floor(x + 1e-9)

    counts = [min(n, max(0, math.floor(r + 1e-9))) for r, n in zip(raw, numels, strict=True)]
    missing = target - sum(counts)
    if missing > 0:
        order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - math.floor(raw[i] + 1e-9)), i))
        for i in order:
            if missing == 0:
                break
            if counts[i] < numels[i]:
                counts[i] += 1
                missing -= 1
        # Rounding could still leave units (only with densities that do not sum to ``density``):
        for i in range(len(raw)):
            take = min(missing, numels[i] - counts[i])
            counts[i] += take
            missing -= take
    elif missing < 0:
        order = sorted(range(len(raw)), key=lambda i: (round(frac(raw[i]), 9), i))
        for i in order:
            if missing == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                missing += 1
    return counts
