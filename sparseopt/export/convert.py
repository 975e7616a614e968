"""``to_sparse_inference``: each layer of a model goes to the first converter that takes it, by
measured rules (``min_sparsity_rule``, ``fan_in_min_sparsity_rule``), and an ``InferenceReport``
says what each layer became and why.

The converters form one ordered list (``CONVERTERS``): 2:4 semi-structured, then condensed
constant fan-in (for layers whose mask holds a structure), then CSR/BSR (for the others). Each
has ``takes(layer)`` (whether it is a converter for this kind of layer at all),
``why_not(layer, request)`` (``None``, or why it declines, which the report shows) and
``build(layer, request)`` (the module, its layout and the report's reason). A new layout is one
more converter in the list.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import _validate, _warnings
from .._rules import Rule, lookup
from ..structure import NM, Structure, parse_structure
from . import modules
from ._common import LAYOUTS, conv1x1_unsupported, resolve_masks

__all__ = [
    "InferenceReport",
    "fan_in_min_sparsity_rule",
    "min_sparsity_rule",
    "to_sparse_inference",
]

# (most weights, ((from batch size, minimum sparsity), ...)), first match wins; None: any size
_CSR_RULE: Rule = (
    (1 << 16, ((1, 1.0),)),
    (1 << 18, ((64, 0.9), (1, 0.99))),
    (None, ((8, 0.9), (1, 0.95))),
)
_CONDENSED_RULE: Rule = (
    (1 << 16, ((1, 1.0),)),
    (1 << 18, ((64, 0.9), (1, 1.0))),
    (None, ((64, 0.8), (1, 0.9))),
)


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
    return lookup(numel, batch_size, _CSR_RULE)


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
        numel (int): as for [`min_sparsity_rule`][sparseopt.export.min_sparsity_rule].
        batch_size (int): as for ``min_sparsity_rule``.

    Returns:
        The minimum sparsity in ``[0, 1]`` at which the layer is condensed (1.0: never); errors
        as for ``min_sparsity_rule``.

    Examples:
        >>> fan_in_min_sparsity_rule(4096 * 4096, 1), fan_in_min_sparsity_rule(4096 * 4096, 64)
        (0.9, 0.8)
        >>> fan_in_min_sparsity_rule(512 * 512, 1), fan_in_min_sparsity_rule(512 * 512, 64)
        (1.0, 0.9)
        >>> fan_in_min_sparsity_rule(256 * 256, 64)
        1.0
    """
    return lookup(numel, batch_size, _CONDENSED_RULE)


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


# --- the converters ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    """What the caller asked for, checked."""

    min_sparsity: float | None
    layout: str
    batch_size: int
    blocksize: int | None


@dataclass(frozen=True)
class _Layer:
    """One ``nn.Linear`` or 1x1 ``nn.Conv2d`` of the copy, and what its mask holds."""

    module: nn.Module
    mask: Tensor | None  # the caller's mask, or None: the nonzeros
    active: Tensor  # the active positions in the GEMM view (out, fan_in)
    sparsity: float
    structure: str | None  # what the mask holds ("2:4", another "N:M", "fan_in"), or None

    @property
    def weight(self) -> Tensor:
        return self.module.weight.detach()


class _Declined(Exception):
    """A converter's ``build`` that failed after all: the walk goes on, with this reason."""


_BATCH_SIZES = tuple(2**i for i in range(21))


def _threshold(layer: _Layer, request: _Request, rule: Any) -> tuple[bool, str]:
    """Whether the layer is sparse enough for ``rule`` (or the caller's ``min_sparsity``), and
    the comparison for the report. A measured rule that never converts a layer of this size says
    so: "never at this size", or at this batch size, with the batch size from which it would."""
    s = layer.sparsity
    if request.min_sparsity is not None:
        t = request.min_sparsity
        if s >= t:
            return True, f"sparsity {s:.3f} reaches {t:.3f}"
        return False, f"sparsity {s:.3f} < {t:.3f} (min_sparsity): kept dense"
    numel = layer.weight.numel()
    t = rule(numel, request.batch_size)
    if s >= t - 0.005:  # half a percent of slack: a 95% mask may hold 94.97% zeros
        return True, f"sparsity {s:.3f} reaches {t:.3f}"
    if t < 1.0:
        return False, f"sparsity {s:.3f} < {t:.3f}: dense is faster"
    later = next((b for b in _BATCH_SIZES if b > request.batch_size and rule(numel, b) < 1), None)
    if later is None:
        return False, (
            f"sparsity {s:.3f}: never at this size ({numel} weights), dense is faster at any "
            "sparsity"
        )
    return False, (
        f"sparsity {s:.3f}: never at batch size {request.batch_size} for this size ({numel} "
        f"weights), dense is faster at any sparsity (from batch size {later}: "
        f"{rule(numel, later):.3f})"
    )


