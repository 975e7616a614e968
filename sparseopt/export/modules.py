"""Sparse inference layers: CSR/BSR ``SparseLinear`` and ``SparseConv1x1``, the condensed
constant fan-in ``CondensedLinear`` and ``CondensedConv1x1``, and 2:4 ``SemiStructuredLinear``.

Each is built from a trained dense layer (and optionally its mask) and computes the same output
within float tolerance; ``sparseopt.export.convert`` decides which layer becomes which. The two
1x1-convolution layers are their GEMM layer run over the pixels by one adapter.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _compat, _validate
from ._common import LAYOUTS, conv1x1_unsupported, dtype_name

__all__ = [
    "CondensedConv1x1",
    "CondensedLinear",
    "SemiStructuredLinear",
    "SparseConv1x1",
    "SparseLinear",
    "semi_structured_unsupported",
]


class _OverPixels:
    """The one 1x1-convolution adapter: a GEMM layer (``SparseLinear``, ``CondensedLinear``) run
    over the pixels of ``(N, C, H, W)`` inputs. The GEMM layer provides ``_columns(cols)``, its
    weight times a ``(in_features, n)`` matrix, without the bias."""

    @staticmethod
    def _linear_of(conv: nn.Conv2d, mask: Tensor | None = None) -> tuple[nn.Linear, Tensor | None]:
        """The ``nn.Linear`` a 1x1, stride-1, unpadded, ungrouped conv computes per pixel (its
        bias and a ``(out, in)`` view of its weight), and the mask in that view."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"Expected conv to be an nn.Conv2d, but got {type(conv).__name__}")
        reason = conv1x1_unsupported(conv)
        if reason:
            raise ValueError(
                f"Expected a 1x1, stride-1, unpadded, ungrouped conv, but got {reason}"
            )
        if mask is not None:
            _check_mask(mask, conv.weight.shape)
            mask = mask.reshape(conv.out_channels, -1)
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
        linear.bias = conv.bias
        return linear, mask

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of ``x``, ``(N, C_in, H, W) -> (N, C_out, H, W)``, contiguous."""
        n, c, h, w = x.shape
        out = self._columns(x.transpose(0, 1).reshape(c, n * h * w))  # the transposed GEMM
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.reshape(self.out_features, n, h, w).transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return "kernel_size=(1, 1), " + super().extra_repr()


class _SparseGemm(nn.Module):
    """What the sparse ``nn.Linear`` layers share: ``forward`` over the last dimension of the
    input, by ``_matvec(row)`` for one input row where ``_by_matvec()`` says so and by
    ``_columns(cols)`` (the weight times a ``(in_features, n)`` matrix) otherwise."""

    def _by_matvec(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` over the last dimension of ``x``: ``(*, in_features)`` to
        ``(*, out_features)``."""
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1 and self._by_matvec():
            out = self._matvec(rows[0]).unsqueeze(0)
        else:
            out = self._columns(rows.t()).t()
        if self.bias is not None:
            out = out + self.bias
        shape = list(x.shape[:-1])
        shape.append(self.out_features)
        return out.reshape(shape)


