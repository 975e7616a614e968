"""Measured speed rules as tables: the sparsity from which a layer wins, by size and batch.

A rule is a tuple of rows ``(most, by_batch)``: the first row whose ``most`` is ``None`` or at
least the layer's weight count applies, and in it the first ``(smallest, sparsity)`` whose
``smallest`` is at most the batch gives the answer. The export's inference rules and the sparse
kernels' training rule are written this way, each next to the measurement it records.
"""

from __future__ import annotations

from typing import Any

from . import _validate

__all__ = ["Rule", "lookup"]

Rule = tuple[tuple[int | None, tuple[tuple[int, float], ...]], ...]


def lookup(numel: Any, batch_size: Any, rule: Rule) -> float:
    """The minimum sparsity ``rule`` gives a layer of ``numel`` weights at ``batch_size`` rows
    (``TypeError``/``ValueError`` for a non-int or out-of-range argument)."""
    numel = _validate.integer("numel", numel, 0)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    for most, by_batch in rule:
        if most is None or numel <= most:
            return next(t for smallest, t in by_batch if batch_size >= smallest)
    raise AssertionError("unreachable: the last row of a rule takes any size")
