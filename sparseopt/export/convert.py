"""``to_sparse_inference``: which layer of a model becomes which sparse module, by measured rules
(``min_sparsity_rule``, ``fan_in_min_sparsity_rule``), and the ``InferenceReport`` that says why.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _validate
from ..structure import Structure, fits, parse_structure, structure_violations
from .compact import _resolve_masks
from .modules import (
    CondensedConv1x1,
    CondensedLinear,
    SemiStructuredLinear,
    SparseConv1x1,
    SparseLinear,
    _check_layout,
    _constant_fan_in,
    _conv_unsupported,
    semi_structured_unsupported,
)

__all__ = [
    "InferenceReport",
    "fan_in_min_sparsity_rule",
    "min_sparsity_rule",
    "to_sparse_inference",
]


def min_sparsity_rule(numel: int, batch_size: int) -> float:
    """The sparsity above which a CSR layer beat dense on CPU in our measurement.

    Measured with ``benchmarks/inference.py`` (torch 2.13, MKL sparse kernels, one thread; the
    table is in ``docs/benchmarks.md``): per-call overhead makes small layers need more sparsity
    than large ones, and a few input rows need more than a batch. A layer of at most 2**16
    weights (256x256) never won; one of at most 2**18 (512x512) won only at batch 64, from 90%;
    larger ones won at batch 1 from 95% and at batch 8 and 64 from 90%.

    Args:
        numel (int): the layer's weight count.
        batch_size (int): rows of the GEMM (the batch; for a 1x1 convolution at least the batch).

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer is converted (1.0: only an all-zero
        layer).

    Raises:
        TypeError: if ``numel`` or ``batch_size`` is not an int.
        ValueError: if ``numel`` is negative or ``batch_size`` is not positive.

    Examples:
        >>> min_sparsity_rule(2048 * 512, 1), min_sparsity_rule(2048 * 512, 8)
        (0.95, 0.9)
        >>> min_sparsity_rule(512 * 512, 8), min_sparsity_rule(512 * 512, 64)
        (0.99, 0.9)
    """
    numel = _validate.integer("numel", numel, 0)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    if numel <= 1 << 16:
        return 1.0
    if numel <= 1 << 18:
        return 0.9 if batch_size >= 64 else 0.99
    return 0.9 if batch_size >= 8 else 0.95


class InferenceReport(list):
    """What [`to_sparse_inference`][sparseopt.export.to_sparse_inference] did, one row per layer.

    A ``list`` of dicts with ``name``, ``type``, ``shape``, ``sparsity``, ``converted`` (the
    layout: ``"csr"``, ``"bsr"``, ``"condensed"`` or ``"2:4"``; ``None`` when the layer stayed
    dense), ``structure`` (``"2:4"``, another ``"N:M"``, ``"fan_in"``, or ``None``: unstructured
    or not looked for) and ``reason``. It prints as a table.

    Args:
        iterable (Iterable[dict]): the rows. Default: none.

    Examples:
        >>> row = {"name": "fc", "type": "Linear", "shape": (4, 8), "sparsity": 0.95,
        ...        "converted": "csr", "reason": "sparsity 0.950 reaches 0.900"}
        >>> report = InferenceReport([row])
        >>> report.converted
        ['fc']
    """

    def __init__(self, iterable: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(iterable)

    @property
    def converted(self) -> list[str]:
        """Names of the layers now computing sparse.

        Returns:
            The names, in module order.

        Examples:
            >>> InferenceReport([]).converted
            []
        """
        return [r["name"] for r in self if r["converted"]]

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'type':<10} {'sparsity':>8}  {'as':<9} reason"]
        for r in self:
            sp = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
            lines.append(
                f"{r['name']:<32} {r['type']:<10} {sp:>8}  {r['converted'] or 'dense':<9} "
                f"{r['reason']}"
            )
        return "\n".join(lines)


def _block_for(shape: tuple[int, ...]) -> int | None:
    for b in (16, 8, 4, 2):
        if shape[0] % b == 0 and shape[1] % b == 0:
            return b
    return None


def fan_in_min_sparsity_rule(numel: int, batch_size: int) -> float:
    """The sparsity above which a constant fan-in layer, condensed, beat dense on CPU.

    Measured with ``benchmarks/structured_inference.py`` (torch 2.13, one thread; the table is in
    ``docs/benchmarks.md``): [`CondensedLinear`][sparseopt.export.CondensedLinear] against
    ``F.linear`` on 256x256, 512x512, 1024x1024 and 4096x4096 layers at 80, 90 and 95% sparsity,
    batch 1, 8 and 64, in three runs. A layer of at most 2**16 weights (256x256) lost or tied
    (it won by a few percent only at batch 64). One of at most 2**18 (512x512) won at batch 64
    from 90% (1.9-2.4x) and was a toss-up below (0.84-1.35x). Larger ones won at 90% and 95% at
    every batch (1.4-10x), and at 80% at batch 64 (1.35-2.0x, one run 0.82x); at 80% below
    batch 64 the result flipped from run to run. Below 80% was not measured: left dense.

    Args:
        numel (int): the layer's weight count.
        batch_size (int): rows of the GEMM (the batch; for a 1x1 convolution at least the batch).

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer is condensed (1.0: never).

    Raises:
        TypeError: if ``numel`` or ``batch_size`` is not an int.
        ValueError: if ``numel`` is negative or ``batch_size`` is not positive.

    Examples:
        >>> fan_in_min_sparsity_rule(4096 * 4096, 1), fan_in_min_sparsity_rule(4096 * 4096, 64)
        (0.9, 0.8)
        >>> fan_in_min_sparsity_rule(512 * 512, 1), fan_in_min_sparsity_rule(512 * 512, 64)
        (1.0, 0.9)
        >>> fan_in_min_sparsity_rule(256 * 256, 64)
        1.0
    """
    numel = _validate.integer("numel", numel, 0)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    if numel <= 1 << 16:
        return 1.0
    if numel <= 1 << 18:
        return 0.9 if batch_size >= 64 else 1.0
    return 0.8 if batch_size >= 64 else 0.9


def _layer_structure(active: Tensor, wanted: Structure | str) -> tuple[str | None, int, str]:
    """``(label, k, why)`` for a 2-D mask: ``label`` is ``"2:4"``, another ``"N:M"`` or
    ``"fan_in"`` when the mask holds it (``k``: active per row), else ``None`` and ``why``."""
    rows, fan_in = active.shape
    k, fewest, most = _constant_fan_in(active)
    constant = fewest == most and 0 < k < fan_in
    if wanted == "auto":
        two_four = constant and fits(active.shape, "2:4") and k * 2 == fan_in
        if two_four and structure_violations(active, "2:4") == 0:
            return "2:4", k, ""
        if constant:
            return "fan_in", k, ""
        return None, k, f"no structure found (rows hold {fewest} to {most} active)"
    assert isinstance(wanted, Structure)
    if wanted.kind == "nm":
        if not fits(active.shape, wanted):
            return None, k, f"fan-in {fan_in} is not a multiple of {wanted.m}: not {wanted}"
        bad = structure_violations(active, wanted)
        if bad:
            groups = rows * (fan_in // wanted.m)
            return None, k, f"not {wanted}: {bad} of {groups} groups hold another count"
        return str(wanted), k, ""
    if not constant:
        return None, k, f"not constant fan-in (rows hold {fewest} to {most} active)"
    return "fan_in", k, ""


def to_sparse_inference(
    model: nn.Module,
    *,
    min_sparsity: float | None = None,
    layout: str = "csr",
    batch_size: int = 1,
    blocksize: int | None = None,
    structure: str | None = None,
    masks: Mapping[Any, Tensor] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose sparse enough layers compute with sparse kernels (inference).

    Unstructured (``structure=None``, the default): each ``nn.Linear`` and each 1x1
    ``nn.Conv2d`` (stride 1, no padding, one group) whose weight is float32 or float64 and at
    least ``min_sparsity`` sparse becomes a [`SparseLinear`][sparseopt.export.SparseLinear] or
    [`SparseConv1x1`][sparseopt.export.SparseConv1x1] (CSR or BSR). Other layers stay dense:
    larger convolutions (im2col plus a sparse GEMM lost to oneDNN's dense convolution in our
    measurement), half-precision weights (torch's CPU CSR kernels take float32/float64 only) and
    every other module type.

    Structured (``structure="auto"``, ``"fan_in"`` or ``"N:M"``, as trained with
    ``SparseOptimizer(structure=...)``): a layer whose mask holds the structure is converted by
    it, the others as above (with the reason in the report):

    - 2:4 ``nn.Linear`` on a CUDA device of compute capability >= 8.0, float16/bfloat16:
      [`SemiStructuredLinear`][sparseopt.export.SemiStructuredLinear]
      (``torch.sparse.to_sparse_semi_structured``), whatever ``min_sparsity`` says. Elsewhere
      (CPU, older GPUs, float32, shapes off the kernel's tile) the report says why, and the
      layer is treated as constant fan-in (a 2:4 mask has ``in_features / 2`` per row).
    - Constant fan-in (and any other ``N:M``, whose rows all hold ``fan_in * N / M``):
      [`CondensedLinear`][sparseopt.export.CondensedLinear] or
      [`CondensedConv1x1`][sparseopt.export.CondensedConv1x1] (any float dtype) when at least
      ``min_sparsity`` sparse, by default the measured
      [`fan_in_min_sparsity_rule`][sparseopt.export.fan_in_min_sparsity_rule]; else dense.

    ``"auto"`` detects per layer: 2:4 when every group of 4 inputs holds exactly 2 active, else
    constant fan-in when every row holds the same count ``k`` with ``0 < k < fan_in``. Without
    ``masks`` the active positions are the nonzeros, so a trained active weight that is exactly 0
    breaks the count of its row: pass ``masks=opt.masks`` to use the optimizer's masks.

    The outputs equal the dense model's within rounding (the sums run in another order); 2:4
    runs in the weight's half precision. ``model`` itself is not changed.

    The report is attached as ``sparse_inference_report`` (an
    [`InferenceReport`][sparseopt.export.InferenceReport]); a warning says when no layer was
    converted. The CSR copy works with ``torch.jit.script`` (see ``docs/deploying.md``). Put it
    in ``eval()`` mode and call it under ``torch.inference_mode()``.

    Args:
        model (nn.Module): the trained model (masked weights exactly 0).
        min_sparsity (float | None): convert layers at least this sparse. Default: ``None``, the
            measured rules [`min_sparsity_rule`][sparseopt.export.min_sparsity_rule] (CSR) and
            [`fan_in_min_sparsity_rule`][sparseopt.export.fan_in_min_sparsity_rule] (condensed)
            for each layer's size and ``batch_size`` (with 0.005 of slack, for masks drawn at
            random).
        layout (str): the unstructured layout, ``"csr"``, or ``"bsr"`` (square blocks; only
            layers whose shape the block divides). Default: ``"csr"``.
        batch_size (int): the batch the model will serve, for the default rules. Default: 1.
        blocksize (int | None): the block of ``"bsr"``. Default: ``None``, the largest of 16, 8,
            4, 2 that divides the layer's weight.
        structure (str | None): ``None`` (unstructured only, the behaviour of earlier
            versions), ``"auto"`` (detect per layer), ``"fan_in"`` or ``"N:M"`` (use that
            structure where a layer's mask holds it). Default: ``None``.
        masks (Mapping | None): the active positions, a mapping from the model's parameters
            (``SparseOptimizer.masks``) or ``state_dict`` names to bool masks. Default:
            ``None``, the nonzeros of each weight.

    Returns:
        The converted copy, in the mode (train or eval) of ``model``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or an argument has the wrong type.
        ValueError: if ``min_sparsity`` is outside ``[0, 1]``, ``layout`` or ``structure`` is
            unknown, ``batch_size`` or ``blocksize`` is not positive, or a mask does not fit its
            weight (see [`save_sparse`][sparseopt.export.save_sparse]).

    Examples:
        >>> import torch
        >>> from sparseopt import to_sparse_inference
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 10))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(torch.rand(64, 64) < 0.02)
        >>> fast = to_sparse_inference(model, min_sparsity=0.9)
        >>> fast.sparse_inference_report.converted
        ['0']
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(fast(x), model(x), atol=1e-5)
        True

        A constant fan-in layer (4 active inputs per output) is condensed:

        >>> from sparseopt.structure import random_structured
        >>> mask = random_structured((64, 64), "fan_in", torch.Generator().manual_seed(0), k=4)
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.randn(64, 64) * mask)
        >>> fast = to_sparse_inference(model, min_sparsity=0.9, structure="auto")
        >>> type(fast[0]).__name__, fast.sparse_inference_report[0]["structure"]
        ('CondensedLinear', 'fan_in')
        >>> torch.allclose(fast(x), model(x), atol=1e-5)
        True
    """
    import copy

    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if min_sparsity is not None:
        if not _validate.is_real(min_sparsity):
            raise TypeError(
                "Expected min_sparsity to be a float or None, but got "
                f"{_validate.type_of(min_sparsity)}"
            )
        if not 0.0 <= min_sparsity <= 1.0:
            raise ValueError(f"Expected min_sparsity to be in [0, 1], but got {min_sparsity}")
        min_sparsity = float(min_sparsity)
    _check_layout(layout)
    for arg, value in (("batch_size", batch_size), ("blocksize", blocksize)):
        if value is None and arg == "blocksize":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            # the type first: tests/test_export.py matches "to be an int, but got float"
            raise TypeError(
                f"Expected {arg} to be an int, but got {type(value).__name__} {value!r}"
            )
        if value < 1:
            raise ValueError(f"Expected {arg} to be positive, but got {value}")
    batch_size = int(batch_size)
    blocksize = None if blocksize is None else int(blocksize)
    wanted: Structure | str | None
    if structure == "auto":
        wanted = "auto"
    else:
        try:
            wanted = parse_structure(structure)
        except (TypeError, ValueError) as e:
            kind = type(e)
            raise kind(str(e).replace("to be None,", "to be None, 'auto',", 1)) from None
    chosen = _resolve_masks(model, masks, model.state_dict(keep_vars=True))
    out = copy.deepcopy(model)
    report = InferenceReport()
    replace: list[tuple[str, nn.Module]] = []
    for name, module in out.named_modules():
        if module is out and not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(weight, Tensor) and weight.ndim >= 2:
                report.append(
                    {
                        "name": name,
                        "type": kind,
                        "shape": tuple(weight.shape),
                        "sparsity": 1 - int(torch.count_nonzero(weight)) / weight.numel(),
                        "converted": None,
                        "structure": None,
                        "reason": "layer type not supported (stays dense)",
                    }
                )
            continue
        w = module.weight.detach()
        mask = chosen.get(f"{name}.weight" if name else "weight")
        active = (w != 0) if mask is None else mask.to(w.device)
        sparsity = 1 - int(torch.count_nonzero(active)) / w.numel()
        row = {
            "name": name,
            "type": kind,
            "shape": tuple(w.shape),
            "sparsity": sparsity,
            "converted": None,
            "structure": None,
            "reason": "",
        }
        report.append(row)
        if isinstance(module, nn.Conv2d) and _conv_unsupported(module):
            row["reason"] = f"{_conv_unsupported(module)}: only 1x1 convolutions run sparse"
            continue
        note = ""
        if wanted is not None:
            label, k, why = _layer_structure(active.reshape(w.shape[0], -1), wanted)
            row["structure"] = label
            if label is None:
                note = why + "; "
            else:
                new, reason = _convert_structured(
                    module, mask, label, k, sparsity, min_sparsity, batch_size
                )
                row["reason"] = reason
                if new is not None:
                    replace.append((name, new))
                    row["converted"] = (
                        "2:4" if isinstance(new, SemiStructuredLinear) else ("condensed")
                    )
                continue
        if w.dtype not in (torch.float32, torch.float64):
            row["reason"] = note + f"{w.dtype}: torch's CPU sparse kernels take float32/float64"
            continue
        if min_sparsity is None:  # half a percent of slack: a 95% mask may hold 94.97% zeros
            threshold = min_sparsity_rule(w.numel(), batch_size)
            converts = sparsity >= threshold - 0.005
        else:
            threshold = min_sparsity
            converts = sparsity >= threshold
        if not converts:
            row["reason"] = note + f"sparsity {sparsity:.3f} < {threshold:.3f}: dense is faster"
            continue
        shape2d = (w.shape[0], w.numel() // w.shape[0])
        block = 1
        if layout == "bsr":
            block = blocksize or _block_for(shape2d) or 0
            if not block or shape2d[0] % block or shape2d[1] % block:
                row["reason"] = note + f"no square block divides {shape2d}"
                continue
        cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv1x1
        replace.append((name, cls(module, layout, block) if layout == "bsr" else cls(module)))
        row["converted"] = layout
        row["reason"] = note + f"sparsity {sparsity:.3f} reaches {threshold:.3f}"
    for name, new in replace:
        new.train(out.training)
        if name == "":
            out = new
            continue
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, new)
    out.sparse_inference_report = report
    if not replace:
        warnings.warn(
            "to_sparse_inference converted no layer (no Linear or 1x1 Conv2d was sparse enough); "
            "nothing was gained: see the copy's sparse_inference_report",
            UserWarning,
            stacklevel=2,
        )
    return out


