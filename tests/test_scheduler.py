"""``SupTicketsScheduler``: Eq. 3 learning rates, the two phases, the calls it makes, bad input.

Every expected learning rate comes from an implementation written here (``eq3`` with exact
rational arithmetic, and the base scheduler run alone on a plain ``torch.optim.SGD``), never from
``sparseopt.cyclic_lr``. The rate of optimizer step ``i`` is read from ``param_groups`` right
before ``opt.step()``, as a training loop sees it.
"""

from __future__ import annotations

import io
import math
import warnings
from fractions import Fraction

import pytest
import torch
from cases import mlp
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, ReduceLROnPlateau

from sparseopt import SparseOptimizer, SupTicketsScheduler, cyclic_lr

pytestmark = pytest.mark.usefixtures("one_thread")


# --- independent references ----------------------------------------------------------------------
def eq3(i: int, cycle: int, lr1: float, lr2: float) -> float:
    """Eq. 3 of the paper, in exact rationals: phase-2 iteration ``i`` counted from 1."""
    t = Fraction((i - 1) % cycle + 1, cycle)
    a1, a2 = Fraction(lr1), Fraction(lr2)
    if t <= Fraction(1, 2):
        return float((1 - 2 * t) * a1 + 2 * t * a2)
    return float((2 - 2 * t) * a2 + (2 * t - 1) * a1)


def expected_split(total: int, cycle: int, fraction: float) -> tuple[int, int]:
    """``(M, phase1_steps)`` with ``M = floor(fraction * total / cycle)`` in exact decimals."""
    m = math.floor(Fraction(str(fraction)) * total / cycle)
    return m, total - m * cycle


def test_eq3_reference_against_hand_values():
    # C = 4: t = 1/4, 1/2, 3/4, 1 -> halfway up, the top, halfway down, the bottom.
    assert [eq3(i, 4, 0.001, 0.005) for i in range(1, 9)] == pytest.approx(
        [0.003, 0.005, 0.003, 0.001] * 2, rel=1e-15
    )
    # C = 5: t = 0.2, 0.4, 0.6, 0.8, 1.0 -> 0.6 a1 + 0.4 a2, 0.2 a1 + 0.8 a2, then mirrored.
    assert [eq3(i, 5, 0.001, 0.005) for i in range(1, 6)] == pytest.approx(
        [0.0026, 0.0042, 0.0042, 0.0026, 0.001], rel=1e-15
    )
    # C = 1: every iteration ends a cycle (t = 1).
    assert eq3(7, 1, 0.001, 0.005) == pytest.approx(0.001, rel=1e-15)


@pytest.mark.parametrize("cycle", range(1, 10))
def test_cyclic_lr_is_eq3(cycle):
    for i in range(1, 3 * cycle + 1):
        assert cyclic_lr(i, cycle, 0.001, 0.005) == pytest.approx(
            eq3(i, cycle, 0.001, 0.005), rel=1e-12, abs=0
        )


@pytest.mark.parametrize(
    ("total", "cycle", "fraction", "m", "phase1"),
    [
        (40, 4, 0.3, 3, 28),
        (50, 6, 0.25, 2, 38),  # f * T = 12.5 is not a multiple of C: M = 2, phase 1 = 50 - 12
        (100, 29, 0.29, 1, 71),  # 0.29 * 100 = 28.999999999999996 in floats; M is still 1
        (100, 10, 0.3, 3, 70),  # 0.3 * 100 = 30.000000000000004 in floats
        (30, 5, 0.5, 3, 15),
    ],
)
def test_expected_split_table(total, cycle, fraction, m, phase1):
    assert expected_split(total, cycle, fraction) == (m, phase1)


