"""DTensor parameters (FSDP2's ``fully_shard``): the one place that knows a tensor may be sharded.

A sparse parameter that is a ``DTensor`` gets a mask that is a bool ``DTensor`` with the same mesh
and placements: every rank holds the mask of its own shard. Everything here gives, on the shards,
exactly what the single-process code gives on the full tensor:

- Initial masks and SET's random scores are drawn full-size from the optimizer's generator on
  every rank (the same numbers everywhere), and each rank keeps its chunk (:func:`shard_like`);
  this costs one full-size temporary per layer on the CPU, freed at once.
- Top-k selections (:func:`sharded_smallest`, :func:`sharded_largest_across`) give the mask
  that ``sparseopt._select`` gives on the full tensor, by its one rule (ties to the lowest global
  flat index, ``-0.0`` equal to ``0.0``, NaN the worst score). They find the k-th score across the
  shards by a radix select on order-preserving integer keys: per 8-bit digit, one all-reduce of a
  256-bin histogram (4 rounds for float32 scores, 8 for float64, fewer when the k-th value is
  isolated early). Exact ties at the k-th value go to the lower shard coordinate first (one small
  all-gather, only when ties straddle the threshold). No full tensor is gathered.
- Counts and finiteness checks reduce across the shards (:func:`count_true`, :func:`all_finite`).

Supported layouts: placements that shard dim 0 over one mesh dimension and replicate over the
others (``fully_shard``, and HSDP's ``(Replicate(), Shard(0))``), or replicate everywhere. A
DTensor's ``.sum().item()`` returns only the local shard's sum, so code outside this module never
reads a count from a DTensor directly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _select

try:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
except (ImportError, RuntimeError):  # a torch build without distributed support
    DTensor = FSDPModule = None  # type: ignore[assignment,misc]

__all__: list[str] = []

# For ``isinstance`` on hot paths: no function call, and ``()`` matches nothing.
DTENSOR_TYPES: tuple[type, ...] = () if DTensor is None else (DTensor,)


class _Layout(NamedTuple):
    """Where a DTensor's local shard sits: ``coord`` of ``shards`` along ``mesh_dim``."""

    mesh_dim: int | None  # None: replicated everywhere
    coord: int
    shards: int


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTENSOR_TYPES)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view of its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _layout(t: Tensor, name: str = "tensor") -> _Layout:
    placements = t.placements
    shard = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not shard:
        return _Layout(None, 0, 1)
    dim = shard[0]
    if len(shard) > 1 or type(placements[dim]) is not Shard or not placements[dim].is_shard(0):
        raise ValueError(
            f"Expected {name} to be a DTensor sharded on dim 0 over one mesh dimension and "
            f"replicated over the others (FSDP2's fully_shard), but got placements {placements}"
        )
    mesh = t.device_mesh
    return _Layout(dim, mesh.get_local_rank(dim), mesh.size(dim))


