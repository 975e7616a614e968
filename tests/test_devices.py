"""Tensors the library creates follow the device of the parameters they serve (DESIGN.md §8).

There is no GPU in CI, so two CPU checks stand in for one:

- a dynamic one: the whole training loop (every method, Sup-tickets, ``check_consistency``, a
  ``state_dict`` round trip) runs under ``with torch.device("meta")``, the default device for the
  block, while the model stays on the CPU. A tensor created without naming its device lands on
  ``meta`` and the first op that mixes it with a CPU tensor, or reads its value, fails: the same
  mistake that fails on CUDA;
- a static one: every tensor factory call in ``sparseopt/`` names its device (or is a
  ``*_like``), so paths the loop above does not reach are covered too.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import batches, make_mlp, mlp, train_step
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler, available_methods

PACKAGE = Path(__file__).resolve().parents[1] / "sparseopt"
FACTORIES = {
    "arange", "empty", "full", "ones", "zeros", "tensor", "as_tensor", "rand", "randn",
    "randint", "randperm", "linspace", "eye",
}  # fmt: skip


def _model() -> nn.Module:
    return mlp(8, 16, 3, batchnorm=True)


def _train_under_default_device(default: str, method: str) -> SparseOptimizer:
    """40 steps with a ticket every 4, consistency checks and a save/load, CPU params."""
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with torch.device(default):  # the default device, restored on exit
        opt = SparseOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            method=method,
            sparsity=0.8,
            model=model,
            update_every=2,
            total_steps=40,
            seed=1,
        )
        sched = SupTicketsScheduler(opt, total_steps=40, cycle_steps=4)
        for i in range(40):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i % 9 == 0:
                opt.check_consistency()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        opt.check_consistency()
        return opt


@pytest.mark.filterwarnings("ignore:the learning rate at the end of phase 1")
@pytest.mark.parametrize("method", sorted(available_methods()))
def test_nothing_is_created_on_the_default_device(method):
    opt = _train_under_default_device("meta", method)
    assert opt.tickets >= 1  # the superposed copy exists, so its digest ran
    assert all(layer.mask.device.type == "cpu" for layer in opt.layers)
    # the same run with the default device left alone gives the same masks
    ref = _train_under_default_device("cpu", method)
    for a, b in zip(opt.layers, ref.layers, strict=True):
        assert torch.equal(a.mask, b.mask)


def test_a_tensor_on_the_default_device_is_caught():
    """Negative control: the meta default device does catch a digest that ignores the device."""
    v = torch.ones(4, dtype=torch.float64)
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        float((v * torch.arange(1, v.numel() + 1)).sum())


def _factories_without_device(source: str) -> list[str]:
    """``torch.<factory>(...)`` calls in ``source`` without a ``device=`` keyword."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
            and not any(k.arg == "device" for k in node.keywords)
        ):
            found.append(f"line {node.lineno}: torch.{node.func.attr}")
    return found


def test_every_factory_call_in_the_library_names_its_device():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): bad
        for path in sorted(PACKAGE.rglob("*.py"))
        if (bad := _factories_without_device(path.read_text()))
    }
    assert offenders == {}


def test_the_factory_check_flags_a_call_without_device():
    """Negative control: the bug this module was written for is caught, its fix is not."""
    assert _factories_without_device("w = v * torch.arange(1, n + 1)") == ["line 1: torch.arange"]
    assert _factories_without_device("w = torch.arange(1, n, device=v.device)") == []
    assert _factories_without_device("w = torch.zeros_like(v)") == []


def _set_run(device, seed: int, steps: int) -> list[torch.Tensor]:
    """SET with ``lr=0``: |w| drops and random growth only, so no float op differs per device."""
    model = make_mlp(seed=3, device=device)
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        method="set",
        sparsity=0.7,
        model=model,
        update_every=2,
        total_steps=4 * steps,
        seed=seed,
    )
    masks = [[layer.mask.cpu().clone() for layer in opt.layers]]
    for batch in batches("mlp", steps, device=device):
        train_step(model, opt, batch)
        masks.append([layer.mask.cpu().clone() for layer in opt.layers])
    assert opt.report()["updates"]["updates"] >= 2
    return [m for ms in masks for m in ms]


def test_the_same_seed_gives_the_same_masks_on_cpu_and_on_the_device(device):
    """Trivially equal with ``--device cpu``; on CUDA it checks the CPU generator's promise."""
    on_cpu, on_device = _set_run("cpu", 7, 6), _set_run(device, 7, 6)
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, on_device, strict=True))
    # negative control: another seed gives other masks, so the equality is not vacuous
    other = _set_run(device, 8, 6)
    assert not all(torch.equal(a, b) for a, b in zip(on_device, other, strict=True))


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_the_initial_masks_depend_only_on_the_seed(method, device):
    def masks(dev):
        model = make_mlp(seed=3, device=dev)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = SparseOptimizer(inner, method=method, sparsity=0.8, model=model, seed=11)
        opt.apply_masks()
        return [layer.mask.cpu() for layer in opt.layers]

    assert all(torch.equal(a, b) for a, b in zip(masks("cpu"), masks(device), strict=True))


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:the learning rate at the end of phase 1")
def test_check_consistency_with_a_ticket_on_cuda(device):
    """Issue 14 on the hardware: the superposed copy's digest once a ticket exists, and a resume."""
    torch.manual_seed(0)
    model = _model().to(device)
    x, y = torch.randn(32, 8).to(device), torch.randint(0, 3, (32,)).to(device)
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        method="rigl",
        sparsity=0.8,
        model=model,
        update_every=2,
        total_steps=40,
        seed=1,
    )
    sched = SupTicketsScheduler(opt, total_steps=40, cycle_steps=4, superpose_fraction=0.3)
    for _ in range(38):  # tickets at steps 32 and 36, finalize at 40
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert opt.tickets >= 1
    opt.check_consistency()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True, map_location="cpu"))
    opt.check_consistency()
    assert all(layer.mask.device == layer.param.device for layer in opt.layers)
    assert all(layer.mask.device.type == "cuda" for layer in opt.layers)
