"""The Sup-tickets study (examples/research/study.py), tiny: exact branching, an honest report.

The study trains phase 1 once per cell and branches every phase-2 variant from a checkpoint taken
right after the last phase-1 optimizer step. That is only a fair comparison if a branch equals the
run that had the variant's options from the start; the first test checks it bit for bit.
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


@pytest.mark.parametrize("variant", ["official", "high0.05-explore0.1-bn", "caa"])
def test_a_branch_from_the_phase1_checkpoint_equals_the_uninterrupted_run(cell, variant):
    options = study.VARIANTS[variant]
    model, opt, sched = cell.build(cell.fraction, options)
    cell.train(model, opt, sched, 1, cell.total)
    expected = study.state_of(model)

    _, ckpt = cell.phase1_checkpoint(cell.fraction)
    phase1 = ckpt["sched"]["phase1_steps"]
    model, opt, sched = cell.branch(ckpt, cell.fraction, options)
    sched.step()
    cell.train(model, opt, sched, phase1 + 1, cell.total)
    got = study.state_of(model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # negative control: the default variant from the same checkpoint ends elsewhere
    model, opt, sched = cell.build(cell.fraction, {})
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    sched.step()
    cell.train(model, opt, sched, phase1 + 1, cell.total)
    other = study.state_of(model)
    assert not torch.equal(other["features.0.weight"], expected["features.0.weight"])


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
    phase-1 checkpoint ends where the uninterrupted base run ends, bit for bit."""
    cell = study.Cell(tiny_job(regime="short-shared"), study.load("mnist1d", tiny=True))
    model, opt, base = cell.build(None)
    cell.train(model, opt, base, 1, cell.total)
    expected = study.state_of(model)

    _, ckpt = cell.phase1_checkpoint(cell.fraction)
    phase1 = ckpt["sched"]["phase1_steps"]
    model, opt, base = study.continue_base(cell, ckpt)
    seen = study.state_of(model)
    assert all(torch.equal(expected[k], seen[k]) for k in expected)
    # negative control: the compressed phase 1 is another trajectory
    compressed = study.Cell(tiny_job(), study.load("mnist1d", tiny=True))
    model, opt, sched = compressed.build(compressed.fraction, {})
    compressed.train(model, opt, sched, 1, phase1)
    assert not torch.equal(
        study.state_of(model)["features.0.weight"], ckpt["model"]["features.0.weight"]
    )
