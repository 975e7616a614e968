"""``sparseopt.sparse_kernels``: the sparse forward and backward against masked dense.

The references are torch's own dense ``nn.Linear`` / ``nn.Conv2d`` forward and backward on the
same masked weights (the module's class forward, which the handle bypasses), and whole training
runs without the handle. Every comparison also checks that the sparse path really ran (the
report's call counts), so that a silently dense handle cannot pass. No timing here: speed is in
``benchmarks/sparse_training.py``.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler, sparse_kernels
from sparseopt import engine as engine_module
from sparseopt.kernels import KernelReport, training_min_sparsity_rule
from sparseopt.masks import apply_masks_

pytestmark = pytest.mark.usefixtures("one_thread")


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 1e-12}


def _primed(model: nn.Module, method: str = "static", sparsity: float = 0.8, **kw):
    """A SparseOptimizer (SGD, lr 0: the weights stay put) after one step: masks applied."""
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), method, sparsity, seed=0,
                          **kw)  # fmt: skip
    p = next(model.parameters())
    shape = (2, p.shape[1], 3, 3) if p.ndim == 4 else (3, p.shape[1])
    model(torch.randn(shape, dtype=p.dtype)).sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def _grads(model: nn.Module, x: torch.Tensor, gy: torch.Tensor | None = None):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    gy = torch.randn_like(y) if gy is None else gy
    y.backward(gy)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), x.grad, grads, gy


# --- one layer against torch's dense layer -------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["linear", "linear3d", "conv1x1"]),
    out_f=st.integers(1, 24),
    in_f=st.integers(1, 24),
    rows=st.integers(1, 9),
    sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.95, 0.99]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    reads=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_masked_dense(
    kind, out_f, in_f, rows, sparsity, dtype, bias, reads, seed
):
    torch.manual_seed(seed)
    layer = (nn.Conv2d(in_f, out_f, 1, bias=bias) if kind == "conv1x1"
             else nn.Linear(in_f, out_f, bias=bias)).to(dtype)  # fmt: skip
    model = nn.Sequential(layer)
    # RigL with an update due at step 2: the backward before it reads the dense gradient
    opt = _primed(model, "rigl" if reads else "static", sparsity, update_every=2)
    assert opt.next_step_reads_gradient() is reads
    mask = opt.masks[layer.weight]
    shape = {"linear": (rows, in_f), "linear3d": (2, rows, in_f), "conv1x1": (2, in_f, rows, 2)}
    x = torch.randn(shape[kind], dtype=dtype)
    handle = sparse_kernels(model, opt, layout="csr")
    y, gx, (gw, *gb), gy = _grads(model, x)
    assert handle.report()[0]["sparse_calls"] == 1
    handle.remove()
    y_ref, gx_ref, (gw_ref, *gb_ref), _ = _grads(model, x, gy)
    tol = _tol(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gb, gb_ref, **tol)
    if reads:  # the dense gradient, as growth by gradient needs it
        torch.testing.assert_close(gw, gw_ref, **tol)
    else:  # only the active part, and exact zeros elsewhere
        torch.testing.assert_close(gw, gw_ref * mask, **tol)
        assert not gw[~mask].any()


def test_fan_in_runs_on_the_condensed_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8)).double()
    opt = _primed(model, "static", 0.75, structure="fan_in")
    x = torch.randn(5, 40, dtype=torch.float64)
    with sparse_kernels(model, opt, layout="condensed") as handle:
        _, gx, grads, gy = _grads(model, x)
        assert [r["layout"] for r in handle.report()] == ["condensed", "condensed"]
    _, gx_ref, grads_ref, _ = _grads(model, x, gy)
    torch.testing.assert_close(gx, gx_ref, **_tol(torch.float64))
    for g, g_ref, p in zip(grads, grads_ref, model.parameters(), strict=True):
        mask = opt.masks.get(p)
        torch.testing.assert_close(g, g_ref if mask is None else g_ref * mask, rtol=0, atol=1e-12)
    with sparse_kernels(model, opt) as handle:  # "auto": condensed, but too small to pay
        model(x)
        for row in handle.report():
            assert row["layout"] is None
            assert "rule" in row["reason"]


def test_the_rule_decides_per_layer_and_the_report_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 16), nn.Conv2d(1, 2, 3), nn.Linear(16, 4)
    )
    sgd = torch.optim.SGD([{"params": [model[0].weight, model[2].weight, model[3].weight]},
                           {"params": [model[4].weight], "sparse": False}], lr=0.0)  # fmt: skip
    opt = SparseOptimizer(sgd, "static", 0.98, distribution="uniform", seed=0)
    with sparse_kernels(model, opt) as handle:
        x = torch.randn(64, 2048)
        model[:3](x).sum().backward()  # first step: masks not applied yet, so dense
        opt.step()
        with torch.no_grad():  # an evaluation batch runs dense and does not decide
            model[:3](x[:1])
        assert handle.report()[0]["batch"] is None
        model[:3](x)
        report = {r["name"]: r for r in handle.report()}
    assert isinstance(handle.report(), KernelReport)
    big, small, conv, dense = report["0"], report["2"], report["3"], report["4"]
    assert big["layout"] == "csr"
    assert big["batch"] == 64
    assert "reaches" in big["reason"]
    assert (big["sparse_calls"], big["dense_calls"]) == (1, 2)
    assert training_min_sparsity_rule(1024 * 16, 64) > 0.98
    assert small["layout"] is None
    assert "rule" in small["reason"]
    assert conv["layout"] is None
    assert "1x1" in conv["reason"]
    assert dense["layout"] is None
    assert "not a sparse layer" in dense["reason"]
    assert dense["sparsity"] is None
    text = str(handle.report())
    assert "reason" in text.splitlines()[0]
    assert "not a sparse layer" in text


def test_unsupported_dtype_stays_dense_with_a_reason():
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    opt = _primed(model, "static", 0.9)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with sparse_kernels(model, opt, layout="csr") as handle:
        y = model(x)
        (row,) = handle.report()
    assert row["layout"] is None
    assert "bfloat16" in row["reason"]
    assert torch.equal(y, model(x))


# --- whole runs against masked-dense runs --------------------------------------------------------
def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).to(dtype)


def _train(kernels: bool, steps: int = 50, dtype=torch.float64, layout: str = "csr"):
    """RigL (updates at steps 15 and 30) then a Sup-tickets phase 2 of two cycles (an
    exploration with gradient growth at the start of each): four topology updates."""
    model = _mlp(dtype)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "rigl", 0.9,
                          seed=1, update_every=15, model=model)  # fmt: skip
    sched = SupTicketsScheduler(opt, total_steps=steps, cycle_steps=5, superpose_fraction=0.2,
                                lr_low=0.05, lr_high=0.1)  # fmt: skip
    handle = sparse_kernels(model, opt, layout=layout) if kernels else None
    g = torch.Generator().manual_seed(3)
    reads = []
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (16,), generator=g)
        reads.append(opt.next_step_reads_gradient())
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, handle, reads


def test_rigl_and_suptickets_give_the_masks_of_masked_dense_training():
    """Tolerance: float64, weights within 1e-12 after 50 steps (summation order only)."""
    model_a, opt_a, _, reads_a = _train(kernels=False)
    model_b, opt_b, handle, reads_b = _train(kernels=True)
    assert opt_a.update_stats.updates == 4
    assert reads_a == reads_b
    assert sum(reads_a) == 4
    report = handle.report()
    assert all(r["layout"] == "csr" and r["sparse_calls"] == 49 for r in report)
    for m_a, m_b in zip(opt_a.masks.values(), opt_b.masks.values(), strict=True):
        assert torch.equal(m_a, m_b)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p_b, p_a, rtol=0, atol=1e-12)
    handle.remove()


def test_the_mask_pass_skips_exactly_the_kernel_gradients(monkeypatch):
    """The engine masks a gradient unless the kernel wrote it: a converted layer's gradient on a
    step that does not read it is skipped; on a reading step, and a dense layer's, are masked."""
    masked: list[list[int]] = []

    def spy(tensors, masks, nan_safe=False):
        masked.append([t.data_ptr() for t in tensors])
        return real(tensors, masks, nan_safe)

    real = engine_module.apply_masks_
    monkeypatch.setattr(engine_module, "apply_masks_", spy)
    model = _mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "rigl", 0.9, seed=0,
                          update_every=3)  # fmt: skip
    handle = sparse_kernels(model, opt, layout="csr")
    handle.remove()  # a second handle on the same model after remove() works
    handle = sparse_kernels(model, opt, layout="csr")
    x = torch.randn(8, 32, dtype=torch.float64)
    log = []
    for _ in range(6):
        reads = opt.next_step_reads_gradient()
        model(x).square().mean().backward()
        ptrs = {name: p.grad.data_ptr() for name, p in model.named_parameters()}
        opt.step()
        log.append((reads, ptrs, masked[-1]))
        opt.zero_grad()
    for step, (reads, ptrs, done) in enumerate(log, 1):
        for name in ("0.weight", "2.weight", "4.weight"):
            kernel_grad = step > 1 and not reads
            assert (ptrs[name] in done) is not kernel_grad, (step, name)
    for p, mask in opt.masks.items():
        assert not p[~mask].any()
    handle.remove()


