"""SET (Mocanu et al. 2018): magnitude drop, random growth."""

from __future__ import annotations

from .base import SparsityMethod

__all__ = ["SET"]


class SET(SparsityMethod):
    """Sparse Evolutionary Training: every update drops the smallest ``|w|`` and grows at random.

    The random growth draws from the optimizer's own ``torch.Generator`` (on CPU, whatever the
    parameter's device), so the same seed gives the same masks on every rank and every device.
    A sharded (FSDP2) parameter draws the full-size scores too and keeps its shard's chunk, so
    the masks are the single-process ones.

    Args:
        growth (str | None): ``"random"`` (SET, the default) or ``"gradient"``.

    The schedule is the optimizer's (``update_every``,
    ``prune_rate``, ``prune_schedule``, ``stop_fraction``). The original SET drops ζ = 0.3 of the
    connections per epoch.

    Examples:
        Half of the 26 active weights are dropped; some of them are grown again at random and
        keep their values, so 12 connections are new:

        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt = SparseOptimizer(sgd, "set", 0.9, update_every=1, prune_rate=0.5, seed=0)
        >>> def train_step():
        ...     model(torch.randn(4, 16)).square().sum().backward()
        ...     opt.step(); opt.zero_grad()
        >>> train_step()
        >>> opt.layers[0].count, opt.report()["updates"]["last_exchanged"]
        (26, 12)
    """

    name = "set"
    default_growth = "random"
