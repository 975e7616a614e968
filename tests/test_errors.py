"""Error table for ``SparseOptimizer``: ``(arguments -> exception type, message regex)``.

Every message must name the offending argument (and, for names, list the valid ones), and a
rejected ``load_state_dict`` must leave the optimizer untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from cases import make_mlp
from torch import nn

from sparseopt import SparseOptimizer


@dataclass(frozen=True)
class ErrorCase:
    """``SparseOptimizer(<inner>, *args, model=<mlp>, **kwargs)`` must raise ``error``."""

    id: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: type[Exception] = ValueError
    match: str = ""
    inner: str = "sgd"  # "sgd", "plain" (not an Optimizer) or "wrapped" (a SparseOptimizer)


def _inner(kind: str, model: nn.Module):
    if kind == "plain":
        return object()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "wrapped":
        return SparseOptimizer(sgd, "set", 0.5, model=model)
    return sgd


# The MLP's sparse weights: 0.weight (16x8), 2.weight (16x16), 4.weight (4x16); 448 in all.
CONSTRUCTOR_ERRORS = [
    ErrorCase("not-an-optimizer", {}, TypeError, r"optimizer.*torch\.optim\.Optimizer.*object",
              inner="plain"),
    ErrorCase("already-wrapped", {}, TypeError, r"optimizer is already a SparseOptimizer",
              inner="wrapped"),
    ErrorCase("sparsity-1", {"sparsity": 1.0}, ValueError, r"sparsity in \[0, 1\).*1\.0"),
    ErrorCase("sparsity-negative", {"sparsity": -0.1}, ValueError, r"sparsity.*-0\.1"),
    ErrorCase("sparsity-nan", {"sparsity": float("nan")}, ValueError, r"sparsity.*nan"),
    ErrorCase("sparsity-str", {"sparsity": "0.9"}, TypeError, r"sparsity.*'0\.9'"),
    ErrorCase("sparsity-bool", {"sparsity": True}, TypeError, r"sparsity.*True"),
    ErrorCase("sparsity-tensor", {"sparsity": torch.tensor(0.9)}, TypeError, r"sparsity"),
    ErrorCase("method-unknown", {"method": "lottery"}, ValueError,
              r"method 'lottery'.*'rigl'.*'set'.*'static'.*register_method"),
    ErrorCase("method-type", {"method": 3}, TypeError, r"method.*3"),
    ErrorCase("method-option-unknown", {"method": "set", "flavour": 1}, TypeError,
              r"method 'set'.*unexpected keyword.*flavour"),
    ErrorCase("distribution-unknown", {"distribution": "gaussian"}, ValueError,
              r"distribution.*'er'.*'erk'.*'uniform'.*'gaussian'"),
    ErrorCase("distribution-type", {"distribution": 0.5}, TypeError, r"distribution.*0\.5"),
    ErrorCase("distribution-mapping-unknown-name", {"distribution": {"5.weight": 0.1}},
              ValueError, r"distribution mapping.*unknown.*'5\.weight'.*'0\.weight'"),
    ErrorCase("distribution-mapping-density-above-1", {"distribution": {"0.weight": 1.5}},
              ValueError, r"distribution\['0\.weight'\].*density.*1\.5"),
    ErrorCase("distribution-mapping-density-negative", {"distribution": {"0.weight": -0.5}},
              ValueError, r"distribution\['0\.weight'\].*-0\.5"),
    ErrorCase("distribution-mapping-impossible-budget",
              {"distribution": {"0.weight": 1.0, "2.weight": 1.0}}, ValueError,
              r"distribution mapping is impossible"),
    ErrorCase("distribution-mapping-contradicts-sparsity",
              {"distribution": {"0.weight": 0.5, "2.weight": 0.5, "4.weight": 0.5}}, ValueError,
              r"distribution mapping.*density.*sparsity"),
    ErrorCase("update_every-0", {"update_every": 0}, ValueError, r"update_every.*0"),
    ErrorCase("update_every-float", {"update_every": 2.5}, TypeError, r"update_every.*2\.5"),
    ErrorCase("update_every-bool", {"update_every": True}, TypeError, r"update_every.*True"),
    ErrorCase("prune_rate-1.5", {"prune_rate": 1.5}, ValueError, r"prune_rate.*1\.5"),
    ErrorCase("prune_rate-negative", {"prune_rate": -0.1}, ValueError, r"prune_rate.*-0\.1"),
    ErrorCase("prune_rate-bool", {"prune_rate": True}, TypeError, r"prune_rate.*True"),
    ErrorCase("prune_rate-str", {"prune_rate": "0.3"}, TypeError, r"prune_rate.*'0\.3'"),
    ErrorCase("prune_schedule-linear", {"prune_schedule": "linear"}, ValueError,
              r"prune_schedule.*'constant'.*'cosine'.*'linear'"),
    ErrorCase("stop_fraction-0", {"stop_fraction": 0}, ValueError, r"stop_fraction.*0"),
    ErrorCase("stop_fraction-above-1", {"stop_fraction": 1.5}, ValueError, r"stop_fraction"),
    ErrorCase("cosine-without-total_steps", {"prune_schedule": "cosine"}, ValueError,
              r"prune_schedule='cosine'.*total_steps"),
    ErrorCase("total_steps-0", {"total_steps": 0}, ValueError, r"total_steps.*0"),
    ErrorCase("total_steps-float", {"total_steps": 10.0}, TypeError, r"total_steps.*10\.0"),
    ErrorCase("remask-never", {"remask": "never"}, ValueError, r"remask.*'auto'.*'always'.*never"),
    ErrorCase("seed-str", {"seed": "x"}, TypeError, r"seed.*'x'"),
    ErrorCase("seed-float", {"seed": 1.5}, TypeError, r"seed.*1\.5"),
    ErrorCase("model-not-a-module", {"model": "mlp"}, TypeError, r"model.*nn\.Module.*'mlp'"),
]  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors(case):
    model = make_mlp()
    inner = _inner(case.inner, model)
    kwargs = {"method": "set", "sparsity": 0.9, "model": model, **case.kwargs}
    with pytest.raises(case.error, match=case.match):
        SparseOptimizer(inner, **kwargs)


def test_constructor_errors_cover_the_brief():
    names = {c.id for c in CONSTRUCTOR_ERRORS}
    assert len(names) == len(CONSTRUCTOR_ERRORS)
    for required in (
        "not-an-optimizer", "already-wrapped", "sparsity-1", "sparsity-negative", "sparsity-str",
        "sparsity-bool", "method-unknown", "distribution-unknown",
        "distribution-mapping-unknown-name", "distribution-mapping-density-above-1",
        "distribution-mapping-impossible-budget", "update_every-0", "prune_rate-1.5",
        "prune_schedule-linear", "stop_fraction-0", "cosine-without-total_steps",
        "total_steps-0", "remask-never", "seed-str", "method-option-unknown",
    ):  # fmt: skip
        assert required in names


def test_valid_neighbours_of_the_error_table_construct():
    """The edges just inside the valid ranges are accepted (the table is not over-strict)."""
    model = make_mlp()
    for kwargs in (
        {"sparsity": 0.0},
        {"sparsity": 0.999},
        {"sparsity": 0},
        {"prune_rate": 0.0},
        {"prune_rate": 1.0},
        {"stop_fraction": 1.0, "total_steps": 1},
        {"prune_schedule": "cosine", "total_steps": 10},
        {"prune_schedule": "constant"},
        {"distribution": "uniform"},
        {"distribution": "ER"},
        {"distribution": {"0.weight": 0.2}},
        {"method": "RigL"},
        {"remask": "always", "seed": 3},
        {"sparsity": np.float32(0.9), "prune_rate": np.float64(0.5)},
    ):
        opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **kwargs)
        assert isinstance(opt, torch.optim.Optimizer), kwargs


@pytest.mark.parametrize(
    ("rate", "error"),
    [(-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError), (True, TypeError)],
)
def test_explore_rate_errors(rate, error):
    model = make_mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(error, match=r"rate.*" + re.escape(repr(rate))):
        opt.explore(rate)


def test_total_steps_setter_validates():
    model = make_mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ValueError, match=r"total_steps.*-5"):
        opt.total_steps = -5
    assert opt.total_steps is None
    opt.total_steps = 100
    assert opt.total_steps == 100


# --- load_state_dict ---------------------------------------------------------------------------
class _Wide(nn.Module):
    """Same parameter count and order as ``make_mlp()``, but a different hidden width."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.net(x)


