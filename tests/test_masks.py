"""Hand-computed masks: selection primitives, drop-and-grow, and SET / RigL / static updates.

The optimizer tests use a bias-free ``Linear(4, 4)`` with hand-set weights, mask and gradient,
``SGD(lr=0)`` (so the weights do not move), ``update_every=1`` and a constant prune rate of 0.25:
with 8 active weights an update exchanges ``k = floor(0.25 * 8) = 2`` connections.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import mlp
from torch import nn

from sparseopt import SparseOptimizer
from sparseopt._select import sample_stride
from sparseopt.masks import (
    drop_and_grow,
    random_mask,
    select_largest,
    select_largest_across,
    select_smallest,
)
from sparseopt.schedules import TopologySchedule

INF = float("inf")


def flat_mask(indices, n=16, shape=(4, 4)):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(indices)] = True
    return m.view(shape)


def indices(mask):
    return set(torch.nonzero(mask.reshape(-1)).flatten().tolist())


# --- select_smallest / select_largest ------------------------------------------------------------


def test_select_smallest_ties_lowest_index():
    s = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 1.0])
    assert select_smallest(s, 1).tolist() == [False, True, False, False, False, False]
    assert select_smallest(s, 2).tolist() == [False, True, False, True, False, False]
    assert select_smallest(s, 3).tolist() == [False, True, False, True, False, True]
    assert select_smallest(s, 4).tolist() == [False, True, True, True, False, True]
    # a tie at the k-th value among values that are all below: 0 first, then the lowest-index 1s
    s = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    assert select_smallest(s, 3).tolist() == [False, True, True, False, True]


def test_select_largest_ties_lowest_index():
    s = torch.tensor([3.0, 7.0, 2.0, 7.0, 7.0, -1.0])
    assert select_largest(s, 1).tolist() == [False, True, False, False, False, False]
    assert select_largest(s, 2).tolist() == [False, True, False, True, False, False]
    assert select_largest(s, 4).tolist() == [True, True, False, True, True, False]


def test_select_k_zero_and_n():
    s = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    assert select_smallest(s, 0).tolist() == [[False, False], [False, False]]
    assert select_smallest(s, 4).tolist() == [[True, True], [True, True]]
    assert select_largest(s, 0).tolist() == [[False, False], [False, False]]
    assert select_largest(s, 4).tolist() == [[True, True], [True, True]]
    # the shape of the scores is kept
    assert select_smallest(s, 2).tolist() == [[False, True], [False, True]]
    assert select_largest(s, 1).tolist() == [[False, False], [True, False]]
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="k="):
            select_smallest(s, bad)


def test_select_inf_handling():
    s = torch.tensor([INF, 1.0, INF, 2.0, -INF])
    # -inf is the smallest; +inf is taken only after every finite score, lowest index first
    assert select_smallest(s, 1).tolist() == [False, False, False, False, True]
    assert select_smallest(s, 3).tolist() == [False, True, False, True, True]
    assert select_smallest(s, 4).tolist() == [True, True, False, True, True]
    # select_largest: +inf first (lowest index first), -inf last
    assert select_largest(s, 1).tolist() == [True, False, False, False, False]
    assert select_largest(s, 2).tolist() == [True, False, True, False, False]
    assert select_largest(s, 4).tolist() == [True, True, True, True, False]
    g = torch.tensor([-INF, 0.0, -INF, -INF])
    assert select_largest(g, 2).tolist() == [True, True, False, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_select_other_dtypes(dtype):
    s = torch.tensor([0.5, 0.25, 0.25, 1.0], dtype=dtype)
    assert select_smallest(s, 2).tolist() == [False, True, True, False]
    assert select_largest(s, 2).tolist() == [True, False, False, True]


def _reference_select(scores, k, largest):
    """Reference: a full stable sort (equal scores keep index order), the first k indices."""
    flat = scores.reshape(-1).double()
    order = torch.sort(-flat if largest else flat, stable=True).indices
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order[:k]] = True
    return out.view_as(scores)


@pytest.mark.parametrize(
    "kind", ["uniform", "few values", "mostly inf", "zeros and grads", "all equal", "adversarial"]
)
@pytest.mark.parametrize("k", [1, 777, 9_000, 150_000, 280_000, 300_006])
def test_select_on_large_tensors_matches_a_sort(kind, k):
    # Above 4 * 2**16 scores the k-th value is searched only between two quantiles of a strided
    # sample; the result must equal a full stable sort, ties and infinities included, for k from 1
    # to n - 1 (GraNet's global prune keeps most of the scores).
    g = torch.Generator().manual_seed(k)
    n = 300_007
    if kind == "uniform":
        s = torch.rand(n, generator=g)
    elif kind == "few values":
        s = torch.randint(0, 7, (n,), generator=g).float()
    elif kind == "mostly inf":  # inactive positions at +inf, as drop_and_grow scores them
        s = torch.where(torch.rand(n, generator=g) < 0.9, INF, torch.rand(n, generator=g))
    elif kind == "zeros and grads":  # many exact zeros (grown weights), a few magnitudes
        s = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, torch.rand(n, generator=g))
    elif kind == "all equal":
        s = torch.full((n,), 0.25)
    else:  # the strided sample sees only the best scores: the bracket fails, the full search runs
        s = torch.ones(n)
        s[:: sample_stride(n)] = 0.0
    for largest in (False, True):
        t = -s if largest and kind == "adversarial" else s
        got = (select_largest if largest else select_smallest)(t, k)
        assert int(got.sum()) == k
        assert torch.equal(got, _reference_select(t, k, largest)), (kind, k, largest)


@pytest.mark.parametrize("n", [65_537, 4_500_001])  # the smallest and the largest sample sizes
def test_select_matches_a_sort_at_the_ends_of_the_sample_sizes(n):
    g = torch.Generator().manual_seed(n)
    s = torch.where(torch.rand(n, generator=g) < 0.3, 0.0, torch.rand(n, generator=g))
    for k in (1, n // 3, n - 2):
        for largest in (False, True):
            got = (select_largest if largest else select_smallest)(s, k)
            assert torch.equal(got, _reference_select(s, k, largest)), (k, largest)


def _rule_reference(scores, k, largest):
    """The selection rule by hand: NaN ranks with the worst infinity, -0.0 equals 0.0, and a
    stable sort keeps equal scores in index order."""
    worst = -INF if largest else INF
    flat = [worst if math.isnan(v) else v for v in scores.double().reshape(-1).tolist()]
    order = sorted(range(len(flat)), key=lambda i: (-flat[i] if largest else flat[i], i))
    out = torch.zeros(len(flat), dtype=torch.bool)
    out[order[:k]] = True
    return out.view(scores.shape)


@pytest.mark.parametrize("seed", range(6))
def test_nan_is_the_worst_score_in_every_selection(seed):
    """NaN ranks with -inf for the largest and with +inf for the smallest, ties by index; the
    count is exact for every k (before the rule, a NaN at the k-th largest left masks short)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-2, 3, (23,), generator=g).double()
    pick = torch.rand(23, generator=g)
    s[pick < 0.2] = math.nan
    s[(pick >= 0.2) & (pick < 0.3)] = INF
    s[(pick >= 0.3) & (pick < 0.4)] = -INF
    s[(pick >= 0.4) & (pick < 0.5) & (s == 0)] = -0.0
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        t = s.to(dtype)
        for k in range(24):
            for largest in (False, True):
                got = (select_largest if largest else select_smallest)(t, k)
                assert torch.equal(got, _rule_reference(t, k, largest)), (dtype, k, largest)
        across = select_largest_across([t[:9], t[9:].view(2, 7)], 12)
        assert torch.equal(torch.cat([m.reshape(-1) for m in across]), _rule_reference(t, 12, True))


