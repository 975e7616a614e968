"""Measurements specific to sparse training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["SparsityReport"]


class SparsityReport(dict):
    """What :meth:`SparseOptimizer.report` returns: a plain ``dict`` that prints as a table.

    Keys:
        ``layers``: one dict per sparse layer with ``name``, ``shape``, ``numel``, ``nnz`` (active
        connections: an active weight may be exactly 0) and ``density``.
        ``total``: ``numel``, ``nnz``, ``density`` and ``sparsity`` over all sparse layers.
        ``updates``: topology-update statistics: ``updates`` done, ``skipped`` (non-finite
        gradients), ``last_update_step``, ``last_rate``, ``last_exchanged`` (connections grown in
        the last update), ``exchanged`` (in all updates), and the current ``step``.
    """

    def __init__(self, layers: Sequence[dict[str, Any]], updates: dict[str, Any]) -> None:
        numel = sum(r["numel"] for r in layers)
        nnz = sum(r["nnz"] for r in layers)
        density = nnz / numel if numel else 1.0
        super().__init__(
            layers=list(layers),
            total={"numel": numel, "nnz": nnz, "density": density, "sparsity": 1.0 - density},
            updates=dict(updates),
        )

    def __str__(self) -> str:
        rows = [
            (r["name"], "x".join(map(str, r["shape"])), r["numel"], r["nnz"], r["density"])
            for r in self["layers"]
        ]
        width = max([len("layer"), *(len(r[0]) for r in rows)])
        shape_w = max([len("shape"), *(len(r[1]) for r in rows)])
        head = f"{'layer':<{width}}  {'shape':>{shape_w}}  {'numel':>10}  {'nnz':>10}  density"
        lines = [head, "-" * len(head)]
        lines += [
            f"{n:<{width}}  {s:>{shape_w}}  {k:>10}  {z:>10}  {d:7.4f}" for n, s, k, z, d in rows
        ]
        t = self["total"]
        lines.append("-" * len(head))
        total = f"{'total':<{width}}  {'':>{shape_w}}  {t['numel']:>10}  {t['nnz']:>10}"
        lines.append(f"{total}  {t['density']:7.4f}")
        u = self["updates"]
        lines.append(
            f"step {u['step']}: {u['updates']} topology updates ({u['skipped']} skipped), "
            f"{u['exchanged']} connections exchanged"
        )
        return "\n".join(lines)