def test_shared_weight_and_accumulation_match_masked_dense():
    """A weight used by a converted layer and by a dense term of the loss, and gradients
    accumulated over two backward passes: results of masked-dense training, masks kept."""

    def run(kernels: bool):
        model = _mlp()
        opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "set",
                              0.8, seed=0, update_every=4)  # fmt: skip
        handle = sparse_kernels(model, opt, layout="csr") if kernels else None
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            for _ in range(2):
                x = torch.randn(4, 32, generator=g, dtype=torch.float64)
                loss = model(x).square().mean() + (model[2].weight - 0.01).square().sum()
                loss.backward()
            opt.step()
            opt.zero_grad()
        return model, opt, handle

    model_a, opt_a, _ = run(False)
    model_b, opt_b, handle = run(True)
    assert all(r["sparse_calls"] > 0 for r in handle.report())
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p_b, p_a, rtol=0, atol=1e-12)
    for (p, m_a), m_b in zip(opt_a.masks.items(), opt_b.masks.values(), strict=True):
        assert torch.equal(m_a, m_b)
        assert not p[~m_a].any()
    handle.remove()


def test_a_kept_gradient_is_never_overwritten():
    model = _mlp()
    opt = _primed(model, "static", 0.9)
    handle = sparse_kernels(model, opt, layout="csr")
    x = torch.randn(4, 32, dtype=torch.float64)
    model(x).sum().backward()
    kept = model[0].weight.grad
    before = kept.clone()
    opt.zero_grad()
    model(2 * x).sum().backward()
    assert torch.equal(kept, before)
    assert not torch.equal(model[0].weight.grad, before)
    handle.remove()


