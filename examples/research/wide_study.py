"""The Sup-tickets booster in the wide-sparse regime: SET-MLP on Fashion-MNIST, sparse kernels.

The model is the SET paper's MLP, 784-1000-1000-1000-10 (``set_mlp.SetMLP``: ReLU, dropout 0.3),
its three hidden weight matrices sparse (ERK; 95% leaves 139k active weights, 90% 278k), the
classifier dense; it trains on ``sparseopt.sparse_kernels`` (the hidden layers on CSR, the same
masks as masked-dense training, 2.6-3x faster a step here). The protocol is the booster paper's:
SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, x0.1 at 1/2 and 3/4 of the run, cycles of at
least 1,000 steps. Two deviations, both stated in ``docs/study/wide-mlp.md``: the run is 40 epochs
and phase 2 is its last 20% (3 cycles of 1,040 steps), to fit a 2-core CPU; and each sparse
layer's initial weights are scaled by ``1 / sqrt(density)`` (a dense layer's output scale), since
the SET paper's masked Glorot init starts a 95%-sparse network 20x too small a layer.

For every cell (method, sparsity, seed; paired: the same initial weights, masks, batches and
dropout masks in every run of a seed) it trains:

1. **phase 1 "shared"** (x0.1 at 1/2 and 3/4 of the *whole* run: the base run's own first ``P``
   steps), checkpointed after its last optimizer step; from a deep copy of it the **base** run
   continues to the end, and the **recommended** preset (``SupTicketsScheduler.recommended`` with
   ``select=`` the validation accuracy: the greedy soup) runs phase 2;
2. **phase 1 "paper"** (x0.1 at 1/2 and 3/4 of phase 1, the paper's protocol), checkpointed; from
   a deep copy each of the paper's **default** (exploration 0.5, rates 1/100 -> 1/20 of the peak),
   the **official** variant, and **exploration 0 / 0.1 / 0.25** runs phase 2.

Every phase-2 variant of a cell therefore differs from the others only in phase 2
(``study.Cell.branch``). Each run records validation and test accuracy of the ultimate ticket, of
the last live ticket and of the phase-1 model, and the mechanism: prediction disagreement and
mask overlap of consecutive tickets, and the accuracy at the midpoint of the last two tickets.
The report (``--report``) chooses on validation and shows test once. A dense reference
(``--methods dense``) trains the same schedule on the dense path.

    python examples/research/wide_study.py --time                       # ms per step
    python examples/research/wide_study.py --methods dense rigl set --seeds 0 1 2 3 4 \\
        --out runs/wide-mlp                                             # the grid (hours)
    python examples/research/wide_study.py --report runs/wide-mlp/results.jsonl
    python examples/research/wide_study.py --demo --out runs/demo-wide  # make demo-wide (~5 min)
    python examples/research/wide_study.py --demo --quick --out /tmp/w  # seconds (tests)

Results are appended to ``OUT/results.jsonl``, one cell at a time; a finished cell is skipped, so
a stopped grid resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from data import Split
from set_mlp import HIDDEN, SetMLP, fashion_flat, median_step_seconds
from study import COUNTERS, _ms, _paired, _seeds, decomposition, summarize
from torch import Tensor, nn

from sparseopt import SparseOptimizer, SupTicketsScheduler, sparse_kernels
from sparseopt.metrics import mask_churn, prediction_disagreement

REGIME = "fashion-mlp"
# The grid's protocol: 40 epochs of 390 steps (50,000 images at batch 128), 3 cycles of 1,040
# steps in the last 20%. The demo's: 22 epochs, 2 cycles of 1,040 steps (the last 24%), so that
# the shared phase 1 ends after the base run's second x0.1 (at 3/4 of the run), at lr_low.
PROTOCOL: dict[str, Any] = {
    "epochs": 40, "cycle_steps": 1040, "tickets": 3, "batch": 128, "lr": 0.1, "momentum": 0.9,
    "weight_decay": 5e-4, "dropout": 0.3, "update_every": 390, "hidden": list(HIDDEN),
    "layout": "auto", "sparse_init": True,
}  # fmt: skip
DEMO = {**PROTOCOL, "epochs": 22, "tickets": 2}
QUICK = {**PROTOCOL, "epochs": 6, "cycle_steps": 9, "tickets": 2, "batch": 32, "hidden": [64] * 3,
         "update_every": 6, "layout": "csr"}  # fmt: skip

# phase-2 variants: (phase 1, options). "paper": x0.1 at 1/2 and 3/4 of phase 1; "shared": of the
# whole run. Rates left out are relative to the phase-1 peak (1/100 and 1/20: 0.001 -> 0.005 at
# SGD 0.1). "preset" builds SupTicketsScheduler.official / .recommended (select= on validation).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("paper", {}),
    "official": ("paper", {"preset": "official"}),
    "explore0": ("paper", {"explore_rate": 0.0}),
    "explore0.1": ("paper", {"explore_rate": 0.1}),
    "explore0.25": ("paper", {"explore_rate": 0.25}),
    "recommended": ("shared", {"preset": "recommended"}),
    # the preset before the study's branching fix changed it (docs/study/wide-mlp.md ran both)
    "recommended-explore0-high0.02": (
        "shared",
        {"preset": "recommended", "explore_rate": 0.0, "lr_high": 0.02},
    ),
}


def build(job: dict[str, Any], total: int):
    """The model (the same initial weights for every run of a seed), its optimizer (a
    ``SparseOptimizer`` over SGD, or the SGD itself for ``"dense"``) and the kernel handle."""
    c = job["config"]
    torch.manual_seed(job["seed"])
    model = SetMLP(hidden=tuple(c["hidden"]), dropout=c["dropout"])
    groups = [
        {"params": list(model.hidden.parameters())},
        {"params": list(model.classifier.parameters()), "sparse": False},  # dense, as SET's
    ]
    sgd = {"lr": c["lr"], "momentum": c["momentum"], "weight_decay": c["weight_decay"]}
    if job["method"] == "dense":
        for g in groups:
            g.pop("sparse", None)
        return model, torch.optim.SGD(groups, **sgd), None
    opt = SparseOptimizer(
        torch.optim.SGD(groups, **sgd),
        job["method"],
        job["sparsity"],
        update_every=c["update_every"],
        total_steps=total,
        model=model,
        seed=job["seed"],
    )
    if c["sparse_init"]:  # a dense layer's output scale: Glorot / sqrt(density)
        with torch.no_grad():
            for param, mask in opt.masks.items():
                param.mul_(1 / math.sqrt(mask.float().mean().item()))
    return model, opt, sparse_kernels(model, opt, layout=c["layout"])


# --- one cell -------------------------------------------------------------------------------------
class WideCell:
    """Data, schedule and loop shared by the runs of one (method, sparsity, seed)."""

    def __init__(self, job: dict[str, Any], split: Split) -> None:
        self.job, self.split = job, split
        c = self.config = job["config"]
        self.batch = c["batch"]
        self.per_epoch = len(split.y_train) // self.batch  # full batches only
        self.total = c["epochs"] * self.per_epoch
        self.cycle = c["cycle_steps"]
        self.fraction = c["tickets"] * self.cycle / self.total
        plan = SupTicketsScheduler.plan(self.total, self.cycle, self.fraction)
        if plan.tickets != c["tickets"]:
            raise ValueError(f"the protocol gives {plan.tickets} tickets, not {c['tickets']}")
        self.phase1 = plan.phase1_steps
        gen = torch.Generator().manual_seed(1000 + job["seed"])
        self.orders = [
            torch.randperm(len(split.y_train), generator=gen) for _ in range(c["epochs"])
        ]
        self.evaluator = SetMLP(hidden=tuple(c["hidden"]), dropout=c["dropout"])

    def batch_at(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch of optimizer step ``step`` (1-based): the same in every run of the cell."""
        epoch, i = divmod(step - 1, self.per_epoch)
        idx = self.orders[epoch][i * self.batch : (i + 1) * self.batch]
        return self.split.x_train[idx], self.split.y_train[idx]

    def milestones(self, length: int) -> list[int]:
        return [length // 2, 3 * length // 4]

    def build(self, phase1: str | None, options: dict[str, Any] | None = None):
        """Model, optimizer, scheduler and kernel handle: the base run when ``phase1`` is None."""
        model, opt, handle = build(self.job, self.total)
        if phase1 is None:
            base = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones(self.total), 0.1)
            return model, opt, base, handle
        return model, opt, self.scheduler(opt, phase1, dict(options or {})), handle

    def scheduler(self, opt: SparseOptimizer, phase1: str, o: dict[str, Any]):
        common = {"base": phase1, "superpose_fraction": self.fraction}
        preset = o.pop("preset", None)
        if preset == "official":
            return SupTicketsScheduler.official(opt, self.total, self.cycle, None, **common, **o)
        if preset == "recommended":
            return SupTicketsScheduler.recommended(
                opt, self.total, self.cycle, select=self.val_score, bn_update=None, **common, **o
            )
        return SupTicketsScheduler(opt, self.total, self.cycle, **common, **o)

    def train(self, model, opt, sched, start: int, stop: int, on_step=None) -> None:
        """Optimizer steps ``start..stop``; ``sched.step()`` after each (none when ``None``)."""
        for step in range(start, stop + 1):
            torch.manual_seed(1_000_003 * self.job["seed"] + step)  # dropout: same in every run
            x, y = self.batch_at(step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step)
            if sched is not None:
                sched.step()

    def checkpoint(self, phase1: str):
        """Phase 1 (``"paper"`` or ``"shared"``), after its last ``opt.step()``, before its
        ``sched.step()`` (which ends phase 1 as each branch's options say)."""
        model, opt, sched, handle = self.build(phase1, {})
        self.train(model, opt, sched, 1, self.phase1 - 1)
        self.train(model, opt, None, self.phase1, self.phase1)
        ckpt = {"model": state_of(model), "opt": opt.state_dict(), "sched": sched.state_dict()}
        acc = self.evaluate(state_of(model))
        report = None if handle is None else handle.report()
        return ckpt, acc, report

    def load(self, ckpt: dict[str, Any], phase1: str | None, options: dict[str, Any] | None):
        """Fresh objects loaded from a deep copy of a phase-1 checkpoint (``study.Cell.branch``:
        ``Optimizer.load_state_dict`` keeps the checkpoint's tensors, so without the copy a
        branch would train the next branch's starting point in place)."""
        ckpt = deepcopy(ckpt)
        model, opt, sched, handle = self.build(phase1, options)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if phase1 is None:
            sched.load_state_dict(ckpt["sched"]["base"])
        else:
            counters = {k: v for k, v in ckpt["sched"].items() if k in COUNTERS}
            sched.load_state_dict({**sched.state_dict(), **counters})
        return model, opt, sched, handle

    # --- evaluation: always on a plain model loaded with the weights (no kernels) ---------------
    @torch.no_grad()
    def logits(self, state: dict[str, Tensor], part: str) -> Tensor:
        self.evaluator.load_state_dict(state)
        self.evaluator.eval()
        x = getattr(self.split, f"x_{part}")
        return torch.cat([self.evaluator(x[i : i + 2000]) for i in range(0, len(x), 2000)])

    def accuracy(self, state: dict[str, Tensor], part: str) -> float:
        y = getattr(self.split, f"y_{part}")
        return (self.logits(state, part).argmax(-1) == y).double().mean().item()

    def evaluate(self, state: dict[str, Tensor]) -> dict[str, float]:
        return {"val": self.accuracy(state, "val"), "test": self.accuracy(state, "test")}

    def val_score(self, model: nn.Module) -> float:
        """``select=``: validation accuracy of the model as it is (read through a plain copy)."""
        return self.accuracy(state_of(model), "val")


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def kernel_summary(report) -> list[dict[str, Any]]:
    return [{k: row[k] for k in ("name", "layout", "reason")} for row in report or []]


