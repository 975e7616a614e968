"""Bit-exact resume (DESIGN.md §5): train k steps, save, load into a fresh model and optimizer (in a
new process), train n more: the result equals the uninterrupted k + n steps, tensor for tensor.

The training code lives in ``SCRIPT``, written to ``tmp_path``: the test imports it for the
uninterrupted run and the first k steps, and runs it with ``subprocess.run`` for the resumed part.
Data are generated per step from a seed, so both processes see the same batches. With
``update_every=3``, ``total_steps=20`` and the default stop fraction 0.75 (cosine rate, end step
15), topology updates run after steps 3, 6, 9, 12 and 15: a checkpoint at k = 7 is resumed across
three of them.

Everything runs on ``--device``: the models and the batches (drawn on the CPU from the seed, then
moved, so every device sees the same data), the checkpoints saved and loaded there, and the new
process, which gets the device on its command line.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import assert_exactly_equal

from sparseopt import SparseOptimizer

REPO = Path(__file__).resolve().parents[1]
TOTAL = 20

SCRIPT = '''
"""Train / resume a tiny sparse MLP (written by tests/test_resume.py)."""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt import SparseOptimizer

TOTAL = 20


def build_model(init_seed=0, device="cpu"):
    torch.manual_seed(init_seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)
    ).to(device)


def build_opt(model, method, inner, seed=1234):
    if inner == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    elif inner == "adam":
        base = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        raise ValueError(inner)
    return SparseOptimizer(
        base,
        method,
        0.7,
        update_every=3,
        prune_rate=0.5,
        total_steps=TOTAL,
        model=model,
        seed=seed,
    )


def batch(step, device="cpu"):
    """Drawn on the CPU, then moved: the same batch on every device."""
    g = torch.Generator().manual_seed(10_000 + step)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
    return x.to(device), y.to(device)


def train(model, opt, start, stop):
    device = next(model.parameters()).device
    for step in range(start, stop):
        x, y = batch(step, device)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def checkpoint(model, opt):
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def resume(state, method, inner, k, order, device="cpu"):
    """A fresh model and optimizer on ``device``, loaded from ``state``, trained to TOTAL.

    Another init and another seed: everything must come from the checkpoint (the masks drawn
    at construction differ from the saved ones, and the generator state is restored).
    """
    model = build_model(init_seed=999, device=device)
    if order == "model_first":  # weights in the model before the optimizer exists
        model.load_state_dict(state["model"])
        opt = build_opt(model, method, inner, seed=4321)
    else:
        opt = build_opt(model, method, inner, seed=4321)
        model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    train(model, opt, k, TOTAL)
    return model, opt


if __name__ == "__main__":
    # argv: a JSON file with a list of jobs [checkpoint, output, method, inner, k, order], and
    # the device (default cpu); one process runs them all (each process pays ~5 s of torch and
    # torch._dynamo imports).
    import json

    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
    if device.type == "cuda":  # as tests/conftest.py does for --device cuda
        torch.use_deterministic_algorithms(True, warn_only=True)
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for ckpt, out, method, inner, k, order in jobs:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model, opt = resume(state, method, inner, int(k), order, device)
        torch.save(checkpoint(model, opt), out)
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "resume_script.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("resume_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TOTAL == TOTAL
    return path, module


_CACHE: dict = {}


def uninterrupted(mod, method, inner, device):
    """The k + n = TOTAL steps in one go (cached: every test only reads it)."""
    key = ("full", method, inner, device)
    if key not in _CACHE:
        model = mod.build_model(device=device)
        opt = mod.build_opt(model, method, inner)
        mod.train(model, opt, 0, TOTAL)
        _CACHE[key] = mod.checkpoint(model, opt)
    return _CACHE[key]


def first_part(mod, method, inner, k, device):
    """The first k steps, saved and loaded back with ``weights_only=True``."""
    model = mod.build_model(device=device)
    opt = mod.build_opt(model, method, inner)
    mod.train(model, opt, 0, k)
    return roundtrip(mod.checkpoint(model, opt))


def roundtrip(state: dict, map_location: str | None = None) -> dict:
    """``state`` saved and loaded back, onto the devices it was saved from by default."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location=map_location, weights_only=True)


def assert_state_on_param_device(opt: SparseOptimizer, device: torch.device) -> None:
    """The masks and the inner optimizer's state tensors are on their parameter's device."""
    for layer in opt.layers:
        assert layer.param.device.type == device.type, layer.name
        assert layer.mask.device == layer.param.device, layer.name
    for p, state in opt.optimizer.state.items():
        for key, value in state.items():
            if key != "step":  # Adam's step count is a CPU scalar by design
                assert value.device == p.device, key


def check_resumed(full, resumed, saved):
    # weights, masks, inner state (momentum / exp_avg / exp_avg_sq / step), generator, counters
    assert_exactly_equal(full["model"], resumed["model"], "model")
    assert_exactly_equal(full["opt"]["state"], resumed["opt"]["state"], "opt.state")
    assert_exactly_equal(
        full["opt"]["param_groups"], resumed["opt"]["param_groups"], "param_groups"
    )
    assert_exactly_equal(full["opt"]["sparseopt"], resumed["opt"]["sparseopt"], "sparseopt")
    assert_exactly_equal(full["opt"], resumed["opt"], "opt")
    # the resumed part really moved the topology
    masks_k = saved["opt"]["sparseopt"]["masks"]
    masks_end = full["opt"]["sparseopt"]["masks"]
    assert any(not torch.equal(masks_k[i], masks_end[i]) for i in masks_k)
    stats_k = saved["opt"]["sparseopt"]["stats"]
    assert full["opt"]["sparseopt"]["stats"]["updates"] > stats_k["updates"]


