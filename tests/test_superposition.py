"""The superposed ticket: CIA / CAA / CIMA with magnitude re-prune, BN buffers, finalize, context.

``RefSuperposition`` below is a slow reference written from the paper (§3.2.2, Eq. 4) and the
recursion of ``sparseopt.superposition``'s docstring, ``S_1 = prune(T_1)``,
``S_t = prune(rule(S_{t-1}, T_t))``, in float64 with a sort-based prune (ties to the lowest flat
index). The live tickets are copied in the training loop itself, right after the optimizer step of
each ticket step and before ``sched.step()``, so the reference does not depend on the scheduler
calling ``consolidate`` at the right time.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from cases import (
    assert_exactly_equal,
    erk_densities,
    first_difference,
    get_case,
    inner_state_tensors,
    make_convnet,
    mlp,
)
from torch import Tensor, nn

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.methods import SparseLayer
from sparseopt.superposition import Superposition, SuperpositionSettings

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the slow reference --------------------------------------------------------------------------
def keep_largest(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest ``|values|``, ties to the lowest flat index (by sorting)."""
    flat = values.detach().abs().reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    keep = torch.zeros(len(flat), dtype=torch.bool, device=values.device)
    keep[order[:k]] = True
    return keep.view(values.shape)


def prune_masks(values: list[Tensor], counts: list[int], reprune: str) -> list[Tensor]:
    if reprune == "layer":
        return [keep_largest(v, c) for v, c in zip(values, counts, strict=True)]
    flat = torch.cat([v.reshape(-1) for v in values])
    keep = keep_largest(flat, sum(counts))
    out, start = [], 0
    for v in values:
        out.append(keep[start : start + v.numel()].view(v.shape))
        start += v.numel()
    return out


class RefSuperposition:
    """float64 reference of the superposed copy over a sequence of live tickets."""

    def __init__(self, averaging: str, beta: float, reprune: str, sparse: list[int], counts):
        self.averaging, self.beta, self.reprune = averaging, beta, reprune
        self.sparse, self.counts = sparse, list(counts)
        self.t = 0
        self.params: list[Tensor] = []
        self.buffers: dict[str, Tensor] = {}
        self.active: list[Tensor] = []  # CAA: tickets in which each sparse weight was active
        self.keep: list[Tensor] = []

    def _rule(self, s: Tensor, x: Tensor) -> Tensor:
        if self.averaging == "cima":
            return self.beta * s + (1.0 - self.beta) * x
        return ((self.t - 1) * s + x) / self.t  # Eq. 4 (CIA; CAA for dense tensors and buffers)

    def add(self, params: list[Tensor], masks: list[Tensor], buffers: dict[str, Tensor]) -> None:
        self.t += 1
        params = [p.detach().double() for p in params]
        buffers = {k: b.detach().double() for k, b in buffers.items()}
        if self.t == 1:
            self.params = [p.clone() for p in params]
            self.buffers = {k: b.clone() for k, b in buffers.items()}
            self.active = [m.long() for m in masks]
        else:
            new = []
            for j, (s, x) in enumerate(zip(self.params, params, strict=True)):
                if self.averaging == "caa" and j in self.sparse:
                    i = self.sparse.index(j)
                    n_old, n_new = self.active[i], self.active[i] + masks[i].long()
                    new.append((n_old * s + x) / n_new.clamp(min=1))
                    self.active[i] = n_new
                else:
                    new.append(self._rule(s, x))
            self.params = new
            self.buffers = {k: self._rule(self.buffers[k], buffers[k]) for k in self.buffers}
        self.keep = prune_masks([self.params[j] for j in self.sparse], self.counts, self.reprune)
        for j, keep in zip(self.sparse, self.keep, strict=True):
            self.params[j] = self.params[j] * keep


# --- models, data, a run -------------------------------------------------------------------------
def make_mlp_bn(seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    return mlp(8, 32, 32, 4, batchnorm=True, seed=seed, device=device)


MODELS = {"mlp_bn": make_mlp_bn, "convnet_bn": make_convnet}


def batch(kind: str, step: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7000 + step)
    shape = (16, 8) if kind == "mlp_bn" else (16, 3, 6, 6)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 4, (16,), generator=g)
    return x.to(device), y.to(device)


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{name}.{key}"] = getattr(module, key)
    return out


