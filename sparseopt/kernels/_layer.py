"""One layer on the sparse kernels: its structure cache, the active values, the autograd function,
and the reusable weight-gradient buffer.

The gradient buffer: the weight gradient is a dense tensor (the parameter stays dense), but only
its active entries change from step to step. Allocating it afresh every step costs a page fault
per 4 KiB on this CPU (25 ms for a 4096x4096 float32 gradient, more than the sparse kernels
themselves), so each layer keeps one buffer and hands autograd a new view of it, which
``AccumulateGrad`` adopts as ``param.grad`` without copying. The buffer is reused only when
nothing but the layer holds it any more (``zero_grad(set_to_none=True)`` dropped the old
gradient: storage use count); a gradient somebody kept is never overwritten. Its inactive entries
stay 0 as long as its version counter says nobody wrote into it; otherwise it is zeroed first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _compat
from ._structure import SparseStructure
from .rule import training_min_sparsity_rule

__all__ = ["LayerKernel"]

_CLEAN = "clean"  # the buffer is 0 outside the active set of ``_buf_mask``
_ZERO = "zero"  # the buffer is 0 everywhere
_DIRTY = "dirty"  # anything


class _SparseMatmul(torch.autograd.Function):
    """``W @ X`` on the sparse kernels, ``X`` of shape ``(in, P)``; gradients for ``X`` and the
    dense ``W`` (only its active entries, or all of them on a step that reads the gradient)."""

    @staticmethod
    def forward(ctx: Any, cols: Tensor, weight: Tensor, layer: LayerKernel, struct):
        cols = cols.contiguous()
        struct.load(weight)
        # the weight is saved for autograd's version check only: an in-place change between
        # forward and backward raises, as it does for a dense layer
        ctx.save_for_backward(cols, weight)
        ctx.layer, ctx.struct = layer, struct
        return struct.matmul(cols)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor):
        cols, weight = ctx.saved_tensors
        layer, struct = ctx.layer, ctx.struct
        grad = grad.contiguous()
        g_cols = g_weight = None
        if ctx.needs_input_grad[0]:
            g_cols = struct.matmul_t(grad)
        if ctx.needs_input_grad[1]:
            g_weight = layer.weight_grad(weight, struct, grad, cols)
        return g_cols, g_weight, None, None


class _SemiStructuredLinear(torch.autograd.Function):
    """``x @ W.T`` with the 2:4 weight compressed by ``to_sparse_semi_structured`` every call
    (CUDA); the backward is dense, the weight gradient masked unless the step reads it.
    Untested: no GPU was available to this work."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, weight: Tensor, layer: LayerKernel, mask: Tensor):
        from torch.sparse import to_sparse_semi_structured

        w = weight.detach()
        ctx.save_for_backward(x2d, w, mask)
        ctx.layer = layer
        return F.linear(x2d.contiguous(), to_sparse_semi_structured(w.contiguous()))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor):
        x2d, w, mask = ctx.saved_tensors
        g_x = grad @ w if ctx.needs_input_grad[0] else None
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = grad.t() @ x2d
            if not ctx.layer.handle._reads_gradient():
                g_w.mul_(mask)
        return g_x, g_w, None, None


