"""PyTorch Lightning and Hugging Face Accelerate: the examples train, end on the ultimate ticket.

Each run is a real ``Trainer.fit`` or an ``accelerator.prepare`` loop of ``examples/``
(``lightning_example.py``, ``accelerate_example.py``) on the bundled digits, a few dozen steps
long. At the end ``finalize()`` must have run exactly once, after the last optimizer step, and the
model must hold the superposed ticket at exactly the target count, with zeros elsewhere.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import mlp
from ranks import run_isolated

import sparseopt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import accelerate_example  # noqa: E402
import lightning_example  # noqa: E402

STEPS, CYCLE = 24, 4
ARGS = ["--steps", str(STEPS), "--cycle-steps", str(CYCLE), "--update-every", "5",
        "--superpose-fraction", "0.34", "--batch-size", "32"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def finalize_calls(monkeypatch):
    """Records ``opt.step_count`` at every ``finalize()``."""
    calls: list[int] = []
    real = sparseopt.SparseOptimizer.finalize

    def spy(self):
        calls.append(self.step_count)
        return real(self)

    monkeypatch.setattr(sparseopt.SparseOptimizer, "finalize", spy)
    return calls


def _assert_ultimate_ticket(opt, model, sparsity=0.9):
    assert opt.step_count == STEPS
    assert opt.tickets == 2  # floor(0.34 * 24 / 4)
    total = sum(layer.numel for layer in opt.layers)
    assert sum(layer.count for layer in opt.layers) == round((1 - sparsity) * total)
    for layer in opt.layers:
        assert layer.count == int(layer.mask.sum())
        assert bool((layer.param[~layer.mask] == 0).all()), layer.name
    # finalize() wrote the superposed copy into the model: swapping it in changes nothing
    live = [t.detach().clone() for t in model.state_dict().values()]
    with opt.superposed():
        swapped = [t.detach().clone() for t in model.state_dict().values()]
    for a, b in zip(live, swapped, strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`")  # Lightning internal
@pytest.mark.parametrize(
    ("precision", "accumulate"), [("32-true", 1), ("bf16-mixed", 1), ("32-true", 2)]
)
def test_lightning_trains_sparse_and_ends_on_the_ultimate_ticket(
    precision, accumulate, finalize_calls
):
    out = lightning_example.main([*ARGS, "--precision", precision, "--accumulate",
                                  str(accumulate)])  # fmt: skip
    opt, module, trainer = out["optimizer"], out["module"], out["trainer"]
    assert trainer.global_step == STEPS
    assert finalize_calls == [STEPS]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == STEPS
    _assert_ultimate_ticket(opt, module)


@pytest.mark.parametrize(("mixed_precision", "accumulate"), [("no", 1), ("bf16", 1), ("no", 2)])
def test_accelerate_trains_sparse_and_ends_on_the_ultimate_ticket(
    mixed_precision, accumulate, finalize_calls, fresh_accelerate_state
):
    out = accelerate_example.main([*ARGS, "--cpu", "--mixed-precision", mixed_precision,
                                   "--accumulate", str(accumulate)])  # fmt: skip
    opt, model = out["optimizer"], out["model"]
    assert out["scheduler"].last_epoch == STEPS
    assert finalize_calls == [STEPS]
    _assert_ultimate_ticket(opt, model)


def test_repeated_scheduler_calls_within_one_iteration_are_ignored():
    """What Accelerate does with N processes, in one process: N calls per optimizer step."""

    def run(calls_per_step):
        torch.manual_seed(0)
        model = mlp(8, 16, 4)
        opt = sparseopt.SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), "rigl",
                                        0.8, update_every=2, model=model, seed=0)  # fmt: skip
        sched = sparseopt.SupTicketsScheduler(opt, 12, 2, superpose_fraction=0.34,
                                              lr_low=0.01, lr_high=0.05)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        lrs = []
        for _ in range(12):
            opt.zero_grad()
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            for _ in range(calls_per_step):
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return opt, sched, lrs

    once, twice = run(1), run(2)
    assert twice[1].last_epoch == once[1].last_epoch == 12
    assert twice[2] == once[2]
    assert twice[0].tickets == once[0].tickets == 2
    for a, b in zip(once[0].masks.values(), twice[0].masks.values(), strict=True):
        assert torch.equal(a, b)


def test_accelerate_two_processes_step_sup_tickets_once_per_optimizer_step(tmp_path):
    """Accelerate steps the scheduler once per process per optimizer step; repeats are ignored."""
    run_isolated(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, str(tmp_path)],
        cwd=Path(__file__).parent, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for r in (r0, r1):
        assert r["num_processes"] == 2
        assert r["step_count"] == r["last_epoch"] == STEPS
        assert r["finalized"] == [STEPS]
        assert r["tickets"] == 2
        assert r["nnz"] == r["target"]
    for a, b in zip(r0["masks"] + r0["params"], r1["masks"] + r1["params"], strict=True):
        assert torch.equal(a, b)


def _rank_main(out: str) -> None:
    """One torchrun process: train, save, then leave together (see ``ranks.py`` on teardown)."""
    from accelerate import PartialState

    torch.set_num_threads(1)
    _train_and_save(out)
    gc.collect()  # the prepared (DDP) model held the process group
    PartialState().wait_for_everyone()
    torch.distributed.destroy_process_group()


def _train_and_save(out: str) -> None:
    finalized: list[int] = []
    real = sparseopt.SparseOptimizer.finalize

    def spy(self):
        finalized.append(self.step_count)
        return real(self)

    sparseopt.SparseOptimizer.finalize = spy
    result = accelerate_example.main([*ARGS, "--cpu"])
    from accelerate import PartialState

    state = PartialState()
    opt = result["optimizer"]
    total = sum(layer.numel for layer in opt.layers)
    torch.save(
        {
            "num_processes": state.num_processes,
            "step_count": opt.step_count,
            "last_epoch": result["scheduler"].last_epoch,
            "finalized": finalized,
            "tickets": opt.tickets,
            "nnz": sum(int(layer.mask.sum()) for layer in opt.layers),
            "target": round(0.1 * total),
            "masks": [layer.mask for layer in opt.layers],
            "params": [p.detach() for p in result["model"].parameters()],
        },
        f"{out}/rank{state.process_index}.pt",
    )


if __name__ == "__main__":
    _rank_main(sys.argv[1])
