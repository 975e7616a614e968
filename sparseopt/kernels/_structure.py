"""The active positions of one layer's mask and its active values, in the forms the training
kernels read.

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

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _compat

__all__ = ["SparseStructure", "quiet_beta_warning"]


def quiet_beta_warning() -> None:
    """Build one CSR tensor with torch's once-per-process "CSR support is in beta" warning
    silenced, so that it never reaches the user from a training step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        index = torch.zeros(0, dtype=torch.int64, device="cpu")  # a CPU dummy, on purpose
        crow = torch.zeros(2, dtype=torch.int64, device="cpu")
        torch.sparse_csr_tensor(crow, index, index.float(), (1, 1), check_invariants=True)


def _pointers(counts: Tensor, dtype: torch.dtype) -> Tensor:
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(dtype)


class SparseStructure:
    """The CSR (and transposed CSR) form of a 2-D bool mask, and the active values of one weight
    in it.

    The values live in buffers of their own (``load`` gathers into them when the weight changed),
    and the CSR tensors that MKL's ``mv`` and the SDDMM read are views of those buffers, built
    once per mask: a training step builds no sparse tensor.

    Args:
        mask (Tensor): the ``(out, in)`` bool mask (a conv's ``(out, in, 1, 1)`` mask reshaped).
        dtype (torch.dtype): the weight's dtype.
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
        self.k = self.nnz // out_f if condensed and out_f and self.nnz % out_f == 0 else None
        device = mask.device
        self.values = torch.zeros(self.nnz, dtype=dtype, device=device)
        self.values_t = torch.zeros(self.nnz, dtype=dtype, device=device)
        zeros = torch.zeros(self.nnz, dtype=dtype, device=device)
        quiet_beta_warning()
        self._csr = self._view(self.crow, self.col, self.values, self.shape)
        self._csr_t = self._view(self.crow_t, self.col_t, self.values_t, self.shape[::-1])
        self._csr_zero = self._view(self.crow, self.col, zeros, self.shape)
        self._key: tuple[int, int] | None = None
        self._t_fresh = False

    @staticmethod
    def _view(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)

    @property
    def density(self) -> float:
        """Active fraction of the mask."""
        numel = self.shape[0] * self.shape[1]
        return self.nnz / numel if numel else 1.0

    def load(self, weight: Tensor) -> Tensor:
        """Gather ``weight``'s active values into :attr:`values` unless they are there already
        (same storage, same version counter); returns :attr:`values`."""
        key = (weight.data_ptr(), _compat.tensor_version(weight))
        if key != self._key:
            torch.index_select(weight.detach().reshape(-1), 0, self.flat, out=self.values)
            self._key, self._t_fresh = key, False
        return self.values

    def _transposed(self) -> Tensor:
        if not self._t_fresh:
            torch.index_select(self.values, 0, self.perm, out=self.values_t)
            self._t_fresh = True
        return self.values_t

    def _apply(self, x: Tensor, transposed: bool) -> Tensor:
        """``W @ x`` (or ``W.T @ x``) for a contiguous ``x`` of shape ``(in, P)`` (``(out, P)``)."""
        values = self._transposed() if transposed else self.values
        rows = self.shape[1] if transposed else self.shape[0]
        if x.shape[1] == 1 and self.nnz:
            return torch.mv(self._csr_t if transposed else self._csr, x[:, 0]).unsqueeze(1)
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

    def matmul(self, x: Tensor) -> Tensor:
        """``W @ x``: ``(out, P)`` from the loaded values and a contiguous ``x`` ``(in, P)``."""
        return self._apply(x, transposed=False)

    def matmul_t(self, g: Tensor) -> Tensor:
        """``W.T @ g``: ``(in, P)`` from the loaded values and a contiguous ``g`` ``(out, P)``."""
        return self._apply(g, transposed=True)

    def sddmm(self, g: Tensor, x: Tensor) -> Tensor:
        """``(g @ x.T)`` at the active positions, in row-major order: the weight gradient's
        active values, for ``g`` ``(out, P)`` and ``x`` ``(in, P)``.

        ``sampled_addmm`` on CPU runs 10-40x slower for 2 to 7 columns than for 8 (and somewhat
        slower off a multiple of 8), so the columns are padded with zeros to a multiple of 8.
        """
        if not self.nnz:
            return self._csr_zero.values()
        p = g.shape[1]
        if p > 1 and p % 8:
            g = F.pad(g, (0, 8 - p % 8))
            x = F.pad(x, (0, 8 - p % 8))
        return torch.sparse.sampled_addmm(self._csr_zero, g, x.t(), beta=0.0).values()