def test_nan_by_hand():
    nan = math.nan
    s = torch.tensor([nan, 1.0, -INF, nan, 2.0])
    assert select_largest(s, 1).tolist() == [False, False, False, False, True]
    assert select_largest(s, 3).tolist() == [True, True, False, False, True]  # NaN ties -inf
    assert select_smallest(s, 4).tolist() == [True, True, True, False, True]
    assert select_smallest(torch.tensor([INF, nan, INF]), 2).tolist() == [True, True, False]


@pytest.mark.parametrize("k", [1, 9_000, 150_000, 299_000])
def test_nan_on_large_tensors_takes_the_sampled_path_to_the_same_mask(k):
    g = torch.Generator().manual_seed(k)
    n = 300_007
    s = torch.where(torch.rand(n, generator=g) < 0.3, 0.0, torch.rand(n, generator=g))
    s[torch.rand(n, generator=g) < 0.05] = math.nan
    for largest in (False, True):
        got = (select_largest if largest else select_smallest)(s, k)
        assert int(got.sum()) == k
        ref = _reference_select(torch.where(s.isnan(), -INF if largest else INF, s), k, largest)
        assert torch.equal(got, ref), (k, largest)


def test_integer_scores_are_compared_exactly():
    s = torch.tensor([2**40, 2**40 + 1, 2**40], dtype=torch.int64)  # float32 would tie them
    assert select_largest(s, 1).tolist() == [False, True, False]
    assert select_smallest(s, 2).tolist() == [True, False, True]