# --- helpers -------------------------------------------------------------------------------------
def make_model(seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    return mlp(6, 16, 3, seed=seed, device=device)


def batch(step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return x.to(device), y.to(device)


def make_opt(model: nn.Module, lrs=(0.1,), method: str = "set", **kwargs) -> SparseOptimizer:
    """SGD over the model's two linear layers, one param group each when two ``lrs`` are given."""
    if len(lrs) == 1:
        groups = [{"params": list(model.parameters()), "lr": lrs[0]}]
    else:
        groups = [
            {"params": list(model[0].parameters()), "lr": lrs[0]},
            {"params": list(model[2].parameters()), "lr": lrs[1]},
        ]
    inner = torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)
    return SparseOptimizer(inner, method, 0.7, seed=0, model=model, **kwargs)


def run(model, opt, sched, steps: int, hook=None) -> list[list[float]]:
    """Train ``steps`` steps; returns the rates of every group read right before each step."""
    lrs = []
    for s in range(1, steps + 1):
        x, y = batch(s, next(model.parameters()).device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if hook is not None:
            hook(s)
        sched.step()
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
    return lrs


def base_alone(kind: str, lrs, steps: int, phase1: int) -> list[list[float]]:
    """The base scheduler on a plain SGD over dummy params: its rates for ``steps`` steps."""
    params = [torch.zeros(1, requires_grad=True) for _ in lrs]
    plain = torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)], lr=lrs[0]
    )
    base = make_base(kind, plain, phase1)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in plain.param_groups])
        plain.step()
        base.step()
    return out


def make_base(kind: str, optimizer, phase1: int):
    if kind == "multistep":  # 0.1 -> 0.01 -> 0.001 (= lr_low) by the end of phase 1
        return MultiStepLR(optimizer, milestones=[phase1 // 3, 2 * phase1 // 3], gamma=0.1)
    if kind == "cosine":  # reaches eta_min = lr_low at the last step of phase 1
        return CosineAnnealingLR(optimizer, T_max=phase1 - 1, eta_min=0.001)
    raise AssertionError(kind)


# --- Eq. 3 and the base scheduler ----------------------------------------------------------------
SPLITS = [(40, 4, 0.3), (50, 6, 0.25), (100, 29, 0.29), (30, 5, 0.5), (20, 1, 0.2), (24, 2, 0.25)]


@pytest.mark.parametrize("base_kind", ["multistep", "cosine"])
@pytest.mark.parametrize(("total", "cycle", "fraction"), SPLITS)
def test_rates_follow_base_then_eq3(total, cycle, fraction, base_kind, device):
    m, phase1 = expected_split(total, cycle, fraction)
    model = make_model(device=device)
    opt = make_opt(model)
    base = make_base(base_kind, opt, phase1)
    sched = SupTicketsScheduler(
        opt, total, cycle, base=base, superpose_fraction=fraction, lr_low=0.001, lr_high=0.005
    )
    assert (sched.num_tickets, sched.phase1_steps) == (m, phase1)
    assert sched.ticket_steps == [phase1 + k * cycle for k in range(1, m + 1)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lrs = run(model, opt, sched, total)
    assert [str(w.message) for w in caught] == []  # the base ends at lr_low: no jump warning

    # Phase 1: exactly the base scheduler's rates, as if it ran alone.
    assert [r[0] for r in lrs[:phase1]] == [
        r[0] for r in base_alone(base_kind, [0.1], phase1, phase1)
    ]
    # Phase 2: Eq. 3, step by step, with t counted from the first phase-2 step.
    expected = [eq3(i, cycle, 0.001, 0.005) for i in range(1, total - phase1 + 1)]
    assert [r[0] for r in lrs[phase1:]] == pytest.approx(expected, rel=1e-12, abs=0)
    # Each ticket is taken at the bottom of a cycle; mid-cycle is the top.
    for s in sched.ticket_steps:
        assert lrs[s - 1][0] == pytest.approx(0.001, rel=1e-12)
    if cycle % 2 == 0:
        assert lrs[phase1 + cycle // 2 - 1][0] == pytest.approx(0.005, rel=1e-12)
    # After the run, the rate stays at lr_low.
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001, rel=1e-12)


@pytest.mark.parametrize(("total", "cycle", "fraction"), SPLITS)
def test_plan_is_the_split(total, cycle, fraction):
    m, phase1 = expected_split(total, cycle, fraction)
    plan = SupTicketsScheduler.plan(total, cycle, fraction)
    assert tuple(plan) == (phase1, m, cycle)
    assert plan.total_steps == total
    assert plan.ticket_steps == [phase1 + k * cycle for k in range(1, m + 1)]
    sched = SupTicketsScheduler(make_opt(make_model()), total, cycle, superpose_fraction=fraction)
    assert (sched.phase1_steps, sched.num_tickets, sched.ticket_steps) == (
        plan.phase1_steps,
        plan.tickets,
        plan.ticket_steps,
    )


def test_base_factory_gets_phase1_and_equals_a_prebuilt_base(device):
    total, cycle, fraction = 40, 4, 0.3
    _, phase1 = expected_split(total, cycle, fraction)
    seen = []

    def factory(optimizer, phase1_steps):
        seen.append((optimizer, phase1_steps))
        return make_base("multistep", optimizer, phase1_steps)

    runs = []
    for base in ("factory", "prebuilt"):
        torch.manual_seed(0)
        model = make_model(device=device)
        opt = make_opt(model)
        b = factory if base == "factory" else make_base("multistep", opt, phase1)
        sched = SupTicketsScheduler(opt, total, cycle, base=b, superpose_fraction=fraction,
                                    lr_low=0.001, lr_high=0.005)  # fmt: skip
        if base == "factory":
            assert seen == [(opt, phase1)]
            assert sched.base is not None
        runs.append(run(model, opt, sched, total))
    assert runs[0] == runs[1]


def test_rates_without_base_are_constant_in_phase1(device):
    model = make_model(device=device)
    opt = make_opt(model, lrs=(0.001,))
    sched = SupTicketsScheduler(opt, 40, 4, base="constant", superpose_fraction=0.3,
                                lr_low=0.001, lr_high=0.004)  # fmt: skip
    lrs = run(model, opt, sched, 40)
    assert [r[0] for r in lrs[:28]] == [0.001] * 28
    assert [r[0] for r in lrs[28:]] == pytest.approx([0.0025, 0.004, 0.0025, 0.001] * 3, rel=1e-12)


def test_per_group_rates_scale_with_initial_lr_ratio(device):
    model = make_model(device=device)
    opt = make_opt(model, lrs=(0.1, 0.01))
    base = MultiStepLR(opt, milestones=[9, 18], gamma=0.1)  # group 0 ends phase 1 at 0.001
    sched = SupTicketsScheduler(opt, 40, 4, base=base, superpose_fraction=0.3)
    lrs = run(model, opt, sched, 40)
    alone = base_alone_multistep_two_groups()
    assert lrs[:28] == alone
    g0 = [r[0] for r in lrs[28:]]
    g1 = [r[1] for r in lrs[28:]]
    assert g0 == pytest.approx([eq3(i, 4, 0.001, 0.005) for i in range(1, 13)], rel=1e-12)
    assert g1 == pytest.approx([0.1 * v for v in g0], rel=1e-12)
    assert g1 == pytest.approx([eq3(i, 4, 0.0001, 0.0005) for i in range(1, 13)], rel=1e-12)


def base_alone_multistep_two_groups() -> list[list[float]]:
    params = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    plain = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.01}]
    )
    base = MultiStepLR(plain, milestones=[9, 18], gamma=0.1)
    out = []
    for _ in range(28):
        out.append([g["lr"] for g in plain.param_groups])
        plain.step()
        base.step()
    return out


