"""The sparseopt demo: sparse training with and without Sup-tickets on MNIST-1D, on CPU.

A 1-D CNN with BatchNorm (``models.py: SignalCNN``, width 96: 65k weights) trains on MNIST-1D
(Greydanus 2020; 5,000 signals generated offline by the ``mnist1d`` package, split 3,200 train /
800 val / 1,000 test) as a grid: dense, and each of SET, RigL and GraNet at 90% sparsity with and
without Sup-tickets, over 3 seeds. The width is where sparse training is worth using: at 90% the
sparse methods come within about 2 points of dense (the pilot over widths in
docs/reproducing.md). Every run takes the same number of optimizer steps.

Sup-tickets is the recommended preset, ``SupTicketsScheduler.recommended(opt, T, C,
select=val_accuracy, bn_update=train_batches)``: ``select`` scores every candidate (the phase-1
model, the tickets, their greedy soup, the superposition) by its accuracy on the validation split,
carved from the training data, and the best one is the ultimate ticket. The table reports the test
split, on which no run selects anything (no early stopping, no best-epoch pick: the last model is
the result). ``--data digits`` (and ``--quick``) runs the UCI digits, ``--data fashion`` the real
Fashion-MNIST (``make demo-fashion``).

The preset's phase 1 keeps the run's own schedule (``base="shared"``), so a Sup-tickets run is,
for its first ``P`` steps, bit for bit the run without it: the demo trains that phase 1 once per
method and seed and continues the run without Sup-tickets from its checkpoint (``run_pair``;
``--no-share-phase1`` trains both from scratch, with the same results).

It prints one table (mean ± std over seeds of test accuracy, NLL and ECE; the final density; the
training and inference FLOPs relative to dense), the paired per-seed differences of Sup-tickets
minus the same method without it (and the candidate chosen in each seed), and writes
``results.json``, ``results.csv``, ``runs.csv`` and four plots into ``--out``:

- ``lr.png``: the learning rate over steps, with and without Sup-tickets, with the ticket points;
- ``accuracy.png``: test accuracy over steps: the live ticket, the superposed ticket (evaluated
  with ``opt.superposed()`` in phase 2), and the run without Sup-tickets;
- ``paired.png``: Sup-tickets minus base, per seed and mean ± std, per configuration;
- ``density.png``: the per-layer density of the final models.

    python examples/research/demo.py                  # the grid (make demo)
    python examples/research/demo.py --methods dense rigl --sparsities 0.9 0.95 --out runs/two
    python examples/research/demo.py --quick          # a reduced digits grid, for tests
    python examples/research/demo.py --eval-on val    # tune on the validation split

Hyper-parameters (defaults, MNIST-1D): 3,000 SGD steps of batch 128 (120 epochs) at lr 0.1
(momentum 0.9, weight decay 5e-4), x0.1 at 1/2 and 3/4 of training, for both arms; ERK; topology
updates every 50 steps, drop fraction 0.5 decayed by cosine to 0 at 75% of training; GraNet
starts at density 0.5 and reaches the target at 50% of training. Sup-tickets: 3 cycles of 100
steps in the last 10%, and the preset's setting, which the study chose on the validation split
(never on test): an exploration at rate 0.1 at each cycle start (the paper's: 0.5), rates
0.001 -> 0.05 -> 0.001 (half the peak instead of the paper's 1/20), CIA averaging, layer-wise
re-pruning, and the BatchNorm statistics recomputed over the training data. Each flag overrides
one setting; the paper's (``--explore-rate 0.5 --lr-high 0.005 --bn average --phase1 paper
--select none``) cost about 10 points in the study; see docs/sup-tickets.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch
import torch.nn.functional as F
from common import deploy, format_deploy, mean_std, metrics_from_logits, predict
from data import DATASETS, digits_split, fashion_mnist_split, mnist1d_split
from models import DigitsCNN, SignalCNN

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.distributions import exact_counts, layer_densities
from sparseopt.flops import TrainingFlops
from sparseopt.metrics import (
    InTimeOverParameterization,
    prediction_disagreement,
    prediction_kl,
)

METHODS = ("dense", "static", "set", "rigl", "granet", "gmp", "snip")
NAMES = {
    "dense": "Dense",
    "static": "Static",
    "set": "SET",
    "rigl": "RigL",
    "granet": "GraNet",
    "gmp": "GMP",
    "snip": "SNIP",
}
NUM_CLASSES = 10
# Per dataset: the defaults of the flags left out. MNIST-1D: 120 epochs of 25 steps (3,200
# training signals at batch 128), 4-epoch cycles. Fashion-MNIST: 10 epochs of 390 steps, 1-epoch
# cycles in the last 20% (two tickets of 390 steps), as in study.py's fashion regime.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {
        "steps": 3000, "batch_size": 128, "update_every": 50, "cycle_steps": 100,
        "eval_every": 100, "width": 96, "superpose_fraction": 0.1,
    },
    "digits": {
        "steps": 600, "batch_size": 64, "update_every": 50, "cycle_steps": 20, "eval_every": 25,
        "width": 16, "superpose_fraction": 0.1,
    },
    "fashion": {
        "steps": 3900, "batch_size": 128, "update_every": 780, "cycle_steps": 390,
        "eval_every": 390, "width": 8, "superpose_fraction": 0.2,
    },
}  # fmt: skip
QUICK = {"steps": 120, "update_every": 20, "cycle_steps": 6, "eval_every": 20}
FULL = DATA_DEFAULTS["digits"]


# --- one run --------------------------------------------------------------------------------------
def label(job: dict[str, Any]) -> str:
    """``"RigL 90% + Sup-tickets"``, ``"Dense"``."""
    if job["method"] == "dense":
        return NAMES["dense"]
    name = NAMES.get(job["method"], job["method"])
    if job.get("structure"):
        name += f" {job['structure']}"
    name += f" {100 * job['sparsity']:g}%"
    return name + (" + Sup-tickets" if job["sup"] else "")


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    logits, labels = predict(model, [(x, y)])
    return (logits.argmax(-1) == labels).double().mean().item()


def _carve(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int) -> tuple:
    """``(x_train, y_train, x_val, y_val)``: a fixed random ``fraction`` of ``(x, y)`` held out."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = round(fraction * len(y))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    return x[train], y[train], x[val], y[val]