class SparseLinear(_SparseGemm):
    """``nn.Linear`` computing with a ``torch.sparse`` CSR or BSR weight (inference).

    The compressed weight is kept as plain dense buffers (``crow_indices``, ``col_indices``,
    ``values``) and wrapped into a sparse tensor at each call (no copy), so the module
    deep-copies, saves and loads like any other. Built by
    [`to_sparse_inference`][sparseopt.export.to_sparse_inference].

    Args:
        linear (nn.Linear): the dense layer (float32 or float64); its weight is compressed.
        layout (str): ``"csr"`` or ``"bsr"``. Default: ``"csr"``.
        blocksize (int): the square block of ``"bsr"``; must divide both weight dimensions.
            Default: 4.

    Raises:
        TypeError: if ``linear`` is not an ``nn.Linear``, ``layout`` not a string or
            ``blocksize`` not an int.
        ValueError: if ``layout`` is unknown or ``blocksize`` does not divide the weight.

    Examples:
        >>> import torch
        >>> from sparseopt.export import SparseLinear
        >>> dense = torch.nn.Linear(8, 4)
        >>> sparse = SparseLinear(dense)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(sparse(x), dense(x), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear, layout: str = "csr", blocksize: int = 4) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected linear to be an nn.Linear, but got {type(linear).__name__}")
        _validate.choice("layout", layout, LAYOUTS)
        blocksize = _validate.integer("blocksize", blocksize, 1)
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.layout = layout
        if layout == "bsr" and (weight.shape[0] % blocksize or weight.shape[1] % blocksize):
            raise ValueError(
                f"Expected blocksize to divide the weight's shape {tuple(weight.shape)}, "
                f"but got {blocksize}"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            if layout == "bsr":
                compressed = weight.to_sparse_bsr((blocksize, blocksize))
            else:
                compressed = weight.to_sparse_csr()
        self.register_buffer("crow_indices", compressed.crow_indices().clone())
        self.register_buffer("col_indices", compressed.col_indices().clone())
        self.register_buffer("values", compressed.values().clone())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def sparse_weight(self) -> Tensor:
        """The weight as a sparse CSR or BSR tensor (a view of the buffers).

        Returns:
            A ``torch.sparse_csr`` or ``torch.sparse_bsr`` tensor of shape
            ``(out_features, in_features)``.

        Examples:
            >>> import torch
            >>> from sparseopt.export import SparseLinear
            >>> SparseLinear(torch.nn.Linear(8, 4)).sparse_weight().layout
            torch.sparse_csr
        """
        size = [self.out_features, self.in_features]
        layout = torch.sparse_bsr if self.layout == "bsr" else torch.sparse_csr
        if torch.jit.is_scripting():  # TorchScript does not know check_invariants
            return torch.sparse_compressed_tensor(
                self.crow_indices, self.col_indices, self.values, size, layout=layout
            )
        return torch.sparse_compressed_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            size,
            layout=layout,
            check_invariants=False,
        )

    def _matvec(self, row: Tensor) -> Tensor:  # MKL's sparse mv: 2-3x faster than mm
        return torch.mv(self.sparse_weight(), row)

    def _columns(self, cols: Tensor) -> Tensor:
        return torch.sparse.mm(self.sparse_weight(), cols)

    def extra_repr(self) -> str:
        nnz = self.values.numel()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"layout={self.layout}, nnz={nnz}, bias={self.bias is not None}"
        )


class SparseConv1x1(_OverPixels, SparseLinear):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) as a sparse GEMM over the pixels.

    Args:
        conv (nn.Conv2d): the dense layer; its ``(out, in, 1, 1)`` weight is compressed.
        layout (str): ``"csr"`` or ``"bsr"``. Default: ``"csr"``.
        blocksize (int): the square block of ``"bsr"``. Default: 4.

    Raises:
        TypeError: if ``conv`` is not an ``nn.Conv2d``, or as for
            [`SparseLinear`][sparseopt.export.SparseLinear].
        ValueError: if ``conv`` is not a 1x1, stride-1, unpadded, single-group convolution, or
            as for [`SparseLinear`][sparseopt.export.SparseLinear].

    Examples:
        >>> import torch
        >>> from sparseopt.export import SparseConv1x1
        >>> dense = torch.nn.Conv2d(8, 4, 1)
        >>> x = torch.randn(2, 8, 5, 5)
        >>> torch.allclose(SparseConv1x1(dense)(x), dense(x), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv2d, layout: str = "csr", blocksize: int = 4) -> None:
        super().__init__(self._linear_of(conv)[0], layout, blocksize)


# --- structured inference: constant fan-in (condensed) and 2:4 (semi-structured) ---------------
_COMPILED_GATHER: Any = None


def _gather_multiply_sum(rows: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``out[b, o] = sum_j rows[b, indices[o, j]] * values[o, j]``: the fused formulation that
    ``torch.compile`` turns into one loop (SRigL's condensed layer)."""
    return (rows[:, indices] * values).sum(-1)


def _compiled_gather() -> Any:
    global _COMPILED_GATHER
    if _COMPILED_GATHER is None:
        _COMPILED_GATHER = torch.compile(_gather_multiply_sum)
    return _COMPILED_GATHER


def _constant_fan_in(active: Tensor) -> tuple[int, int, int]:
    """``(k, fewest, most)`` active per row of a 2-D bool mask (``k`` is row 0's count)."""
    counts = active.sum(1)
    if counts.numel() == 0:
        return 0, 0, 0
    return int(counts[0]), int(counts.min()), int(counts.max())


