"""SNIP (Lee et al. 2019): single-shot pruning by connection sensitivity at initialization."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _validate
from .._compat import override
from ..context import MethodContext, SparseLayer
from ..masks import select_largest_across, select_largest_within
from .base import Scores, SparsityMethod

__all__ = ["SNIP"]

SCOPES = ("global", "layer")


class SNIP(SparsityMethod):
    """Keep the connections with the largest sensitivity ``|grad * weight|`` of the first batch.

    The optimizer starts dense. Inside the first ``step()``, before anything is masked, every
    sparse weight is scored by ``|g * w|`` from that batch's dense gradient; the top scores are
    kept, the rest are zeroed, and then the inner optimizer takes its step on the sparse network.
    The masks never change afterwards (an exploration that Sup-tickets asks for grows by the
    ``growth`` strategy, ``|grad|`` by default). The weights are not re-initialized and the
    model is not patched. Under DDP the gradients are already all-reduced when ``step()`` runs,
    so every rank keeps the same connections.

    Args:
        scope (str): ``"global"`` keeps the global top ``round((1 - sparsity) * N)`` (the original
            SNIP); ``"layer"`` keeps each layer's count of the ``distribution``. Under a
            ``structure`` the selection is per layer whatever the scope: the top ``N`` of each
            group by ``|g * w|`` (``N:M``), or the top ``k`` of each row (``"fan_in"``).
            Default: ``"global"``.
        growth (str | None): how explorations grow: ``"gradient"`` (the default) or
            ``"random"``.
        **options: rejected (no other options).

    Raises:
        TypeError: for a ``scope`` that is not a string.
        ValueError: for an unknown ``scope``; inside the first step, if no sparse parameter has
            a gradient.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16, bias=False)
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "snip", 0.9, seed=0)
        >>> opt.density
        1.0
        >>> model(torch.randn(4, 16)).square().sum().backward(); opt.step()
        >>> opt.layers[0].count, round(opt.density, 4)
        (26, 0.1016)
    """

    name = "snip"
    periodic = False
    default_growth = "gradient"

    def __init__(self, scope: str = "global", *, growth: str | None = None, **options: Any) -> None:
        super().__init__(growth=growth, **options)
        self.scope = _validate.choice("scope", scope, SCOPES)
        self.initialized = False

    @override
    def options(self) -> dict[str, Any]:
        return {**super().options(), "scope": self.scope}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initialized": self.initialized}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initialized = bool(state["initialized"])

    @override
    def start_density(self, density: float) -> float:
        return 1.0

    @override
    def is_update_step(self, step: int, ctx: MethodContext) -> bool:
        return not self.initialized

    @override
    def updates_before_step(self, step: int) -> bool:
        return not self.initialized

    @override
    def reads_gradient(self, step: int | None, ctx: MethodContext) -> bool:
        return not self.initialized or self.uses_gradient

    @override
    def grow_scores(
        self, layer: SparseLayer, grad: Tensor | None, generator: torch.Generator
    ) -> Tensor | None:
        if self.initialized:
            return super().grow_scores(layer, grad, generator)
        return None if grad is None else (grad.detach() * layer.param.detach()).abs()

    @override
    def new_masks(
        self, ctx: MethodContext, rate: float, grow_scores: Scores, step: int | None
    ) -> list[Tensor]:
        if self.initialized or step is None:
            return super().new_masks(ctx, rate, grow_scores, step)
        layers = ctx.layers
        if all(s is None for s in grow_scores):
            raise ValueError(
                "SNIP scores connections by |grad * weight| inside the first step(), but no "
                "sparse parameter has a gradient: call loss.backward() before the first step()"
            )
        scores = [
            torch.zeros_like(layer.param, dtype=torch.float32) if s is None else s.float()
            for layer, s in zip(layers, grow_scores, strict=True)
        ]
        if self.scope == "layer" or ctx.structure is not None:
            masks = [
                select_largest_within(s, layer.target, ctx.structure)
                for s, layer in zip(scores, layers, strict=True)
            ]
        else:
            masks = select_largest_across(scores, sum(layer.target for layer in layers))
        self.initialized = True
        return masks