def train_step(kind, model, opt, step):
    x, y = batch(kind, step, next(model.parameters()).device)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def build(kind="mlp_bn", method="rigl", inner=None, sparsity=0.8, total=40, cycle=4,
          fraction=0.3, device="cpu", **sched_kwargs):  # fmt: skip
    model = MODELS[kind](0, device)
    if inner is None:
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        inner = inner(model.parameters())
    opt = SparseOptimizer(
        inner, method, sparsity, model=model, update_every=5, seed=0, stop_fraction=1.0
    )
    lr = opt.param_groups[0]["lr"]
    sched_kwargs = {"base": "constant", "lr_low": lr, "lr_high": 3 * lr, **sched_kwargs}
    sched = SupTicketsScheduler(opt, total, cycle, superpose_fraction=fraction, **sched_kwargs)
    return model, opt, sched


def erk_counts(shapes, density) -> list[int]:
    """Independent exact ERK counts: largest remainder on top of ``cases.erk_densities``."""
    numels = [math.prod(s) for s in shapes]
    raw = [d * n for d, n in zip(erk_densities(shapes, density), numels, strict=True)]
    counts = [math.floor(r + 1e-9) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: round(density * sum(numels)) - sum(counts)]:
        counts[i] += 1
    return counts


def sparse_positions(model) -> list[int]:
    return [j for j, p in enumerate(model.parameters()) if p.ndim >= 2]


# --- the superposed copy against the reference ---------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp_bn", "convnet_bn"])
@pytest.mark.parametrize("reprune", ["layer", "global"])
@pytest.mark.parametrize("averaging", ["cia", "caa", "cima"])
def test_superposition_matches_reference(kind, averaging, reprune, device):
    beta = 0.55
    model, opt, sched = build(kind, averaging=averaging, beta=beta, reprune=reprune, device=device)
    params = list(model.parameters())
    sparse = sparse_positions(model)
    assert [layer.index for layer in opt.layers] == sparse
    counts = [layer.count for layer in opt.layers]
    ref = RefSuperposition(averaging, beta, reprune, sparse, counts)
    assert sched.ticket_steps == [32, 36, 40]

    for step in range(1, 41):
        train_step(kind, model, opt, step)
        if step in sched.ticket_steps:
            masks = [opt.masks[params[j]].clone() for j in sparse]
            for j, m in zip(
                sparse, masks, strict=True
            ):  # the live ticket is sparse: zeros off its mask
                assert torch.all(params[j][~m] == 0)
            ref.add(params, masks, bn_buffers(model))
        sched.step()
        if step not in sched.ticket_steps:
            continue
        sup = opt.superposition
        assert sup.tickets == ref.t
        for j, (s, r) in enumerate(zip(sup.params, ref.params, strict=True)):
            assert s.dtype == params[j].dtype
            torch.testing.assert_close(s.double(), r, rtol=1e-5, atol=1e-6, msg=f"param {j}")
        assert sorted(sup.buffers) == sorted(ref.buffers)
        for k, r in ref.buffers.items():
            torch.testing.assert_close(sup.buffers[k], r, rtol=1e-10, atol=1e-12, msg=k)
        for m, r in zip(sup.masks, ref.keep, strict=True):
            assert torch.equal(m, r)
        superposed = sup.params
        for j, keep in zip(sparse, ref.keep, strict=True):
            assert torch.all(superposed[j][~keep] == 0)
        total_kept = sum(int(k.sum()) for k in ref.keep)
        assert total_kept == sum(counts)
        if reprune == "layer":
            assert [int(k.sum()) for k in ref.keep] == counts

    # num_batches_tracked: one forward per step, tickets at steps 32, 36, 40, averaged as floats;
    # CIMA: (32 * 0.55 + 36 * 0.45) * 0.55 + 40 * 0.45 = 36.59, which the model rounds to 37.
    nbt = {"cia": 36.0, "caa": 36.0, "cima": 36.59}[averaging]
    nbt_keys = [k for k in ref.buffers if k.endswith("num_batches_tracked")]
    assert len(nbt_keys) == 2
    for k in nbt_keys:
        assert opt.superposition.buffers[k].item() == pytest.approx(nbt, rel=1e-12)

    # After finalize: the model holds the superposed copy; masks are its support.
    superposed = opt.superposition.params
    for j, (p, r) in enumerate(zip(params, ref.params, strict=True)):
        assert torch.equal(p, superposed[j])
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)
    for k, b in bn_buffers(model).items():
        if k.endswith("num_batches_tracked"):
            assert b.dtype == torch.int64
            assert b.item() == round(nbt)
        else:
            assert b.dtype == torch.float32
            torch.testing.assert_close(b.double(), ref.buffers[k], rtol=1e-6, atol=1e-7)
    for j, keep in zip(sparse, ref.keep, strict=True):
        assert torch.equal(opt.masks[params[j]], keep)