def check_placements(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``t`` is a DTensor of an unsupported layout."""
    if is_dtensor(t):
        _layout(t, name)


def shard_of(t: Tensor) -> tuple[int, int] | None:
    """``(coordinate, number of shards)`` of a sharded DTensor; ``None`` for anything else."""
    if not is_dtensor(t):
        return None
    layout = _layout(t)
    return None if layout.mesh_dim is None else (layout.coord, layout.shards)


def _group(t: Tensor) -> Any:
    layout = _layout(t)
    return None if layout.mesh_dim is None else t.device_mesh.get_group(layout.mesh_dim)


def _wrap(local_tensor: Tensor, ref: Tensor) -> Tensor:
    """``local_tensor`` (this rank's shard) as a DTensor laid out like ``ref``."""
    if tuple(local_tensor.shape) != tuple(ref.to_local().shape):
        raise ValueError(
            f"a local shard of shape {tuple(local_tensor.shape)} does not fit this rank's shard "
            f"{tuple(ref.to_local().shape)} of a tensor of shape {tuple(ref.shape)}: a sharded "
            "state saved with torch.save loads only on the rank that saved it"
        )
    mesh, placements = ref.device_mesh, ref.placements
    return DTensor.from_local(
        local_tensor, mesh, placements, run_check=False, shape=ref.shape, stride=ref.stride()
    )


def shard_like(full: Tensor, ref: Tensor) -> Tensor:
    """A full-size tensor laid out like ``ref``: on ``ref``'s device, this rank's chunk if sharded.

    The chunk follows ``torch.chunk`` along dim 0, which is how ``Shard(0)`` (and FSDP2) split a
    tensor; only the chunk is moved to the device.
    """
    if not is_dtensor(ref):
        return full.to(ref.device)
    layout = _layout(ref)
    piece = full
    if layout.mesh_dim is not None:
        chunks = torch.chunk(full, layout.shards, dim=0)
        empty = full.new_empty((0, *full.shape[1:]))
        piece = chunks[layout.coord] if layout.coord < len(chunks) else empty
    return _wrap(piece.to(ref.to_local().device, copy=True).contiguous(), ref)


def load_like(saved: Tensor, ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A copy of a checkpointed tensor laid out like ``ref`` (the live parameter).

    A plain ``ref`` takes a plain tensor; a DTensor ``ref`` takes a DTensor of the same global
    shape, mesh shape and placements, whose local shard has this rank's shard shape (what
    ``torch.load`` of this rank's own file, or ``torch.distributed.checkpoint.load``, gives).

    Raises:
        ValueError: for anything else, naming both layouts.
    """
    if is_dtensor(saved) != is_dtensor(ref):
        kinds = ("a plain tensor", "a DTensor")
        raise ValueError(
            f"Expected {kinds[is_dtensor(ref)]} of shape {tuple(ref.shape)} for this "
            f"{'DTensor' if is_dtensor(ref) else 'plain'} parameter, but the state dict holds "
            f"{kinds[is_dtensor(saved)]} of shape {tuple(saved.shape)}: a state dict saved with "
            "FSDP2 loads only under FSDP2, and one saved without it only without it"
        )
    if not is_dtensor(ref):
        return saved.to(device=ref.device, dtype=dtype, copy=True)
    if (saved.shape, saved.placements, saved.device_mesh.shape) != (
        ref.shape,
        ref.placements,
        ref.device_mesh.shape,
    ):
        raise ValueError(
            f"Expected a DTensor of shape {tuple(ref.shape)} with placements {ref.placements} on "
            f"a mesh of shape {tuple(ref.device_mesh.shape)}, but the state dict holds one of "
            f"shape {tuple(saved.shape)} with placements {saved.placements} on a mesh of shape "
            f"{tuple(saved.device_mesh.shape)}"
        )
    return _wrap(saved.to_local().to(device=ref.to_local().device, dtype=dtype, copy=True), ref)


def reshard(model: torch.nn.Module | None) -> None:
    """Free the unsharded parameters of every FSDP2 module of ``model``.

    A forward pass that is not followed by a backward (evaluation) leaves modules built with
    ``reshard_after_forward=False`` (the root, by default) unsharded, and the next forward reuses
    those copies. After writing into the sharded parameters outside ``step()`` (superposed
    weights, masks), resharding makes the next forward all-gather what was written.
    """
    if model is None or FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# --- reductions across shards ----------------------------------------------------------------
def _reduce_groups(tensors: Sequence[Tensor]) -> dict[Any, list[int]]:
    """Positions of the sharded tensors, by the process group that holds their shards."""
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t):
            group = _group(t)
            if group is not None:
                groups.setdefault(group, []).append(i)
    return groups


def _reduced(values: list[Tensor], tensors: Sequence[Tensor], op: Any) -> list[Tensor]:
    """``values[i]`` (a scalar of ``tensors[i]``'s shard) reduced over ``tensors[i]``'s shards."""
    for group, positions in _reduce_groups(tensors).items():
        stacked = torch.stack([values[i] for i in positions])
        dist.all_reduce(stacked, op=op, group=group)
        for i, v in zip(positions, stacked, strict=True):
            values[i] = v
    return values


def count_true(masks: Sequence[Tensor]) -> list[int]:
    """The number of ``True`` in each mask, over all its shards: one sync, one all-reduce."""
    if not masks:
        return []
    sums = [local(m).sum() for m in masks]
    if DTensor is not None:
        sums = _reduced(sums, masks, dist.ReduceOp.SUM)
    device = sums[0].device
    return torch.stack([s.to(device) for s in sums]).tolist()


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor, on every shard, is finite."""
    if not tensors:
        return True
    flags = [torch.isfinite(local(t)).all().to(torch.int32) for t in tensors]
    if DTensor is not None:
        flags = _reduced(flags, tensors, dist.ReduceOp.MIN)
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())


# --- exact top-k across shards ---------------------------------------------------------------
def _keys(x: Tensor) -> Tensor:
    """Integer keys with the order of the float values (``-0.0`` and ``0.0`` equal)."""
    x = torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=x.device), x)
    itype = torch.int32 if x.dtype == torch.float32 else torch.int64
    bits = x.view(itype)
    return bits ^ ((bits >> (8 * bits.element_size() - 1)) & torch.iinfo(itype).max)


def _radix_select(keys: list[Tensor], k: int, group: Any, coord: int, shards: int) -> list[Tensor]:
    """Masks of the ``k`` smallest keys over ``keys`` (this rank's shards of some flat tensors,
    concatenated in list order), ties to the lowest global index; ``0 < k < total``."""
    width = 8 * keys[0].element_size()
    device = keys[0].device
    sel = [torch.zeros_like(key, dtype=torch.bool) for key in keys]
    cand = [torch.ones_like(key, dtype=torch.bool) for key in keys]
    remaining = k
    for shift in range(width - 8, -1, -8):
        digits = [((key >> shift) & 0xFF).to(torch.uint8) for key in keys]
        if shift == width - 8:  # the sign byte: negative keys first
            digits = [d ^ 0x80 for d in digits]
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for d, c in zip(digits, cand, strict=True):
            hist += torch.bincount(d[c], minlength=256)
        dist.all_reduce(hist, group=group)
        cum = hist.cumsum(0).tolist()
        b = bisect.bisect_left(cum, remaining)
        lower = cum[b - 1] if b else 0
        remaining -= lower
        for i, (d, c) in enumerate(zip(digits, cand, strict=True)):
            sel[i] |= c & (d < b)
            cand[i] = c & (d == b)
        if cum[b] - lower == remaining:  # every candidate left is taken
            return [s | c for s, c in zip(sel, cand, strict=True)]
    # Exact ties at the k-th key: ``remaining`` of them, in (tensor, coordinate, index) order.
    mine = torch.tensor([coord] + [int(c.sum()) for c in cand], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(shards)]
    dist.all_gather(table, mine, group=group)
    ties = torch.zeros(shards, len(keys), dtype=torch.int64, device="cpu")  # read on the host
    for row in table:
        ties[int(row[0])] = row[1:].cpu()
    before = (ties.sum(0).cumsum(0) - ties.sum(0)) + ties[:coord].sum(0)
    return [
        s | (c & (torch.cumsum(c, 0) + int(b0) <= remaining))
        for s, c, b0 in zip(sel, cand, before.tolist(), strict=True)
    ]


def _smallest_of(
    scores: Sequence[Tensor], k: int, dtype: torch.dtype, negate: bool
) -> list[Tensor]:
    """Shared body of the two selections: ``scores`` are DTensors of one layout."""
    layout = _layout(scores[0], "scores")
    for s in scores[1:]:
        if _layout(s, "scores") != layout or s.device_mesh != scores[0].device_mesh:
            raise ValueError(
                "Expected the score tensors of one selection to share a mesh and placements, but "
                f"got {scores[0].placements} on {scores[0].device_mesh} and {s.placements} on "
                f"{s.device_mesh}"
            )
    n = sum(s.numel() for s in scores)
    if not 0 <= k <= n:
        raise ValueError(f"Expected 0 <= k <= {n}, but got k={k}")
    flats = []
    for s in scores:
        x = _select.comparable(local(s).detach().reshape(-1).to(dtype))
        x = -x if negate else x
        flats.append(torch.where(torch.isnan(x), math.inf, x))  # NaN: the worst, as _select
    if k in (0, n):
        picked = [torch.full_like(x, k == n, dtype=torch.bool) for x in flats]
    elif layout.mesh_dim is None:  # replicated: every rank has everything, no communication
        whole = _select.smallest(torch.cat(flats), k)
        picked = list(torch.split(whole, [x.numel() for x in flats]))
    else:
        group = scores[0].device_mesh.get_group(layout.mesh_dim)
        picked = _radix_select([_keys(x) for x in flats], k, group, layout.coord, layout.shards)
    return [_wrap(m.view(local(s).shape), s) for m, s in zip(picked, scores, strict=True)]


def sharded_smallest(scores: Tensor, k: int) -> Tensor:
    """The mask :func:`sparseopt._select.smallest` gives on the full tensor, for a DTensor of
    scores, sharded like it."""
    return _smallest_of([scores], k, scores.dtype, negate=False)[0]


def sharded_largest(scores: Tensor, k: int) -> Tensor:
    """The mask :func:`sparseopt._select.largest` gives on the full tensor, for a DTensor of
    scores, sharded like it."""
    return _smallest_of([scores], k, scores.dtype, negate=True)[0]


def sharded_largest_across(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """The masks :func:`sparseopt._select.largest` gives on the concatenation of the full
    tensors (the earlier tensor first on ties), for DTensors of one layout."""
    if not all(is_dtensor(s) for s in scores):
        raise ValueError(
            "Expected the score tensors of a global selection to be all DTensors or all plain "
            "tensors, but got a mix: fully_shard every module that holds a sparse parameter"
        )
    dtype = scores[0].dtype
    for s in scores[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return _smallest_of(scores, k, dtype, negate=True)