def _trained(model=None, method="set", sparsity=0.9):
    model = make_mlp() if model is None else model
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method, sparsity, seed=0
    )
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return opt


def _source(kind):
    if kind == "plain-sgd":
        model = make_mlp()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 8)).sum().backward()
        sgd.step()
        return sgd.state_dict()
    if kind == "other-method":
        return _trained(method="rigl").state_dict()
    if kind == "other-sparsity":
        return _trained(sparsity=0.8).state_dict()
    if kind == "other-shape":
        return _trained(_Wide()).state_dict()
    if kind == "other-param-count":
        model = nn.Sequential(make_mlp(), nn.Linear(4, 4))
        return _trained(model).state_dict()
    raise AssertionError(kind)


LOAD_ERRORS = [
    ("plain-sgd", r"no 'sparseopt' entry.*opt\.optimizer\.load_state_dict"),
    ("other-method", r"state dict does not fit.*method 'rigl'.*'set'"),
    ("other-sparsity", r"state dict does not fit.*sparsity 0\.8.*0\.9"),
    ("other-shape", r"state dict does not fit.*parameter 0 has shape \[12, 8\].*\[16, 8\]"),
    ("other-param-count", r"state dict does not fit.*8 parameters.*6"),
]


@pytest.mark.parametrize(("source", "match"), LOAD_ERRORS, ids=[s for s, _ in LOAD_ERRORS])
def test_load_state_dict_errors_leave_the_optimizer_untouched(source, match):
    sd = _source(source)
    opt = _trained()
    masks = [m.clone() for m in opt.masks.values()]
    inner_sd = opt.optimizer.state_dict()
    buffers = {p: s["momentum_buffer"].clone() for p, s in opt.state.items()}
    lr = opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(masks, opt.masks.values(), strict=True))
    assert opt.step_count == 1
    assert opt.param_groups[0]["lr"] == lr
    assert opt.optimizer.state_dict()["param_groups"] == inner_sd["param_groups"]
    for p, buf in buffers.items():
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
