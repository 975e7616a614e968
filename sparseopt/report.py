"""What the optimizer reports: topology-update statistics and the per-layer density table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SparsityReport", "UpdateStats"]


@dataclass
class UpdateStats:
    """Counters of the topology updates, kept by the mask engine and saved in checkpoints.

    Attributes:
        updates: topology updates done (scheduled ones and explorations).
        skipped: updates skipped because the gradients were not finite.
        last_update_step: the optimizer step of the last update, ``None`` before the first.
        last_rate: the drop fraction of the last update.
        last_exchanged: connections grown in the last update.
        exchanged: connections grown in all updates.
        last_read_gradient: whether the last update read the dense gradient (FLOPs accounting;
            not saved: it concerns the step that just ran).

    Examples:
        >>> stats = UpdateStats()
        >>> stats.record(step=5, rate=0.3, exchanged=12, read_gradient=True)
        >>> stats.updates, stats.last_update_step, stats.exchanged
        (1, 5, 12)
    """

    updates: int = 0
    skipped: int = 0
    last_update_step: int | None = None
    last_rate: float | None = None
    last_exchanged: int = 0
    exchanged: int = 0
    last_read_gradient: bool = False

    def record(self, step: int, rate: float, exchanged: int, read_gradient: bool) -> None:
        """Count one update at ``step`` that moved ``exchanged`` connections.

        Args:
            step (int): the optimizer step of the update.
            rate (float): its drop fraction.
            exchanged (int): connections grown.
            read_gradient (bool): whether it read the dense gradient.
        """
        self.updates += 1
        self.last_update_step = step
        self.last_rate = rate
        self.last_exchanged = exchanged
        self.exchanged += exchanged
        self.last_read_gradient = read_gradient

    def as_dict(self) -> dict[str, Any]:
        """The saved counters as plain data, as checkpoints and
        [`SparsityReport`][sparseopt.report.SparsityReport] hold them."""
        out = asdict(self)
        del out["last_read_gradient"]
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> UpdateStats:
        """Rebuild from [`as_dict`][sparseopt.report.UpdateStats.as_dict].

        Args:
            saved (dict): the saved counters.
        """
        return cls(**saved)


class SparsityReport(dict):
    """What [`SparseOptimizer.report`][sparseopt.SparseOptimizer.report] returns: a plain
    ``dict`` that prints as a table.

    Keys:
        ``layers``: one dict per sparse layer with ``name``, ``shape``, ``numel``, ``active``
        (the mask's count: active connections), ``nonzero`` (the weights that are not 0 right
        now: a grown weight starts at 0, and a NaN counts as nonzero), ``nnz`` (the same as
        ``active``, its name before ``active`` and ``nonzero`` existed) and ``density``
        (``active / numel``).
        ``total``: ``numel``, ``active``, ``nonzero``, ``nnz``, ``density`` and ``sparsity`` over
        all sparse layers.
        ``updates``: topology-update statistics: ``updates`` done, ``skipped`` (non-finite
        gradients), ``last_update_step``, ``last_rate``, ``last_exchanged`` (connections grown in
        the last update), ``exchanged`` (in all updates), and the current ``step``.
        ``structure``: the structure (``"2:4"``, ``"fan_in"``) or ``None``.
        ``dense``: the layers the structure left dense (``name``, ``shape``, ``reason``; e.g. an
        input dimension that is not a multiple of ``M``); empty without a structure.
        ``frozen``: the layers left dense and untouched because they had ``requires_grad=False``
        when the optimizer was built (``name``, ``shape``).
        ``suptickets``: ``tickets`` so far, ``finalized``, the kept ``candidates``, each one's
        ``scores`` and the ``chosen`` one (and the ``soup``'s members) under ``select=``,
        ``skipped_steps`` (``GradScaler``); ``configured`` is False before any superposition.

    Args:
        layers (Sequence[dict]): the per-layer rows.
        updates (dict): the update statistics.
        structure (str | None): the optimizer's structure. Default: None.
        dense (Sequence[dict]): the layers the structure left dense. Default: ().
        frozen (Sequence[dict]): the frozen layers. Default: ().

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 10))
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9,
        ...                       model=model, seed=0)
        >>> report = opt.report()
        >>> report["total"]["active"], report["layers"][1]["active"], report["dense"]
        (269, 117, [])
        >>> print(report)
        layer     shape       numel      active     nonzero  density
        ------------------------------------------------------------
        0.weight  64x32        2048         152        2048   0.0742
        2.weight  10x64         640         117         640   0.1828
        ------------------------------------------------------------
        total                  2688         269        2688   0.1001
        step 0: 0 topology updates (0 skipped), 0 connections exchanged

        The masks are applied at the first step (or by ``apply_masks()``); until then every
        weight is still nonzero.
    """

    def __init__(
        self,
        layers: Sequence[dict[str, Any]],
        updates: dict[str, Any],
        *,
        structure: str | None = None,
        dense: Sequence[dict[str, Any]] = (),
        frozen: Sequence[dict[str, Any]] = (),
    ) -> None:
        rows = [dict(r) for r in layers]
        for r in rows:  # rows written before "active" and "nonzero": the mask's count
            r.setdefault("active", r["nnz"])
            r.setdefault("nonzero", r["active"])
        numel = sum(r["numel"] for r in rows)
        active = sum(r["active"] for r in rows)
        density = active / numel if numel else 1.0
        super().__init__(
            layers=rows,
            total={
                "numel": numel,
                "active": active,
                "nonzero": sum(r["nonzero"] for r in rows),
                "nnz": active,
                "density": density,
                "sparsity": 1.0 - density,
            },
            updates=dict(updates),
            structure=structure,
            dense=[dict(d) for d in dense],
            frozen=[dict(f) for f in frozen],
        )

    def __str__(self) -> str:
        rows = [
            (
                r["name"],
                "x".join(map(str, r["shape"])),
                r["numel"],
                r["active"],
                r["nonzero"],
                r["density"],
            )
            for r in self["layers"]
        ]
        width = max([len("layer"), *(len(r[0]) for r in rows)])
        shape_w = max([len("shape"), *(len(r[1]) for r in rows)])
        head = (
            f"{'layer':<{width}}  {'shape':>{shape_w}}  {'numel':>10}  {'active':>10}  "
            f"{'nonzero':>10}  density"
        )
        lines = [head, "-" * len(head)]
        lines += [
            f"{n:<{width}}  {s:>{shape_w}}  {k:>10}  {a:>10}  {z:>10}  {d:7.4f}"
            for n, s, k, a, z, d in rows
        ]
        t = self["total"]
        lines.append("-" * len(head))
        total = (
            f"{'total':<{width}}  {'':>{shape_w}}  {t['numel']:>10}  {t['active']:>10}  "
            f"{t['nonzero']:>10}"
        )
        lines.append(f"{total}  {t['density']:7.4f}")
        if self.get("structure") is not None:
            lines.append(f"structure {self['structure']}")
        lines += [
            f"  left dense: {d['name']} ({'x'.join(map(str, d['shape']))}): {d['reason']}"
            for d in self.get("dense", ())
        ]
        lines += [
            f"  frozen (requires_grad=False, left dense): {f['name']} "
            f"({'x'.join(map(str, f['shape']))})"
            for f in self.get("frozen", ())
        ]
        u = self["updates"]
        lines.append(
            f"step {u['step']}: {u['updates']} topology updates ({u['skipped']} skipped), "
            f"{u['exchanged']} connections exchanged"
        )
        if self.get("suptickets", {}).get("configured"):
            lines.append(_suptickets_line(self["suptickets"]))
        return "\n".join(lines)


def _suptickets_line(sup: dict[str, Any]) -> str:
    """``Sup-tickets: 3 tickets, finalized, chose soup (0.91); scores: ...`` (booster)."""
    line = f"Sup-tickets: {sup['tickets']} tickets"
    if sup["finalized"]:
        line += f", finalized, chose {sup['chosen']}"
        if sup["scores"]:
            line += f" ({sup['scores'][sup['chosen']]:.4g}); scores: " + ", ".join(
                f"{name} {score:.4g}" for name, score in sup["scores"].items()
            )
    return line
