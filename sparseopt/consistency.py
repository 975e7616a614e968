"""Consistency across ranks: cheap fingerprints of the masks, the superposed copy and the
generator, gathered and compared (``SparseOptimizer.check_consistency``).

Formerly ``sparseopt.distributed``; that name still imports, with a ``DeprecationWarning``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import _dtensor
from .engine import MaskEngine
from .superposition import Superposition

__all__ = ["check_consistency", "digests"]

Digest = tuple[str, tuple[int, int] | None, list[float], list[float]]


def digests(engine: MaskEngine, sup: Superposition | None) -> list[Digest]:
    """Cheap per-layer fingerprints ``(name, shard, agreed, local)``.

    ``agreed`` must be equal on every rank: for a plain tensor the count, the mask's count and
    index sums, and sums of the superposed copy; for a sharded one (FSDP2) only the global count.
    ``local`` holds the same sums over a shard (``shard`` = its coordinate and the number of
    shards), which must agree between replicas of that shard, and whose counts must add up to
    the global count.
    """
    out = []
    for layer in engine.layers:
        mask = _dtensor.local(layer.mask)
        idx = mask.reshape(-1).nonzero().reshape(-1).to(torch.float64)
        digest = [float(mask.sum()), float(idx.sum()), float(idx.square().sum())]
        if sup is not None:
            v = _dtensor.local(sup.params[layer.index]).detach().reshape(-1).to(torch.float64)
            weights = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
            digest += [float(v.sum()), float((v * weights).sum())]
        shard = _dtensor.shard_of(layer.mask)
        if shard is None:
            out.append((layer.name, None, [float(layer.count), *digest], []))
        else:
            out.append((layer.name, shard, [float(layer.count)], digest))
    state = engine.generator.get_state().to(torch.float64)  # a CPU generator: on the CPU
    weights = torch.arange(1, state.numel() + 1, dtype=torch.float64, device=state.device)
    weighted = float((state * weights).sum())
    out.append(("generator", None, [float(state.sum()), weighted], []))
    tickets = 0 if sup is None else sup.tickets
    out.append(("step/tickets", None, [float(engine.step), float(tickets)], []))
    return out


def check_consistency(engine: MaskEngine, sup: Superposition | None, group: Any = None) -> None:
    """Gather the fingerprints of every rank of ``group`` and raise on the first difference.

    Without an initialized process group it does nothing.

    Raises:
        RuntimeError: naming the first layer and ranks that differ.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = digests(engine, sup)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        for (name, _, ref, _), (_, _, other, _) in zip(gathered[0], theirs, strict=True):
            if ref != other:
                raise RuntimeError(
                    f"SparseOptimizer state differs between rank 0 and rank {rank} at "
                    f"{name}: {ref} vs {other}"
                )
    for i, (name, shard, agreed, _) in enumerate(gathered[0]):
        if shard is None:
            continue
        holders: dict[int, tuple[int, list[float]]] = {}
        for rank, theirs in enumerate(gathered):
            (coord, _), digest = theirs[i][1], theirs[i][3]
            first = holders.setdefault(coord, (rank, digest))
            if first[1] != digest:
                raise RuntimeError(
                    f"SparseOptimizer state differs between rank {first[0]} and rank {rank}, "
                    f"replicas of shard {coord} of {name}: {first[1]} vs {digest}"
                )
        total = sum(digest[0] for _, digest in holders.values())
        if len(holders) == shard[1] and total != agreed[0]:
            raise RuntimeError(
                f"the {shard[1]} shards of {name} hold {int(total)} active weights, but the "
                f"optimizer counts {int(agreed[0])}"
            )
