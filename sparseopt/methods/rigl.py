"""RigL (Evci et al. 2020): magnitude drop, growth by the dense gradient's magnitude."""

from __future__ import annotations

from .base import SparsityMethod

__all__ = ["RigL"]


class RigL(SparsityMethod):
    """Rigging the Lottery: grow the inactive connections with the largest ``|grad|``.

    The gradient is the dense gradient of the current batch, read inside ``step()`` before the
    optimizer masks it. A layer without a gradient grows by index order (all scores zero).

    Args:
        growth (str | None): ``"gradient"`` (RigL, the default) or ``"random"``.

    The paper's schedule is the optimizer's default: ΔT = 100
    (``update_every``), α = 0.3 (``prune_rate``), cosine decay, updates stop at 75% of
    ``total_steps`` (``stop_fraction``).

    Examples:
        Each grown connection starts at weight 0, so the weights have fewer nonzeros than the
        mask has active entries right after an update:

        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.9,
        ...                       update_every=1, prune_rate=0.5, seed=0)
        >>> model(torch.randn(4, 16)).square().sum().backward(); opt.step()
        >>> grown = opt.report()["updates"]["last_exchanged"]
        >>> opt.layers[0].count, grown, int((model.weight != 0).sum()) == 26 - grown
        (26, 13, True)
    """

    name = "rigl"
    default_growth = "gradient"