def _check_mask(mask: Any, shape: torch.Size) -> None:
    """A ``TypeError`` unless ``mask`` is a bool tensor, a ``ValueError`` unless of ``shape``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"{mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected mask to be a bool tensor or None, but got {got}")
    if mask.shape != shape:
        raise ValueError(
            f"Expected mask of the weight's shape {tuple(shape)}, but got {tuple(mask.shape)}"
        )


class CondensedLinear(_SparseGemm):
    """``nn.Linear`` whose rows each hold the same number ``k`` of active weights (constant
    fan-in), stored condensed: ``values`` and ``indices`` of shape ``(out_features, k)``.

    Row ``o`` computes ``sum_j x[..., indices[o, j]] * values[o, j] + bias[o]``. Two eager
    kernels run it, chosen by what measured fastest on CPU (``benchmarks/structured_inference.py``,
    ``docs/benchmarks.md``): for one input row, ``torch.mv`` with a CSR view of the same buffers
    (every row pointer is ``o * k``; float16/bfloat16: ``index_select`` plus ``vecdot``); for more
    rows, ``F.embedding_bag`` over the transposed input with ``values`` as per-sample weights (one
    pass, no ``(rows, out, k)`` intermediate). ``compile=True`` runs instead the fused
    gather-multiply-sum ``(x[:, indices] * values).sum(-1)`` through ``torch.compile`` (SRigL's
    formulation); it was not faster on CPU in our measurement, hence off by default.

    Built by [`to_sparse_inference`][sparseopt.export.to_sparse_inference] for layers whose mask
    has constant fan-in (``SparseOptimizer(structure="fan_in")``); indices are int32 (int64 for
    more than ``2**31 - 1`` inputs), ascending inside each row.

    Args:
        linear (nn.Linear): the dense layer (masked weights exactly 0), any float dtype.
        mask (Tensor | None): the active positions, a bool tensor of the weight's shape whose
            rows each hold the same count. An active weight may be exactly 0. Default: ``None``,
            the nonzeros of the weight (then every row must hold the same number of nonzeros).
        compile (bool): run the ``torch.compile``-d fused gather instead of the eager kernels.
            Default: ``False`` (the eager kernels measured faster on CPU).

    Raises:
        TypeError: if ``linear`` is not an ``nn.Linear``, ``mask`` not a bool tensor or
            ``compile`` not a bool.
        ValueError: if the mask does not have the weight's shape, leaves nonzero weights
            outside it, or its rows hold different counts.

    Examples:
        >>> import torch
        >>> from sparseopt.export import CondensedLinear
        >>> dense = torch.nn.Linear(8, 4)
        >>> mask = torch.zeros(4, 8, dtype=torch.bool)
        >>> mask[:, :2] = True  # two active inputs per output
        >>> with torch.no_grad():
        ...     _ = dense.weight.mul_(mask)
        >>> condensed = CondensedLinear(dense, mask)
        >>> condensed.values.shape, condensed.indices.dtype
        (torch.Size([4, 2]), torch.int32)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(condensed(x), dense(x), atol=1e-6)
        True
    """

    def __init__(
        self, linear: nn.Linear, mask: Tensor | None = None, *, compile: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected linear to be an nn.Linear, but got {type(linear).__name__}")
        compile = _validate.boolean("compile", compile)
        weight = linear.weight.detach()
        if weight.ndim != 2:
            raise ValueError(f"Expected a 2-D weight, but got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if mask is None:
            active = weight != 0
        else:
            _check_mask(mask, weight.shape)
            active = mask.to(weight.device)
            outside = int(torch.count_nonzero(weight[~active]))
            if outside:
                raise ValueError(
                    f"Expected the weights outside the mask to be 0, but got {outside} nonzeros"
                )
        k, fewest, most = _constant_fan_in(active)
        if fewest != most:
            raise ValueError(
                "Expected every row to hold the same number of active weights (constant "
                f"fan-in), but rows hold {fewest} to {most}"
                + ("" if mask is not None else " nonzeros (pass the mask if some are exactly 0)")
            )
        self.k = k
        self.use_compile = compile  # not .compile: nn.Module.compile is a method
        index_dtype = torch.int32 if self.in_features < 2**31 else torch.int64
        # positions of the active weights, ascending within each row
        order = torch.sort(active.to(torch.uint8), dim=1, descending=True, stable=True).indices
        indices = order[:, :k].contiguous()
        self.register_buffer("values", weight.gather(1, indices).contiguous())
        self.register_buffer("indices", indices.to(index_dtype))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)
        crow = torch.arange(self.out_features + 1, device=weight.device) * k  # row o: o * k
        self.register_buffer("crow_indices", crow.to(index_dtype), persistent=False)
        with warnings.catch_warnings():  # torch warns once per process that CSR is in beta
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            empty = torch.zeros(0, dtype=torch.int64, device="cpu")  # a CPU dummy, on purpose
            torch.sparse_csr_tensor(
                torch.zeros(2, dtype=torch.int64, device="cpu"),
                empty,
                empty.float(),
                (1, 1),
                check_invariants=True,
            )

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (zeros elsewhere).

        Returns:
            A new tensor of ``values``' dtype and device.

        Examples:
            >>> import torch
            >>> from sparseopt.export import CondensedLinear
            >>> dense = torch.nn.Linear(4, 2, bias=False)
            >>> with torch.no_grad():
            ...     _ = dense.weight.copy_(torch.tensor([[0.0, 1, 0, 2], [3, 0, 4, 0]]))
            >>> torch.equal(CondensedLinear(dense).dense_weight(), dense.weight)
            True
        """
        out = self.values.new_zeros(self.out_features, self.in_features)
        return out.scatter_(1, self.indices.long(), self.values)

    @torch.jit.unused
    def _fused(self, rows):  # no annotations: TorchScript cannot resolve them here
        return _compiled_gather()(rows, self.indices, self.values)

    def _matvec(self, row: Tensor) -> Tensor:
        use_csr = self.values.dtype in (torch.float32, torch.float64)
        if not torch.jit.is_scripting():  # no fake-tensor rule builds a CSR tensor (export)
            use_csr = use_csr and not torch.compiler.is_compiling()
        if use_csr:  # a CSR view of the same buffers: MKL's sparse mv
            cols, values = self.indices.reshape(-1), self.values.reshape(-1)
            size = [self.out_features, self.in_features]
            if torch.jit.is_scripting():  # TorchScript does not know check_invariants
                csr = torch.sparse_compressed_tensor(
                    self.crow_indices, cols, values, size, layout=torch.sparse_csr
                )
            else:
                csr = torch.sparse_compressed_tensor(
                    self.crow_indices,
                    cols,
                    values,
                    size,
                    layout=torch.sparse_csr,
                    check_invariants=False,
                )
            return torch.mv(csr, row)
        gathered = row.index_select(0, self.indices.reshape(-1)).view_as(self.values)
        return torch.linalg.vecdot(gathered, self.values)

    def _by_matvec(self) -> bool:
        return self.k > 0 and not self.use_compile

    def _columns(self, cols: Tensor) -> Tensor:
        """``weight @ cols`` for ``cols`` of shape ``(in_features, n)``, without the bias."""
        if self.k == 0:  # an all-zero weight (F.embedding_bag refuses empty bags)
            return cols.new_zeros(self.out_features, cols.shape[1])
        if self.use_compile:
            return self._fused(cols.t()).t()
        # out[o] = sum_j values[o, j] * cols[indices[o, j]]
        return F.embedding_bag(
            self.indices, cols.contiguous(), per_sample_weights=self.values, mode="sum"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
            f"bias={self.bias is not None}, compile={self.use_compile}"
        )


