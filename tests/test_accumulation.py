"""Gradient accumulation: an update scores the gradient accumulated up to its ``step()``.

RigL, GraNet and SNIP read their scores from ``p.grad`` inside ``step()``, before it is masked.
After ``A`` micro-batches of mean losses scaled by ``1/A``, ``p.grad`` is the gradient of the
mean loss over the concatenated batch, so the topology update is the one a single step on the
whole batch makes. Under DDP with ``no_sync()`` on all but the last micro-batch, the last
backward all-reduces the accumulated gradient, which is again the gradient of the mean over
every rank's micro-batches.

The single-process tests run on ``--device``. The DDP ranks run on NCCL, one on ``cuda:0`` and
one on ``cuda:1``, with ``--device cuda`` and two GPUs, and their single-process reference on
``cuda:0``; otherwise (the CPU, or one GPU) all of it runs on gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F
from cases import mlp
from ranks import rank_device, run_ranks, spawn, to_cpu
from torch import nn

from sparseopt import SparseOptimizer

STEPS, MICRO, BATCH = 4, 2, 8
METHODS = {
    "rigl": {"update_every": 1},
    "granet": {"update_every": 1, "total_steps": 2 * STEPS, "prune_end": 0.5},
    "snip": {},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(device: torch.device) -> nn.Module:
    return mlp(10, 24, 24, 3, seed=0, dtype=torch.float64, device=device)


def _data(device: torch.device, world: int = 1):
    """``STEPS`` batches of ``world * MICRO * BATCH`` examples, drawn on the CPU and moved."""
    gen = torch.Generator().manual_seed(3)
    n = world * MICRO * BATCH
    x = torch.randn(STEPS, n, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, n), generator=gen)
    return x.to(device), y.to(device)


def _opt(model, method):
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return SparseOptimizer(inner, method, 0.8, model=model, seed=0, **METHODS[method])


def _train(method, micro, device):
    """Train ``STEPS`` steps, each on ``micro`` micro-batches accumulated into one step."""
    model = _model(device)
    opt = _opt(model, method)
    xs, ys = _data(device)
    history = []
    for t in range(STEPS):
        opt.zero_grad()
        for xm, ym in zip(xs[t].chunk(micro), ys[t].chunk(micro), strict=True):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        opt.step()
        history.append([layer.mask.clone() for layer in opt.layers])
    return model, opt, history


def _last_micro_batch_only(method, device):
    """The bug the design rules out: scores read from the last micro-batch's gradient alone."""
    model = _model(device)
    opt = _opt(model, method)
    xs, ys = _data(device)
    history = []
    for t in range(STEPS):
        x, y = xs[t].chunk(MICRO)[-1], ys[t].chunk(MICRO)[-1]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        history.append([layer.mask.clone() for layer in opt.layers])
    return history


@pytest.mark.parametrize("method", list(METHODS))
def test_accumulated_micro_batches_give_the_topology_of_one_concatenated_batch(method, device):
    model_a, opt_a, hist_a = _train(method, MICRO, device)
    model_b, opt_b, hist_b = _train(method, 1, device)
    assert opt_a.report()["updates"]["updates"] == opt_b.report()["updates"]["updates"] >= 1
    for step, (ma, mb) in enumerate(zip(hist_a, hist_b, strict=True), 1):
        for a, b in zip(ma, mb, strict=True):
            assert torch.equal(a, b), f"masks differ after step {step}"
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for layer in opt_a.layers:
        assert layer.count == int(layer.mask.sum())
        assert bool((layer.param[~layer.mask] == 0).all())
    # Negative control: the last micro-batch alone gives another topology.
    wrong = _last_micro_batch_only(method, device)
    assert any(
        not torch.equal(a, b) for ma, mw in zip(hist_a, wrong, strict=True)
        for a, b in zip(ma, mw, strict=True)
    )  # fmt: skip


def test_rigl_growth_is_the_top_of_the_accumulated_gradient(device):
    """Independent reference for one update: drop the smallest |w|, grow the largest |g_acc|."""
    model = _model(device)
    opt = _opt(model, "rigl")
    opt.apply_masks()
    x, y = _data(device)[0][0], _data(device)[1][0]
    opt.zero_grad()
    for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
        (F.cross_entropy(model(xm), ym) / MICRO).backward()
    before = [(layer.mask.clone(), layer.param.detach().clone(), layer.param.grad.clone())
              for layer in opt.layers]  # fmt: skip
    opt.step()
    for layer, (mask, w, g) in zip(opt.layers, before, strict=True):
        k = int(0.3 * int(mask.sum()) + 1e-9)  # the first update's rate, cosine from 0.3
        flat_w = torch.where(mask, w.abs(), torch.inf).reshape(-1)
        dropped = set(flat_w.argsort(stable=True)[:k].tolist())
        kept = mask.reshape(-1).clone()
        kept[list(dropped)] = False
        flat_g = torch.where(kept, -torch.inf, g.abs().reshape(-1))
        grown = set((-flat_g).argsort(stable=True)[:k].tolist())
        expected = kept.clone()
        expected[list(grown)] = True
        assert torch.equal(layer.mask.reshape(-1), expected), layer.name


# --- DDP no_sync ----------------------------------------------------------------------------
def _ranks(rank: int, world: int, out: str, device: torch.device) -> None:
    device_ids = [device.index] if device.type == "cuda" else None
    results = {}
    for method in ("rigl", "snip"):
        model = _model(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        opt = _train_ddp(model, ddp, method, rank, world, device)
        opt.check_consistency()
        results[method] = {
            "masks": [layer.mask for layer in opt.layers],
            "params": [p.detach() for p in model.parameters()],
        }
    torch.save(to_cpu(results), f"{out}/rank{rank}.pt")


def _train_ddp(model, ddp, method, rank, world, device):
    opt = _opt(model, method)
    xs, ys = _data(device, world)
    for t in range(STEPS):
        x, y = xs[t].chunk(world)[rank], ys[t].chunk(world)[rank]
        opt.zero_grad()
        for i, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True)):
            # gradients are all-reduced on the last micro-batch only, the one before step()
            with ddp.no_sync() if i < MICRO - 1 else contextlib.nullcontext():
                (F.cross_entropy(ddp(xm), ym) / MICRO).backward()
        opt.step()
    return opt


def test_ddp_no_sync_accumulation_matches_one_process_on_the_whole_batch(
    tmp_path, dist_device_type
):
    run_ranks(__file__, tmp_path, dist_device_type)
    device = rank_device(dist_device_type, 0)  # where rank 0 ran
    for method in ("rigl", "snip"):
        r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)[method]
        r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)[method]
        for a, b in zip(r0["masks"] + r0["params"], r1["masks"] + r1["params"], strict=True):
            assert torch.equal(a, b)
        # one process, the two ranks' micro-batches concatenated into one batch per step
        model = _model(device)
        opt = _opt(model, method)
        xs, ys = _data(device, 2)
        for t in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(model(xs[t]), ys[t]).backward()
            opt.step()
        for mask, layer in zip(r0["masks"], opt.layers, strict=True):
            assert torch.equal(mask, layer.mask.cpu()), method
        for p_ddp, p in zip(r0["params"], model.parameters(), strict=True):
            torch.testing.assert_close(p_ddp, p.detach().cpu(), rtol=1e-10, atol=1e-12)


if __name__ == "__main__":
    spawn(_ranks, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
