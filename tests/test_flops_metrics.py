"""FLOPs accounting and sparse-training metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sparseopt import SparseOptimizer
from sparseopt.flops import TrainingFlops, layer_flops, sparse_forward_flops
from sparseopt.metrics import (
    InTimeOverParameterization,
    mask_churn,
    prediction_disagreement,
    prediction_kl,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def test_layer_flops_of_an_mlp_by_hand():
    # a Linear on a batch of b costs 2 * b * in * out multiply-adds (bias add not counted)
    per, total = layer_flops(mlp(), torch.randn(4, 10))
    assert per == {"0.weight": 2 * 4 * 10 * 20, "2.weight": 2 * 4 * 20 * 5}
    assert total == 1600 + 800
    # 10% of the first layer and 50% of the second: 2400 - 1600 * 0.9 - 800 * 0.5
    assert sparse_forward_flops(per, total, {"0.weight": 0.1, "2.weight": 0.5}) == pytest.approx(
        560
    )


def test_layer_flops_of_a_convnet_by_hand():
    model = convnet()
    model.train()
    before = model[1].running_mean.clone()
    per, total = layer_flops(model, torch.randn(2, 3, 8, 8))
    # conv: 2 * output elements * (in_channels * kh * kw)
    conv1 = 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)
    conv2 = 2 * (2 * 16 * 4 * 4) * (8 * 3 * 3)
    fc = 2 * 2 * 256 * 10
    assert per == {"0.weight": conv1, "3.weight": conv2, "6.weight": fc}
    assert total == conv1 + conv2 + fc
    assert torch.equal(model[1].running_mean, before)  # eval-mode pass: BN untouched
    assert model.training


def test_dense_sparsity_zero_is_dense_flops():
    model = convnet()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.0, model=model)
    flops = TrainingFlops(opt, model, torch.randn(2, 3, 8, 8))
    assert flops.inference_ratio() == 1.0


def test_erk_inference_ratio_matches_per_layer_density_weighting():
    model = convnet()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.9,
                          model=model, seed=0)  # fmt: skip
    flops = TrainingFlops(opt, model, torch.randn(2, 3, 8, 8))
    per, total = flops.per_layer, flops.dense_forward
    pruned = sum(per[layer.name] * (1 - layer.count / layer.numel) for layer in opt.layers)
    expected = total - pruned
    assert flops.inference_ratio() == pytest.approx(expected / total)
    assert flops.inference_ratio() < 1.0


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_training_flops_follow_rigl_accounting(method):
    model = mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), method, 0.5,
                          model=model, seed=0, update_every=2)  # fmt: skip
    x = torch.randn(4, 10)
    flops = TrainingFlops(opt, model, x)
    f_d = 2400.0
    per = flops.per_layer
    f_s = f_d - sum(per[layer.name] * (1 - layer.count / layer.numel) for layer in opt.layers)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    # SET/RigL keep every layer's count, so f_S is constant; RigL's two update steps (2 and 4)
    # cost 2 f_S + f_D instead of 3 f_S.
    expected = 4 * 3 * f_s + (2 * (f_d - f_s) if method == "rigl" else 0.0)
    assert flops.steps == 4
    assert flops.sparse_total == pytest.approx(expected)
    assert flops.ratio == pytest.approx(expected / (4 * 3 * f_d))
    flops.remove()
    opt.step()
    assert flops.steps == 4


def test_training_flops_needs_named_layers():
    model = mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.5)
    with pytest.raises(ValueError, match="model="):
        TrainingFlops(opt, model, torch.randn(4, 10))


def test_disagreement_and_kl_against_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 7, generator=gen), torch.randn(50, 7, generator=gen)
    pa = np.exp(a.double().numpy())
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(b.double().numpy())
    pb /= pb.sum(1, keepdims=True)
    kl = float(np.mean(np.sum(pa * (np.log(pa) - np.log(pb)), axis=1)))
    assert prediction_kl(a, b) == pytest.approx(kl, rel=1e-10)
    assert prediction_kl(a, a) == 0.0
    dis = float(np.mean(pa.argmax(1) != pb.argmax(1)))
    assert prediction_disagreement(a, b) == pytest.approx(dis)


def test_mask_churn_by_hand():
    before = [
        torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool),
        torch.tensor([[1, 0], [0, 1]]).bool(),
    ]
    after = [
        torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool),
        torch.tensor([[1, 0], [0, 1]]).bool(),
    ]
    assert mask_churn(before, after) == pytest.approx(1 / 5)


def test_in_time_over_parameterization_is_the_union_of_masks():
    model = mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8,
                          update_every=2, prune_rate=0.5, seed=0)  # fmt: skip
    itop = InTimeOverParameterization(opt)
    union = [layer.mask.clone() for layer in opt.layers]
    x = torch.randn(4, 10)
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        for u, layer in zip(union, opt.layers, strict=True):
            u |= layer.mask
        expected = sum(int(u.sum()) for u in union) / sum(u.numel() for u in union)
        assert itop.rate == pytest.approx(expected)
    assert itop.rate > 1 - 0.8
    assert math.isclose(opt.density, 0.2, abs_tol=1e-3)


def _gmp_with_explorations(growth):
    """GMP pruned to its target by step 4, then two Sup-tickets-style explorations (steps 6, 8)."""
    model = mlp()
    options = {} if growth is None else {"growth": growth}
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), "gmp", 0.5,
                          model=model, seed=0, update_every=2, total_steps=8, prune_end=0.5,
                          **options)  # fmt: skip
    x = torch.randn(4, 10)
    flops = TrainingFlops(opt, model, x)
    read = []
    for step in range(1, 9):
        if step in (6, 8):
            opt.explore(0.3)
        opt.zero_grad()
        model(x).square().mean().backward()
        before = flops.sparse_total
        opt.step()
        f_s = flops.sparse_forward()  # a step is counted at the densities it leaves
        extra = flops.sparse_total - before - 3 * f_s
        gap = flops.dense_forward - f_s  # 0 while GMP is still dense
        read.append(round(extra / gap, 9) if gap else extra)
    return opt, read


@pytest.mark.parametrize(("growth", "reads"), [(None, True), ("gradient", True), ("random", False)])
def test_gmp_explorations_count_the_dense_gradient_only_when_growth_reads_it(growth, reads):
    """GMP's pruning events (steps 2, 4) read no gradient; its explorations (6, 8) grow by
    ``growth``: with gradient growth they cost 2 f_S + f_D, the dense gradient counted."""
    opt, read = _gmp_with_explorations(growth)
    assert opt.report()["updates"]["updates"] == 4  # two pruning events, two explorations
    assert read[:5] == [0, 0, 0, 0, 0]
    assert read[5:] == [(1.0 if reads else 0), 0, (1.0 if reads else 0)]
    assert opt.method.uses_gradient is reads


def test_reads_gradient_per_update_of_each_method():
    """Which updates read the dense gradient, per method, against the papers' definitions."""
    from sparseopt.methods import get_method

    model = mlp()

    def ctx_of(method, **kw):
        opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, 0.5,
                              update_every=2, total_steps=8, **kw)  # fmt: skip
        return opt.method, opt.context

    for name, scheduled, explore in [("set", False, False), ("rigl", True, True),
                                     ("static", False, False)]:  # fmt: skip
        method, ctx = ctx_of(name)
        assert method.reads_gradient(2, ctx) is scheduled, name
        assert method.reads_gradient(None, ctx) is explore, name
    gmp, ctx = ctx_of("gmp", prune_end=0.5)
    assert gmp.reads_gradient(2, ctx) is False
    assert gmp.reads_gradient(None, ctx) is True
    granet, ctx = ctx_of("granet", prune_end=0.5)
    assert granet.reads_gradient(2, ctx) is True
    granet_random, ctx = ctx_of("granet", prune_end=0.5, growth="random")
    assert granet_random.reads_gradient(2, ctx) is False
    snip = get_method("snip")
    assert snip.reads_gradient(1, None) is True  # |g * w| at the first step
    snip.initialized = True
    assert snip.reads_gradient(None, None) is True
