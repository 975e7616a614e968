"""The quickstart loop: sparse training with an LR scheduler, mixed precision, a checkpoint,
and the ultimate ticket of Sup-tickets. Runs on a GPU, or on the CPU in a few seconds:

    python examples/quickstart.py

`tests/test_docs_examples.py` runs it and checks that the resumed run is bit-identical to an
uninterrupted one and that the final model holds exactly the target count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP_DTYPE = torch.float16 if DEVICE == "cuda" else torch.bfloat16
TOTAL_STEPS, CYCLE_STEPS = 120, 6

# A synthetic 10-class problem, so that the example needs no download.
_g = torch.Generator().manual_seed(0)
CENTERS = 0.5 * torch.randn(10, 20, generator=_g)
TRAIN_Y = torch.randint(0, 10, (2048,), generator=_g)
TRAIN_X = CENTERS[TRAIN_Y] + torch.randn(2048, 20, generator=_g)
TEST_Y = torch.randint(0, 10, (512,), generator=_g)
TEST_X = CENTERS[TEST_Y] + torch.randn(512, 20, generator=_g)


def batch(step: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of optimizer step ``step``: a resumed run sees the same batches."""
    index = torch.randint(0, len(TRAIN_X), (size,), generator=torch.Generator().manual_seed(step))
    return TRAIN_X[index].to(DEVICE), TRAIN_Y[index].to(DEVICE)


@torch.no_grad()
def evaluate(model: nn.Module) -> float:
    model.eval()
    accuracy = (model(TEST_X.to(DEVICE)).argmax(1) == TEST_Y.to(DEVICE)).float().mean().item()
    model.train()
    return accuracy


# --8<-- [start:build]
def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 10),
    ).to(DEVICE)  # fmt: skip
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = SparseOptimizer(inner, "rigl", sparsity=0.9, model=model, update_every=10, seed=0)

    def base(opt, phase1_steps):  # phase 1: 0.1 -> 0.01 -> 0.001, per step; ends at lr_low
        milestones = [phase1_steps // 2, 3 * phase1_steps // 4]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)

    # Sup-tickets (optional): the last 20% of training becomes 4 cycles of 6 steps, 4 tickets;
    # the scheduler computes phase 1 (96 steps) and builds its base schedule with `base`.
    sched = SupTicketsScheduler(opt, TOTAL_STEPS, CYCLE_STEPS, superpose_fraction=0.2, base=base)
    scaler = torch.amp.GradScaler(DEVICE)
    return model, opt, sched, scaler


# --8<-- [end:build]


# --8<-- [start:train]
def train(model, opt, sched, scaler, start: int, stop: int) -> None:
    """Optimizer steps ``start + 1 ... stop``."""
    for step in range(start + 1, stop + 1):
        x, y = batch(step)
        with torch.autocast(DEVICE, dtype=AMP_DTYPE):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)  # skips opt.step() when the gradients are inf/NaN
        scaler.update()
        sched.step()  # after the optimizer step, once per step
        if step in sched.ticket_steps[:-1]:  # the superposed ticket, mid-training
            with opt.superposed():
                superposed = evaluate(model)
            print(f"step {step}: live {evaluate(model):.3f}, superposed {superposed:.3f}")


# --8<-- [end:train]


# --8<-- [start:checkpoint]
def save(path, model, opt, sched, scaler) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),  # masks, counters, generator, superposed copy
            "sched": sched.state_dict(),  # with the base scheduler's state inside
            "scaler": scaler.state_dict(),
        },
        path,
    )


def resume(path):
    model, opt, sched, scaler = build()  # everything as before, schedulers included
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    scaler.load_state_dict(ckpt["scaler"])
    return model, opt, sched, scaler


# --8<-- [end:checkpoint]


# --8<-- [start:main]
def main(path="checkpoint.pt", save_at=100):
    model, opt, sched, scaler = build()
    train(model, opt, sched, scaler, 0, save_at)  # step 100 is inside the first cycle
    save(path, model, opt, sched, scaler)

    model, opt, sched, scaler = resume(path)  # e.g. in a new process, after a preemption
    train(model, opt, sched, scaler, sched.last_epoch, TOTAL_STEPS)

    # The scheduler called opt.finalize() after the last step: the model is the ultimate ticket.
    print(f"ultimate ticket: accuracy {evaluate(model):.3f}, {opt.tickets} tickets")
    print(opt.report())
    return model, opt


# --8<-- [end:main]


if __name__ == "__main__":
    main()
