"""Mixed precision: ``torch.autocast``, ``torch.amp.GradScaler`` and low-precision models.

What the masks act on is always the tensors in the optimizer's param groups. Under autocast those
are the fp32 parameters (the master weights; autocast casts copies per op), with ``model.half()``
they are the fp16 parameters themselves, and with a hand-kept fp32 master copy they are the copy.
``docs/distributed.md`` states this; every claim there is checked here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import (
    FUSED_CASES,
    assert_exactly_equal,
    batches,
    case_params,
    get_case,
    inner_state_tensors,
    make_convnet,
    make_mlp,
)
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_sparse(opt, sparsity):
    """Exact counts, and exact zeros at inactive positions of weights and inner state."""
    total = sum(layer.numel for layer in opt.layers)
    assert sum(layer.count for layer in opt.layers) == round((1 - sparsity) * total)
    for layer in opt.layers:
        assert layer.count == int(layer.mask.sum()) == layer.target
        assert bool((layer.param[~layer.mask] == 0).all()), layer.name
        for key, t in inner_state_tensors(opt.optimizer, layer.param).items():
            assert bool((t[~layer.mask] == 0).all()), f"{layer.name} {key}"


def _scaled_step(model, opt, scaler, batch, dtype, inf_at=None):
    x, y = batch
    opt.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype):
        out = model(x)
        assert out.dtype == dtype  # autocast is really on
        loss = nn.functional.cross_entropy(out, y)
    scaler.scale(loss).backward()
    if inf_at is not None:
        inf_at.grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()


# --- autocast ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case", [pytest.param(get_case(i), id=i) for i in ("sgd_momentum-foreach", "adamw-fused")]
)
def test_autocast_bf16_trains_with_exact_counts_and_fp32_master_zeros(case, device):
    model = make_convnet(device=device)
    opt = SparseOptimizer(case.make(model.parameters()), "rigl", 0.8, update_every=2,
                          model=model, seed=0)  # fmt: skip
    first = [m.clone() for m in opt.masks.values()]
    for x, y in batches("convnet", 6, device=device):
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters stay fp32
    assert opt.report()["updates"]["updates"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(first, opt.masks.values(), strict=True))
    _assert_sparse(opt, 0.8)


# --- GradScaler ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", case_params(FUSED_CASES))
def test_grad_scaler_fp16_autocast_fused_static_equals_manual_masking(case, device):
    """Extends the contract's GradScaler test (fp32 forward) to an fp16 autocast forward."""
    data = batches("convnet", 5, device=device)
    model, ref_model = make_convnet(device=device), make_convnet(device=device)
    opt = SparseOptimizer(case.make(model.parameters()), "static", 0.7, model=model, seed=0)
    opt.apply_masks()
    ref = case.make(ref_model.parameters())
    pairs = [(q, opt.masks[p].clone()) for p, q in zip(model.parameters(),
             ref_model.parameters(), strict=True) if p in opt.masks]  # fmt: skip
    with torch.no_grad():
        for q, mask in pairs:
            q.mul_(mask)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    ref_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    for x, y in data:
        _scaled_step(model, opt, scaler, (x, y), torch.float16)
        ref.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16):
            loss = nn.functional.cross_entropy(ref_model(x), y)
        ref_scaler.scale(loss).backward()
        for q, mask in pairs:
            q.grad.mul_(mask)
        ref_scaler.step(ref)
        ref_scaler.update()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert scaler.get_scale() == ref_scaler.get_scale()
    _assert_sparse(opt, 0.7)


@pytest.mark.parametrize("case", case_params(FUSED_CASES))
def test_grad_scaler_fp16_autocast_fused_rigl_keeps_counts_and_zeros(case, device):
    model = make_convnet(device=device)
    opt = SparseOptimizer(case.make(model.parameters()), "rigl", 0.8, update_every=2,
                          model=model, seed=0)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    for batch in batches("convnet", 6, device=device):
        _scaled_step(model, opt, scaler, batch, torch.float16)
    assert opt.step_count == 6
    assert opt.report()["updates"]["updates"] == 3
    _assert_sparse(opt, 0.8)


