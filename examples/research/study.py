"""The Sup-tickets study: when does the booster beat its base method? Paired over seeds.

For every cell (dataset, regime, method, sparsity, seed) it trains:

1. the **base** run: the sparse method alone for ``T`` steps, SGD with x0.1 at 1/2 and 3/4 of ``T``;
2. **phase 1** of Sup-tickets once (its length from ``SupTicketsScheduler.plan``, x0.1 at 1/2
   and 3/4 of phase 1), then checkpoints it right after the last phase-1 optimizer step;
3. every **phase-2 variant** of the grid from that checkpoint (exploration rate, rates, ticket 0,
   BatchNorm averaged or recomputed, re-prune, averaging rule), each loaded into freshly built
   objects, so that all variants of a cell share one phase 1 bit for bit (the resume is
   bit-exact, ``tests/test_suptickets_resume.py``) and differ only in what they change.

Each run is evaluated on the validation split (carved from the training data) and on the test
split. The report (``--report``) chooses on validation only and shows test only for the chosen
setting, the default and the official variant. For every variant it also records what explains
the result: the last live ticket and the phase-1 model (so superposed vs live and the cost of
the cycles are separate), the prediction disagreement and mask overlap between consecutive
tickets, and the accuracy along the line between the last two tickets (BatchNorm recomputed at
each point).

    python examples/research/study.py --regime short --out runs/study       # the main grid
    python examples/research/study.py --report runs/study/results.jsonl     # the tables
    python examples/research/study.py --regime short --tiny --out /tmp/s    # seconds (tests)

Results are appended to ``OUT/results.jsonl`` one line per run as they finish; a cell already
in the file is skipped, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from common import predict
from data import Split, fashion_mnist_split, mnist1d_split
from models import DigitsCNN, SignalCNN
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.metrics import mask_churn, prediction_disagreement

# --- the grid -------------------------------------------------------------------------------------
# regime -> training length and batch. C is the cycle in steps; the scheduler splits the run into
# phase 1 and M tickets (SupTicketsScheduler.plan).
# Phase 1 "compressed" (the paper's protocol, the default): its x0.1 milestones at 1/2 and 3/4 of
# phase 1. "shared": at 1/2 and 3/4 of T, the base run's own; phase 1 is then the base run's first
# P steps bit for bit, the base run is continued from the same checkpoint, and the paired
# difference measures phase 2 alone (the cycles and the superposition against the last 10% at the
# base's final rate).
REGIMES: dict[str, dict[str, Any]] = {
    # the issue's MNIST-1D setting: 4-epoch cycles of 100 steps (batch 128, 25 steps an epoch)
    "short": {"data": "mnist1d", "batch": 128, "epochs": 120, "cycle_epochs": 4, "fraction": 0.1},
    # the same epochs at batch 32: cycles of 400 steps
    "long": {"data": "mnist1d", "batch": 32, "epochs": 120, "cycle_epochs": 4, "fraction": 0.1},
    # "short" with the base method's own schedule in phase 1 ("shared", below)
    "short-shared": {
        "data": "mnist1d", "batch": 128, "epochs": 120, "cycle_epochs": 4, "fraction": 0.1,
        "phase1": "shared",
    },
    # a wider model (65k weights) on 3x the data: 120 steps an epoch, 3 cycles of 240 steps
    "wide": {
        "data": "mnist1d", "samples": 15000, "width": 96, "batch": 64, "epochs": 50,
        "cycle_epochs": 2, "fraction": 0.12, "phase1": "shared",
    },
    # Fashion-MNIST, batch 128 (390 steps an epoch): 2 cycles of 390 steps in the last 20%
    "fashion": {
        "data": "fashion", "width": 8, "batch": 128, "epochs": 10, "cycle_epochs": 1,
        "fraction": 0.2,
    },
}  # fmt: skip

PAPER = {"explore_rate": 0.5, "lr_high": 0.005}  # SupTicketsScheduler's defaults (the paper's)
OFFICIAL = {"include_phase1": True, "bn": "recompute", "reprune": "global"}

# variant -> options that differ from the defaults (explore 0.5, 0.001 -> 0.005, CIA, layer,
# BatchNorm averaged, no ticket 0)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "explore0.25": {"explore_rate": 0.25},
    "explore0.1": {"explore_rate": 0.1},
    "explore0": {"explore_rate": 0.0},
    "official": dict(OFFICIAL),
    "official-explore0.1": {**OFFICIAL, "explore_rate": 0.1},
    "official-explore0": {**OFFICIAL, "explore_rate": 0.0},
    "ticket0-explore0.1": {"include_phase1": True, "explore_rate": 0.1},
    "bnrecompute-explore0.1": {"bn": "recompute", "explore_rate": 0.1},
    "global-explore0.1": {"reprune": "global", "explore_rate": 0.1},
    "caa": {"averaging": "caa"},
    "cima-explore0.1": {"averaging": "cima", "explore_rate": 0.1},
    "high0.02-explore0.1": {"lr_high": 0.02, "explore_rate": 0.1},
    "high0.02-explore0-bn": {"lr_high": 0.02, "explore_rate": 0.0, "bn": "recompute"},
    "high0.05-explore0-bn": {"lr_high": 0.05, "explore_rate": 0.0, "bn": "recompute"},
    "high0.05-explore0.1-bn": {"lr_high": 0.05, "explore_rate": 0.1, "bn": "recompute"},
    "official-high0.02": {**OFFICIAL, "lr_high": 0.02},
}
# the same settings with twice the tickets (fraction 0.2: another phase 1)
MORE_TICKETS = {
    "tickets2x-default": "default",
    "tickets2x-high0.02-explore0-bn": "high0.02-explore0-bn",
}

LR, MOMENTUM, WEIGHT_DECAY, LR_LOW = 0.1, 0.9, 5e-4, 0.001
COUNTERS = ("last_epoch", "_step_count", "_last_lr", "base", "_get_lr_called_within_step")


# --- data and models ------------------------------------------------------------------------------
def load(data: str, tiny: bool = False, samples: int = 5000) -> Split:
    if data == "mnist1d":
        return mnist1d_split(1000 if tiny else samples)
    split = fashion_mnist_split()
    if tiny:
        split = Split(*(t[:512] for t in vars(split).values()))
    return split


def make_model(data: str, seed: int, width: int | None = None) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights for every run of a seed
    if data == "mnist1d":
        return SignalCNN(width=width or 32)
    return DigitsCNN(width=width or 16)


def batches(x: Tensor, y: Tensor, size: int = 512) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def logits_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Eval-mode logits in chunks of 1,024 (``common.predict``; the mode is restored)."""
    return predict(model, batches(x, y, 1024))[0]


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).double().mean().item()


