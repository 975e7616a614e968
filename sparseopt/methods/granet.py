"""GraNet (Liu et al. 2021): GMP's gradual pruning, each event followed by gradient regrowth."""

from __future__ import annotations

from typing import ClassVar

from .gmp import GMP

__all__ = ["GraNet"]


class GraNet(GMP):
    """GraNet: gradual magnitude pruning with zero-cost neuroregeneration (Liu et al. 2021).

    GMP's global cubic pruning events, each followed at once by a per-layer regrowth: drop the
    ``floor(rate * active)`` smallest ``|w|`` of each layer and grow as many by the largest
    ``|grad|`` of the current batch (RigL), so the per-layer counts stay as the pruning left them.
    After ``prune_end`` it keeps doing RigL updates at the final density on the optimizer's
    schedule. A weight pruned and regrown in the same event keeps its value.

    Args:
        initial_density (float | None): the density of the initial masks, in (0, 1]; ``None``
            takes ``default_initial_density``, 0.5 (GraNet's "s_i = 0.5"); 1.0 starts dense.
            Default: None.
        prune_start (float): fraction of ``total_steps`` where pruning starts. Default: 0.0.
        prune_end (float): fraction of ``total_steps`` where it reaches the target. Default: 0.5.
        growth (str | None): how the regrowth and the later updates grow: ``"gradient"`` (GraNet,
            the default) or ``"random"``.
        **options: rejected (no other options).

    Raises:
        ValueError: as for [`GMP`][sparseopt.methods.GMP].

    Examples:
        From density 0.5 to 0.1 in four events, with regrowth after each:

        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "granet", 0.9,
        ...                       update_every=1, total_steps=4, prune_end=1.0, prune_rate=0.5,
        ...                       seed=0)
        >>> densities = [opt.density]
        >>> for _ in range(4):
        ...     model(torch.randn(4, 16)).square().sum().backward()
        ...     opt.step(); opt.zero_grad()
        ...     densities.append(round(opt.density, 4))
        >>> densities[0], densities[-1], opt.layers[0].count
        (0.5, 0.1016, 26)
    """

    name = "granet"
    periodic = True
    regrow: ClassVar[bool] = True
    default_initial_density: ClassVar[float] = 0.5