def test_per_group_rates_from_lists(device):
    model = make_model(device=device)
    opt = make_opt(model, lrs=(0.001, 0.0002))
    sched = SupTicketsScheduler(
        opt, 30, 5, base="constant", superpose_fraction=0.5, lr_low=[0.001, 0.0002],
        lr_high=[0.006, 0.0032],
    )  # fmt: skip
    lrs = run(model, opt, sched, 30)
    assert lrs[:15] == [[0.001, 0.0002]] * 15
    assert [r[0] for r in lrs[15:]] == pytest.approx(
        [eq3(i, 5, 0.001, 0.006) for i in range(1, 16)], rel=1e-12
    )
    assert [r[1] for r in lrs[15:]] == pytest.approx(
        [eq3(i, 5, 0.0002, 0.0032) for i in range(1, 16)], rel=1e-12
    )
    # hand values of group 1 over one cycle (t = 0.2 ... 1.0)
    assert [r[1] for r in lrs[15:20]] == pytest.approx([0.0014, 0.0026, 0.0026, 0.0014, 0.0002])


# --- the warning at the phase boundary ----------------------------------------------------------
def _warnings_per_step(lr: float, **sched_kwargs) -> dict[int, list[str]]:
    """A constant phase 1 at ``lr`` into absolute rates 0.001 -> 0.005."""
    sched_kwargs = {"base": "constant", "lr_low": 0.001, "lr_high": 0.005, **sched_kwargs}
    model = make_model()
    opt = make_opt(model, lrs=(lr,))
    out: dict[int, list[str]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3, **sched_kwargs)
        out[0] = [str(w.message) for w in caught]

        for s in range(1, 41):
            x, y = batch(s)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            caught.clear()
            sched.step()
            out[s] = [str(w.message) for w in caught]
    return out


