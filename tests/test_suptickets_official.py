"""The official code's phase 2 as options: ticket 0 (``include_phase1``) and ``bn_update``.

Each option is checked against a slow reference written here:

- ticket 0: the first superposition of a cycle's ticket equals the pruned mean of the phase-1
  model and that ticket, computed with a stable sort (per layer, or globally);
- ``bn_update``: the recomputed statistics equal ``torch.optim.swa_utils.update_bn`` applied to a
  deep copy of the model that holds the superposed weights; the live statistics are untouched.

Bad input: an iterator, a missing model, a batch the model cannot take, no batch at all; a
failing ``bn_update`` leaves the superposed copy exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import mlp
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from sparseopt import SparseOptimizer, SupTicketsScheduler

T, C, FRACTION = 30, 4, 0.3  # M = 2 tickets; phase 1 = 22 steps; tickets after 26, 30
PHASE1, TICKETS = 22, [26, 30]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> nn.Module:
    return mlp(12, 32, 24, 3, batchnorm=True, seed=0)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


BN_BATCHES = [batch(500 + i)[0] for i in range(4)]


def build(**options):
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SparseOptimizer(inner, "rigl", 0.8, model=model, update_every=5, seed=0)
    base = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[8, 16], gamma=0.1)
    sched = SupTicketsScheduler(opt, T, C, base=base, superpose_fraction=FRACTION, **options)
    return model, opt, sched


def train(model, opt, sched, stop: int, grab=()) -> dict[int, dict[str, Tensor]]:
    """Steps 1..stop; the model's state right after ``opt.step()`` (before the scheduler's)."""
    seen = {}
    for step in range(1, stop + 1):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step in grab:
            seen[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sched.step()
    return seen


def superposed_state(model, opt) -> dict[str, Tensor]:
    with opt.superposed():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def top_k_stable(values: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest ``|values|``, ties to the lowest index: a stable sort."""
    order = torch.sort(-values.abs().reshape(-1), stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(values.shape)


def pruned_mean(a: dict, b: dict, names: list[str], counts: list[int], reprune: str) -> dict:
    """The reference: mean of two state dicts (float entries), sparse ones pruned."""
    mean = {k: (a[k].double() + b[k].double()) / 2 for k in a}
    if reprune == "layer":
        for name, count in zip(names, counts, strict=True):
            mean[name] = mean[name] * top_k_stable(mean[name], count)
    else:
        flat = torch.cat([mean[n].reshape(-1) for n in names])
        keep = top_k_stable(flat, sum(counts))
        pos = 0
        for name in names:
            n = mean[name].numel()
            mean[name] = mean[name] * keep[pos : pos + n].reshape(mean[name].shape)
            pos += n
    return mean


SPARSE = ["0.weight", "3.weight", "6.weight"]


@pytest.mark.parametrize("reprune", ["layer", "global"])
def test_ticket0_first_superposition_is_pruned_mean_of_phase1_model_and_ticket1(reprune):
    model, opt, sched = build(include_phase1=True, reprune=reprune, explore_rate=0.5)
    seen = train(model, opt, sched, TICKETS[0], grab=(PHASE1, TICKETS[0]))
    assert opt.tickets == 2  # ticket 0 and the first cycle's
    t0, t1 = seen[PHASE1], seen[TICKETS[0]]
    counts = [layer.count for layer in opt.layers]
    expected = pruned_mean(t0, t1, SPARSE, counts, reprune)
    got = superposed_state(model, opt)
    for key, value in got.items():
        if key.endswith("num_batches_tracked"):
            assert value == torch.round(expected[key]).long(), key
        else:
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-7)
    # the exploration moved the masks: ticket 0 and ticket 1 have different supports, so the
    # comparison above covers a real average, not one ticket twice (negative control)
    assert any(not torch.equal(t0[n] != 0, t1[n] != 0) for n in SPARSE)


def test_without_ticket0_the_first_superposition_is_ticket1_alone():
    model, opt, sched = build(explore_rate=0.5)
    seen = train(model, opt, sched, TICKETS[0], grab=(PHASE1, TICKETS[0]))
    assert opt.tickets == 1
    got = superposed_state(model, opt)
    t1 = seen[TICKETS[0]]
    for name in SPARSE:
        torch.testing.assert_close(got[name], t1[name] * (got[name] != 0))
    with_t0 = pruned_mean(seen[PHASE1], t1, SPARSE, [layer.count for layer in opt.layers], "layer")
    assert not torch.allclose(got["0.weight"].double(), with_t0["0.weight"])


