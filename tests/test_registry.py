"""The method registry: register, look up by name, overwrite, unregister, and the errors."""

from __future__ import annotations

import pytest
import torch
from cases import make_mlp

from sparseopt import SparseOptimizer, available_methods, register_method, unregister_method
from sparseopt.methods import SET, RigL

BUILT_IN = ["gmp", "granet", "rigl", "set", "snip", "static"]


class LoudSET(SET):
    """A SET that counts its own updates, to tell it apart from the built-in one."""

    updates = 0

    def new_masks(self, *args, **kwargs):
        type(self).updates += 1
        return super().new_masks(*args, **kwargs)


@pytest.fixture
def registry(method_registry):
    """Leave the registry exactly as the test found it (``method_registry`` restores it)."""
    yield
    # The names the test found are all still there (a built-in it removed was put back); the
    # ones it added are dropped by the restore.
    assert [name for name in available_methods() if name in method_registry] == BUILT_IN


def _train(opt, model, steps=4):
    for step in range(steps):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_a_registered_name_builds_the_method_and_unregistering_removes_only_the_name(registry):
    register_method("Loud-SET", LoudSET)
    assert "loud-set" in available_methods()
    model = make_mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "LOUD-set", 0.8,
                          model=model, update_every=1)  # fmt: skip
    assert isinstance(opt.method, LoudSET)
    LoudSET.updates = 0
    _train(opt, model)
    assert LoudSET.updates == 4

    assert unregister_method("loud-SET") is LoudSET
    assert available_methods() == BUILT_IN
    _train(opt, model)  # an optimizer built with the method keeps working
    assert LoudSET.updates == 8
    assert [layer.count for layer in opt.layers] == [int(m.sum()) for m in opt.masks.values()]
    with pytest.raises(ValueError, match=r"Unknown method 'loud-set'"):
        SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "loud-set", 0.8)


def test_a_built_in_can_be_replaced_and_put_back(registry):
    with pytest.warns(UserWarning, match="replacing registered method 'set'"):
        register_method("set", LoudSET, overwrite=True)
    model = make_mlp()
    assert isinstance(SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8)
                      .method, LoudSET)  # fmt: skip
    assert unregister_method("set") is LoudSET
    assert "set" not in available_methods()
    register_method("set", SET)
    method = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8).method
    assert type(method) is SET


def test_a_taken_name_needs_overwrite(registry):
    with pytest.raises(ValueError, match=r"method 'rigl' is already registered.*overwrite=True"):
        register_method("RIGL", SET)
    assert type(SparseOptimizer(torch.optim.SGD(make_mlp().parameters(), lr=0.1), "rigl", 0.8)
                .method) is RigL  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: unregister_method("lottery"), ValueError,
         r"method 'lottery' is not registered; registered methods are \['gmp', .*'static'\]"),
        (lambda: unregister_method(3), TypeError, r"name to be a str.*3"),
        (lambda: register_method("", SET), ValueError, r"name to be a non-empty str.*''"),
        (lambda: register_method(None, SET), TypeError, r"name.*None"),
        (lambda: register_method("x", "SET"), TypeError, r"factory to be callable.*'SET'"),
    ],
    ids=["unregister-unknown", "unregister-type", "register-empty", "register-none",
         "register-factory"],
)  # fmt: skip
def test_registry_errors_name_the_argument(registry, call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert available_methods() == BUILT_IN
