"""The loop around ``SupTicketsScheduler``: each mistake warns once, names itself and the fix, and
points at the user's line; a correct loop (plain, GradScaler with skipped steps, Accelerate's
repeated calls, gradient accumulation, a resume) warns nothing and ends finalized.

The scheduler follows the optimizer's iteration count (``step_count + skipped_steps``), so every
check here is exact: no gradient-version guessing.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from cases import mlp
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR, OneCycleLR

from sparseopt import SparseOptimizer, SupTicketsScheduler

pytestmark = pytest.mark.usefixtures("one_thread")

T, C, FRACTION = 40, 4, 0.3  # phase 1 = 28 steps, tickets after 32, 36, 40


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(900 + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def build(seed: int = 0, **sched_kwargs):
    model = mlp(6, 16, 3, seed=seed)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SparseOptimizer(inner, "rigl", 0.7, model=model, seed=0, update_every=4)
    sched = SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION, **sched_kwargs)
    return model, opt, sched


def backward(model, step: int, scale: float = 1.0) -> None:
    x, y = batch(step)
    (nn.functional.cross_entropy(model(x), y) * scale).backward()


def recorded(fn):
    """Run ``fn()``; return the warnings it raised (message, filename, line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [(str(w.message), w.filename, w.lineno) for w in caught]


def messages(caught) -> list[str]:
    return [m for m, _, _ in caught]


def assert_user_line(caught, line_text: str) -> None:
    """Every warning names this file, at a line holding ``line_text``."""
    with open(__file__) as f:
        source = f.read().splitlines()
    for message, filename, lineno in caught:
        assert filename == __file__, (message, filename)
        assert line_text in source[lineno - 1], (message, source[lineno - 1])


# --- correct loops: no warning -------------------------------------------------------------------
def _plain(model, opt, sched, start=1, stop=T) -> list[float]:
    lrs = []
    for s in range(start, stop + 1):
        opt.zero_grad()
        backward(model, s)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_a_correct_loop_warns_nothing_and_ends_finalized():
    model, opt, sched = build()
    assert recorded(lambda: _plain(model, opt, sched)) == []
    assert opt.superposition.finalized
    assert (sched.last_epoch, opt.step_count, opt.tickets) == (T, T, 3)


def test_a_correct_loop_under_a_grad_scaler_with_skipped_steps_warns_nothing():
    model, opt, sched = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def loop():
        for s in range(1, T + 1):
            opt.zero_grad()
            x, y = batch(s)
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            if s in (5, 30, 31):  # one in phase 1, two in a row in the first cycle
                model[0].weight.grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            sched.step()

    assert recorded(loop) == []
    assert (opt.step_count, opt.skipped_steps, sched.last_epoch) == (T - 3, 3, T)
    assert opt.superposition.finalized


def test_accelerate_style_repeated_calls_and_accumulation_warn_nothing():
    """Accelerate steps the scheduler once per process after each optimizer step, and not on
    accumulation micro-batches: the repeats are ignored, the run equals the plain one."""
    plain_lrs = _plain(*build())
    model, opt, sched = build()
    lrs = []

    def loop():
        for s in range(1, T + 1):
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            for half in (0, 1):  # two micro-batches of the same batch: the same mean gradient
                x, y = batch(s)
                part = slice(4 * half, 4 * half + 4)
                (nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
            opt.step()
            for _ in range(3):  # three processes
                sched.step()

    assert recorded(loop) == []
    assert sched.last_epoch == T
    assert opt.superposition.finalized
    assert lrs == plain_lrs
    assert opt.tickets == 3


def _save(model, opt, sched):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)  # fmt: skip
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_a_correct_resume_warns_nothing():
    model, opt, sched = build()
    _plain(model, opt, sched, 1, 30)
    ckpt = _save(model, opt, sched)
    model, opt, sched = build(seed=1)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert recorded(lambda: _plain(model, opt, sched, 31, T)) == []
    assert opt.superposition.finalized


# --- the mistakes -------------------------------------------------------------------------------
def test_stepping_the_scheduler_once_per_epoch_warns_once():
    model, opt, sched = build()

    def loop():
        for epoch in range(4):
            for s in range(10 * epoch + 1, 10 * epoch + 11):
                opt.zero_grad()
                backward(model, s)
                opt.step()
            sched.step()  # the mistake: once per epoch

    caught = recorded(loop)
    assert len(caught) == 1
    assert "made 10 steps since the last SupTicketsScheduler.step()" in caught[0][0]
    assert "not epochs; call sched.step() after every opt.step()" in caught[0][0]
    assert_user_line(caught, "sched.step()  # the mistake")
    assert not opt.superposition.finalized  # what the warning is about


def test_stepping_the_scheduler_before_the_optimizer_warns_once():
    model, opt, sched = build()

    def loop():
        for s in range(1, T + 1):
            opt.zero_grad()
            backward(model, s)
            sched.step()  # the mistake: before opt.step()
            opt.step()

    caught = recorded(loop)
    assert messages(caught) == [
        "SupTicketsScheduler.step() was called before optimizer.step(): the call is ignored (no "
        "iteration happened yet); call sched.step() after opt.step(), or the last ticket is "
        "never consolidated and finalize() never runs"
    ]
    assert_user_line(caught, "sched.step()  # the mistake")
    assert sched.last_epoch == T - 1
    assert opt.tickets == 2
    assert not opt.superposition.finalized


@pytest.mark.parametrize("built", ["before-load", "after-load"])
def test_a_resume_that_forgets_the_scheduler_warns_once(built):
    model, opt, sched = build()
    _plain(model, opt, sched, 1, 20)
    ckpt = _save(model, opt, sched)
    model = mlp(6, 16, 3, seed=1)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "rigl", 0.7,
                          model=model, seed=0, update_every=4)  # fmt: skip
    if built == "before-load":
        sched = SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    if built == "after-load":
        sched = SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION)

    def loop():
        for s in range(21, 24):
            opt.zero_grad()
            backward(model, s)
            opt.step()
            sched.step()  # the mistake: this scheduler's state was never loaded

    caught = recorded(loop)
    assert len(caught) == 1
    assert (
        "optimizer has made 21 training iterations, but this scheduler is at step 1"
        in (caught[0][0])
    )
    assert "restored the optimizer's state but not the scheduler's" in caught[0][0]
    assert "sched.load_state_dict" in caught[0][0]
    assert_user_line(caught, "sched.step()  # the mistake")