def test_reference_prune_ties_go_to_lowest_index():
    v = torch.tensor([0.5, -1.0, 0.5, 0.0, 0.5, 0.0])
    assert keep_largest(v, 3).tolist() == [True, True, True, False, False, False]
    assert keep_largest(v, 5).tolist() == [True, True, True, True, True, False]
    a, b = torch.tensor([[0.2, 0.9]]), torch.tensor([0.9, 0.1, 0.3])
    assert [m.tolist() for m in prune_masks([a, b], [1, 2], "global")] == [
        [[False, True]],
        [True, False, True],
    ]
    assert [m.tolist() for m in prune_masks([a, b], [1, 2], "layer")] == [
        [[False, True]],
        [True, False, True],
    ]
    assert [m.tolist() for m in prune_masks([a, b], [2, 1], "global")] == [
        [[False, True]],
        [True, False, True],
    ]
    assert [m.tolist() for m in prune_masks([a, b], [2, 1], "layer")] == [
        [[True, True]],
        [True, False, False],
    ]


def test_caa_differs_from_cia_on_a_hand_example():
    """Two tickets by hand, one layer of 4 weights, count 2, on ``Superposition`` alone."""
    w = torch.zeros(1, 4)
    tickets = [
        ([[True, True, False, False]], [[4.0, 1.0, 0.0, 0.0]]),
        ([[False, True, False, True]], [[0.0, 2.0, 0.0, 3.0]]),
    ]
    results = {}
    for averaging in ("cia", "caa"):
        sup = Superposition(SuperpositionSettings.build(averaging=averaging))
        for mask, values in tickets:
            layer = SparseLayer(w, "w", 0, torch.tensor(mask), 2, 2)
            sup.add([torch.tensor(values)], [layer], {})
        results[averaging] = sup.params[0].tolist()
    # CIA: (S_1 + T_2) / 2 = ([4, 1, 0, 0] + [0, 2, 0, 3]) / 2 = [2, 1.5, 0, 1.5]; keep 2 largest,
    # the tie 1.5 / 1.5 goes to the lower index.
    assert results["cia"] == [[2.0, 1.5, 0.0, 0.0]]
    # CAA: N = [1, 2, 0, 1]: [4 / 1, (1 + 2) / 2, 0, 3 / 1] = [4, 1.5, 0, 3]; keep 4 and 3.
    assert results["caa"] == [[4.0, 0.0, 0.0, 3.0]]


# --- finalize -------------------------------------------------------------------------------------
@pytest.mark.parametrize("reprune", ["layer", "global"])
@pytest.mark.parametrize("inner", ["sgd_momentum-forloop", "adam-foreach"])
def test_finalize_exact_counts_and_zeros(reprune, inner, device):
    model, opt, sched = build(
        "convnet_bn", inner=get_case(inner).make, reprune=reprune, device=device
    )
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params if p.ndim >= 2]
    numels = [math.prod(s) for s in shapes]
    counts = erk_counts(shapes, 0.2)
    assert [layer.count for layer in opt.layers] == counts
    total = round(0.2 * sum(numels))
    assert sum(counts) == total
    for step in range(1, 41):
        train_step("convnet_bn", model, opt, step)
        sched.step()
    sup = opt.superposition
    sparse = sparse_positions(model)
    support = sup.masks
    masks = [opt.masks[params[j]] for j in sparse]
    for layer, mask, sup_mask in zip(opt.layers, masks, support, strict=True):
        assert torch.equal(mask, sup_mask)
        assert layer.count == int(mask.sum())
    mask_counts = [int(m.sum()) for m in masks]
    if reprune == "layer":
        assert mask_counts == counts
    else:
        assert sum(mask_counts) == total
    assert opt.density == total / sum(numels)
    rep = opt.report()
    assert rep["total"]["nnz"] == total
    assert [r["nnz"] for r in rep["layers"]] == mask_counts
    for j, mask in zip(sparse, masks, strict=True):
        p = params[j]
        assert torch.all(p[~mask] == 0)
        assert int((p != 0).sum()) <= int(mask.sum())
        state = inner_state_tensors(opt.optimizer, p)
        assert state  # momentum / exp_avg exist
        for key, t in state.items():
            assert torch.all(t[~mask] == 0), key
    # dense params (biases, BN affines) are the superposed copy as well
    for p, s in zip(params, sup.params, strict=True):
        assert torch.equal(p, s)