def load_data(job: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The split of ``job``: train, the held-out part it reports on (test, or val with
    ``--eval-on val``), and the validation part that ``select=`` scores on.

    The validation part is always carved from the training data, never the reported split:
    MNIST-1D's and Fashion-MNIST's own val split (800 of MNIST-1D's 4,000 training signals), the
    digits' ``val_fraction`` of train; with ``--eval-on val`` it is carved once more from what is
    left for training. Without ``select=`` (``--select none``, or a grid without Sup-tickets) the
    digits train on their whole training part, and no validation part is returned.
    """
    select = job["select"] == "val"  # the grid's, the same data for every run of it
    if job["data"] in ("mnist1d", "fashion"):
        split = mnist1d_split() if job["data"] == "mnist1d" else fashion_mnist_split()
        x, y, x_val, y_val = split.x_train, split.y_train, split.x_val, split.y_val
        x_eval, y_eval = split.x_test, split.y_test
        if job["eval_on"] == "val":
            x_eval, y_eval = x_val, y_val
            x, y, x_val, y_val = _carve(x, y, job["val_fraction"], job["split_seed"])
    else:
        held_out = select or job["eval_on"] == "val"
        data = digits_split(
            seed=job["split_seed"],
            test_fraction=job["test_fraction"],
            val_fraction=job["val_fraction"] if held_out else 0.0,
        )
        x, y, x_val, y_val = data.x_train, data.y_train, data.x_val, data.y_val
        x_eval, y_eval = data.x_test, data.y_test
        if job["eval_on"] == "val":
            x_eval, y_eval = x_val, y_val
            if select:
                x, y, x_val, y_val = _carve(x, y, job["val_fraction"], job["split_seed"])
    out = {"x": x, "y": y, "x_eval": x_eval, "y_eval": y_eval}
    if select:
        out.update(x_val=x_val, y_val=y_val)
    return out


def make_model(job: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(job["seed"])  # the same initial weights for every method at a given seed
    if job["data"] == "mnist1d":
        return SignalCNN(width=job["width"])
    return DigitsCNN(width=job["width"])


def sup_tickets(
    job: dict[str, Any], opt: SparseOptimizer, data: dict[str, torch.Tensor]
) -> SupTicketsScheduler:
    """``SupTicketsScheduler.recommended(opt, T, C, select=val_accuracy, bn_update=batches)``.

    ``select`` scores a candidate by its accuracy on the validation split (carved from the
    training data; never the test split). ``bn_update`` is one pass over the training data in
    batches of 128. The flags given on the command line override the preset's settings;
    ``--select none`` builds the same setting without ``select`` (the superposition is then the
    ultimate ticket).
    """
    x_tr = data["x"]
    bn = [x_tr[i : i + 128] for i in range(0, len(x_tr), 128)] if job["bn"] == "recompute" else None
    given = ("lr_low", "lr_high", "explore_rate", "averaging", "reprune", "include_phase1")
    options: dict[str, Any] = {
        "superpose_fraction": job["superpose_fraction"],
        "base": job["phase1"],
        **{k: job[k] for k in given if job[k] is not None},
    }
    total, cycle = job["steps"], job["cycle_steps"]
    if job["select"] == "val":
        x_val, y_val = data["x_val"], data["y_val"]

        def val_accuracy(net: torch.nn.Module) -> float:
            return _accuracy(net, x_val, y_val)

        return SupTicketsScheduler.recommended(
            opt, total, cycle, select=val_accuracy, bn_update=bn, **options
        )
    # the preset's own settings (exploration 0.1, lr_high half the peak), without select
    options = {"explore_rate": 0.1, "lr_high": job["lr"] / 2, **options}
    return SupTicketsScheduler(opt, total, cycle, bn_update=bn, **options)


class Run:
    """One run of a job, step by step: the model, the optimizer, the scheduler, the batches (the
    same at every step for every run of a seed) and what the run measures."""

    def __init__(self, job: dict[str, Any], data: dict[str, torch.Tensor]) -> None:
        self.job, self.data = job, data
        self.started = time.perf_counter()
        seed, total, method = job["seed"], job["steps"], job["method"]
        self.model = model = make_model(job)
        inner = torch.optim.SGD(
            model.parameters(), lr=job["lr"], momentum=0.9, weight_decay=job["weight_decay"]
        )
        self.sparse = method != "dense"
        self.opt: Any = inner
        self.flops = self.itop = None
        if self.sparse:
            options: dict[str, Any] = {}
            if method in ("granet", "gmp"):
                options["prune_end"] = job["prune_end"]
            self.opt = SparseOptimizer(
                inner,
                method=method,
                sparsity=job["sparsity"],
                structure=job.get("structure"),
                distribution=job["distribution"],
                update_every=job["update_every"],
                prune_rate=job["prune_rate"],
                prune_schedule=job["prune_schedule"],
                stop_fraction=job["stop_fraction"],
                total_steps=total,
                model=model,
                seed=seed,
                **options,
            )
            self.flops = TrainingFlops(self.opt, model, data["x"][:1])
            self.itop = InTimeOverParameterization(self.opt)
        self.ticket_steps: list[int] = []
        self.phase1 = total
        if job["sup"]:
            self.sched: Any = sup_tickets(job, self.opt, data)
            self.phase1, self.ticket_steps = self.sched.phase1_steps, self.sched.ticket_steps
        else:
            self.sched = torch.optim.lr_scheduler.MultiStepLR(
                self.opt, milestones=[total // 2, 3 * total // 4], gamma=0.1
            )
        every = job["eval_every"]
        self.eval_steps = set(range(every, total + 1, every)) | set(self.ticket_steps) | {total}
        if job["sup"]:  # denser in phase 2, so that the superposed ticket has a curve
            cycle = max(1, job["cycle_steps"] // 2)
            self.eval_steps |= set(range(self.phase1, total + 1, cycle))
        self.curve: dict[str, list] = {"step": [], "live": [], "superposed": []}
        self.tickets: list[dict[str, Any]] = []
        self.lrs: list[float] = []
        # full batches only (BatchNorm never sees a batch of 1), a new order every epoch
        self.per_epoch = len(data["x"]) // job["batch_size"]
        generator = torch.Generator().manual_seed(seed)
        epochs = -(-total // self.per_epoch)
        self.orders = [torch.randperm(len(data["x"]), generator=generator) for _ in range(epochs)]
        self.step = 0
        self.live_logits: torch.Tensor | None = None

    def train(
        self,
        stop: int,
        progress: Callable[[int], None] | None = None,
        before_sched: Callable[[Run, float | None], None] | None = None,
    ) -> None:
        """Optimizer steps up to ``stop``; ``before_sched(run, live_accuracy)`` runs after each
        ``opt.step()`` and its evaluation, before ``sched.step()``."""
        x_tr, y_tr, x_ev, y_ev = (self.data[k] for k in ("x", "y", "x_eval", "y_eval"))
        opt, sched, model, batch = self.opt, self.sched, self.model, self.job["batch_size"]
        total, sup = self.job["steps"], self.job["sup"]
        while self.step < stop:
            epoch, i = divmod(self.step, self.per_epoch)
            idx = self.orders[epoch][i * batch : (i + 1) * batch]
            self.lrs.append(opt.param_groups[0]["lr"])
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.step = step = self.step + 1
            live_acc = sup_acc = None
            if step == total:
                self.live_logits = predict(model, [(x_ev, y_ev)])[0]  # the last live ticket
                live_acc = (self.live_logits.argmax(-1) == y_ev).double().mean().item()
            elif step in self.eval_steps:
                live_acc = _accuracy(model, x_ev, y_ev)
            if before_sched is not None:
                before_sched(self, live_acc)
            sched.step()  # Sup-tickets consolidates at cycle ends and finalizes after the last
            if sup and step in self.eval_steps and opt.tickets > 0:
                if step == total:  # the model now holds the ultimate ticket
                    sup_acc = _accuracy(model, x_ev, y_ev)
                else:
                    with opt.superposed():
                        sup_acc = _accuracy(model, x_ev, y_ev)
            if live_acc is not None:
                self.curve["step"].append(step)
                self.curve["live"].append(live_acc)
                self.curve["superposed"].append(sup_acc)
            if step in self.ticket_steps:
                self.tickets.append({"step": step, "live": live_acc, "superposed": sup_acc})
            if progress is not None and (step % 10 == 0 or step == stop):
                progress(step)

    def checkpoint(self, live_acc: float | None) -> dict[str, Any]:
        """What a run without Sup-tickets continues from: this run right after ``opt.step()``
        of the last step of phase 1, before ``sched.step()`` ends it (deep copies)."""
        return copy.deepcopy(
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "base": self.sched.base.state_dict(),
                "curve": self.curve,
                "live_acc": live_acc,
                "lrs": self.lrs,
                "flops": (self.flops.steps, self.flops.sparse_total, self.flops.dense_total),
                "itop": self.itop.ever,
                "seconds": time.perf_counter() - self.started,
            }
        )

    def continue_from(self, ckpt: dict[str, Any]) -> None:
        """Continue this run (without Sup-tickets) from a Sup-tickets run's :meth:`checkpoint`.

        With ``base="shared"`` the phase-1 rate of a Sup-tickets run is this run's own schedule,
        so its phase 1 is this run's first ``phase1_steps`` steps bit for bit; what this run
        measured until then is taken over (the curve at its own evaluation steps).
        """
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["base"])
        self.step = ckpt["step"]
        self.lrs = list(ckpt["lrs"])
        self.flops.steps, self.flops.sparse_total, self.flops.dense_total = ckpt["flops"]
        self.itop.ever = ckpt["itop"]
        points = zip(ckpt["curve"]["step"], ckpt["curve"]["live"], strict=True)
        points = [(s, v) for s, v in points if s in self.eval_steps]
        if self.step in self.eval_steps:
            points.append((self.step, ckpt["live_acc"]))
        self.curve = {"step": [s for s, _ in points], "live": [v for _, v in points]}
        self.curve["superposed"] = [None] * len(points)
        self.started = time.perf_counter() - ckpt["seconds"]
        self.sched.step()  # what the Sup-tickets run's sched.step() did to its base

    def result(self) -> dict[str, Any]:
        """Measurements and the held-out logits of the final model (and of the last live ticket
        with Sup-tickets); :func:`add_metrics` turns those into accuracy, NLL and ECE."""
        job, opt, model = self.job, self.opt, self.model
        sparse, method = self.sparse, job["method"]
        suptickets = opt.report()["suptickets"] if job["sup"] else {}
        return {
            # a structured run is its own configuration: "rigl 2:4"
            "method": f"{method} {job['structure']}" if job.get("structure") else method,
            "structure": job.get("structure"),
            "sup_tickets": job["sup"],
            "sparsity": job["sparsity"] if sparse else 0.0,
            "seed": job["seed"],
            "label": label(job),
            "density": opt.density if sparse else 1.0,
            "train_flops": self.flops.ratio if self.flops is not None else 1.0,
            "inference_flops": self.flops.inference_ratio() if self.flops is not None else 1.0,
            "itop": self.itop.rate if self.itop is not None else 1.0,
            "steps": job["steps"],
            "phase1_steps": self.phase1,
            "ticket_steps": self.ticket_steps,
            "tickets": self.tickets,
            # select=: each candidate's validation score and the one chosen
            "val_scores": suptickets.get("scores") or None,
            "chosen": suptickets.get("chosen") if suptickets.get("scores") else None,
            "curve": self.curve,
            "layers": (
                [
                    {
                        "name": r["name"],
                        "shape": list(r["shape"]),
                        "numel": r["numel"],
                        "nnz": r["nnz"],
                        "density": r["density"],
                    }
                    for r in opt.report()["layers"]
                ]
                if sparse
                else [
                    {
                        "name": n,
                        "shape": list(p.shape),
                        "numel": p.numel(),
                        "nnz": p.numel(),
                        "density": 1.0,
                    }
                    for n, p in model.named_parameters()
                    if p.ndim >= 2
                ]
            ),
            "lr": self.lrs,
            "logits": predict(model, [(self.data["x_eval"], self.data["y_eval"])])[0],
            "live_logits": self.live_logits if job["sup"] else None,
            "seconds": time.perf_counter() - self.started,
            # the final weights of sparse runs, for the deployed ticket (dropped before writing)
            "state": {k: v.clone() for k, v in model.state_dict().items()} if sparse else None,
        }


def run_one(
    job: dict[str, Any],
    data: dict[str, torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one configuration for ``job["steps"]`` optimizer steps; :meth:`Run.result`."""
    run = Run(job, data)
    run.train(job["steps"], progress)
    return run.result()


def run_pair(
    jobs: list[dict[str, Any]],
    data: dict[str, torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """The runs without and with Sup-tickets of one seed, phase 1 trained once.

    The Sup-tickets run trains from the start; the run without continues from its checkpoint
    at the end of phase 1 (:meth:`Run.checkpoint`). Both are bit for bit what two separate runs
    give (``base="shared"``; ``tests/test_research.py`` checks it), at ``T + (T - P)`` steps
    instead of ``2 T``. ``progress(n)`` counts the steps of both.
    """
    base_job, sup_job = sorted(jobs, key=lambda j: j["sup"])
    sup = Run(sup_job, data)
    saved: dict[str, Any] = {}

    def keep(run: Run, live_acc: float | None) -> None:
        if run.step == run.phase1:
            saved.update(run.checkpoint(live_acc))

    sup.train(sup_job["steps"], progress, keep)
    sup_result = sup.result()
    base = Run(base_job, data)
    base.continue_from(saved)
    offset = sup_job["steps"] - base.step
    base.train(base_job["steps"], None if progress is None else (lambda n: progress(n + offset)))
    return [base.result(), sup_result]


def add_metrics(result: dict[str, Any], labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, NLL and ECE (torchmetrics) from the run's logits, which it then drops."""
    logits, live_logits = result.pop("logits"), result.pop("live_logits")
    final = metrics_from_logits(logits, labels, NUM_CLASSES)
    result.update(accuracy=final["accuracy"], nll=final["nll"], ece=final["ece"])
    if live_logits is not None:
        live = metrics_from_logits(live_logits, labels, NUM_CLASSES)
        result.update(
            live_accuracy=live["accuracy"],
            live_nll=live["nll"],
            live_ece=live["ece"],
            live_vs_ultimate_disagreement=prediction_disagreement(live_logits, logits),
            live_vs_ultimate_kl=prediction_kl(live_logits, logits),
        )
    return result


# --- workers --------------------------------------------------------------------------------------
_QUEUE: Any = None


def _worker_init(queue: Any, threads: int) -> None:
    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(threads)


_DATA: dict[str, Any] = {}


def _worker_run(
    task: list[dict[str, Any]], data: dict[str, torch.Tensor] | None
) -> list[dict[str, Any]]:
    """One task in a worker (:func:`run_task`); ``data`` None: the worker loads it once
    (Fashion-MNIST is large)."""
    if data is None:
        job = task[0]
        if job["data"] not in _DATA:
            _DATA[job["data"]] = load_data(job)
        data = _DATA[job["data"]]
    key = task[0]["index"]
    _QUEUE.put((key, 0))
    return run_task(task, data, lambda n: _QUEUE.put((key, n)))


def run_task(
    task: list[dict[str, Any]],
    data: dict[str, torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One run (:func:`run_one`), or the two runs of a pair (:func:`run_pair`)."""
    if len(task) == 1:
        return [run_one(task[0], data, progress)]
    return run_pair(task, data, progress)


def task_steps(task: list[dict[str, Any]]) -> int:
    """Optimizer steps of a task: ``T``, or ``T + (T - P)`` for a pair."""
    job = task[0]
    if len(task) == 1:
        return job["steps"]
    plan = SupTicketsScheduler.plan(job["steps"], job["cycle_steps"], job["superpose_fraction"])
    return 2 * job["steps"] - plan.phase1_steps


def make_tasks(jobs: list[dict[str, Any]], share: bool) -> list[list[dict[str, Any]]]:
    """The jobs as tasks: with ``share``, the runs without and with Sup-tickets of one
    configuration and seed become one pair (:func:`run_pair`), where phase 1 is shared
    (``--phase1 shared``); every other job is a task of its own. Longest first."""
    pairs: dict[tuple, list[dict[str, Any]]] = {}
    tasks = []
    for job in jobs:
        if share and job["method"] != "dense" and job["phase1"] == "shared":
            key = (job["method"], job["sparsity"], job.get("structure"), job["seed"])
            if key not in pairs:
                pairs[key] = []
                tasks.append(pairs[key])
            pairs[key].append(job)
        else:
            tasks.append([job])
    split = []
    for task in tasks:  # a configuration run with one arm only stays single
        split += [task] if len(task) == 2 else [[job] for job in task]
    return sorted(split, key=task_steps, reverse=True)


def _summary(done: int, total: int, r: dict[str, Any]) -> str:
    line = (
        f"[{done:>{len(str(total))}}/{total}] {r['label']:<24} seed {r['seed']}: "
        f"acc {100 * r['accuracy']:6.2f}%  NLL {r['nll']:.4f}  ECE {100 * r['ece']:5.2f}%  "
        f"density {r['density']:.4f}"
    )
    if r["sup_tickets"]:
        line += f"  (live ticket {100 * r['live_accuracy']:.2f}%"
        line += f", chose {r['chosen']})" if r.get("chosen") else ")"
    return line + f"  {r['seconds']:.1f} s"


def _task_label(task: list[dict[str, Any]]) -> str:
    if len(task) == 1:
        return label(task[0])
    return label({**task[0], "sup": False}) + " ± Sup-tickets"


def run_grid(
    jobs: list[dict[str, Any]], workers: int, threads: int, bars: bool, share: bool = True
) -> list[dict]:
    """Run every job (in ``workers`` processes), with a progress bar per task and a summary line
    per run; with ``share``, the two arms of a configuration and seed as one pair
    (:func:`make_tasks`).

    The data are loaded once here and sent to the workers, and the metrics (torchmetrics' ECE)
    are computed here from the logits the workers return, so that the workers import only torch.
    """
    from tqdm.auto import tqdm

    data = load_data(jobs[0])
    tasks = make_tasks(jobs, share)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    done = 0

    def finish(task: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
        nonlocal done
        for job, result in zip(sorted(task, key=lambda j: j["sup"]), runs, strict=True):
            done += 1
            results[job["index"]] = add_metrics(result, data["y_eval"])
            tqdm.write(_summary(done, len(jobs), result))

    def new_bar(task: list[dict[str, Any]]) -> Any:
        return tqdm(
            total=task_steps(task),
            desc=_task_label(task),
            leave=False,
            disable=None if bars else True,
        )

    if workers <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for task in tasks:
                bar = new_bar(task)
                runs = run_task(task, data, lambda n, bar=bar: bar.update(n - bar.n))
                bar.close()
                finish(task, runs)
        finally:
            torch.set_num_threads(before)
        return results  # type: ignore[return-value]

    ctx = mp.get_context("spawn")  # no fork after torch is loaded
    progress_queue = ctx.Queue()
    open_bars: dict[int, Any] = {}
    by_key = {task[0]["index"]: task for task in tasks}
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(progress_queue, threads)
    ) as pool:
        shipped = None if jobs[0]["data"] == "fashion" else data
        pending = {pool.submit(_worker_run, task, shipped): task for task in tasks}
        while pending:
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    key, n = progress_queue.get_nowait()
                except queue_module.Empty:
                    break
                if key not in open_bars and results[key] is None:
                    open_bars[key] = new_bar(by_key[key])
                if key in open_bars:
                    open_bars[key].update(n - open_bars[key].n)
            for future in finished:
                task = pending.pop(future)
                bar = open_bars.pop(task[0]["index"], None)
                if bar is not None:
                    bar.close()
                finish(task, future.result())
    return results  # type: ignore[return-value]


# --- aggregation, table, files --------------------------------------------------------------------
METRICS = ("accuracy", "nll", "ece")


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean and std over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["sparsity"], r["sup_tickets"]), []).append(r)
    rows = []
    for (method, sparsity, sup), runs in groups.items():
        row: dict[str, Any] = {
            "label": runs[0]["label"],
            "method": method,
            "sparsity": sparsity,
            "sup_tickets": sup,
            "seeds": [r["seed"] for r in runs],
        }
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in runs])
        for key in ("density", "train_flops", "inference_flops", "itop", "seconds"):
            row[key] = mean_std([r[key] for r in runs])[0]
        if sup:
            row["live_accuracy_mean"], row["live_accuracy_std"] = mean_std(
                [r["live_accuracy"] for r in runs]
            )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], split: str = "test") -> str:
    head = (
        f"{'configuration':<24}  {split + ' accuracy (%)':>17}  {'NLL':>15}  {'ECE (%)':>13}  "
        f"{'density':>7}  {'train FLOPs':>11}  {'infer. FLOPs':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}"
        nll = f"{r['nll_mean']:.4f} ± {r['nll_std']:.4f}"
        ece = f"{100 * r['ece_mean']:.2f} ± {100 * r['ece_std']:.2f}"
        lines.append(
            f"{r['label']:<24}  {acc:>17}  {nll:>15}  {ece:>13}  {r['density']:7.4f}  "
            f"{r['train_flops']:10.3f}x  {r['inference_flops']:11.3f}x"
        )
    return "\n".join(lines)


CSV_COLUMNS = [
    "label",
    "method",
    "sparsity",
    "sup_tickets",
    "accuracy_mean",
    "accuracy_std",
    "nll_mean",
    "nll_std",
    "ece_mean",
    "ece_std",
    "density",
    "train_flops",
    "inference_flops",
    "itop",
    "live_accuracy_mean",
    "live_accuracy_std",
    "seconds",
]
RUN_COLUMNS = [
    "label",
    "method",
    "sparsity",
    "sup_tickets",
    "seed",
    "accuracy",
    "nll",
    "ece",
    "density",
    "train_flops",
    "inference_flops",
    "itop",
    "live_accuracy",
    "live_vs_ultimate_disagreement",
    "live_vs_ultimate_kl",
    "chosen",
    "seconds",
]


def _name(method: str) -> str:
    """``"RigL"`` for ``"rigl"``, ``"RigL 2:4"`` for a structured ``"rigl 2:4"``."""
    head, _, rest = method.partition(" ")
    return f"{NAMES.get(head, head)} {rest}".strip()


def paired_differences(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparse configuration: Sup-tickets minus the same method without it, seed by seed.

    Both runs of a seed start from the same weights and see the same batches until phase 2, so
    the difference of a seed is a paired measurement. Also the ultimate minus the last live
    ticket of the same run (what the averaging and the choice give), and the candidate that
    ``select=`` chose in each seed.
    """
    base = {(r["method"], r["sparsity"], r["seed"]): r for r in results if not r["sup_tickets"]}
    groups: dict[tuple, list[tuple[int, float, float, str | None]]] = {}
    for r in results:
        b = base.get((r["method"], r["sparsity"], r["seed"]))
        if r["sup_tickets"] and b is not None:
            diff = 100 * (r["accuracy"] - b["accuracy"])
            vs_live = 100 * (r["accuracy"] - r["live_accuracy"])
            groups.setdefault((r["method"], r["sparsity"]), []).append(
                (r["seed"], diff, vs_live, r.get("chosen"))
            )
    rows = []
    for (method, sparsity), values in groups.items():
        diffs = [d for _, d, _, _ in values]
        mean, std = mean_std(diffs)
        rows.append(
            {
                "label": f"{_name(method)} {100 * sparsity:g}%",
                "seeds": [s for s, _, _, _ in values],
                "diffs": diffs,
                "mean": mean,
                "std": std,
                "wins": sum(d > 0 for d in diffs),
                "vs_live": mean_std([v for _, _, v, _ in values])[0],
                "chosen": [c for _, _, _, c in values],
            }
        )
    return rows


def paired_structures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per structured configuration: its accuracy minus the unstructured run of the same method,
    sparsity, Sup-tickets arm and seed (same initial weights, same batches), in points."""
    plain = {
        (r["method"], r["sparsity"], r["sup_tickets"], r["seed"]): r
        for r in results
        if not r.get("structure")
    }
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for r in results:
        if not r.get("structure"):
            continue
        base_method = r["method"].split()[0]
        b = plain.get((base_method, r["sparsity"], r["sup_tickets"], r["seed"]))
        if b is not None:
            key = (r["label"], r["sparsity"])
            groups.setdefault(key, []).append((r["seed"], 100 * (r["accuracy"] - b["accuracy"])))
    rows = []
    for (name, _), values in groups.items():
        diffs = [d for _, d in values]
        mean, std = mean_std(diffs)
        rows.append({"label": name, "seeds": [s for s, _ in values], "diffs": diffs,
                     "mean": mean, "std": std, "wins": sum(d > 0 for d in diffs),
                     "vs_live": float("nan")})  # fmt: skip
    return rows


def format_paired(rows: list[dict[str, Any]]) -> str:
    w = max([14, *(len(r["label"]) for r in rows)])
    head = (
        f"{'configuration':<{w}}  {'Sup-tickets - base (points)':>28}  {'wins':>5}  "
        f"{'ultimate - live':>15}  per-seed differences"
    )
    chosen = any(any(r.get("chosen") or []) for r in rows)
    if chosen:
        head += "  (chosen on val)"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = f"{r['mean']:+.2f} ± {r['std']:.2f}"
        seeds = " ".join(f"{d:+.2f}" for d in r["diffs"])
        line = (
            f"{r['label']:<{w}}  {diff:>28}  {r['wins']}/{len(r['diffs']):<3}  "
            f"{r['vs_live']:>+15.2f}  {seeds}"
        )
        if chosen:
            line += "  (" + ", ".join(str(c) for c in r.get("chosen") or []) + ")"
        lines.append(line)
    return "\n".join(lines)


def write_files(out: str, config: dict, rows: list[dict], results: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    schedules: dict[str, Any] = {}
    for r in results:
        kind = "sup_tickets" if r["sup_tickets"] else "standard"
        if r["method"] != "dense" and kind not in schedules:
            schedules[kind] = {
                "lr": r["lr"],
                "phase1_steps": r["phase1_steps"],
                "ticket_steps": r["ticket_steps"],
            }
    runs = [{k: v for k, v in r.items() if k != "lr"} for r in results]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "config": config,
                "rows": rows,
                "paired": paired_differences(results),
                "runs": runs,
                "schedules": schedules,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def plot(out: str, results: list[dict[str, Any]], split: str = "test") -> list[str]:
    """lr.png, accuracy.png, density.png; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plots: matplotlib is missing ({e}); pip install 'sparseopt[examples]'")
        return []
    written = []
    sparse = [r for r in results if r["method"] != "dense"]

    # 1. learning rate, with the ticket points
    fig, ax = plt.subplots(figsize=(7, 3.6))
    shown = set()
    for r in sparse:
        kind = r["sup_tickets"]
        if kind in shown:
            continue
        shown.add(kind)
        steps = range(1, len(r["lr"]) + 1)
        ax.plot(steps, r["lr"], label="with Sup-tickets" if kind else "without Sup-tickets")
        if kind:
            ax.plot(
                r["ticket_steps"],
                [r["lr"][s - 1] for s in r["ticket_steps"]],
                "o",
                color="C3",
                label="ticket (cycle end)",
            )
            ax.axvline(r["phase1_steps"], color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per step (phase 2 after the dotted line)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(os.path.join(out, "lr.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 2. test accuracy over steps: live vs superposed ticket, and the run without Sup-tickets
    configs = sorted({(r["method"], r["sparsity"]) for r in sparse}, key=lambda c: (c[1], c[0]))
    methods = sorted({m for m, _ in configs}, key=lambda m: (METHODS.index(m.split()[0]), m))
    sparsities = sorted({s for _, s in configs})
    fig, axes = plt.subplots(
        len(sparsities),
        len(methods),
        figsize=(3.6 * len(methods), 3.0 * len(sparsities)),
        squeeze=False,
    )
    dense = [r for r in results if r["method"] == "dense"]

    def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
        steps = runs[0]["curve"]["step"]
        values = []
        for i in range(len(steps)):
            vals = [r["curve"][key][i] for r in runs if r["curve"][key][i] is not None]
            values.append(100 * sum(vals) / len(vals) if vals else math.nan)
        return steps, values

    def runs_of(method: str, sparsity: float) -> list[dict]:
        return [r for r in sparse if (r["method"], r["sparsity"]) == (method, sparsity)]

    def phase2_tickets(runs: list[dict]) -> list[int]:
        return next((r["ticket_steps"] for r in runs if r["sup_tickets"]), [])

    for i, s in enumerate(sparsities):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            low = 100.0
            without = [
                r for r in sparse if (r["method"], r["sparsity"], r["sup_tickets"]) == (m, s, False)
            ]
            with_sup = [
                r for r in sparse if (r["method"], r["sparsity"], r["sup_tickets"]) == (m, s, True)
            ]
            lines = (
                (dense, "live", {"color": "grey", "ls": ":"}, "dense"),
                (without, "live", {"color": "C0"}, "without Sup-tickets"),
                (with_sup, "live", {"color": "C1"}, "live ticket"),
                (
                    with_sup,
                    "superposed",
                    {"color": "C3", "marker": "o", "ms": 3},
                    "superposed ticket",
                ),
            )
            # The inset zooms on the last 20% of the steps: phase 2, where the tickets are.
            zoom = ax.inset_axes([0.38, 0.08, 0.58, 0.5])
            zoom_low, zoom_high = 100.0, 0.0
            for runs, key, style, name in lines:
                if not runs:
                    continue
                steps, values = mean_curve(runs, key)
                ax.plot(steps, values, label=name, lw=1.2, **style)
                tail = [
                    (st, v)
                    for st, v in zip(steps, values, strict=True)
                    if st >= 0.8 * steps[-1] and v == v
                ]
                if tail and runs is not dense:  # the dense curve would stretch the zoom
                    zoom.plot([st for st, _ in tail], [v for _, v in tail], lw=1.2, **style)
                    zoom_low = min([zoom_low, *(v for _, v in tail)])
                    zoom_high = max([zoom_high, *(v for _, v in tail)])
                half = [
                    v for st, v in zip(steps, values, strict=True) if st > steps[-1] // 3 and v == v
                ]
                low = min([low, *half])
            if zoom_high >= zoom_low:
                pad = max(0.2, 0.15 * (zoom_high - zoom_low))
                zoom.set_ylim(zoom_low - pad, zoom_high + pad)
            for st in phase2_tickets(runs_of(m, s)):
                zoom.axvline(st, color="grey", lw=0.6, ls=":")
            zoom.tick_params(labelsize=6)
            zoom.grid(alpha=0.3)
            ax.set_ylim(max(0.0, low - 2.0), 100.0)
            ax.set_title(f"{_name(m)} {100 * s:g}%", fontsize=10)
            ax.set_xlabel("optimizer step")
            if j == 0:
                ax.set_ylabel(f"{split} accuracy (%), mean over seeds")
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    written.append(os.path.join(out, "accuracy.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 3. the paired per-seed differences, Sup-tickets minus base
    paired = paired_differences(results)
    if paired:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(paired), 3.4))
        for i, r in enumerate(paired):
            jitter = [i + 0.08 * (k - (len(r["diffs"]) - 1) / 2) for k in range(len(r["diffs"]))]
            ax.plot(jitter, r["diffs"], "o", color="C1", ms=4, alpha=0.8)
            ax.errorbar(i + 0.3, r["mean"], yerr=r["std"], fmt="s", color="C3", ms=5, capsize=3)
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xticks(range(len(paired)), [r["label"] for r in paired], rotation=20, fontsize=8)
        ax.set_ylabel(f"{split} accuracy: Sup-tickets - base (points)")
        ax.set_title("Per seed (dots), mean ± std (squares)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        written.append(os.path.join(out, "paired.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # 4. per-layer density of the final models (first seed)
    seed0 = min(r["seed"] for r in results)
    fig, axes = plt.subplots(
        1, max(1, len(sparsities)), figsize=(5.2 * len(sparsities), 3.4), squeeze=False
    )
    for i, s in enumerate(sparsities or [0.0]):
        ax = axes[0][i]
        runs = [r for r in sparse if r["sparsity"] == s and r["seed"] == seed0]
        runs.sort(key=lambda r: (r["method"], r["sup_tickets"]))
        if not runs:
            continue
        # a structure may leave a layer dense (not a sparse layer then): it shows at 1.0
        names = [layer["name"] for layer in max((r["layers"] for r in runs), key=len)]
        width = 0.8 / len(runs)
        for k, r in enumerate(runs):
            xs = [x + (k - (len(runs) - 1) / 2) * width for x in range(len(names))]
            density = {layer["name"]: layer["density"] for layer in r["layers"]}
            heights = [density.get(name, 1.0) for name in names]
            ax.bar(xs, heights, width, label=r["label"])
        ax.axhline(1 - s, color="grey", ls=":", lw=1, label=f"overall {1 - s:.2f}")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_ylabel("density")
        ax.set_title(f"per-layer density at {100 * s:g}% sparsity (seed {seed0})", fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(os.path.join(out, "density.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["dense", "set", "rigl", "granet"],
        choices=METHODS,
        help="'dense' runs once, without sparsity or Sup-tickets",
    )
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
    p.add_argument(
        "--structures",
        nargs="+",
        default=["none"],
        help="mask structures: none, fan_in, N:M (e.g. 2:4); an N:M runs only at its own "
        "sparsity 1 - N/M (make demo-structured)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--sup-tickets",
        choices=["both", "on", "off"],
        default="both",
        help="sparse runs with and/or without Sup-tickets (default: both)",
    )
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder")
    p.add_argument(
        "--data",
        choices=sorted(DATA_DEFAULTS),
        help="mnist1d (default; generated offline), digits (scikit-learn's, --quick's), or "
        "fashion (Debian's dataset-fashion-mnist; make demo-fashion)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a reduced configuration on the digits, for tests: {QUICK} (explicit flags win)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per --data)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, help="model base width (default: per --data)")
    p.add_argument("--distribution", default="erk", choices=["erk", "er", "uniform"])
    p.add_argument(
        "--update-every", type=int, help="ΔT, steps between topology updates (default: per --data)"
    )
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--prune-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--stop-fraction", type=float, default=0.75)
    p.add_argument("--prune-end", type=float, default=0.5, help="GraNet: target reached here")
    p.add_argument("--cycle-steps", type=int, help="Sup-tickets cycle length (default: per --data)")
    p.add_argument("--superpose-fraction", type=float, help="default: per --data")
    p.add_argument(
        "--select",
        choices=["val", "none"],
        default="val",
        help="'val': SupTicketsScheduler.recommended(..., select=) scores every candidate ticket "
        "on the validation split (carved from the training data) and keeps the best; 'none': the "
        "same setting without select (the superposition is the ultimate ticket)",
    )
    p.add_argument(
        "--phase1",
        choices=["shared", "paper"],
        default="shared",
        help="Sup-tickets' base=: 'shared' (the preset's) keeps the run's own milestones at 1/2 "
        "and 3/4 of all steps, so phase 1 is the first steps of the run without Sup-tickets; "
        "'paper' puts them at 1/2 and 3/4 of phase 1",
    )
    p.add_argument(
        "--share-phase1",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --phase1 shared, train the shared phase 1 once per configuration and seed and "
        "continue the run without Sup-tickets from it (bit for bit the same results)",
    )
    preset = "default: the recommended preset's"
    p.add_argument("--lr-low", type=float, help=f"{preset} (1/100 of --lr)")
    p.add_argument("--lr-high", type=float, help=f"{preset} (half of --lr; paper: 1/20)")
    p.add_argument("--explore-rate", type=float, help=f"{preset} (0.1; paper: 0.5)")
    p.add_argument("--averaging", choices=["cia", "caa", "cima"], help=f"{preset} ('cia')")
    p.add_argument("--reprune", choices=["layer", "global"], help=f"{preset} ('layer')")
    p.add_argument(
        "--include-phase1",
        action=argparse.BooleanOptionalAction,
        help="the phase-1 model as ticket 0 (the official code); default: the preset's (no)",
    )
    p.add_argument(
        "--bn",
        choices=["average", "recompute"],
        default="recompute",
        help="BatchNorm statistics of the superposed ticket: averaged, or recomputed over the "
        "training data after each consolidate (the preset's bn_update=; the official code)",
    )
    p.add_argument(
        "--eval-every", type=int, help="steps between curve points (default: per --data)"
    )
    p.add_argument(
        "--eval-on",
        choices=["test", "val"],
        default="test",
        help="'val' trains on train minus a val split and reports val: use it to tune",
    )
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--val-fraction", type=float, default=0.2, help="of train, for --eval-on val")
    p.add_argument("--split-seed", type=int, default=0, help="fixes the train/test split")
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (1 = in this process)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    args = p.parse_args(argv)
    if args.data is None:
        args.data = "digits" if args.quick else "mnist1d"
    if args.quick and args.data != "digits":
        p.error("--quick is the reduced digits grid; leave out --data or use --data digits")
    defaults = {**DATA_DEFAULTS[args.data], **(QUICK if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {
        k: getattr(args, k)
        for k in (
            "steps", "batch_size", "lr", "weight_decay", "width", "distribution", "update_every",
            "prune_rate", "prune_schedule", "stop_fraction", "prune_end", "cycle_steps",
            "superpose_fraction", "lr_low", "lr_high", "explore_rate", "averaging", "eval_every",
            "eval_on", "test_fraction", "val_fraction", "split_seed", "data", "reprune",
            "include_phase1", "bn", "select", "phase1",
        )
    }  # fmt: skip
    if args.sup_tickets == "off":  # nothing to select: the digits keep their whole training part
        common["select"] = "none"
    arms = {"both": [False, True], "on": [True], "off": [False]}[args.sup_tickets]
    configs = []
    if "dense" in args.methods:
        configs.append(("dense", 0.0, False))
    for s in args.sparsities:
        for structure in args.structures:
            if ":" in structure:  # N:M fixes the sparsity
                n, m_ = (int(v) for v in structure.split(":"))
                if abs(s - (1 - n / m_)) > 1e-9:
                    continue
            for m in args.methods:
                if m != "dense":
                    st = None if structure == "none" else structure
                    configs += [(m, s, sup, st) for sup in arms]
    jobs = []
    for method, sparsity, sup, *structure in configs:
        for seed in args.seeds:
            job = dict(common, method=method, sparsity=sparsity, sup=sup, seed=seed)
            job["structure"] = structure[0] if structure else None
            job["index"] = len(jobs)
            jobs.append(job)
    return jobs


def layer_report(results: list[dict[str, Any]], distribution: str) -> str:
    """The per-layer report of the first plain RigL run (else the first sparse run), next to each
    layer's count from the distribution, computed here independently of the optimizer's masks."""
    sparse = [r for r in results if r["method"] != "dense"]
    if not sparse:
        return ""
    run = next((r for r in sparse if r["method"] == "rigl" and not r["sup_tickets"]), sparse[0])
    layers = run["layers"]
    density = 1.0 - run["sparsity"]
    expected = exact_counts(
        layer_densities(
            distribution,
            [tuple(layer["shape"]) for layer in layers],
            density,
            [layer["name"] for layer in layers],
        ),
        [layer["numel"] for layer in layers],
        density,
    )
    shapes = ["x".join(map(str, layer["shape"])) for layer in layers]
    nw = max(len("layer"), *(len(layer["name"]) for layer in layers))
    sw = max(len("shape"), *(len(s) for s in shapes))
    dist = distribution.upper()
    head = f"{'layer':<{nw}}  {'shape':>{sw}}  {'numel':>7}  {'nnz':>6}  {dist:>6}  density"
    lines = [f"\nper-layer report of {run['label']}, seed {run['seed']}:", head, "-" * len(head)]
    for layer, shape, want in zip(layers, shapes, expected, strict=True):
        lines.append(
            f"{layer['name']:<{nw}}  {shape:>{sw}}  {layer['numel']:>7}  {layer['nnz']:>6}  "
            f"{want:>6}  {layer['density']:.4f}"
        )
    nnz = [layer["nnz"] for layer in layers]
    verdict = "equals" if nnz == expected else "DIFFERS FROM"
    lines.append(
        f"total nnz {sum(nnz)} of {sum(layer['numel'] for layer in layers)}: "
        f"every layer's nnz {verdict} its {dist} count"
    )
    return "\n".join(lines)


def deploy_best(
    args: argparse.Namespace, rows: list[dict[str, Any]], results: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Write the compact file of the best sparse configuration's first seed to ``ticket.sparse``.

    Best: the highest mean accuracy over seeds among the sparse rows. Also measures the dense and
    the sparse-inference latency at batch 1 (``common.deploy``).
    """
    sparse_rows = [r for r in rows if r["method"] != "dense"]
    if not sparse_rows:
        return None
    best = max(sparse_rows, key=lambda r: r["accuracy_mean"])
    run = next(
        r
        for r in results
        if (r["method"], r["sparsity"], r["sup_tickets"])
        == (best["method"], best["sparsity"], best["sup_tickets"])
    )
    model = SignalCNN(width=args.width) if args.data == "mnist1d" else DigitsCNN(width=args.width)
    model.load_state_dict(run["state"])
    path = os.path.join(args.out, "ticket.sparse")
    example = torch.randn(1, *DATASETS[args.data][0])
    info = deploy(model, path, example)
    return {"label": run["label"], "seed": run["seed"], "path": path, **info}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished workers, or NaN where the
    ``resource`` module is missing (Windows): on a shared machine it measures the demo's own work
    where the wall time also measures everyone else's."""
    try:
        import resource
    except ImportError:
        return math.nan
    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    jobs = make_jobs(args)
    what = "validation" if args.eval_on == "val" else "test"
    what_data = {
        "mnist1d": "SignalCNN on MNIST-1D (generated offline)",
        "digits": "DigitsCNN on the UCI digits",
        "fashion": "DigitsCNN on Fashion-MNIST",
    }[args.data]
    print(
        f"sparseopt demo: {what_data}, {len(jobs)} runs of {args.steps} steps "
        f"(batch {args.batch_size}), {what} split held out; {args.workers} worker(s)"
    )
    results = run_grid(jobs, args.workers, args.threads, args.progress, args.share_phase1)
    rows = aggregate(results)
    print()
    print(f"{what} metrics, mean ± std over seeds {args.seeds}; FLOPs relative to dense")
    print(format_table(rows, "val" if args.eval_on == "val" else "test"))
    by_structure = paired_structures(results)
    if by_structure:
        print(f"\npaired by seed: {what} accuracy of each structure minus unstructured")
        print(format_paired(by_structure))
    paired = paired_differences(results)
    if paired:
        print(f"\npaired by seed: {what} accuracy of Sup-tickets minus the same method without it")
        print(format_paired(paired))
    print(layer_report(results, args.distribution))
    os.makedirs(args.out, exist_ok=True)
    deployed = deploy_best(args, rows, results)
    if deployed is not None:
        print(f"\nthe deployed ticket: {deployed['label']}, seed {deployed['seed']}")
        print(format_deploy(deployed, deployed["path"]))
    for r in results:
        r.pop("state", None)
    config = {k: v for k, v in vars(args).items() if k not in ("progress", "plots")}
    write_files(args.out, config, rows, results)
    split = "val" if args.eval_on == "val" else "test"
    written = plot(args.out, results, split) if args.plots else []
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    print(
        "\nwrote results.json, results.csv, runs.csv"
        + (", " + ", ".join(os.path.basename(w) for w in written) if written else "")
        + f" to {args.out}/ in {elapsed:.1f} s ({cpu:.0f} CPU-seconds, workers included)"
    )
    return {
        "rows": rows,
        "runs": results,
        "paired": paired,
        "paired_structures": by_structure,
        "deployed": deployed,
        "out": args.out,
        "seconds": elapsed,
        "cpu_seconds": cpu,
    }


if __name__ == "__main__":
    main()
