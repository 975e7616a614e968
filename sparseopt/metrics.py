"""Measurements specific to sparse training.

- [`mask_churn`][sparseopt.metrics.mask_churn]: the fraction of active connections an update
  replaced.
- [`InTimeOverParameterization`][sparseopt.metrics.InTimeOverParameterization]: the fraction of
  weights ever active during training (Liu et al. 2021, "in-time over-parameterization").
- [`prediction_disagreement`][sparseopt.metrics.prediction_disagreement] and
  [`prediction_kl`][sparseopt.metrics.prediction_kl]: how differently two models predict, the
  ticket diversity of the Sup-tickets paper (Table 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .masks import count_active
from .optimizer import SparseOptimizer
from .report import SparsityReport  # noqa: F401  (its home until 0.1.0)

__all__ = [
    "InTimeOverParameterization",
    "mask_churn",
    "prediction_disagreement",
    "prediction_kl",
]


def mask_churn(before: Sequence[Tensor], after: Sequence[Tensor]) -> float:
    """Connections active in ``after`` but not in ``before``, over those active in ``before``.

    Args:
        before (Sequence[Tensor]): the bool masks before an update, one per layer.
        after (Sequence[Tensor]): the bool masks after it, same shapes.

    Returns:
        The churn in [0, 1] (0.0 when nothing was active before).

    Examples:
        >>> import torch
        >>> mask_churn([torch.tensor([True, True, False, False])],
        ...            [torch.tensor([True, False, True, False])])
        0.5
    """
    grown = sum(count_active([a & ~b for b, a in zip(before, after, strict=True)]))
    active = sum(count_active(before))
    return grown / active if active else 0.0


def prediction_disagreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """The fraction of inputs on which the two models' top-1 predictions differ.

    Args:
        logits_a (Tensor): ``(batch, classes)`` outputs of the first model.
        logits_b (Tensor): the second model's, same shape.

    Returns:
        The disagreement in [0, 1].

    Examples:
        >>> import torch
        >>> prediction_disagreement(torch.tensor([[2.0, 1.0], [0.0, 1.0]]),
        ...                         torch.tensor([[2.0, 1.0], [1.0, 0.0]]))
        0.5
    """
    return (logits_a.argmax(-1) != logits_b.argmax(-1)).float().mean().item()


def prediction_kl(logits_a: Tensor, logits_b: Tensor) -> float:
    """Mean ``KL(p_a || p_b)`` between the two models' predictive distributions (nats).

    Computed in float64 from ``log_softmax`` of the logits, and clamped at 0.

    Args:
        logits_a (Tensor): ``(batch, classes)`` outputs of the first model (the reference ``p_a``).
        logits_b (Tensor): the second model's, same shape.

    Returns:
        The batch-mean KL divergence, ``>= 0``.

    Examples:
        >>> import torch
        >>> logits = torch.randn(4, 3)
        >>> prediction_kl(logits, logits)
        0.0
    """
    log_a = F.log_softmax(logits_a.double(), -1)
    log_b = F.log_softmax(logits_b.double(), -1)
    return F.kl_div(log_b, log_a, log_target=True, reduction="batchmean").clamp(min=0).item()


class InTimeOverParameterization:
    """Tracks which weights were ever active: the in-time over-parameterization rate.

    It takes the masks when built and after every step that changed the topology (one step
    post-hook), so it costs one byte per weight and no work on steady-state steps.

    Args:
        opt (SparseOptimizer): the optimizer to follow, from any point of training on.

    Raises:
        TypeError: if ``opt`` is not a ``SparseOptimizer``.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> model = torch.nn.Linear(10, 10)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9,
        ...                       update_every=1, prune_rate=0.5, seed=0)
        >>> itop = InTimeOverParameterization(opt)
        >>> itop.rate
        0.1
        >>> model(torch.randn(2, 10)).sum().backward(); opt.step()
        >>> itop.rate > 0.1
        True
    """

    def __init__(self, opt: SparseOptimizer) -> None:
        if not isinstance(opt, SparseOptimizer):
            raise TypeError(f"Expected opt to be a SparseOptimizer, but got {type(opt).__name__}")
        self.opt = opt
        self.ever = [layer.mask.clone() for layer in opt.layers]
        self._handle = opt.register_step_post_hook(self._on_step)

    def _on_step(self, opt: SparseOptimizer, args: Any, kwargs: Any) -> None:
        if opt.last_update_step == opt.step_count:
            for ever, layer in zip(self.ever, opt.layers, strict=True):
                ever |= layer.mask

    @property
    def rate(self) -> float:
        """Weights ever active over all sparse weights, in (0, 1]."""
        total = sum(e.numel() for e in self.ever)
        return sum(count_active(self.ever)) / total if total else 1.0

    def remove(self) -> None:
        """Stop tracking (removes the hook)."""
        self._handle.remove()
