"""Smoke test of the benchmark scripts: each runs with ``--quick`` and produces its tables.

Only that the scripts run and print markdown tables is checked; the numbers are not (they are
timings on whatever machine runs the tests).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("script", "keys", "markers"),
    [
        ("step_overhead", ("step", "iteration"), ("| threads | params |", "Full training")),
        ("update_cost", ("rows", "fits", "checks"), ("| update | N (M) |", "Growth exponent")),
        ("memory", ("rows",), ("| model | optimizer | phase |",)),
        ("peers", ("rows",), ("| threads | model | batch | variant |",)),
        ("compiled_step", ("rows",), ("| params | variant | ms |", "compiled wrapped")),
        ("inference", ("grid", "rows"), ("| threads | shape |", "| threads | model |")),
        ("export_size", ("rows",), ("| model | params (M) |",)),
        ("structured_inference", ("rows",), ("| threads | shape | sparsity | k |", "2:4")),
        (
            "sparse_training",
            ("layers", "parts", "models", "mask", "flips"),
            ("| threads | shape | sparsity | batch |", "Whole training steps", "| seed |"),
        ),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_run_prints_tables(script, keys, markers, tmp_path, capsys):
    out_file = tmp_path / f"{script}.json"
    result = _load(script).main(["--quick", "--json", str(out_file)])
    printed = capsys.readouterr().out
    for key in keys:
        assert result[key], f"{script}: empty {key!r}"
    for marker in markers:
        assert marker in printed
    assert "- command: `" in printed
    assert "torch " in printed
    saved = json.loads(out_file.read_text())
    assert saved["markdown"] == result["markdown"]
