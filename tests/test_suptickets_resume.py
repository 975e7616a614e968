"""Bit-exact resume of model + ``SparseOptimizer`` + ``SupTicketsScheduler`` (MultiStepLR base).

An uninterrupted run of ``T`` steps is compared, tensor by tensor with ``torch.equal``, with a run
that stops after ``k`` steps, saves ``{"model", "opt", "sched"}`` with ``torch.save``, loads it with
``torch.load(weights_only=True)`` into freshly built objects (schedulers built before the optimizer
state is loaded, as torch advises) and runs the remaining steps. ``k`` is in phase 1, exactly at
the phase boundary (an exploration is pending), right after a ticket, and mid-cycle; one resume
starts from a checkpoint that a real subprocess wrote.

This module is also imported by the subprocess script, so it keeps its helpers importable.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from cases import assert_exactly_equal
from torch import Tensor, nn
from torch.optim.lr_scheduler import MultiStepLR

from sparseopt import SparseOptimizer, SupTicketsScheduler

T, C, FRACTION = 40, 4, 0.3  # M = 3 tickets; phase 1 = 28 steps; tickets after 32, 36, 40
PHASE1, TICKETS = 28, [32, 36, 40]

# name -> (method, averaging, inner optimizer)
CONFIGS = {
    "set-caa-sgd": ("set", "caa", "sgd"),
    "rigl-cia-adam": ("rigl", "cia", "adam"),
    "rigl-cima-sgd": ("rigl", "cima", "sgd"),
    "set-cia-adam": ("set", "cia", "adam"),
    "rigl-official-sgd": ("rigl", "cia", "sgd"),
    "set-ticket0-caa-adam": ("set", "caa", "adam"),
    "rigl-bncall-cima-sgd": ("rigl", "cima", "sgd"),
    "rigl-select-cia-sgd": ("rigl", "cia", "sgd"),
    "set-select-ticket0-adam": ("set", "cia", "adam"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# --- building and running ------------------------------------------------------------------------
def make_model(seed: int, device: torch.device | str = "cpu") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 5 * 5, 24), nn.BatchNorm1d(24), nn.ReLU(),
            nn.Linear(24, 4),
        ).to(device)  # fmt: skip


def batch(step: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(31337 + step)
    x, y = torch.randn(16, 3, 5, 5, generator=g), torch.randint(0, 4, (16,), generator=g)
    return x.to(device), y.to(device)


def _bn_batches(device: torch.device | str = "cpu") -> list[Tensor]:
    return [batch(1000 + i, device)[0] for i in range(3)]


def _bn_forward(model: nn.Module) -> None:
    for x in _bn_batches(next(model.parameters()).device):
        model(x)


def _val_score(model: nn.Module) -> float:
    """A deterministic validation score for ``select=``."""
    x, y = batch(7777, next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        return -float(nn.functional.cross_entropy(model(x), y))


# name -> the options of the official code's phase 2 (none for the others); a bn_update of
# _bn_batches is called with the device to give the batches
OPTIONS: dict[str, dict[str, Any]] = {
    "rigl-official-sgd": {"include_phase1": True, "bn_update": _bn_batches, "reprune": "global"},
    "set-ticket0-caa-adam": {"include_phase1": True},
    "rigl-bncall-cima-sgd": {"bn_update": _bn_forward},
    "rigl-select-cia-sgd": {"select": _val_score, "bn_update": _bn_batches},
    "set-select-ticket0-adam": {"select": _val_score, "include_phase1": True},
}


def tickets_after(config: str, k: int) -> int:
    """``opt.tickets`` after step ``k``: ticket 0 at the end of phase 1 when included."""
    ticket0 = OPTIONS.get(config, {}).get("include_phase1", False) and k >= PHASE1
    return sum(t <= k for t in TICKETS) + int(ticket0)


def build(config: str, model_seed: int = 0, device: torch.device | str = "cpu"):
    method, averaging, inner_name = CONFIGS[config]
    model = make_model(model_seed, device)
    if inner_name == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        low, high = 0.001, 0.005
    else:
        inner = torch.optim.Adam(model.parameters(), lr=0.01)
        low, high = 0.0001, 0.0005
    opt = SparseOptimizer(inner, method, 0.8, model=model, update_every=5, seed=0)
    base = MultiStepLR(opt, milestones=[10, 20], gamma=0.1)  # ends phase 1 at lr_low
    options = dict(OPTIONS.get(config, {}))
    if options.get("bn_update") is _bn_batches:
        options["bn_update"] = _bn_batches(device)
    sched = SupTicketsScheduler(
        opt, T, C, base=base, superpose_fraction=FRACTION, lr_low=low, lr_high=high,
        averaging=averaging, beta=0.7, **options,
    )  # fmt: skip
    return model, opt, sched


def run(model, opt, sched, start: int, stop: int, snap_at=()) -> dict[int, dict]:
    """Optimizer steps ``start..stop`` (1-based, inclusive); snapshots after the listed steps."""
    snaps = {}
    for step in range(start, stop + 1):
        x, y = batch(step, next(model.parameters()).device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        if step in snap_at:
            snaps[step] = snapshot(model, opt, sched)
    return snaps


def checkpoint(model, opt, sched) -> dict[str, Any]:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}


def resume(ckpt: dict[str, Any], config: str, device: torch.device | str = "cpu"):
    """Fresh model (another init), optimizer, base and scheduler; then load model, opt, sched."""
    model, opt, sched = build(config, model_seed=1, device=device)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    return model, opt, sched


def snapshot(model, opt, sched) -> dict[str, Any]:
    """Everything that must match, as plain data (loadable with ``weights_only=True``)."""
    entry = opt.state_dict()["sparseopt"]
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "masks": [m.clone() for m in opt.masks.values()],
        "counts": [layer.count for layer in opt.layers],
        "superposition": entry["superposition"],
        "inner": opt.optimizer.state_dict(),
        "lrs": [g["lr"] for g in opt.param_groups],
        "sched": sched.state_dict(),
        "step": opt.step_count,
        "updates": dict(opt.report()["updates"]),
        "periodic_updates": opt.periodic_updates,
        "generator": entry["generator"],
    }


def save_load(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


_REFERENCE: dict[tuple[str, str], dict[int, dict]] = {}


def uninterrupted(config: str, device: torch.device | str = "cpu") -> dict[int, dict]:
    """Snapshots after steps T - 1 and T of the uninterrupted run (once per config and device)."""
    key = (config, str(device))
    if key not in _REFERENCE:
        model, opt, sched = build(config, device=device)
        _REFERENCE[key] = run(model, opt, sched, 1, T, snap_at=(T - 1, T))
    return _REFERENCE[key]


# --- in-process resumes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "k"),
    [
        pytest.param("set-caa-sgd", 13, id="phase1-set-caa"),
        pytest.param("rigl-cia-adam", 15, id="phase1-on-update-step-rigl"),
        pytest.param("set-cia-adam", PHASE1, id="boundary-set"),
        pytest.param("rigl-cima-sgd", PHASE1, id="boundary-rigl-cima"),
        pytest.param("set-caa-sgd", TICKETS[0], id="after-ticket1-set-caa"),
        pytest.param("rigl-cia-adam", TICKETS[1], id="after-ticket2-rigl"),
        pytest.param("rigl-cima-sgd", 34, id="mid-cycle-rigl-cima"),
        pytest.param("set-caa-sgd", 38, id="mid-cycle-set-caa"),
        pytest.param("set-cia-adam", T - 1, id="one-before-last-set"),
        pytest.param("rigl-official-sgd", 20, id="phase1-official"),
        pytest.param("rigl-official-sgd", PHASE1, id="boundary-official"),
        pytest.param("rigl-official-sgd", TICKETS[0], id="after-ticket1-official"),
        pytest.param("rigl-official-sgd", 34, id="mid-cycle-official"),
        pytest.param("set-ticket0-caa-adam", PHASE1, id="boundary-ticket0-caa"),
        pytest.param("set-ticket0-caa-adam", 37, id="mid-cycle-ticket0-caa"),
        pytest.param("rigl-bncall-cima-sgd", 33, id="mid-cycle-bn-callable"),
        pytest.param("rigl-bncall-cima-sgd", TICKETS[1], id="after-ticket2-bn-callable"),
        pytest.param("rigl-select-cia-sgd", PHASE1, id="boundary-select"),
        pytest.param("rigl-select-cia-sgd", 30, id="mid-cycle1-select"),
        pytest.param("rigl-select-cia-sgd", TICKETS[0], id="after-ticket1-select"),
        pytest.param("rigl-select-cia-sgd", 38, id="mid-cycle3-select"),
        pytest.param("set-select-ticket0-adam", 34, id="mid-cycle-select-ticket0"),
    ],
)
def test_resume_is_bit_exact(config, k, device):
    expected = uninterrupted(config, device)
    model, opt, sched = build(config, device=device)
    run(model, opt, sched, 1, k)
    # what the checkpoint carries at this k
    assert opt.tickets == tickets_after(config, k)
    pending = opt.state_dict()["sparseopt"]["pending_exploration"]
    assert (pending is not None) == (k == PHASE1 or k in TICKETS[:-1])
    ckpt = save_load(checkpoint(model, opt, sched))
    del model, opt, sched

    model, opt, sched = resume(ckpt, config, device)
    assert opt.step_count == k
    assert sched.last_epoch == k
    assert opt.tickets == tickets_after(config, k)
    snaps = run(model, opt, sched, k + 1, T, snap_at=(T - 1, T))
    if k < T - 1:
        assert_exactly_equal(snaps[T - 1], expected[T - 1], "step T-1")
    assert_exactly_equal(snaps[T], expected[T], "step T")
    assert opt.tickets == tickets_after(config, T)


def test_reference_runs_differ_between_configs(device):
    """The comparisons above are not vacuous: different settings give different results."""
    a, b = uninterrupted("set-caa-sgd", device)[T], uninterrupted("rigl-cima-sgd", device)[T]
    assert not torch.equal(a["model"]["0.weight"], b["model"]["0.weight"])
    # the ultimate ticket differs from the live ticket right before finalize
    live, final = (
        uninterrupted("set-caa-sgd", device)[T - 1],
        uninterrupted("set-caa-sgd", device)[T],
    )
    assert not torch.equal(live["model"]["4.weight"], final["model"]["4.weight"])
    assert not torch.equal(live["model"]["1.running_mean"], final["model"]["1.running_mean"])


def test_resume_without_loading_the_generator_differs(device):
    """SET's random growth depends on the saved generator: a resume that skips it diverges."""
    config, k = "set-caa-sgd", 30
    expected = uninterrupted(config, device)
    model, opt, sched = build(config, device=device)
    run(model, opt, sched, 1, k)
    ckpt = save_load(checkpoint(model, opt, sched))
    ckpt["opt"]["sparseopt"]["generator"] = torch.Generator().manual_seed(123).get_state()
    model, opt, sched = resume(ckpt, config, device)
    snaps = run(model, opt, sched, k + 1, T, snap_at=(T,))
    assert not torch.equal(snaps[T]["masks"][0], expected[T]["masks"][0]) or not torch.equal(
        snaps[T]["masks"][1], expected[T]["masks"][1]
    )


