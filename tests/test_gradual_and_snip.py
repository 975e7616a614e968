"""GMP, GraNet and SNIP (DESIGN.md §2-§3), checked against independent slow references.

GraNet/GMP: pruning events fall on the steps ``c * update_every`` with ``c0 < c <= cf``; after
event ``c`` the active total is ``round(d(c) * N)`` on Zhu & Gupta's cubic schedule, and exactly
the target total at ``cf``. Each event keeps the largest ``|w|`` (the weights right after the
inner step) among the active weights of all sparse layers, ties to the lowest index in packing
order; GraNet then drops ``floor(rate * active)`` smallest ``|w|`` per layer and grows as many by
the largest dense ``|grad|``, so the per-layer counts stay as the pruning left them. After ``cf``
GraNet does RigL updates; GMP never changes a mask again.

SNIP starts dense and, inside the first ``step()`` and before the inner step, keeps the top
``|grad * w|`` (global or per layer), then never changes its masks.

Everything here is computed in plain Python (sorted lists, ties to the lowest index), never by
calling the library's own schedule or selection code.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings

import pytest
import torch
from cases import (
    batches,
    erk_densities,
    get_case,
    inner_state_tensors,
    make_convnet,
    make_mlp,
    mlp,
    train_step,
)
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


# --- independent references ---------------------------------------------------------------------
def _cubic(c, c0, cf, d_i, d_f):
    """Zhu & Gupta: ``d_f + (d_i - d_f) * (1 - (c - c0) / (cf - c0)) ** 3``."""
    return d_f + (d_i - d_f) * (1 - (c - c0) / (cf - c0)) ** 3


def _expected_total(c, c0, cf, d_i, sparsity, n):
    if c == cf:
        return round((1 - sparsity) * n)
    return round(_cubic(c, c0, cf, d_i, 1 - sparsity) * n)


def _rate(step, total, prune_rate, schedule, stop_fraction=0.75):
    if schedule == "constant":
        return prune_rate
    end = math.floor(stop_fraction * total)
    return prune_rate * 0.5 * (1.0 + math.cos(math.pi * min(step, end) / end))


def _flat(t):
    return t.reshape(-1).tolist()


def _to_masks(chosen, shapes):
    out, off = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(torch.tensor([off + i in chosen for i in range(n)]).view(shape))
        off += n
    return out


def _ref_global_prune(weights, masks, keep):
    """The ``keep`` largest ``|w|`` among the active entries of all layers, ties to lowest index."""
    entries, off = [], 0
    for w, m in zip(weights, masks, strict=True):
        for i, (x, a) in enumerate(zip(_flat(w), _flat(m), strict=True)):
            if a:
                entries.append((-abs(x), off + i))
        off += w.numel()
    chosen = {g for _, g in sorted(entries)[:keep]}
    return _to_masks(chosen, [tuple(w.shape) for w in weights])


def _ref_top(scores, keep):
    """Bool masks of the global top ``keep`` scores over a list of tensors, ties to lowest index."""
    entries, off = [], 0
    for s in scores:
        entries += [(-x, off + i) for i, x in enumerate(_flat(s))]
        off += s.numel()
    chosen = {g for _, g in sorted(entries)[:keep]}
    return _to_masks(chosen, [tuple(s.shape) for s in scores])


def _ref_drop_grow(mask, w, g, k):
    """Drop the ``k`` smallest ``|w|`` active, grow the ``k`` largest ``|g|`` of the rest."""
    m, wl, gl = _flat(mask), _flat(w), _flat(g)
    n = len(m)
    drop = {i for _, i in sorted((abs(wl[i]), i) for i in range(n) if m[i])[:k]}
    kept = [m[i] and i not in drop for i in range(n)]
    grow = {i for _, i in sorted((-abs(gl[i]), i) for i in range(n) if not kept[i])[:k]}
    return torch.tensor([kept[i] or i in grow for i in range(n)]).view(mask.shape)


def _counts(masks):
    return [int(m.sum()) for m in masks]


def _check_invariants(opt, prev_masks=None):
    """Inactive weights and inner state exactly 0, counts exact; grown weights start at 0."""
    for i, layer in enumerate(opt.layers):
        mask, p = layer.mask, layer.param
        assert layer.count == int(mask.sum()), f"layer {i}: count {layer.count} != mask.sum()"
        assert bool((p[~mask] == 0).all()), f"layer {i}: nonzero inactive weight"
        state = inner_state_tensors(opt.optimizer, p)
        for name, t in state.items():
            assert bool((t[~mask] == 0).all()), f"layer {i}: {name} nonzero at inactive"
        if prev_masks is not None:
            grown = mask & ~prev_masks[i]
            assert bool((p[grown] == 0).all()), f"layer {i}: grown weight not 0"
            for name, t in state.items():
                assert bool((t[grown] == 0).all()), f"layer {i}: {name} nonzero at grown"
    n = sum(layer.numel for layer in opt.layers)
    assert opt.density == sum(layer.count for layer in opt.layers) / n


def _mlp_small(seed=0):
    """MLP 8 -> 16 -> 4."""
    return mlp(8, 16, 4, seed=seed)


# --- GraNet / GMP: the schedule, the global prune, the regrowth -------------------------------
# (T, update_every, start_step, end_step, initial_density, sparsity, prune_schedule, prune_rate,
#  stop_fraction)
SETTINGS = {
    # window [0, 20] of 40, ends on multiples of 4; events 4..20; RigL after cf at 24, 28
    "plain": (40, 4, 0, 20, 0.5, 0.9, "constant", 0.5, 0.75),
    # window (5, 35] of 50, neither end a multiple of 3: c0=1, cf=11; events 6..33; RigL at
    # 36..48 on a cosine rate that ends at step 50
    "offset": (50, 3, 5, 35, 0.8, 0.8, "cosine", 0.5, 1.0),
    # dense start; window (3, 21] of 30 with update_every 2: c0=1, cf=10; RigL at 22
    "dense": (30, 2, 3, 21, 1.0, 0.95, "constant", 0.3, 0.75),
}


@pytest.mark.parametrize("method", ["granet", "gmp"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gradual_schedule_prune_and_regrowth_match_slow_reference(method, setting):
    total, every, start_step, end_step, d_i, sparsity, schedule, prune_rate, stop_fraction = (
        SETTINGS[setting]
    )
    c0, cf = start_step // every, end_step // every
    assert (c0, cf) == {"plain": (0, 5), "offset": (1, 11), "dense": (1, 10)}[setting]
    model = make_mlp(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = SparseOptimizer(
        inner,
        method,
        sparsity,
        update_every=every,
        total_steps=total,
        initial_density=d_i,
        prune_start=start_step / total,
        prune_end=end_step / total,
        prune_schedule=schedule,
        prune_rate=prune_rate,
        stop_fraction=stop_fraction,
        seed=3,
    )
    layers = opt.layers
    n = sum(layer.numel for layer in layers)
    assert n == 8 * 16 + 16 * 16 + 16 * 4
    target_total = round((1 - sparsity) * n)
    assert sum(layer.target for layer in layers) == target_total
    assert sum(layer.count for layer in layers) == round(d_i * n)
    if d_i == 1.0:
        assert all(bool(layer.mask.all()) for layer in layers)

    snap = {}

    def after_inner_step(_opt, _args, _kwargs):
        snap["w"] = [layer.param.detach().clone() for layer in layers]

    inner.register_step_post_hook(after_inner_step)
    stop = math.floor(stop_fraction * total)
    events, regrown_somewhere, rigl_moved = [], False, False
    ever_pruned = [torch.zeros_like(layer.mask) for layer in layers]
    masks_at_cf = None
    for step, (x, y) in enumerate(batches("mlp", total, seed=1), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [layer.param.grad.clone() for layer in layers]  # dense, before masking
        old = [layer.mask.clone() for layer in layers]
        opt.step()
        new = [layer.mask.clone() for layer in layers]
        c = step // every
        is_event = step % every == 0 and c0 < c <= cf
        is_rigl = method == "granet" and step % every == 0 and cf * every < step <= stop
        rate = _rate(step, total, prune_rate, schedule, stop_fraction)
        if is_event:
            keep = _expected_total(c, c0, cf, d_i, sparsity, n)
            events.append((step, keep))
            pruned = _ref_global_prune(snap["w"], old, keep)
            if method == "gmp":
                expected = pruned
            else:
                expected = []
                for m, w, g in zip(pruned, snap["w"], grads, strict=True):
                    active = int(m.sum())
                    k = min(math.floor(rate * active + 1e-9), m.numel() - active)
                    expected.append(_ref_drop_grow(m, w, g, k))
                regrown_somewhere |= any(
                    not torch.equal(e, p) for e, p in zip(expected, pruned, strict=True)
                )
            # the regrowth leaves every layer's count where the global prune put it
            assert _counts(new) == _counts(pruned), f"step {step}: per-layer counts"
            assert sum(_counts(new)) == keep, f"step {step}: total after event {c}"
            assert opt.density == keep / n
        elif is_rigl:
            expected = []
            for m, w, g in zip(old, snap["w"], grads, strict=True):
                count = int(m.sum())
                k = min(math.floor(rate * count + 1e-9), m.numel() - count, count)
                expected.append(_ref_drop_grow(m, w, g, k))
            assert _counts(new) == _counts(old), f"step {step}: RigL changed a count"
            rigl_moved |= any(not torch.equal(e, o) for e, o in zip(expected, old, strict=True))
        else:
            expected = old
        for i, (e, m) in enumerate(zip(expected, new, strict=True)):
            assert torch.equal(m, e), f"step {step}, layer {i}: mask differs from the reference"
        # weights: the inner step's values where a connection stayed, 0 elsewhere
        for i, layer in enumerate(layers):
            stay = new[i] & old[i]
            assert torch.equal(layer.param.detach(), torch.where(stay, snap["w"][i], 0.0))
        _check_invariants(opt, old)
        if method == "gmp":  # no regrowth: a pruned weight never comes back
            for i, m in enumerate(new):
                assert not bool((m & ever_pruned[i]).any()), f"step {step}: GMP regrew"
                ever_pruned[i] |= ~m
        if step == cf * every:
            masks_at_cf = new
    assert [s for s, _ in events] == [c * every for c in range(c0 + 1, cf + 1)]
    assert events[-1][1] == target_total
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(events))
    assert events[0][1] < round(d_i * n)
    assert sum(layer.count for layer in opt.layers) == target_total  # the layers of now
    assert opt.density == target_total / n
    if method == "gmp":
        assert all(torch.equal(a, b.mask) for a, b in zip(masks_at_cf, layers, strict=True))
    else:
        assert regrown_somewhere, "the regrowth never moved a connection: weak test"
        assert rigl_moved, "no RigL update after cf moved a connection: weak test"


@pytest.mark.parametrize("method", ["gmp", "granet"])
@pytest.mark.parametrize(
    "bad_step",
    [
        12,  # an intermediate event: the next event (16) catches up with the schedule
        20,  # the last event: the next step with finite gradients prunes to the target
    ],
)
def test_non_finite_gradient_on_a_pruning_event(method, bad_step):
    """NaN at an inactive position: the update is skipped (warning), the inner step is clean."""
    total, every, d_i, sparsity = 40, 4, 0.5, 0.9  # c0 = 0, cf = 5: events 4, 8, ..., 20
    model = make_mlp(0)
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        method,
        sparsity,
        update_every=every,
        total_steps=total,
        initial_density=d_i,
        prune_end=0.5,
        seed=0,
    )
    n = sum(layer.numel for layer in opt.layers)
    totals = {}
    for step, (x, y) in enumerate(batches("mlp", total, seed=6), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == bad_step:
            layer = opt.layers[0]
            layer.param.grad[tuple((~layer.mask).nonzero()[0].tolist())] = float("nan")
            before = [m.clone() for m in opt.masks.values()]
            with pytest.warns(UserWarning, match=r"non-finite gradients at step"):
                opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before, opt.masks.values(), strict=True))
        else:
            opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        totals[step] = sum(layer.count for layer in opt.layers)
    if bad_step == 12:
        assert totals[16] == _expected_total(4, 0, 5, d_i, sparsity, n)
    assert totals[total] == round((1 - sparsity) * n)


def _hand_net():
    a = nn.Parameter(torch.tensor([[0.5, -0.1, 0.3], [-0.3, 0.0, 0.9]]))
    b = nn.Parameter(torch.tensor([[0.3, -0.7], [0.05, 0.2]]))
    return a, b


@pytest.mark.parametrize("method", ["gmp", "granet"])
def test_global_prune_by_hand_dense_start(method):
    """One event (the last: exactly 5 of 10 kept) on hand-set weights, lr=0, known gradient.

    |w| in packing order: a = .5 .1 .3 | .3 0 .9, b = .3 .7 | .05 .2. The five largest are .9,
    .7, .5 and two of the three tied .3 (a[0,2], a[1,0], b[0,0]): the lowest indices, a's two.
    GraNet then drops floor(0.5 * 4) = 2 of a's four (a[0,2] and a[1,0], the smallest) and grows
    the two largest |grad| of a's other four: grads 4, 0.1, 4, 4 at a[0,1], a[0,2], a[1,0],
    a[1,1] -> a[0,1] and a[1,0] (ties to the lowest index). Both were active before the event,
    so they keep their values. b has one active weight: floor(0.5) = 0, no regrowth.
    """
    a, b = _hand_net()
    a0, b0 = a.detach().clone(), b.detach().clone()
    inner = torch.optim.SGD([a, b], lr=0.0)
    opt = SparseOptimizer(
        inner,
        method,
        0.5,
        update_every=1,
        total_steps=2,
        initial_density=1.0,
        prune_end=0.5,
        prune_schedule="constant",
        prune_rate=0.5,
        seed=0,
    )
    assert opt.density == 1.0
    a.grad = torch.tensor([[0.0, 4.0, 0.1], [-4.0, 4.0, 0.0]])
    b.grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    opt.step()
    T, F = True, False
    if method == "gmp":
        ma = torch.tensor([[T, F, T], [T, F, T]])
    else:
        ma = torch.tensor([[T, T, F], [T, F, T]])
    mb = torch.tensor([[F, T], [F, F]])
    assert torch.equal(opt.masks[a], ma)
    assert torch.equal(opt.masks[b], mb)
    assert torch.equal(a.detach(), torch.where(ma, a0, 0.0))
    assert torch.equal(b.detach(), torch.where(mb, b0, 0.0))
    assert opt.density == 0.5
    # after the last event: GMP never moves again; GraNet's RigL has stop step floor(1.5) = 1
    a.grad = torch.ones(2, 3)
    b.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(opt.masks[a], ma)
    assert torch.equal(opt.masks[b], mb)


def test_global_prune_by_hand_sparse_start_and_two_events():
    """lr=0 and fixed weights: two GMP events prune a fixed ranking of the initial weights."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(6, 5))
    b = nn.Parameter(torch.randn(4, 6))
    w0 = [a.detach().clone(), b.detach().clone()]
    opt = SparseOptimizer(
        torch.optim.SGD([a, b], lr=0.0),
        "gmp",
        0.75,
        update_every=2,
        total_steps=8,
        initial_density=0.6,
        prune_start=0.0,
        prune_end=0.5,
        seed=5,
    )
    n = 54
    init = [opt.masks[a].clone(), opt.masks[b].clone()]
    assert sum(_counts(init)) == round(0.6 * n)
    keeps = []
    for step in range(1, 9):
        a.grad, b.grad = torch.ones(6, 5), torch.ones(4, 6)
        opt.step()
        if step in (2, 4):  # c0 = 0, cf = 2
            keep = _expected_total(step // 2, 0, 2, 0.6, 0.75, n)
            keeps.append(keep)
            expected = _ref_global_prune(w0, init, keep)
            assert torch.equal(opt.masks[a], expected[0])
            assert torch.equal(opt.masks[b], expected[1])
    # round((0.25 + 0.35/8) * 54) = round(15.86) = 16, then exactly round(0.25 * 54) = 14
    assert keeps == [16, 14]
    assert sum(_counts(opt.masks.values())) == 14


# --- SNIP -------------------------------------------------------------------------------------
SNIP_MODELS = {"mlp": (_mlp_small, (6, 8)), "convnet": (make_convnet, (6, 3, 6, 6))}


def _snip_batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)