class CondensedConv1x1(_OverPixels, CondensedLinear):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) with constant fan-in, condensed
    like [`CondensedLinear`][sparseopt.export.CondensedLinear] and run over the pixels.

    Args:
        conv (nn.Conv2d): the dense layer; its ``(out, in, 1, 1)`` weight is condensed.
        mask (Tensor | None): the active positions, of the conv weight's shape. Default:
            ``None``, the nonzeros.
        compile (bool): as for ``CondensedLinear``. Default: ``False``.

    Raises:
        TypeError: if ``conv`` is not an ``nn.Conv2d``, or as for ``CondensedLinear``.
        ValueError: if ``conv`` is not a 1x1, stride-1, unpadded, single-group convolution, its
            mask does not have the conv weight's shape, or as for ``CondensedLinear``.

    Examples:
        >>> import torch
        >>> from sparseopt.export import CondensedConv1x1
        >>> dense = torch.nn.Conv2d(8, 4, 1)
        >>> with torch.no_grad():
        ...     _ = dense.weight[:, 4:].zero_()
        >>> x = torch.randn(2, 8, 5, 5)
        >>> torch.allclose(CondensedConv1x1(dense)(x), dense(x), atol=1e-5)
        True
    """

    def __init__(
        self, conv: nn.Conv2d, mask: Tensor | None = None, *, compile: bool = False
    ) -> None:
        linear, flat_mask = self._linear_of(conv, mask)
        super().__init__(linear, flat_mask, compile=compile)


def semi_structured_unsupported(weight: Tensor) -> str:
    """Why a 2:4 weight cannot run with ``torch.sparse.to_sparse_semi_structured``, or ``""``.

    The checks: a 2-D weight on a CUDA device of compute capability at least 8.0 (Ampere or
    newer), in float16 or bfloat16 (float32 weights are not cast silently: cast the model
    first), whose shape is a multiple of the selected backend's minimum sparse tile
    (cuSPARSELt: 16x16; CUTLASS: 32x64, for 16-bit types). Whether the mask is 2:4 is not
    checked here.

    Args:
        weight (Tensor): the ``(out_features, in_features)`` weight.

    Returns:
        The reason, or ``""`` when the conversion can be tried.

    Raises:
        TypeError: if ``weight`` is not a tensor.

    Examples:
        >>> import torch
        >>> print(semi_structured_unsupported(torch.zeros(64, 64)))  # doctest: +ELLIPSIS
        the semi-structured 2:4 kernels run on CUDA devices ..., and this weight is on cpu
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"Expected weight to be a tensor, but got {_validate.type_of(weight)}")
    if weight.ndim != 2:
        return (
            "the semi-structured 2:4 kernels take a 2-D weight, and this one has shape "
            f"{tuple(weight.shape)}"
        )
    if weight.device.type != "cuda":
        return (
            "the semi-structured 2:4 kernels run on CUDA devices of compute capability >= 8.0, "
            f"and this weight is on {weight.device}"
        )
    major, minor = torch.cuda.get_device_capability(weight.device)
    if (major, minor) < (8, 0):
        return (
            "the semi-structured 2:4 kernels need compute capability >= 8.0, and "
            f"{torch.cuda.get_device_name(weight.device)} has {major}.{minor}"
        )
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return (
            "the semi-structured 2:4 kernels take float16/bfloat16 weights, and this one is "
            f"{dtype_name(weight.dtype)} (cast the model with .half() or .to(torch.bfloat16) "
            "first)"
        )
    rows, cols = _compat.semi_structured_tile(weight.dtype)
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return (
            f"the semi-structured 2:4 kernels need a weight shape that is a multiple of "
            f"({rows}, {cols}), and this one is {tuple(weight.shape)}"
        )
    return ""


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with a 2:4 weight compressed by ``torch.sparse.to_sparse_semi_structured``
    (cuSPARSELt or CUTLASS sparse tensor cores; CUDA, compute capability >= 8.0, float16 or
    bfloat16).

    The weight is held as a ``SparseSemiStructuredTensor`` parameter (``requires_grad=False``)
    and ``F.linear`` dispatches to the sparse kernel. For inference only; save the dense masked
    model (``save_sparse``) and convert after loading, rather than saving this module.

    Args:
        linear (nn.Linear): the dense layer whose weight holds 2 nonzeros (at most) in every
            group of 4 consecutive inputs.

    Raises:
        TypeError: if ``linear`` is not an ``nn.Linear``.
        ValueError: if the weight cannot be converted (see
            [`semi_structured_unsupported`][sparseopt.export.semi_structured_unsupported]) or
            is not 2:4.

    Examples:
        >>> import torch
        >>> from sparseopt.export import SemiStructuredLinear
        >>> SemiStructuredLinear(torch.nn.Linear(64, 64))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... run on CUDA devices of compute capability >= 8.0, and this weight is on cpu
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Expected linear to be an nn.Linear, but got {type(linear).__name__}")
        weight = linear.weight.detach()
        reason = semi_structured_unsupported(weight)
        if reason:
            raise ValueError(f"Expected linear to be convertible to 2:4, but {reason}")
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        over = int((groups > 2).sum())
        if over:
            raise ValueError(
                "Expected linear to hold at most 2 nonzeros in every group of 4 inputs (2:4), "
                f"but {over} of {groups.numel()} groups hold more"
            )
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(
            to_sparse_semi_structured(weight.contiguous()), requires_grad=False
        )
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` with the 2:4 sparse kernel.

        Args:
            x (Tensor): ``(*, in_features)``, the weight's dtype and device.

        Returns:
            ``(*, out_features)``.

        Examples:
            >>> import torch
            >>> from sparseopt.export import SemiStructuredLinear
            >>> callable(SemiStructuredLinear.forward)  # needs a CUDA device to run
            True
        """
        return F.linear(x.contiguous(), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"structure=2:4, bias={self.bias is not None}"
        )
