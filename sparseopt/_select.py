"""Exact top-k selection on plain tensors: the one selection engine of the library.

**The rule.** Every selection in sparseopt (the drop and the growth of an update, a pruning event,
the Sup-tickets re-prune, SNIP, the structured kernels of ``sparseopt.structure``, and, across
shards, ``sparseopt._dtensor``) picks its masks by this one rule:

- the count is exact: ``k`` asked, ``k`` selected (per unit: each unit its own count);
- scores are compared as float32 (float16, bfloat16 and the small integer dtypes are widened
  exactly) or float64 (float64, int32, int64);
- ``-0.0`` equals ``0.0``;
- NaN is the worst score: it ranks with ``-inf`` when the largest are selected and with ``+inf``
  when the smallest are, so it is taken last, and only when the count needs it;
- ties (equal scores, NaN included with the infinity it ranks with) go to the lowest index: the
  lowest flat index of the tensor, the lowest position inside a unit for per-unit selections,
  and the earlier tensor for a selection across tensors.

So the same scores give the same mask on every run, rank and device, whatever order a kernel
leaves equal values in. No selection sorts: a threshold (the ``k``-th value) is found, everything
strictly better is taken, and ties at the threshold are filled in index order.

Two kernels apply the rule: :func:`smallest` / :func:`largest` over a whole tensor (one
``kthvalue``, bracketed by a strided sample on large tensors) and :func:`largest_per_unit` over
the rows of a 2-D tensor, one count per row (one ``topk`` of the largest count). This module
knows nothing of DTensors or structures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["comparable", "largest", "largest_per_unit", "sample_stride", "smallest"]

_WIDE = (torch.int32, torch.int64, torch.uint32, torch.uint64)


def comparable(scores: Tensor) -> Tensor:
    """``scores`` in the dtype the rule compares them in: float32 or float64 (no copy if already).

    Widening is exact: float16, bfloat16 and integers of up to 16 bits fit float32, and integers
    of 32 bits (and of 64 bits up to ``2**53``) fit float64.
    """
    if scores.dtype in (torch.float32, torch.float64):
        return scores
    return scores.double() if scores.dtype in _WIDE else scores.float()


def smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask (``scores``' shape) of the ``k`` smallest of a plain tensor, by the rule."""
    return _select(scores, k, largest=False)


def largest(scores: Tensor, k: int) -> Tensor:
    """Bool mask (``scores``' shape) of the ``k`` largest of a plain tensor, by the rule."""
    return _select(scores, k, largest=True)


_SAMPLE_MIN, _SAMPLE_MAX = 1 << 14, 1 << 16  # scores sampled to bracket the k-th value


def sample_stride(n: int) -> int:
    """The stride of the strided sample of ``n > 4 * 2**14`` scores: n/64 of them, clamped to
    ``[2**14, 2**16]`` samples."""
    return n // max(_SAMPLE_MIN, min(_SAMPLE_MAX, n // 64))


def _kthvalue(flat: Tensor, rank: int) -> Tensor:
    """The ``rank``-th smallest of a 1-D tensor, NaN above ``+inf``. Only the value is used, and
    it is exact on every device; under ``torch.use_deterministic_algorithms`` a CUDA tensor takes
    ``topk`` instead, which CUDA does not flag as nondeterministic."""
    if flat.is_cuda and torch.are_deterministic_algorithms_enabled():
        return torch.topk(flat, rank, largest=False, sorted=False).values.max()
    return torch.kthvalue(flat, rank).values


