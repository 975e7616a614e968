"""End to end on scikit-learn's bundled digits: RigL at 90% sparsity with Sup-tickets.

An MLP 64 -> 128 -> 64 -> 10 with BatchNorm1d, Adam, a cosine base schedule that ends at
``lr_low``, 300 steps of batch 64, 4 cycles of 15 steps. The ultimate ticket (after
``finalize()``) must hold exactly the ERK counts and test at least as well as the last live ticket,
give or take 2 points.
"""

from __future__ import annotations

import pytest
import torch
from cases import mlp
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from sparseopt import SparseOptimizer, SupTicketsScheduler

datasets = pytest.importorskip("sklearn.datasets")

# ERK at density 0.1, by hand. Weights (128, 64), (64, 128), (10, 64); N = 8192 + 8192 + 640 =
# 17024; raw_l * n_l = sum(shape_l) = 192, 192, 74 (divisor 458); target round(1702.4) = 1702.
# counts 1702.4 * 192 / 458 = 713.67 (twice) and 1702.4 * 74 / 458 = 275.06: floors 713 + 713 +
# 275 = 1701; the missing unit goes to the largest fractional part, the tie to the first layer.
# Layer 3 density 275.06 / 640 = 0.43 < 1, so no layer is capped.
ERK_COUNTS = [714, 713, 275]
N = 17024


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_rigl_suptickets():
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1300], perm[1300:]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]

    def accuracy(model) -> float:
        model.eval()
        with torch.no_grad():
            out = (model(x_test).argmax(1) == y_test).double().mean().item() * 100
        model.train()
        return out

    torch.manual_seed(0)
    model = mlp(64, 128, 64, 10, batchnorm=True)
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = SparseOptimizer(inner, "rigl", 0.9, model=model, update_every=20, seed=0)
    total, cycle = 300, 15
    phase1 = total - 4 * cycle
    base = CosineAnnealingLR(opt, T_max=phase1 - 1, eta_min=0.001)
    sched = SupTicketsScheduler(
        opt, total, cycle, base=base, superpose_fraction=0.2, lr_low=0.001, lr_high=0.005
    )
    assert (sched.num_tickets, sched.phase1_steps) == (4, phase1)
    assert [layer.count for layer in opt.layers] == ERK_COUNTS

    sampler = torch.Generator().manual_seed(1)
    live = []
    for step in range(1, total + 1):
        idx = torch.randint(0, len(x_train), (64,), generator=sampler)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
        if step in sched.ticket_steps:
            live.append(accuracy(model))  # the live ticket, before sched.step() consolidates
        sched.step()
    ultimate = accuracy(model)

    assert opt.tickets == 4
    assert len(live) == 4
    assert min(live) > 90.0  # training worked
    assert ultimate >= live[-1] - 2.0, (live, ultimate)

    # exact sparsity of the ultimate ticket
    weights = [p for p in model.parameters() if p.ndim >= 2]
    masks = [opt.masks[w] for w in weights]
    assert [int(m.sum()) for m in masks] == ERK_COUNTS
    assert [layer.count for layer in opt.layers] == ERK_COUNTS
    assert opt.density == sum(ERK_COUNTS) / N == 1702 / 17024
    for w, m in zip(weights, masks, strict=True):
        assert torch.all(w[~m] == 0)
        assert int((w != 0).sum()) <= int(m.sum())
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(opt.optimizer.state[w][key][~m] == 0)
