"""Exact top-k selection on plain tensors: the kernels under ``masks`` and ``_dtensor``.

All selections are exact (a requested count is met to the unit) and deterministic: ties are broken
by flat index, lowest first, so the same inputs give the same mask on every rank and every run,
independent of how a top-k kernel orders equal values. Selection is O(N) (one ``kthvalue`` and a
few elementwise passes); nothing is sorted. This module knows nothing of DTensors; the public
functions of :mod:`sparseopt.masks` dispatch here or to :mod:`sparseopt._dtensor`, which uses these
kernels on replicated tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["largest", "smallest"]


def smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` smallest of a plain tensor, ties to the lowest flat index."""
    return _select(scores, k, largest=False)


def largest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest of a plain tensor, ties to the lowest flat index."""
    return _select(scores, k, largest=True)


_SAMPLE_MIN, _SAMPLE_MAX = 1 << 14, 1 << 16  # scores sampled to bracket the k-th value


def _sample_stride(n: int) -> int:
    """The stride of the strided sample of ``n > _SAMPLE_MIN`` scores: n/64 of them, clamped."""
    return n // max(_SAMPLE_MIN, min(_SAMPLE_MAX, n // 64))


def _kth_value(flat: Tensor, k: int, largest: bool) -> Tensor:
    """The exact ``k``-th smallest (or largest) value of a 1-D float tensor, ``0 < k < n``.

    ``kthvalue`` over millions of scores is the most expensive part of a topology update. So, for
    a large tensor, a deterministic strided sample (``_sample_stride``) brackets the wanted value
    between two sample quantiles, each six standard deviations (of its rank in the sample) away
    from the expected one. ``kthvalue`` then runs on the scores inside the bracket only, a few
    percent of them, whatever ``k`` is: the global prune of GraNet keeps most of the active
    weights, and a one-sided bound would leave almost all of them to search. If the value is not
    inside (the sample was unlucky), it runs on all the scores. Either way the result is exact.
    """
    n = flat.numel()
    rank = n - k + 1 if largest else k  # the k-th largest is the (n - k + 1)-th smallest
    if n <= 4 * _SAMPLE_MIN:
        return torch.kthvalue(flat, rank).values
    sample = flat[:: _sample_stride(n)]
    m = sample.numel()
    want = rank * m / n  # the expected rank of the wanted value in the sample
    margin = 6 * math.sqrt(want * (1 - want / m)) + 16
    lo_rank, hi_rank = max(1, math.floor(want - margin)), min(m, math.ceil(want + margin))
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < rank <= below + inside.numel():  # the value lies in [lo, hi]
        return torch.kthvalue(inside, rank - below).values
    return torch.kthvalue(flat, rank).values


def _select(scores: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` smallest (or largest) of a plain tensor, ties to the lowest flat index.

    One ``kthvalue`` finds the threshold; the strictly better scores are all taken, and the
    remaining ``room`` units go to the tied scores in index order (``nonzero`` lists them in
    order). Four passes over the scores, no sort and no full-size index or cumulative-sum tensor.
    """
    flat = scores.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue is not implemented for every low-precision dtype
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"Expected 0 <= k <= {n}, but got k={k}")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = _kth_value(flat, k, largest)
    out = flat > kth if largest else flat < kth
    room = k - int(torch.count_nonzero(out))
    if room:
        tied = (flat == kth).nonzero().reshape(-1)
        out[tied[:room]] = True
    return out.view_as(scores)
