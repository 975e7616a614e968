"""Static sparse training: random masks per distribution, fixed during training."""

from __future__ import annotations

from .base import SparsityMethod

__all__ = ["Static"]


class Static(SparsityMethod):
    """Static sparse training (e.g. "static ERK"): the masks never change on their own.

    Only an exploration that something asks for explicitly (the Sup-tickets cycle start, or
    ``SparseOptimizer.explore``) moves them: magnitude drop, and growth by the ``growth`` strategy.

    Args:
        growth (str | None): how explorations grow: ``"random"`` (the default, SET's criterion)
            or ``"gradient"``.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.9,
        ...                       update_every=1, seed=0)
        >>> before = opt.layers[0].mask.clone()
        >>> def train_step():
        ...     model(torch.randn(4, 16)).square().sum().backward()
        ...     opt.step(); opt.zero_grad()
        >>> for _ in range(3):
        ...     train_step()
        >>> bool((opt.layers[0].mask == before).all()), opt.report()["updates"]["updates"]
        (True, 0)
    """

    name = "static"
    periodic = False
    default_growth = "random"
