"""Methods as strategies: the growth choice (random | gradient) is separate from the timing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseopt import SparseOptimizer
from sparseopt.methods import GMP, SET, SNIP, GraNet, RigL, SparsityMethod, Static

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _run(method, steps=6, **kw):
    model = _model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), method, 0.8,
                          model=model, seed=3, update_every=2, total_steps=steps, **kw)  # fmt: skip
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_no_method_inherits_another_update_rule():
    """GMP and SNIP no longer borrow gradient growth by inheriting RigL; SET, RigL and static
    are siblings. Only GraNet extends GMP (gradual pruning plus regrowth)."""
    for cls in (Static, SET, RigL, GMP, SNIP):
        assert cls.__bases__ == (SparsityMethod,), cls
    assert GraNet.__bases__ == (GMP,)


DEFAULTS = [(Static, "random"), (SET, "random"), (RigL, "gradient"), (GMP, "gradient"),
            (GraNet, "gradient"), (SNIP, "gradient")]  # fmt: skip


@pytest.mark.parametrize(("cls", "default"), DEFAULTS)
def test_default_growth_and_options(cls, default):
    method = cls()
    assert method.growth == default
    assert "growth" not in method.options()  # the default is not recorded (0.1.0 checkpoints)
    other = "random" if default == "gradient" else "gradient"
    assert cls(growth=other).options()["growth"] == other
    assert cls(growth=other).uses_gradient is (other == "gradient")


def test_rigl_with_random_growth_is_set_and_set_with_gradient_growth_is_rigl():
    """The strategy decides the masks; the class only the default. Bit-identical runs."""
    for a, b in ((("rigl", {"growth": "random"}), ("set", {})),
                 (("set", {"growth": "gradient"}), ("rigl", {}))):  # fmt: skip
        _model_a, opt_a = _run(a[0], **a[1])
        _model_b, opt_b = _run(b[0], **b[1])
        assert opt_a.report()["updates"]["updates"] == 2  # steps 2 and 4 (stop at 75%)
        for (pa, ma), (pb, mb) in zip(opt_a.masks.items(), opt_b.masks.items(), strict=True):
            assert torch.equal(ma, mb)
            assert torch.equal(pa, pb)


def test_gradient_growth_grows_the_largest_gradients_by_hand():
    """One exploration with gradient growth, against a hand reference: drop the 2 smallest
    active ``|w|``, then grow the 2 largest ``|grad|`` among all positions not kept (the
    just-dropped ones included), ties to the lowest index. Negative control: random growth
    picks other positions."""
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).view(4, 4))
    grad = torch.zeros(16)
    grad[[0, 5, 10, 15, 3]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    after = {}
    for growth in ("gradient", "random"):
        opt = SparseOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), "static", 0.5,
                              seed=0, growth=growth)  # fmt: skip
        before = opt.layers[0].mask.clone().view(-1)
        w = layer.weight.detach().clone().view(-1)
        opt.explore(0.25)  # 2 of the 8 active are dropped and 2 grown
        layer.weight.grad = grad.clone().view(4, 4)
        opt.step()
        after[growth] = opt.layers[0].mask.view(-1).clone()
        del opt  # one SparseOptimizer per parameter at a time
    active = before.nonzero().view(-1).tolist()
    dropped = sorted(active, key=lambda i: (abs(w[i].item()), i))[:2]
    kept = set(active) - set(dropped)
    candidates = [i for i in range(16) if i not in kept]
    grown = sorted(candidates, key=lambda i: (-grad[i].item(), i))[:2]
    expected = torch.zeros(16, dtype=torch.bool)
    expected[sorted(kept | set(grown))] = True
    assert torch.equal(after["gradient"], expected)
    assert not torch.equal(after["random"], expected)


@pytest.mark.parametrize("bad", ["sideways", "RANDOM "])
def test_unknown_growth_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"growth.*'random'.*'gradient'"):
        RigL(growth=bad)


def test_growth_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"growth.*1 \(int\)"):
        SET(growth=1)


def test_a_checkpoint_of_another_growth_is_refused():
    _, opt = _run("rigl", growth="random")
    saved = opt.state_dict()
    model = _model()
    other = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "rigl",
                            0.8, model=model, update_every=2, total_steps=6)  # fmt: skip
    with pytest.raises(ValueError, match=r"method options \{'growth': 'random'\} vs .* \{\}"):
        other.load_state_dict(saved)
