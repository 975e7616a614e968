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
def test_a_second_optimizer_over_the_same_parameters_is_refused():
    model = mlp(8, 16, 4, seed=0)
    first = SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)
    with pytest.raises(ValueError, match=r"0\.weight \(16, 8\), 2\.weight \(4, 16\) already"):
        SparseOptimizer(_sgd(model.parameters()), "rigl", 0.5, model=model)
    # the same weights in a dense group are no second mask: allowed
    groups = [
        {"params": [model[0].weight, model[2].weight], "sparse": False},
        {"params": [nn.Parameter(torch.ones(4, 4))]},
    ]
    SparseOptimizer(_sgd(groups), "set", 0.5)
    assert first.masks  # the first is untouched and still works
    first.step()


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
    SparseOptimizer(_sgd(model.parameters()), "set", 0.9, model=model)


def test_add_param_group_refuses_a_parameter_of_another_optimizer():
    a, b = mlp(8, 16, 4, seed=0), mlp(8, 16, 4, seed=1)
    opt_a = SparseOptimizer(_sgd(a.parameters()), "set", 0.9, model=a)
    opt_b = SparseOptimizer(_sgd(b.parameters()), "set", 0.9, model=b)
    groups = len(opt_b.param_groups)
    with pytest.raises(ValueError, match=r"\(16, 8\).*already belong"):
        opt_b.add_param_group({"params": [a[0].weight]})
    assert len(opt_b.param_groups) == groups  # refused before the inner optimizer took it
    opt_b.add_param_group({"params": [a[0].weight], "sparse": False})  # dense: allowed
    assert opt_a.masks
    head = nn.Linear(4, 4)
    opt_b.add_param_group({"params": head.parameters()})  # a generator is checked, not used up
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