def test_random_mask_exact_count():
    g = torch.Generator().manual_seed(0)
    m = random_mask((5, 7), 12, g)
    assert m.shape == (5, 7)
    assert m.dtype == torch.bool
    assert int(m.sum()) == 12
    assert torch.equal(random_mask((5, 7), 12, torch.Generator().manual_seed(0)), m)
    with pytest.raises(ValueError, match="count="):
        random_mask((2, 2), 5, g)


# --- drop_and_grow -------------------------------------------------------------------------------


def test_drop_and_grow_by_hand():
    # flat index:   0     1     2     3     4     5
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    drop = torch.tensor([[0.5, 0.1, 9.0], [0.3, 9.0, 0.7]])
    grow = torch.tensor([[100.0, 0.2, 0.9], [0.8, 0.4, 100.0]])
    # active 0, 1, 3, 5 with drop scores .5, .1, .3, .7 -> drop 1 (.1) and 3 (.3); kept {0, 5}
    # candidates 1, 2, 3, 4 (grow .2, .9, .8, .4; the kept ones' 100 do not count) -> grow 2, 3
    # 3 was dropped and grown again: neither in `dropped` nor in `grown`
    new, dropped, grown = drop_and_grow(mask, drop, grow, 2)
    assert new.tolist() == [[True, False, True], [True, False, True]]
    assert dropped.tolist() == [[False, True, False], [False, False, False]]
    assert grown.tolist() == [[False, False, True], [False, False, False]]
    assert mask.tolist() == [[True, True, False], [True, False, True]]  # input untouched


def test_drop_and_grow_only_regrowth_and_k0():
    mask = torch.tensor([True, True, False, False])
    drop = torch.tensor([0.1, 0.2, 0.0, 0.0])  # inactive drop scores are ignored
    grow = torch.tensor([5.0, 4.0, 1.0, 2.0])
    # drop both active; regrow the two largest among all four: 0 and 1 -> nothing changes
    new, dropped, grown = drop_and_grow(mask, drop, grow, 2)
    assert new.tolist() == [True, True, False, False]
    assert not dropped.any()
    assert not grown.any()
    # k = 1: drop 0 (.1); candidates 0, 2, 3 with 5, 1, 2 -> 0 again
    new, dropped, grown = drop_and_grow(mask, drop, grow, 1)
    assert new.tolist() == [True, True, False, False]
    # k = 0 copies the mask
    new, dropped, grown = drop_and_grow(mask, drop, grow, 0)
    assert new.tolist() == mask.tolist()
    assert new.data_ptr() != mask.data_ptr()
    assert not dropped.any()
    assert not grown.any()


def test_drop_and_grow_grow_ties_lowest_index():
    mask = torch.tensor([False, True, False, False, True, False])
    drop = torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0, 0.0])
    grow = torch.zeros(6)  # all tied: lowest indices among candidates (0, 2, 3, 4, 5)
    new, dropped, grown = drop_and_grow(mask, drop, grow, 1)
    # drop 4 (|1| < |2|); grow 0
    assert new.tolist() == [True, True, False, False, False, False]
    assert dropped.tolist() == [False, False, False, False, True, False]
    assert grown.tolist() == [True, False, False, False, False, False]