def test_warns_once_when_phase1_ends_far_from_lr_low():
    per_step = _warnings_per_step(0.1)  # constant 0.1, no base, lr_low 0.001
    with_msgs = {s: m for s, m in per_step.items() if m}
    assert list(with_msgs) == [28]  # the scheduler step that sets the first phase-2 rate
    (msg,) = with_msgs[28]
    assert "lr_low" in msg
    assert "0.1" in msg
    assert "0.001" in msg


@pytest.mark.parametrize(("lr", "warns"), [(0.001, False), (0.002, False), (0.0005, False),
                                          (0.0021, True), (0.00049, True)])  # fmt: skip
def test_warning_threshold(lr, warns):
    per_step = _warnings_per_step(lr)
    assert any(per_step.values()) is warns
    assert all(not m for s, m in per_step.items() if s != 28)


# --- what the scheduler makes the optimizer do -------------------------------------------------
def test_tickets_explorations_and_finalize_happen_on_time(monkeypatch, device):
    total, cycle, fraction = 50, 6, 0.25  # M = 2, phase 1 = 38, tickets after 44 and 50
    model = make_model(device=device)
    opt = make_opt(model, update_every=3, stop_fraction=1.0, prune_schedule="constant")
    sched = SupTicketsScheduler(
        opt, total, cycle, superpose_fraction=fraction, lr_low=0.1, lr_high=0.2,
        explore_rate=0.25, averaging="cima", beta=0.6, reprune="global", base="constant",
    )  # fmt: skip
    assert sched.ticket_steps == [44, 50]
    calls: list[tuple] = []
    for name in ("consolidate", "explore", "finalize"):
        original = getattr(opt, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, opt.step_count, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(opt, name, spy)

    updates, masks, tickets, last = [], [], [], []

    def hook(s):
        rep = opt.report()["updates"]
        updates.append(rep["updates"])
        last.append((rep["last_update_step"], rep["last_rate"]))
        masks.append([m.clone() for m in opt.masks.values()])

    def after(s):
        tickets.append(opt.tickets)

    in_phase2 = []
    for s in range(1, total + 1):
        x, y = batch(s, device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        hook(s)
        sched.step()
        after(s)
        in_phase2.append(sched.in_phase2)
    assert in_phase2 == [False] * 37 + [True] * 13  # the next step belongs to the cycles

    assert calls == [
        ("explore", 38, (0.25,), {}),
        ("consolidate", 44, (), {}),
        ("explore", 44, (0.25,), {}),
        ("consolidate", 50, (), {}),
        ("finalize", 50, (), {}),
    ]
    # the settings were fixed once, when the scheduler was built
    settings = opt.superposition.settings
    assert (settings.averaging, settings.beta, settings.reprune) == ("cima", 0.6, "global")
    assert opt.tickets == 2 == sched.num_tickets
    assert tickets == [0] * 43 + [1] * 6 + [2]

    # Topology updates: periodic every 3 steps in phase 1, then only at the cycle starts.
    expected_update_steps = [s for s in range(1, 39) if s % 3 == 0] + [39, 45]
    update_steps = [
        s for s in range(1, total + 1) if updates[s - 1] != (updates[s - 2] if s > 1 else 0)
    ]
    assert update_steps == expected_update_steps
    assert updates[-1] == len(expected_update_steps)
    assert last[38] == (39, 0.25)  # step 39: the exploration, at explore_rate
    assert last[44] == (45, 0.25)
    assert last[37] == (36, 0.3)  # the last periodic update, at the constant prune rate

    def changed(a, b):
        return any(not torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert changed(masks[37], masks[38])  # exploration at step 39
    assert changed(masks[43], masks[44])  # exploration at step 45
    for s in range(40, total + 1):  # no other mask change in phase 2 (steps 40..50)
        if s != 45:
            assert not changed(masks[s - 2], masks[s - 1]), s
    # Step 42 and 48 are multiples of 3 that would have been periodic updates.
    assert updates[41] == updates[40]
    assert updates[47] == updates[46]
    assert not opt.periodic_updates

    # finalize: the masks moved to the superposed support, the weights are the superposed copy.
    sup = opt.superposition
    assert changed(masks[-1], list(opt.masks.values()))
    for p, s in zip(model.parameters(), sup.params, strict=True):
        assert torch.equal(p, s)


def test_total_steps_is_filled_in(device):
    model = make_model(device=device)
    opt = make_opt(model, stop_fraction=0.5)
    assert opt.total_steps is None
    SupTicketsScheduler(opt, 60, 5, superpose_fraction=0.25, lr_low=0.1, lr_high=0.2)
    assert opt.total_steps == 60
    assert opt.schedule.end_step == 30
    # an optimizer that knows its total_steps keeps it when they agree
    opt2 = make_opt(make_model(device=device), total_steps=60)
    SupTicketsScheduler(opt2, 60, 5, superpose_fraction=0.25, lr_low=0.1, lr_high=0.2)
    assert opt2.total_steps == 60


# --- bad input -----------------------------------------------------------------------------------
def _good_kwargs():
    return {"total_steps": 100, "cycle_steps": 5, "superpose_fraction": 0.1}


BAD = [
    pytest.param({"cycle_steps": 0}, ValueError, r"cycle_steps", id="cycle0"),
    pytest.param({"cycle_steps": -3}, ValueError, r"cycle_steps", id="cycle-neg"),
    pytest.param({"cycle_steps": 2.5}, TypeError, r"cycle_steps", id="cycle-float"),
    pytest.param({"total_steps": 0}, ValueError, r"total_steps", id="total0"),
    pytest.param({"lr_low": 0}, ValueError, r"lr_low", id="lr_low0"),
    pytest.param({"lr_low": -1}, ValueError, r"lr_low", id="lr_low-neg"),
    pytest.param({"lr_low": "x"}, TypeError, r"lr_low", id="lr_low-str"),
    pytest.param({"lr_low": [0.001, 0.002]}, ValueError, r"lr_low", id="lr_low-len"),
    pytest.param({"lr_high": 0}, ValueError, r"lr_high", id="lr_high0"),
    pytest.param({"lr_high": -1}, ValueError, r"lr_high", id="lr_high-neg"),
    pytest.param({"lr_high": "x"}, TypeError, r"lr_high", id="lr_high-str"),
    pytest.param({"superpose_fraction": 0}, ValueError, r"superpose_fraction", id="frac0"),
    pytest.param({"superpose_fraction": 1}, ValueError, r"superpose_fraction", id="frac1"),
    pytest.param({"superpose_fraction": 1.5}, ValueError, r"superpose_fraction", id="frac1.5"),
    pytest.param({"averaging": "mean"}, ValueError, r"averaging", id="averaging"),
    pytest.param({"beta": -0.1}, ValueError, r"beta", id="beta-neg"),
    pytest.param({"beta": 1.0}, ValueError, r"beta", id="beta1"),
    pytest.param({"reprune": "row"}, ValueError, r"reprune", id="reprune"),
    pytest.param({"explore_rate": 1.5}, ValueError, r"explore_rate", id="explore"),
    # M = floor(0.1 * 100 / 20) = 0; a cycle of at most 10 steps gives one ticket
    pytest.param({"cycle_steps": 20}, ValueError, r"cycle_steps.*cycle_steps <= 10", id="M0"),
    pytest.param(
        {"total_steps": 5, "cycle_steps": 1},
        ValueError,
        r"no ticket.*increase total_steps or superpose_fraction",
        id="M0-tiny",
    ),
]


@pytest.mark.parametrize(("override", "exc", "match"), BAD)
def test_bad_arguments(override, exc, match, device):
    opt = make_opt(make_model(device=device))
    with pytest.raises(exc, match=match):
        SupTicketsScheduler(opt, **{**_good_kwargs(), **override})
    assert opt.total_steps is None  # a refused scheduler leaves the optimizer alone
    assert "initial_lr" not in opt.param_groups[0]


def test_no_ticket_hint_is_right(device):
    # the M == 0 message above suggests cycle_steps <= 10 for total 100 at fraction 0.1
    for cycle, tickets in ((10, 1), (11, None), (5, 2)):
        opt = make_opt(make_model(device=device))
        if tickets is None:
            with pytest.raises(ValueError, match=r"cycle_steps <= 10"):
                SupTicketsScheduler(opt, 100, cycle, superpose_fraction=0.1)
        else:
            sched = SupTicketsScheduler(opt, 100, cycle, superpose_fraction=0.1)
            assert sched.num_tickets == tickets


def test_bad_plain_optimizer(device):
    inner = torch.optim.SGD(make_model(device=device).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer.*SparseOptimizer"):
        SupTicketsScheduler(inner, 100, 5)


def test_bad_total_steps_mismatch(device):
    opt = make_opt(make_model(device=device), total_steps=200)
    with pytest.raises(ValueError, match=r"total_steps=100.*total_steps=200"):
        SupTicketsScheduler(opt, 100, 5)


def test_bad_base_plateau(device):
    opt = make_opt(make_model(device=device))
    with pytest.raises(TypeError, match=r"base.*ReduceLROnPlateau"):
        SupTicketsScheduler(opt, 100, 5, base=ReduceLROnPlateau(opt))


def test_bad_base_not_a_scheduler(device):
    opt = make_opt(make_model(device=device))
    with pytest.raises(TypeError, match=r"base"):
        SupTicketsScheduler(opt, 100, 5, base=lambda step: 0.1)


def test_bad_base_on_another_optimizer(device):
    opt = make_opt(make_model(device=device))
    other = torch.optim.SGD(make_model(1, device=device).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"base.*same optimizer"):
        SupTicketsScheduler(opt, 100, 5, base=MultiStepLR(other, [10]))


def test_base_on_inner_optimizer_is_accepted(device):
    opt = make_opt(make_model(device=device))
    sched = SupTicketsScheduler(opt, 100, 5, base=MultiStepLR(opt.optimizer, [10]), lr_low=0.01,
                                lr_high=0.05)  # fmt: skip
    assert sched.base.optimizer is opt.optimizer


def test_step_with_epoch_is_refused(device):
    opt = make_opt(make_model(device=device))
    sched = SupTicketsScheduler(opt, 100, 5)
    with pytest.raises(ValueError, match=r"epoch"):
        sched.step(3)


# --- state dict -----------------------------------------------------------------------------------
def _build(model_seed: int = 0):
    model = make_model(model_seed)
    opt = make_opt(model)
    base = MultiStepLR(opt, milestones=[9, 18], gamma=0.1)
    sched = SupTicketsScheduler(opt, 40, 4, base=base, superpose_fraction=0.3, lr_high=0.004)
    return model, opt, base, sched


@pytest.mark.parametrize("k", [12, 30])
def test_state_dict_round_trip(k):
    model, opt, base, sched = _build()
    run(model, opt, sched, k)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["sched"]["base"] is not None

    model2, opt2, base2, sched2 = _build(model_seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.state_dict() == sched.state_dict()
    assert base2.state_dict() == base.state_dict()
    assert sched2.base is base2
    assert sched2.optimizer is opt2
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]

    # Continue both: the same rates, to the last bit.
    lrs_a, lrs_b = [], []
    for s in range(k + 1, 41):
        for m, o, sc, out in ((model, opt, sched, lrs_a), (model2, opt2, sched2, lrs_b)):
            x, y = batch(s)
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            out.append([g["lr"] for g in o.param_groups])
            o.step()
            sc.step()
    assert lrs_a == lrs_b
    assert opt2.tickets == 3


def test_load_state_dict_base_mismatch(device):
    _, _, _, sched = _build()
    opt = make_opt(make_model(device=device))
    no_base = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3, base="constant")
    with pytest.raises(ValueError, match=r"base"):
        no_base.load_state_dict(sched.state_dict())


def test_load_state_dict_refuses_another_schedule():
    from sparseopt import SparseOptimizer, SupTicketsScheduler

    def build(total):
        model = torch.nn.Linear(4, 4)
        opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.001), "set", 0.5, seed=0)
        return SupTicketsScheduler(opt, total_steps=total, cycle_steps=5)

    state = build(100).state_dict()
    with pytest.raises(ValueError, match=r"total_steps=100 vs this scheduler's 200"):
        build(200).load_state_dict(state)
    build(100).load_state_dict(state)


# --- rates relative to the optimizer (issue 23) ---------------------------------------------------
def paper_phase1(lr: float, phase1: int) -> list[float]:
    """The paper's phase 1 by hand: x0.1 after step P // 2 and after step 3P // 4."""
    m1, m2 = phase1 // 2, 3 * phase1 // 4
    return [
        lr if s <= m1 else lr * 0.1 if s <= m2 else lr * 0.1 * 0.1 for s in range(1, phase1 + 1)
    ]


def _run_quiet(model, opt, sched, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lrs = run(model, opt, sched, steps)
    return lrs, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("inner", "lr", "low", "high"),
    [
        ("sgd", 0.1, 0.001, 0.005),  # the paper's rates, exactly
        ("adamw", 1e-3, 1e-5, 5e-5),
        ("adam", 3e-4, 3e-6, 1.5e-5),
    ],
)
def test_relative_default_rates_follow_the_optimizer(inner, lr, low, high, device):
    """``lr_low=None, lr_high=None``: 1/100 and 1/20 of the optimizer's rate; ``base=None``: the
    paper's phase 1, which ends exactly at ``lr_low``: no warning, as in the README's loop."""
    model = make_model(device=device)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[inner]
    opt = SparseOptimizer(cls(model.parameters(), lr=lr), "set", 0.7, model=model, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = SupTicketsScheduler(opt, total_steps=40, cycle_steps=4, superpose_fraction=0.3)
    lrs, caught = _run_quiet(model, opt, sched, 40)
    assert caught == []
    assert [r[0] for r in lrs[:28]] == pytest.approx(paper_phase1(lr, 28), rel=1e-12)
    assert [r[0] for r in lrs[28:]] == pytest.approx(
        [eq3(i, 4, low, high) for i in range(1, 13)], rel=1e-12
    )
    assert lrs[27][0] == pytest.approx(low, rel=1e-12)  # phase 1 ends at lr_low
    for s in sched.ticket_steps:  # the cycle ends: exactly lr / 100
        assert lrs[s - 1][0] == lr / 100
    if inner == "sgd":
        assert lr / 100 == 0.001
        assert lrs[29][0] == lr / 20 == 0.005  # mid-cycle: the paper's peak, to the bit


def test_relative_rates_of_two_groups_with_different_rates(device):
    model = make_model(device=device)
    opt = make_opt(model, lrs=(0.1, 0.03))
    sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3)
    lrs, caught = _run_quiet(model, opt, sched, 40)
    assert caught == []
    for g, lr in enumerate((0.1, 0.03)):
        assert [r[g] for r in lrs[:28]] == pytest.approx(paper_phase1(lr, 28), rel=1e-12)
        assert [r[g] for r in lrs[28:]] == pytest.approx(
            [eq3(i, 4, lr / 100, lr / 20) for i in range(1, 13)], rel=1e-12
        )
    # group 1 by hand: 0.0003 at the cycle ends, 0.0015 at mid-cycle
    assert lrs[31][1] == pytest.approx(0.0003, rel=1e-12)
    assert lrs[29][1] == pytest.approx(0.0015, rel=1e-12)


def test_explicit_scalars_stay_absolute_and_scale_by_the_initial_rate_ratio(device):
    """A float is the first group's rate; the other group scales it by its initial-rate ratio
    (the meaning before the relative defaults); a list gives one absolute rate per group."""
    model = make_model(device=device)
    opt = make_opt(model, lrs=(0.1, 0.03))
    sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3, lr_low=0.002, lr_high=0.004)
    lrs, _ = _run_quiet(model, opt, sched, 40)
    assert [r[0] for r in lrs[28:]] == pytest.approx(
        [eq3(i, 4, 0.002, 0.004) for i in range(1, 13)], rel=1e-12
    )
    assert [r[1] for r in lrs[28:]] == pytest.approx(
        [eq3(i, 4, 0.002 * 0.3, 0.004 * 0.3) for i in range(1, 13)], rel=1e-12
    )


