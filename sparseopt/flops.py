"""FLOPs of sparse training and inference relative to dense, from the model's real layers.

Forward FLOPs per layer are counted by ``torch.utils.flop_counter`` on one real forward pass and
scaled by each sparse layer's density, as the RigL paper (Appendix H) and Sup-tickets' Table 3 do.
Masked dense tensors run at dense speed in PyTorch; these numbers are what a sparse kernel would
need, the standard way this field reports cost.

Training follows RigL's accounting: a step costs ``3 * f_S`` (forward, and a backward about twice
the forward), and a topology update that reads the dense gradient costs ``2 * f_S + f_D``
instead. Which updates read it follows from what ran (``SparsityMethod.reads_gradient``): every
update with ``growth="gradient"`` (RigL; GraNet's regrowth; an exploration of GMP, SNIP or static
with gradient growth under Sup-tickets), SNIP's first step; not GMP's pruning events. Dense
training costs ``3 * f_D`` per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .optimizer import SparseOptimizer

__all__ = ["TrainingFlops", "layer_flops", "sparse_forward_flops"]


def layer_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> tuple[dict[str, int], int]:
    """Forward FLOPs of one pass: ``({weight name: FLOPs of its module}, total FLOPs)``.

    The pass runs in eval mode under ``torch.no_grad()`` (BatchNorm statistics are untouched);
    ``weight name`` is ``"<module path>.weight"`` for every module with a weight of ``ndim >= 2``.

    Args:
        model (nn.Module): the model; its training mode is restored afterwards.
        *inputs: the positional inputs of one forward pass.
        **kwargs: its keyword inputs.

    Returns:
        ``(per_layer, total)``: FLOPs of each weighted module, and of the whole pass.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.

    Examples:
        >>> import torch
        >>> per_layer, total = layer_flops(torch.nn.Linear(3, 2, bias=False), torch.randn(5, 3))
        >>> per_layer, total   # 2 * batch * in * out
        ({'weight': 60}, 60)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_layer = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            continue
        key = f"{root}.{name}" if name else root
        if key in counts:
            per_layer[f"{name}.weight" if name else "weight"] = int(sum(counts[key].values()))
    return per_layer, int(sum(counts["Global"].values()))


def sparse_forward_flops(
    per_layer: Mapping[str, int], total: int, densities: Mapping[str, float]
) -> float:
    """Forward FLOPs when each layer in ``densities`` runs at its density, the rest dense.

    Args:
        per_layer (Mapping[str, int]): dense FLOPs per weight name, from
            [`layer_flops`][sparseopt.flops.layer_flops].
        total (int): the dense FLOPs of the whole pass.
        densities (Mapping[str, float]): weight name -> density.

    Returns:
        ``total - sum(per_layer[name] * (1 - density))``.

    Raises:
        KeyError: if ``densities`` names a layer that ``per_layer`` lacks.

    Examples:
        >>> sparse_forward_flops({"0.weight": 1000, "1.weight": 200}, 1300,
        ...                      {"0.weight": 0.1, "1.weight": 0.5})
        300.0
    """
    return total - sum(per_layer[name] * (1.0 - d) for name, d in densities.items())


class TrainingFlops:
    """Accumulates the training FLOPs of a ``SparseOptimizer`` run, step by step.

    It registers a step post-hook, so every optimizer step that really ran is counted at the
    densities it ran with (GraNet's falling density included), and the steps that read a dense
    gradient get RigL's extra cost. The optimizer needs ``model=`` so that layers have names.

    Args:
        opt (SparseOptimizer): the optimizer to follow.
        model (nn.Module): the model, for one FLOP-counting forward pass.
        *inputs: an example batch (its size sets the absolute numbers, not the ratios).

    Raises:
        TypeError: if ``opt`` is not a ``SparseOptimizer`` or ``model`` not an ``nn.Module``.
        ValueError: if no FLOPs were counted for some sparse layer (no ``model=``, or the
            example input does not reach it).

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.5,
        ...                       model=model, seed=0)
        >>> flops = TrainingFlops(opt, model, torch.randn(4, 8))
        >>> model(torch.randn(4, 8)).sum().backward(); opt.step()
        >>> round(flops.ratio, 3), round(flops.inference_ratio(), 3)
        (0.5, 0.5)
    """

    def __init__(self, opt: SparseOptimizer, model: nn.Module, *inputs: Any) -> None:
        if not isinstance(opt, SparseOptimizer):
            raise TypeError(f"Expected opt to be a SparseOptimizer, but got {type(opt).__name__}")
        self.per_layer, self.dense_forward = layer_flops(model, *inputs)
        names = {layer.name for layer in opt.layers}
        missing = sorted(names - set(self.per_layer))
        if missing:
            raise ValueError(
                f"no FLOPs were counted for sparse layers {missing}: pass model= to "
                "SparseOptimizer and make sure the example input reaches them"
            )
        self.opt = opt
        self.steps = 0
        self.sparse_total = 0.0
        self.dense_total = 0.0
        self._handle = opt.register_step_post_hook(self._on_step)

    def densities(self) -> dict[str, float]:
        """The current density of each sparse layer, by name."""
        return {layer.name: layer.count / layer.numel for layer in self.opt.layers}

    def sparse_forward(self) -> float:
        """Forward FLOPs of the current masks."""
        return sparse_forward_flops(self.per_layer, self.dense_forward, self.densities())

    def inference_ratio(self) -> float:
        """Inference (forward) FLOPs of the current masks relative to dense."""
        return self.sparse_forward() / self.dense_forward

    def _on_step(self, opt: SparseOptimizer, args: Any, kwargs: Any) -> None:
        f_s, f_d = self.sparse_forward(), float(self.dense_forward)
        cost = 3.0 * f_s
        # the copy of the counters only on a step that updated the topology
        if opt.last_update_step == opt.step_count and opt.update_stats.last_read_gradient:
            cost += f_d - f_s  # the dense gradient of this step: 2 f_S + f_D instead of 3 f_S
        self.steps += 1
        self.sparse_total += cost
        self.dense_total += 3.0 * f_d

    @property
    def ratio(self) -> float:
        """Training FLOPs so far relative to dense training for the same number of steps."""
        return self.sparse_total / self.dense_total if self.dense_total else float("nan")

    def remove(self) -> None:
        """Stop counting (removes the hook)."""
        self._handle.remove()
