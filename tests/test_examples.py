"""The examples a user copies (``examples/*.py``): short, self-contained, runnable, and right.

Each is imported from its file and its ``main(["--quick"])`` runs in this process; one also runs
as a script in a fresh interpreter, from another folder, with the package importable the way an
installed one is. The Lightning and Accelerate examples run in ``test_integrations.py``, the
quickstart and the custom method in ``test_docs_examples.py``; the research harness under
``examples/research/`` in ``test_research.py``, ``test_study.py`` and ``test_lm_example.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NAMES = ["accelerate_example", "custom_method", "deploy", "hf_trainer", "lightning_example",
         "lm", "quickstart"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str):
    """``examples/<name>.py`` as a module, without touching ``sys.path``."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_ultimate_ticket(opt, sparsity):
    """``finalize()`` ran: exactly the target count in every layer, zeros elsewhere."""
    total = sum(layer.numel for layer in opt.layers)
    assert sum(layer.count for layer in opt.layers) == round((1 - sparsity) * total)
    for layer in opt.layers:
        assert layer.count == layer.target == int(layer.mask.sum()), layer.name
        assert bool((layer.param[~layer.mask] == 0).all()), layer.name


def test_the_examples_are_the_listed_short_scripts_on_the_installed_package():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == NAMES
    for name in NAMES:
        text = (EXAMPLES / f"{name}.py").read_text()
        assert len(text.splitlines()) <= 150, name
        assert re.search(r"^from sparseopt[ .]", text, re.MULTILINE), name
        assert 'if __name__ == "__main__":' in text, name
    # no example, research script included, changes sys.path: each imports the installed package
    # (a research script's siblings are found because its own folder is on sys.path)
    for path in EXAMPLES.rglob("*.py"):
        assert "sys.path" not in path.read_text(), path
    assert (EXAMPLES / "research" / "README.md").is_file()


def test_the_lightning_and_accelerate_examples_have_a_quick_setting():
    for name in ("lightning_example", "accelerate_example"):
        args = load(name).parse_args(["--quick"])
        assert (args.steps, args.cycle_steps, args.update_every) == (40, 4, 10), name


def test_a_script_runs_from_another_folder_on_the_package_alone(tmp_path):
    """What a user does: ``python examples/custom_method.py``. The checkout is on the path only
    as an installed package would be (``PYTHONPATH``), and the script reads and writes nothing
    next to itself."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_method.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert re.search(r"^total\s+1472\s+294\s", out, re.MULTILINE), out  # 80% of 1,472 weights


def test_lm_learns_and_ends_on_the_ultimate_ticket(capsys):
    out = load("lm").main(["--quick"])
    opt, sched = out["opt"], out["sched"]
    assert out["before"] == pytest.approx(8.0, abs=0.2)  # an untrained model: about uniform
    assert out["after"] < out["before"] - 1.0
    assert opt.step_count == sched.last_epoch == 30
    assert opt.tickets == 2 == len(sched.ticket_steps)  # floor(0.2 * 30 / 3) = 2
    names = [layer.name for layer in opt.layers]
    assert not any("tok" in n or "pos" in n or "norm" in n for n in names)  # dense, by the groups
    assert len(names) == 8  # in_proj, out_proj, linear1, linear2 of two blocks
    assert_ultimate_ticket(opt, 0.9)
    assert "validation bits per byte" in capsys.readouterr().out
    # the base factory got the scheduler's phase 1: its cosine reaches lr_low exactly there
    assert sched.phase1_steps == 30 - 2 * 3
    factor = sched.base.lr_lambdas[0]
    assert factor(sched.phase1_steps) == pytest.approx(3e-4 / 3e-3)
    assert factor(sched.phase1_steps // 2) > factor(sched.phase1_steps)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_hf_trainer_steps_once_per_optimizer_step_and_ends_on_the_ticket(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = load("hf_trainer").main(["--quick", "--out", str(tmp_path)])
    trainer, opt, sched = out["trainer"], out["opt"], out["sched"]
    assert trainer.state.global_step == opt.step_count == sched.last_epoch == 20
    assert opt.tickets == 2  # floor(0.2 * 20 / 2)
    assert_ultimate_ticket(opt, 0.9)
    assert not any(p.dtype != torch.float32 for p in out["model"].parameters())  # no bf16
    assert math.isfinite(out["eval_loss"])
    assert out["eval_loss"] < math.log(256)  # better than a uniform guess over bytes
    assert "validation loss of the ultimate ticket" in capsys.readouterr().out


def test_deploy_reloads_exactly_and_converts(capsys):
    out = load("deploy").main(["--quick"])
    opt = out["opt"]
    assert out["exact"]
    assert out["error"] < 1e-4
    assert out["file_bytes"] < 0.1 * out["dense_bytes"]  # 95% sparse: about 0.06x
    assert set(out["masks"]) == {layer.name for layer in opt.layers}
    for layer in opt.layers:
        assert torch.equal(out["masks"][layer.name], layer.mask)
    assert out["dense"] > 0
    assert out["sparse"] > 0
    assert set(out["converted"]) <= {"0", "2", "4"}
    assert "reloaded bit for bit: True" in capsys.readouterr().out


def test_the_docs_include_examples_that_exist():
    """Every ``--8<--`` include (pymdownx.snippets, ``base_path: .``) names a file and a section
    that exist, so ``mkdocs build --strict`` finds what the pages show."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = []
    for page in pages:
        blocks = re.findall(r"^--8<--\n(.*?)\n--8<--$", page.read_text(), re.MULTILINE | re.DOTALL)
        for line in "\n".join(blocks).splitlines():
            path, _, section = line.strip().partition(":")
            text = (ROOT / path).read_text()
            assert f"[start:{section}]" in text, (page.name, line)
            assert f"[end:{section}]" in text, (page.name, line)
            found.append(path)
    # the quickstart page shows its parts inline (tests/test_docs_examples.py checks the copy)
    assert set(found) == {"examples/custom_method.py"}