# --- the superposed() context ---------------------------------------------------------------------
def _after_first_ticket(kind="convnet_bn", device="cpu"):
    model, opt, sched = build(kind, device=device)
    for step in range(1, 35):  # ticket 1 after step 32; two steps into cycle 2
        train_step(kind, model, opt, step)
        sched.step()
    assert opt.tickets == 1
    return model, opt, sched


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        {k: b.clone() for k, b in bn_buffers(model).items()},
        [m.clone() for m in opt.masks.values()],
        list(opt.superposition.params),
        dict(opt.superposition.buffers),
    )


def _assert_holds_superposed(model, opt):
    sup = opt.superposition
    for p, s in zip(model.parameters(), sup.params, strict=True):
        assert torch.equal(p, s)
    for k, b in bn_buffers(model).items():
        s = sup.buffers[k]
        expected = s.round().to(b.dtype) if not b.is_floating_point() else s.to(b.dtype)
        assert torch.equal(b, expected), k


def test_superposed_context_swaps_in_and_restores(device):
    model, opt, _ = _after_first_ticket(device=device)
    before = _snapshot(model, opt)
    live_differs = any(not torch.equal(p, s) for p, s in zip(before[0], before[3], strict=True))
    assert live_differs  # otherwise the test would be trivial
    with opt.superposed():
        _assert_holds_superposed(model, opt)
        model.train()
        model(batch("convnet_bn", 99, device=device)[0])  # changes the BN running stats
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    assert_exactly_equal(_snapshot(model, opt), before, "snapshot")


def test_superposed_context_restores_on_exception(device):
    model, opt, _ = _after_first_ticket(device=device)
    before = _snapshot(model, opt)

    def evaluate_and_fail():
        with opt.superposed():
            _assert_holds_superposed(model, opt)
            # train mode: moves the BN running stats
            model(batch("convnet_bn", 99, device=device)[0])
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3.0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate_and_fail()
    assert_exactly_equal(_snapshot(model, opt), before, "snapshot")


def test_superposed_context_evaluates_like_the_finalized_model(device):
    model, opt, _ = _after_first_ticket("mlp_bn", device=device)
    x = batch("mlp_bn", 123, device=device)[0]
    model.eval()
    with opt.superposed(), torch.no_grad():
        inside = model(x)
    opt.finalize()
    with torch.no_grad():
        assert torch.equal(model(x), inside)


def test_no_ticket_errors(device):
    model, opt, sched = build("mlp_bn", device=device)
    with pytest.raises(ValueError, match=r"superposed\(\).*consolidate"), opt.superposed():
        pass
    with pytest.raises(ValueError, match=r"finalize\(\).*consolidate"):
        opt.finalize()
    # phase 1 allocates nothing
    for step in range(1, 29):
        train_step("mlp_bn", model, opt, step)
        sched.step()
        assert opt.superposition.tickets == 0  # configured by the scheduler, still empty
        assert opt.superposition.params == ()
        assert opt.tickets == 0
    assert opt.state_dict()["sparseopt"]["superposition"] is None
    with pytest.raises(ValueError, match="consolidate"):
        opt.finalize()


@pytest.mark.parametrize(
    ("first", "second", "match"),
    [
        ({"averaging": "cia"}, {"averaging": "caa"}, "averaging"),
        ({"averaging": "cima", "beta": 0.8}, {"averaging": "cima", "beta": 0.5}, "beta"),
        ({"reprune": "layer"}, {"reprune": "global"}, "reprune"),
    ],
)
def test_consolidate_must_keep_its_settings(first, second, match, device):
    model, opt, _ = build("mlp_bn", device=device)
    train_step("mlp_bn", model, opt, 1)
    opt.configure_superposition(**first)  # replaces the scheduler's settings: no ticket yet
    opt.consolidate()
    kept = opt.superposition.params
    with pytest.raises(ValueError, match=match):
        opt.configure_superposition(**second)
    with (
        pytest.warns(DeprecationWarning, match="deprecated"),
        pytest.raises(ValueError, match=match),
    ):
        opt.consolidate(**second)  # the deprecated keyword form refuses it too
    assert opt.tickets == 1
    for a, b in zip(opt.superposition.params, kept, strict=True):
        assert torch.equal(a, b)
    opt.configure_superposition(**first)  # equal settings: nothing changes
    with pytest.warns(DeprecationWarning, match="configure_superposition"):
        opt.consolidate(**first)
    assert opt.tickets == 2