class _SemiStructured:
    """A 2:4 ``nn.Linear`` to ``SemiStructuredLinear`` (CUDA), whatever ``min_sparsity`` says."""

    def takes(self, layer: _Layer) -> bool:
        return layer.structure == "2:4"

    def why_not(self, layer: _Layer, request: _Request) -> str | None:
        if not isinstance(layer.module, nn.Linear):
            return "2:4 mask (the semi-structured 2:4 kernels run nn.Linear only)"
        why = modules.semi_structured_unsupported(layer.weight)
        return f"2:4 mask ({why})" if why else None

    def build(self, layer: _Layer, request: _Request) -> tuple[nn.Module, str, str]:
        try:
            module = modules.SemiStructuredLinear(layer.module)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            raise _Declined(f"2:4 mask (to_sparse_semi_structured failed: {e})") from e
        return module, "2:4", "2:4 semi-structured (sparse tensor cores)"


class _Condensed:
    """A layer whose mask holds a structure with one count per row (constant fan-in, any N:M)
    to ``CondensedLinear`` / ``CondensedConv1x1``, by ``fan_in_min_sparsity_rule``."""

    def takes(self, layer: _Layer) -> bool:
        return layer.structure is not None

    def why_not(self, layer: _Layer, request: _Request) -> str | None:
        counts = layer.active.sum(1)
        fewest, most = int(counts.min()), int(counts.max())
        if fewest != most:
            return (
                f"rows hold {fewest} to {most} active: the condensed layer needs the same "
                "count in every row"
            )
        if not layer.weight.is_floating_point():
            return f"{layer.weight.dtype}: the condensed layer takes float weights"
        enough, text = _threshold(layer, request, fan_in_min_sparsity_rule)
        return None if enough else f"constant fan-in {most}: {text}"

    def build(self, layer: _Layer, request: _Request) -> tuple[nn.Module, str, str]:
        cls = (
            modules.CondensedLinear
            if isinstance(layer.module, nn.Linear)
            else modules.CondensedConv1x1
        )
        module = cls(layer.module, layer.mask)
        text = _threshold(layer, request, fan_in_min_sparsity_rule)[1]
        return module, "condensed", f"constant fan-in {module.k}: {text}"


class _Compressed:
    """An unstructured float32/float64 layer to ``SparseLinear`` / ``SparseConv1x1`` (CSR or
    BSR), by ``min_sparsity_rule``."""

    def takes(self, layer: _Layer) -> bool:
        return layer.structure is None

    @staticmethod
    def _block(layer: _Layer, request: _Request) -> int:
        """The BSR block: the caller's, or the largest of 16, 8, 4, 2 that divides the GEMM
        view; 0 when none does."""
        rows, cols = layer.active.shape
        candidates = (request.blocksize,) if request.blocksize else (16, 8, 4, 2)
        return next((b for b in candidates if rows % b == 0 and cols % b == 0), 0)

    def why_not(self, layer: _Layer, request: _Request) -> str | None:
        if layer.weight.dtype not in (torch.float32, torch.float64):
            return f"{layer.weight.dtype}: torch's CPU sparse kernels take float32/float64"
        enough, text = _threshold(layer, request, min_sparsity_rule)
        if not enough:
            return text
        if request.layout == "bsr" and not self._block(layer, request):
            return f"no square block divides {tuple(layer.active.shape)}"
        return None

    def build(self, layer: _Layer, request: _Request) -> tuple[nn.Module, str, str]:
        cls = modules.SparseLinear if isinstance(layer.module, nn.Linear) else modules.SparseConv1x1
        if request.layout == "bsr":
            module = cls(layer.module, "bsr", self._block(layer, request))
        else:
            module = cls(layer.module)
        return module, request.layout, _threshold(layer, request, min_sparsity_rule)[1]


CONVERTERS = (_SemiStructured(), _Condensed(), _Compressed())
"""The converters, in the order ``to_sparse_inference`` tries them."""

_TWO_FOUR = NM(2, 4)