@pytest.mark.parametrize("kind", list(SNIP_MODELS))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_snip_masks_are_top_grad_times_weight(kind, scope):
    build, xshape = SNIP_MODELS[kind]
    model = build(0)
    sparsity = 0.8
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "snip", sparsity, scope=scope, seed=0
    )
    layers = opt.layers
    assert opt.density == 1.0
    assert all(bool(m.all()) for m in opt.masks.values())
    n = sum(layer.numel for layer in layers)
    w0 = [layer.param.detach().clone() for layer in layers]
    others0 = [p.detach().clone() for p in model.parameters() if p.ndim < 2]
    x, y = _snip_batch(xshape)
    nn.functional.cross_entropy(model(x), y).backward()
    scores = [(layer.param.grad * layer.param).detach().abs() for layer in layers]
    opt.step()
    if scope == "global":
        expected = _ref_top(scores, round((1 - sparsity) * n))
    else:
        shapes = [tuple(layer.param.shape) for layer in layers]
        targets = [layer.target for layer in layers]
        assert sum(targets) == round((1 - sparsity) * n)
        for t, d, layer in zip(targets, erk_densities(shapes, 1 - sparsity), layers, strict=True):
            assert abs(t - d * layer.numel) < 1 + 1e-9
        expected = [_ref_top([s], t)[0] for s, t in zip(scores, targets, strict=True)]
    for i, (layer, e, w) in enumerate(zip(layers, expected, w0, strict=True)):
        assert torch.equal(layer.mask, e), f"layer {i}: mask"
        # no re-initialisation: kept weights bit-identical, the rest exactly 0
        assert torch.equal(layer.param.detach(), torch.where(e, w, 0.0)), f"layer {i}: weights"
    assert all(
        torch.equal(p.detach(), o)
        for p, o in zip([p for p in model.parameters() if p.ndim < 2], others0, strict=True)
    )
    assert sum(_counts(expected)) == round((1 - sparsity) * n)
    assert opt.density == round((1 - sparsity) * n) / n
    if scope == "layer":
        assert _counts(expected) == [layer.target for layer in layers]
    _check_invariants(opt)


