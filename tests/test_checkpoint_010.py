"""Checkpoints written by sparseopt 0.1.0 load into this code and resume bit-exactly.

``tests/fixtures/checkpoints_010.pt`` was written once by 0.1.0 (``make_checkpoints_010.py``
beside it): per case, the model/optimizer/scheduler state at step ``k`` and the model after an
uninterrupted run to step ``n``. Here the step-``k`` state goes into freshly built objects of the
current code, which train on to ``n`` on the same batches.

What is bit-exact on every machine, and what is not:

- The loaded state is exactly the file's (inner optimizer state, masks), and the masks, every
  topology update and the tickets of the continued run equal the 0.1.0 run's, exactly.
- The weights of the continued run equal 0.1.0's to the last bit only on a CPU whose BLAS
  kernels round as the one that wrote the file did: MKL picks other float64 kernels on other
  CPUs (measured on an AMD EPYC with AVX-512, 2026-12-06: masks identical, weights within a
  relative 3.6e-10 after 17 AdamW steps). Across machines the weights are compared at a relative
  1e-8; bit-exact resumption of the current code is checked on this machine by
  ``test_a_010_checkpoint_resumes_bit_exactly_through_a_new_checkpoint``.
"""

from __future__ import annotations

import copy
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


def _resumed(stored, case):
    """Fresh objects of the current code holding the 0.1.0 state at step ``k``."""
    saved = stored["cases"][case]
    model = make_010.model_of(123)  # other initial weights: everything must come from the file
    opt, sched = make_010.build(case, model)
    model.load_state_dict(saved["model"])
    # a copy: Optimizer.load_state_dict keeps the tensors it is given, and training would then
    # change the stored state that the next test loads
    opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    if sched is not None:
        sched.load_state_dict(copy.deepcopy(saved["scheduler"]))
    return model, opt, sched


@pytest.mark.parametrize("case", sorted(make_010.CASES))
def test_a_010_checkpoint_loads_exactly_and_resumes(stored, case):
    saved = stored["cases"][case]
    total = make_010.CASES[case][3]
    model, opt, sched = _resumed(stored, case)
    # the loaded inner state is exactly the file's
    mine, theirs = opt.state_dict()["state"], saved["optimizer"]["state"]
    assert mine.keys() == theirs.keys()
    for index, state in theirs.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(mine[index][key]), torch.as_tensor(value)), key
    make_010.train(model, opt, sched, saved["step"], total)
    for mine_mask, their_mask in zip(opt.masks.values(), saved["after_masks"], strict=True):
        assert torch.equal(mine_mask, their_mask)
    assert opt.tickets == saved["after_tickets"]
    for name, value in model.state_dict().items():
        after = saved["after"][name]
        if torch.equal(value, after):
            continue
        assert value.is_floating_point(), name
        scale = after.abs().max().clamp(min=1e-300)
        assert (value - after).abs().max() / scale <= 1e-8, name


@pytest.mark.parametrize("case", sorted(make_010.CASES))
def test_a_010_checkpoint_resumes_bit_exactly_through_a_new_checkpoint(stored, case):
    """From the 0.1.0 state: an uninterrupted continuation and one saved with the current code
    midway and loaded into fresh objects end bit-identical (this machine's arithmetic)."""
    saved = stored["cases"][case]
    start, total = saved["step"], make_010.CASES[case][3]
    middle = (start + total) // 2
    model, opt, sched = _resumed(stored, case)
    make_010.train(model, opt, sched, start, total)

    model2, opt2, sched2 = _resumed(stored, case)
    make_010.train(model2, opt2, sched2, start, middle)
    checkpoint = {"model": model2.state_dict(), "optimizer": opt2.state_dict()}
    if sched2 is not None:
        checkpoint["scheduler"] = sched2.state_dict()
    model3 = make_010.model_of(7)
    opt3, sched3 = make_010.build(case, model3)
    model3.load_state_dict(checkpoint["model"])
    opt3.load_state_dict(checkpoint["optimizer"])
    if sched3 is not None:
        sched3.load_state_dict(checkpoint["scheduler"])
    make_010.train(model3, opt3, sched3, middle, total)

    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(opt.masks.values(), opt3.masks.values(), strict=True):
        assert torch.equal(a, b)
    assert opt.tickets == opt3.tickets