def test_ticket0_counts_in_the_last_average_with_cia():
    """Ticket 0 then two tickets: CIA gives S2 = prune((S1 + T2) / 2), S1 the pruned mean."""
    model, opt, sched = build(include_phase1=True, explore_rate=0.0)
    seen = train(model, opt, sched, T - 1, grab=(PHASE1, TICKETS[0]))
    s1 = superposed_state(model, opt)
    x, y = batch(T)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    t2 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sched.step()  # consolidates the third ticket, then finalizes
    assert opt.tickets == 3
    counts = [layer.count for layer in opt.layers]
    s1_ref = pruned_mean(seen[PHASE1], seen[TICKETS[0]], SPARSE, counts, "layer")
    for name in SPARSE:
        torch.testing.assert_close(s1[name].double(), s1_ref[name], rtol=1e-6, atol=1e-7)
    # CIA's running mean over three tickets: weight 1/3 for the newest
    s2_ref = {k: s1[k].double() * 2 / 3 + t2[k].double() / 3 for k in SPARSE}
    for name, count in zip(SPARSE, counts, strict=True):
        s2_ref[name] = s2_ref[name] * top_k_stable(s2_ref[name], count)
        torch.testing.assert_close(
            model.state_dict()[name].double(), s2_ref[name], atol=1e-7, rtol=1e-6
        )


# --- BatchNorm statistics recomputed --------------------------------------------------------------
def bn_keys(state: dict) -> list[str]:
    return [k for k in state if "running" in k or "num_batches" in k]


@pytest.mark.parametrize("form", ["iterable", "pairs", "callable"])
def test_bn_update_equals_update_bn_on_a_copy(form):
    if form == "iterable":
        bn_update = BN_BATCHES
    elif form == "pairs":
        bn_update = [(x, torch.zeros(len(x))) for x in BN_BATCHES]  # (inputs, targets) batches
    else:

        def bn_update(m):
            for x in BN_BATCHES:
                m(x)

    model, opt, sched = build(bn_update=bn_update, include_phase1=True)
    seen = train(model, opt, sched, TICKETS[0], grab=(TICKETS[0],))
    live = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(live[k], seen[TICKETS[0]][k]) for k in live)  # live stats untouched
    got = superposed_state(model, opt)

    reference = copy.deepcopy(model)
    reference.load_state_dict({k: got[k] for k in got if k not in bn_keys(got)}, strict=False)
    update_bn(BN_BATCHES, reference)
    ref_state = reference.state_dict()
    assert bn_keys(got)
    for key in bn_keys(got):
        torch.testing.assert_close(got[key], ref_state[key], rtol=1e-6, atol=1e-7)
    assert int(got["1.num_batches_tracked"]) == len(BN_BATCHES)
    # the model is back in the mode it was in, with its momenta
    assert model.training
    assert model[1].momentum == 0.1


def test_without_bn_update_statistics_are_averaged_not_recomputed():
    """Negative control: the reference above would not hold for averaged statistics."""
    model, opt, sched = build(include_phase1=True)
    seen = train(model, opt, sched, TICKETS[0], grab=(PHASE1, TICKETS[0]))
    got = superposed_state(model, opt)
    expected_mean = (seen[PHASE1]["1.running_mean"] + seen[TICKETS[0]]["1.running_mean"]) / 2
    torch.testing.assert_close(got["1.running_mean"], expected_mean)
    reference = copy.deepcopy(model)
    reference.load_state_dict(got)
    update_bn(BN_BATCHES, reference)
    assert not torch.allclose(got["1.running_mean"], reference.state_dict()["1.running_mean"])


def test_bn_update_on_consolidate_directly():
    model = make_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8, model=model)
    x, y = batch(1)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.consolidate(bn_update=BN_BATCHES)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    reference = copy.deepcopy(model)
    update_bn(BN_BATCHES, reference)  # one ticket: the superposed copy is the (pruned) live one
    got = superposed_state(model, opt)
    torch.testing.assert_close(got["4.running_var"], reference.state_dict()["4.running_var"])