# --- the handle's life ---------------------------------------------------------------------------
def test_remove_restores_the_dense_path_bit_for_bit():
    model = _mlp(torch.float32)
    twin = copy.deepcopy(model)
    opt = _primed(model, "static", 0.9)
    handle = sparse_kernels(model, opt, layout="csr")
    x = torch.randn(8, 32)
    model(x)
    assert handle.report()[0]["sparse_calls"] == 1
    handle.remove()
    handle.remove()  # twice: nothing
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())
    assert all("_sparseopt_kernel" not in vars(m) for m in model.modules())
    twin.load_state_dict(model.state_dict())
    y, gx, grads, gy = _grads(model, x)
    y_ref, gx_ref, grads_ref, _ = _grads(twin, x, gy)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    assert "removed" in repr(handle)


def test_resume_with_the_handle_is_bit_exact():
    def fresh():
        model = _mlp(torch.float32)
        opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "rigl",
                              0.9, seed=1, update_every=4, model=model)  # fmt: skip
        return model, opt, sparse_kernels(model, opt, layout="csr")

    batches = [(torch.randn(8, 32), torch.randint(0, 10, (8,))) for _ in range(12)]

    def train(model, opt, part):
        for x, y in part:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    model, opt, handle = fresh()
    train(model, opt, batches[:6])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, batches[6:])
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2, opt2, handle2 = fresh()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    train(model2, opt2, batches[6:])
    assert opt.update_stats.updates == 3
    assert handle2.report()[0]["sparse_calls"] == 6
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for m, n in zip(opt.masks.values(), opt2.masks.values(), strict=True):
        assert torch.equal(m, n)
    handle.remove()
    handle2.remove()


