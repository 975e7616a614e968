"""Draws docs/img/sup-tickets-lr.png: the learning rate that SupTicketsScheduler really sets.

.venv/bin/python docs/plot_schedule.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparseopt import SparseOptimizer, SupTicketsScheduler


def trace(total: int = 1000, cycle: int = 24, lr: float = 0.1):
    model = torch.nn.Linear(8, 8)
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr), "rigl", 0.5, seed=0, model=model
    )

    def base(opt, phase1):  # the paper's phase 1: x0.1 at 1/2 and 3/4 of it
        return torch.optim.lr_scheduler.MultiStepLR(opt, [phase1 // 2, 3 * phase1 // 4], 0.1)

    sched = SupTicketsScheduler(opt, total, cycle, base=base, lr_low=lr / 100, lr_high=lr / 20)
    lrs = []
    for _ in range(total):
        model(torch.randn(4, 8)).sum().backward()
        lrs.append(opt.param_groups[0]["lr"])  # the rate this step uses
        opt.step()
        opt.zero_grad()
        sched.step()
    return lrs, sched


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, sched = trace()
    steps = range(1, len(lrs) + 1)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, lo in ((ax0, 1), (ax1, sched.phase1_steps - 2 * sched.cycle_steps)):
        ax.plot(steps[lo - 1 :], lrs[lo - 1 :], lw=1.2)
        ticks = [s for s in sched.ticket_steps if s >= lo]
        ax.scatter(
            ticks,
            [lrs[s - 1] for s in ticks],
            color="tab:green",
            zorder=3,
            label="ticket (consolidate)",
        )
        ax.axvline(sched.phase1_steps + 0.5, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
    ax0.set_yscale("log")
    ax0.set_title("whole run: MultiStepLR, then M cycles (log scale)")
    ax1.set_title("phase 2: Eq. 3, tickets at the cycle ends")
    ax1.legend(loc="upper left")
    fig.tight_layout()
    out = Path(__file__).parent / "img" / "sup-tickets-lr.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
