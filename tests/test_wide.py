"""The wide-sparse study's scripts (examples/research/), each at a tiny size.

SET-MLP, the weight-scale diagnostic, the GPU study's CPU smoke path, the booster in the
wide-sparse regime and the wide LM:

- set_mlp.py: the SET paper's ε maps onto our ER distribution exactly (each hidden layer gets
  ``ε (n_in + n_out) / (n_in n_out)``, the classifier stays dense), and a tiny run writes its
  record and resumes.
- health.py: the diagnostic computes what it claims on hand-built weights (norms, alive channels,
  max/median ratio, masks counted), the trace records what an update grew, and the scale-aware
  drop ranks each weight within its channel where RigL's ranks across channels.
- gpu_study.py: ``--quick`` runs on the CPU (the paper's default and the recommended preset
  with ``select=``) and writes its tables and ``summary.json``.
- wide_study.py: the sparse init is Glorot / sqrt(density) per layer; the base run continued
  from the shared phase-1 checkpoint equals the uninterrupted run bit for bit on the sparse
  kernels (twice from one checkpoint: the deep copy); ``--demo --quick`` pairs base and the
  recommended preset, whose ultimate ticket is the best-scoring candidate on validation.
- wide_lm.py: a tiny grid runs every projection on the kernels, reports test, resumes; the base
  continues from the shared phase 1 bit for bit.
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

from sparseopt import SparseOptimizer, SupTicketsScheduler
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


@needs_fashion
def test_set_settle_stops_rewiring_for_the_last_tenth_and_matches_set_before(tmp_path):
    """``set-settle`` is SET until its rewiring stops: 20 epochs, SET rewires after epochs 1-19,
    set-settle after epochs 1-18 only; the runs are paired, so their validation curves agree
    exactly through epoch 19 (trained on the same 18 rewirings)."""
    args = ["--tiny", "--epochs", "20", "--seeds", "0", "--methods", "set", "set-settle"]
    set_mlp.main([*args, "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by = {r["method"]: r for r in records}
    assert by["set"]["updates"] == 19
    assert by["set-settle"]["updates"] == 18
    assert by["set"]["val_curve"][:19] == by["set-settle"]["val_curve"][:19]
    # the report pairs them
    assert "| set-settle − set | test |" in set_mlp.report(str(tmp_path / "results.jsonl"))


def test_set_mlp_report_pairs_the_validation_curves_by_seed(tmp_path):
    """The curve table is SET minus each method at the marked epochs (the mean of the 5 epochs
    ending there), paired by seed, computed here by hand; a seed that only one method ran is left
    out of that pair."""
    config = {**set_mlp.PROTOCOL, "epochs": 5}

    def rec(method, seed, curve):
        return {"method": method, "seed": seed, "hidden": [8, 8, 8], "config": config,
                "val": curve[-1], "val_best": max(curve), "val_curve": curve, "test": 0.5,
                "seconds_per_epoch": 1.0}  # fmt: skip

    records = [
        rec("set", 0, [0.50, 0.60, 0.70, 0.80, 0.90]),
        rec("set", 1, [0.40, 0.50, 0.60, 0.70, 0.80]),
        rec("static", 0, [0.40, 0.60, 0.60, 0.80, 0.85]),
        rec("static", 1, [0.30, 0.50, 0.60, 0.70, 0.70]),
        rec("dense", 0, [0.60, 0.70, 0.80, 0.90, 0.95]),  # seed 0 only
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = set_mlp.report(str(path))
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
        for line in text.splitlines()
        if line.startswith("| 1 |") or line.startswith("| 5 |")
    }
    # epoch 1: SET - static = +10, +10 (two seeds); SET - dense = -10 (seed 0 only)
    assert rows["1"] == ["10.00 ± 0.00 (2)", "-10.00 ± 0.00 (1)"]
    # epoch 5, the mean of epochs 1-5: seed 0 70 - 65 = +5, seed 1 60 - 56 = +4 -> 4.50 ± 0.71;
    # dense: 70 - 79 = -9
    assert rows["5"] == ["4.50 ± 0.71 (2)", "-9.00 ± 0.00 (1)"]
    assert "| 10 |" not in text  # only epochs the runs reached
    # negative control: without a second method there is no curve table
    path.write_text(json.dumps(records[0]) + "\n")
    assert "over training" not in set_mlp.report(str(path))


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


# --- the booster in the wide-sparse regime (wide_study.py) and the wide LM (wide_lm.py) ----------
def random_split(n_train: int = 320, n_eval: int = 64):
    from data import Split

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + 2 * n_eval, 784, generator=g)
    y = torch.randint(0, 10, (len(x),), generator=g)
    a, b = n_train, n_train + n_eval
    return Split(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def test_wide_study_sparse_init_scales_each_layer_by_its_density():
    import wide_study

    job = {"method": "rigl", "sparsity": 0.9, "seed": 4}
    plain, _, _ = wide_study.build(
        {**job, "config": {**wide_study.QUICK, "sparse_init": False}}, 50
    )
    scaled, opt, handle = wide_study.build({**job, "config": wide_study.QUICK}, 50)
    for a, b, mask in zip(plain.hidden, scaled.hidden, opt.masks.values(), strict=True):
        density = mask.sum().item() / mask.numel()  # by hand, not the script's expression
        assert 0 < density < 1
        torch.testing.assert_close(b.weight, a.weight / math.sqrt(density), rtol=1e-6, atol=0)
    assert torch.equal(plain.classifier.weight, scaled.classifier.weight)  # dense: untouched
    handle.remove()


def test_wide_study_branches_continue_the_base_run_bit_for_bit_on_the_kernels():
    import wide_study

    job = {"method": "rigl", "sparsity": 0.9, "seed": 2, "config": wide_study.QUICK}
    cell = wide_study.WideCell(job, random_split())
    model, opt, base, handle = cell.build(None)
    cell.train(model, opt, base, 1, cell.total)
    uninterrupted = wide_study.state_of(model)
    layouts = {row["name"]: row["layout"] for row in handle.report()}
    assert layouts == {
        "hidden.0": "csr",
        "hidden.1": "csr",
        "hidden.2": "csr",
        "classifier": None,  # not a sparse layer: never converted
    }
    handle.remove()

    ckpt, _, _ = cell.checkpoint("shared")
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    for _ in range(2):  # twice from the same checkpoint: the deep copy keeps it intact
        model, opt, base, handle = cell.load(ckpt, None, None)
        base.step()
        cell.train(model, opt, base, cell.phase1 + 1, cell.total)
        for name, value in wide_study.state_of(model).items():
            assert torch.equal(value, uninterrupted[name]), name
        handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in ckpt["model"].items())
    # negative control: the paper's phase 1 (milestones of phase 1, not of the run) differs
    paper, _, _ = cell.checkpoint("paper")
    assert not torch.equal(paper["model"]["hidden.1.weight"], ckpt["model"]["hidden.1.weight"])


@pytest.mark.parametrize("name", ["PROTOCOL", "DEMO"])
def test_wide_study_shared_phase1_ends_at_lr_low(name):
    """The grid's and the demo's split: the shared phase 1 (the base run's own x0.1 at 1/2 and
    3/4 of the run) ends after the second decay, so phase 2 starts at lr_low with no jump (the
    scheduler warns otherwise; a demo of 20 epochs with 2 cycles of 1,040 steps did)."""
    import wide_study

    c = getattr(wide_study, name)
    total = c["epochs"] * (50_000 // c["batch"])
    fraction = c["tickets"] * c["cycle_steps"] / total
    plan = SupTicketsScheduler.plan(total, c["cycle_steps"], fraction)
    assert plan.tickets == c["tickets"]
    assert plan.phase1_steps > 3 * total // 4
    assert c["cycle_steps"] >= 1000


@needs_fashion
def test_wide_study_demo_quick_pairs_base_and_recommended(tmp_path):
    import wide_study

    wide_study.main(["--demo", "--quick", "--workers", "1", "--seeds", "0", "1", "--out",
                     str(tmp_path)])  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    arms = sorted((r["seed"], r["variant"]) for r in records)
    assert arms == sorted((s, v) for s in (0, 1) for v in ("phase1-shared", "base", "recommended"))
    for r in records:
        if r["variant"] == "recommended":
            # select= wrote the best-scoring candidate: its validation accuracy is the max score
            assert r["scores"][r["chosen"]] == max(r["scores"].values())
            assert r["acc"]["val"] == pytest.approx(max(r["scores"].values()), abs=1e-12)
            assert r["acc"]["val"] >= r["scores"]["phase 1"]
            assert r["tickets"] == 2
            assert r["base"]["val"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "| rigl | 95% | recommended (chosen) |" in text
    assert "`select=` chose (recommended, 2 runs)" in text


# the recommended arm's phase 1 is the base run's cosine ("shared"), which ends far above lr_low:
# the scheduler says so, as it should
@pytest.mark.filterwarnings("ignore:the learning rate at the end of phase 1")
def test_wide_lm_tiny_grid_runs_its_projections_on_the_kernels(tmp_path):
    import wide_lm

    args = ["--tiny", "--methods", "dense", "rigl", "--sparsities", "0.9", "--seeds", "0"]
    wide_lm.main([*args, "--out", str(tmp_path)])
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in records) == ["base", "dense", "recommended", "sup"]
    for r in records:
        assert 0 < r["bpb"]["val"] < 8
        assert 0 < r["bpb"]["test"] < 8
        if r["arm"] != "dense":
            projections = {k: v for k, v in r["kernels"].items() if k.startswith("blocks.")}
            assert set(projections) == {f"blocks.0.{n}" for n in ("qkv", "proj", "fc", "out")}
            assert set(projections.values()) == {"csr"}
        if r["arm"] == "recommended":  # minus the validation loss, in bits per byte
            assert -max(r["scores"].values()) == pytest.approx(r["bpb"]["val"], abs=1e-12)
    assert "Test (reported once)" in (tmp_path / "results.md").read_text()
    # a second call finds every cell done
    wide_lm.main([*args, "--out", str(tmp_path)])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(records)


def test_wide_lm_base_continues_from_the_shared_phase1_bit_for_bit():
    import wide_lm
    from demo_lm import TRAIN_FILES, VAL_FILES, read_corpus

    data = {"train": read_corpus(TRAIN_FILES), "val": read_corpus(VAL_FILES),
            "test": read_corpus(wide_lm.TEST_FILES)}  # fmt: skip
    grid = wide_lm.Grid(wide_lm.TINY, {"method": "set", "sparsity": 0.9, "seed": 1}, data)
    model, opt, sched, _ = grid.build("base")
    grid.train(model, opt, sched, 1, wide_lm.TINY.steps)
    reference = wide_lm.state_of(model)
    model, opt, sched, _ = grid.build("phase1-shared")
    grid.train(model, opt, sched, 1, grid.phase1 - 1)
    grid.train(model, opt, None, grid.phase1, grid.phase1)
    ckpt = {"model": wide_lm.state_of(model), "opt": opt.state_dict(), "sched": sched.state_dict()}
    model, opt, base, _ = grid.load(ckpt, "base")
    base.step()
    grid.train(model, opt, base, grid.phase1 + 1, wide_lm.TINY.steps)
    assert all(torch.equal(v, reference[k]) for k, v in wide_lm.state_of(model).items())
