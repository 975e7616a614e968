"""What runs first in ``SparseOptimizer.step()``: GradScaler's handshake, and the loop checks.

``SparseOptimizer`` sets ``_step_supports_amp_scaling = True``, as torch's fused optimizers do.
``torch.amp.GradScaler.step(opt)`` then always calls ``opt.step()`` and hands it two tensors as
attributes of the optimizer (torch 2.13, ``torch/amp/grad_scaler.py``):

- ``found_inf``: nonzero when a gradient was inf or NaN;
- ``grad_scale``: the scale, when the gradients are still scaled; ``None`` when the user called
  ``scaler.unscale_(opt)`` first (the gradients are then unscaled already).

Here the gradients are unscaled exactly as ``GradScaler.unscale_`` does (its foreach kernel, the
same reciprocal in float64, per device and dtype; fp16 gradients refused with torch's message),
so the result is bit-identical to the scaler's own path. On ``found_inf`` the step is skipped
and counted (``opt.skipped_steps``): masks, weights and inner state are untouched, and
``opt.step_count`` counts only the steps that ran. Every call counts as one training iteration,
which ``SupTicketsScheduler`` follows. The inner optimizer never sees ``found_inf`` or
``grad_scale``: it steps on unscaled gradients, fused or not.

Also here: an optimizer step after ``finalize()`` warns once (the model holds the ultimate
ticket; the loop runs longer than the schedule).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from . import _compat

__all__ = ["before_step"]


def _grads(opt: Any) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """The gradients to unscale, by device and dtype (a sparse gradient's values), as
    ``GradScaler._unscale_grads_`` collects them."""
    out: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.dtype == torch.float16:
                raise ValueError("Attempting to unscale FP16 gradients.")
            g = g._values() if g.is_sparse else g
            out[(g.device, g.dtype)].append(g)
    return out


@torch.no_grad()
def _unscale(opt: Any, grad_scale: Tensor) -> None:
    inv = (
        grad_scale.double().reciprocal().float()
        if grad_scale.device != torch.device("mps:0")
        else grad_scale.reciprocal()
    )
    for (device, _), grads in _grads(opt).items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        _compat.amp_unscale_(grads, found, inv.to(device))


@torch.compiler.disable
def before_step(opt: Any) -> bool:
    """Run before the step; return whether a ``GradScaler`` asks to skip it (inf or NaN found).

    Raises:
        ValueError: for fp16 gradients that a ``GradScaler`` asks to unscale (torch's rule:
            the parameters must be fp32, under autocast).
    """
    state = opt._suptickets
    state.step_calls += 1
    sup = state.superposition
    if sup is not None and sup.finalized:
        state.once.warn(
            "step-after-finalize",
            "opt.step() after finalize(): the model held the ultimate ticket, and this step "
            "trains it further (the loop runs longer than the scheduler's total_steps); stop "
            "the loop after total_steps optimizer steps, or call finalize() again at the end",
        )
    found_inf = opt.__dict__.get("found_inf")
    grad_scale = opt.__dict__.get("grad_scale")
    if grad_scale is not None:
        try:
            _unscale(opt, grad_scale)
        except ValueError:
            state.step_calls -= 1  # the scaler leaves its attributes on a step that raised
            for name in ("found_inf", "grad_scale"):
                opt.__dict__.pop(name, None)
            raise
    if found_inf is None or not bool(found_inf.item()):
        return False
    state.skipped_steps += 1
    return True
