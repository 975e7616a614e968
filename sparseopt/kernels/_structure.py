"""The active positions of one layer's mask, in the forms the training kernels read.

Built once per mask (a topology update, a loaded checkpoint, ``finalize()`` rebuild it) and
shared by every step until the mask changes. With ``W`` the ``(out, in)`` weight and ``X`` the
``(in, P)`` input columns (``P``: the batch rows of a Linear, the pixels of a 1x1 convolution):

- ``matmul``: ``W @ X`` from the active values. One row: MKL's sparse ``mv`` on a CSR view;
  more rows: ``F.embedding_bag`` with the CSR row pointers as offsets and the values as
  per-sample weights (``out[o] = sum_j values[j] * X[col[j]]``), which measured 3-5x faster than
  ``torch.sparse.mm`` on CPU from 16 rows (``benchmarks/sparse_training.py``). A constant fan-in
  mask (``"condensed"``) reads the same arrays as an ``(out, k)`` block, without offsets.
- ``matmul_t``: ``W.T @ G`` the same way, on the transposed structure (its values are a fixed
  permutation of the row-major ones).
- ``sddmm``: ``(G @ X.T)`` at the active positions only (``torch.sparse.sampled_addmm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SparseStructure"]


def _pointers(counts: Tensor, dtype: torch.dtype) -> Tensor:
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(dtype)


class SparseStructure:
    """The CSR (and transposed CSR) form of a 2-D bool mask, for weights of one dtype and device.

    Args:
        mask (Tensor): the ``(out, in)`` bool mask (a conv's ``(out, in, 1, 1)`` mask reshaped).
        dtype (torch.dtype): the weight's dtype (for the zero values the SDDMM reads).
        condensed (bool): the mask has the same count in every row; ``matmul`` then reads the
            column indices as an ``(out, k)`` block.
    """

    def __init__(self, mask: Tensor, dtype: torch.dtype, *, condensed: bool = False) -> None:
        out_f, in_f = mask.shape
        self.shape = (out_f, in_f)
        flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major, ascending within each row
        self.nnz = flat.numel()
        index = torch.int32 if max(out_f, in_f, self.nnz) < 2**31 else torch.int64
        rows = torch.div(flat, in_f, rounding_mode="floor")
        cols = flat - rows * in_f
        self.flat = flat  # int64: index_select and index_copy_ take it
        self.crow = _pointers(mask.sum(1), index)
        self.col = cols.to(index)
        self.perm = torch.argsort(cols, stable=True)  # values[perm]: the transposed CSR's values
        self.crow_t = _pointers(mask.sum(0), index)
        self.col_t = rows[self.perm].to(index)
        self.zeros = torch.zeros(self.nnz, dtype=dtype, device=mask.device)
        self.k = self.nnz // out_f if condensed and out_f and self.nnz % out_f == 0 else None

    @property
    def density(self) -> float:
        """Active fraction of the mask."""
        numel = self.shape[0] * self.shape[1]
        return self.nnz / numel if numel else 1.0

    def _csr(self, values: Tensor, transposed: bool = False) -> Tensor:
        crow, col = (self.crow_t, self.col_t) if transposed else (self.crow, self.col)
        size = self.shape[::-1] if transposed else self.shape
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)

    def _apply(self, values: Tensor, x: Tensor, transposed: bool) -> Tensor:
        """``W @ x`` (or ``W.T @ x``) for a contiguous ``x`` of shape ``(in, P)`` (``(out, P)``)."""
        rows = self.shape[1] if transposed else self.shape[0]
        if x.shape[1] == 1 and values.numel():
            return torch.mv(self._csr(values, transposed), x[:, 0]).unsqueeze(1)
        if not transposed and self.k:
            return F.embedding_bag(
                self.col.view(rows, self.k),
                x,
                per_sample_weights=values.view(rows, self.k),
                mode="sum",
            )
        crow, col = (self.crow_t, self.col_t) if transposed else (self.crow, self.col)
        return F.embedding_bag(
            col, x, crow, per_sample_weights=values, mode="sum", include_last_offset=True
        )

    def matmul(self, values: Tensor, x: Tensor) -> Tensor:
        """``W @ x``: ``(out, P)`` from the row-major active ``values`` and ``x`` ``(in, P)``."""
        return self._apply(values, x, transposed=False)

    def matmul_t(self, values_t: Tensor, g: Tensor) -> Tensor:
        """``W.T @ g``: ``(in, P)`` from the transposed values (``values[perm]``) and ``g``."""
        return self._apply(values_t, g, transposed=True)

    def sddmm(self, g: Tensor, x: Tensor) -> Tensor:
        """``(g @ x.T)`` at the active positions, in row-major order: the weight gradient's
        active values, for ``g`` ``(out, P)`` and ``x`` ``(in, P)``."""
        if not self.nnz:
            return self.zeros
        out = torch.sparse.sampled_addmm(self._csr(self.zeros), g, x.t(), beta=0.0)
        return out.values()
