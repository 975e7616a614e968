"""Layer-wise density distributions (ERK, ER, uniform, mappings) and exact integer counts.

The expected values are derived by hand in the comments (the capping loop of RigL's
``get_sparsities_erdos_renyi``, notes/reference-implementations.md §2.1) and written as literals.

The running example is a small conv net on 1x16x16 inputs:

    conv1: Conv2d(1, 8, 3)    weight (8, 1, 3, 3)   n = 72     sum(shape) = 15
    conv2: Conv2d(8, 16, 3)   weight (16, 8, 3, 3)  n = 1152   sum(shape) = 30
    fc:    Linear(256, 10)    weight (10, 256)      n = 2560   sum(shape) = 266
    N = 72 + 1152 + 2560 = 3784
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseopt import SparseOptimizer
from sparseopt.distributions import (
    er,
    erk,
    exact_counts,
    from_mapping,
    layer_densities,
    uniform,
)

SHAPES = [(8, 1, 3, 3), (16, 8, 3, 3), (10, 256)]
NUMELS = [72, 1152, 2560]
N = 3784
NAMES = ["0.weight", "3.weight", "7.weight"]


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # 0
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),  # 3
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),  # 7
    )


def test_example_net_shapes():
    model = conv_net()
    weights = [p for p in model.parameters() if p.ndim >= 2]
    assert [tuple(p.shape) for p in weights] == SHAPES
    assert [n for n, p in model.named_parameters() if p.ndim >= 2] == NAMES
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


# --- ERK -----------------------------------------------------------------------------------------
# raw_l = sum(shape) / prod(shape):  conv1 15/72 = 0.2083,  conv2 30/1152 = 0.0260,
#                                    fc 266/2560 = 0.1039
# raw_l * n_l = sum(shape_l), so divisor = sum over free layers of sum(shape_l).


def test_erk_density_0_1_no_capping():
    # budget = 0.1 * 3784 = 378.4; divisor = 15 + 30 + 266 = 311; eps = 378.4 / 311 = 1.21672
    # largest eps * raw = 1.21672 * 15/72 = 0.2535 <= 1  -> no layer is dense.
    # density_l = eps * raw_l
    expected = [378.4 / 311 * 15 / 72, 378.4 / 311 * 30 / 1152, 378.4 / 311 * 266 / 2560]
    assert expected == pytest.approx([0.2534834, 0.0316854, 0.1264248], abs=1e-7)
    assert erk(SHAPES, 0.1) == pytest.approx(expected, rel=1e-12)
    # counts d_l * n_l = 378.4 * sum(shape_l) / 311 = 18.2508, 36.5016, 323.6476 (sum 378.4);
    # target round(378.4) = 378; floors 18 + 36 + 323 = 377; the one missing unit goes to the
    # largest fractional part (.6476, fc).
    assert exact_counts(erk(SHAPES, 0.1), NUMELS, 0.1) == [18, 36, 324]


def test_erk_density_0_5_caps_first_layer():
    # pass 1: budget = 0.5 * 3784 = 1892; divisor = 311; eps = 6.08360
    #         eps * raw(conv1) = 6.0836 * 15/72 = 1.2674 > 1  -> conv1 dense
    # pass 2: budget = 1892 - 72 = 1820; divisor = 30 + 266 = 296; eps = 6.14865
    #         largest free raw is fc: 6.14865 * 266/2560 = 0.6389 <= 1  -> stop
    expected = [1.0, 1820 / 296 * 30 / 1152, 1820 / 296 * 266 / 2560]
    assert expected == pytest.approx([1.0, 0.1601211, 0.6388830], abs=1e-7)
    assert erk(SHAPES, 0.5) == pytest.approx(expected, rel=1e-12)
    assert erk(SHAPES, 0.5)[0] == 1.0
    # counts: 72, 1820*30/296 = 184.4595, 1820*266/296 = 1635.5405; target 1892;
    # floors 72 + 184 + 1635 = 1891; the missing unit goes to fc (.5405 > .4595).
    assert exact_counts(erk(SHAPES, 0.5), NUMELS, 0.5) == [72, 184, 1636]


def test_erk_density_0_8_caps_two_layers():
    # pass 1: budget = 3027.2, divisor 311, eps = 9.7338; conv1: 9.7338 * 0.2083 = 2.03 -> dense
    # pass 2: budget = 3027.2 - 72 = 2955.2, divisor 296, eps = 9.98378;
    #         fc: 9.98378 * 266/2560 = 1.0374 > 1 -> dense
    # pass 3: budget = 2955.2 - 2560 = 395.2, divisor 30, eps = 13.1733;
    #         conv2: 13.1733 * 30/1152 = 395.2 / 1152 = 0.343056 <= 1 -> stop
    assert erk(SHAPES, 0.8) == pytest.approx([1.0, 395.2 / 1152, 1.0], rel=1e-12)
    # counts 72 + 395.2 + 2560; target round(3027.2) = 3027; floors already give 3027.
    assert exact_counts(erk(SHAPES, 0.8), NUMELS, 0.8) == [72, 395, 2560]


def test_erk_all_dense_at_density_1():
    assert erk(SHAPES, 1.0) == [1.0, 1.0, 1.0]
    assert exact_counts(erk(SHAPES, 1.0), NUMELS, 1.0) == NUMELS


# --- ER (kernel dims ignored) --------------------------------------------------------------------
# raw_l = (out + in) / (out * in):  conv1 9/8 = 1.125,  conv2 24/128 = 0.1875,  fc 266/2560
# raw_l * n_l:                      1.125*72 = 81,  0.1875*1152 = 216,  266     (sum 563)


def test_er_density_0_1_ignores_kernel():
    # budget 378.4, divisor 563, eps = 0.672114; conv1: 0.672114 * 1.125 = 0.7561 <= 1 -> no cap
    expected = [378.4 / 563 * 1.125, 378.4 / 563 * 0.1875, 378.4 / 563 * 266 / 2560]
    assert expected == pytest.approx([0.7561279, 0.1260213, 0.0698368], abs=1e-7)
    assert er(SHAPES, 0.1) == pytest.approx(expected, rel=1e-12)
    # counts 378.4*81/563 = 54.4412, 378.4*216/563 = 145.1766, 378.4*266/563 = 178.7822;
    # target 378, floors 54 + 145 + 178 = 377 -> fc (.7822) gets the unit.
    assert exact_counts(er(SHAPES, 0.1), NUMELS, 0.1) == [54, 145, 179]
    # ER differs from ERK exactly because the 3x3 kernels are ignored:
    assert er(SHAPES, 0.1) != pytest.approx(erk(SHAPES, 0.1))


def test_er_density_0_5_caps_first_layer():
    # pass 1: budget 1892, divisor 563, eps 3.36057; conv1: 3.36057 * 1.125 = 3.78 -> dense
    # pass 2: budget 1820, divisor 216 + 266 = 482, eps 3.77593;
    #         conv2: 3.77593 * 0.1875 = 0.708 <= 1 -> stop
    expected = [1.0, 1820 / 482 * 0.1875, 1820 / 482 * 266 / 2560]
    assert expected == pytest.approx([1.0, 0.7079876, 0.3923431], abs=1e-7)
    assert er(SHAPES, 0.5) == pytest.approx(expected, rel=1e-12)
    # counts 72, 1820*216/482 = 815.6017, 1820*266/482 = 1004.3983; floors 1891 of 1892;
    # conv2 has the larger fractional part (.6017).
    assert exact_counts(er(SHAPES, 0.5), NUMELS, 0.5) == [72, 816, 1004]


def test_er_density_0_8_caps_two_layers():
    # pass 1: budget 3027.2, eps = 3027.2/563 = 5.3769 -> conv1 (6.05) dense
    # pass 2: budget 2955.2, divisor 482, eps 6.13112; conv2: 6.13112 * 0.1875 = 1.1496 -> dense
    # pass 3: budget 2955.2 - 1152 = 1803.2, divisor 266, eps 6.77895; fc = 1803.2/2560 = 0.704375
    assert er(SHAPES, 0.8) == pytest.approx([1.0, 1.0, 1803.2 / 2560], rel=1e-12)
    assert exact_counts(er(SHAPES, 0.8), NUMELS, 0.8) == [72, 1152, 1803]


def test_er_linear_only_equals_erk():
    # For 2-D shapes ER and ERK coincide.
    shapes = [(20, 10), (5, 20), (30, 5)]
    assert er(shapes, 0.3) == pytest.approx(erk(shapes, 0.3), rel=1e-12)


# --- uniform -------------------------------------------------------------------------------------


def test_uniform():
    assert uniform(SHAPES, 0.1) == [0.1, 0.1, 0.1]
    # 7.2, 115.2, 256 -> floors 7 + 115 + 256 = 378 = round(378.4): nothing to add
    assert exact_counts(uniform(SHAPES, 0.1), NUMELS, 0.1) == [7, 115, 256]
    assert exact_counts(uniform(SHAPES, 0.5), NUMELS, 0.5) == [36, 576, 1280]


@pytest.mark.parametrize("fn", [erk, er, uniform])
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_density_out_of_range(fn, bad):
    with pytest.raises(ValueError, match="density"):
        fn(SHAPES, bad)


def test_layer_densities_by_name():
    assert layer_densities("erk", SHAPES, 0.5) == erk(SHAPES, 0.5)
    assert layer_densities("ER", SHAPES, 0.5) == er(SHAPES, 0.5)
    assert layer_densities("uniform", SHAPES, 0.5) == [0.5] * 3
    with pytest.raises(ValueError, match="distribution"):
        layer_densities("gaussian", SHAPES, 0.5)
    with pytest.raises(TypeError):
        layer_densities(3, SHAPES, 0.5)


# --- exact_counts --------------------------------------------------------------------------------


def test_exact_counts_largest_remainder_by_hand():
    # d*n = 3.0, 4.5, 2.5 (sum 10); target round(10/30 * 30) = 10; floors 3 + 4 + 2 = 9;
    # fractional parts .0, .5, .5: the tie goes to the earlier layer -> [3, 5, 2]
    assert exact_counts([0.3, 0.45, 0.25], [10, 10, 10], 1 / 3) == [3, 5, 2]
    # d*n = 2.8, 1.5, 5.5 (sum 9.8); target round(9.8) = 10; floors 2 + 1 + 5 = 8;
    # two units: .8 (layer 0) first, then the tie .5/.5 goes to layer 1 -> [3, 2, 5]
    assert exact_counts([0.4, 0.3, 0.5], [7, 5, 11], 9.8 / 23) == [3, 2, 5]
    # d*n = 0.6, 0.6, 0.6 (sum 1.8, target 2): two units, ties to the earliest -> [1, 1, 0]
    assert exact_counts([0.2, 0.2, 0.2], [3, 3, 3], 0.2) == [1, 1, 0]


def test_exact_counts_never_above_numel():
    # d*n = 4, 2 (sum 6) but the target is round(8/14 * 14) = 8: the dense layer 0 cannot take
    # a unit, so both missing units go to layer 1 -> [4, 4]
    assert exact_counts([1.0, 0.2], [4, 10], 8 / 14) == [4, 4]
    # Length mismatch is an error.
    with pytest.raises(ValueError, match="same length"):
        exact_counts([0.5], [4, 4], 0.5)


shape_2d = st.tuples(st.integers(1, 40), st.integers(1, 40))
shape_4d = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(1, 5))
shape_sets = st.lists(st.one_of(shape_2d, shape_4d), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    shapes=shape_sets,
    density=st.floats(0.005, 1.0),
    fn=st.sampled_from([erk, er, uniform]),
)
def test_exact_counts_properties(shapes, density, fn):
    numels = [math.prod(s) for s in shapes]
    densities = fn(shapes, density)
    assert all(0.0 <= d <= 1.0 for d in densities)
    # the real-valued budget is met: sum(d_l * n_l) == density * N
    total = sum(numels)
    assert sum(d * n for d, n in zip(densities, numels, strict=True)) == pytest.approx(
        density * total
    )
    counts = exact_counts(densities, numels, density)
    assert sum(counts) == round(density * total)
    for c, d, n in zip(counts, densities, numels, strict=True):
        assert isinstance(c, int)
        assert 0 <= c <= n
        assert abs(c - d * n) < 1.0


# --- a mapping name -> density -------------------------------------------------------------------


def test_mapping_named_exact_rest_shared():
    # conv1 at 1.0 and fc at 0.1: fixed = 72 + 256 = 328; budget 0.2 * 3784 = 756.8;
    # conv2 (unnamed) gets (756.8 - 328) / 1152 = 428.8 / 1152 = 0.372222
    mapping = {"0.weight": 1.0, "7.weight": 0.1}
    d = from_mapping(mapping, NAMES, SHAPES, 0.2)
    assert d == pytest.approx([1.0, 428.8 / 1152, 0.1], rel=1e-12)
    assert d[0] == 1.0
    assert d[2] == 0.1
    assert layer_densities(mapping, SHAPES, 0.2, NAMES) == d
    # two unnamed layers share the remainder uniformly:
    # fixed = 0.5 * 72 = 36; (756.8 - 36) / (1152 + 2560) = 720.8 / 3712
    d = from_mapping({"0.weight": 0.5}, NAMES, SHAPES, 0.2)
    assert d == pytest.approx([0.5, 720.8 / 3712, 720.8 / 3712], rel=1e-12)


def test_mapping_full_and_consistent():
    # all named, overall density (72 + 0.25*1152 + 0.25*2560) / 3784 = 1000/3784
    mapping = {"0.weight": 1.0, "3.weight": 0.25, "7.weight": 0.25}
    assert from_mapping(mapping, NAMES, SHAPES, 1000 / 3784) == [1.0, 0.25, 0.25]


def test_mapping_errors():
    with pytest.raises(ValueError, match="unknown"):
        from_mapping({"conv9.weight": 0.5}, NAMES, SHAPES, 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        from_mapping({"0.weight": 1.5}, NAMES, SHAPES, 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        from_mapping({"0.weight": -0.1}, NAMES, SHAPES, 0.2)
    # fc dense = 2560 > budget 0.2 * 3784 = 756.8: the others would need a negative density
    with pytest.raises(ValueError, match="impossible"):
        from_mapping({"7.weight": 1.0}, NAMES, SHAPES, 0.2)
    # conv1 at 0: the others would need (0.99*3784) / 3712 > 1
    with pytest.raises(ValueError, match="impossible"):
        from_mapping({"0.weight": 0.0}, NAMES, SHAPES, 0.99)
    # full mapping at overall density 1000/3784 = 0.264, but sparsity asks 0.5
    with pytest.raises(ValueError, match="agree"):
        from_mapping({"0.weight": 1.0, "3.weight": 0.25, "7.weight": 0.25}, NAMES, SHAPES, 0.5)
    with pytest.raises(ValueError, match="names"):
        layer_densities({"0.weight": 0.5}, SHAPES, 0.5, None)


# --- through SparseOptimizer ---------------------------------------------------------------------


def _counts(opt):
    return [layer.count for layer in opt.layers]


def _mask_sums(opt):
    return [int(m.sum()) for m in opt.masks.values()]


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize("sparsity", [0.9, 0.5, 0.2])
def test_optimizer_counts_follow_distribution(distribution, sparsity):
    model = conv_net()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        "static",
        sparsity,
        distribution=distribution,
        model=model,
        seed=0,
    )
    density = 1.0 - sparsity
    fn = {"erk": erk, "er": er, "uniform": uniform}[distribution]
    expected = exact_counts(fn(SHAPES, density), NUMELS, density)
    assert _counts(opt) == expected
    assert _mask_sums(opt) == expected
    assert sum(_counts(opt)) == round(density * N)
    assert [layer.name for layer in opt.layers] == NAMES
    assert [r["name"] for r in opt.report()["layers"]] == NAMES
    # counts still exact after a step (masks now applied to the weights)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    assert _mask_sums(opt) == expected
    for layer in opt.layers:
        assert int((layer.param != 0).sum()) <= layer.count
        assert torch.all(layer.param[~layer.mask] == 0)


def test_optimizer_literal_erk_counts():
    # the hand-derived counts above, end to end (sparsity 0.5 -> density 0.5 exactly)
    model = conv_net()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.5, model=model)
    assert _counts(opt) == [72, 184, 1636]
    assert opt.density == pytest.approx(1892 / 3784)
    model = conv_net()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9, model=model)
    assert _counts(opt) == [18, 36, 324]
    assert opt.report()["total"]["nnz"] == 378


def test_optimizer_biases_and_dense_group_stay_dense():
    model = conv_net()
    conv1, conv2, fc = model[0], model[3], model[7]
    opt = SparseOptimizer(
        torch.optim.SGD(
            [
                {"params": [conv1.weight, conv1.bias, conv2.weight, conv2.bias]},
                {"params": [fc.weight, fc.bias], "sparse": False},
            ],
            lr=0.1,
        ),
        "rigl",
        0.5,
        model=model,
        update_every=1,
        seed=0,
    )
    # only the two conv weights are sparse; ERK over those two alone:
    # raw*n = 15, 30; budget 0.5 * (72 + 1152) = 612; eps = 612/45 = 13.6;
    # conv1: 13.6 * 15/72 = 2.83 > 1 -> dense; conv2 = (612 - 72) / 1152 = 540 / 1152
    assert [layer.name for layer in opt.layers] == ["0.weight", "3.weight"]
    assert [layer.index for layer in opt.layers] == [0, 2]
    assert _counts(opt) == [72, 540]
    assert set(opt.masks) == {conv1.weight, conv2.weight}
    dense_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if n not in NAMES[:2]
    }
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in dense_before:  # biases and the dense fc weight: no mask, no zeros
            assert torch.count_nonzero(p) == p.numel(), n
    assert _mask_sums(opt) == [72, 540]


def test_optimizer_mapping_distribution():
    model = conv_net()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        "static",
        0.8,
        distribution={"0.weight": 1.0, "7.weight": 0.1},
        model=model,
    )
    # density 1 - 0.8 = 0.19999999999999996; budget 756.8; conv1 72, fc 256,
    # conv2 (756.8 - 328) = 428.8 -> 428 or 429: round(756.8) = 757 = 72 + 256 + 429
    assert _counts(opt) == [72, 429, 256]
    with pytest.raises(ValueError, match="unknown"):
        SparseOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            "static",
            0.8,
            distribution={"fc.weight": 0.5},
            model=model,
        )


def test_optimizer_names_without_model():
    model = conv_net()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.5)
    # packing indices of the weights: 0 (conv1.w), 2 (conv2.w), 4 (fc.w)
    assert [layer.name for layer in opt.layers] == ["param0", "param2", "param4"]
    assert [layer.index for layer in opt.layers] == [0, 2, 4]
