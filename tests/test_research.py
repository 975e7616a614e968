"""The research harness: the demo grid end to end, train.py's smoke runs, resume, presets, messages.

Everything runs in this process (importing ``examples/research/demo.py`` and
``examples/research/train.py`` and calling their ``main(argv)``), so torch is imported once.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

# A script's own folder is on sys.path when it runs; importing it here needs the same.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "research"))

import demo
import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["--quick", "--methods", "dense", "rigl", "--sparsities", "0.9", "--seeds", "0"]
    result = demo.main([*argv, "--workers", "1", "--no-progress", "--out", str(out)])
    return out, result


ROW_COLUMNS = [
    "accuracy_mean",
    "accuracy_std",
    "nll_mean",
    "nll_std",
    "ece_mean",
    "ece_std",
    "density",
    "train_flops",
    "inference_flops",
]


def test_demo_grid_writes_every_row_and_column(quick_demo):
    out, _ = quick_demo
    data = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["sparsity"], r["sup_tickets"]): r for r in data["rows"]}
    assert set(rows) == {("dense", 0.0, False), ("rigl", 0.9, False), ("rigl", 0.9, True)}
    for row in rows.values():
        for column in ROW_COLUMNS:
            assert math.isfinite(row[column]), (row["label"], column)
        assert 0.5 < row["accuracy_mean"] <= 1.0  # 120 steps already learn the digits
        assert row["accuracy_std"] == 0.0  # one seed
    assert rows[("dense", 0.0, False)]["density"] == 1.0
    assert rows[("dense", 0.0, False)]["train_flops"] == 1.0
    for sup in (False, True):
        row = rows[("rigl", 0.9, sup)]
        assert row["density"] == pytest.approx(0.1, abs=1e-4)  # exact counts, finalize included
        assert 0.0 < row["inference_flops"] < row["train_flops"] < 1.0  # RigL's dense gradients
    with_sup = rows[("rigl", 0.9, True)]
    assert 0.5 < with_sup["live_accuracy_mean"] <= 1.0

    (run,) = [r for r in data["runs"] if r["sup_tickets"]]
    assert run["ticket_steps"] == [114, 120]  # 120 steps, 6-step cycles, 10%: two tickets
    assert [t["step"] for t in run["tickets"]] == run["ticket_steps"]
    assert all(t["superposed"] is not None for t in run["tickets"])
    # the recommended preset: lr_low 1/100 of the peak, lr_high a half, select= on validation
    assert data["schedules"]["sup_tickets"]["lr"][-1] == pytest.approx(0.001)
    assert max(data["schedules"]["sup_tickets"]["lr"][108:]) == pytest.approx(0.05)
    assert set(run["val_scores"]) == {"phase 1", "ticket 1", "ticket 2", "superposition", "soup"}
    assert run["chosen"] in run["val_scores"]
    assert run["val_scores"][run["chosen"]] == max(run["val_scores"].values())
    assert data["config"]["select"] == "val"

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    assert set(ROW_COLUMNS) <= set(table[0])
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    for name in ("lr.png", "accuracy.png", "density.png"):
        assert (out / name).stat().st_size > 1000, name


def test_demo_table_prints_every_configuration(quick_demo, capsys):
    _, result = quick_demo
    assert result["cpu_seconds"] > 0  # the demo's own CPU time (resource.getrusage)
    table = demo.format_table(result["rows"])
    for label in ("Dense", "RigL 90%", "RigL 90% + Sup-tickets"):
        assert label in table
    assert "±" in table
    assert "train FLOPs" in table


def test_demo_layer_report_matches_erk_counts(quick_demo):
    _, result = quick_demo
    text = demo.layer_report(result["runs"], "erk")
    assert "per-layer report of RigL 90%, seed 0" in text
    assert "every layer's nnz equals its ERK count" in text
    (run,) = [r for r in result["runs"] if r["method"] == "rigl" and not r["sup_tickets"]]
    tampered = [dict(run, layers=[dict(run["layers"][0], nnz=run["layers"][0]["nnz"] + 1)])]
    tampered[0]["layers"] += run["layers"][1:]
    assert "DIFFERS FROM its ERK count" in demo.layer_report(tampered, "erk")


def test_demo_grid_flags():
    args = demo.parse_args(["--methods", "set", "granet", "--sparsities", "0.8", "--seeds", "4"])
    jobs = demo.make_jobs(args)
    assert [(j["method"], j["sparsity"], j["sup"], j["seed"]) for j in jobs] == [
        ("set", 0.8, False, 4),
        ("set", 0.8, True, 4),
        ("granet", 0.8, False, 4),
        ("granet", 0.8, True, 4),
    ]
    assert {j["steps"] for j in jobs} == {3000}  # the same budget for every run
    assert {j["data"] for j in jobs} == {"mnist1d"}  # the main table
    full = demo.make_jobs(demo.parse_args([]))
    assert len(full) == 21  # 1 dense + 3 methods x 2 arms at 90%, x 3 seeds
    assert {(j["width"], j["select"], j["phase1"]) for j in full} == {(96, "val", "shared")}
    # phase 1 shared: one task per dense run, one pair per sparse configuration and seed
    tasks = demo.make_tasks(full, share=True)
    assert sorted(len(t) for t in tasks) == [1] * 3 + [2] * 9
    for task in tasks:
        assert len({(j["method"], j["seed"]) for j in task}) == 1
        assert [j["sup"] for j in task] == ([False] if len(task) == 1 else [False, True])
    assert demo.task_steps(tasks[0]) == 3300  # 3,000 steps + the 300 of phase 2
    assert [len(t) for t in demo.make_tasks(full, share=False)] == [1] * 21
    paper = demo.make_jobs(demo.parse_args(["--phase1", "paper"]))
    assert [len(t) for t in demo.make_tasks(paper, share=True)] == [1] * 21
    digits = demo.make_jobs(demo.parse_args(["--data", "digits"]))
    assert {(j["steps"], j["batch_size"], j["cycle_steps"]) for j in digits} == {(600, 64, 20)}
    quick = demo.make_jobs(demo.parse_args(["--quick"]))
    assert {(j["data"], j["steps"]) for j in quick} == {("digits", 120)}
    with pytest.raises(SystemExit):
        demo.parse_args(["--quick", "--data", "mnist1d"])


def test_demo_mnist1d_grid_at_a_tiny_size(tmp_path):
    """The main table's data set and the paired differences, at a few hundred steps."""
    pytest.importorskip("mnist1d")
    argv = [
        "--methods", "rigl", "--sparsities", "0.9", "--seeds", "0", "1", "--steps", "200",
        "--cycle-steps", "10", "--eval-every", "50", "--width", "32", "--workers", "1",
        "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    result = demo.main(argv)
    (row,) = result["paired"]
    runs = {(r["seed"], r["sup_tickets"]): r for r in result["runs"]}
    expected = [100 * (runs[(s, True)]["accuracy"] - runs[(s, False)]["accuracy"]) for s in (0, 1)]
    assert row["diffs"] == pytest.approx(expected)
    assert row["label"] == "RigL 90%"
    assert row["wins"] == sum(d > 0 for d in expected)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["paired"][0]["diffs"] == pytest.approx(expected)
    assert saved["config"]["data"] == "mnist1d"
    assert (tmp_path / "paired.png").stat().st_size > 1000
    printed = demo.format_paired(result["paired"])
    assert "ultimate - live" in printed
    assert "(chosen on val)" in printed
    assert row["chosen"] == [runs[(s, True)]["chosen"] for s in (0, 1)]


def _quick_jobs(*flags):
    args = demo.parse_args(["--quick", "--methods", "rigl", "--sparsities", "0.9", *flags])
    jobs = [j for j in demo.make_jobs(args) if j["seed"] == 0]
    return jobs, demo.load_data(jobs[0])


def test_demo_shared_phase1_is_two_separate_runs_bit_for_bit():
    """The pair (phase 1 once, the run without Sup-tickets continued from its checkpoint) gives
    what two runs from scratch give: weights, metrics, curves, rates, FLOPs, ITOP."""
    jobs, data = _quick_jobs()
    base_job, sup_job = jobs
    paired = demo.run_pair(jobs, data)
    separate = [demo.run_one(base_job, data), demo.run_one(sup_job, data)]
    for a, b in zip(paired, separate, strict=True):
        assert a["state"].keys() == b["state"].keys()
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (a["label"], key)
        assert torch.equal(a["logits"], b["logits"])
        for key in ("curve", "lr", "train_flops", "itop", "tickets", "val_scores", "chosen"):
            assert a[key] == b[key], (a["label"], key)
    base, sup = separate
    assert sup["val_scores"] is not None
    assert base["val_scores"] is None
    assert base["curve"]["step"] == list(range(20, 121, 20))  # its own evaluation steps
    assert base["lr"][:108] == sup["lr"][:108]  # phase 1: the same rates
    assert base["lr"][108:] != sup["lr"][108:]
    # negative control: with the paper's phase 1 the runs differ from step 55 on (x0.1 at 54)
    paper_jobs, _ = _quick_jobs("--phase1", "paper")
    paper = demo.run_one(paper_jobs[1], data)
    assert paper["lr"][:54] == sup["lr"][:54]
    assert paper["lr"][54] != sup["lr"][54]
    assert not torch.equal(paper["state"]["classifier.weight"], sup["state"]["classifier.weight"])


def test_demo_select_scores_on_validation_carved_from_train():
    """select= sees the validation split (carved from the training data), the table the test
    split: the chosen candidate's recorded score is the final model's validation accuracy."""
    jobs, data = _quick_jobs()
    assert (len(data["x"]), len(data["x_val"]), len(data["x_eval"])) == (1077, 270, 450)
    sup = demo.run_one(jobs[1], data)
    from models import DigitsCNN

    model = DigitsCNN(width=16)
    model.load_state_dict(sup["state"])
    model.eval()
    with torch.no_grad():
        on_val = (model(data["x_val"]).argmax(-1) == data["y_val"]).double().mean().item()
        on_test = (model(data["x_eval"]).argmax(-1) == data["y_eval"]).double().mean().item()
    assert sup["val_scores"][sup["chosen"]] == on_val
    assert (sup["logits"].argmax(-1) == data["y_eval"]).double().mean().item() == on_test
    # without select=, the digits train on their whole training part and nothing is carved
    _, plain_data = _quick_jobs("--select", "none")
    assert (len(plain_data["x"]), len(plain_data["x_eval"])) == (1347, 450)
    assert "x_val" not in plain_data
    # tuning on val: the reported split is val, select= scores on a second carve of train
    _, tuning = _quick_jobs("--eval-on", "val")
    assert (len(tuning["x"]), len(tuning["x_val"]), len(tuning["x_eval"])) == (862, 215, 270)


SMOKE = [
    ("digits", "digits-cnn", ["--sup-tickets"]),
    ("digits", "digits-cnn", ["--method", "dense"]),
    ("digits", "digits-cnn", ["--method", "set", "--sup-tickets"]),
    ("digits", "digits-cnn", ["--method", "granet", "--sup-tickets"]),
    ("digits", "digits-cnn", ["--method", "snip"]),
    ("cifar10", "vgg16", ["--sup-tickets"]),
    ("cifar10", "resnet50", []),
    ("cifar100", "wrn-28-10", []),
    ("imagenet", "resnet50", []),
]


@pytest.mark.parametrize(("dataset", "model", "extra"), SMOKE)
def test_train_smoke(dataset, model, extra, capsys):
    result = train.main(["--smoke", "--dataset", dataset, "--model", model, "--quiet", *extra])
    assert not result["stopped"]
    assert result["plan"]["total_steps"] == 2
    assert math.isfinite(result["nll"])
    assert 0.0 <= result["ece"] <= 1.0
    if "dense" not in extra:
        assert result["density"] == pytest.approx(0.1, abs=1e-3)
    if "--sup-tickets" in extra:
        assert result["plan"]["ticket_steps"] == [2]
    printed = capsys.readouterr().out
    assert "test (" in printed
    if "dense" not in extra:
        assert "total" in printed  # opt.report()


def test_train_export_writes_the_compact_file_and_reports(tmp_path, capsys):
    path = tmp_path / "ticket.sparse"
    result = train.main(["--smoke", "--sparsity", "0.95", "--quiet", "--export", str(path)])
    printed = capsys.readouterr().out
    assert path.exists()
    exported = result["export"]
    assert exported["compact_bytes"] == path.stat().st_size
    assert exported["compact_bytes"] < 0.3 * exported["dense_bytes"]
    assert "compact file" in printed
    assert "batch-1 latency: dense" in printed


def _state(path):
    return torch.load(path, weights_only=True)


def test_train_resume_is_bit_exact(tmp_path, capsys):
    # 22 steps an epoch, 66 steps; 9-step cycles, 4 tickets after step 30 (39, 48, 57, 66):
    # the checkpoint after epoch 2 (step 44) falls mid-cycle, one ticket in.
    argv = ["--epochs", "3", "--quiet", "--sup-tickets", "--cycle-epochs", "0.4"]
    argv += ["--superpose-fraction", "0.6", "--update-every", "5"]
    first = train.main([*argv, "--checkpoint", str(tmp_path / "a.pt"), "--stop-after", "2"])
    assert first["stopped"]
    assert _state(tmp_path / "a.pt")["epoch"] == 2
    assert _state(tmp_path / "a.pt")["opt"]["sparseopt"]["superposition"] is not None
    resumed = train.main(
        [*argv, "--resume", str(tmp_path / "a.pt"), "--checkpoint", str(tmp_path / "b.pt")]
    )
    straight = train.main([*argv, "--checkpoint", str(tmp_path / "c.pt")])
    assert resumed["plan"]["ticket_steps"] == [39, 48, 57, 66]
    b, c = _state(tmp_path / "b.pt"), _state(tmp_path / "c.pt")
    assert b["model"].keys() == c["model"].keys()
    for key in c["model"]:
        assert torch.equal(b["model"][key], c["model"][key]), key
    masks_b, masks_c = b["opt"]["sparseopt"]["masks"], c["opt"]["sparseopt"]["masks"]
    assert all(torch.equal(masks_b[k], masks_c[k]) for k in masks_c)
    assert b["flops"] == c["flops"]
    for key in ("accuracy", "nll", "ece", "density", "train_flops"):
        assert resumed[key] == straight[key], key
    with pytest.raises(SystemExit, match="another schedule"):
        train.main(["--epochs", "4", *argv[2:], "--resume", str(tmp_path / "a.pt")])


def test_cifar_preset():
    args = train.parse_args(["--preset", "cifar-paper"])
    expected = {
        "dataset": "cifar100",
        "model": "resnet50",
        "epochs": 250,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "milestone_fractions": [0.5, 0.75],
        "milestones": None,
        "gamma": 0.1,
        "update_every": 1000,
        "prune_rate": 0.5,
        "prune_schedule": "constant",
        "stop_fraction": 1.0,
        "sup_tickets": True,
        "cycle_epochs": 8,
        "superpose_fraction": 0.1,
        "lr_low": 0.001,
        "lr_high": 0.005,
        "explore_rate": 0.5,
    }
    assert {k: getattr(args, k) for k in expected} == expected


def test_imagenet_preset():
    args = train.parse_args(["--preset", "imagenet-paper"])
    expected = {
        "dataset": "imagenet",
        "model": "resnet50",
        "epochs": 100,
        "batch_size": 256,
        "lr": 0.1,
        "momentum": 0.9,
        "milestones": [30, 60, 85],
        "warmup_epochs": 5,
        "gamma": 0.1,
        "sup_tickets": True,
        "cycle_epochs": 2,
        "superpose_fraction": 0.08,
        "lr_low": 0.0001,
        "lr_high": 0.0005,
        "explore_rate": 0.5,
    }
    assert {k: getattr(args, k) for k in expected} == expected


def test_explicit_flags_override_the_preset():
    args = train.parse_args(
        ["--preset", "cifar-paper", "--epochs", "10", "--no-sup-tickets", "--lr-high", "0.01"]
    )
    assert (args.epochs, args.sup_tickets, args.lr_high) == (10, False, 0.01)
    assert (args.batch_size, args.update_every, args.lr_low) == (128, 1000, 0.001)
    plain = train.parse_args([])
    assert (plain.dataset, plain.model, plain.sup_tickets) == ("digits", "digits-cnn", False)


def _plan(argv, steps_per_epoch):
    args = train.parse_args(argv)
    model = torch.nn.Linear(4, 4)
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    opt = train.SparseOptimizer(
        inner, "rigl", 0.9, total_steps=args.epochs * steps_per_epoch, update_every=1000
    )
    return train.lr_schedule(args, opt, steps_per_epoch)


def test_presets_in_steps_match_the_docs():
    # docs/sup-tickets.md, "The paper's settings in steps".
    sched, plan = _plan(["--preset", "cifar-paper"], 391)
    assert plan["total_steps"] == 97_750
    assert (plan["cycle_steps"], plan["tickets"], plan["phase1_steps"]) == (3_128, 3, 88_366)
    assert plan["milestones"] == [44_183, 66_274]
    sched, plan = _plan(["--preset", "imagenet-paper"], 5_005)
    assert plan["total_steps"] == 500_500
    assert (plan["cycle_steps"], plan["tickets"], plan["phase1_steps"]) == (10_010, 4, 460_460)
    assert plan["milestones"] == [150_150, 300_300, 425_425]
    assert plan["warmup_steps"] == 25_025
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 25_025)  # warm-up


