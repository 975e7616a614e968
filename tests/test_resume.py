"""Bit-exact resume (DESIGN.md §5): train k steps, save, load into a fresh model and optimizer (in a
new process), train n more: the result equals the uninterrupted k + n steps, tensor for tensor.

The training code lives in ``SCRIPT``, written to ``tmp_path``: the test imports it for the
uninterrupted run and the first k steps, and runs it with ``subprocess.run`` for the resumed part.
Data are generated per step from a seed, so both processes see the same batches. With
``update_every=3``, ``total_steps=20`` and the default stop fraction 0.75 (cosine rate, end step
15), topology updates run after steps 3, 6, 9, 12 and 15: a checkpoint at k = 7 is resumed across
three of them.
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


def build_model(init_seed=0):
    torch.manual_seed(init_seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)
    )


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


def batch(step):
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(model, opt, start, stop):
    for step in range(start, stop):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def checkpoint(model, opt):
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def resume(state, method, inner, k, order):
    """A fresh model and optimizer, loaded from ``state``, trained to TOTAL.

    Another init and another seed: everything must come from the checkpoint (the masks drawn
    at construction differ from the saved ones, and the generator state is restored).
    """
    model = build_model(init_seed=999)
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
    # argv: a JSON file with a list of jobs [checkpoint, output, method, inner, k, order]; one
    # process runs them all (each process pays ~5 s of torch and torch._dynamo imports).
    import json

    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for ckpt, out, method, inner, k, order in jobs:
        state = torch.load(ckpt, weights_only=True)
        model, opt = resume(state, method, inner, int(k), order)
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


def uninterrupted(mod, method, inner):
    """The k + n = TOTAL steps in one go (cached: every test only reads it)."""
    key = ("full", method, inner)
    if key not in _CACHE:
        model = mod.build_model()
        opt = mod.build_opt(model, method, inner)
        mod.train(model, opt, 0, TOTAL)
        _CACHE[key] = mod.checkpoint(model, opt)
    return _CACHE[key]


def first_part(mod, method, inner, k):
    """The first k steps, saved and loaded back with ``weights_only=True``."""
    model = mod.build_model()
    opt = mod.build_opt(model, method, inner)
    mod.train(model, opt, 0, k)
    return roundtrip(mod.checkpoint(model, opt))


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


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
def resumed_in_new_process(script, tmp_path_factory):
    """Checkpoints after K steps, resumed to TOTAL by ONE new Python process (all cases)."""
    path, mod = script
    tmp = tmp_path_factory.mktemp("ckpts")
    jobs, saved = [], {}
    for i, (method, inner, order) in enumerate(PROCESS_CASES):
        ckpt, out = tmp / f"ckpt{i}.pt", tmp / f"out{i}.pt"
        saved[(method, inner, order)] = first_part(mod, method, inner, K)
        torch.save(saved[(method, inner, order)], ckpt)
        jobs.append([str(ckpt), str(out), method, inner, K, order])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(path), str(tmp / "jobs.json")],
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
def test_resume_in_new_process(script, resumed_in_new_process, method, inner, order):
    _, mod = script
    saved, resumed = resumed_in_new_process[(method, inner, order)]
    assert saved["opt"]["sparseopt"]["step"] == K
    assert resumed["opt"]["sparseopt"]["step"] == TOTAL
    check_resumed(uninterrupted(mod, method, inner), resumed, saved)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["static", "set", "rigl"])
@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("order", ["opt_first", "model_first"])
def test_resume_in_process(script, method, inner, k, order):
    _, mod = script
    full = uninterrupted(mod, method, inner)
    saved = first_part(mod, method, inner, k)
    model, opt = mod.resume(saved, method, inner, k, order)
    resumed = mod.checkpoint(model, opt)
    assert_exactly_equal(full["model"], resumed["model"], "model")
    assert_exactly_equal(full["opt"], resumed["opt"], "opt")
    if method != "static":
        check_resumed(full, resumed, saved)


def test_resume_with_pending_exploration(script):
    # explore() asked between steps, then a checkpoint: the resumed run does the exploration.
    _, mod = script
    method, inner, k = "static", "sgd", 5

    def start():
        model = mod.build_model()
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
    model, opt = mod.resume(saved, method, inner, k, "opt_first")
    assert_exactly_equal(full, mod.checkpoint(model, opt))


def test_resume_without_optimizer_state_differs(script):
    # Sanity check that the comparison can fail: loading only the model (fresh masks, fresh
    # generator and momentum) does not reproduce the uninterrupted run.
    _, mod = script
    full = uninterrupted(mod, "set", "sgd")
    saved = first_part(mod, "set", "sgd", 7)
    model = mod.build_model(init_seed=999)
    model.load_state_dict(saved["model"])
    opt = mod.build_opt(model, "set", "sgd")
    mod.train(model, opt, 7, TOTAL)
    resumed = mod.checkpoint(model, opt)
    assert not all(torch.equal(full["model"][n], resumed["model"][n]) for n in full["model"])


def test_state_dict_is_plain_data(script):
    _, mod = script
    saved = first_part(mod, "rigl", "adam", 4)
    sp = saved["opt"]["sparseopt"]
    assert set(sp["masks"]) == {0, 2, 4}  # weight indices in packing order; biases are dense
    assert all(m.dtype == torch.bool for m in sp["masks"].values())
    assert [int(m.sum()) for m in sp["masks"].values()] == list(sp["counts"].values())
    assert sp["step"] == 4
    loaded = roundtrip(saved)  # weights_only=True
    assert_exactly_equal(saved, loaded)