def test_loading_a_checkpoint_while_active_rebuilds_the_structure():
    model = _mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "set", 0.9, seed=0,
                          update_every=2)  # fmt: skip
    handle = sparse_kernels(model, opt, layout="csr")
    x = torch.randn(8, 32, dtype=torch.float64)
    for _ in range(2):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for _ in range(3):  # a topology update moves the masks away from the saved ones
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    y, _, grads, gy = _grads(model, x)
    calls = handle.report()[0]["sparse_calls"]
    handle.remove()
    y_ref, _, grads_ref, _ = _grads(model, x, gy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    mask = opt.masks[model[0].weight]
    torch.testing.assert_close(grads[0], grads_ref[0] * mask, rtol=0, atol=1e-12)
    assert calls == 5


def test_copies_and_pickles_are_plain_dense_models():
    model = _mlp()
    opt = _primed(model, "static", 0.9)
    with sparse_kernels(model, opt, layout="csr"):
        twin = copy.deepcopy(model)
        again = pickle.loads(pickle.dumps(model))
        assert isinstance(model[0], nn.Linear)
        assert type(model[0]) is not nn.Linear
    for copied in (twin, again):
        assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in copied.modules())
        assert all("_sparseopt_kernel" not in vars(m) for m in copied.modules())


def test_autocast_and_the_first_step_run_dense():
    model = _mlp(torch.float32)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), "static", 0.9, seed=0)
    handle = sparse_kernels(model, opt, layout="csr")
    x = torch.randn(4, 32)
    model(x).sum().backward()  # before the first step: dense
    opt.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    assert handle.report()[0]["dense_calls"] == 2
    assert handle.report()[0]["sparse_calls"] == 0
    handle.remove()


def test_compiled_model_runs_the_kernels():
    model = _mlp(torch.float32)
    opt = _primed(model, "static", 0.9)
    handle = sparse_kernels(model, opt, layout="csr")
    x = torch.randn(4, 32)
    compiled = torch.compile(model, backend="eager")
    y = compiled(x)
    assert handle.report()[0]["sparse_calls"] == 1
    handle.remove()
    torch.testing.assert_close(y, model(x))


def test_explore_between_backward_and_step_warns():
    model = _mlp()
    opt = _primed(model, "rigl", 0.9, update_every=10**6)
    handle = sparse_kernels(model, opt, layout="csr")
    model(torch.randn(4, 32, dtype=torch.float64)).sum().backward()
    opt.explore(0.3)
    with pytest.warns(UserWarning, match="explore\\(\\) was called between backward"):
        opt.step()
    handle.remove()


def test_the_beta_warning_never_reaches_the_user():
    code = (
        "import warnings, torch, sparseopt\n"
        "warnings.simplefilter('error')\n"
        "m = torch.nn.Linear(64, 64)\n"
        "opt = sparseopt.SparseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), 'set', 0.9)\n"
        "h = sparseopt.sparse_kernels(m, opt, layout='csr')\n"
        "for _ in range(3):\n"
        "    m(torch.randn(8, 64)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "assert h.report()[0]['sparse_calls'] == 2\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly():
    model = _mlp()
    opt = _primed(model, "static", 0.9)
    other = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="none of its parameters is one"):
        sparse_kernels(other, opt)
    with sparse_kernels(model, opt), pytest.raises(ValueError, match="already running on them"):
        sparse_kernels(model, opt)
    with sparse_kernels(model[0], opt), pytest.raises(ValueError, match="already running"):
        sparse_kernels(model, opt)
    with pytest.raises(TypeError, match="opt to be a SparseOptimizer"):
        sparse_kernels(model, opt.optimizer)
    with sparse_kernels(model, opt, layout="2:4") as handle:  # unstructured masks: all dense
        for row in handle.report():
            assert "needs structure='2:4'" in row["reason"]


@pytest.mark.cuda
def test_two_four_runs_semi_structured_on_cuda(device):
    """Untested in this project's runs (no GPU): 2:4 weights through torch's semi-structured
    kernels, against the dense masked layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128)).to(device, torch.float16)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), "static", structure="2:4")
    x = torch.randn(64, 128, device=device, dtype=torch.float16)
    model(x).sum().backward()
    opt.step()
    with sparse_kernels(model, opt) as handle:
        y = model(x)
        assert handle.report()[0]["layout"] == "2:4"
    torch.testing.assert_close(y, model(x), rtol=1e-2, atol=1e-2)


# --- the mask pass ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_masks_with_a_float_mask_is_the_bool_product_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=g, dtype=dtype)
    values[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    keep = torch.rand(5, 7, generator=g) > 0.5
    keep[0, :3] = False
    for nan_safe in (False, True):
        a, b = values.clone(), values.clone()
        apply_masks_([a], [keep], nan_safe=nan_safe)
        apply_masks_([b], [keep.to(dtype)], nan_safe=nan_safe)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # the bits, NaNs included
        assert nan_safe == bool(torch.isfinite(b).all())
