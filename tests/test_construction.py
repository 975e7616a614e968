"""What ``SparseOptimizer(...)`` refuses (issue 22, bugs 5 and 6, and the ``model=`` wording).

- Nothing would be sparse (a structure that fits no layer, no ``ndim >= 2`` parameter in a sparse
  group, every weight frozen): a ``ValueError`` that says why, instead of training dense.
- A parameter that another live ``SparseOptimizer`` sparsifies: a ``ValueError`` naming it, at
  the second construction (and at ``add_param_group``); once the first optimizer is garbage,
  its parameters are free.
- ``model=`` something else: the message names the type, never the value (a state dict would
  print every tensor).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from cases import mlp
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


# --- nothing would be sparse ----------------------------------------------------------------------
def test_a_structure_that_fits_no_layer_is_refused():
    """Fan-ins 16 and 32 are not multiples of 3."""
    model = mlp(16, 32, 4, seed=0)
    with pytest.raises(ValueError, match=r"structure='2:3' fits none of the weights") as info:
        SparseOptimizer(_sgd(model.parameters()), "set", structure="2:3", model=model)
    message = str(info.value)
    assert "0.weight (32, 16): input dimension 16 is not a multiple of 3" in message
    assert "2.weight (4, 32): input dimension 32 is not a multiple of 3" in message
    # negative control: one layer that fits is enough, the other is left dense and reported
    model = mlp(18, 32, 4, seed=0)
    opt = SparseOptimizer(_sgd(model.parameters()), "set", structure="2:3", model=model)
    assert [layer.name for layer in opt.layers] == ["0.weight"]
    assert [d["name"] for d in opt.report()["dense"]] == ["2.weight"]


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(lambda: [nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(3))], id="1d"),
        pytest.param(
            lambda: [{"params": [nn.Parameter(torch.randn(4, 4))], "sparse": False}],
            id="dense-group",
        ),
    ],
)
def test_no_sparse_parameter_is_refused(params):
    with pytest.raises(ValueError, match=r"no parameter would be sparse.*ndim >= 2"):
        SparseOptimizer(_sgd(params()), "set", 0.9)


def test_every_weight_frozen_is_refused():
    model = mlp(8, 16, 4, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False \(0\.weight, 2\.weight\)"):
        SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)


def test_report_always_has_dense_and_frozen():
    model = mlp(8, 16, 4, seed=0)
    report = SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model).report()
    assert report["dense"] == []
    assert report["frozen"] == []
    assert report["structure"] is None


# --- one SparseOptimizer per parameter ------------------------------------------------------------
def _step(model, opt):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_a_second_optimizer_takes_the_parameters_over_and_the_first_stops():
    """Re-running a notebook cell builds the optimizer again while the old one is still bound:
    the new one takes the weights over (with a warning); the old one refuses to step, since two
    optimizers stepping one weight would each keep their own mask."""
    model = mlp(8, 16, 4, seed=0)
    first = SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)
    _step(model, first)
    with pytest.warns(
        UserWarning, match=r"0\.weight \(16, 8\), 2\.weight \(4, 16\) were masked by"
    ):
        second = SparseOptimizer(_sgd(model.parameters()), "rigl", 0.5, model=model)
    with pytest.raises(RuntimeError, match="superseded"):
        _step(model, first)
    _step(model, second)  # the newer one steps, its counts hold
    for layer in second.layers:
        assert int(layer.mask.sum()) == layer.count
        assert (layer.param[~layer.mask] == 0).all()


def test_the_same_weights_in_a_dense_group_take_nothing_over():
    model = mlp(8, 16, 4, seed=0)
    first = SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)
    groups = [
        {"params": [model[0].weight, model[2].weight], "sparse": False},
        {"params": [nn.Parameter(torch.ones(4, 4))]},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseOptimizer(_sgd(groups), "set", 0.5)
    _step(model, first)  # the first is untouched and still steps


def test_the_first_optimizer_gone_frees_its_parameters():
    """Weak both ways: the registry holds neither the parameters nor the optimizer, also when
    an LRScheduler ties the optimizer in a reference cycle."""
    model = mlp(8, 16, 4, seed=0)
    first = SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)
    sched = SupTicketsScheduler(first, 100, 5)
    gone = weakref.ref(first)
    del first, sched
    gc.collect()
    assert gone() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to take over
        SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)


def test_add_param_group_takes_a_parameter_of_another_optimizer_over():
    a, b = mlp(8, 16, 4, seed=0), mlp(8, 16, 4, seed=1)
    opt_a = SparseOptimizer(_sgd(a.parameters()), "set", 0.9, model=a)
    opt_b = SparseOptimizer(_sgd(b.parameters()), "set", 0.9, model=b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a weight of no other optimizer: nothing taken over
        opt_b.add_param_group({"params": [nn.Parameter(torch.ones(4, 4))]})
    with pytest.warns(UserWarning, match=r"\(16, 8\) were masked by another SparseOptimizer"):
        opt_b.add_param_group({"params": [a[0].weight]})
    assert a[0].weight in opt_b.masks
    with pytest.raises(RuntimeError, match="superseded"):
        _step(a, opt_a)
    head = nn.Linear(4, 4)
    opt_b.add_param_group({"params": head.parameters()})  # a generator is taken as torch takes it
    assert opt_b.param_groups[-1]["params"] == [head.weight, head.bias]
    assert head.weight in opt_b.masks


def test_a_failed_construction_claims_nothing():
    model = mlp(8, 16, 4, seed=0)
    with pytest.raises(ValueError, match="method that keeps structure='2:4'"):  # after the masks
        SparseOptimizer(_sgd(model.parameters()), "gmp", structure="2:4", total_steps=100)
    SparseOptimizer(_sgd(model.parameters()), "set", 0.9)


# --- model= -------------------------------------------------------------------------------------
def test_model_state_dict_is_named_by_its_type():
    model = mlp(8, 16, 4, seed=0)
    with pytest.raises(TypeError) as info:
        SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model.state_dict())
    message = str(info.value)
    assert message == (
        "Expected model to be an nn.Module or None, but got OrderedDict (a state dict? pass the "
        "module itself)"
    )
    assert "tensor(" not in message