def test_failed_consolidate_leaves_the_superposed_copy_alone(device):
    """A consolidate() refusing changed BatchNorm buffers neither counts nor folds the ticket."""
    model, opt, _ = build("mlp_bn", device=device)
    train_step("mlp_bn", model, opt, 1)
    opt.consolidate()
    kept = opt.superposition.params
    model.add_module("extra", nn.BatchNorm1d(4).to(device))  # new BN buffers, no new params
    train_step("mlp_bn", model, opt, 2)  # the live weights move away from the first ticket
    with pytest.raises(ValueError, match="BatchNorm buffers changed"):
        opt.consolidate()
    assert opt.tickets == 1
    for a, b in zip(opt.superposition.params, kept, strict=True):
        assert torch.equal(a, b)


def test_consolidate_bad_arguments(device):
    _, opt, _ = build("mlp_bn", device=device)
    for kwargs, match in [({"averaging": "x"}, "averaging"), ({"beta": 1.0}, "beta"),
                          ({"reprune": "x"}, "reprune")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            opt.configure_superposition(**kwargs)
        with (
            pytest.warns(DeprecationWarning, match="deprecated"),
            pytest.raises(ValueError, match=match),
        ):
            opt.consolidate(**kwargs)
    assert opt.superposition.tickets == 0


# --- every method, a table of inner optimizers ---------------------------------------------------
INNER = [
    "sgd_momentum-forloop", "sgd_momentum-foreach", "adam-forloop", "adam-foreach",
    "adamw-forloop", "adamw-foreach", "rmsprop-forloop", "rmsprop-foreach",
    "adagrad-forloop", "adagrad-foreach",
]  # fmt: skip


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_methods_and_inner_optimizers(method, inner, device):
    case = get_case(inner)
    model, opt, sched = build("mlp_bn", method=method, inner=case.make, total=24, cycle=3,
                              fraction=0.25, device=device)  # fmt: skip
    assert sched.ticket_steps == [21, 24]
    params = list(model.parameters())
    sparse = sparse_positions(model)
    shapes = [tuple(params[j].shape) for j in sparse]
    counts = erk_counts(shapes, 0.2)
    assert [layer.count for layer in opt.layers] == counts
    masks_at_18 = None
    for step in range(1, 25):
        train_step("mlp_bn", model, opt, step)
        if step == 18:
            masks_at_18 = [m.clone() for m in opt.masks.values()]
        if step == 19:  # the first cycle's exploration moved the masks, whatever the method
            assert any(
                not torch.equal(a, b) for a, b in zip(masks_at_18, opt.masks.values(), strict=True)
            )
        sched.step()
        for layer, c in zip(opt.layers, counts, strict=True):
            assert int(layer.mask.sum()) == c
    assert opt.tickets == 2
    n = sum(p.numel() for p in (params[j] for j in sparse))
    assert opt.density == sum(counts) / n
    assert opt.report()["total"]["sparsity"] == pytest.approx(1 - sum(counts) / n, abs=1e-15)
    for j, c in zip(sparse, counts, strict=True):
        p, m = params[j], opt.masks[params[j]]
        assert int(m.sum()) == c
        assert torch.all(p[~m] == 0)
        assert int((p != 0).sum()) <= c
        for key, t in inner_state_tensors(opt.optimizer, p).items():
            assert torch.all(t[~m] == 0), key
    for p, s in zip(params, opt.superposition.params, strict=True):
        assert torch.equal(p, s)


# --- the settings, fixed once; the read-only view; the BatchNorm warning -------------------------
def test_settings_are_fixed_at_the_first_ticket():
    model, opt, _ = build("mlp_bn", averaging="cima", beta=0.5)
    settings = opt.superposition.settings
    assert (settings.averaging, settings.beta, settings.reprune) == ("cima", 0.5, "layer")
    opt.configure_superposition(averaging="cima", beta=0.5)  # equal: nothing happens
    assert opt.superposition.settings is settings
    opt.configure_superposition(averaging="caa")  # before the first ticket: replaced
    assert opt.superposition.settings.averaging == "caa"
    train_step("mlp_bn", model, opt, 1)
    opt.consolidate()
    with pytest.raises(ValueError, match=r"averaging='cia'.*differs.*fixed at its first ticket"):
        opt.configure_superposition(averaging="cia")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.superposition.settings.averaging = "cia"


def test_the_view_is_read_only_and_a_copy():
    model, opt, _ = build("mlp_bn")
    train_step("mlp_bn", model, opt, 1)
    opt.consolidate()
    view = opt.superposition
    params, buffers = view.params, dict(view.buffers)
    params[0].add_(1.0)
    next(iter(buffers.values())).add_(1.0)
    assert not torch.equal(view.params[0], params[0])
    assert not torch.equal(next(iter(view.buffers.values())), next(iter(buffers.values())))
    with pytest.raises(AttributeError):
        view.tickets = 3
    with pytest.raises(TypeError):
        view.buffers["x"] = torch.zeros(1)
    assert [int(m.sum()) for m in view.masks] == [layer.count for layer in opt.layers]
    assert "SuperpositionView(tickets=1" in repr(view)


def test_a_state_dict_with_other_settings_is_refused_before_anything_loads():
    model, opt, _ = build("mlp_bn", averaging="caa")
    train_step("mlp_bn", model, opt, 1)
    opt.consolidate()
    saved = opt.state_dict()
    _, other, _ = build("mlp_bn", averaging="cia")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"superposition was saved with other settings: "
                       r"averaging='caa' vs configured 'cia'"):  # fmt: skip
        other.load_state_dict(saved)
    assert first_difference(before, other.state_dict()) is None