def test_constant_phase1_is_kept_and_warns_at_the_jump(device):
    model = make_model(device=device)
    opt = make_opt(model)
    sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3, base="constant")
    assert sched.base is None
    lrs, caught = _run_quiet(model, opt, sched, 40)
    assert [r[0] for r in lrs[:28]] == [0.1] * 28
    assert len(caught) == 1
    assert "far from lr_low" in caught[0]


def test_shared_base_keeps_the_base_runs_milestones(device):
    """``base="shared"``: x0.1 at 1/2 and 3/4 of the whole run (steps 20 and 30 of 40); with 12
    steps of cycles, phase 1 (28 steps) sees only the first."""
    model = make_model(device=device)
    opt = make_opt(model)
    sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3, base="shared")
    assert sorted(sched.base.milestones) == [20, 30]
    lrs, _ = _run_quiet(model, opt, sched, 40)
    assert [r[0] for r in lrs[:28]] == pytest.approx([0.1] * 20 + [0.01] * 8, rel=1e-12)


def test_a_group_added_after_the_scheduler_gets_its_own_rates(device):
    """Issue 22, bug 2: ``add_param_group`` after the scheduler was built (an IndexError in phase
    2 before). The new group's rate when the scheduler next steps is its peak."""
    model = make_model(device=device)
    opt = make_opt(model)
    sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3)
    extra = nn.Linear(6, 5).to(device)  # not in the forward: no gradient, the lr is what counts

    def hook(s):
        if s == 3:
            opt.add_param_group({"params": list(extra.parameters()), "lr": 0.02})

    lrs = run(model, opt, sched, 40, hook=hook)
    new = [r[1] for r in lrs[3:]]  # the group exists from step 4 on
    assert new[:11] == pytest.approx([0.02] * 11, rel=1e-12)  # steps 4..14 (milestone 14)
    assert [r[1] for r in lrs[28:]] == pytest.approx(
        [eq3(i, 4, 0.02 / 100, 0.02 / 20) for i in range(1, 13)], rel=1e-12
    )
    assert opt.tickets == 3


