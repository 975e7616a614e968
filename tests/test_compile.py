"""``torch.compile``: a compiled model, a compiled ``opt.step``, and no steady-state recompiles.

``SparseOptimizer.step`` keeps its bookkeeping (the update schedule, scores, the topology update)
in ``torch.compiler.disable``d helpers, so a compiled step traces only the gradient masking and
the inner step. The tests use ``backend="aot_eager"`` (graph capture and AOT autograd, no code
generation): inductor gives the same graphs but spends about 27 s compiling this tiny step on
one CPU core (measured; see docs/distributed.md), too slow for the suite.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from cases import make_mlp
from torch._dynamo.utils import counters

from sparseopt import SparseOptimizer, SupTicketsScheduler

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch's own, in dynamo
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]
BACKEND = "aot_eager"
STEPS = 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()
    assert not torch._dynamo.config.error_on_recompile  # the patch never outlives its run


def _batches(n=STEPS):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]  # fmt: skip


def _run(*, compile_model=False, compile_step=False, tensor_lr=True, after_warmup=None):
    """Sup-tickets run of ``STEPS`` steps; ``after_warmup()`` is entered after two steps.

    Two steps warm up: the first compiles, the second recompiles once because the inner
    optimizer's state now exists (plain ``torch.optim`` under compile does the same).
    """
    model = make_mlp()
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), "rigl",
                          0.8, update_every=2, model=model, seed=0)  # fmt: skip
    sched = SupTicketsScheduler(opt, STEPS, 2, superpose_fraction=0.25, lr_low=0.01,
                                lr_high=0.05)  # fmt: skip
    forward = torch.compile(model, backend=BACKEND) if compile_model else model
    step = torch.compile(opt.step, backend=BACKEND) if compile_step else opt.step
    graphs = 0
    with contextlib.ExitStack() as stack:
        for t, (x, y) in enumerate(_batches()):
            if t == 2:
                graphs = counters["stats"]["unique_graphs"]
                if after_warmup is not None:
                    stack.enter_context(after_warmup())
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            step()
            sched.step()
    return model, opt, counters["stats"]["unique_graphs"] - graphs


def _assert_final_ticket(opt):
    assert opt.step_count == STEPS
    assert opt.tickets == 2
    total = sum(layer.numel for layer in opt.layers)
    assert sum(layer.count for layer in opt.layers) == round(0.2 * total)
    for layer in opt.layers:
        assert layer.count == int(layer.mask.sum())
        assert bool((layer.param[~layer.mask] == 0).all())
        momentum = opt.optimizer.state[layer.param]["momentum_buffer"]
        assert bool((momentum[~layer.mask] == 0).all())


def _assert_same_training(a, b, rtol, atol):
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert opt_a.report()["updates"] == opt_b.report()["updates"]
    for ma, mb in zip(opt_a.masks.values(), opt_b.masks.values(), strict=True):
        assert torch.equal(ma, mb)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def test_compiled_model_trains_like_the_eager_model():
    model, opt, _ = _run(compile_model=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    _assert_final_ticket(opt)
    eager, eager_opt, _ = _run()
    _assert_same_training((model, opt), (eager, eager_opt), rtol=1e-5, atol=1e-6)


def test_compiled_step_matches_eager_without_recompiling_in_steady_state():
    """Topology updates, explorations, consolidations and the cyclic rate cause no recompile."""
    model, opt, new_graphs = _run(
        compile_step=True,
        after_warmup=lambda: torch._dynamo.config.patch(error_on_recompile=True),
    )
    assert new_graphs == 0
    assert counters["stats"]["unique_graphs"] >= 2  # graphs were captured before warm-up ended
    assert opt.report()["updates"]["updates"] >= 4  # periodic updates and two explorations
    _assert_final_ticket(opt)
    eager, eager_opt, _ = _run()
    _assert_same_training((model, opt), (eager, eager_opt), rtol=1e-5, atol=1e-6)


def test_a_float_learning_rate_does_recompile_which_the_check_catches():
    """Negative control for the test above: the recipe's tensor LR is what avoids recompiles."""
    with pytest.raises(torch._dynamo.exc.RecompileError):
        _run(
            compile_step=True,
            tensor_lr=False,
            after_warmup=lambda: torch._dynamo.config.patch(error_on_recompile=True),
        )