# --- SET / RigL through SparseOptimizer ----------------------------------------------------------
#
# flat index      0     1     2     3  |  4     5     6     7  |  8     9    10    11  | 12 ...
# mask (checkerboard, 8 active): 0, 2, 5, 7, 8, 10, 13, 15
# |w| of the active ones: .9, .05, .3, .8, .02, .6, .7, .4 -> drop 8 (.02) and 2 (.05)
# kept: 0, 5, 7, 10, 13, 15
# the inactive positions hold 5.0 before the first step: the first step must zero them.

MASK = flat_mask([0, 2, 5, 7, 8, 10, 13, 15])
KEPT = {0, 5, 7, 10, 13, 15}
# fmt: off
WEIGHT = torch.tensor([
    0.9, 5.0, -0.05, 5.0,
    5.0, 0.3, 5.0, -0.8,
    0.02, 5.0, 0.6, 5.0,
    5.0, -0.7, 5.0, 0.4,
]).view(4, 4)
# Dense gradient. Candidates for growth are the 8 inactive positions plus the dropped 2 and 8:
#   |g|: 1 .1, 2 .5, 3 .9, 4 .05, 6 .3, 8 .01, 9 .2, 11 .7, 12 .01, 14 .02  -> grow 3 and 11,
# both inactive before the step (the kept positions' gradients of 10 do not count).
GRAD = torch.tensor([
    10.0, 0.1, 0.5, -0.9,
    0.05, 10.0, 0.3, -10.0,
    -0.01, -0.2, 10.0, 0.7,
    0.01, 10.0, 0.02, -10.0,
]).view(4, 4)
# fmt: on


def make_opt(method, *, momentum=0.0, mask=MASK, weight=WEIGHT, **kwargs):
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    options = {
        "distribution": "uniform",
        "update_every": 1,
        "prune_rate": 0.25,
        "prune_schedule": "constant",
        "seed": 0,
        **kwargs,
    }
    opt = SparseOptimizer(
        torch.optim.SGD(lin.parameters(), lr=0.0, momentum=momentum), method, 0.5, **options
    )
    layer = opt.layers[0]
    assert layer.count == 8
    layer.mask.copy_(mask)
    return lin, opt


def step_with_grad(lin, opt, grad):
    lin.weight.grad = grad.clone()
    opt.step()


def test_rigl_grows_previously_inactive_by_dense_gradient():
    # Regression (DESIGN.md §2): the growth criterion must see the dense gradient. If it read the
    # masked gradient, the only nonzero candidates would be the just-dropped 2 and 8, and the mask
    # would not change.
    lin, opt = make_opt("rigl")
    step_with_grad(lin, opt, GRAD)
    new = opt.layers[0].mask
    assert indices(new) == {0, 3, 5, 7, 10, 11, 13, 15}
    assert new.tolist() == [
        [True, False, False, True],
        [False, True, False, True],
        [False, False, True, True],
        [False, True, False, True],
    ]
    assert opt.layers[0].count == 8
    w = lin.weight.detach()
    expected = torch.zeros(16)
    for i in KEPT:
        expected[i] = WEIGHT.reshape(-1)[i]  # kept weights keep their values (lr = 0)
    assert torch.equal(w.reshape(-1), expected)  # dropped 2, 8 and grown 3, 11 are 0
    u = opt.report()["updates"]
    assert (u["updates"], u["last_update_step"], u["last_exchanged"]) == (1, 1, 2)
    assert u["last_rate"] == 0.25


def test_rigl_regrows_just_dropped_and_keeps_its_value_and_state():
    # Same setup with |g[2]| = .95: the top two candidates are 2 (.95, just dropped) and 3 (.9).
    grad = GRAD.clone()
    grad.view(-1)[2] = 0.95
    lin, opt = make_opt("rigl", momentum=0.9)
    step_with_grad(lin, opt, grad)
    assert indices(opt.layers[0].mask) == {0, 2, 3, 5, 7, 10, 13, 15}
    w = lin.weight.detach().reshape(-1)
    assert w[2].item() == pytest.approx(-0.05)  # regrown: keeps its value ...
    assert w[2] == WEIGHT.reshape(-1)[2]
    assert w[3] == 0.0  # newly grown: starts at 0
    assert w[8] == 0.0  # dropped
    # ... and its momentum. After the first SGD step the buffer is the masked gradient.
    buf = opt.optimizer.state[lin.weight]["momentum_buffer"].reshape(-1)
    expected = torch.zeros(16)
    for i in [*KEPT, 2]:
        expected[i] = grad.reshape(-1)[i]
    assert torch.equal(buf, expected)  # 3 (new) and 8 (dropped) have zero momentum
    u = opt.report()["updates"]
    assert u["last_exchanged"] == 1  # only 3 is a new connection