# --- bad input ------------------------------------------------------------------------------------
def test_iterator_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"bn_update.*iterator"):
        build(bn_update=iter(BN_BATCHES))


def test_bn_update_of_a_wrong_type_is_refused():
    with pytest.raises(TypeError, match=r"bn_update.*int"):
        build(bn_update=3)


def test_include_phase1_must_be_a_bool():
    with pytest.raises(TypeError, match=r"include_phase1.*str"):
        build(include_phase1="yes")


def test_bn_update_needs_the_model():
    model = make_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.8)
    with pytest.raises(ValueError, match="model="):
        SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION, bn_update=BN_BATCHES)
    with pytest.raises(ValueError, match="model="):
        opt.consolidate(bn_update=BN_BATCHES)


def test_include_phase1_after_phase1_is_refused():
    model = make_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.8, model=model)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    with pytest.raises(ValueError, match=r"include_phase1.*after phase 1"):
        SupTicketsScheduler(
            opt, T, C, superpose_fraction=FRACTION, include_phase1=True, last_epoch=PHASE1
        )


@pytest.mark.parametrize(
    ("bn_update", "match"),
    [
        pytest.param([], "gave no batch", id="empty"),
        pytest.param([torch.randn(4, 7)], "could not run the model", id="wrong-shape"),
    ],
)
def test_bad_batches_fail_at_the_first_consolidate_and_leave_no_ticket(bn_update, match):
    model, opt, sched = build(bn_update=bn_update, include_phase1=True)
    train(model, opt, sched, PHASE1 - 1)
    x, y = batch(PHASE1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        sched.step()  # ticket 0 is consolidated here
    assert opt.tickets == 0
    assert opt.state_dict()["sparseopt"]["superposition"] is None  # nothing to save: no trace
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())


def test_a_failing_later_consolidate_leaves_the_superposed_copy_as_it_was():
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of data")
        for x in BN_BATCHES:
            m(x)

    model, opt, sched = build(bn_update=flaky, include_phase1=True)
    train(model, opt, sched, TICKETS[0] - 1)
    assert opt.tickets == 1
    saved = opt.state_dict()["sparseopt"]["superposition"]
    x, y = batch(TICKETS[0])
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    live_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="out of data"):
        sched.step()
    assert opt.tickets == 1
    now = opt.state_dict()["sparseopt"]["superposition"]
    assert now["tickets"] == saved["tickets"]
    for i, p in saved["params"].items():
        assert torch.equal(now["params"][i], p)
    for k, b in saved["buffers"].items():
        assert torch.equal(now["buffers"][k], b)
    assert all(torch.equal(live_before[k], v) for k, v in model.state_dict().items())


# --- the official preset --------------------------------------------------------------------------
def test_official_preset_is_the_explicit_options():
    runs = []
    for make in ("preset", "explicit"):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = SparseOptimizer(inner, "rigl", 0.8, model=model, update_every=5, seed=0)
        base = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[8, 16], gamma=0.1)
        if make == "preset":
            sched = SupTicketsScheduler.official(
                opt, T, C, BN_BATCHES, base=base, superpose_fraction=FRACTION
            )
        else:
            sched = SupTicketsScheduler(
                opt, T, C, base=base, superpose_fraction=FRACTION, include_phase1=True,
                bn_update=BN_BATCHES, reprune="global", averaging="cia", explore_rate=0.5,
                lr_low=0.001, lr_high=0.005,
            )  # fmt: skip
        train(model, opt, sched, T)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
        assert opt.tickets == 3
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_official_preset_takes_overrides_and_keeps_its_table():
    model = make_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.001), "set", 0.8, model=model)
    sched = SupTicketsScheduler.official(
        opt, T, C, None, superpose_fraction=FRACTION, explore_rate=0.1
    )
    assert (sched.include_phase1, sched.reprune, sched.explore_rate) == (True, "global", 0.1)
    assert sched.bn_update is None
    assert SupTicketsScheduler.OFFICIAL["explore_rate"] == 0.5
    with pytest.raises(TypeError):
        SupTicketsScheduler.OFFICIAL["explore_rate"] = 0.1  # read-only
