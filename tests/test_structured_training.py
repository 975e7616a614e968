"""Structured sparsity in training: N:M groups and constant fan-in rows hold after every step,
in every phase, for every inner optimizer, and across checkpoints and Sup-tickets.

The references are independent of the library's kernels: counts per group / row are read with
plain ``reshape(...).sum(...)`` here, never with ``sparseopt.structure``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASES, batches, case_params, make_convnet, train_step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:the learning rate at the end of phase 1"),
]

STRUCTURES = ["2:4", "1:4", "4:8", "fan_in"]


def counts_per_unit(mask: torch.Tensor, structure: str) -> torch.Tensor:
    """Active weights per N:M group (along the GEMM input dim) or per fan-in row, by hand."""
    rows = mask.reshape(mask.shape[0], -1)
    if structure == "fan_in":
        return rows.sum(1)
    m = int(structure.split(":")[1])
    return rows.reshape(rows.shape[0], -1, m).sum(2)


def assert_structured(opt: SparseOptimizer, structure: str) -> None:
    for layer in opt.layers:
        counts = counts_per_unit(layer.mask, structure)
        if structure == "fan_in":
            expected = layer.target // layer.mask.shape[0]
            assert expected >= 1
        else:
            expected = int(structure.split(":")[0])
        assert (counts == expected).all(), (layer.name, counts.unique().tolist(), expected)
        assert layer.count == int(layer.mask.sum())
        inactive = ~layer.mask
        assert (layer.param.detach()[inactive] == 0).all(), layer.name
        for key, value in opt.state.get(layer.param, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == layer.param.shape:
                assert (value[inactive] == 0).all(), (layer.name, key)


def wide_mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 4))  # fmt: skip


# --- invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", case_params(CASES[::3]))
@pytest.mark.parametrize("structure", ["2:4", "fan_in"])
def test_structure_holds_after_every_step_for_every_inner_optimizer(case, structure):
    """Through periodic updates, a Sup-tickets phase (explorations, consolidates) and the
    finalize: exact counts per group / row, zeros in weights and moments elsewhere."""
    model = wide_mlp()
    opt = SparseOptimizer(case.make(model.parameters()), "rigl", structure=structure,
                          model=model, update_every=2, seed=0)  # fmt: skip
    sched = SupTicketsScheduler(opt, 24, 3, superpose_fraction=0.25, lr_low=0.01, lr_high=0.02,
                                explore_rate=0.5)  # fmt: skip
    for batch in batches("mlp", 24):
        train_step(model, opt, batch)
        sched.step()
        assert_structured(opt, structure)
    assert opt.tickets == 2
    assert opt.report()["updates"]["updates"] >= 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out=st.integers(1, 6),
    groups=st.integers(1, 4),
    conv=st.booleans(),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
    method=st.sampled_from(["static", "set", "rigl", "snip"]),
    seed=st.integers(0, 3),
)
def test_nm_holds_for_any_shape_and_method(out, groups, conv, nm, method, seed):
    n, m = nm
    structure = f"{n}:{m}"
    torch.manual_seed(seed)
    if conv:  # in_channels * 3 * 3 must be a multiple of m: make in_channels one
        layer = nn.Conv2d(m * groups, out, 3, padding=1, bias=False)
        x = torch.randn(4, m * groups, 5, 5)
    else:
        layer = nn.Linear(m * groups, out)
        x = torch.randn(4, m * groups)
    inner = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt = SparseOptimizer(inner, method, structure=structure, update_every=1, prune_rate=0.5,
                          seed=seed)  # fmt: skip
    for step in range(4):
        if method == "static" and step == 2:
            opt.explore(0.5)
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert_structured(opt, structure)
    assert opt.sparsity == pytest.approx(1 - n / m)


@settings(max_examples=12, deadline=None)
@given(
    out=st.integers(1, 8),
    fan_in=st.integers(2, 24),
    sparsity=st.sampled_from([0.5, 0.8, 0.9, 0.95]),
    method=st.sampled_from(["static", "set", "rigl", "snip"]),
    seed=st.integers(0, 3),
)
def test_fan_in_holds_for_any_shape_and_method(out, fan_in, sparsity, method, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(fan_in, out)
    opt = SparseOptimizer(torch.optim.Adam(layer.parameters(), lr=0.01), method, sparsity,
                          structure="fan_in", distribution="uniform", update_every=1,
                          prune_rate=0.5, seed=seed)  # fmt: skip
    k = min(fan_in, max(1, round((1 - sparsity) * fan_in)))
    assert opt.layers[0].target == out * k
    for _ in range(3):
        layer(torch.randn(4, fan_in)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert_structured(opt, "fan_in")


def test_fan_in_counts_follow_the_distribution_and_the_report_shows_the_totals():
    model = make_convnet()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9,
                          structure="fan_in", model=model)  # fmt: skip
    report = opt.report()
    for row, layer in zip(report["layers"], opt.layers, strict=True):
        rows, fan_in = layer.param.shape[0], layer.param[0].numel()
        assert row["nnz"] == layer.target == rows * (row["nnz"] // rows)
        assert 1 <= row["nnz"] // rows <= fan_in
    assert report["total"]["nnz"] == sum(layer.target for layer in opt.layers)
    assert report["structure"] == "fan_in"
    assert "structure fan_in" in str(report)


def test_a_layer_that_does_not_fit_nm_stays_dense_and_the_report_says_so():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(),
                          nn.Linear(6, 3))  # fmt: skip
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", structure="2:4",
                          model=model)  # fmt: skip
    assert [layer.name for layer in opt.layers] == ["0.weight", "2.weight"]
    assert opt.report()["dense"] == [
        {"name": "4.weight", "shape": (3, 6), "reason": "input dimension 6 is not a multiple of 4"}
    ]
    assert "left dense: 4.weight (3x6)" in str(opt.report())
    assert opt.density == 0.5
    assert model[4].weight not in opt.masks


# --- Sup-tickets --------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_the_reprune_restores_the_structure_after_an_average_that_broke_it(structure):
    """Two tickets with different supports: their average has more than N active per group (or
    k per row); the superposed copy keeps exactly the top-|S| ones of each group / row, which a
    hand reference computes from the averaged values."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    sparsity = 0.75 if structure == "fan_in" else None
    opt = SparseOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), "static", sparsity,
                          structure=structure, seed=0)  # fmt: skip
    opt.apply_masks()
    t1 = layer.weight.detach().clone()
    opt.consolidate()
    opt.explore(0.5)
    for _ in range(2):  # the exploration's step, then one that moves the grown weights off 0
        layer(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    t2 = layer.weight.detach().clone()
    opt.consolidate()
    average = (t1 + t2) / 2
    live = counts_per_unit(opt.layers[0].mask, structure)
    assert (counts_per_unit(average != 0, structure) > live).any()  # the average broke it
    # the reference: per group / row, the largest |average|, ties to the lowest index
    rows = average.abs().reshape(8, -1)
    if structure == "fan_in":
        k = opt.layers[0].target // 8
        units = rows
    else:
        n, m = map(int, structure.split(":"))
        k, units = n, rows.reshape(-1, m)
    order = torch.sort(units, dim=1, descending=True, stable=True).indices[:, :k]
    expected = torch.zeros_like(units, dtype=torch.bool).scatter_(1, order, True)
    with opt.superposed():
        superposed = layer.weight.detach().clone()
    assert torch.equal(superposed != 0, expected.view(8, 16) & (average != 0))
    opt.finalize()
    assert_structured(opt, structure)
    assert torch.equal(opt.layers[0].mask, expected.view(8, 16))


def test_global_reprune_is_refused_under_a_structure():
    layer = nn.Linear(8, 8)
    opt = SparseOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), "rigl", structure="2:4")
    with pytest.raises(ValueError, match=r"reprune='layer' with structure='2:4'.*'global'"):
        opt.consolidate(reprune="global")
    with pytest.raises(ValueError, match=r"reprune='layer'"):
        SupTicketsScheduler.official(opt, 100, 5, None)
    SupTicketsScheduler.official(opt, 100, 5, None, reprune="layer")


