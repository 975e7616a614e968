"""The invariants that hold after every ``step()``, property-based over shapes and sparsities.

After every step, for every sparse layer: the active count is exact and equal to the count drawn
at construction; inactive weights and every inner state tensor of the weight's shape are exactly
0; newly grown weights start at 0 with zero state. 1-D parameters stay dense. RigL grows by the
dense gradient of the current batch, also for an exploration requested between steps. A layer
without a gradient at an update is skipped by it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import CASES, case_params, erk_densities, get_case, inner_state_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseopt import SparseOptimizer

pytestmark = pytest.mark.usefixtures("one_thread")

INVARIANT_CASES = [
    "sgd_wd-foreach",
    "sgd_nesterov-fused",
    "adam-forloop",
    "adamw-fused",
    "rmsprop_centered_momentum-foreach",
    "adagrad-fused",
    "adamax-foreach",  # not zero-preserving: the re-mask fallback
    "adagrad_init_acc-forloop",  # not zero-preserving: the re-mask fallback
]
SPARSITIES = [0.0, 0.5, 0.9, 0.99]

shape_2d = st.tuples(st.integers(1, 8), st.integers(1, 8))
shape_4d = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
shape_lists = st.lists(st.one_of(shape_2d, shape_4d), min_size=1, max_size=3)


def _params(shapes, g, device="cpu"):
    return [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _check_layers(opt, counts0, prev_masks):
    for i, layer in enumerate(opt.layers):
        mask, p = layer.mask, layer.param
        assert mask.dtype == torch.bool
        assert mask.shape == p.shape
        assert torch.equal(opt.masks[p], mask)  # a read-only view of the mask
        assert layer.count == counts0[i] == int(mask.sum()), f"layer {i}: count drifted"
        assert bool((p[~mask] == 0).all()), f"layer {i}: nonzero inactive weight"
        state = inner_state_tensors(opt.optimizer, p)
        for name, t in state.items():
            assert bool((t[~mask] == 0).all()), f"layer {i}: {name} nonzero at inactive"
        grown = mask & ~prev_masks[i]
        assert bool((p[grown] == 0).all()), f"layer {i}: grown weight not 0"
        for name, t in state.items():
            assert bool((t[grown] == 0).all()), f"layer {i}: {name} nonzero at grown"


def _reference_inner_step(case, inner, params, grads, masks):
    """Replay the inner step on copies: the weights and state right after the inner step.

    The copies start from the same weights and inner state and get the masked gradients, so
    they show exactly what the topology update sees (the drop scores ``|w|``).
    """
    copies = [p.detach().clone().requires_grad_() for p in params]
    ref = case.make(copies)
    ref.load_state_dict(copy.deepcopy(inner.state_dict()))
    for c, p, grad in zip(copies, params, grads, strict=True):
        mask = masks.get(p)
        c.grad = None if grad is None else (grad if mask is None else grad * mask)
    ref.step()
    if not case.keeps_zeros:  # the fallback re-masks weights and state after the inner step
        with torch.no_grad():
            for c, p in zip(copies, params, strict=True):
                if p in masks:
                    c.mul_(masks[p])
                    for t in inner_state_tensors(ref, c).values():
                        t.mul_(masks[p])
    return [c.detach() for c in copies], [inner_state_tensors(ref, c) for c in copies]


def _k(count, numel, rate):
    return min(math.floor(rate * count + 1e-9), numel - count, count)


def _smallest(scores, k):
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    out[scores.flatten().argsort(stable=True)[:k]] = True
    return out.view_as(scores)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    shapes=shape_lists,
    sparsity=st.sampled_from(SPARSITIES),
    method=st.sampled_from(["static", "set", "rigl"]),
    case_id=st.sampled_from(INVARIANT_CASES),
    update_every=st.sampled_from([1, 2]),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    gradless=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_invariants_after_every_step(
    shapes, sparsity, method, case_id, update_every, steps, seed, gradless, device
):
    """Every step equals a replayed inner step followed by the documented drop/grow."""
    case = get_case(case_id)
    rate = 0.5
    g = torch.Generator().manual_seed(seed)
    sparse = _params(shapes, g, device)
    bias = nn.Parameter(torch.randn(5, generator=g).to(device))
    params = [*sparse, bias]
    opt = SparseOptimizer(
        case.make(params),
        method,
        sparsity,
        update_every=update_every,
        prune_rate=rate,
        seed=seed,
    )
    assert all(layer.param is p for layer, p in zip(opt.layers, sparse, strict=True))
    assert bias not in opt.masks
    counts0 = [layer.count for layer in opt.layers]
    numels = [math.prod(s) for s in shapes]
    assert sum(counts0) == round((1 - sparsity) * sum(numels))
    opt.apply_masks()
    for step in range(1, steps + 1):
        prev = [layer.mask.clone() for layer in opt.layers]
        grads = [
            None if gradless[(step + i) % 4] and step > 1 else torch.randn(p.shape, generator=g)
            for i, p in enumerate(sparse)
        ] + [torch.randn(5, generator=g)]
        grads = [None if grad is None else grad.to(device) for grad in grads]
        for p, grad in zip(params, grads, strict=True):
            p.grad = None if grad is None else grad.clone()
        masks = {layer.param: m for layer, m in zip(opt.layers, prev, strict=True)}
        w_post, state_post = _reference_inner_step(case, opt.optimizer, params, grads, masks)
        opt.step()
        assert opt.step_count == step
        _check_layers(opt, counts0, prev)
        updating = method != "static" and step % update_every == 0
        for i, (layer, old) in enumerate(zip(opt.layers, prev, strict=True)):
            new = layer.mask
            # a layer without a gradient is skipped by the update: its mask stays as it is
            k = _k(layer.count, layer.numel, rate) if updating and grads[i] is not None else 0
            drop = _smallest(torch.where(old, w_post[i].abs(), torch.inf), k)
            kept = old & ~drop
            assert bool((new & kept).eq(kept).all()), f"layer {i}: a kept connection was lost"
            assert int((old & ~new).sum()) <= k
            if k == 0:
                assert torch.equal(new, old), f"layer {i}: a skipped layer's mask moved"
            if method == "rigl" and updating and grads[i] is not None:
                scores = torch.where(kept, -torch.inf, grads[i].abs())
                grown = _smallest(-scores, k)
                assert torch.equal(new, kept | grown), f"layer {i}: not grown by |dense grad|"
            # the weights and state are the inner step's, kept only where a connection stayed
            stay = new & old
            assert torch.equal(layer.param.detach(), w_post[i] * stay), f"layer {i}: weights"
            state = inner_state_tensors(opt.optimizer, layer.param)
            assert set(state) == set(state_post[i])
            for name, t in state.items():
                assert torch.equal(t, state_post[i][name] * stay), f"layer {i}: {name}"
        assert torch.equal(bias.detach(), w_post[-1])  # 1-D parameters stay dense
        assert bool((bias != 0).all())


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(shapes=shape_lists, sparsity=st.sampled_from([*SPARSITIES, 0.3, 0.75, 0.95]))
def test_initial_counts_follow_erk_exactly(shapes, sparsity):
    sparse = _params(shapes, torch.Generator().manual_seed(0))
    opt = SparseOptimizer(torch.optim.SGD(sparse, lr=0.1), "static", sparsity, seed=0)
    numels = [math.prod(s) for s in shapes]
    counts = [layer.count for layer in opt.layers]
    assert sum(counts) == round((1 - sparsity) * sum(numels))
    for c, d, n, mask in zip(
        counts, erk_densities(shapes, 1 - sparsity), numels, opt.masks.values(), strict=True
    ):
        assert 0 <= c <= n
        assert abs(c - d * n) < 1 + 1e-9
        assert int(mask.sum()) == c
    assert opt.density == sum(counts) / sum(numels)
    # the masks are drawn but nothing is applied before the first step
    assert all(bool((p != 0).all()) for p in sparse)
    opt.apply_masks()
    assert all(int((p != 0).sum()) == c for p, c in zip(sparse, counts, strict=True))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    shape=st.one_of(shape_2d, shape_4d),
    sparsity=st.sampled_from(SPARSITIES),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_one_dimensional_and_non_sparse_groups_stay_dense(shape, sparsity, distribution):
    g = torch.Generator().manual_seed(1)
    w, frozen = _params([shape, (3, 4)], g)
    b = nn.Parameter(torch.randn(7, generator=g))
    inner = torch.optim.Adam([{"params": [w, b]}, {"params": [frozen], "sparse": False}], lr=0.1)
    opt = SparseOptimizer(inner, "set", sparsity, distribution=distribution, update_every=1)
    assert len(opt.masks) == 1
    assert next(iter(opt.masks)) is w
    assert opt.layers[0].count == round((1 - sparsity) * w.numel())
    for _ in range(2):
        for p in (w, frozen, b):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert bool((b != 0).all())
    assert bool((frozen != 0).all())
    assert int((w != 0).sum()) <= opt.layers[0].count


# --- hand-computed updates ------------------------------------------------------------------------
def _crafted(method, **kw):
    """A 10x10 layer at 50% (uniform), SGD with lr 0 so the drop scores are the initial |w|."""
    g = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(10, 10, generator=g))
    inner = torch.optim.SGD([w], lr=0.0, momentum=0.9)
    opt = SparseOptimizer(inner, method, 0.5, distribution="uniform", prune_rate=0.2, seed=0, **kw)
    return w, opt, g


def _expected_rigl_mask(w, mask, grad, k):
    """Drop the ``k`` smallest ``|w|`` among active, grow the ``k`` largest ``|grad|`` elsewhere."""
    flat_w = torch.where(mask, w.detach().abs(), torch.inf).flatten()
    drop = torch.zeros(w.numel(), dtype=torch.bool)
    drop[flat_w.argsort(stable=True)[:k]] = True
    kept = mask.flatten() & ~drop
    scores = torch.where(kept, -torch.inf, grad.abs().flatten())
    grow = torch.zeros(w.numel(), dtype=torch.bool)
    grow[scores.argsort(descending=True, stable=True)[:k]] = True
    return (kept | grow).view_as(mask)


@pytest.mark.parametrize("trigger", ["periodic", "explore"])
def test_rigl_grows_by_the_dense_gradient(trigger):
    """Inactive positions get large gradients: growth must pick them, not the just-dropped ones."""
    w, opt, g = _crafted("rigl", update_every=1 if trigger == "periodic" else 1000)
    for _ in range(2):  # momentum buffers become nonzero at active positions
        w.grad = torch.randn(10, 10, generator=g)
        if trigger == "periodic":
            opt.periodic_updates = False
        opt.step()
    opt.periodic_updates = True
    mask = opt.masks[w].clone()
    assert int(mask.sum()) == 50
    grad = torch.where(mask, 0.01 * torch.rand(10, 10, generator=g), 10 + torch.rand(10, 10))
    w.grad = grad.clone()
    if trigger == "explore":
        opt.explore(0.2)
    k = math.floor(0.2 * 50)
    expected = _expected_rigl_mask(w, mask, grad, k)
    before = w.detach().clone()
    opt.step()
    new = opt.masks[w]
    assert torch.equal(new, expected)
    assert int((new & ~mask).sum()) == k
    assert int(new.sum()) == 50
    buf = opt.optimizer.state[w]["momentum_buffer"]
    changed = new ^ mask
    assert bool((w[changed] == 0).all())
    assert bool((buf[changed] == 0).all())
    assert bool((buf[new & mask] != 0).all())  # kept connections keep their momentum
    assert torch.equal(w[new & mask], before[new & mask])  # lr 0: kept weights unchanged
    if trigger == "explore":  # one exploration only
        w.grad = torch.randn(10, 10, generator=g)
        opt.step()
        assert torch.equal(opt.masks[w], new)


@pytest.mark.parametrize("method", ["static", "set"])
def test_explore_and_set_drop_the_smallest_magnitudes(method):
    w, opt, g = _crafted(method, update_every=1 if method == "set" else 1000)
    w.grad = torch.randn(10, 10, generator=g)
    opt.step()  # set: an update already at step 1; static: none
    mask = opt.masks[w].clone()
    if method == "static":
        opt.explore(0.2)
    w.grad = torch.randn(10, 10, generator=g)
    magnitudes = torch.where(mask, w.detach().abs(), torch.inf).flatten()
    smallest = torch.zeros(100, dtype=torch.bool)
    smallest[magnitudes.argsort(stable=True)[:10]] = True
    smallest = smallest.view(10, 10)
    opt.step()
    new = opt.masks[w]
    assert int(new.sum()) == 50
    # every connection that left the mask is among the 10 smallest |w|, and none of the others
    # left: the dropped set is the smallest 10 minus those grown back at random
    assert bool((mask & ~new & ~smallest).sum() == 0)
    assert int((mask & ~smallest & new).sum()) == 40  # the 40 larger ones are all kept
    assert 0 < int((mask & ~new).sum()) == int((new & ~mask).sum()) <= 10
    assert bool((w[~new] == 0).all())
    assert bool((opt.optimizer.state[w]["momentum_buffer"][new & ~mask] == 0).all())


# --- the inner optimizer's lazy state -------------------------------------------------------------
@pytest.mark.parametrize("case", case_params(CASES))
def test_nothing_written_into_inner_state_before_its_first_step(case, device):
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 5, generator=g).to(device)),
              nn.Parameter(torch.randn(5).to(device))]  # fmt: skip
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    inner, ref = case.make(params), case.make(ref_params)
    opt = SparseOptimizer(inner, "rigl", 0.5, update_every=1, seed=0)
    opt.apply_masks()
    assert [sorted(inner.state.get(p, {})) for p in params] == [
        sorted(ref.state.get(p, {})) for p in ref_params
    ]
    for _ in range(2):
        for p, q in zip(params, ref_params, strict=True):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params, strict=True):
        s, r = inner.state[p], ref.state[q]
        assert sorted(s) == sorted(r)
        for key in s:
            if isinstance(s[key], torch.Tensor):
                assert s[key].shape == r[key].shape, key
                assert s[key].dtype == r[key].dtype, key
    mask = opt.masks[params[0]]
    assert int(mask.sum()) == 15
    assert bool((params[0][~mask] == 0).all())