def test_snip_first_inner_step_sees_masked_gradients_and_masks_stay_fixed():
    model = _mlp_small(1)
    lr = 0.1
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=False)
    opt = SparseOptimizer(inner, "snip", 0.7, update_every=1, seed=0)
    layers = opt.layers
    w0 = [layer.param.detach().clone() for layer in layers]
    seen = []  # what the inner step is handed: (grads, weights) of the sparse layers

    def before_inner_step(_opt, _args, _kwargs):
        seen.append(
            (
                [layer.param.grad.clone() for layer in layers],
                [layer.param.detach().clone() for layer in layers],
            )
        )

    inner.register_step_pre_hook(before_inner_step)
    data = batches("mlp", 8, seed=3)
    x, y = data[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [layer.param.grad.clone() for layer in layers]
    opt.step()
    masks = [layer.mask.clone() for layer in layers]
    assert opt.density < 1.0
    # the masks were in place before the inner step: it saw masked gradients and weights
    assert len(seen) == 1
    for i, (g, w, m) in enumerate(zip(grads, w0, masks, strict=True)):
        assert torch.equal(seen[0][0][i], torch.where(m, g, 0.0)), f"layer {i}: grad not masked"
        assert torch.equal(seen[0][1][i], torch.where(m, w, 0.0)), f"layer {i}: weight not masked"
    for i, (layer, g, w, m) in enumerate(zip(layers, grads, w0, masks, strict=True)):
        buf = inner.state[layer.param]["momentum_buffer"]
        assert bool((buf[~m] == 0).all()), f"layer {i}: momentum saw an unmasked gradient"
        assert torch.equal(buf[m], g[m]), f"layer {i}: momentum != gradient at kept positions"
        assert torch.equal(layer.param.detach(), torch.where(m, w.add(g, alpha=-lr), 0.0))
    for step in range(2, 9):
        train_step(model, opt, data[step - 1])
        assert opt.step_count == step
        for i, (layer, m) in enumerate(zip(layers, masks, strict=True)):
            assert torch.equal(layer.mask, m), f"step {step}, layer {i}: SNIP mask changed"
        _check_invariants(opt)


def test_snip_first_step_without_backward_raises_then_recovers():
    model = _mlp_small(0)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), "snip", 0.8, seed=0)
    with pytest.raises(ValueError, match=r"backward"):
        opt.step()
    assert opt.density == 1.0
    assert opt.step_count == 0
    x, y = _snip_batch((6, 8))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.step_count == 1
    n = sum(layer.numel for layer in opt.layers)
    assert opt.density == round(0.2 * n) / n