def test_rigl_update_uses_rate_floor():
    # rate .3 * 8 = 2.4 -> 2 connections; rate .37 -> floor(2.96) = 2; rate .375 -> 3
    # (zero gradient at the active positions: nothing dropped is regrown)
    for rate, k in [(0.3, 2), (0.37, 2), (0.375, 3), (0.124, 0), (0.125, 1)]:
        lin, opt = make_opt("rigl", prune_rate=rate)
        step_with_grad(lin, opt, GRAD.masked_fill(MASK, 0.0))
        changed = indices(opt.layers[0].mask) ^ indices(MASK)
        assert len(changed) == 2 * k, rate


def test_rigl_k3_by_hand():
    # k = floor(.375 * 8) = 3: drop 8 (.02), 2 (.05), 5 (.3); kept 0, 7, 10, 13, 15
    # candidates: 1 .1, 2 .5, 3 .9, 4 .05, 5 10 (!), 6 .3, 8 .01, 9 .2, 11 .7, 12 .01, 14 .02
    # -> grow 5 (just dropped, |g| = 10), 3, 11
    lin, opt = make_opt("rigl", prune_rate=0.375)
    step_with_grad(lin, opt, GRAD)
    assert indices(opt.layers[0].mask) == {0, 3, 5, 7, 10, 11, 13, 15}
    assert lin.weight.detach().reshape(-1)[5] == WEIGHT.reshape(-1)[5]


def test_rigl_growth_from_backward_gradient():
    # The same regression through autograd: loss = sum(W @ x) gives dL/dW[i, j] = x[j] for every
    # row, dense even where W is masked. x = (.1, .4, .2, .3): every inactive position of the
    # checkerboard (rows 0, 2: cols 1, 3; rows 1, 3: cols 0, 2) has |g| in {.1, .2, .3, .4}.
    # drop 8 (row 2 col 0, g .1) and 2 (row 0 col 2, g .2); candidates with |g|:
    #   1 .4, 2 .2, 3 .3, 4 .1, 6 .2, 8 .1, 9 .4, 11 .3, 12 .1, 14 .2 -> grow 1 and 9 (.4, ties)
    lin, opt = make_opt("rigl")
    x = torch.tensor([0.1, 0.4, 0.2, 0.3])
    lin(x).sum().backward()
    opt.step()
    assert indices(opt.layers[0].mask) == {0, 1, 5, 7, 9, 10, 13, 15}


def test_rigl_explore_between_steps_sees_dense_gradient():
    # Periodic updates effectively off (update_every=1000); one exploration asked between steps.
    lin, opt = make_opt("rigl", update_every=1000)
    step_with_grad(lin, opt, torch.ones(4, 4))  # plain step: no update
    assert indices(opt.layers[0].mask) == indices(MASK)
    assert opt.report()["updates"]["updates"] == 0
    opt.explore(0.25)
    step_with_grad(lin, opt, GRAD)
    assert indices(opt.layers[0].mask) == {0, 3, 5, 7, 10, 11, 13, 15}
    assert opt.report()["updates"]["updates"] == 1
    step_with_grad(lin, opt, GRAD)  # the exploration ran once
    assert indices(opt.layers[0].mask) == {0, 3, 5, 7, 10, 11, 13, 15}
    assert opt.report()["updates"]["updates"] == 1