@pytest.mark.parametrize(
    "case", [pytest.param(get_case(i), id=i) for i in ("adam-fused", "sgd_momentum-foreach")]
)
def test_skipped_step_defers_the_due_update_to_the_next_finite_step(case, device):
    """The update due at step 3 meets an inf gradient: GradScaler skips the whole step.

    Exactly one step is skipped (the scale halves once); ``step_count`` does not advance, so the
    step that follows is step 3, and the update due there happens on it, on finite gradients.
    """
    model = make_mlp(device=device)
    opt = SparseOptimizer(case.make(model.parameters()), "rigl", 0.8, update_every=3,
                          model=model, seed=0)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0, growth_interval=1000)
    data = batches("mlp", 7, device=device)
    for batch in data[:2]:
        _scaled_step(model, opt, scaler, batch, torch.bfloat16)
    assert opt.step_count == 2
    masks = [m.clone() for m in opt.masks.values()]
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])

    _scaled_step(model, opt, scaler, data[2], torch.bfloat16, inf_at=model[2].weight)
    assert scaler.get_scale() == 512.0
    assert opt.step_count == 2
    assert opt.last_update_step is None
    assert all(torch.equal(a, b) for a, b in zip(masks, opt.masks.values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    for i, saved in state.items():
        live = opt.optimizer.state_dict()["state"][i]
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(live[k]))
                   for k, v in saved.items())  # fmt: skip

    _scaled_step(model, opt, scaler, data[3], torch.bfloat16)
    assert opt.step_count == 3
    assert opt.last_update_step == 3
    assert opt.report()["updates"]["updates"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(masks, opt.masks.values(), strict=True))
    for batch in data[4:]:
        _scaled_step(model, opt, scaler, batch, torch.bfloat16)
    assert opt.step_count == 6  # 7 iterations, exactly one skipped
    assert scaler.get_scale() == 512.0
    assert opt.report()["updates"]["updates"] == 2  # steps 3 and 6
    # the optimizer never saw the skipped step: its own non-finite counter stays 0
    assert opt.report()["updates"]["skipped"] == 0
    _assert_sparse(opt, 0.8)


def test_skipped_step_still_advances_sup_tickets_and_the_run_ends_finalized(device):
    """``SupTicketsScheduler`` counts iterations, as every ``LRScheduler`` stepped in the loop.

    A skipped step shifts the optimizer's count by one against the scheduler's; the run of
    ``total_steps`` iterations still ends with the ultimate ticket written into the model.
    """
    model = make_mlp(device=device)
    total = 12
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), "rigl",
                          0.8, update_every=2, model=model, seed=0)  # fmt: skip
    sched = SupTicketsScheduler(opt, total, 2, superpose_fraction=0.34, lr_low=0.01,
                                lr_high=0.05)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
    finalized = []
    real_finalize = opt.finalize
    opt.finalize = lambda: (finalized.append(opt.step_count), real_finalize())
    for t, batch in enumerate(batches("mlp", total, device=device)):
        _scaled_step(model, opt, scaler, batch, torch.bfloat16,
                     inf_at=model[0].weight if t == 3 else None)  # fmt: skip
        sched.step()
    assert sched.last_epoch == total
    assert opt.step_count == total - 1
    assert finalized == [total - 1]
    assert opt.tickets == sched.num_tickets == 2
    _assert_sparse(opt, 0.8)


# --- low-precision parameters --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_masks_its_own_parameters(dtype, device):
    """``model.half()``: no master copy; the fp16 weights and fp16 momentum are masked."""
    model = make_mlp(device=device).to(dtype)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "rigl",
                          0.8, update_every=1, model=model, seed=0)  # fmt: skip
    first = [m.clone() for m in opt.masks.values()]
    for x, y in batches("mlp", 4, device=device):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(layer.param.grad.dtype == dtype for layer in opt.layers)
    assert opt.report()["updates"]["updates"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(first, opt.masks.values(), strict=True))
    _assert_sparse(opt, 0.8)
    for layer in opt.layers:
        assert opt.optimizer.state[layer.param]["momentum_buffer"].dtype == dtype


def test_grad_scaler_refuses_fp16_parameters(device):
    """torch's own rule, stated in the docs: GradScaler needs fp32 parameters (autocast)."""
    model = make_mlp(device=device).half()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "rigl", 0.8, seed=0)
    scaler = torch.amp.GradScaler(device.type)
    x, y = batches("mlp", 1, device=device)[0]
    scaler.scale(nn.functional.cross_entropy(model(x.half()).float(), y)).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(opt)
    assert opt.step_count == 0


def test_fp32_master_copy_recipe_carries_exact_zeros_into_the_bf16_model(device):
    """Masters in the optimizer, a bf16 working copy refreshed from them after each step."""
    model = make_mlp(device=device).to(torch.bfloat16)
    masters = [nn.Parameter(p.detach().float()) for p in model.parameters()]
    opt = SparseOptimizer(torch.optim.SGD(masters, lr=0.05, momentum=0.9), "rigl", 0.8,
                          update_every=2, seed=0)  # fmt: skip
    opt.apply_masks()
    with torch.no_grad():
        for p, m in zip(model.parameters(), masters, strict=True):
            p.copy_(m)
    for x, y in batches("mlp", 6, device=device):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        for p, m in zip(model.parameters(), masters, strict=True):
            m.grad = p.grad.float()  # RigL reads the masters' (dense) gradient
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters, strict=True):
                p.copy_(m)
    assert opt.report()["updates"]["updates"] == 3
    _assert_sparse(opt, 0.8)
    params = list(model.parameters())
    for layer in opt.layers:
        working = params[layer.index]
        assert working.dtype == torch.bfloat16
        assert bool((working[~layer.mask] == 0).all())
        assert torch.equal(working.float(), layer.param.detach().to(torch.bfloat16).float())