# --- a resume across real processes --------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    sys.path.insert(0, {tests_dir!r})
    import test_suptickets_resume as R

    torch.set_num_threads(1)
    config, k, ckpt_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model, opt, sched = R.build(config)
    R.run(model, opt, sched, 1, k)
    torch.save(R.checkpoint(model, opt, sched), ckpt_path)
    print("saved", opt.step_count, opt.tickets)
    """
)


def test_resume_from_a_checkpoint_written_by_another_process(tmp_path):
    config, k = "set-caa-sgd", 34  # mid-cycle, one ticket in the superposed copy, CAA counts
    script = tmp_path / "resume_script.py"
    script.write_text(SCRIPT.format(tests_dir=str(Path(__file__).parent)))
    ckpt = tmp_path / "ckpt.pt"
    proc = subprocess.run(
        [sys.executable, str(script), config, str(k), str(ckpt)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "saved 34 1"
    saved = torch.load(ckpt, weights_only=True)
    assert set(saved) == {"model", "opt", "sched"}
    assert saved["opt"]["sparseopt"]["superposition"]["tickets"] == 1
    assert saved["opt"]["sparseopt"]["superposition"]["active"]  # CAA counts travel along
    model, opt, sched = resume(saved, config)
    snaps = run(model, opt, sched, k + 1, T, snap_at=(T - 1, T))
    expected = uninterrupted(config)
    assert_exactly_equal(snaps[T - 1], expected[T - 1], "step T-1")
    assert_exactly_equal(snaps[T], expected[T], "step T")