def test_lr_high_below_lr_low_names_both(device):
    opt = make_opt(make_model(device=device), lrs=(0.001,))
    with pytest.raises(ValueError, match=r"lr_high >= lr_low.*lr_high=0\.0002 < lr_low=0\.001"):
        SupTicketsScheduler(opt, 100, 5, lr_low=0.001, lr_high=0.0002)
    # the docs' old advice with AdamW (lr_high a fifth of the peak, lr_low left at 0.001): caught
    with pytest.raises(ValueError, match=r"lr_high=5e-05 < lr_low=0\.001"):
        SupTicketsScheduler(opt, 100, 5, lr_low=0.001)
    assert opt.total_steps is None  # refused before anything changed


def test_the_official_preset_keeps_the_absolute_rates(device):
    """``official()`` runs the official code's 0.001 -> 0.005, whatever the optimizer's rate."""
    model = make_model(device=device)
    opt = make_opt(model, lrs=(1e-3,))
    sched = SupTicketsScheduler.official(opt, 40, 4, None, superpose_fraction=0.3,
                                         base="constant")  # fmt: skip
    lrs, _ = _run_quiet(model, opt, sched, 40)
    assert [r[0] for r in lrs[28:]] == pytest.approx(
        [eq3(i, 4, 0.001, 0.005) for i in range(1, 13)], rel=1e-12
    )