def _found(active: Tensor, wanted: Structure | str) -> tuple[str | None, str]:
    """``(label, why)``: the structure a 2-D mask holds (``"2:4"``, another ``"N:M"``,
    ``"fan_in"``) or ``None``, and why not."""
    shape = tuple(active.shape)
    counts = active.sum(1)
    fewest, most = (int(counts.min()), int(counts.max())) if counts.numel() else (0, 0)
    if wanted == "auto":
        if _TWO_FOUR.fits(shape) and _TWO_FOUR.violations(active) == 0:
            return "2:4", ""
        if fewest == most and 0 < most < shape[1]:
            return "fan_in", ""
        return None, f"no structure found (rows hold {fewest} to {most} active)"
    assert isinstance(wanted, Structure)
    why = wanted.why_not(shape)
    if why is not None:
        return None, f"{why}: not {wanted}"
    bad = wanted.violations(active)
    if bad:
        units = wanted.units(shape)[0]
        rows = f" (rows hold {fewest} to {most} active)" if fewest != most else ""
        return None, f"not {wanted}: {bad} of {units} {wanted.unit_noun}s hold another count{rows}"
    return str(wanted), ""


def _walk(layer: _Layer, request: _Request, notes: list[str]) -> tuple[nn.Module | None, str, str]:
    """The first converter that takes and accepts the layer: ``(module, layout, reason)``; or
    ``(None, "", reason)`` with every converter's reason for declining."""
    for converter in CONVERTERS:
        if not converter.takes(layer):
            continue
        why = converter.why_not(layer, request)
        if why is None:
            try:
                module, layout, reason = converter.build(layer, request)
            except _Declined as e:
                why = str(e)
            else:
                return module, layout, "; ".join([*notes, reason])
        notes.append(why)
    return None, "", "; ".join(notes)


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    if min_sparsity is not None:
        min_sparsity = _validate.real("min_sparsity", min_sparsity, 0, 1)
    _validate.choice("layout", layout, LAYOUTS)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    if blocksize is not None:
        blocksize = _validate.integer("blocksize", blocksize, 1)
    request = _Request(min_sparsity, layout, batch_size, blocksize)
    wanted: Structure | str | None
    if structure == "auto":
        wanted = "auto"
    else:
        try:
            wanted = parse_structure(structure)
        except (TypeError, ValueError) as e:
            kind = type(e)
            raise kind(str(e).replace("to be None,", "to be None, 'auto',", 1)) from None
    chosen = resolve_masks(masks, model.state_dict(keep_vars=True))
    out = copy.deepcopy(model)
    report = InferenceReport()
    replace: list[tuple[str, nn.Module]] = []
    for name, module in out.named_modules():
        if module is out and not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        row = _row(name, module, chosen)
        if row is None:
            continue
        report.append(row)
        if row["reason"]:  # a layer no converter is for
            continue
        mask = chosen.get(f"{name}.weight" if name else "weight")
        w = module.weight.detach()
        active = ((w != 0) if mask is None else mask.to(w.device)).reshape(w.shape[0], -1)
        notes = []
        label = None
        if wanted is not None:
            label, why = _found(active, wanted)
            row["structure"] = label
            notes += [why] if why else []
        layer = _Layer(module, mask, active, row["sparsity"], label)
        new, row["converted"], row["reason"] = _walk(layer, request, notes)
        if new is not None:
            replace.append((name, new))
        else:
            row["converted"] = None
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
        _warnings.warn(
            "to_sparse_inference converted no layer (no Linear or 1x1 Conv2d was sparse enough); "
            "nothing was gained: see the copy's sparse_inference_report"
        )
    return out


def _row(name: str, module: nn.Module, chosen: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """The report's row for a module with a weight matrix (``None`` for the others); its
    ``reason`` is already set when no converter is for it."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim < 2:
        return None
    supported = isinstance(module, (nn.Linear, nn.Conv2d))
    mask = chosen.get(f"{name}.weight" if name else "weight") if supported else None
    nnz = int(torch.count_nonzero(weight.detach() if mask is None else mask))
    row = {
        "name": name,
        "type": type(module).__name__,
        "shape": tuple(weight.shape),
        "sparsity": 1 - nnz / weight.numel(),
        "converted": None,
        "structure": None,
        "reason": "",
    }
    if not supported:
        row["reason"] = "layer type not supported (stays dense)"
    elif isinstance(module, nn.Conv2d) and conv1x1_unsupported(module):
        row["reason"] = f"{conv1x1_unsupported(module)}: only 1x1 convolutions run sparse"
    return row