# --- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["2:4", "fan_in"])
@pytest.mark.parametrize("split", [5, 15])  # after a topology update; after a consolidate
def test_resume_is_bit_exact_across_an_update_and_a_consolidate(structure, split):
    data = batches("mlp", 20)

    def build():
        model = wide_mlp()
        opt = SparseOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), "rigl",
                              structure=structure, model=model, update_every=2, seed=1)  # fmt: skip
        sched = SupTicketsScheduler(opt, 20, 3, superpose_fraction=0.3, lr_low=0.01,
                                    lr_high=0.02, explore_rate=0.5)  # fmt: skip
        return model, opt, sched

    model, opt, sched = build()
    saved = None
    for i, batch in enumerate(data):
        if i == split:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
        train_step(model, opt, batch)
        sched.step()
    model2, opt2, sched2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for batch in data[split:]:
        train_step(model2, opt2, batch)
        sched2.step()
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert opt.tickets == opt2.tickets > 0
    assert_structured(opt2, structure)


@pytest.mark.parametrize(("saved", "loading"), [("2:4", "1:4"), ("2:4", None), (None, "fan_in")])
def test_a_checkpoint_of_another_structure_is_refused_whole(saved, loading):
    model = wide_mlp()
    kwargs = {"sparsity": 0.5} if saved is None else {}
    source = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set",
                             structure=saved, **kwargs)  # fmt: skip
    state = source.state_dict()
    del source  # one SparseOptimizer per parameter at a time
    kwargs = {"sparsity": 0.5} if loading != "1:4" else {}
    target = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set",
                             structure=loading, **kwargs)  # fmt: skip
    before = [layer.mask.clone() for layer in target.layers]
    with pytest.raises(ValueError, match=rf"structure {saved!r} vs this optimizer's {loading!r}"):
        target.load_state_dict(state)
    assert all(torch.equal(a, b.mask) for a, b in zip(before, target.layers, strict=True))


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["3:2", "2:0", "abc", "0:4", "2:4:8", "4:4"])
def test_bad_structure_strings_are_value_errors_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"structure.*{bad!r}"):
        SparseOptimizer(torch.optim.SGD(wide_mlp().parameters(), lr=0.1), structure=bad)