# --- the GradScaler handshake (_step_supports_amp_scaling) -----------------------------------
def _skip_run(model, opt, scaler, data, *, inf_at, unscale_first, clip=None):
    """GradScaler steps over ``data``; an inf gradient on the iterations in ``inf_at``; with
    ``unscale_first`` the loop unscales (and clips to ``clip``) before ``scaler.step``. Returns
    the scale after each iteration."""
    scales = []
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if t in inf_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale-clip-step"])
@pytest.mark.parametrize(
    "case",
    case_params([get_case(i) for i in ("sgd_momentum-foreach", "adam-fused", "adamw-forloop",
                                       "sgd-fused")]),
)  # fmt: skip
def test_grad_scaler_with_forced_skips_is_bit_identical_to_a_plain_torch_optimizer(
    case, unscale_first, device
):
    """At sparsity 0 the wrapped run equals torch's own optimizer under the same GradScaler, to
    the bit, with skipped iterations, with and without ``unscale_`` (and clipping) first, fused
    inner optimizers included: the handshake unscales exactly as ``GradScaler.unscale_``."""
    data = batches("mlp", 8, device=device)
    model, ref_model = make_mlp(device=device), make_mlp(device=device)
    opt = SparseOptimizer(case.make(model.parameters()), "static", 0.0, seed=0)
    ref = case.make(ref_model.parameters())
    inf_at = {1, 2, 5}  # two skips in a row, then another
    kwargs = {
        "inf_at": inf_at,
        "unscale_first": unscale_first,
        "clip": 0.5 if unscale_first else None,
    }
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    ref_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    scales = _skip_run(model, opt, scaler, data, **kwargs)
    ref_scales = _skip_run(ref_model, ref, ref_scaler, data, **kwargs)
    assert scales == ref_scales
    assert len(set(scales)) > 2  # the scale moved both ways: skips and growth happened
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad)  # a skipped step's gradients are unscaled too
    assert_exactly_equal(opt.optimizer.state_dict(), ref.state_dict(), "inner", strict=True)
    assert (opt.step_count, opt.skipped_steps) == (len(data) - len(inf_at), len(inf_at))
    assert not hasattr(opt, "found_inf")
    assert not hasattr(opt, "grad_scale")


def test_grad_scaler_negative_control_an_unhandled_scale_differs(device):
    """Without unscaling in the handshake the weights would move by the scale: a fused optimizer
    handed scaled gradients diverges from the reference (the comparison above is not vacuous)."""
    data = batches("mlp", 2, device=device)
    model, ref_model = make_mlp(device=device), make_mlp(device=device)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "static", 0.0, seed=0)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    scaler, ref_scaler = (torch.amp.GradScaler(device.type, init_scale=64.0) for _ in range(2))
    _skip_run(ref_model, ref, ref_scaler, data, inf_at=set(), unscale_first=False)
    for x, y in data:  # what a wrapper that ignores grad_scale would do
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters(),
                                                     strict=True))  # fmt: skip


def test_skipped_steps_are_counted_saved_and_fire_the_step_hooks(device):
    """Every iteration reaches ``step()`` (its hooks fire), a skipped one changes nothing but
    ``skipped_steps``, which the state dict carries."""
    model = make_mlp(device=device)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "rigl",
                          0.8, update_every=2, model=model, seed=0)  # fmt: skip
    fired = []
    opt.register_step_post_hook(lambda o, args, kwargs: fired.append(o.step_count))
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
    _skip_run(model, opt, scaler, batches("mlp", 5, device=device), inf_at={3},
              unscale_first=False)  # fmt: skip
    assert fired == [1, 2, 3, 3, 4]
    assert (opt.step_count, opt.skipped_steps) == (4, 1)
    assert opt.report()["suptickets"]["skipped_steps"] == 1
    state = opt.state_dict()
    assert state["sparseopt"]["skipped_steps"] == 1
    inner = torch.optim.SGD(make_mlp(device=device).parameters(), lr=0.05, momentum=0.9)
    fresh = SparseOptimizer(inner, "rigl", 0.8, update_every=2, seed=0)
    fresh.load_state_dict(state)
    assert (fresh.step_count, fresh.skipped_steps) == (4, 1)