def test_snip_non_finite_first_gradient_warns_stays_dense_then_initializes():
    model = _mlp_small(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.0, foreach=False)
    opt = SparseOptimizer(inner, "snip", 0.8, seed=0)
    layers = opt.layers
    params0 = [p.detach().clone() for p in model.parameters()]
    x, y = _snip_batch((6, 8))
    nn.functional.cross_entropy(model(x), y).backward()
    layers[0].param.grad[0, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"non-finite"):
        opt.step()
    assert opt.density == 1.0
    assert all(bool(layer.mask.all()) for layer in layers)
    assert opt.report()["updates"]["skipped"] == 1
    assert not opt.method.initialized
    # the inner step ran on the inf gradient (lr * inf = nan): put the weights back by hand
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), params0, strict=True):
            p.copy_(p0)
    opt.zero_grad()
    x, y = _snip_batch((6, 8), seed=1)
    nn.functional.cross_entropy(model(x), y).backward()
    w = [layer.param.detach().clone() for layer in layers]
    scores = [(layer.param.grad * layer.param).detach().abs() for layer in layers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    n = sum(layer.numel for layer in layers)
    expected = _ref_top(scores, round(0.2 * n))
    for layer, e, w0 in zip(layers, expected, w, strict=True):
        assert torch.equal(layer.mask, e)
        assert torch.equal(layer.param.detach(), torch.where(e, w0, 0.0))


# --- composition with Sup-tickets -------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("granet", {"update_every": 4, "prune_end": 0.5}),
        ("granet", {"update_every": 4, "prune_end": 0.8, "initial_density": 1.0}),  # cf == phase 1
        ("gmp", {"update_every": 4, "prune_start": 0.1, "prune_end": 0.6}),
        ("snip", {}),
        ("snip", {"scope": "layer"}),
    ],
)
def test_suptickets_composition(method, options):
    total, cycle = 40, 4  # M = floor(0.2 * 40 / 4) = 2 tickets, phase 1 = 32 steps
    model = make_mlp(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt = SparseOptimizer(inner, method, 0.9, model=model, seed=0, **options)
    assert opt.total_steps is None
    sched = SupTicketsScheduler(
        opt, total, cycle, superpose_fraction=0.2, lr_low=0.01, lr_high=0.05, base="constant"
    )
    assert opt.total_steps == total
    assert sched.num_tickets == 2
    assert sched.phase1_steps == 32
    n = sum(layer.numel for layer in opt.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches("mlp", total, seed=2):
            train_step(model, opt, batch)
            sched.step()
            _check_invariants(opt)
    assert opt.step_count == total
    assert opt.tickets == 2
    assert sum(layer.count for layer in opt.layers) == round(0.1 * n)
    assert opt.density == round(0.1 * n) / n


def test_suptickets_refuses_granet_pruning_into_phase2():
    model = make_mlp(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    # cf = floor(36) // 4 = 9: the last event is step 36; phase 2 starts after step 32
    opt = SparseOptimizer(
        inner, "granet", 0.9, update_every=4, total_steps=40, prune_end=0.9, seed=0
    )
    with pytest.raises(ValueError, match=r"step 36.*step 32"):
        SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.2)


# --- bit-exact resume ---------------------------------------------------------------------------
RESUME_TOTAL = 30
RESUME_OPTIONS = {
    # c0 = 1, cf = 6: events at 6, 9, 12, 15, 18; RigL after cf at 21 (stop 22)
    "granet": {
        "update_every": 3,
        "total_steps": RESUME_TOTAL,
        "prune_start": 0.1,
        "prune_end": 0.6,
        "prune_rate": 0.5,
    },
    "snip": {},
}


def _resume_build(method, init_seed):
    model = make_mlp(init_seed)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = SparseOptimizer(inner, method, 0.8, seed=11, **RESUME_OPTIONS[method])
    return model, opt


def _fingerprint(model, opt):
    out = {f"p.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for layer in opt.layers:
        out[f"mask.{layer.index}"] = layer.mask.clone()
    for i, p in enumerate(model.parameters()):
        for k, v in inner_state_tensors(opt.optimizer, p).items():
            out[f"state.{i}.{k}"] = v.clone()
    return out


@pytest.mark.parametrize(
    ("method", "stop_at"),
    [
        ("granet", 10),  # between two events
        ("granet", 11),  # right before an event: the event runs after the resume
        ("granet", 12),  # right after an event step
        ("granet", 18),  # right after the last event (cf)
        ("granet", 20),  # after cf, before the RigL update at 21
        ("snip", 0),  # before its first step
        ("snip", 1),
        ("snip", 4),
    ],
)
def test_resume_is_bit_exact(method, stop_at):
    data = batches("mlp", RESUME_TOTAL, seed=4)
    model, opt = _resume_build(method, 0)
    for batch in data:
        train_step(model, opt, batch)
    reference = _fingerprint(model, opt)

    model, opt = _resume_build(method, 0)
    for batch in data[:stop_at]:
        train_step(model, opt, batch)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt = _resume_build(method, 1)  # another init: everything must come from ckpt
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.step_count == stop_at
    for batch in data[stop_at:]:
        train_step(model, opt, batch)
    resumed = _fingerprint(model, opt)
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    assert opt.density < 0.5


# --- bad input ----------------------------------------------------------------------------------
def _params():
    return [nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(4, 8))]


def _build(method, sparsity=0.9, **kw):
    return SparseOptimizer(torch.optim.SGD(_params(), lr=0.1), method, sparsity, **kw)


@pytest.mark.parametrize("method", ["granet", "gmp"])
@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (
            {"initial_density": 0.05},
            r"initial_density=0\.05 is below the target density 0\.1 \(sparsity 0\.9\)",
        ),
        ({"initial_density": 0}, r"Expected initial_density in \(0, 1\], but got 0"),
        ({"initial_density": 1.5}, r"Expected initial_density in \(0, 1\], but got 1\.5"),
        ({"prune_start": 0.5, "prune_end": 0.5}, r"Expected prune_end > prune_start"),
        ({"prune_start": 0.6, "prune_end": 0.3}, r"prune_start=0\.6, prune_end=0\.3"),
        ({"prune_start": 1.0}, r"Expected prune_start in \[0, 1\), but got 1\.0"),
        ({"prune_end": 0.0}, r"Expected prune_end in \(0, 1\], but got 0\.0"),
        (  # steps 1 to 3 of 10 hold no multiple of 4
            {"total_steps": 10, "update_every": 4, "prune_start": 0.1, "prune_end": 0.3},
            r"holds no multiple of update_every=4",
        ),
    ],
)
def test_gradual_bad_input(method, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        _build(method, **kw)


@pytest.mark.parametrize("method", ["granet", "gmp"])
def test_gradual_needs_total_steps_at_first_step(method):
    opt = _build(method, update_every=2)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=rf"method '{method}' needs total_steps"):
        opt.step()
    # a window without an update step is refused when total_steps arrives, and rolled back
    with pytest.raises(ValueError, match=r"holds no multiple of update_every=2"):
        opt.total_steps = 1
    assert opt.total_steps is None
    opt.total_steps = 40
    opt.step()
    assert opt.step_count == 1


