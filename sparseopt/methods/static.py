"""Static sparse training: random masks per distribution, fixed during training."""

from __future__ import annotations

from .set import SET

__all__ = ["Static"]


class Static(SET):
    """Static sparse training (e.g. "static ERK"): the masks never change on their own.

    Only an exploration that something asks for explicitly (the Sup-tickets cycle start, or
    ``SparseOptimizer.explore``) moves them, with SET's criterion: magnitude drop, random growth.
    """

    name = "static"
    periodic = False
