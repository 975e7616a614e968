"""Inactive weights stay exactly 0 in every dtype (issue 22, bug 3).

AdamW's default ``eps=1e-8`` is 0 in float16, so at a zero-gradient position its update computes
``0 / (sqrt(0) + 0) = nan``. Under ``remask="auto"`` the optimizer used to trust AdamW to keep
zeros and skipped the re-mask: every inactive weight became NaN at step 1, and the warnings that
followed ("non-finite gradients", ``save_sparse``'s nonzero count) pointed elsewhere. Whether an
optimizer keeps zeros now depends on its parameters' dtypes, and the re-mask is NaN-safe there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import inner_state_tensors
from torch import nn

from sparseopt import SparseOptimizer, load_sparse, save_sparse
from sparseopt.engine import keeps_zeros

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(dtype, inner, steps=6):
    """RigL on one 32x16 linear layer at 50% and the loss ``mean(model(x))`` with ``x`` in
    [0.5, 1.5): every weight's gradient is ``mean_b x_bj / 32`` in [0.0156, 0.047], far from 0 and
    from fp16's limits, so the only zero gradients are those of the inactive positions."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(16, 32, bias=False).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 with eps 0 in it: warned once (tested below)
        opt = SparseOptimizer(
            inner(model.parameters()), "rigl", 0.5, update_every=2, model=model, seed=0
        )
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite gradients", no other follow-on warning
        for _ in range(steps):
            x = (torch.rand(8, 16, generator=g) + 0.5).to(dtype)
            opt.zero_grad()
            model(x).float().mean().backward()
            opt.step()
    return model, opt


ADAMW = {
    "adamw-forloop": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    "adam-forloop": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False),
    "rmsprop-foreach": lambda p: torch.optim.RMSprop(p, lr=1e-3, foreach=True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("inner", list(ADAMW.values()), ids=list(ADAMW))
def test_inactive_weights_stay_zero_in_half_precision(dtype, inner):
    _, opt = _train(dtype, inner)
    assert opt.update_stats.updates == 3
    assert opt.update_stats.skipped == 0
    for layer in opt.layers:
        assert bool(torch.isfinite(layer.param).all()), layer.name
        assert bool((layer.param[~layer.mask] == 0).all()), layer.name
        for name, t in inner_state_tensors(opt.optimizer, layer.param).items():
            assert bool((t[~layer.mask] == 0).all()), (layer.name, name)
    for row in opt.report()["layers"]:
        assert row["nonzero"] <= row["active"]


def test_half_precision_export_sees_the_active_weights(tmp_path):
    """``save_sparse`` of the trained fp16 model: the file holds exactly the active weights."""
    model, opt = _train(torch.float16, ADAMW["adamw-foreach"])
    info = save_sparse(model, tmp_path / "m.sparse", opt.masks)
    for name, mask in opt.named_masks():
        assert info["tensors"][name]["nnz"] == int(mask.sum())
    copy = nn.Linear(16, 32, bias=False).half()
    load_sparse(copy, tmp_path / "m.sparse")
    for a, b in zip(copy.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_keeps_zeros_depends_on_the_dtype():
    """AdamW's eps=1e-8 is 0 in float16 only; a larger eps is not (the negative control)."""

    def param(dtype):
        return nn.Parameter(torch.zeros(2, 2, dtype=dtype))

    assert keeps_zeros(torch.optim.AdamW([param(torch.float32)]))
    assert keeps_zeros(torch.optim.AdamW([param(torch.bfloat16)]))
    assert not keeps_zeros(torch.optim.AdamW([param(torch.float16)]))
    assert keeps_zeros(torch.optim.AdamW([param(torch.float16)], eps=1e-4))
    assert keeps_zeros(torch.optim.SGD([param(torch.float16)], lr=0.1))  # no eps
    assert not keeps_zeros(torch.optim.Adamax([param(torch.float32)]))  # never on the list
    # the weight update is what breaks: 0 / (sqrt(0) + eps) with eps 0 in float16
    w = param(torch.float16)
    w.grad = torch.zeros_like(w)
    torch.optim.AdamW([w], lr=1e-3, foreach=False).step()
    assert bool(w.isnan().all())


def test_an_eps_that_is_zero_in_the_dtype_is_named_when_the_optimizer_is_built():
    """What breaks beyond the masks is torch's (active weights whose squared gradient underflows
    divide by 0 too): said once, up front, with the way out."""
    model = nn.Linear(16, 32, bias=False).half()
    with pytest.warns(UserWarning, match=r"eps=1e-08 of AdamW is 0 in torch\.float16") as caught:
        SparseOptimizer(torch.optim.AdamW(model.parameters()), "rigl", 0.5)
    assert "inactive weights are kept at exactly 0" in str(caught[0].message)
    assert caught[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # negative control: bfloat16 holds 1e-8
        SparseOptimizer(torch.optim.AdamW(nn.Linear(16, 32).bfloat16().parameters()), "rigl", 0.5)