def test_settings_restored_from_a_state_dict_take_bn_update_from_the_next_configuration():
    model, opt, _ = build("mlp_bn", reprune="global")
    train_step("mlp_bn", model, opt, 1)
    opt.consolidate()
    saved = opt.state_dict()
    model2 = make_mlp_bn(1)
    inner = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    opt2 = SparseOptimizer(inner, "rigl", 0.8, model=model2, update_every=5, seed=0,
                           stop_fraction=1.0)  # fmt: skip
    opt2.load_state_dict(saved)  # nothing configured: the saved settings, without bn_update
    assert opt2.superposition.settings.reprune == "global"
    batches = [batch("mlp_bn", 50)[0]]
    opt2.configure_superposition(reprune="global", bn_update=batches)  # agrees: completes them
    assert opt2.superposition.settings.bn_update is batches
    with pytest.raises(ValueError, match="differs"):
        opt2.configure_superposition(reprune="layer")


def test_deprecated_keywords_configure_once_and_bn_update_stays_per_call():
    model = make_mlp_bn()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "rigl", 0.8, model=model,
                          seed=0)  # fmt: skip
    train_step("mlp_bn", model, opt, 1)
    batches = [batch("mlp_bn", 50)[0]]
    with pytest.warns(DeprecationWarning, match=r"configure_superposition\(\.\.\.\)"):
        opt.consolidate(averaging="cima", bn_update=batches)
    assert opt.superposition.settings.averaging == "cima"
    assert opt.superposition.settings.bn_update is batches
    with pytest.warns(DeprecationWarning, match="deprecated"):
        opt.consolidate(averaging="cima")  # as before: this call recomputes nothing
    assert opt.superposition.settings.bn_update is None
    assert opt.tickets == 2


def _bn_warnings(model, give_model: bool) -> list[str]:
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "set", 0.8, seed=0,
                          model=model if give_model else None)  # fmt: skip
    x = torch.randn(4, 8)
    model(x).sum().backward()
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.consolidate()
        opt.consolidate()
    return [(str(w.message), w.filename) for w in caught]


def test_the_missing_model_warning_fires_only_when_a_batchnorm_layer_holds_parameters():
    """Issue 22: without ``model=`` the first ticket warns only if a BatchNorm layer (found among
    the live objects) holds one of the optimizer's parameters; once, at the user's line."""
    plain = _bn_warnings(mlp(8, 16, 4, seed=0), give_model=False)
    assert plain == []  # no BatchNorm: nothing to superpose, no warning
    with_bn = _bn_warnings(make_mlp_bn(), give_model=False)
    assert len(with_bn) == 1
    assert "a BatchNorm layer holds some of the optimizer's parameters" in with_bn[0][0]
    assert with_bn[0][1] == __file__
    assert _bn_warnings(make_mlp_bn(), give_model=True) == []