class LayerKernel:
    """The sparse-kernel state of one ``nn.Linear`` or 1x1 ``nn.Conv2d``.

    Args:
        handle: the owning ``SparseKernels`` (``handle.py``, which imports this module).
        name: the module's name in the model.
        original: the module's class before the swap (its ``forward`` is the dense path).
        conv: whether the module is a 1x1 convolution.
        layout: the layout this layer would take (``"csr"``, ``"condensed"``, ``"2:4"``).
        forced: whether the handle's ``layout`` forces it (no rule).
    """

    def __init__(
        self,
        handle: Any,
        name: str,
        original: type[nn.Module],
        *,
        conv: bool,
        layout: str,
        forced: bool,
    ) -> None:
        self.handle = handle
        self.name = name
        self.original = original
        self.conv = conv
        self.wanted = layout
        self.forced = forced
        self.batch: int | None = None  # GEMM rows at the first sparse-eligible call
        self.reason = "not decided yet: at the first training forward after the first step"
        self.sparse_calls = 0
        self.dense_calls = 0
        self._struct: SparseStructure | None = None
        self._struct_mask: Tensor | None = None
        self._struct_version = -1
        self._struct_dtype: torch.dtype | None = None
        self._struct_ok = False
        self._buf: Tensor | None = None
        self._buf_base = 0
        self._buf_state = _DIRTY
        self._buf_version = -1
        self._buf_mask: tuple[Any, int] | None = None
        self.sparse_grad_pending = False  # a sparse-only weight gradient since the last step

    # --- the decision ------------------------------------------------------------------------
    @property
    def layout(self) -> str | None:
        """The layout the layer runs on now, ``None`` for dense."""
        if self.batch is None:
            return None
        if self.wanted == "2:4":
            return "2:4"
        return self.wanted if self._struct_ok else None

    def _rule(self, struct: SparseStructure) -> bool:
        """Whether ``struct`` runs sparse at this layer's batch; sets the reason."""
        numel = struct.shape[0] * struct.shape[1]
        sparsity = 1.0 - struct.density
        if self.forced:
            self.reason = f"layout={self.wanted!r} forces it (no rule)"
            return True
        need = training_min_sparsity_rule(numel, self.batch)
        if sparsity >= need:
            self.reason = f"sparsity {sparsity:.3f} reaches {need:g} (rule at batch {self.batch})"
            return True
        self.reason = (
            f"sparsity {sparsity:.3f} below {need:g}, the rule for {numel} weights at batch "
            f"{self.batch}: dense is faster"
            if need < 1
            else f"{numel} weights at batch {self.batch}: too small to gain (rule)"
        )
        return False

    def structure(self, mask: Tensor, weight: Tensor) -> SparseStructure | None:
        """The structure of ``mask`` for ``weight``, rebuilt only when the mask object, its
        version or the weight's dtype changed; ``None`` when the rule keeps the layer dense."""
        version = _compat.tensor_version(mask)
        if (
            self._struct_mask is not mask
            or self._struct_version != version
            or self._struct_dtype != weight.dtype
        ):
            rows = mask.shape[0]
            m2 = mask.detach().reshape(rows, -1)
            struct = SparseStructure(m2, weight.dtype, condensed=self.wanted == "condensed")
            if self.wanted == "condensed" and struct.k is None:
                self.reason = "the mask lost constant fan-in: runs dense"
                self._struct_ok = False
            else:
                self._struct_ok = self._rule(struct)
            self._struct, self._struct_mask = struct, mask
            self._struct_version, self._struct_dtype = version, weight.dtype
        return self._struct if self._struct_ok else None

    # --- the weight gradient ----------------------------------------------------------------------
    def _buffer(self, weight: Tensor) -> Tensor | None:
        """The reusable gradient buffer (flat), or ``None`` when ``weight.grad`` exists (autograd
        then adds into it, so the gradient must be a tensor of its own)."""
        if weight.grad is not None:
            return None
        buf = self._buf
        if buf is not None and (
            buf.numel() != weight.numel()
            or buf.dtype != weight.dtype
            or buf.device != weight.device
            or _compat.storage_use_count(buf) > self._buf_base
        ):
            buf = None  # a gradient somebody still holds, or a changed weight: leave it to them
        if buf is None:
            buf = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
            self._buf, self._buf_base = buf, _compat.storage_use_count(buf)
            self._buf_state, self._buf_version = _ZERO, _compat.tensor_version(buf)
        return buf

    def weight_grad(
        self, weight: Tensor, struct: SparseStructure, grad: Tensor, cols: Tensor
    ) -> Tensor:
        """The dense weight gradient: all of ``grad @ cols.T`` on a step that reads the gradient,
        else only its active entries (the SDDMM), with exact zeros elsewhere."""
        shape = weight.shape
        buf = self._buffer(weight)
        if self.handle._reads_gradient():
            if buf is None:
                return (grad @ cols.t()).view(shape)
            torch.mm(grad, cols.t(), out=buf.view(struct.shape))
            self._buf_state = _DIRTY
            return buf.view(shape)
        values = struct.sddmm(grad, cols)
        self.sparse_grad_pending = True
        if buf is None:
            out = grad.new_zeros(weight.numel())
            return out.index_copy_(0, struct.flat, values).view(shape)
        mask_key = (self._struct_mask, self._struct_version)
        version = _compat.tensor_version(buf)
        same = self._buf_state == _ZERO or (
            self._buf_state == _CLEAN
            and self._buf_mask is not None
            and self._buf_mask[0] is mask_key[0]
            and self._buf_mask[1] == mask_key[1]
        )
        if not same or version != self._buf_version:
            buf.zero_()
        buf.index_copy_(0, struct.flat, values)
        self._buf_state, self._buf_mask = _CLEAN, mask_key
        self._buf_version = _compat.tensor_version(buf)
        return buf.view(shape)

    def grad_is_clean(self, grad: Tensor, mask: Tensor) -> bool:
        """Whether ``grad`` is this layer's buffer, written by the SDDMM for ``mask`` as it is
        now, and untouched since (its version counter)."""
        buf = self._buf
        return (
            buf is not None
            and self._buf_state == _CLEAN
            and grad.data_ptr() == buf.data_ptr()
            and grad.numel() == buf.numel()
            and _compat.tensor_version(grad) == self._buf_version
            and self._buf_mask is not None
            and self._buf_mask[0] is mask
            and self._buf_mask[1] == _compat.tensor_version(mask)
        )

    # --- the forward -----------------------------------------------------------------------------
    def dense(self, module: nn.Module, x: Tensor) -> Tensor:
        self.dense_calls += 1
        return self.original.forward(module, x)

    @torch.compiler.disable
    def forward_eager(self, module: nn.Module, x: Tensor) -> Tensor:
        """:meth:`forward` kept out of ``torch.compile``'s graph (a graph break): the kernels
        read and cache Python state, and no fake-tensor rule builds a CSR tensor."""
        return self.forward(module, x)

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """The module's forward on the sparse kernels, or dense where they do not apply."""
        weight = module.weight
        mask = self.handle._mask_of(weight)
        if mask is None or not self.handle._masks_applied():
            return self.dense(module, x)
        if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
            return self.dense(module, x)
        if self.conv:
            if x.ndim != 4:
                return self.dense(module, x)
            n, c, h, w = x.shape
            cols = x.transpose(0, 1).reshape(c, n * h * w)
        else:
            x2d = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
            cols = x2d.t()
        if self.batch is None:
            if not torch.is_grad_enabled():  # an evaluation batch does not decide
                return self.dense(module, x)
            self.batch = int(cols.shape[1])
        if self.wanted == "2:4":
            out2d = self._semi_structured(x2d if not self.conv else None, weight, mask)
            if out2d is None:
                return self.dense(module, x)
            self.sparse_calls += 1
            out = out2d if module.bias is None else out2d + module.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])
        struct = self.structure(mask, weight)
        if struct is None or cols.shape[1] == 0:
            return self.dense(module, x)
        self.sparse_calls += 1
        if torch.is_grad_enabled() and (weight.requires_grad or cols.requires_grad):
            out = _SparseMatmul.apply(cols, weight, self, struct)
        else:
            struct.load(weight)
            out = struct.matmul(cols.contiguous())
        bias = module.bias
        if self.conv:
            o = out.shape[0]
            y = out.reshape(o, n, h, w).transpose(0, 1)
            if bias is not None:
                y = y + bias.view(1, o, 1, 1)
            return y.contiguous()
        y = out.t()
        if bias is not None:
            y = y + bias
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def _semi_structured(self, x2d: Tensor | None, weight: Tensor, mask: Tensor) -> Tensor | None:
        if x2d is None:
            return None
        self.reason = "2:4 semi-structured (CUDA; untested: no GPU was available)"
        if torch.is_grad_enabled() and (weight.requires_grad or x2d.requires_grad):
            return _SemiStructuredLinear.apply(x2d, weight, self, mask.to(weight.dtype))
        from torch.sparse import to_sparse_semi_structured

        return F.linear(x2d.contiguous(), to_sparse_semi_structured(weight.detach().contiguous()))
