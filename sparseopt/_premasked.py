"""Which gradients are already 0 at their mask's inactive positions, so the mask engine can skip
masking them.

``sparseopt.sparse_kernels`` computes the weight gradient of a sparse layer only at its active
positions and registers a check here, keyed by the inner optimizer; the engine asks it for each
gradient before the mask pass (``MaskEngine.begin_step``). A check answers ``True`` only when it
can prove that the gradient is the one its kernel wrote and that nothing changed it since: any
other gradient is masked as usual. This module imports nothing from sparseopt, so that the engine
and the kernels both import it without a cycle.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Check", "check", "register", "unregister"]

Check = Callable[[Tensor, Tensor], bool]
"""``check(param, mask) -> bool``: whether ``param.grad`` is provably 0 wherever ``mask`` is not."""

_CHECKS: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[Check]] = weakref.WeakKeyDictionary()


def register(optimizer: torch.optim.Optimizer, fn: Check) -> None:
    """Add ``fn`` to the checks of the inner ``optimizer``."""
    _CHECKS.setdefault(optimizer, []).append(fn)


def unregister(optimizer: torch.optim.Optimizer, fn: Check) -> None:
    """Remove ``fn`` from the checks of ``optimizer`` (nothing if it is not there)."""
    fns = _CHECKS.get(optimizer)
    if fns is not None and fn in fns:
        fns.remove(fn)
        if not fns:
            del _CHECKS[optimizer]


def check(optimizer: torch.optim.Optimizer) -> Check | None:
    """The combined check for ``optimizer``, or ``None`` when nothing is registered (the usual
    case: one dictionary lookup per step)."""
    fns = _CHECKS.get(optimizer)
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]
    return lambda param, mask: any(fn(param, mask) for fn in fns)