def test_a_resume_that_forgets_the_optimizer_warns_once():
    model, opt, sched = build()
    _plain(model, opt, sched, 1, 20)
    ckpt = _save(model, opt, sched)
    model, opt, sched = build(seed=1)
    sched.load_state_dict(ckpt["sched"])  # the optimizer's state is not loaded

    def loop():
        for s in range(21, 23):
            opt.zero_grad()
            backward(model, s)
            opt.step()
            sched.step()  # the mistake

    caught = recorded(loop)
    assert len(caught) == 1
    assert (
        "this scheduler is at step 21, ahead of the optimizer's 1 training iterations"
        in (caught[0][0])
    )
    assert_user_line(caught, "sched.step()  # the mistake")


def test_an_optimizer_step_after_finalize_warns_once():
    model, opt, sched = build()
    _plain(model, opt, sched)
    assert opt.superposition.finalized

    def loop():
        for s in range(T + 1, T + 4):  # the loop runs longer than total_steps
            opt.zero_grad()
            backward(model, s)
            opt.step()  # the mistake
            sched.step()

    caught = recorded(loop)
    assert len(caught) == 1
    assert caught[0][0].startswith(
        "opt.step() after finalize(): the model held the ultimate ticket"
    )
    assert "stop the loop after total_steps optimizer steps" in caught[0][0]
    assert_user_line(caught, "opt.step()  # the mistake")


def test_a_base_stepped_from_outside_warns_once():
    model = mlp(6, 16, 3, seed=0)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.7, model=model,
                          seed=0)  # fmt: skip
    base = MultiStepLR(opt, milestones=[14, 21], gamma=0.1)
    sched = SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION, base=base)

    def loop():
        for s in range(1, 10):
            opt.zero_grad()
            backward(model, s)
            opt.step()
            base.step()  # the mistake: the scheduler steps base= itself
            sched.step()

    caught = recorded(loop)
    assert len(caught) == 1
    assert "the base scheduler (MultiStepLR) was stepped from outside" in caught[0][0]
    assert "remove base.step() from the loop" in caught[0][0]
    assert_user_line(caught, "sched.step()")


def test_one_ticket_warns_at_construction():
    model = mlp(6, 16, 3, seed=0)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.7, model=model)
    caught = recorded(lambda: SupTicketsScheduler(opt, 100, 10))  # M = floor(0.1 * 100 / 10) = 1
    assert len(caught) == 1
    assert "one ticket (M = floor(0.1 * 100 / 10) = 1): nothing is averaged" in caught[0][0]
    assert "cycle_steps <= 5" in caught[0][0]
    assert_user_line(caught, "SupTicketsScheduler(opt, 100, 10)")
    # the phase-1 model as ticket 0 makes two: no warning
    assert recorded(lambda: SupTicketsScheduler(opt, 100, 10, include_phase1=True)) == []
    assert recorded(lambda: SupTicketsScheduler(opt, 100, 5)) == []  # M = 2


def test_a_base_shorter_than_phase_1_is_refused():
    model = mlp(6, 16, 3, seed=0)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.7, model=model)
    with pytest.raises(ValueError, match=r"covers phase 1 \(28 steps\).*OneCycleLR ends after 20"):
        SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION,
                            base=OneCycleLR(opt, max_lr=0.1, total_steps=20))  # fmt: skip
    poly = torch.optim.lr_scheduler.PolynomialLR
    with pytest.raises(ValueError, match=r"PolynomialLR ends after 10 \(total_iters=10\)"):
        SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION, base=lambda o, n: poly(o, 10))
    # built for phase 1 with the factory: accepted, and it runs to the end of phase 1
    sched = SupTicketsScheduler(
        opt, T, C, superpose_fraction=FRACTION, lr_low=0.001, lr_high=0.005,
        base=lambda o, n: OneCycleLR(o, max_lr=0.1, total_steps=n, final_div_factor=4),
    )  # fmt: skip
    model.train()
    assert recorded(lambda: _plain(model, opt, sched)) == []
    assert opt.superposition.finalized