def test_a_structure_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"structure"):
        SparseOptimizer(torch.optim.SGD(wide_mlp().parameters(), lr=0.1), structure=24)


def test_an_explicit_sparsity_that_disagrees_with_nm_says_what_the_structure_implies():
    params = wide_mlp().parameters()
    with pytest.raises(ValueError, match=r"sparsity to be left out or 0\.5 with structure='2:4'"):
        SparseOptimizer(torch.optim.SGD(params, lr=0.1), "set", 0.9, structure="2:4")
    opt = SparseOptimizer(torch.optim.SGD(wide_mlp().parameters(), lr=0.1), "set", 0.5,
                          structure="2:4")  # fmt: skip
    assert opt.sparsity == 0.5


@pytest.mark.parametrize("method", ["gmp", "granet"])
@pytest.mark.parametrize("structure", ["2:4", "fan_in"])
def test_methods_that_move_the_density_refuse_a_structure(method, structure):
    with pytest.raises(ValueError, match=rf"keeps structure='{structure}'.*{method!r}"):
        SparseOptimizer(torch.optim.SGD(wide_mlp().parameters(), lr=0.1), method,
                        structure=structure, total_steps=100)  # fmt: skip


def test_a_method_that_breaks_the_structure_is_caught_before_any_mask_changes():
    """Negative control for the engine's check: a custom method that ignores the structure."""
    from sparseopt.masks import drop_and_grow
    from sparseopt.methods import SparsityMethod

    class Careless(SparsityMethod):
        name = "careless"

        def update_layer(self, layer, rate, grow_scores, structure=None):
            k = self.num_to_drop(layer, rate)
            return drop_and_grow(layer.mask, self.drop_scores(layer), grow_scores, k)

    layer = nn.Linear(16, 8)
    opt = SparseOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), Careless(),
                          structure="2:4", update_every=1, prune_rate=0.5, seed=0)  # fmt: skip
    before = opt.layers[0].mask.clone()
    layer(torch.randn(4, 16)).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"'careless' returned a mask for param0 that breaks"):
        opt.step()
    assert torch.equal(opt.layers[0].mask, before)


# --- from training to the exported fast module ------------------------------------------------
def test_a_trained_fan_in_ultimate_ticket_exports_to_condensed_layers_that_match_it():
    """End to end: RigL + Sup-tickets under ``fan_in``; the ultimate ticket's masks go to
    ``to_sparse_inference(structure="auto", masks=...)``, every sparse Linear becomes a
    CondensedLinear, and the outputs equal the trained model's."""
    from sparseopt import to_sparse_inference
    from sparseopt.export import CondensedLinear

    model = wide_mlp().double()
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = SparseOptimizer(inner, "rigl", 0.75, structure="fan_in", model=model, update_every=2,
                          seed=0)  # fmt: skip
    sched = SupTicketsScheduler(opt, 20, 3, superpose_fraction=0.3, lr_low=0.01, lr_high=0.02)
    for x, y in batches("mlp", 20):
        train_step(model, opt, (x.double(), y))
        sched.step()
    assert opt.tickets > 0
    assert_structured(opt, "fan_in")
    fast = to_sparse_inference(model.eval(), structure="auto", masks=opt.masks, min_sparsity=0.5)
    kinds = [type(m).__name__ for m in fast.modules() if not isinstance(m, (nn.Sequential,
                                                                            nn.ReLU))]  # fmt: skip
    assert kinds == ["CondensedLinear"] * 3, kinds
    for layer, module in zip(opt.layers, [m for m in fast if isinstance(m, CondensedLinear)],
                             strict=True):  # fmt: skip
        assert module.values.shape == (layer.param.shape[0], layer.target // layer.param.shape[0])
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-12)