# --- one cell -------------------------------------------------------------------------------------
class Cell:
    """Data, schedule and loop shared by the runs of one (regime, method, sparsity, seed)."""

    def __init__(self, job: dict[str, Any], split: Split) -> None:
        self.job = job
        self.split = split
        regime = REGIMES[job["regime"]]
        self.batch = regime["batch"] if not job["tiny"] else 64
        self.per_epoch = len(split.y_train) // self.batch  # full batches only
        epochs = regime["epochs"] if not job["tiny"] else 10
        self.total = epochs * self.per_epoch
        self.cycle = (regime["cycle_epochs"] if not job["tiny"] else 1) * self.per_epoch
        self.fraction = regime["fraction"] if not job["tiny"] else 0.2
        self.update_every = job["update_every"] or 2 * self.per_epoch
        self.shared = regime.get("phase1", "compressed") == "shared"
        order_gen = torch.Generator().manual_seed(1000 + job["seed"])
        self.orders = [
            torch.randperm(len(split.y_train), generator=order_gen) for _ in range(epochs)
        ]
        # BatchNorm recomputation: one pass over the training data, as the official code does
        self.bn_batches = [x for x, _ in batches(split.x_train, split.y_train, 128)]

    def batch_at(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch of optimizer step ``step`` (1-based): the same in every run of the cell."""
        epoch, i = divmod(step - 1, self.per_epoch)
        idx = self.orders[epoch][i * self.batch : (i + 1) * self.batch]
        return self.split.x_train[idx], self.split.y_train[idx]

    def build(self, fraction: float | None, options: dict[str, Any] | None = None):
        """Model, optimizer and scheduler(s): with Sup-tickets when ``fraction`` is given."""
        job = self.job
        model = make_model(job["data"], job["seed"], REGIMES[job["regime"]].get("width"))
        inner = torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        opt = SparseOptimizer(
            inner,
            job["method"],
            job["sparsity"],
            update_every=self.update_every,
            total_steps=self.total,
            model=model,
            seed=job["seed"],
        )
        if fraction is None:
            base = torch.optim.lr_scheduler.MultiStepLR(
                opt, [self.total // 2, 3 * self.total // 4], 0.1
            )
            return model, opt, base

        def base(opt: SparseOptimizer, phase1: int) -> torch.optim.lr_scheduler.MultiStepLR:
            length = self.total if self.shared else phase1
            return torch.optim.lr_scheduler.MultiStepLR(opt, [length // 2, 3 * length // 4], 0.1)

        o = dict(options or {})
        bn = o.pop("bn", "average")
        sched = SupTicketsScheduler(
            opt,
            self.total,
            self.cycle,
            base=base,
            superpose_fraction=fraction,
            lr_low=LR_LOW,
            bn_update=self.bn_batches if bn == "recompute" else None,
            **o,
        )
        return model, opt, sched

    def phase1_checkpoint(self, fraction: float) -> tuple[nn.Module, dict[str, Any]]:
        """Phase 1 of Sup-tickets, checkpointed right after its last ``opt.step()``.

        The checkpoint is taken before that step's ``sched.step()``, which ends phase 1 (ticket
        0, the first exploration): what it does depends on the phase-2 options, so each branch
        runs it with its own. Returns the model and ``{"model", "opt", "sched"}``.
        """
        model, opt, sched = self.build(fraction, {})
        phase1 = sched.phase1_steps
        self.train(model, opt, sched, 1, phase1 - 1)
        x, y = self.batch_at(phase1)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return model, {
            "model": state_of(model),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        }

    def branch(self, ckpt: dict[str, Any], fraction: float, options: dict[str, Any]):
        """Fresh objects with the phase-2 ``options``, loaded from a phase-1 checkpoint.

        The scheduler keeps its own options; only the counters come from the checkpoint. The
        caller steps the scheduler once (the end of phase 1), then trains phase 2.

        Every branch loads a deep copy: ``Optimizer.load_state_dict`` keeps the checkpoint's
        tensors (the momentum buffers) as its state, so without the copy a branch's steps would
        update the checkpoint in place and the next branch would start from this one's end.
        """
        ckpt = deepcopy(ckpt)
        model, opt, sched = self.build(fraction, options)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        counters = {k: v for k, v in ckpt["sched"].items() if k in COUNTERS}
        sched.load_state_dict({**sched.state_dict(), **counters})
        return model, opt, sched

    def run_branch(
        self, ckpt: dict[str, Any], fraction: float, options: dict[str, Any], on_step=None
    ):
        """Phase 2 of one variant from a phase-1 checkpoint, to the end: model, opt, scheduler.

        ``on_step(step, model, opt, sched)`` runs right after each ``opt.step()``.
        """
        model, opt, sched = self.branch(ckpt, fraction, options)
        hook = None if on_step is None else (lambda step: on_step(step, model, opt, sched))
        sched.step()  # the end of phase 1: ticket 0 if asked, the first exploration
        self.train(model, opt, sched, ckpt["sched"]["phase1_steps"] + 1, self.total, hook)
        return model, opt, sched

    def train(self, model, opt, sched, start: int, stop: int, on_step=None) -> None:
        """Optimizer steps ``start..stop``; ``on_step(step)`` right after each ``opt.step()``."""
        for step in range(start, stop + 1):
            x, y = self.batch_at(step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step)
            sched.step()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        s = self.split
        return {
            "val": accuracy(logits_of(model, s.x_val, s.y_val), s.y_val),
            "test": accuracy(logits_of(model, s.x_test, s.y_test), s.y_test),
        }


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def line_accuracy(
    cell: Cell, model: nn.Module, a: dict[str, Tensor], b: dict[str, Tensor], alphas: Iterable
) -> list[float]:
    """Validation accuracy of ``(1 - alpha) * a + alpha * b`` (unpruned), BatchNorm recomputed."""
    out = []
    saved = state_of(model)
    for alpha in alphas:
        model.load_state_dict(
            {k: v.lerp(b[k], alpha) if v.is_floating_point() else v for k, v in a.items()}
        )
        update_bn(cell.bn_batches, model)
        out.append(accuracy(logits_of(model, cell.split.x_val, cell.split.y_val), cell.split.y_val))
    model.load_state_dict(saved)
    return out


def continue_base(cell: Cell, ckpt: dict[str, Any]):
    """The base run from a shared phase-1 checkpoint: its MultiStepLR is the scheduler's base.

    It loads a deep copy of the checkpoint, as every branch does (``Cell.branch``).
    """
    ckpt = deepcopy(ckpt)
    model, opt, base = cell.build(None)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    base.load_state_dict(ckpt["sched"]["base"])
    phase1 = ckpt["sched"]["phase1_steps"]
    base.step()
    cell.train(model, opt, base, phase1 + 1, cell.total)
    return model, opt, base


def run_cell(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of one cell; one record per run."""
    torch.set_num_threads(1)
    split = load(job["data"], job["tiny"], REGIMES[job["regime"]].get("samples", 5000))
    cell = Cell(job, split)
    key = {k: job[k] for k in ("data", "regime", "method", "sparsity", "seed")}
    records = []
    start = time.perf_counter()

    base_acc: dict[str, float] | None = None
    if not cell.shared:
        model, opt, base = cell.build(None)
        cell.train(model, opt, base, 1, cell.total)
        base_acc = cell.evaluate(model)
        records.append(
            {**key, "variant": "base", "acc": base_acc, "seconds": time.perf_counter() - start}
        )

    groups: dict[float, dict[str, dict[str, Any]]] = defaultdict(dict)
    for name in job["variants"]:
        if name in MORE_TICKETS:
            groups[2 * cell.fraction][name] = VARIANTS[MORE_TICKETS[name]]
        else:
            groups[cell.fraction][name] = VARIANTS[name]
    for fraction, variants in groups.items():
        t0 = time.perf_counter()
        model, ckpt = cell.phase1_checkpoint(fraction)
        phase1_acc = cell.evaluate(model)
        if base_acc is None:  # shared: the base run continues from the same checkpoint
            t1 = time.perf_counter()
            model, opt, base = continue_base(cell, ckpt)
            base_acc = cell.evaluate(model)
            records.insert(
                0, {**key, "variant": "base", "acc": base_acc, "seconds": time.perf_counter() - t1}
            )
        phase1_seconds = time.perf_counter() - t0
        for name, options in variants.items():
            t1 = time.perf_counter()
            tickets: list[dict[str, Any]] = []

            def grab(step: int, model, opt, sched, tickets=tickets) -> None:
                if step in sched.ticket_steps:
                    tickets.append(
                        {
                            "state": state_of(model),
                            "masks": [m.clone() for m in opt.masks.values()],
                            "logits": logits_of(model, cell.split.x_val, cell.split.y_val),
                        }
                    )

            model, opt, _ = cell.run_branch(ckpt, fraction, options, on_step=grab)
            final = cell.evaluate(model)
            live_model = make_model(job["data"], job["seed"], REGIMES[job["regime"]].get("width"))
            live_model.load_state_dict(tickets[-1]["state"])
            live = cell.evaluate(live_model)
            pairs = list(itertools.pairwise(tickets))
            mech = {
                "disagreement": statistics.fmean(
                    prediction_disagreement(a["logits"], b["logits"]) for a, b in pairs
                )
                if pairs
                else None,
                "overlap": statistics.fmean(
                    1 - mask_churn(a["masks"], b["masks"]) for a, b in pairs
                )
                if pairs
                else None,
                "line": line_accuracy(
                    cell, live_model, tickets[-2]["state"], tickets[-1]["state"], (0.0, 0.5, 1.0)
                )
                if pairs and job["line"]
                else None,
            }
            records.append(
                {
                    **key,
                    "variant": name,
                    "fraction": fraction,
                    "tickets": opt.tickets,
                    "cycle_steps": cell.cycle,
                    "total_steps": cell.total,
                    "acc": final,
                    "live": live,
                    "phase1": phase1_acc,
                    "base": base_acc,
                    "mechanism": mech,
                    "density": opt.density,
                    "seconds": phase1_seconds / len(variants) + time.perf_counter() - t1,
                }
            )
    return records


