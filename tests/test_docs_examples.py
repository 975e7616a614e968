"""The example files the documentation shows are run here, and the copies shown are checked.

docs/quickstart.md shows parts of the quickstart example inline (so GitHub shows the code); a
test checks that each part is the file's text, verbatim. docs/custom-methods.md includes
sections of the custom-method example.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_docs_blocks import parse_blocks

from sparseopt import SparseOptimizer, available_methods, get_method

ROOT = Path(__file__).resolve().parent.parent


def example_path(name: str) -> Path:
    """``examples/<name>.py``."""
    return ROOT / "examples" / f"{name}.py"


@pytest.fixture
def load_example(method_registry):
    """Import an example by name; the methods it registers are unregistered afterwards."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"docs_example_{name}", example_path(name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    # The methods the test found are all still there (``method_registry`` then drops the rest).
    assert set(method_registry) <= set(available_methods())


def test_custom_method_fits_the_promise_of_under_30_lines():
    lines = example_path("custom_method").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "[start:method]" in line)
    end = next(i for i, line in enumerate(lines) if "[end:method]" in line)
    assert 0 < end - start - 1 < 30


def _one_update(method: str, weights: torch.Tensor, grads: torch.Tensor) -> tuple:
    """One topology update on a 4x4 layer at 50% sparsity (8 active), exchanging 2."""
    layer = torch.nn.Linear(4, 4, bias=False)
    opt = SparseOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.0),  # lr 0: the update sees these weights
        method,
        0.5,
        distribution="uniform",
        update_every=1,
        prune_rate=0.25,
        prune_schedule="constant",
        seed=0,
    )
    before = opt.masks[layer.weight].clone()
    with torch.no_grad():
        layer.weight.copy_(weights)
    layer.weight.grad = grads.clone()
    opt.step()
    return before, opt.masks[layer.weight].clone(), layer.weight.detach().clone(), opt


def test_custom_method_uses_its_own_drop_criterion(load_example):
    module = load_example("custom_method")
    assert "sensitivity-rigl" in available_methods()
    assert isinstance(get_method("sensitivity-rigl"), module.SensitivityRigL)

    # |w| grows with the index and |w * g| falls with it, so magnitude and sensitivity drop
    # opposite ends of the active set; all scores are distinct (no ties).
    index = torch.arange(1.0, 17.0)
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    weights = (signs * index / 16).view(4, 4)
    grads = (-signs / index**2).view(4, 4)
    before, after, w_after, opt = _one_update("sensitivity-rigl", weights, grads)
    assert isinstance(opt.method, module.SensitivityRigL)

    # The expected masks, by hand: drop the 2 active weights with the smallest |w * g| (ties
    # cannot occur with these values), then grow the 2 largest |g| among all other positions.
    flat_w, flat_g, active = weights.flatten(), grads.flatten(), before.flatten()
    act = [i for i in range(16) if active[i]]
    dropped = sorted(act, key=lambda i: abs(float(flat_w[i] * flat_g[i])))[:2]
    kept = [i for i in act if i not in dropped]
    free = [i for i in range(16) if i not in kept]
    grown = sorted(free, key=lambda i: -abs(float(flat_g[i])))[:2]
    expected = torch.zeros(16, dtype=torch.bool)
    expected[kept + grown] = True
    assert torch.equal(after.flatten(), expected)
    assert int(after.sum()) == 8 == opt.layers[0].count

    # Magnitude would have dropped other weights, so the result shows the criterion was used.
    by_magnitude = sorted(act, key=lambda i: abs(float(flat_w[i])))[:2]
    assert set(by_magnitude) != set(dropped)
    assert not torch.equal(_one_update("rigl", weights, grads)[1], after)

    # New connections start at 0; dropped ones are 0; kept ones keep their values (lr = 0).
    new = after & ~before
    assert int(new.sum()) >= 1
    assert (w_after[new] == 0).all()
    assert (w_after[~after] == 0).all()
    assert torch.equal(w_after.flatten()[kept], flat_w[kept])


def test_custom_method_example_trains_at_exact_counts(load_example, capsys):
    module = load_example("custom_method")
    opt = module.main(steps=100)
    assert opt.method.name == "sensitivity-rigl"
    total = sum(layer.numel for layer in opt.layers)
    assert sum(int(m.sum()) for m in opt.masks.values()) == round(0.2 * total) == 294
    assert [layer.count for layer in opt.layers] == [layer.target for layer in opt.layers]
    report = opt.report()["updates"]
    assert report["updates"] == 3  # steps 25, 50 and 75: updates stop at 75%
    assert report["exchanged"] > 0
    assert "total" in capsys.readouterr().out


def test_quickstart_resume_is_bit_identical_and_ends_with_the_ultimate_ticket(
    load_example, tmp_path, capsys
):
    module = load_example("quickstart")
    model_a, opt_a, sched_a, scaler_a = module.build()
    module.train(model_a, opt_a, sched_a, scaler_a, 0, module.TOTAL_STEPS)

    model_b, opt_b = module.main(path=tmp_path / "checkpoint.pt", save_at=100)
    assert 96 < 100 < sched_a.ticket_steps[0]  # the checkpoint is taken mid-cycle

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for m_a, m_b in zip(opt_a.masks.values(), opt_b.masks.values(), strict=True):
        assert torch.equal(m_a, m_b)

    assert opt_b.tickets == 4 == len(sched_a.ticket_steps)
    for layer in opt_b.layers:
        assert layer.count == layer.target == int(layer.mask.sum())
        assert (layer.param[~layer.mask] == 0).all()
    total = sum(layer.numel for layer in opt_b.layers)
    assert sum(layer.count for layer in opt_b.layers) == round(0.1 * total)
    # Three mid-training evaluations of the superposed ticket in the uninterrupted run, and
    # three in the resumed one (the first ticket is at step 102, after the checkpoint).
    out = capsys.readouterr().out
    assert out.count("superposed") == 6
    assert "ultimate ticket" in out


def test_the_quickstart_page_shows_the_example_verbatim():
    """Each block of docs/quickstart.md that says it is part of the example is the file's text."""
    text = example_path("quickstart").read_text()
    shown = [
        b
        for b in parse_blocks(ROOT / "docs" / "quickstart.md")
        if "quickstart.py" in (b.fragment or "")
    ]
    assert [b.code.split("(")[0] for b in shown] == [
        "def build",
        "def train",
        "def save",
        "def main",
    ]
    for block in shown:
        assert block.code.strip() in text, f"{block.id} differs from {example_path('quickstart')}"
    # Negative control: a one-character change is caught.
    assert shown[0].code.replace("0.1", "0.2", 1).strip() not in text
