"""The mask engine on its own, as torch tests ``AveragedModel``: built from a ``SparseSettings``
object, a plain inner optimizer and a method, stepped by hand around the inner step, and its
state dict, whose load is all or nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import warnings

import pytest
import torch
from cases import mlp
from torch import nn

from sparseopt.engine import MaskEngine
from sparseopt.methods import get_method
from sparseopt.settings import SparseSettings

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = SparseSettings(sparsity=0.75, distribution="uniform", update_every=2, seed=0)


def _engine(model=None, settings=SETTINGS, method="rigl"):
    model = mlp(8, 16, 4, seed=0) if model is None else model
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, inner, MaskEngine(inner, settings, get_method(method), model)


def _step(model, inner, engine, i):
    """One training step, the way ``SparseOptimizer.step`` runs it."""
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
    inner.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    dense = [layer.param.grad.clone() for layer in engine.layers]
    with torch.no_grad():
        engine.begin_step()
        inner.step()
        engine.end_step()
    return dense


def test_built_whole_from_settings():
    model, _, engine = _engine()
    assert engine.settings is SETTINGS
    assert [(layer.name, layer.index) for layer in engine.layers] == [
        ("0.weight", 0),
        ("2.weight", 2),
    ]
    # uniform at 75% sparsity: a quarter of each layer, exactly
    assert [layer.count for layer in engine.layers] == [32, 16]
    assert [int(layer.mask.sum()) for layer in engine.layers] == [32, 16]
    assert engine.context.layers is engine.layers
    assert engine.context.settings is SETTINGS
    assert engine.step == 0
    assert not engine.masks_applied
    assert bool((model[0].weight != 0).all())  # building changes no weight


def test_steps_by_hand():
    """Masks applied at the first step, gradients masked before the inner step, an update on
    step 2 by the dense gradient (RigL), counts exact throughout."""
    model, inner, engine = _engine()
    for i in range(1, 5):
        before = [layer.mask.clone() for layer in engine.layers]
        _step(model, inner, engine, i)
        assert engine.step == i
        for layer, old in zip(engine.layers, before, strict=True):
            assert layer.count == int(layer.mask.sum()) == layer.target
            assert bool((layer.param[~layer.mask] == 0).all())
            assert bool((layer.param.grad[~old] == 0).all())  # masked before the inner step
            momentum = inner.state[layer.param]["momentum_buffer"]
            assert bool((momentum[~layer.mask] == 0).all())
    assert engine.stats.updates == 2  # steps 2 and 4
    assert engine.stats.last_update_step == 4


def _snapshot(engine, inner):
    return copy.deepcopy(
        {"engine": engine.state_dict(), "inner": inner.state_dict(), "layers": engine.layers}
    )


def test_state_dict_round_trip_continues_bit_equal():
    model, inner, engine = _engine()
    for i in range(3):
        _step(model, inner, engine, i)
    state, inner_state = engine.state_dict(), copy.deepcopy(inner.state_dict())
    assert set(state["masks"]) == {0, 2}
    model2 = copy.deepcopy(model)
    del engine  # one engine per parameter: the copy's parameters are other tensors anyway
    gc.collect()
    model1, inner1, engine1 = _engine(model)
    # torch's load_state_dict keeps the tensors it is given: one copy of the state each
    engine1.load_state_dict(state, copy.deepcopy(inner_state))
    _, inner2, engine2 = _engine(model2)
    engine2.load_state_dict(state, copy.deepcopy(inner_state))
    assert engine2.step == 3
    assert engine2.stats.updates == 1
    for i in range(3, 7):
        _step(model1, inner1, engine1, i)
        _step(model2, inner2, engine2, i)
    for a, b in zip(engine1.layers, engine2.layers, strict=True):
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.param, b.param)
    assert torch.equal(engine1.generator.get_state(), engine2.generator.get_state())


def _bad_second_mask(state):
    bad = copy.deepcopy(state)
    bad["masks"][2] = torch.ones(3, 3, dtype=torch.bool)
    return bad


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda state, inner: (_bad_second_mask(state), inner), r"mask of 2\.weight.*\(4, 16\)"),
        (
            lambda state, inner: (state, {**inner, "param_groups": inner["param_groups"] * 2}),
            "different number of parameter groups",  # torch's own error
        ),
        (lambda state, inner: ({**state, "masks": {0: state["masks"][0]}}, inner), r"\[0, 2\]"),
    ],
    ids=["mask-shape", "inner-groups", "missing-mask"],
)
def test_load_is_all_or_nothing(spoil, match):
    """A state that fails anywhere changes nothing; the same state unspoiled does (the negative
    control: the comparison would see a change)."""
    model, inner, engine = _engine()
    for i in range(3):
        _step(model, inner, engine, i)
    state, inner_state = engine.state_dict(), copy.deepcopy(inner.state_dict())
    other_model = mlp(8, 16, 4, seed=1)
    _, other_inner, other = _engine(other_model, method="rigl")
    _step(other_model, other_inner, other, 0)
    before = _snapshot(other, other_inner)
    bad, bad_inner = spoil(state, inner_state)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(bad, bad_inner)
    after = _snapshot(other, other_inner)
    for key in ("engine", "inner"):
        assert str(after[key]) == str(before[key])
    for a, b in zip(other.layers, before["layers"], strict=True):
        assert torch.equal(a.mask, b.mask)
    other.load_state_dict(state, inner_state)
    assert str(_snapshot(other, other_inner)["engine"]) != str(before["engine"])


def test_the_engine_checks_only_its_settings_type():
    model = mlp(8, 16, 4, seed=0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"Expected settings to be a SparseSettings.*dict"):
        MaskEngine(inner, {"sparsity": 0.9}, get_method("set"), model)


def test_a_newer_engine_supersedes_the_first_until_it_is_gone():
    model, _, engine = _engine()
    inner2 = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"0\.weight \(16, 8\), 2\.weight \(4, 16\) were masked"):
        MaskEngine(inner2, SETTINGS, get_method("set"), model)
    assert engine.superseded
    with pytest.raises(RuntimeError, match="superseded"):
        engine.begin_step()
    del engine
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskEngine(torch.optim.SGD(model.parameters(), lr=0.1), SETTINGS, get_method("set"), model)


def test_settings_are_frozen_and_total_steps_retimes():
    _, _, engine = _engine(method="gmp")
    with pytest.raises(AttributeError):
        engine.settings.update_every = 3
    longer = dataclasses.replace(engine.settings, total_steps=100)
    engine.retime(longer)
    assert engine.settings is longer
    assert engine.context.total_steps == 100
    assert engine.schedule.end_step == 75
    with pytest.raises(ValueError, match=r"only total_steps may change.*'sparsity'"):
        engine.retime(dataclasses.replace(longer, sparsity=0.5))
    with pytest.raises(ValueError, match="holds no multiple of update_every=2"):
        engine.retime(dataclasses.replace(longer, total_steps=2))  # GMP refuses it
    assert engine.settings is longer  # and nothing changed
