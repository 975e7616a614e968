"""Layer-wise density distributions: how a global sparsity is spread over the sparse layers.

Every distribution has the same signature, ``fn(shapes, density) -> list[float]``: given the shapes
of the sparse tensors and the overall target density ``1 - sparsity``, it returns one density per
tensor such that ``sum(d_l * n_l) == density * sum(n_l)`` (in real numbers). :func:`exact_counts`
then turns densities into integer counts whose total is exactly ``round(density * N)``.

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
import numbers
from collections.abc import Callable, Mapping, Sequence

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
    if not isinstance(density, numbers.Real) or isinstance(density, bool):
        raise TypeError(f"Expected density to be a float, but got {density!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"Expected density in (0, 1], but got {density}")


def uniform(shapes: Sequence[Shape], density: float) -> list[float]:
    """The same density for every layer."""
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
    """Erdős–Rényi-Kernel: density proportional to ``sum(shape) / prod(shape)``."""
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    return _capped_proportional(raw, numels, density)


def er(shapes: Sequence[Shape], density: float) -> list[float]:
    """Erdős–Rényi: density proportional to ``(n_out + n_in) / (n_out * n_in)``, kernels ignored."""
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

    Raises:
        ValueError: for an unknown name, a density outside [0, 1], or an impossible budget.
    """
    _check_density(density)
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ValueError(
            f"distribution mapping names unknown sparse parameters {unknown}; "
            f"the sparse parameters are {list(names)}"
        )
    for name, d in mapping.items():
        if not isinstance(d, numbers.Real) or isinstance(d, bool) or not 0.0 <= d <= 1.0:
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


def layer_densities(
    distribution: str | Mapping[str, float],
    shapes: Sequence[Shape],
    density: float,
    names: Sequence[str] | None = None,
) -> list[float]:
    """Per-layer densities for ``distribution`` (a name in :data:`DISTRIBUTIONS` or a mapping)."""
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
    """
    if len(densities) != len(numels):
        raise ValueError("densities and numels must have the same length")
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