def _kth_value(flat: Tensor, k: int, largest: bool) -> Tensor:
    """The exact ``k``-th smallest (or largest) value of a 1-D float tensor, ``0 < k < n``, in the
    order where NaN is above ``+inf`` (``kthvalue``'s).

    ``kthvalue`` over millions of scores is the most expensive part of a topology update. So, for
    a large tensor, a deterministic strided sample (:func:`sample_stride`) brackets the wanted
    value between two sample quantiles, each six standard deviations (of its rank in the sample)
    away from the expected one. ``kthvalue`` then runs on the scores inside the bracket only, a
    few percent of them, whatever ``k`` is: the global prune of GraNet keeps most of the active
    weights, and a one-sided bound would leave almost all of them to search. If the value is not
    inside (the sample was unlucky, or a bound is NaN), it runs on all the scores. Either way the
    result is exact.
    """
    n = flat.numel()
    rank = n - k + 1 if largest else k  # the k-th largest is the (n - k + 1)-th smallest
    if n <= 4 * _SAMPLE_MIN:
        return _kthvalue(flat, rank)
    sample = flat[:: sample_stride(n)]
    m = sample.numel()
    want = rank * m / n  # the expected rank of the wanted value in the sample
    margin = 6 * math.sqrt(want * (1 - want / m)) + 16
    lo_rank, hi_rank = max(1, math.floor(want - margin)), min(m, math.ceil(want + margin))
    lo = _kthvalue(sample, lo_rank)
    hi = _kthvalue(sample, hi_rank)
    below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < rank <= below + inside.numel():  # the value lies in [lo, hi]
        return _kthvalue(inside, rank - below)
    return _kthvalue(flat, rank)


def _select(scores: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` smallest (or largest) of a plain tensor, by the rule.

    One ``kthvalue`` finds the threshold; the strictly better scores are all taken, and the
    remaining ``room`` units go to the tied scores in index order (``nonzero`` lists them in
    order). Four passes over the scores, no sort and no full-size index or cumulative-sum tensor.

    ``kthvalue`` ranks NaN above ``+inf``; that order gives the rule's mask whenever the
    threshold is a number better than the worst infinity and the tied scores fill the room. In
    the other cases (NaN scores that the count reaches or that displaced the threshold, or a
    threshold at the worst infinity, where NaN ties with it) the scores are taken again with NaN
    replaced by the worst infinity: one more pass, only then.
    """
    flat = comparable(scores.reshape(-1))
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"Expected 0 <= k <= {n}, but got k={k}")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    worst = -math.inf if largest else math.inf
    out = _threshold_select(flat, k, largest, worst)
    if out is None:
        out = _threshold_select(torch.where(torch.isnan(flat), worst, flat), k, largest, None)
    return out.view_as(scores)


def _threshold_select(flat: Tensor, k: int, largest: bool, worst: float | None) -> Tensor | None:
    """The mask of the ``k`` best of ``flat`` at the ``kthvalue`` threshold; ``None`` when NaN
    may have mattered (``worst`` given: the worst infinity, whose ties with NaN need the rule)."""
    kth = _kth_value(flat, k, largest)
    if worst is not None:
        value = float(kth)
        if math.isnan(value) or value == worst:
            return None
    out = flat > kth if largest else flat < kth
    room = k - int(torch.count_nonzero(out))
    if room:
        tied = (flat == kth).nonzero().reshape(-1)
        if tied.numel() < room:  # NaN ranked above the threshold by kthvalue: not the rule's
            return None
        out[tied[:room]] = True
    return out


def largest_per_unit(
    scores: Tensor, count: Tensor | int, candidates: Tensor | None = None
) -> Tensor:
    """Bool mask of the ``count`` largest entries of each row (a unit) of a 2-D ``scores``, among
    ``candidates`` if given, by the rule (ties to the lowest column).

    ``count`` is an int or a per-row int tensor, at most the number of candidates of its row.
    One ``topk`` of the largest count finds each row's threshold (the ``count``-th largest);
    everything above it is taken, and ties at it fill the rest in column order. No sort: this is
    O(length) per row, against O(length log length) for a stable sort.
    """
    units = scores.shape[0]
    need = (
        torch.full((units, 1), count, device=scores.device)
        if isinstance(count, int)
        else count.reshape(units, 1)
    )
    kmax = count if isinstance(count, int) else (int(count.max()) if units else 0)
    if kmax == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    scores = comparable(scores)
    drop = torch.isnan(scores) if candidates is None else torch.isnan(scores) | ~candidates
    scores = torch.where(drop, -math.inf, scores)  # NaN and non-candidates rank with -inf
    top = torch.topk(scores, kmax, dim=1, sorted=True).values
    threshold = top.gather(1, (need - 1).clamp(min=0))
    better = scores > threshold  # a non-candidate (-inf) is never above
    tied = scores == threshold
    if candidates is not None:
        tied &= candidates
    room = need - better.sum(1, keepdim=True)
    return better | (tied & (torch.cumsum(tied, 1, dtype=torch.int32) <= room))
