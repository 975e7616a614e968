"""Mask primitives: exact top-k selection, random masks, drop-and-grow, foreach masking.

Every selection follows the one rule of ``sparseopt._select`` (exact counts; ties to the lowest
index, the earlier tensor first across tensors; ``-0.0`` equal to ``0.0``; NaN the worst score,
taken last), so the same inputs give the same mask on every rank and every run, independent of
how a top-k kernel orders equal values. Selection is O(N) (one ``kthvalue`` and a few elementwise
passes); nothing is sorted. Under a structure (``sparseopt.structure``) the selections keep it:
[`select_largest_within`][sparseopt.masks.select_largest_within] and
[`exchange`][sparseopt.masks.exchange] call the structure's ``select`` and ``exchange``.

Every function also takes DTensors (FSDP2's sharded parameters, see ``docs/distributed.md``): a
selection over DTensor scores returns the same mask as over the full tensor, sharded like the
scores, and computed across the shards without gathering them (``sparseopt._dtensor``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import _compat, _dtensor, _select, _validate
from ._dtensor import DTENSOR_TYPES
from .structure import Structure, parse_structure

__all__ = [
    "apply_masks_",
    "count_active",
    "drop_and_grow",
    "exchange",
    "group_by_device_and_dtype",
    "random_mask",
    "select_largest",
    "select_largest_across",
    "select_largest_within",
    "select_smallest",
]


def _select_k(scores: Tensor, k: int, largest: bool) -> Tensor:
    k = _validate.integer("k", k)
    if _dtensor.is_dtensor(scores):
        pick = _dtensor.sharded_largest if largest else _dtensor.sharded_smallest
    else:
        pick = _select.largest if largest else _select.smallest
    return pick(scores, k)


def select_smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask (shape of ``scores``) of the ``k`` smallest scores, ties to the lowest index.

    ``+inf`` (and NaN, which ranks with it) is selected only when ``k`` exceeds the number of
    finite scores; low-precision dtypes are compared in float32.

    Args:
        scores (Tensor): any shape and real dtype; a DTensor gives a DTensor sharded like it.
        k (int): how many to select, in ``[0, scores.numel()]``.

    Returns:
        A bool tensor of ``scores``' shape with exactly ``k`` ones.

    Raises:
        TypeError: if ``k`` is not an int.
        ValueError: if ``k`` is outside ``[0, scores.numel()]``.

    Examples:
        The two 1s tie; both fit:

        >>> import torch
        >>> select_smallest(torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0]), 2)
        tensor([False,  True, False,  True, False])
    """
    return _select_k(scores, k, largest=False)


def select_largest(scores: Tensor, k: int) -> Tensor:
    """[`select_smallest`][sparseopt.masks.select_smallest] in the other direction: the ``k``
    largest scores, ties to the lowest index, ``-inf`` and NaN taken last.

    Args:
        scores (Tensor): as for ``select_smallest``.
        k (int): as for ``select_smallest``.

    Returns:
        A bool tensor of ``scores``' shape with exactly ``k`` ones (errors as for
        ``select_smallest``).

    Examples:
        >>> import torch
        >>> select_largest(torch.tensor([3.0, float("nan"), 2.0, 1.0, 5.0]), 2)
        tensor([ True, False, False, False,  True])
    """
    return _select_k(scores, k, largest=True)


