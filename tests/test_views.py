"""The optimizer's public views (issue 22, interface): masks by name, a read-only ``masks`` that is
read-only for real, the settings as read-only properties, ``report()``'s columns, and warnings
that name the user's line and repeat once.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from cases import mlp
from torch import nn
from torch.optim.lr_scheduler import StepLR

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.settings import SparseSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def _opt(model=None, method="rigl", **kw):
    model = mlp(8, 16, 4, seed=0) if model is None else model
    kw = {"update_every": 1, "seed": 0, "model": model, **kw}
    return model, SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, 0.5, **kw)


def _backward(model, i=0):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()


def test_named_masks_is_like_named_parameters():
    model, opt = _opt()
    names = [name for name, _ in opt.named_masks()]
    assert names == ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    for name, mask in opt.named_masks():
        assert torch.equal(mask, opt.masks[params[name]])
        assert mask.dtype == torch.bool


def test_writing_through_masks_is_refused():
    """The issue's ``o.masks[p][:] = True``: the next step refuses, naming the layer, and so do
    ``report()`` and ``state_dict()``; nothing is stepped."""
    model, opt = _opt()
    opt.masks[model[0].weight][:] = True
    for call in (opt.step, opt.report, opt.state_dict):
        with pytest.raises(RuntimeError, match=r"mask of 0\.weight was written through.*read-only"):
            call()
    assert opt.step_count == 0


def test_reading_masks_is_untouched_by_the_check():
    """Negative control: reading, copying and computing with the masks is fine, also across
    the optimizer's own updates (which write the masks it owns)."""
    model, opt = _opt()
    for i in range(3):
        masks = {p: m.clone() for p, m in opt.masks.items()}
        _ = [int(m.sum()) for m in opt.masks.values()], [~m for _, m in opt.named_masks()]
        opt.zero_grad()
        _backward(model, i)
        opt.step()
    assert opt.update_stats.updates == 3
    assert any(not torch.equal(masks[p], m) for p, m in opt.masks.items())
    assert opt.report()["total"]["active"] == sum(int(m.sum()) for m in opt.masks.values())


def test_settings_are_read_only():
    model, opt = _opt(distribution={"0.weight": 0.25})
    assert type(opt.settings) is SparseSettings
    assert (opt.sparsity, opt.structure, opt.remask, opt.seed) == (0.5, None, "auto", 0)
    assert opt.model is model
    assert opt.method.name == "rigl"
    assert dict(opt.distribution) == {"0.weight": 0.25}
    for name, value in [
        ("sparsity", 0.1),
        ("structure", "2:4"),
        ("distribution", "uniform"),
        ("seed", 3),
        ("remask", "always"),
        ("model", None),
        ("method", "set"),
        ("settings", None),
    ]:
        with pytest.raises(AttributeError):
            setattr(opt, name, value)
    with pytest.raises(TypeError):
        opt.distribution["0.weight"] = 0.5  # a read-only mapping
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.settings.sparsity = 0.1
    opt.total_steps = 100  # the one setting that may change: a new settings object
    assert opt.settings.total_steps == 100
    assert opt.schedule.end_step == 75
    assert opt.context.settings is opt.settings


def test_report_counts_active_and_nonzero():
    """``active`` is the mask's count (``nnz`` kept as its old name), ``nonzero`` the weights that
    are not 0: before the masks are applied every weight; after an update a grown weight is 0."""
    model, opt = _opt(prune_rate=0.5)
    row = opt.report()["layers"][0]
    assert row["active"] == row["nnz"] == opt.layers[0].count == int(opt.layers[0].mask.sum())
    assert row["nonzero"] == 128
    _backward(model)
    opt.step()
    report = opt.report()
    for row, layer in zip(report["layers"], opt.layers, strict=True):
        assert row["active"] == row["nnz"] == layer.count
        assert row["nonzero"] == int((layer.param != 0).sum())
    assert report["total"]["nonzero"] < report["total"]["active"]  # grown weights start at 0
    assert report["total"]["nnz"] == report["total"]["active"]
    assert "active" in str(report)
    assert "nonzero" in str(report)
    before = report["layers"][0]["nonzero"]
    with torch.no_grad():
        model[0].weight[~opt.layers[0].mask] = float("nan")
    inactive = 128 - opt.layers[0].count
    assert opt.report()["layers"][0]["nonzero"] == before + inactive  # a NaN is no zero


def test_nonfinite_warning_names_the_users_line_once():
    """Through an LRScheduler (whose wrapper calls ``step``) and while an exploration waits for
    finite gradients: one warning, at this file's line, not torch's."""
    model, opt = _opt(method="static")
    sched = StepLR(opt, 10)
    opt.explore(0.5)
    inactive = tuple((~opt.layers[0].mask).nonzero()[0])  # masked away: the weights stay finite
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            _backward(model)
            model[0].weight.grad[inactive] = float("inf")
            opt.step()  # the exploration stays pending
            sched.step()
    nonfinite = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite) == 1
    assert nonfinite[0].filename == __file__
    assert opt.update_stats.skipped == 3
    opt.zero_grad()
    _backward(model)
    opt.step()  # finite: the exploration runs
    assert opt.update_stats.updates == 1


def test_scheduler_steps_do_not_break_the_read_only_masks():
    model, opt = _opt(method="set", update_every=2)
    sched = SupTicketsScheduler(opt, 12, 2, superpose_fraction=0.34)
    for i in range(12):
        opt.zero_grad()
        _backward(model, i)
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()
    assert opt.tickets == 2
    assert opt.report()["total"]["active"] == sum(layer.target for layer in opt.layers)