K = 7
PROCESS_CASES = [
    ("set", "sgd", "opt_first"),
    ("rigl", "sgd", "opt_first"),
    ("set", "adam", "opt_first"),
    ("rigl", "adam", "opt_first"),
    ("set", "adam", "model_first"),
    ("rigl", "sgd", "model_first"),
]


@pytest.fixture(scope="module")
def resumed_in_new_process(script, tmp_path_factory, device):
    """Checkpoints after K steps, resumed to TOTAL on ``device`` by ONE new Python process."""
    path, mod = script
    tmp = tmp_path_factory.mktemp("ckpts")
    jobs, saved = [], {}
    for i, (method, inner, order) in enumerate(PROCESS_CASES):
        ckpt, out = tmp / f"ckpt{i}.pt", tmp / f"out{i}.pt"
        saved[(method, inner, order)] = first_part(mod, method, inner, K, device)
        torch.save(saved[(method, inner, order)], ckpt)
        jobs.append([str(ckpt), str(out), method, inner, K, order])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(path), str(tmp / "jobs.json"), str(device)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=pythonpath),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return {
        case: (saved[case], torch.load(job[1], weights_only=True))
        for case, job in zip(PROCESS_CASES, jobs, strict=True)
    }


@pytest.mark.parametrize(("method", "inner", "order"), PROCESS_CASES)
def test_resume_in_new_process(script, resumed_in_new_process, device, method, inner, order):
    _, mod = script
    saved, resumed = resumed_in_new_process[(method, inner, order)]
    assert saved["opt"]["sparseopt"]["step"] == K
    assert resumed["opt"]["sparseopt"]["step"] == TOTAL
    check_resumed(uninterrupted(mod, method, inner, device), resumed, saved)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["static", "set", "rigl"])
@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("order", ["opt_first", "model_first"])
def test_resume_in_process(script, device, method, inner, k, order):
    _, mod = script
    full = uninterrupted(mod, method, inner, device)
    saved = first_part(mod, method, inner, k, device)
    model, opt = mod.resume(saved, method, inner, k, order, device)
    resumed = mod.checkpoint(model, opt)
    assert_exactly_equal(full["model"], resumed["model"], "model")
    assert_exactly_equal(full["opt"], resumed["opt"], "opt")
    if method != "static":
        check_resumed(full, resumed, saved)
    # The checkpoint mapped to the CPU, loaded into an optimizer on the device: its masks and
    # momentum (or exp_avg, exp_avg_sq) follow the parameters there.
    model = mod.build_model(init_seed=999, device=device)
    opt = mod.build_opt(model, method, inner, seed=4321)
    opt.load_state_dict(roundtrip(saved["opt"], map_location="cpu"))
    assert bool(opt.optimizer.state) == (k > 0)  # no inner state before the first step
    assert_state_on_param_device(opt, device)


def test_resume_with_pending_exploration(script, device):
    # explore() asked between steps, then a checkpoint: the resumed run does the exploration.
    _, mod = script
    method, inner, k = "static", "sgd", 5

    def start():
        model = mod.build_model(device=device)
        opt = mod.build_opt(model, method, inner)
        mod.train(model, opt, 0, k)
        opt.explore(0.5)
        return model, opt

    model, opt = start()
    mod.train(model, opt, k, TOTAL)
    full = mod.checkpoint(model, opt)
    assert full["opt"]["sparseopt"]["stats"]["updates"] == 1
    model, opt = start()
    saved = roundtrip(mod.checkpoint(model, opt))
    assert saved["opt"]["sparseopt"]["pending_exploration"] == 0.5
    model, opt = mod.resume(saved, method, inner, k, "opt_first", device)
    assert_exactly_equal(full, mod.checkpoint(model, opt))


def test_resume_without_optimizer_state_differs(script, device):
    # Sanity check that the comparison can fail: loading only the model (fresh masks, fresh
    # generator and momentum) does not reproduce the uninterrupted run.
    _, mod = script
    full = uninterrupted(mod, "set", "sgd", device)
    saved = first_part(mod, "set", "sgd", 7, device)
    model = mod.build_model(init_seed=999, device=device)
    model.load_state_dict(saved["model"])
    opt = mod.build_opt(model, "set", "sgd")
    mod.train(model, opt, 7, TOTAL)
    resumed = mod.checkpoint(model, opt)
    assert not all(torch.equal(full["model"][n], resumed["model"][n]) for n in full["model"])


def test_state_dict_is_plain_data(script, device):
    _, mod = script
    saved = first_part(mod, "rigl", "adam", 4, device)
    sp = saved["opt"]["sparseopt"]
    assert set(sp["masks"]) == {0, 2, 4}  # weight indices in packing order; biases are dense
    assert all(m.dtype == torch.bool for m in sp["masks"].values())
    assert [int(m.sum()) for m in sp["masks"].values()] == list(sp["counts"].values())
    assert sp["step"] == 4
    loaded = roundtrip(saved)  # weights_only=True
    assert_exactly_equal(saved, loaded)