def select_largest_across(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Bool masks of the ``k`` largest scores over all tensors together (global top-k).

    Ties go to the lowest index in the concatenation, i.e. the earlier tensor first. Each mask
    comes back on its score's device.

    Args:
        scores (Sequence[Tensor]): one score tensor per layer, any shapes.
        k (int): how many to select over all of them together.

    Returns:
        One bool mask per tensor, of its shape; the masks hold ``k`` ones in all.

    Raises:
        TypeError: if ``k`` is not an int.
        ValueError: if ``k`` exceeds the total number of scores or is negative.

    Examples:
        The two 4s tie, and the earlier tensor's comes first:

        >>> import torch
        >>> a, b = select_largest_across([torch.tensor([1.0, 4.0]),
        ...                               torch.tensor([[3.0, 2.0], [4.0, 0.0]])], 3)
        >>> a, b
        (tensor([False,  True]), tensor([[ True, False],
                [ True, False]]))
    """
    k = _validate.integer("k", k)
    if len(scores) == 0:  # nothing to select from: only k = 0 fits
        if k:
            raise ValueError(f"Expected 0 <= k <= 0 (no scores), but got k={k}")
        return []
    if any(_dtensor.is_dtensor(s) for s in scores):
        return _dtensor.sharded_largest_across(scores, k)
    device = scores[0].device
    keep = select_largest(torch.cat([s.detach().reshape(-1).to(device) for s in scores]), k)
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].view_as(s).to(s.device))
        start += s.numel()
    return out


def count_active(masks: Sequence[Tensor]) -> list[int]:
    """The number of ``True`` entries of each mask, as ints, with one device sync.

    For a DTensor mask this is the count over all its shards (one all-reduce for all of them);
    a DTensor's own ``mask.sum().item()`` gives only the local shard's count.

    Args:
        masks (Sequence[Tensor]): bool masks, plain tensors or DTensors.

    Returns:
        One int per mask.

    Examples:
        >>> import torch
        >>> count_active([torch.tensor([True, False, True]), torch.zeros(2, 2, dtype=torch.bool)])
        [2, 0]
    """
    return _dtensor.count_true(masks)


def random_mask(shape: Sequence[int], count: int, generator: torch.Generator) -> Tensor:
    """A CPU bool mask of ``shape`` with exactly ``count`` ones at uniformly random positions.

    Args:
        shape (Sequence[int]): the mask's shape.
        count (int): the number of ones, in ``[0, prod(shape)]``.
        generator (torch.Generator): a CPU generator; the same state gives the same mask.

    Returns:
        A bool tensor on the CPU.

    Raises:
        TypeError: if ``shape`` is not a sequence of ints, ``count`` is not an int, or
            ``generator`` is not a CPU ``torch.Generator``.
        ValueError: if ``count`` is outside ``[0, prod(shape)]``.

    Examples:
        >>> import torch
        >>> mask = random_mask((2, 3), 2, torch.Generator().manual_seed(0))
        >>> int(mask.sum()), mask.shape
        (2, torch.Size([2, 3]))
    """
    shape = _validate.shape("shape", shape)
    count = _validate.integer("count", count)
    _validate.cpu_generator("generator", generator)
    n = 1
    for s in shape:
        n *= s
    if not 0 <= count <= n:
        raise ValueError(f"Expected 0 <= count <= {n}, but got count={count}")
    mask = torch.zeros(n, dtype=torch.bool, device="cpu")
    mask[torch.randperm(n, generator=generator, device="cpu")[:count]] = True
    return mask.view(tuple(shape))


def drop_and_grow(
    mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One prune-and-regrow exchange of ``k`` connections, keeping the count exact.

    Drops the ``k`` active connections with the smallest ``drop_scores``, then grows the ``k``
    connections with the largest ``grow_scores`` among all inactive ones, the just-dropped ones
    included (a connection dropped and grown again keeps its value, as in RigL).

    Args:
        mask (Tensor): the current bool mask.
        drop_scores (Tensor): scores of ``mask``'s shape; only active positions are considered.
        grow_scores (Tensor): scores of ``mask``'s shape; the kept connections are excluded.
        k (int): the number of connections to exchange, at most the active count.

    Returns:
        ``(new_mask, dropped, grown)``: ``dropped`` are connections active before and inactive
        after, ``grown`` the ones inactive before and active after. Both have ``k`` or fewer ones.

    Raises:
        TypeError: if ``k`` is not an int.
        ValueError: if ``k`` is negative or exceeds the number of positions.

    Examples:
        Drop the smallest ``|w|`` of three active weights (-0.1), grow the largest gradient:

        >>> import torch
        >>> mask = torch.tensor([True, True, True, False, False, False])
        >>> w = torch.tensor([0.5, -0.1, 0.9, 0.0, 0.0, 0.0])
        >>> grad = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.8, 0.1])
        >>> new, dropped, grown = drop_and_grow(mask, w.abs(), grad.abs(), 1)
        >>> new.nonzero().flatten().tolist(), dropped.nonzero().flatten().tolist()
        ([0, 2, 4], [1])
    """
    k = _validate.integer("k", k)
    if k == 0:
        empty = torch.zeros_like(mask)
        return mask.clone(), empty, empty
    inf = torch.tensor(float("inf"), dtype=drop_scores.dtype, device=drop_scores.device)
    drop = select_smallest(torch.where(mask, drop_scores, inf), k)
    kept = mask & ~drop
    grow = select_largest(torch.where(kept, -inf.to(grow_scores.dtype), grow_scores), k)
    new = kept | grow
    return new, mask & ~new, new & ~mask


def group_by_device_and_dtype(
    tensors: Iterable[Tensor], masks: Iterable[Tensor]
) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]:
    """Group ``(tensor, mask)`` pairs by the tensor's device and dtype, for foreach kernels.

    DTensors come back as their local shards (views of the same storage), with their masks'.

    Args:
        tensors (Iterable[Tensor]): the tensors.
        masks (Iterable[Tensor]): one mask per tensor.

    Returns:
        ``{(device, dtype): (tensors, masks)}``, each pair of lists in input order.

    Examples:
        >>> import torch
        >>> groups = group_by_device_and_dtype(
        ...     [torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(1)],
        ...     [torch.ones(3, dtype=torch.bool)] * 3)
        >>> {dtype: len(ts) for (device, dtype), (ts, ms) in groups.items()}
        {torch.float32: 2, torch.float64: 1}
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]
    groups = defaultdict(lambda: ([], []))
    for t, m in zip(tensors, masks, strict=True):
        if type(t) is not Tensor and isinstance(t, DTENSOR_TYPES):  # plain tensors: one `is`
            t, m = t.to_local(), _dtensor.local(m)
        ts, ms = groups[(t.device, t.dtype)]
        ts.append(t)
        ms.append(m)
    return groups


def apply_masks_(
    tensors: Sequence[Tensor], masks: Sequence[Tensor], nan_safe: bool = False
) -> None:
    """``t *= mask`` for every pair, with one foreach kernel per device and dtype.

    Bool masks are multiplied through a ``uint8`` view of the same storage: no copy, one byte
    read per element. A mask of the tensor's own dtype (0 and 1) is multiplied as it is, with
    bit-identical results: on CPU that runs at the memory-bandwidth floor, about twice as fast as
    the ``uint8`` view, whose mixed-dtype product takes torch's casting loop
    (``benchmarks/sparse_training.py``, mask-pass table), for 4 bytes per element instead of 1.
    A product leaves ``0 * nan = nan``; with ``nan_safe=True`` the masked positions become 0
    whatever they held (``torch.where``, slower; used on steps known to carry non-finite values).

    Args:
        tensors (Sequence[Tensor]): masked in place.
        masks (Sequence[Tensor]): one mask per tensor, of its shape and device: bool, or 0/1 of
            the tensor's dtype.
        nan_safe (bool): write exact zeros even where a tensor holds NaN or inf. Default: False.

    Raises:
        TypeError: if ``nan_safe`` is not a bool.

    Examples:
        >>> import torch
        >>> x = torch.tensor([1.0, float("nan"), 2.0])
        >>> keep = torch.tensor([True, False, True])
        >>> apply_masks_([x], [keep]); x
        tensor([1., nan, 2.])
        >>> apply_masks_([x], [keep], nan_safe=True); x
        tensor([1., 0., 2.])
        >>> y = torch.tensor([3.0, -4.0])
        >>> apply_masks_([y], [torch.tensor([0.0, 1.0])]); y
        tensor([ 0., -4.])
    """
    if not tensors:
        return
    if _validate.boolean("nan_safe", nan_safe):
        for t, m in zip(tensors, masks, strict=True):
            keep = m if m.dtype == torch.bool else m != 0
            t.copy_(torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)))
        return
    for ts, ms in group_by_device_and_dtype(tensors, masks).values():
        dtype = ts[0].dtype
        _compat.foreach_mul_(ts, [m if m.dtype == dtype else m.view(torch.uint8) for m in ms])


def select_largest_within(scores: Tensor, count: int, structure: Structure | None) -> Tensor:
    """The ``count`` largest ``scores`` of one layer, kept in ``structure`` if there is one.

    Without a structure this is [`select_largest`][sparseopt.masks.select_largest]; with one,
    [`Structure.select`][sparseopt.structure.Structure.select]: under ``N:M`` the top ``N`` of
    every group (``count`` is then ``numel * N / M``); under ``"fan_in"`` the top
    ``count / rows`` of every row. Ties go to the lowest index.

    Args:
        scores (Tensor): one layer's scores.
        count (int): how many to select (a multiple of the rows under ``"fan_in"``).
        structure (str | Structure | None): a structure or its name
            ([`parse_structure`][sparseopt.structure.parse_structure]).

    Returns:
        A bool mask of ``scores``' shape with ``count`` ones.

    Raises:
        TypeError: if ``count`` is not an int or ``structure`` is not a structure.
        ValueError: if ``count`` is out of range or does not fit the structure.

    Examples:
        >>> import torch
        >>> from sparseopt.structure import parse_structure
        >>> scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
        >>> select_largest_within(scores, 4, None).int().tolist()
        [[1, 1, 0, 0], [0, 0, 1, 1]]
        >>> select_largest_within(scores, 4, parse_structure("1:2")).int().tolist()
        [[1, 0, 1, 0], [0, 1, 0, 1]]
    """
    count = _validate.integer("count", count)
    structure = parse_structure(structure)
    if structure is None:
        return select_largest(scores, count)
    return structure.select(scores, count)


def exchange(
    mask: Tensor,
    drop_scores: Tensor,
    grow_scores: Tensor,
    k: int,
    structure: Structure | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Drop ``k`` and grow ``k`` in one layer, inside the structure if there is one.

    Without a structure this is [`drop_and_grow`][sparseopt.masks.drop_and_grow]; with one,
    [`Structure.exchange`][sparseopt.structure.Structure.exchange]: the ``k`` smallest active
    ``drop_scores`` of the layer go, and each unit (an ``N:M`` group, a fan-in row) regrows as
    many as it lost from its own inactive positions, so every unit keeps its count.

    Args:
        mask (Tensor): the current bool mask.
        drop_scores (Tensor): drop scores, the mask's shape.
        grow_scores (Tensor): grow scores, the mask's shape.
        k (int): connections to exchange.
        structure (str | Structure | None): the layer's structure (or its name).

    Returns:
        ``(new_mask, dropped, grown)``.

    Raises:
        TypeError: if ``k`` is not an int or ``structure`` is not a structure.
        ValueError: if ``k`` is out of range.

    Examples:
        >>> import torch
        >>> from sparseopt.structure import parse_structure
        >>> mask = torch.tensor([[True, False, True, False]])
        >>> w, g = torch.tensor([[0.1, 0.0, 0.9, 0.0]]), torch.tensor([[0.0, 0.2, 0.0, 0.7]])
        >>> exchange(mask, w.abs(), g.abs(), 1, None)[0].int().tolist()
        [[0, 0, 1, 1]]
        >>> exchange(mask, w.abs(), g.abs(), 1, parse_structure("1:2"))[0].int().tolist()
        [[0, 1, 1, 0]]
    """
    k = _validate.integer("k", k)
    structure = parse_structure(structure)
    if structure is None:
        return drop_and_grow(mask, drop_scores, grow_scores, k)
    return structure.exchange(mask, drop_scores, grow_scores, k)
