"""``select=``: a validated ultimate ticket, checked against a slow reference written here.

The reference takes the live tickets from the training loop itself (the model right after the
optimizer step of the phase boundary and of each cycle end, before ``sched.step()``), scores each
on a fresh copy of the model, and runs the greedy soup of model soups by hand: sort by score
(ties keep their order), start from the best, add the next if the mean of the soup with it
(float64 sums in soup order), re-pruned per layer by a stable sort and with its BatchNorm
statistics averaged (or recomputed with ``torch.optim.swa_utils.update_bn``), scores at least as
high. The ultimate ticket is the first best of: the superposition, the soup (two tickets or
more), the single tickets by rank.

Bad input: a ``select`` that raises, or returns NaN, a string or a tensor, stops ``finalize()``
with a clear error and leaves the model holding the last live ticket. Under DDP (two gloo ranks)
rank 0's scores decide, so the ranks end on the same ticket even when their own scores disagree.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.distributed as dist
from cases import mlp
from ranks import run_ranks, spawn, to_cpu
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.soup import greedy_soup
from sparseopt.superposition import Candidate, bn_buffers

T, C, FRACTION = 40, 4, 0.3  # phase 1 = 28 steps; tickets after 32, 36, 40
PHASE1, TICKETS = 28, [32, 36, 40]
SPARSE = ["0.weight", "3.weight", "6.weight"]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0) -> nn.Module:
    return mlp(8, 24, 24, 4, batchnorm=True, seed=seed)


def batch(step: int, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(4000 + step)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


VAL = batch(99_999, 64)
BN_BATCHES = [batch(5000 + i)[0] for i in range(3)]


def val_score(model: nn.Module) -> float:
    """Minus the validation loss, in eval mode (a scorer that leaves the model in eval mode: the
    library restores the training flags)."""
    model.eval()
    with torch.no_grad():
        return -float(nn.functional.cross_entropy(model(VAL[0]), VAL[1]))


def build(select, seed: int = 0, **options):
    model = make_model(seed)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SparseOptimizer(inner, "rigl", 0.8, model=model, update_every=5, seed=0)
    options = {"explore_rate": 0.5, **options}
    sched = SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION, select=select, **options)
    return model, opt, sched


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model, opt, sched, stop: int = T, start: int = 1) -> dict[str, dict[str, Tensor]]:
    """Steps ``start..stop``; the live tickets (phase-1 model, cycle ends) as the loop sees them."""
    seen = {}
    for step in range(start, stop + 1):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == PHASE1:
            seen["phase 1"] = state_of(model)
        elif step in TICKETS:
            seen[f"ticket {TICKETS.index(step) + 1}"] = state_of(model)
        sched.step()
    return seen


# --- the slow reference -------------------------------------------------------------------------
def keep_largest(values: Tensor, k: int) -> Tensor:
    order = torch.sort(-values.abs().reshape(-1), stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(values.shape)


def scored(fn, state: dict[str, Tensor]) -> float:
    model = make_model(123)
    model.load_state_dict(state)
    model.train()
    return fn(model)


def mix(states: list[dict[str, Tensor]], counts: list[int], bn_update) -> dict[str, Tensor]:
    out = {}
    for key, ref in states[0].items():
        total = states[0][key].double()
        for s in states[1:]:
            total = total + s[key].double()
        mean = total / len(states)
        out[key] = mean.round().to(ref.dtype) if not ref.is_floating_point() else mean.to(ref.dtype)
    for name, count in zip(SPARSE, counts, strict=True):
        out[name] = out[name] * keep_largest(out[name], count)
    if bn_update is not None:
        model = make_model(123)
        model.load_state_dict(out)
        update_bn(bn_update, model)
        out = state_of(model)
    return out


def reference(fn, cands: dict[str, dict], sup: dict, counts: list[int], bn_update=None):
    singles = {name: scored(fn, s) for name, s in cands.items()}
    s_sup = scored(fn, sup)
    ranked = sorted(cands, key=lambda n: -singles[n])
    soup, best = [ranked[0]], singles[ranked[0]]
    for name in ranked[1:]:
        value = scored(fn, mix([cands[m] for m in [*soup, name]], counts, bn_update))
        if value >= best:
            soup, best = [*soup, name], value
    options = [("superposition", s_sup)]
    if len(soup) > 1:
        options.append(("soup", best))
    options += [(n, singles[n]) for n in ranked]
    chosen = max(options, key=lambda t: t[1])[0]
    if chosen == "superposition":
        final = sup
    elif chosen == "soup":
        final = mix([cands[m] for m in soup], counts, bn_update)
    else:
        final = cands[chosen]
    return (
        chosen,
        {**singles, "superposition": s_sup, **({"soup": best} if len(soup) > 1 else {})},
        soup,
        final,
    )


def distance_to(target: dict[str, Tensor]):
    """A scorer that prefers weights near ``target``: minus the squared distance."""

    def fn(model: nn.Module) -> float:
        state = model.state_dict()
        return -sum(float((state[n] - target[n]).double().square().sum()) for n in SPARSE)

    return fn


def _tickets_and_superposition(**options):
    """One run without select: the live tickets and the superposition (the same as with it)."""
    model, opt, sched = build(None, **options)
    seen = train(model, opt, sched, T)
    return seen, state_of(model)


def _mean_of(states) -> dict[str, Tensor]:
    return {n: sum(s[n] for s in states) / len(states) for n in SPARSE}


SCORERS = {
    "val-loss": lambda seen: val_score,
    "near-the-mean": lambda seen: distance_to(_mean_of(seen.values())),  # soups join
    "near-phase-1": lambda seen: distance_to(seen["phase 1"]),  # the negative control
}


@pytest.mark.parametrize("bn", ["averaged", "recomputed"])
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_the_choice_matches_the_slow_reference(scorer, bn):
    options = {"bn_update": BN_BATCHES} if bn == "recomputed" else {}
    seen, _ = _tickets_and_superposition(**options)
    fn = SCORERS[scorer](seen)
    calls = []

    def counted(model):
        calls.append(1)
        return fn(model)

    model, opt, sched = build(counted, **options)
    again = train(model, opt, sched, T)
    for name in seen:  # select= changes nothing before finalize(): the same tickets
        assert all(torch.equal(seen[name][k], again[name][k]) for k in seen[name])
    view = opt.superposition
    assert view.candidates == ("phase 1", "ticket 1", "ticket 2", "ticket 3")
    sup_state = dict(seen["ticket 3"])
    for key, value in zip([k for k, _ in model.named_parameters()], view.params, strict=True):
        sup_state[key] = value
    for key, value in view.buffers.items():
        live = sup_state[key]
        sup_state[key] = (
            value.round().to(live.dtype) if not live.is_floating_point() else value.to(live.dtype)
        )
    counts = [layer.count for layer in opt.layers]
    chosen, scores, soup, final = reference(fn, seen, sup_state, counts, options.get("bn_update"))

    assert view.finalized
    assert view.chosen == chosen
    assert dict(view.scores) == pytest.approx(scores, rel=1e-12, abs=1e-12)
    assert list(opt.report()["suptickets"]["soup"]) == soup
    assert len(calls) == 2 * len(seen)  # K single tickets, the superposition, K - 1 soups
    for key, value in final.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    # never below any single candidate, and the masks hold exactly the target counts
    assert scores[chosen] >= max(scores[n] for n in [*seen, "superposition"])
    assert [layer.count for layer in opt.layers] == counts
    for layer in opt.layers:
        assert torch.all(layer.param[~layer.mask] == 0)
    if scorer == "near-phase-1":
        assert chosen == "phase 1"  # it scores 0, the maximum
    if scorer == "near-the-mean":
        assert len(soup) >= 2  # the soup's accept branch is exercised
    if scorer in ("val-loss", "near-the-mean"):
        assert chosen != "phase 1"


def test_include_phase1_false_still_scores_the_phase1_model():
    for include in (False, True):
        model, opt, sched = build(val_score, include_phase1=include)
        train(model, opt, sched, T)
        assert "phase 1" in opt.superposition.scores
        assert opt.superposition.candidates[0] == "phase 1"
        assert opt.tickets == 3 + include  # folded only with include_phase1


def test_without_select_the_configured_superposition_is_written():
    model, opt, sched = build(None)
    train(model, opt, sched, T)
    report = opt.report()["suptickets"]
    assert (report["finalized"], report["chosen"], report["scores"]) == (True, "superposition", {})
    assert report["candidates"] == []  # nothing kept without select= or keep_tickets


def test_the_report_shows_each_score_and_the_choice():
    model, opt, sched = build(val_score)
    train(model, opt, sched, T)
    report = opt.report()
    sup = report["suptickets"]
    assert set(sup["scores"]) >= {"phase 1", "ticket 1", "ticket 2", "ticket 3", "superposition"}
    assert sup["chosen"] in sup["scores"]
    line = str(report).splitlines()[-1]
    assert line.startswith(f"Sup-tickets: 3 tickets, finalized, chose {sup['chosen']}")
    assert "phase 1" in line
    assert "superposition" in line


def test_kept_tickets_cost_what_the_docs_say():
    """Per kept ticket: active values, bit masks (numel / 8 bytes), dense params, BN buffers."""
    model, opt, sched = build(val_score)
    train(model, opt, sched, PHASE1)
    params = [p for g in opt.param_groups for p in g["params"]]
    kept = Candidate.take("phase 1", params, opt.layers, bn_buffers(model))
    expected = sum(layer.count * 4 + math.ceil(layer.numel / 8) for layer in opt.layers)
    expected += sum(p.numel() * 4 for p in model.parameters() if p.ndim < 2)
    expected += sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    assert kept.nbytes() == expected
    assert kept.nbytes() < 0.5 * sum(p.numel() * 4 for p in params)  # at 80% sparsity


# --- bad select: a clear error, and the last live ticket ------------------------------------------
def _raises(model):
    raise KeyError("no validation data")


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        pytest.param(lambda m: float("nan"), ValueError, r"finite number, but got nan for phase 1",
                     id="nan"),
        pytest.param(lambda m: float("inf"), ValueError, r"finite number, but got inf", id="inf"),
        pytest.param(lambda m: "0.9", TypeError, r"real number.*'0\.9' \(str\)", id="str"),
        pytest.param(lambda m: torch.tensor(0.9), TypeError, r"call \.item\(\) on a tensor",
                     id="tensor"),
        pytest.param(lambda m: True, TypeError, r"real number.*True \(bool\)", id="bool"),
        pytest.param(_raises, RuntimeError, r"select raised KeyError: 'no validation data'",
                     id="raises"),
    ],
)  # fmt: skip
def test_a_bad_select_stops_finalize_and_leaves_the_last_live_ticket(fn, error, match):
    model, opt, sched = build(fn)
    train(model, opt, sched, T - 1)
    x, y = batch(T)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    live = state_of(model)
    masks = [m.clone() for m in opt.masks.values()]
    model.train()
    with pytest.raises(error, match=match) as info:
        sched.step()  # the last ticket, then finalize() scores the candidates
    assert "the model holds the last live ticket" in str(info.value)
    if fn is _raises:
        assert isinstance(info.value.__cause__, KeyError)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(masks, opt.masks.values(), strict=True))
    assert model.training
    assert not opt.superposition.finalized
    assert opt.tickets == 3
    # select may be replaced until finalize(): a working one finishes the run
    opt.configure_superposition(select=val_score)
    opt.finalize()
    assert opt.superposition.finalized
    assert opt.superposition.chosen in opt.superposition.scores


def test_greedy_soup_against_a_brute_force_of_its_rule():
    """The pure rule on score tables: the soup is what the loop over the ranking accepts."""
    gen = torch.Generator().manual_seed(0)
    names = ("a", "b", "c", "d")
    for _ in range(50):
        table = {}

        def score(members, table=table):
            key = tuple(sorted(members))
            if key not in table:
                table[key] = float(torch.randint(0, 5, (), generator=gen))
            return table[key]

        singles = {n: score((n,)) for n in names}
        ranked = sorted(((n, singles[n]) for n in names), key=lambda t: -t[1])
        members, best = greedy_soup(ranked, score)
        expect, value = [ranked[0][0]], ranked[0][1]
        for name, _ in ranked[1:]:
            if table[tuple(sorted([*expect, name]))] >= value:
                expect, value = [*expect, name], table[tuple(sorted([*expect, name]))]
        assert list(members) == expect
        assert best == value >= ranked[0][1]


# --- the recommended preset ---------------------------------------------------------------------
def test_the_recommended_preset_is_the_studied_setting_and_validates():
    model = make_model()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "rigl", 0.8,
                          model=model, update_every=5, seed=0)  # fmt: skip
    sched = SupTicketsScheduler.recommended(opt, T, C, select=val_score, bn_update=BN_BATCHES,
                                            superpose_fraction=FRACTION)  # fmt: skip
    assert sched.explore_rate == 0.1
    assert sched.lr_high == [0.1 / 2]
    assert sched.lr_low is None  # relative: 0.1 / 100
    assert sorted(sched.base.milestones) == [T // 2, 3 * T // 4]
    assert sched.select is val_score
    assert sched.bn_update is BN_BATCHES
    train(model, opt, sched, T)
    scores = opt.superposition.scores
    assert scores[opt.superposition.chosen] == max(scores.values())


# --- under DDP: rank 0 decides ------------------------------------------------------------------
def _rank_scorer(rank: int, record: list):
    """Rank 0 scores on validation; rank 1's own scorer prefers the phase-1 model (it would
    choose it alone): the broadcast must make rank 1 follow rank 0."""

    def fn(model):
        value = val_score(model)
        if rank == 1:
            state = model.state_dict()
            value = -sum(float(state[n].double().abs().sum()) for n in SPARSE)
        record.append(value)
        return value

    return fn


def _ddp_ranks(rank: int, world: int, out: str, device: torch.device) -> None:
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    record: list[float] = []
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SparseOptimizer(inner, "rigl", 0.8, model=model, update_every=5, seed=0)
    sched = SupTicketsScheduler(opt, T, C, superpose_fraction=FRACTION,
                                select=_rank_scorer(rank, record))  # fmt: skip
    for step in range(1, T + 1):
        x, y = batch(step, 32)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        sched.step()
    opt.check_consistency()
    view = opt.superposition
    torch.save(to_cpu({"chosen": view.chosen, "scores": dict(view.scores), "record": record,
                       "params": [p.detach() for p in model.parameters()],
                       "masks": list(opt.masks.values())}), f"{out}/rank{rank}.pt")  # fmt: skip
    dist.barrier()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("select-ddp")
    run_ranks(__file__, out, "cpu")
    return out


def test_under_ddp_rank_0_chooses_for_every_rank(ddp_results):
    r0 = torch.load(ddp_results / "rank0.pt", weights_only=True)
    r1 = torch.load(ddp_results / "rank1.pt", weights_only=True)
    assert r0["chosen"] == r1["chosen"]
    assert r0["scores"] == r1["scores"]  # rank 0's, on both
    assert len(r0["record"]) == len(r1["record"]) == 8  # the same number of calls: collectives ok
    for a, b in zip(r0["params"] + r0["masks"], r1["params"] + r1["masks"], strict=True):
        assert torch.equal(a, b)
    # the negative control: rank 1's own scores would have chosen the phase-1 model
    names = ["phase 1", "ticket 1", "ticket 2", "ticket 3", "superposition"]
    own = dict(zip(names, r1["record"][:5], strict=True))
    assert max(own, key=own.get) != r0["chosen"]


if __name__ == "__main__":
    spawn(_ddp_ranks, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
