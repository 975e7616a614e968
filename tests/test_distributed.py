"""DDP: masks and superposed copies agree on every rank, with no mask broadcast.

Two processes train under DistributedDataParallel with the same ``seed=``; the result must equal
a single-process run on the concatenated batches (DDP averages the gradients of equal halves,
which is the gradient of the mean over the whole batch). With ``--device cuda`` and two GPUs the
ranks run on NCCL, one on ``cuda:0`` and one on ``cuda:1``, and the single-process run on
``cuda:0``; otherwise (the CPU, or one GPU) both are gloo on the CPU, and so is the reference.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cases import mlp
from ranks import rank_device, run_ranks, spawn, to_cpu
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler

STEPS, CYCLE, BATCH = 24, 3, 16


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return mlp(12, 32, 32, 4, device=device)


def _data(device: torch.device):
    """Drawn on the CPU, then moved: the same batches on every device."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 2 * BATCH, 12, generator=gen)
    y = torch.randint(0, 4, (STEPS, 2 * BATCH), generator=gen)
    return x.to(device), y.to(device)


def _train(model, forward, method, shard, device):
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        method,
        0.8,
        update_every=2,
        model=model,
        seed=0,
        **({"prune_end": 0.4} if method == "granet" else {}),
    )
    sched = SupTicketsScheduler(
        opt, STEPS, CYCLE, superpose_fraction=0.3, lr_low=0.01, lr_high=0.05
    )
    xs, ys = _data(device)
    for t in range(STEPS):
        x, y = shard(xs[t]), shard(ys[t])
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if dist.is_initialized() and t % 6 == 5:
            opt.check_consistency()
    return opt


METHODS = ("static", "set", "rigl", "granet", "snip")


def _ranks(rank: int, world: int, out: str, device: torch.device) -> None:
    """One process group for every method (spawning torch processes is the slow part)."""
    device_ids = [device.index] if device.type == "cuda" else None
    results = {}
    for method in METHODS:
        model = _model(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        opt = _train(model, ddp, method, lambda t: t.chunk(world)[rank], device)
        opt.check_consistency()
        results[method] = {
            "masks": [layer.mask for layer in opt.layers],
            "params": [p.detach() for p in model.parameters()],
            "tickets": opt.tickets,
        }
    torch.save(to_cpu(results), f"{out}/rank{rank}.pt")
    # Different seeds give different masks: check_consistency must name the layer.
    model = _model(device)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8,
                          model=model, seed=rank)  # fmt: skip
    try:
        opt.check_consistency()
    except RuntimeError as e:
        torch.save(str(e), f"{out}/error{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, dist_device_type):
    """Spawn the two ranks from a fresh interpreter, isolated from this pytest process."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(__file__, out, dist_device_type)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_ddp_ranks_agree_and_match_a_single_process_run(ddp_results, dist_device_type, method):
    r0 = torch.load(ddp_results / "rank0.pt", weights_only=True)[method]
    r1 = torch.load(ddp_results / "rank1.pt", weights_only=True)[method]
    for a, b in zip(r0["masks"] + r0["params"], r1["masks"] + r1["params"], strict=True):
        assert torch.equal(a, b)
    assert r0["tickets"] == 2

    device = rank_device(dist_device_type, 0)  # where rank 0 ran
    model = _model(device)
    opt = _train(model, model, method, lambda t: t, device)
    for mask, layer in zip(r0["masks"], opt.layers, strict=True):
        assert torch.equal(mask, layer.mask.cpu())
    for p_ddp, p in zip(r0["params"], model.parameters(), strict=True):
        torch.testing.assert_close(p_ddp, p.detach().cpu(), rtol=1e-4, atol=1e-5)


def test_check_consistency_names_the_layer_that_differs(ddp_results):
    for rank in (0, 1):
        message = torch.load(ddp_results / f"error{rank}.pt", weights_only=True)
        assert "rank 0 and rank 1 at 0.weight" in message


if __name__ == "__main__":
    spawn(_ranks, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
