"""Checkpoints: the file format of the ``"sparseopt"`` entry of a state dict, and the check that
a saved entry fits an optimizer before anything is loaded.

The entry is the mask engine's state dict (masks keyed by the parameter's packing index, as
torch keys optimizer state; counts and targets, step counters, generator state, the method's
options and state, the update statistics) plus ``"format"`` and the superposed copy's state,
all plain data: it loads with ``torch.load(path, weights_only=True)``. Format 1 is the format of
sparseopt 0.1.0, whose entries have no ``"structure"`` (read as ``None``). Loading is the
engine's (:meth:`~sparseopt.engine.MaskEngine.load_state_dict`), the superposed copy the
optimizer's: this module only packs, checks and unpacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import MaskEngine

__all__ = ["FORMAT", "check_fits", "load", "pack"]

FORMAT = 1

# the entries of the format that are not the engine's state dict
_OWN = ("format", "superposition")


def pack(engine: MaskEngine, sup_state: dict[str, Any] | None) -> dict[str, Any]:
    """The ``"sparseopt"`` entry of ``SparseOptimizer.state_dict()``: plain data.

    Args:
        engine (MaskEngine): the optimizer's mask engine.
        sup_state (dict | None): the superposed copy's state dict, or ``None`` before a ticket.
    """
    return {"format": FORMAT, **engine.state_dict(), "superposition": sup_state}


def check_fits(saved: Mapping[str, Any], engine: MaskEngine) -> None:
    """Raise ``ValueError`` listing every way ``saved`` differs from ``engine``'s settings."""
    mine = engine.describe()
    problems = []
    if saved.get("format") != FORMAT:
        problems.append(f"format {saved.get('format')!r} (expected {FORMAT})")
    if saved.get("method") != mine["method"]:
        problems.append(f"method {saved.get('method')!r} vs this optimizer's {mine['method']!r}")
    elif saved.get("method_options") != mine["method_options"]:
        problems.append(
            f"method options {saved.get('method_options')} vs this optimizer's "
            f"{mine['method_options']}"
        )
    if saved.get("num_params") != mine["num_params"]:
        problems.append(
            f"{saved.get('num_params')} parameters vs this optimizer's {mine['num_params']}"
        )
    if saved.get("structure") != mine["structure"]:  # 0.1.0 checkpoints have none
        problems.append(
            f"structure {saved.get('structure')!r} vs this optimizer's {mine['structure']!r}"
        )
    if saved.get("sparsity") != mine["sparsity"]:
        problems.append(f"sparsity {saved.get('sparsity')} vs this optimizer's {mine['sparsity']}")
    shapes = mine["shapes"]
    theirs = {int(k): list(v) for k, v in saved.get("shapes", {}).items()}
    if set(shapes) != set(theirs):
        problems.append(
            f"sparse parameter indices {sorted(theirs)} vs this optimizer's {sorted(shapes)}"
        )
    else:
        problems += [
            f"parameter {i} has shape {theirs[i]} vs this optimizer's {shapes[i]}"
            for i in sorted(shapes)
            if shapes[i] != theirs[i]
        ]
    if problems:
        raise ValueError("state dict does not fit this SparseOptimizer: " + "; ".join(problems))


def load(state_dict: Mapping[str, Any], engine: MaskEngine) -> dict[str, Any] | None:
    """Check ``state_dict`` against ``engine``, load it (inner optimizer state included) into the
    engine, and return the saved superposed copy's state, as plain data (``None`` if none).

    Nothing is loaded unless the whole entry fits: this checks the settings, the engine checks
    every mask against its parameter before it writes anything.

    Args:
        state_dict (Mapping): what ``SparseOptimizer.state_dict()`` returned.
        engine (MaskEngine): the optimizer's mask engine.

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
    inner = {k: v for k, v in state_dict.items() if k != "sparseopt"}
    engine.load_state_dict({k: v for k, v in saved.items() if k not in _OWN}, inner)
    return saved.get("superposition")
