"""examples/research/demo_lm.py: the corpus is fixed and offline, the model's sparse set is the
projections, the tiny grid runs end to end and is deterministic, and the table pairs the seeds."""

from __future__ import annotations

import json
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "research"))

import demo_lm as lm

from sparseopt import SparseOptimizer
from sparseopt.integrations.hf import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_corpus_is_the_listed_stdlib_files_and_the_splits_are_disjoint():
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not set(lm.TRAIN_FILES) & set(lm.VAL_FILES)
    train = lm.read_corpus(lm.TRAIN_FILES)
    expected = b"\n".join((root / name).read_bytes() for name in lm.TRAIN_FILES)
    assert train.dtype == torch.uint8
    assert bytes(train.tolist()) == expected
    assert torch.equal(lm.read_corpus(lm.TRAIN_FILES), train)


def test_projections_are_sparse_and_embeddings_dense():
    model = lm.CharGPT(lm.TINY)
    opt = SparseOptimizer(torch.optim.AdamW(param_groups(model)), "rigl", 0.9, model=model)
    names = [layer.name for layer in opt.layers]
    assert names == [f"blocks.0.{n}.weight" for n in ("qkv", "proj", "fc", "out")]
    x = torch.randint(0, 256, (2, lm.TINY.context))
    assert model(x).shape == (2, lm.TINY.context, 256)


def test_tiny_grid_runs_and_is_deterministic(tmp_path):
    argv = ["--tiny", "--methods", "dense", "rigl", "--sparsities", "0.8", "--no-progress",
            "--workers", "1"]  # fmt: skip
    first = lm.main([*argv, "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["corpus"]["val"] == list(lm.VAL_FILES)
    assert len(first["runs"]) == 3  # dense, RigL base, RigL with Sup-tickets
    for run in first["runs"]:
        assert math.isfinite(run["val_bpc"])
        assert 0 < run["val_bpc"] < 8.0  # below the uniform guess over 256 bytes
        assert run["val_bpc"] == pytest.approx(run["val_loss"] / math.log(2))
    sparse = [r for r in first["runs"] if r["method"] == "rigl"]
    assert all(r["density"] == pytest.approx(0.2, abs=1e-3) for r in sparse)
    again = lm.main([*argv, "--out", str(tmp_path / "b")])
    assert [r["val_bpc"] for r in again["runs"]] == [r["val_bpc"] for r in first["runs"]]
    other = lm.main([*argv, "--seeds", "1", "--out", str(tmp_path / "c")])
    assert [r["val_bpc"] for r in other["runs"]] != [r["val_bpc"] for r in first["runs"]]


def test_table_pairs_seeds():
    runs = [
        {"method": "rigl", "sparsity": 0.9, "sup": sup, "seed": seed, "val_bpc": bpc}
        for sup, seed, bpc in [(False, 0, 2.0), (True, 0, 1.9), (False, 1, 3.0), (True, 1, 3.2)]
    ]
    text, rows = lm.table(runs)
    assert rows[0]["diffs"] == pytest.approx([-0.1, 0.2])
    assert rows[0]["base_mean"] == pytest.approx(2.5)
    assert "+0.0500" in text