def _convert_structured(
    module: nn.Module,
    mask: Tensor | None,
    label: str,
    k: int,
    sparsity: float,
    min_sparsity: float | None,
    batch_size: int,
) -> tuple[nn.Module | None, str]:
    """The structured module for one layer whose mask holds ``label`` (or ``None``), and why."""
    w = module.weight.detach()
    note = ""
    if label == "2:4":
        why = (
            semi_structured_unsupported(w)
            if isinstance(module, nn.Linear)
            else "semi-structured 2:4 runs nn.Linear only"
        )
        if not why:
            try:
                return SemiStructuredLinear(module), "2:4 semi-structured (sparse tensor cores)"
            except (RuntimeError, NotImplementedError, ValueError) as e:
                why = f"to_sparse_semi_structured failed: {e}"
        note = f"2:4 mask, but {why}; "
    if not w.is_floating_point():
        return None, note + f"{w.dtype}: the condensed layer takes float weights"
    if min_sparsity is None:
        threshold = fan_in_min_sparsity_rule(w.numel(), batch_size)
        converts = sparsity >= threshold - 0.005
    else:
        threshold = min_sparsity
        converts = sparsity >= threshold
    what = f"constant fan-in {k}"
    if not converts:
        return None, note + f"{what}: sparsity {sparsity:.3f} < {threshold:.3f}: dense is faster"
    if isinstance(module, nn.Linear):
        new: nn.Module = CondensedLinear(module, mask)
    else:
        new = CondensedConv1x1(module, mask)
    return new, note + f"{what}: sparsity {sparsity:.3f} reaches {threshold:.3f}"
