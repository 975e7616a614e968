"""The wide-sparse study's scripts (examples/research/), each at a tiny size.

SET-MLP, the weight-scale diagnostic and the GPU study's CPU smoke path:

- set_mlp.py: the SET paper's ε maps onto our ER distribution exactly (each hidden layer gets
  ``ε (n_in + n_out) / (n_in n_out)``, the classifier stays dense), and a tiny run writes its
  record and resumes.
- health.py: the diagnostic computes what it claims on hand-built weights (norms, alive channels,
  max/median ratio, masks counted), the trace records what an update grew, and the scale-aware
  drop ranks each weight within its channel where RigL's ranks across channels.
- gpu_study.py: ``--quick`` runs on the CPU (the paper's default and the recommended preset
  with ``select=``) and writes its tables and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "research"))

import health
import set_mlp

from sparseopt import SparseOptimizer
from sparseopt.distributions import layer_densities
from sparseopt.methods import SparseLayer

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(), reason="Fashion-MNIST IDX files not installed (make fashion-data)"
)


# --- SET-MLP --------------------------------------------------------------------------------------
def test_epsilon_maps_onto_er_exactly_and_the_classifier_stays_dense():
    model = set_mlp.SetMLP()
    sparsity = set_mlp.epsilon_sparsity(model, 20)
    shapes = [tuple(layer.weight.shape) for layer in model.hidden]
    # the paper's formula, by hand: 20 * (784 + 1000) / (784 * 1000), 20 * 2000 / 10^6
    paper = [20 * 1784 / 784000, 20 * 2000 / 1e6, 20 * 2000 / 1e6]
    assert layer_densities("er", shapes, 1 - sparsity) == pytest.approx(paper, rel=1e-12)
    _, opt = set_mlp.build("set", 0, {**set_mlp.PROTOCOL, "epochs": 3}, steps_per_epoch=10)
    counts = {row["name"]: row["nnz"] for row in opt.report()["layers"]}
    assert counts == {"hidden.0.weight": 35680, "hidden.1.weight": 40000, "hidden.2.weight": 40000}
    # the schedule: zeta of the connections once an epoch, none after the last epoch
    assert opt.schedule.is_update_step(20)
    assert not opt.schedule.is_update_step(30)
    assert opt.schedule.rate(20) == pytest.approx(0.3)


def test_every_method_of_a_seed_starts_from_the_same_weights():
    config = {**set_mlp.PROTOCOL, "epochs": 2}
    dense, _ = set_mlp.build("dense", 3, config, 5, hidden=(16, 16, 16))
    sparse, opt = set_mlp.build("set", 3, config, 5, hidden=(16, 16, 16))
    assert torch.equal(dense.classifier.weight, sparse.classifier.weight)
    for (p_dense, p_sparse), mask in zip(
        [(a.weight, b.weight) for a, b in zip(dense.hidden, sparse.hidden, strict=True)],
        opt.masks.values(),
        strict=True,
    ):
        assert torch.equal(p_dense * mask, p_sparse)  # the sparse weights are the masked dense ones
    out = sparse(torch.rand(4, 1, 28, 28))
    assert out.shape == (4, 10)


@needs_fashion
def test_set_mlp_loader_keeps_test_untouched_and_a_tiny_run_resumes(tmp_path):
    split = set_mlp.fashion_flat(tiny=False)
    assert split.sizes() == (50000, 10000, 10000)
    assert split.x_train.shape[1] == 784
    assert 0.0 <= split.x_train.min() <= split.x_train.max() <= 1.0
    args = ["--tiny", "--epochs", "1", "--seeds", "0", "--methods", "dense", "set", "--kernels"]
    set_mlp.main([*args, "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["dense", "set"]
    assert all(len(r["val_curve"]) == 1 and 0 <= r["test"] <= 1 for r in records)
    # the sparse arm ran under sparse_kernels (its rule keeps these tiny layers dense)
    assert [k["name"] for k in records[1]["kernels"]][:3] == ["hidden.0", "hidden.1", "hidden.2"]
    set_mlp.main([*args, "--out", str(tmp_path)])  # everything done: nothing is added
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


# --- the weight-scale diagnostic ------------------------------------------------------------------
def hand_weight() -> torch.Tensor:
    """Four output channels of a (4, 2, 2) conv weight with known norms."""
    w = torch.zeros(4, 2, 2)
    w[0, 0, 0], w[0, 1, 1] = 3.0, -4.0  # norm 5
    w[1, 0, 1] = 0.5  # norm 0.5
    w[2] = 0.0  # dead
    w[3, 1, 0] = 100.0  # norm 100
    return w


def test_layer_health_on_a_hand_built_weight():
    h = health.layer_health(hand_weight())
    assert h["norms"] == pytest.approx([5.0, 0.5, 0.0, 100.0])
    assert h["alive"] == 3
    assert h["channels"] == 4
    assert h["max_abs"] == 100.0
    assert h["median_norm"] == 5.0  # of the alive channels 0.5, 5, 100
    assert h["ratio"] == pytest.approx(100.0 / 5.0)
    # a mask counts only active connections: masking the 100 kills channel 3
    mask = torch.ones(4, 2, 2, dtype=torch.bool)
    mask[3, 1, 0] = False
    masked = health.layer_health(hand_weight(), mask)
    assert masked["alive"] == 2
    assert masked["max_abs"] == 4.0
    assert masked["ratio"] == pytest.approx(5.0 / 0.5)  # median of (0.5, 5) is the lower one
    # negative control: an all-zero weight has no alive channel and no ratio
    empty = health.layer_health(torch.zeros(3, 2))
    assert empty["alive"] == 0
    assert math.isnan(empty["ratio"])


def test_model_health_and_channel_norms_agree_with_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(6, 2))
    report = health.model_health(model)
    assert set(report) == {"0.weight", "3.weight"}  # weights of ndim >= 2 only
    expected = torch.linalg.vector_norm(model[0].weight.detach(), dim=(1, 2))
    assert report["0.weight"]["norms"] == pytest.approx(expected.tolist())
    assert health.channel_norms(model[3].weight).tolist() == pytest.approx(
        model[3].weight.detach().norm(dim=1).tolist()
    )


def test_the_trace_records_what_an_update_grew():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, bias=False), nn.BatchNorm1d(4), nn.Flatten())
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.75, update_every=2,
        prune_rate=0.5, prune_schedule="constant", model=model, seed=0,
    )  # fmt: skip
    trace = health.HealthTrace(model, opt, every=1)
    before = []
    for step in (1, 2):
        model(torch.randn(8, 1, 6)).square().mean().backward()
        before.append(opt.masks[model[0].weight].clone())
        trace.before_step()
        opt.step()
        trace.after_step(step)
        opt.zero_grad()
    after = opt.masks[model[0].weight]
    grown = int((after & ~before[1]).sum())
    assert grown > 0
    assert [u["step"] for u in trace.updates] == [2]  # step 1 had no update
    assert trace.updates[0]["grown"] == grown
    assert len(trace.snapshots) == 2
    assert trace.summary()["0.weight"]["min_alive"] <= 4


def test_scale_aware_drop_ranks_within_each_channel(method_registry):
    w = torch.tensor([[100.0, 50.0, 0.0], [1.0, 0.5, 0.0]]).view(2, 3, 1)  # a conv weight
    mask = w != 0
    layer = SparseLayer(nn.Parameter(w), "w", 0, mask, 4, 4)
    rigl = health.RigL().drop_scores(layer)
    scale = health.ScaleAwareRigL().drop_scores(layer)
    active = mask.flatten()
    # RigL drops the two smallest magnitudes, both in channel 1 (it would die); scale-aware drops
    # the relatively smaller weight of each channel
    rigl_order = rigl.flatten()[active].argsort()[:2].tolist()
    scale_order = scale.flatten()[active].argsort()[:2].tolist()
    assert sorted(rigl_order) == [2, 3]  # 1.0 and 0.5
    assert sorted(scale_order) == [1, 3]  # 50 and 0.5
    rms = math.sqrt((100**2 + 50**2) / 2)
    assert scale[0, 0, 0].item() == pytest.approx(100 / rms)
    # a 2-D weight keeps |w| under scope="conv"
    linear = SparseLayer(nn.Parameter(w.view(2, 3)), "l", 0, mask.view(2, 3), 4, 4)
    assert torch.equal(health.ScaleAwareRigL().drop_scores(linear), w.view(2, 3).abs())
    # registered by name for the experiments
    health.register()
    model = nn.Conv1d(2, 4, 3)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rigl-scale", 0.5)
    assert isinstance(opt.method, health.ScaleAwareRigL)


# --- the GPU study's smoke path -------------------------------------------------------------------
@needs_fashion
def test_gpu_study_quick_writes_its_tables(tmp_path):
    import gpu_study

    args = ["--quick", "--seeds", "0", "1", "--variants", "default", "recommended"]
    gpu_study.main([*args, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cpu"
    assert summary["seeds"] == [0, 1]
    plan = summary["plan"]
    assert plan["tickets"] == 2
    assert plan["phase1_steps"] + 2 * plan["cycle_steps"] == plan["total_steps"]
    assert set(summary["arms"]) == {"phase1", "base", "default", "recommended"}
    assert len(summary["arms"]["default"]["minus_base_test_per_seed"]) == 2
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["seed"], r["arm"]) for r in records) == sorted(
        (s, a) for s in (0, 1) for a in ("phase1", "base", "default", "recommended")
    )
    assert "| default | test |" in (tmp_path / "table.md").read_text()
