"""Checkpoints: the ``"sparseopt"`` entry of a state dict, packed as plain data, checked whole
before anything is loaded, and restored.

The entry holds the masks (bool tensors keyed by the parameter's packing index, as torch keys
optimizer state), counts and targets, the step counters, the generator state, the method's
options and state, the update statistics and the superposed copy. It loads with
``torch.load(path, weights_only=True)``. Format 1 is the format of sparseopt 0.1.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _dtensor
from .engine import MaskEngine
from .report import UpdateStats
from .superposition import Superposition, bn_buffers

__all__ = ["FORMAT", "check_fits", "load", "pack"]

FORMAT = 1


def pack(engine: MaskEngine, sup: Superposition | None) -> dict[str, Any]:
    """The ``"sparseopt"`` entry of ``SparseOptimizer.state_dict()``: plain data, masks cloned."""
    layers = engine.layers
    return {
        "format": FORMAT,
        "method": engine.method.name,
        "method_options": engine.method.options(),
        "method_state": engine.method.state_dict(),
        "sparsity": engine.sparsity,
        "structure": None if engine.structure is None else str(engine.structure),
        "step": engine.step,
        "masks_applied": engine.masks_applied,
        "periodic_updates": engine.periodic_updates,
        "pending_exploration": engine.pending_exploration,
        "generator": engine.generator.get_state(),
        "num_params": engine.num_params,
        "names": {layer.index: layer.name for layer in layers},
        "shapes": {layer.index: list(layer.param.shape) for layer in layers},
        "counts": {layer.index: layer.count for layer in layers},
        "targets": {layer.index: layer.target for layer in layers},
        "masks": {layer.index: layer.mask.clone() for layer in layers},
        "stats": engine.stats.as_dict(),
        "superposition": None if sup is None else sup.state_dict(),
    }


def check_fits(saved: Mapping[str, Any], engine: MaskEngine) -> None:
    """Raise ``ValueError`` listing every way ``saved`` differs from ``engine``'s settings."""
    method = engine.method
    problems = []
    if saved.get("format") != FORMAT:
        problems.append(f"format {saved.get('format')!r} (expected {FORMAT})")
    if saved.get("method") != method.name:
        problems.append(f"method {saved.get('method')!r} vs this optimizer's {method.name!r}")
    elif saved.get("method_options") != method.options():
        problems.append(
            f"method options {saved.get('method_options')} vs this optimizer's {method.options()}"
        )
    if saved.get("num_params") != engine.num_params:
        problems.append(
            f"{saved.get('num_params')} parameters vs this optimizer's {engine.num_params}"
        )
    mine_structure = None if engine.structure is None else str(engine.structure)
    if saved.get("structure") != mine_structure:  # 0.1.0 checkpoints have none
        problems.append(
            f"structure {saved.get('structure')!r} vs this optimizer's {mine_structure!r}"
        )
    if saved.get("sparsity") != engine.sparsity:
        problems.append(f"sparsity {saved.get('sparsity')} vs this optimizer's {engine.sparsity}")
    mine = {layer.index: list(layer.param.shape) for layer in engine.layers}
    theirs = {int(k): list(v) for k, v in saved.get("shapes", {}).items()}
    if set(mine) != set(theirs):
        problems.append(
            f"sparse parameter indices {sorted(theirs)} vs this optimizer's {sorted(mine)}"
        )
    else:
        problems += [
            f"parameter {i} has shape {theirs[i]} vs this optimizer's {mine[i]}"
            for i in sorted(mine)
            if mine[i] != theirs[i]
        ]
    if problems:
        raise ValueError("state dict does not fit this SparseOptimizer: " + "; ".join(problems))


def load(
    state_dict: Mapping[str, Any], engine: MaskEngine, params: Sequence[Tensor]
) -> Superposition | None:
    """Load ``state_dict`` (inner optimizer state included) into ``engine``; return the saved
    superposed copy, rebuilt on the devices (and shards) of ``params``.

    Everything that can be checked is checked before anything is written: the settings, and
    that every mask fits its parameter.

    Raises:
        TypeError: if ``state_dict`` is not a mapping.
        ValueError: if there is no ``"sparseopt"`` entry, or it does not fit.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "Expected state_dict to be a dict made by SparseOptimizer.state_dict(), but got "
            f"{type(state_dict).__name__}"
        )
    if "sparseopt" not in state_dict:
        raise ValueError(
            "state dict has no 'sparseopt' entry: it was not made by "
            "SparseOptimizer.state_dict(); load a plain optimizer's state with "
            "opt.optimizer.load_state_dict(...)"
        )
    saved = state_dict["sparseopt"]
    check_fits(saved, engine)
    by_index = {layer.index: layer for layer in engine.layers}
    masks = {  # first, so that a mask that does not fit raises before anything is loaded
        key: _dtensor.load_like(mask, by_index[int(key)].param, torch.bool)
        for key, mask in saved["masks"].items()
    }
    engine.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "sparseopt"})
    for key, mask in masks.items():
        layer = by_index[int(key)]
        layer.mask = mask
        layer.count = int(saved["counts"][key])
        layer.target = int(saved["targets"][key])
    engine.method.load_state_dict(saved["method_state"])
    # the generator is a CPU one; a state dict moved to another device (Accelerate's device
    # placement moves every tensor) brings its state back
    engine.generator.set_state(saved["generator"].cpu())
    engine.step = int(saved["step"])
    engine.periodic_updates = bool(saved["periodic_updates"])
    engine.pending_exploration = saved["pending_exploration"]
    engine.stats = UpdateStats.from_dict(saved["stats"])
    engine.masks_applied = bool(saved["masks_applied"])
    sup = saved.get("superposition")
    if sup is not None:
        sparse = [layer.index for layer in engine.layers]
        buffers = bn_buffers(engine.model)
        sup = Superposition.from_state_dict(sup, params, sparse, buffers, engine.structure)
    if engine.masks_applied:
        engine.mask_weights_and_state()
        _dtensor.reshard(engine.model)
    return sup
