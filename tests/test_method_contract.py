"""The method contract at run time: what every hook of a method receives, and that it cannot write.

A registered probe method asserts in every hook what it is handed: a ``MethodContext`` (built
from the optimizer's frozen ``SparseSettings``), frozen ``SparseLayer``s, plain numbers. It runs
through phase 1 (periodic updates), Sup-tickets (the scheduler's explorations, consolidates,
finalize) and a resume from a checkpoint, with the public API only. Then methods that break the
contract: one writing a mask in place, one writing the weights, one assigning a layer's field; each
is refused, naming the method and the hook.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
from cases import batches, make_mlp, train_step

from sparseopt import SparseOptimizer, SupTicketsScheduler, register_method
from sparseopt.methods import MethodContext, SparseLayer, SparsityMethod
from sparseopt.settings import SparseSettings
from sparseopt.update_schedule import TopologySchedule

pytestmark = pytest.mark.usefixtures("one_thread")

TOTAL, CYCLE, FRACTION = 24, 4, 0.34  # phase 1: 16 steps, then 2 cycles of 4
RESUME_AT = 20  # after the first ticket, with the second exploration pending


def _check_layer(layer):
    assert type(layer) is SparseLayer
    assert layer.mask.dtype == torch.bool
    assert layer.mask.shape == layer.param.shape
    assert layer.count == int(layer.mask.sum())
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.count = layer.count + 1


def _check_context(ctx):
    assert type(ctx) is MethodContext
    assert type(ctx.settings) is SparseSettings
    assert type(ctx.layers) is tuple
    assert ctx.layers
    for layer in ctx.layers:
        _check_layer(layer)
    assert type(ctx.schedule) is TopologySchedule
    assert ctx.schedule is ctx.settings.schedule
    assert ctx.sparsity == ctx.settings.sparsity == 0.8
    assert ctx.total_steps == ctx.settings.total_steps == TOTAL
    assert ctx.structure is ctx.settings.structure is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.layers = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.settings.sparsity = 0.5


class Probe(SparsityMethod):
    """RigL with every hook checking its arguments and counting its calls."""

    name = "contract-probe"
    default_growth = "gradient"

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = collections.Counter()

    def start_density(self, density):
        self.calls["start_density"] += 1
        assert type(density) is float
        return super().start_density(density)

    def check(self, ctx):
        self.calls["check"] += 1
        _check_context(ctx)

    def is_update_step(self, step, ctx):
        self.calls["is_update_step"] += 1
        assert type(step) is int
        assert step >= 1
        _check_context(ctx)
        return super().is_update_step(step, ctx)

    def updates_before_step(self, step):
        self.calls["updates_before_step"] += 1
        assert type(step) is int
        return super().updates_before_step(step)

    def density_final_step(self, ctx):
        self.calls["density_final_step"] += 1
        _check_context(ctx)
        return super().density_final_step(ctx)

    def reads_gradient(self, step, ctx):
        self.calls["reads_gradient"] += 1
        assert step is None or type(step) is int
        _check_context(ctx)
        return super().reads_gradient(step, ctx)

    def grow_scores(self, layer, grad, generator):
        self.calls["grow_scores"] += 1
        _check_layer(layer)
        assert isinstance(grad, torch.Tensor)
        assert grad.shape == layer.param.shape
        assert isinstance(generator, torch.Generator)
        return super().grow_scores(layer, grad, generator)

    def new_masks(self, ctx, rate, grow_scores, step):
        self.calls["new_masks" if step is not None else "new_masks (exploration)"] += 1
        _check_context(ctx)
        assert type(rate) is float
        assert 0 <= rate <= 1
        assert len(grow_scores) == len(ctx.layers)
        return super().new_masks(ctx, rate, grow_scores, step)

    def drop_scores(self, layer):
        self.calls["drop_scores"] += 1
        _check_layer(layer)
        return super().drop_scores(layer)

    def num_to_drop(self, layer, rate):
        self.calls["num_to_drop"] += 1
        _check_layer(layer)
        return super().num_to_drop(layer, rate)

    def state_dict(self):
        return {"calls": dict(self.calls)}

    def load_state_dict(self, state):
        self.calls = collections.Counter(state["calls"])


def _build(seed=0):
    model = make_mlp(seed)
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9),  # phase 2 starts at lr_low
        "contract-probe",
        0.8,
        update_every=2,
        total_steps=TOTAL,
        model=model,
        seed=0,
    )
    sched = SupTicketsScheduler(opt, TOTAL, CYCLE, superpose_fraction=FRACTION)
    return model, opt, sched


def _train(model, opt, sched, data, start, stop):
    for batch in data[start:stop]:
        train_step(model, opt, batch)
        sched.step()


@pytest.fixture
def probe(method_registry):
    register_method(Probe.name, Probe)


@pytest.mark.filterwarnings("ignore:consolidate\\(\\) without model=")
def test_every_hook_receives_what_the_contract_says(probe):
    """Phase 1, both cycles (explorations, consolidates), finalize, and a resume in between."""
    plan = SupTicketsScheduler.plan(TOTAL, CYCLE, FRACTION)
    assert plan.phase1_steps == 16
    assert plan.ticket_steps == [20, 24]
    data = batches("mlp", TOTAL)
    model, opt, sched = _build()
    _train(model, opt, sched, data, 0, RESUME_AT)
    assert opt.tickets == 1
    saved = copy.deepcopy(  # state dicts hold live tensors: the run goes on below
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    _train(model, opt, sched, data, RESUME_AT, TOTAL)
    calls = opt.method.calls
    for hook in (
        "start_density", "check", "is_update_step", "updates_before_step", "density_final_step",
        "reads_gradient", "grow_scores", "new_masks", "new_masks (exploration)", "drop_scores",
        "num_to_drop",
    ):  # fmt: skip
        assert calls[hook] > 0, f"{hook} was never called: the probe proves nothing about it"
    assert calls["new_masks (exploration)"] == 2  # one exploration opens each cycle
    assert opt.tickets == 2

    # the resume: a fresh model, optimizer and scheduler load the step-20 state and go on
    del opt, sched  # one optimizer per parameter: the resumed one takes over
    model2, opt2, sched2 = _build(seed=1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    before = collections.Counter(opt2.method.calls)
    _train(model2, opt2, sched2, data, RESUME_AT, TOTAL)
    assert opt2.method.calls["new_masks (exploration)"] > before["new_masks (exploration)"]
    assert opt2.tickets == 2
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the resumed run ends on the same ultimate ticket


class WritesMask(SparsityMethod):
    name = "writes-mask"

    def new_masks(self, ctx, rate, grow_scores, step):
        masks = super().new_masks(ctx, rate, grow_scores, step)
        ctx.layers[0].mask[0, 0] = ~ctx.layers[0].mask[0, 0]  # breaks the contract
        return masks


class WritesWeights(SparsityMethod):
    name = "writes-weights"

    def grow_scores(self, layer, grad, generator):
        layer.param.mul_(2)  # breaks the contract (step() runs under no_grad)
        return super().grow_scores(layer, grad, generator)


class AssignsCount(SparsityMethod):
    name = "assigns-count"

    def drop_scores(self, layer):
        layer.count = 0  # breaks the contract
        return super().drop_scores(layer)


@pytest.mark.parametrize(
    ("method", "error", "match"),
    [
        (WritesMask, RuntimeError, r"method 'writes-mask' wrote the mask of 0\.weight in place "
         r"inside new_masks\(\)"),
        (WritesWeights, RuntimeError, r"method 'writes-weights' wrote the weights of 0\.weight "
         r"in place inside grow_scores\(\)"),
        (AssignsCount, dataclasses.FrozenInstanceError, r"cannot assign to field 'count'"),
    ],
)  # fmt: skip
def test_a_method_that_writes_is_refused(method, error, match):
    """Negative controls: the layers a method sees cannot be written by it."""
    model = make_mlp()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), method(), 0.8, update_every=1, model=model
    )
    with pytest.raises(error, match=match):
        train_step(model, opt, batches("mlp", 1)[0])  # step 1 is an update step


def test_scheduler_hands_density_final_step_a_context():
    """``SupTicketsScheduler`` asks the method through the optimizer's ``MethodContext``."""
    seen = []

    class Records(SparsityMethod):
        name = "records"

        def density_final_step(self, ctx):
            seen.append(type(ctx))
            return None

    model = make_mlp()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), Records(), 0.8, total_steps=40
    )
    SupTicketsScheduler(opt, 40, 4)
    assert seen == [MethodContext]