def test_set_drops_smallest_and_grows_at_random():
    lin, opt = make_opt("set")
    step_with_grad(lin, opt, GRAD)
    new = indices(opt.layers[0].mask)
    assert len(new) == 8
    assert opt.layers[0].count == 8
    assert new >= KEPT  # exactly the two smallest |w| (2 and 8) were dropped ...
    grown = new - KEPT
    assert len(grown) == 2
    assert grown <= set(range(16)) - KEPT  # ... and two grown among all others, 2 and 8 included
    w = lin.weight.detach().reshape(-1)
    for i in range(16):
        if i in KEPT or (i == 2 and i in new):
            assert w[i] == WEIGHT.reshape(-1)[i], i
        else:
            assert w[i] == 0.0, i


def _set_masks(seed, global_seed, steps=3):
    torch.manual_seed(global_seed)  # must not matter: SET draws from the optimizer's generator
    lin = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-1, 1, 256).view(16, 16))
    opt = SparseOptimizer(
        torch.optim.SGD(lin.parameters(), lr=0.0),
        "set",
        0.75,
        update_every=1,
        prune_rate=0.5,
        prune_schedule="constant",
        seed=seed,
    )
    fixed = torch.zeros(256, dtype=torch.bool)
    fixed[::4] = True  # the same initial mask for every seed: only growth differs
    opt.layers[0].mask.copy_(fixed.view(16, 16))
    masks = []
    for _ in range(steps):
        lin.weight.grad = torch.ones(16, 16)
        opt.step()
        masks.append(opt.layers[0].mask.clone())
        assert int(masks[-1].sum()) == 64
    return masks


def test_set_growth_uses_seeded_generator():
    a = _set_masks(seed=0, global_seed=1)
    b = _set_masks(seed=0, global_seed=2)
    c = _set_masks(seed=1, global_seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    # each update moved connections
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_update(method, bad):
    lin, opt = make_opt(method)
    grad = GRAD.clone()
    grad.view(-1)[0] = bad  # at an active position
    with pytest.warns(UserWarning, match="non-finite"):
        step_with_grad(lin, opt, grad)
    assert torch.equal(opt.layers[0].mask, MASK)
    assert opt.layers[0].count == 8
    u = opt.report()["updates"]
    assert (u["skipped"], u["updates"], u["step"]) == (1, 0, 1)
    # inactive weights are zero (the first step applied the mask)
    assert torch.all(lin.weight.detach()[~MASK] == 0)
    # a finite step afterwards updates normally
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_with_grad(lin, opt, GRAD)
    assert opt.report()["updates"]["updates"] == 1
    assert opt.report()["updates"]["skipped"] == 1
    assert opt.layers[0].count == 8


def test_nonfinite_gradient_at_inactive_position_keeps_inactive_weights_zero():
    # DESIGN.md §2: after every step inactive weights are exactly 0.0 and their gradients are
    # masked before the inner step. A NaN gradient at an inactive position only (active ones are
    # finite) must not leak into the inactive weight: on an update step, where the optimizer
    # checks finiteness anyway, the masking is NaN-safe (0 * NaN would be NaN).
    lin, opt = make_opt("rigl")
    grad = GRAD.clone()
    grad.view(-1)[1] = float("nan")  # position 1 is inactive
    with pytest.warns(UserWarning, match="non-finite"):
        step_with_grad(lin, opt, grad)
    assert torch.equal(opt.layers[0].mask, MASK)
    assert torch.all(lin.weight.detach()[~MASK] == 0)


# --- schedules -----------------------------------------------------------------------------------


def test_cosine_schedule_closed_form():
    s = TopologySchedule(update_every=10, prune_rate=0.3, decay="cosine", end_step=75)
    for t in [0, 1, 10, 37, 50, 74, 75, 80, 1000]:
        expected = 0.3 * 0.5 * (1.0 + math.cos(math.pi * min(t, 75) / 75))
        assert s.rate(t) == pytest.approx(expected, abs=1e-15), t
    assert s.rate(0) == pytest.approx(0.3)
    assert s.rate(75) == pytest.approx(0.0, abs=1e-15)
    assert s.rate(37.5) == pytest.approx(0.15)
    assert [t for t in range(1, 200) if s.is_update_step(t)] == [10, 20, 30, 40, 50, 60, 70]
    c = TopologySchedule(update_every=3, prune_rate=0.5, decay="constant", end_step=None)
    assert [c.rate(t) for t in (1, 100, 10**6)] == [0.5, 0.5, 0.5]
    assert [t for t in range(1, 13) if c.is_update_step(t)] == [3, 6, 9, 12]
    with pytest.raises(ValueError, match="total_steps"):
        TopologySchedule(update_every=3, prune_rate=0.5, decay="cosine", end_step=None)
    with pytest.raises(ValueError, match="update_every"):
        TopologySchedule(update_every=0, prune_rate=0.5, decay="constant", end_step=None)
    with pytest.raises(ValueError, match="prune_rate"):
        TopologySchedule(update_every=1, prune_rate=1.5, decay="constant", end_step=None)


def _tiny_model():
    torch.manual_seed(0)
    return mlp(8, 16, 4)


def test_optimizer_schedule_stop_and_cosine_rates():
    model = _tiny_model()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        "rigl",
        0.5,
        update_every=6,
        total_steps=41,
        stop_fraction=0.5,  # floor(0.5 * 41) = 20
        seed=0,
    )
    assert opt.schedule.decay == "cosine"  # the default with total_steps
    assert opt.schedule.end_step == 20
    opt.total_steps = 101  # rebuilds the schedule: floor(0.5 * 101) = 50
    assert opt.schedule.end_step == 50
    opt.total_steps = 41
    counts = [layer.count for layer in opt.layers]
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(1, 42):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=g)).square().sum().backward()
        before = [layer.mask.clone() for layer in opt.layers]
        opt.step()
        u = opt.report()["updates"]
        if u["last_update_step"] == step:
            rate = 0.3 * 0.5 * (1 + math.cos(math.pi * step / 20))
            assert u["last_rate"] == pytest.approx(rate, abs=1e-15)
            ks = [math.floor(rate * c) for c in counts]
            moved = [
                int((b & ~layer.mask).sum()) for b, layer in zip(before, opt.layers, strict=True)
            ]
            assert all(m <= k for m, k in zip(moved, ks, strict=True))
            seen.append(step)
        else:
            assert all(
                torch.equal(b, layer.mask) for b, layer in zip(before, opt.layers, strict=True)
            )
        assert [layer.count for layer in opt.layers] == counts
        assert [int(layer.mask.sum()) for layer in opt.layers] == counts
    assert seen == [6, 12, 18]
    assert opt.report()["updates"]["updates"] == 3