# --- the report -----------------------------------------------------------------------------------
def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the two-sided 95% t interval."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t as student

    half = student.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def summarize(records: list[dict[str, Any]], split: str) -> dict[tuple, dict[str, Any]]:
    """Per (regime, method, sparsity, variant): paired differences to the base on ``split``."""
    base = {
        (r["regime"], r["method"], r["sparsity"], r["seed"]): r["acc"][split]
        for r in records
        if r["variant"] == "base"
    }
    rows: dict[tuple, dict[str, Any]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["variant"] == "base":
            continue
        k = (r["regime"], r["method"], r["sparsity"], r["variant"])
        b = base[(r["regime"], r["method"], r["sparsity"], r["seed"])]
        row = rows[k]
        row["seeds"].append(r["seed"])
        row["base"].append(100 * b)
        row["acc"].append(100 * r["acc"][split])
        row["diff"].append(100 * (r["acc"][split] - b))
        row["vs_live"].append(100 * (r["acc"][split] - r["live"][split]))
        row["vs_phase1"].append(100 * (r["live"][split] - r["phase1"][split]))
        m = r["mechanism"]
        for name in ("disagreement", "overlap"):
            if m[name] is not None:
                row[name].append(m[name])
        if m["line"]:
            row["line_mid"].append(100 * (m["line"][1] - max(m["line"][0], m["line"][2])))
    return rows


def _ms(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.2f} ± {std:.2f}"


def _paired(d: list[float]) -> str:
    """``mean ± std | [CI] | wins/n``: the cells of a paired difference."""
    _, lo, hi = t_interval(d)
    return f"{_ms(d)} | [{lo:+.2f}, {hi:+.2f}] | {sum(x > 0 for x in d)}/{len(d)}"


def _seeds(d: list[float]) -> str:
    return " ".join(f"{x:+.1f}" for x in d)


def decomposition(d: dict[str, list[float]], overlap: str = "{:.2f}") -> list[str]:
    """The cells of a "where the difference comes from" row from pooled per-pair lists: Sup −
    base, phase-1 model − base (the rest of the difference), live − phase-1 model, superposed −
    live, ticket disagreement, mask overlap (``overlap`` formats it), midpoint − best end."""

    def mean(name: str, fmt: str = "{:+.2f}") -> str:
        return fmt.format(statistics.fmean(d[name])) if d[name] else "–"

    phase1 = statistics.fmean(d["diff"]) - statistics.fmean(d["vs_live"])
    phase1 -= statistics.fmean(d["vs_phase1"])
    return [mean("diff"), f"{phase1:+.2f}", mean("vs_phase1"), mean("vs_live"),
            mean("disagreement", "{:.3f}"), mean("overlap", overlap), mean("line_mid")]  # fmt: skip


def print_report(path: str, out: str | None = None) -> str:
    """The tables of a study, as Markdown: validation, the choice on it, then test."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    lines = []
    emit = lines.append

    val = summarize(records, "val")
    emit("## Validation: Sup-tickets minus base, paired by seed (accuracy points)\n")
    emit(
        "| regime | method | sparsity | variant | base | diff mean ± std | 95% CI | wins | "
        "per-seed diffs | sup − live | live − phase 1 | disagree | overlap | mid − ends |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in sorted(val):
        row = val[k]

        def avg(name: str, fmt: str = "{:+.2f}", row=row) -> str:
            return fmt.format(statistics.fmean(row[name])) if row.get(name) else "–"

        emit(
            f"| {k[0]} | {k[1]} | {100 * k[2]:g}% | {k[3]} | {statistics.fmean(row['base']):.2f} "
            f"| {_paired(row['diff'])} | {_seeds(row['diff'])} | {avg('vs_live')} "
            f"| {avg('vs_phase1')} | {avg('disagreement', '{:.3f}')} | {avg('overlap', '{:.3f}')} "
            f"| {avg('line_mid')} |"
        )
    # where the difference comes from, per variant over every cell of the regime:
    # Sup - base = (phase-1 model - base) + (live - phase-1 model) + (superposed - live)
    emit("\n## Where the difference comes from (validation, mean over every cell of the regime)\n")
    emit(
        "| regime | variant | Sup − base | phase-1 model − base | live − phase-1 model "
        "| superposed − live | disagreement | mask overlap | midpoint − best end |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    pooled: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for k, row in val.items():
        for name in ("diff", "vs_live", "vs_phase1", "disagreement", "overlap", "line_mid"):
            pooled[(k[0], k[3])][name].extend(row.get(name, []))
    for (regime, variant), d in sorted(
        pooled.items(), key=lambda kv: -statistics.fmean(kv[1]["diff"])
    ):
        emit(f"| {regime} | {variant} | " + " | ".join(decomposition(d)) + " |")
    # choose on validation: the variant with the best mean paired difference over every cell of
    # the regime (all methods and sparsities), then show it, the default and the official on test
    by_variant: dict[tuple[str, str], list[float]] = defaultdict(list)
    for k, row in val.items():
        by_variant[(k[0], k[3])].extend(row["diff"])
    emit("\n## Choice on validation (mean paired difference over every cell of the regime)\n")
    emit("| regime | variant | diff mean ± std | 95% CI | wins |")
    emit("|---|---|---|---|---|")
    chosen: dict[str, str] = {}
    for (regime, variant), d in sorted(by_variant.items(), key=lambda kv: -statistics.fmean(kv[1])):
        emit(f"| {regime} | {variant} | {_paired(d)} |")
        chosen.setdefault(regime, variant)
    test = summarize(records, "test")
    emit("\n## Test (reported once): the variant chosen on validation, the default, the official\n")
    emit(
        "| regime | method | sparsity | variant | base | Sup-tickets | diff mean ± std | 95% CI "
        "| wins | per-seed diffs |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for k in sorted(test):
        if k[3] not in {chosen.get(k[0]), "default", "official"}:
            continue
        row = test[k]
        name = k[3] + (" (chosen)" if k[3] == chosen.get(k[0]) else "")
        emit(
            f"| {k[0]} | {k[1]} | {100 * k[2]:g}% | {name} | {_ms(row['base'])[1:]} "
            f"| {_ms(row['acc'])[1:]} | {_paired(row['diff'])} | {_seeds(row['diff'])} |"
        )
    emit("\n## Test, pooled over every cell of the regime\n")
    emit("| regime | variant | diff mean ± std | 95% CI | wins |")
    emit("|---|---|---|---|---|")
    pooled_test: dict[tuple[str, str], list[float]] = defaultdict(list)
    for k, row in test.items():
        if k[3] in {chosen.get(k[0]), "default", "official"}:
            pooled_test[(k[0], k[3])].extend(row["diff"])
    for (regime, variant), d in sorted(pooled_test.items()):
        name = variant + (" (chosen)" if variant == chosen.get(regime) else "")
        emit(f"| {regime} | {name} | {_paired(d)} |")
    text = "\n".join(lines)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


# --- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regime", choices=sorted(REGIMES), default="short")
    p.add_argument("--methods", nargs="+", default=["rigl", "set"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, *MORE_TICKETS])
    p.add_argument("--update-every", type=int, default=None, help="default: 2 epochs of steps")
    p.add_argument("--no-line", action="store_true", help="skip the interpolation measure")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a few hundred steps, for tests")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--report", metavar="JSONL", help="print the tables of a finished study")
    args = p.parse_args(argv)
    if args.report:
        print(print_report(args.report, os.path.splitext(args.report)[0] + ".md"))
        return
    unknown = set(args.variants) - set(VARIANTS) - set(MORE_TICKETS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {[*VARIANTS, *MORE_TICKETS]}")
    regime = REGIMES[args.regime]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done.add((r["regime"], r["method"], r["sparsity"], r["seed"]))
    jobs = []
    for method in args.methods:
        for sparsity in args.sparsities:
            for seed in args.seeds:
                if (args.regime, method, sparsity, seed) in done:
                    continue
                jobs.append(
                    {
                        "data": regime["data"],
                        "regime": args.regime,
                        "method": method,
                        "sparsity": sparsity,
                        "seed": seed,
                        "variants": args.variants,
                        "update_every": args.update_every,
                        "line": not args.no_line,
                        "tiny": args.tiny,
                    }
                )
    print(f"{len(jobs)} cells to run ({len(done)} done) into {path}", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool, open(path, "a") as f:
        futures = [pool.submit(run_cell, job) for job in jobs]
        for n, fut in enumerate(as_completed(futures), 1):
            records = fut.result()
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            r0 = records[0]
            print(
                f"[{n}/{len(jobs)} {time.perf_counter() - start:.0f}s] {r0['method']} "
                f"{r0['sparsity']} seed {r0['seed']}: base {100 * r0['acc']['val']:.2f}, "
                + ", ".join(
                    f"{r['variant']} {100 * (r['acc']['val'] - r0['acc']['val']):+.2f}"
                    for r in records[1:4]
                ),
                flush=True,
            )
    print(print_report(path, os.path.join(args.out, "results.md")))


if __name__ == "__main__":
    main()
