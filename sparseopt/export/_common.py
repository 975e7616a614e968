"""What the export modules share: masks by parameter or name, dtype names, and the condition under
which a convolution runs as a GEMM over its pixels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "conv1x1_unsupported", "dtype_name", "resolve_masks"]

LAYOUTS = ("csr", "bsr")
"""The unstructured sparse layouts of ``SparseLinear`` and ``to_sparse_inference``."""


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def conv1x1_unsupported(conv: nn.Conv2d) -> str:
    """Why ``conv`` is not a 1x1, stride-1, unpadded, single-group convolution, or ``""``."""
    if conv.kernel_size != (1, 1):
        return f"kernel {conv.kernel_size}"
    if conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return f"stride {conv.stride}, groups {conv.groups}, padding mode {conv.padding_mode}"
    if conv.padding not in ((0, 0), "valid"):
        return f"padding {conv.padding}"
    return ""


def resolve_masks(
    masks: Mapping[Any, Tensor] | None, names: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``{state_dict name: bool mask}`` from a mapping keyed by parameter tensors or by names.

    ``names`` is ``model.state_dict(keep_vars=True)``. Raises ``TypeError`` / ``ValueError`` for
    a mask of the wrong type, a key of no tensor of the model, a mask of the wrong shape, or
    nonzero weights outside a mask.
    """
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"Expected masks to be a mapping (parameter or name -> bool mask) or None, but got "
            f"{type(masks).__name__}"
        )
    by_id: dict[int, list[str]] = {}
    for name, t in names.items():
        by_id.setdefault(id(t), []).append(name)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, mask in masks.items():
        if isinstance(key, str):
            targets = [key] if key in names else []
        elif isinstance(key, Tensor):
            targets = by_id.get(id(key), [])
        else:
            raise TypeError(
                f"Expected the keys of masks to be parameters or names, but got "
                f"{type(key).__name__}"
            )
        if not targets:
            unknown.append(key if isinstance(key, str) else f"a tensor of shape {tuple(key.shape)}")
        for name in targets:
            out[name] = mask
    if unknown:
        raise ValueError(
            f"Expected masks to hold tensors of the model, but got {len(unknown)} others: "
            + ", ".join(map(str, unknown[:5]))
        )
    for name, mask in out.items():
        t = names[name]
        wrong_type = not isinstance(mask, Tensor) or mask.dtype != torch.bool
        if wrong_type or mask.shape != t.shape:
            got = (
                f"{mask.dtype} {tuple(mask.shape)}"
                if isinstance(mask, Tensor)
                else type(mask).__name__
            )
            raise (TypeError if wrong_type else ValueError)(
                f"Expected the mask of {name!r} to be a bool tensor of shape {tuple(t.shape)}, "
                f"but got {got}"
            )
        outside = int(torch.count_nonzero(t.detach()[~mask.to(t.device)]))
        if outside:
            raise ValueError(
                f"Expected the weights of {name!r} outside its mask to be 0, but got {outside} "
                "nonzeros (call opt.apply_masks() first, or pass no masks)"
            )
    return out
