"""The Sup-tickets study (examples/research/study.py), tiny: exact branching, an honest report.

The study trains phase 1 once per cell and branches every phase-2 variant from a checkpoint taken
right after the last phase-1 optimizer step. That is only a fair comparison if a branch equals the
run that had the variant's options from the start. The first tests check it bit for bit for
every branch of a cell, the second and later ones included (each branch loads a deep copy of the
checkpoint), with a negative control that branches from the checkpoint itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "research"))

pytest.importorskip("mnist1d")
pytest.importorskip("scipy")

import study

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_job(**over):
    job = {
        "data": "mnist1d",
        "regime": "short",
        "method": "rigl",
        "sparsity": 0.9,
        "seed": 0,
        "variants": ["default"],
        "update_every": None,
        "line": True,
        "tiny": True,
    }
    return {**job, **over}


@pytest.fixture(scope="module")
def cell():
    return study.Cell(tiny_job(), study.load("mnist1d", tiny=True))


# The branches of one cell, in the order run_cell takes them: the first is the one the old test
# covered; the second and third start from the checkpoint after other branches have run.
BRANCHES = ["official", "high0.05-explore0.1-bn", "caa"]


def uninterrupted(cell, options):
    """The run that has the variant's options from step 1: what a branch must reproduce."""
    model, opt, sched = cell.build(cell.fraction, options)
    cell.train(model, opt, sched, 1, cell.total)
    return study.state_of(model)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def references(cell):
    return {name: uninterrupted(cell, study.VARIANTS[name]) for name in BRANCHES}


def branch_all(cell):
    """One phase-1 checkpoint, then every variant in turn from it, as ``run_cell`` does."""
    _, ckpt = cell.phase1_checkpoint(cell.fraction)
    ends = {}
    for name in BRANCHES:
        model, _, _ = cell.run_branch(ckpt, cell.fraction, study.VARIANTS[name])
        ends[name] = study.state_of(model)
    return ckpt, ends


def test_every_branch_of_a_cell_equals_its_uninterrupted_run(cell, references):
    ckpt, ends = branch_all(cell)
    for name in BRANCHES:  # the second and third branches too
        assert same(ends[name], references[name]), name
    # the variants really differ, so the equalities above compare distinct trajectories
    assert not same(references[BRANCHES[0]], references[BRANCHES[1]])
    # negative control: the default variant from the same checkpoint ends elsewhere
    model, _, _ = cell.run_branch(ckpt, cell.fraction, {})
    assert not torch.equal(
        study.state_of(model)["features.0.weight"], references[BRANCHES[0]]["features.0.weight"]
    )


def test_branching_without_the_copy_is_caught(cell, references, monkeypatch):
    """Negative control for the test above: branch from the checkpoint itself, as the study did
    before branches loaded a deep copy. ``Optimizer.load_state_dict`` keeps the checkpoint's
    momentum tensors, the first branch updates them in place, and every later branch starts from
    the previous branch's end-of-run momentum."""
    monkeypatch.setattr(study, "deepcopy", lambda x: x)
    ckpt, ends = branch_all(cell)
    assert same(ends[BRANCHES[0]], references[BRANCHES[0]])  # the first branch was always right
    for name in BRANCHES[1:]:
        assert not same(ends[name], references[name]), name
    # what went wrong: the checkpoint's momentum is no longer phase 1's
    _, fresh = cell.phase1_checkpoint(cell.fraction)
    moments = [s["momentum_buffer"] for s in ckpt["opt"]["state"].values()]
    expected = [s["momentum_buffer"] for s in fresh["opt"]["state"].values()]
    assert not all(torch.equal(a, b) for a, b in zip(moments, expected, strict=True))


def test_run_cell_records(cell):
    variants = ["default", "official", "tickets2x-default"]
    records = study.run_cell(tiny_job(variants=variants))
    assert [r["variant"] for r in records] == ["base", *variants]
    base, *sup = records
    for r in sup:
        assert r["base"] == base["acc"]
        assert 0.0 <= r["acc"]["val"] <= 1.0
        assert r["density"] == pytest.approx(0.1, abs=0.01)
        assert len(r["mechanism"]["line"]) == 3
        assert 0.0 <= r["mechanism"]["overlap"] <= 1.0
    by_name = {r["variant"]: r for r in sup}
    assert by_name["default"]["tickets"] == 2
    assert by_name["official"]["tickets"] == 3  # ticket 0 counts
    assert by_name["tickets2x-default"]["tickets"] == 4
    # the exploration of the default replaces connections: overlap below 1
    assert by_name["default"]["mechanism"]["overlap"] < 1.0


def test_cli_and_report_choose_on_validation(tmp_path):
    study.main(
        [
            "--tiny", "--methods", "rigl", "--sparsities", "0.9", "--seeds", "0", "1",
            "--variants", "default", "explore0", "--no-line", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3
    report = (tmp_path / "results.md").read_text()
    records = [json.loads(line) for line in lines]
    val = study.summarize(records, "val")
    means = {k[3]: sum(v["diff"]) / 2 for k, v in val.items()}
    best = max(means, key=means.get)
    assert f"| {best} (chosen) |" in report
    # a second call skips the cells already in the file
    study.main(["--tiny", "--methods", "rigl", "--sparsities", "0.9", "--seeds", "0", "1",
                "--variants", "default", "explore0", "--out", str(tmp_path)])  # fmt: skip
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6


def test_shared_phase1_is_the_base_run_and_its_continuation_equals_it():
    """In the "shared" regimes phase 1 is the base run's start, and the base continued from the
    phase-1 checkpoint ends where the uninterrupted base run ends, bit for bit; a variant branched
    after it from the same checkpoint still equals its own uninterrupted run."""
    cell = study.Cell(tiny_job(regime="short-shared"), study.load("mnist1d", tiny=True))
    model, opt, base = cell.build(None)
    cell.train(model, opt, base, 1, cell.total)
    expected = study.state_of(model)

    _, ckpt = cell.phase1_checkpoint(cell.fraction)
    phase1 = ckpt["sched"]["phase1_steps"]
    model, opt, base = study.continue_base(cell, ckpt)
    seen = study.state_of(model)
    assert all(torch.equal(expected[k], seen[k]) for k in expected)
    # a variant branched after the base continued from the same checkpoint: still its own run
    options = study.VARIANTS["official"]
    model, _, _ = cell.run_branch(ckpt, cell.fraction, options)
    assert same(study.state_of(model), uninterrupted(cell, options))
    # negative control: the compressed phase 1 is another trajectory
    compressed = study.Cell(tiny_job(), study.load("mnist1d", tiny=True))
    model, opt, sched = compressed.build(compressed.fraction, {})
    compressed.train(model, opt, sched, 1, phase1)
    assert not torch.equal(
        study.state_of(model)["features.0.weight"], ckpt["model"]["features.0.weight"]
    )