def run_cell(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of one cell; one record per run (dense: one run)."""
    torch.set_num_threads(job.get("threads", 1))
    split = fashion_flat(job["quick"])
    cell = WideCell(job, split)
    key = {
        "regime": REGIME,
        "method": job["method"],
        "sparsity": job["sparsity"],
        "seed": job["seed"],
        "config": job["config"],
    }
    start = time.perf_counter()
    if job["method"] == "dense":
        model, opt, base, _ = cell.build(None)
        cell.train(model, opt, base, 1, cell.total)
        acc = cell.evaluate(state_of(model))
        return [{**key, "variant": "dense", "acc": acc, "seconds": time.perf_counter() - start}]

    records: list[dict[str, Any]] = []
    by_phase1: dict[str, list[str]] = defaultdict(list)
    for name in job["variants"]:
        by_phase1[VARIANTS[name][0]].append(name)
    by_phase1.setdefault("shared", [])  # the base run continues from the shared checkpoint
    base_acc: dict[str, float] = {}
    for phase1 in sorted(by_phase1, key=lambda p: p != "shared"):
        t0 = time.perf_counter()
        ckpt, phase1_acc, report = cell.checkpoint(phase1)
        seconds = time.perf_counter() - t0
        records.append(
            {**key, "variant": f"phase1-{phase1}", "acc": phase1_acc, "seconds": seconds,
             "kernels": kernel_summary(report)}
        )  # fmt: skip
        if phase1 == "shared":
            t1 = time.perf_counter()
            model, opt, base, handle = cell.load(ckpt, None, None)
            base.step()
            cell.train(model, opt, base, cell.phase1 + 1, cell.total)
            base_acc = cell.evaluate(state_of(model))
            records.append(
                {**key, "variant": "base", "acc": base_acc, "density": opt.density,
                 "active": sum(int(m.sum()) for m in opt.masks.values()),
                 "seconds": seconds + time.perf_counter() - t1,
                 "kernels": kernel_summary(handle.report())}
            )  # fmt: skip
            handle.remove()
        for name in by_phase1[phase1]:
            t1 = time.perf_counter()
            records.append(run_variant(cell, ckpt, name, phase1_acc, key))
            records[-1]["seconds"] = time.perf_counter() - t1
    for r in records:
        if r["variant"] in VARIANTS:
            r["base"] = base_acc
    return records


def run_variant(cell: WideCell, ckpt, name: str, phase1_acc, key) -> dict[str, Any]:
    """Phase 2 of one variant from its phase-1 checkpoint: the record with the mechanism."""
    phase1, options = VARIANTS[name]
    model, opt, sched, handle = cell.load(ckpt, phase1, options)
    tickets: list[dict[str, Any]] = []

    def grab(step: int) -> None:
        if step in sched.ticket_steps:
            state = state_of(model)
            tickets.append(
                {
                    "state": state,
                    "masks": [m.clone() for m in opt.masks.values()],
                    "logits": cell.logits(state, "val"),
                }
            )

    sched.step()  # the end of phase 1: ticket 0 if asked, the first exploration
    cell.train(model, opt, sched, cell.phase1 + 1, cell.total, grab)
    final = cell.evaluate(state_of(model))
    live = cell.evaluate(tickets[-1]["state"])
    y_val = cell.split.y_val
    pairs = list(itertools.pairwise(tickets))
    line = None
    if pairs:
        a, b = tickets[-2], tickets[-1]
        mid = {k: (v + b["state"][k]) / 2 for k, v in a["state"].items()}
        line = [
            (a["logits"].argmax(-1) == y_val).double().mean().item(),
            cell.accuracy(mid, "val"),
            (b["logits"].argmax(-1) == y_val).double().mean().item(),
        ]
    mech = {
        "disagreement": statistics.fmean(
            prediction_disagreement(a["logits"], b["logits"]) for a, b in pairs
        )
        if pairs
        else None,
        "overlap": statistics.fmean(1 - mask_churn(a["masks"], b["masks"]) for a, b in pairs)
        if pairs
        else None,
        "line": line,
    }
    view = opt.superposition
    record = {
        **key,
        "variant": name,
        "phase1_kind": phase1,
        "fraction": cell.fraction,
        "tickets": opt.tickets,
        "cycle_steps": cell.cycle,
        "total_steps": cell.total,
        "acc": final,
        "live": live,
        "phase1": phase1_acc,
        "mechanism": mech,
        "density": opt.density,
        "chosen": view.chosen if view is not None else None,
        "scores": dict(view.scores) if view is not None else {},
        "kernels": kernel_summary(handle.report()),
    }
    handle.remove()
    return record


# --- the report -----------------------------------------------------------------------------------
def read(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def t_ci(values: list[float]) -> str:
    from study import t_interval

    _, lo, hi = t_interval(values)
    return f"[{lo:+.2f}, {hi:+.2f}]"


def report(path: str, out: str | None = None) -> str:
    """The tables: accuracy and the gap to dense; validation; the decomposition; the choice on
    validation; test once (the chosen variant, the default, the official, the recommended)."""
    records = read(path)
    lines: list[str] = []
    emit = lines.append
    dense = {r["seed"]: r["acc"] for r in records if r["variant"] == "dense"}
    bases = [r for r in records if r["variant"] == "base"]
    emit("## Accuracy of the base runs, and the gap to dense (paired by seed)\n")
    emit(
        "| method | sparsity | active hidden weights | seeds | val | test "
        "| test − dense | per seed |"
    )
    emit("|---|---|---|---|---|---|---|---|")
    if dense:
        val = [100 * a["val"] for a in dense.values()]
        test = [100 * a["test"] for a in dense.values()]
        hidden = next(r for r in records if r["variant"] == "dense")["config"]["hidden"]
        n = sum(a * b for a, b in itertools.pairwise([784, *hidden]))  # the hidden weights
        emit(f"| dense | 0% | {n:,} | {len(dense)} | {_ms(val)[1:]} | {_ms(test)[1:]} | – | – |")
    cells = sorted({(r["method"], r["sparsity"]) for r in bases})
    for method, sparsity in cells:
        rs = sorted((r for r in bases if (r["method"], r["sparsity"]) == (method, sparsity)),
                    key=lambda r: r["seed"])  # fmt: skip
        val = [100 * r["acc"]["val"] for r in rs]
        test = [100 * r["acc"]["test"] for r in rs]
        gap = [
            100 * (r["acc"]["test"] - dense[r["seed"]]["test"]) for r in rs if r["seed"] in dense
        ]
        emit(
            f"| {method} | {100 * sparsity:g}% | {rs[0]['active']:,} | {len(rs)} | {_ms(val)[1:]} "
            f"| {_ms(test)[1:]} | {_ms(gap) if gap else '–'} | {_seeds(gap) if gap else '–'} |"
        )
    sup = [r for r in records if r["variant"] in VARIANTS or r["variant"] == "base"]
    val = summarize(sup, "val")
    emit("\n## Validation: variant minus base, paired by seed (accuracy points)\n")
    emit(
        "| method | sparsity | variant | base | diff mean ± std | 95% CI | wins | per-seed diffs |"
    )
    emit("|---|---|---|---|---|---|---|---|")
    for k in sorted(val):
        row = val[k]
        emit(
            f"| {k[1]} | {100 * k[2]:g}% | {k[3]} | {statistics.fmean(row['base']):.2f} "
            f"| {_paired(row['diff'])} | {_seeds(row['diff'])} |"
        )
    emit("\n## Where the difference comes from (validation, mean over the cells and seeds)\n")
    emit(
        "| variant | phase 1 | Sup − base | phase-1 model − base | live − phase-1 model "
        "| superposed − live | ticket disagreement | mask overlap | midpoint − best end |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    pooled: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for k, row in val.items():
        for name in ("diff", "vs_live", "vs_phase1", "disagreement", "overlap", "line_mid"):
            pooled[k[3]][name].extend(row.get(name, []))
    for variant, d in sorted(pooled.items(), key=lambda kv: -statistics.fmean(kv[1]["diff"])):
        cells = decomposition(d, overlap="{:.3f}")
        emit(f"| {variant} | {VARIANTS[variant][0]} | " + " | ".join(cells) + " |")
    chosen_names = [r["chosen"] for r in records if r["variant"] == "recommended"]
    if chosen_names:
        counts = ", ".join(
            f"{name} {chosen_names.count(name)}" for name in sorted(set(chosen_names))
        )
        emit(f"\n`select=` chose (recommended, {len(chosen_names)} runs): {counts}.")
        gains = defaultdict(list)
        for r in records:
            if r["variant"] == "recommended" and r["scores"]:
                best_single = max(v for n, v in r["scores"].items() if n.startswith("ticket"))
                for name, v in r["scores"].items():
                    if not name.startswith("ticket"):
                        gains[name].append(100 * (v - best_single))
        for name, g in sorted(gains.items()):
            emit(f"Validation score of `{name}` minus the best single ticket: {_ms(g)}.")
    by_variant: dict[str, list[float]] = defaultdict(list)
    for k, row in val.items():
        by_variant[k[3]].extend(row["diff"])
    emit("\n## Choice on validation (mean paired difference over every cell)\n")
    emit("| variant | diff mean ± std | 95% CI | wins |")
    emit("|---|---|---|---|")
    ranked = sorted(by_variant.items(), key=lambda kv: -statistics.fmean(kv[1]))
    for variant, d in ranked:
        emit(f"| {variant} | {_paired(d)} |")
    chosen = ranked[0][0] if ranked else None
    test = summarize(sup, "test")
    shown = {chosen, "default", "official", "recommended"}
    emit("\n## Test (reported once): the variant chosen on validation, default, official, "
         "recommended\n")  # fmt: skip
    emit("| method | sparsity | variant | base | Sup-tickets | diff mean ± std | 95% CI | wins "
         "| per-seed diffs |")  # fmt: skip
    emit("|---|---|---|---|---|---|---|---|---|")
    pooled_test: dict[str, list[float]] = defaultdict(list)
    for k in sorted(test):
        if k[3] not in shown:
            continue
        row = test[k]
        pooled_test[k[3]].extend(row["diff"])
        name = k[3] + (" (chosen)" if k[3] == chosen else "")
        emit(
            f"| {k[1]} | {100 * k[2]:g}% | {name} | {_ms(row['base'])[1:]} | {_ms(row['acc'])[1:]} "
            f"| {_paired(row['diff'])} | {_seeds(row['diff'])} |"
        )
    emit("\n## Test, pooled over every cell\n")
    emit("| variant | diff mean ± std | 95% CI | wins |")
    emit("|---|---|---|---|")
    for variant, d in sorted(pooled_test.items()):
        emit(f"| {variant + (' (chosen)' if variant == chosen else '')} | {_paired(d)} |")
    text = "\n".join(lines)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


# --- timing and main ------------------------------------------------------------------------------
def time_steps(config: dict[str, Any], steps: int = 40) -> dict[str, float]:
    """Median seconds per training step at the protocol's batch: dense, RigL and SET at 95% on
    the sparse kernels, on this process's threads."""
    x = torch.rand(config["batch"], 784)
    y = torch.randint(0, 10, (config["batch"],))
    out = {}
    for method in ("dense", "rigl", "set"):
        job = {"method": method, "sparsity": 0.95, "seed": 0, "config": config}
        model, opt, _ = build(job, 10**6)
        out[method] = median_step_seconds(model, opt, x, y, steps)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dense", "rigl", "set"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.95])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--dense-seeds", nargs="+", type=int, default=None, help="default: --seeds")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--workers", type=int, default=1, help="cells in parallel, one thread each")
    demo = "make demo-wide: RigL at 95%%, base vs recommended, 4 seeds, 2 workers"
    p.add_argument("--demo", action="store_true", help=demo)
    p.add_argument("--quick", action="store_true", help="a tiny grid, seconds (tests)")
    p.add_argument("--time", action="store_true", help="ms per training step, one thread")
    p.add_argument("--out", default="runs/wide-mlp")
    p.add_argument("--report", metavar="JSONL", help="print the tables of a finished grid")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report, os.path.splitext(args.report)[0] + ".md"))
        return
    config = dict(QUICK if args.quick else DEMO if args.demo else PROTOCOL)
    if args.epochs:
        config["epochs"] = args.epochs
    if args.time:
        torch.set_num_threads(1)
        t = time_steps(config)
        print(", ".join(f"{k} {1e3 * v:.1f} ms/step" for k, v in t.items()))
        return
    if args.demo:
        given = set(argv if argv is not None else sys.argv[1:])
        args.methods = args.methods if "--methods" in given else ["rigl"]
        args.seeds = args.seeds if "--seeds" in given else [0, 1, 2, 3]
        args.variants = args.variants if "--variants" in given else ["recommended"]
        args.workers = args.workers if "--workers" in given else 2
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    key = json.dumps(config, sort_keys=True)
    done = set()
    if os.path.exists(path):
        for r in read(path):
            if json.dumps(r["config"], sort_keys=True) == key:
                done.add((r["method"], r["sparsity"], r["seed"]))
    jobs = []
    dense_seeds = args.dense_seeds if args.dense_seeds is not None else args.seeds
    for seed in sorted(set(args.seeds) | set(dense_seeds)):  # seed by seed: partial grids pair
        for method in args.methods:
            for sparsity in [0.0] if method == "dense" else args.sparsities:
                if (method, sparsity, seed) in done:
                    continue
                if seed not in (dense_seeds if method == "dense" else args.seeds):
                    continue
                jobs.append(
                    {"method": method, "sparsity": sparsity, "seed": seed, "config": config,
                     "variants": args.variants, "quick": args.quick}
                )  # fmt: skip
    print(f"{len(jobs)} cells to run ({len(done)} done) into {path}", flush=True)
    start = time.perf_counter()

    def write(records: list[dict[str, Any]], n: int) -> None:
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        r0 = next(r for r in records if r["variant"] in ("base", "dense"))
        diffs = ", ".join(
            f"{r['variant']} {100 * (r['acc']['val'] - r0['acc']['val']):+.2f}"
            for r in records
            if r["variant"] in VARIANTS
        )
        print(
            f"[{n}/{len(jobs)} {time.perf_counter() - start:.0f}s] {r0['method']} "
            f"{r0['sparsity']} seed {r0['seed']}: {r0['variant']} val "
            f"{100 * r0['acc']['val']:.2f}" + (f"; val diffs {diffs}" if diffs else ""),
            flush=True,
        )

    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            for n, records in enumerate(pool.map(run_cell, jobs), 1):
                write(records, n)
    else:
        for n, job in enumerate(jobs, 1):
            write(run_cell(job), n)
    print(report(path, os.path.join(args.out, "results.md")))


if __name__ == "__main__":
    main()
