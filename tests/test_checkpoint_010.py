"""Checkpoints written by sparseopt 0.1.0 load into this code and resume bit-exactly.

``tests/fixtures/checkpoints_010.pt`` was written once by 0.1.0 (``make_checkpoints_010.py``
beside it): per case, the model/optimizer/scheduler state at step ``k`` and the model after an
uninterrupted run to step ``n``. Here the step-``k`` state goes into freshly built objects of the
current code, which train on to ``n`` on the same batches.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

_HERE = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_010", _HERE / "make_checkpoints_010.py")
make_010 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_010)


@pytest.fixture(scope="module")
def stored():
    return torch.load(_HERE / "checkpoints_010.pt", weights_only=True)


@pytest.mark.parametrize("case", sorted(make_010.CASES))
def test_a_010_checkpoint_resumes_bit_exactly(stored, case):
    saved = stored["cases"][case]
    total = make_010.CASES[case][3]
    model = make_010.model_of(123)  # other initial weights: everything must come from the file
    opt, sched = make_010.build(case, model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    if sched is not None:
        sched.load_state_dict(saved["scheduler"])
    make_010.train(model, opt, sched, saved["step"], total)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["after"][name]), name
    for mine, theirs in zip(opt.masks.values(), saved["after_masks"], strict=True):
        assert torch.equal(mine, theirs)
    assert opt.tickets == saved["after_tickets"]


def test_the_fixture_is_not_vacuous(stored):
    """The stored runs moved: masks changed after the checkpoint, and tickets were superposed."""
    sup = stored["cases"]["rigl-sgd-suptickets"]
    assert sup["after_tickets"] == 4
    assert sup["optimizer"]["sparseopt"]["superposition"] is not None
    masks = stored["cases"]["set-adam"]
    before = masks["optimizer"]["sparseopt"]["masks"]
    assert any(
        not torch.equal(before[i], m)
        for i, m in zip(sorted(before), masks["after_masks"], strict=True)
    )
    assert stored["version"] == "0.1.0"


def test_a_changed_checkpoint_does_not_resume_to_the_same_bits(stored):
    """Negative control: one flipped mask bit in the saved state changes the outcome."""
    saved = stored["cases"]["set-adam"]
    total = make_010.CASES["set-adam"][3]
    model = make_010.model_of(123)
    opt, sched = make_010.build("set-adam", model)
    model.load_state_dict(saved["model"])
    state = {**saved["optimizer"], "sparseopt": dict(saved["optimizer"]["sparseopt"])}
    masks = {k: v.clone() for k, v in state["sparseopt"]["masks"].items()}
    first = masks[min(masks)]
    on, off = first.reshape(-1).nonzero()[0], (~first).reshape(-1).nonzero()[0]
    first.view(-1)[on], first.view(-1)[off] = False, True  # same count, another support
    state["sparseopt"]["masks"] = masks
    opt.load_state_dict(state)
    make_010.train(model, opt, sched, saved["step"], total)
    assert any(not torch.equal(v, saved["after"][n]) for n, v in model.state_dict().items())
