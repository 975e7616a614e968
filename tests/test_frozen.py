"""Frozen parameters and parameters without a gradient (issue 22, bug 1).

A parameter with ``requires_grad=False`` when the optimizer is built stays dense and untouched,
and ``report()["frozen"]`` lists it: through training, Sup-tickets, a checkpoint and the compact
export. A parameter without a gradient at a topology update (or an exploration) is skipped by
that update: its mask and weights stay as they are, while the other layers move.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import mlp
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler, load_sparse, save_sparse

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed=0):
    return mlp(16, 32, 16, 4, seed=seed)  # 0.weight, 2.weight, 4.weight


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def _step(model, opt, i):
    x, y = _batch(i)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_the_issue_setup_leaves_the_frozen_layer_untouched():
    """The issue's exact setup: ``m[0].requires_grad_(False)``, RigL with ``update_every=2``."""
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    m[0].requires_grad_(False)
    frozen = m[0].weight.detach().clone()
    opt = SparseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), "rigl", 0.9, update_every=2)
    for i in range(10):
        _step(m, opt, i)
    assert torch.equal(m[0].weight, frozen)  # all 512 weights, bit-identical
    assert int((m[0].weight != 0).sum()) == 512
    assert m[0].weight not in opt.masks
    assert [layer.param for layer in opt.layers] == [m[2].weight]
    assert opt.report()["frozen"] == [{"name": "param0", "shape": (32, 16)}]
    assert opt.update_stats.updates == 5  # negative control: the other layer did move
    # the sparsity is that of the sparse layers: the frozen one is not counted
    assert opt.layers[0].count == round(0.1 * m[2].weight.numel())


def test_frozen_layers_are_named_in_the_report():
    model = _net()
    model[2].weight.requires_grad_(False)
    opt = SparseOptimizer(torch.optim.Adam(model.parameters()), "set", 0.8, model=model)
    report = opt.report()
    assert report["frozen"] == [{"name": "2.weight", "shape": (16, 32)}]
    assert [r["name"] for r in report["layers"]] == ["0.weight", "4.weight"]
    assert "frozen (requires_grad=False, left dense): 2.weight (16x32)" in str(report)


@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize("trigger", ["update", "exploration"])
def test_a_layer_without_gradient_is_skipped_by_the_update(method, trigger):
    """At the update (or exploration) step layer 2 gets no gradient: its mask and weights stay,
    while the layers with a gradient are updated (the negative control)."""
    model = _net()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        method,
        0.8,
        update_every=3 if trigger == "update" else 1000,
        prune_rate=0.5,
        model=model,
        seed=0,
    )
    for i in range(2):
        _step(model, opt, i)
    masks = {name: mask.clone() for name, mask in opt.named_masks()}
    weight = model[2].weight.detach().clone()
    if trigger == "exploration":
        opt.explore(0.5)
    x, y = _batch(2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad = None  # e.g. a branch this batch did not reach
    opt.step()
    assert opt.update_stats.last_update_step == 3
    after = dict(opt.named_masks())
    assert torch.equal(after["2.weight"], masks["2.weight"])
    assert torch.equal(model[2].weight, weight)
    assert not torch.equal(after["0.weight"], masks["0.weight"])  # the others moved
    assert not torch.equal(after["4.weight"], masks["4.weight"])
    for layer in opt.layers:
        assert layer.count == int(layer.mask.sum())


def _frozen_run(total=24, cycle=4, stop=None, model=None, opt=None, sched=None, start=0):
    if model is None:
        model = _net()
        model[0].weight.requires_grad_(False)
        opt = SparseOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9),
            "rigl",
            0.9,
            update_every=2,
            model=model,
            seed=0,
        )
        sched = SupTicketsScheduler(opt, total, cycle, superpose_fraction=0.34)
    for i in range(start, total if stop is None else stop):
        _step(model, opt, i)
        sched.step()
    return model, opt, sched


def test_frozen_layer_through_suptickets():
    """Phase 1, two cycles with explorations and consolidates, finalize: untouched."""
    model = _net()
    frozen = model[0].weight.detach().clone()
    model, opt, _ = _frozen_run()
    assert opt.tickets == 2
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in opt.masks
    for layer in opt.layers:  # the sparse layers hold the ultimate ticket at the exact counts
        assert layer.count == layer.target == int((layer.param != 0).sum())
    with opt.superposed():
        assert torch.equal(model[0].weight, frozen)


def test_frozen_layer_through_a_checkpoint_and_the_compact_export(tmp_path):
    model, opt, sched = _frozen_run(stop=18)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    frozen = model[0].weight.detach().clone()
    del opt, sched  # one optimizer per parameter
    model2 = _net(seed=1)
    model2[0].weight.requires_grad_(False)
    model2.load_state_dict(saved["model"])
    opt2 = SparseOptimizer(
        torch.optim.SGD(model2.parameters(), lr=0.001, momentum=0.9),
        "rigl",
        0.9,
        update_every=2,
        model=model2,
        seed=0,
    )
    opt2.load_state_dict(saved["opt"])
    sched2 = SupTicketsScheduler(opt2, 24, 4, superpose_fraction=0.34)
    sched2.load_state_dict(saved["sched"])
    _frozen_run(model=model2, opt=opt2, sched=sched2, start=18)
    assert torch.equal(model2[0].weight, frozen)
    assert opt2.report()["frozen"] == [{"name": "0.weight", "shape": (32, 16)}]

    path = tmp_path / "model.sparse"
    info = save_sparse(model2, path, opt2.masks)
    assert info["tensors"]["0.weight"]["nnz"] == 512  # dense: every weight is kept
    model3 = _net(seed=2)
    masks = load_sparse(model3, path)
    assert torch.equal(model3[0].weight, frozen)
    assert set(masks) >= {"2.weight", "4.weight"}
    assert "0.weight" not in masks or bool(masks["0.weight"].all())


def test_a_checkpoint_of_a_frozen_layer_does_not_fit_where_it_is_trainable():
    """Negative control: the frozen layer is no sparse layer, so the layouts differ."""
    _, opt, sched = _frozen_run(stop=4)
    state = opt.state_dict()
    del opt, sched
    other = _net()
    opt2 = SparseOptimizer(torch.optim.SGD(other.parameters(), lr=0.001), "rigl", 0.9, model=other)
    with pytest.raises(ValueError, match="sparse parameter indices"):
        opt2.load_state_dict(state)