def test_repr_says_where_the_schedule_is(device):
    model = make_model(device=device)
    opt = make_opt(model)
    sched = SupTicketsScheduler(opt, 40, 4, superpose_fraction=0.3, averaging="cima", beta=0.5)
    text = repr(sched)
    for part in ("SupTicketsScheduler(step=0/40 (phase 1)", "phase1_steps=28", "tickets=0/3",
                 "base=MultiStepLR", "lr_low=initial_lr/100", "lr_high=initial_lr/20",
                 "averaging='cima'", "beta=0.5", "select=None"):  # fmt: skip
        assert part in text, (part, text)
    run(model, opt, sched, 40)
    assert "step=40/40 (phase 2, finalized)" in repr(sched)
    assert "tickets=3/3" in repr(sched)
    other = make_opt(make_model(device=device))
    with_rates = SupTicketsScheduler(other, 40, 4, superpose_fraction=0.3, lr_low=0.002,
                                     lr_high=[0.004])  # fmt: skip
    assert "lr_low=0.002, lr_high=0.004" in repr(with_rates)


def test_a_state_saved_without_a_base_resumes_into_the_default_scheduler(device):
    """sparseopt 0.1's default phase 1 was constant (no base): its state loads into a scheduler
    built with ``base=None``, which then keeps that constant phase 1; an explicit base refuses."""
    old = SupTicketsScheduler(make_opt(make_model(device=device)), 40, 4, superpose_fraction=0.3,
                              base="constant")  # fmt: skip
    state = old.state_dict()
    assert state["base"] is None
    default = SupTicketsScheduler(make_opt(make_model(device=device)), 40, 4,
                                  superpose_fraction=0.3)  # fmt: skip
    assert default.base is not None
    default.load_state_dict(state)
    assert default.base is None
    explicit = SupTicketsScheduler(make_opt(make_model(device=device)), 40, 4,
                                   superpose_fraction=0.3, base="paper")  # fmt: skip
    with pytest.raises(ValueError, match=r"saved with no base scheduler.*base='constant'"):
        explicit.load_state_dict(state)