def test_snip_bad_scope():
    with pytest.raises(ValueError, match=r"Expected scope in \('global', 'layer'\), but got 'foo'"):
        _build("snip", scope="foo")


@pytest.mark.parametrize("method", ["granet", "gmp", "snip"])
def test_unknown_option(method):
    with pytest.raises(TypeError, match=rf"method '{method}' got unexpected keyword.*'bogus'"):
        _build(method, total_steps=20, bogus=1)


# --- invariants across inner optimizers -------------------------------------------------------
INVARIANT_CASES = ["sgd_momentum-forloop", "adam-fused", "adagrad-foreach"]
INVARIANT_METHODS = {
    "granet": {"update_every": 3, "total_steps": 24, "prune_rate": 0.5},  # events 3..12; 15, 18
    "granet-dense": {"update_every": 3, "total_steps": 24, "initial_density": 1.0},
    "gmp": {"update_every": 3, "total_steps": 24, "prune_start": 0.2, "prune_end": 0.7},
    "snip": {},
    "snip-layer": {"scope": "layer"},
}


@pytest.mark.parametrize("method", list(INVARIANT_METHODS))
@pytest.mark.parametrize("case_id", INVARIANT_CASES)
def test_invariants_after_every_step(method, case_id):
    model = make_mlp(2)
    opt = SparseOptimizer(
        get_case(case_id).make(model.parameters()),
        method.split("-")[0],
        0.85,
        seed=1,
        **INVARIANT_METHODS[method],
    )
    densities = []
    for batch in batches("mlp", 24, seed=5):
        prev = [layer.mask.clone() for layer in opt.layers]
        train_step(model, opt, batch)
        _check_invariants(opt, prev)
        densities.append(opt.density)
    n = sum(layer.numel for layer in opt.layers)
    assert densities[-1] == round(0.15 * n) / n
    assert densities == sorted(densities, reverse=True)  # the density only goes down


def test_load_state_dict_refuses_other_method_options():
    model = make_mlp(0)

    def build(prune_end):
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        return SparseOptimizer(
            inner, "granet", 0.9, update_every=4, total_steps=40, prune_end=prune_end, seed=0
        )

    state = build(0.5).state_dict()
    other = build(0.4)
    with pytest.raises(ValueError, match=r"method options .*'prune_end': 0\.5.*'prune_end': 0\.4"):
        other.load_state_dict(state)
    del other  # one SparseOptimizer per parameter at a time
    build(0.5).load_state_dict(state)