def test_missing_torchvision_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(SystemExit, match=r"--dataset cifar10 needs torchvision.*--smoke"):
        train.main(["--dataset", "cifar10", "--model", "vgg16"])
    with pytest.raises(SystemExit, match=r"--dataset imagenet needs torchvision"):
        train.main(["--dataset", "imagenet"])


def test_dense_with_sup_tickets_is_refused():
    with pytest.raises(SystemExit, match="sparse --method"):
        train.main(["--method", "dense", "--sup-tickets", "--smoke"])


def test_demo_ends_with_the_deployed_ticket(quick_demo):
    """The best sparse configuration's compact file: smaller than torch.save, and it loads back."""
    from models import DigitsCNN

    from sparseopt import load_sparse

    out, result = quick_demo
    deployed = result["deployed"]
    assert deployed["label"].startswith("RigL 90%")
    assert deployed["path"] == str(out / "ticket.sparse")
    assert 0 < deployed["compact_bytes"] < deployed["dense_bytes"]
    assert deployed["dense_ms"] > 0
    assert deployed["sparse_ms"] > 0
    model = DigitsCNN(width=16)
    masks = load_sparse(model, deployed["path"])
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert density <= 0.1 + 1e-3  # the nonzeros of a 90% ticket
    assert "state" not in json.loads((out / "results.json").read_text())["runs"][0]