def test_static_has_no_periodic_update_and_explore_once():
    # 4x4 at 50%: 8 active. Hand weights: the active |w| are .9 .05 .3 .8 .02 .6 .7 .4
    lin, opt = make_opt("static")
    for _ in range(4):
        step_with_grad(lin, opt, GRAD)
    assert torch.equal(opt.layers[0].mask, MASK)
    assert opt.report()["updates"]["updates"] == 0
    # explore(0.5): k = floor(.5 * 8) = 4; drop the 4 smallest |w|: 8 (.02), 2 (.05), 5 (.3),
    # 15 (.4); kept 0, 7, 10, 13; grow 4 at random among the other 12 (dropped ones included)
    opt.explore(0.5)
    step_with_grad(lin, opt, GRAD)
    new = indices(opt.layers[0].mask)
    assert len(new) == 8
    assert {0, 7, 10, 13} <= new
    fresh = new - indices(MASK)  # grown that were inactive before
    u = opt.report()["updates"]
    assert u["updates"] == 1
    assert u["last_rate"] == 0.5
    assert u["last_exchanged"] == len(fresh)
    assert len(new - {0, 7, 10, 13}) == 4
    after = opt.layers[0].mask.clone()
    for _ in range(3):
        step_with_grad(lin, opt, GRAD)
    assert torch.equal(opt.layers[0].mask, after)
    assert opt.report()["updates"]["updates"] == 1
    w = lin.weight.detach().reshape(-1)
    for i in range(16):
        if i in {0, 7, 10, 13} or (i in new and i in indices(MASK)):
            assert w[i] == WEIGHT.reshape(-1)[i], i
        else:
            assert w[i] == 0.0, i


def test_explore_rejects_bad_rate():
    _, opt = make_opt("static")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            opt.explore(bad)
    with pytest.raises(TypeError, match="rate"):
        opt.explore("0.5")
