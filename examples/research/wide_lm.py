"""The character-level LM at a width where its projections run on the sparse kernels.

``demo_lm.CharGPT`` (pre-norm blocks, causal attention, a 4x GELU MLP, the output tied to the
token embedding) at width 256, 2 blocks, 4 heads, context 64: each block's ``qkv`` (768x256),
``proj`` (256x256), ``fc`` (1024x256) and ``out`` (256x1024) are sparse (ERK) and run on
``sparseopt.sparse_kernels`` (CSR; ``layout="csr"`` because the measured rule would keep ERK's
70%-sparse ``proj`` dense at 80%); embeddings, LayerNorms and biases stay dense. AdamW (lr 3e-3,
betas 0.9/0.95, weight decay 0.1), batch 8 sequences of 64 bytes (512 GEMM rows), 500 steps,
linear warm-up over 25 steps then cosine to 0 (the base schedule); topology updates every 25
steps until 75% of training. Sup-tickets: the last 20% as 4 cycles of 25 steps.

For every cell (method, sparsity, seed; paired: the same initial weights, masks and batches):

- **base**: the base schedule alone;
- **sup**: ``SupTicketsScheduler`` with the paper's defaults and relative rates (1/100 and 1/20
  of AdamW's peak: 3e-5 -> 1.5e-4; exploration 0.5), phase 1 the warm-up and cosine compressed
  into phase 1, ending at ``lr_low`` (the paper's protocol: phase 2 continues phase 1);
- **recommended**: ``SupTicketsScheduler.recommended`` (exploration 0.1, ``lr_high`` half the
  peak) with ``select=`` minus the validation loss (the greedy soup), phase 1 the base run's
  own schedule (``base=`` the whole run's warm-up and cosine: "shared").

The shared phase 1 is run once and checkpointed; the base run and the recommended variant each
continue from a deep copy of it, so they differ only in the last 20%. Validation (whole files
never trained on) is the only split any choice reads; test (two more whole files) is reported
once. Losses are bits per byte.

    python examples/research/wide_lm.py --out runs/wide-lm                # the grid
    python examples/research/wide_lm.py --report runs/wide-lm/results.jsonl
    python examples/research/wide_lm.py --tiny --out /tmp/lm              # seconds (tests)

Results are appended to ``OUT/results.jsonl`` one cell at a time; finished cells are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from copy import deepcopy
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from demo_lm import TRAIN_FILES, VAL_FILES, VOCAB, CharGPT, Config, base_lambda, read_corpus
from study import COUNTERS, _paired, _seeds
from torch import Tensor, nn

from sparseopt import SparseOptimizer, SupTicketsScheduler, sparse_kernels
from sparseopt.integrations.hf import param_groups

TEST_FILES = ("ipaddress.py", "pprint.py")  # whole files, in neither TRAIN_FILES nor VAL_FILES
CONFIG = Config(layers=2, width=256, heads=4, context=64, batch=8, steps=500, lr=3e-3,
                weight_decay=0.1, warmup=25, update_every=25, cycle_steps=25,
                superpose_fraction=0.2, val_windows=256)  # fmt: skip
TINY = replace(CONFIG, layers=1, width=32, heads=2, context=16, batch=4, steps=40, warmup=4,
               update_every=5, cycle_steps=4, superpose_fraction=0.2, val_windows=16)  # fmt: skip
ARMS = ("base", "sup", "recommended")
LAYOUT = "csr"


class Grid:
    """Corpus, windows and loop shared by the runs of one (method, sparsity, seed)."""

    def __init__(self, cfg: Config, job: dict[str, Any], data: dict[str, Tensor]) -> None:
        self.cfg, self.job = cfg, job
        self.train_bytes = data["train"]
        self.windows = {part: windows(data[part], cfg) for part in ("val", "test")}
        plan = SupTicketsScheduler.plan(cfg.steps, cfg.cycle_steps, cfg.superpose_fraction)
        self.phase1 = plan.phase1_steps
        self.evaluator = CharGPT(cfg)

    def batch_at(self, step: int) -> Tensor:
        """The ``(batch, context + 1)`` windows of step ``step``: the same in every run."""
        g = torch.Generator().manual_seed(10_000 * (self.job["seed"] + 1) + step)
        starts = torch.randint(0, len(self.train_bytes) - self.cfg.context - 1, (self.cfg.batch,),
                               generator=g)  # fmt: skip
        return torch.stack([self.train_bytes[i : i + self.cfg.context + 1] for i in starts]).long()

    def build(self, arm: str):
        """Model, optimizer, scheduler, kernel handle of ``arm`` (``"phase1-shared"`` is the
        shared phase 1, a scheduler whose base is the base run's schedule)."""
        cfg, job = self.cfg, self.job
        torch.manual_seed(job["seed"])
        model = CharGPT(cfg)
        inner = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95))  # fmt: skip
        whole = base_lambda(cfg.steps, cfg.warmup, 0.0)
        if job["method"] == "dense":
            return model, inner, torch.optim.lr_scheduler.LambdaLR(inner, whole), None
        opt = SparseOptimizer(inner, job["method"], job["sparsity"], update_every=cfg.update_every,
                              total_steps=cfg.steps, model=model, seed=job["seed"])  # fmt: skip
        handle = sparse_kernels(model, opt, layout=LAYOUT)
        if arm == "base":
            return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, whole), handle

        def shared(o, phase1: int):  # the base run's own schedule
            return torch.optim.lr_scheduler.LambdaLR(o, whole)

        def compressed(o, phase1: int):  # warm-up and cosine over phase 1, down to lr_low
            return torch.optim.lr_scheduler.LambdaLR(o, base_lambda(phase1, cfg.warmup, 0.01))

        common = {"superpose_fraction": cfg.superpose_fraction}
        if arm == "sup":
            sched = SupTicketsScheduler(opt, cfg.steps, cfg.cycle_steps, base=compressed, **common)
        elif arm == "recommended":
            sched = SupTicketsScheduler.recommended(
                opt, cfg.steps, cfg.cycle_steps, select=self.score, bn_update=None, base=shared,
                **common,
            )  # fmt: skip
        else:  # the shared phase 1
            sched = SupTicketsScheduler(opt, cfg.steps, cfg.cycle_steps, base=shared, **common)
        return model, opt, sched, handle

    def train(self, model, opt, sched, start: int, stop: int, on_step=None) -> float:
        loss = torch.zeros(())
        for step in range(start, stop + 1):
            chunk = self.batch_at(step)
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step)
            if sched is not None:
                sched.step()
        return loss.item()

    @torch.no_grad()
    def bpb(self, state: dict[str, Tensor], part: str) -> float:
        """Bits per byte of ``state`` on ``part``'s windows, on a plain model (no kernels)."""
        self.evaluator.load_state_dict(state)
        self.evaluator.eval()
        total, w = 0.0, self.windows[part]
        for chunk in w.split(64):
            logits = self.evaluator(chunk[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()  # fmt: skip
        return total / (w.shape[0] * (w.shape[1] - 1)) / math.log(2)

    def evaluate(self, state: dict[str, Tensor]) -> dict[str, float]:
        return {"val": self.bpb(state, "val"), "test": self.bpb(state, "test")}

    def score(self, model: nn.Module) -> float:
        """``select=``: minus the validation bits per byte (higher is better)."""
        return -self.bpb(state_of(model), "val")

    def load(self, ckpt: dict[str, Any], arm: str):
        ckpt = deepcopy(ckpt)  # Optimizer.load_state_dict keeps the checkpoint's tensors
        model, opt, sched, handle = self.build(arm)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if arm == "base":
            sched.load_state_dict(ckpt["sched"]["base"])
        else:
            counters = {k: v for k, v in ckpt["sched"].items() if k in COUNTERS}
            sched.load_state_dict({**sched.state_dict(), **counters})
        return model, opt, sched, handle


def windows(data: Tensor, cfg: Config) -> Tensor:
    starts = torch.linspace(0, len(data) - cfg.context - 1, cfg.val_windows).long()
    return torch.stack([data[s : s + cfg.context + 1] for s in starts.tolist()]).long()


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def layouts(handle) -> dict[str, str]:
    return {row["name"]: row["layout"] for row in handle.report()} if handle else {}


def run_cell(cfg: Config, job: dict[str, Any], data: dict[str, Tensor]) -> list[dict[str, Any]]:
    """The runs of one cell: dense alone; else the shared phase 1 (base and recommended branch
    from it) and the sup arm (its own, compressed phase 1)."""
    grid = Grid(cfg, job, data)
    key = {k: job[k] for k in ("method", "sparsity", "seed")}
    key["config"] = asdict(cfg)
    t0 = time.perf_counter()
    if job["method"] == "dense":
        model, opt, sched, _ = grid.build("base")
        last = grid.train(model, opt, sched, 1, cfg.steps)
        acc = grid.evaluate(state_of(model))
        return [{**key, "arm": "dense", "bpb": acc, "train_last": last,
                 "seconds": time.perf_counter() - t0}]  # fmt: skip
    records = []
    model, opt, sched, handle = grid.build("phase1-shared")
    grid.train(model, opt, sched, 1, grid.phase1 - 1)
    grid.train(model, opt, None, grid.phase1, grid.phase1)
    ckpt = {"model": state_of(model), "opt": opt.state_dict(), "sched": sched.state_dict()}
    phase1 = grid.evaluate(ckpt["model"])
    handle.remove()
    shared_seconds = time.perf_counter() - t0
    for arm in ("base", "recommended"):
        t1 = time.perf_counter()
        model, opt, sched, handle = grid.load(ckpt, arm)
        live: dict[str, Tensor] = {}

        def grab(step: int, model=model, sched=sched, live=live) -> None:
            if step in getattr(sched, "ticket_steps", ()):
                live.update(state_of(model))

        sched.step()
        last = grid.train(model, opt, sched, grid.phase1 + 1, cfg.steps, grab)
        record = {**key, "arm": arm, "bpb": grid.evaluate(state_of(model)), "phase1": phase1,
                  "train_last": last, "density": opt.density, "kernels": layouts(handle),
                  "seconds": time.perf_counter() - t1 + shared_seconds / 2}  # fmt: skip
        if arm == "recommended":
            record["live"] = grid.evaluate(live)
            record["chosen"] = opt.superposition.chosen
            record["scores"] = dict(opt.superposition.scores)
        records.append(record)
        handle.remove()
    t1 = time.perf_counter()
    model, opt, sched, handle = grid.build("sup")
    live = {}

    def grab_sup(step: int) -> None:
        if step in sched.ticket_steps:
            live.update(state_of(model))

    last = grid.train(model, opt, sched, 1, cfg.steps, grab_sup)
    records.append(
        {**key, "arm": "sup", "bpb": grid.evaluate(state_of(model)), "live": grid.evaluate(live),
         "train_last": last, "density": opt.density, "kernels": layouts(handle),
         "seconds": time.perf_counter() - t1}
    )  # fmt: skip
    handle.remove()
    return records


# --- the report -----------------------------------------------------------------------------------
def _ms(values: list[float], fmt: str = "{:.4f}") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {std:.4f}"


def report(path: str, out: str | None = None) -> str:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    by = {(r["method"], r["sparsity"], r["arm"], r["seed"]): r for r in records}
    lines = []
    emit = lines.append
    emit("## Bits per byte (lower is better), mean ± std over seeds\n")
    emit("| method | sparsity | arm | seeds | val | test |")
    emit("|---|---|---|---|---|---|")
    cells = sorted({(r["method"], r["sparsity"]) for r in records})
    for method, sparsity in cells:
        for arm in ("dense", *ARMS):
            rs = [
                r for (m, s, a, _), r in sorted(by.items()) if (m, s, a) == (method, sparsity, arm)
            ]
            if rs:
                val = [r["bpb"]["val"] for r in rs]
                test = [r["bpb"]["test"] for r in rs]
                emit(f"| {method} | {100 * sparsity:g}% | {arm} | {len(rs)} | {_ms(val)} "
                     f"| {_ms(test)} |")  # fmt: skip
    for split in ("val", "test"):
        title = "Validation" if split == "val" else "Test (reported once)"
        emit(f"\n## {title}: arm minus base, paired by seed (bits per byte; negative helps)\n")
        emit("| method | sparsity | arm | diff mean ± std | 95% CI | wins | per seed |")
        emit("|---|---|---|---|---|---|---|")
        pooled: dict[str, list[float]] = {}
        for method, sparsity in cells:
            for arm in ARMS[1:]:
                seeds = sorted(s for (m, sp, a, s) in by if (m, sp, a) == (method, sparsity, arm)
                               and (method, sparsity, "base", s) in by)  # fmt: skip
                if not seeds:
                    continue
                # in points of 0.01 bpb, so that _paired's two decimals keep the precision
                arm_of = {s: by[(method, sparsity, arm, s)]["bpb"][split] for s in seeds}
                base_of = {s: by[(method, sparsity, "base", s)]["bpb"][split] for s in seeds}
                d = [100 * (arm_of[s] - base_of[s]) for s in seeds]
                # a win is a lower loss: _paired counts d > 0, so hand it -d and flip the sign back
                cell = _paired([-x for x in d]).split(" | ")
                emit(f"| {method} | {100 * sparsity:g}% | {arm} | {_flip(cell[0])} "
                     f"| {_flip_ci(cell[1])} | {cell[2]} | {_seeds(d)} |")  # fmt: skip
                pooled.setdefault(arm, []).extend(d)
        emit(f"\n{title}, pooled over every cell (0.01 bpb):\n")
        emit("| arm | diff mean ± std | 95% CI | wins |")
        emit("|---|---|---|---|")
        for arm, d in pooled.items():
            cell = _paired([-x for x in d]).split(" | ")
            emit(f"| {arm} | {_flip(cell[0])} | {_flip_ci(cell[1])} | {cell[2]} |")
    emit("\nDifferences in 0.01 bits per byte; wins: seeds where the arm's loss is lower.")
    chosen = [r["chosen"] for r in records if r["arm"] == "recommended"]
    if chosen:
        counts = ", ".join(f"{n} {chosen.count(n)}" for n in sorted(set(chosen)))
        emit(f"`select=` chose (recommended, {len(chosen)} runs): {counts}.")
    text = "\n".join(lines)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


def _flip(mean_std: str) -> str:
    mean, std = mean_std.split(" ± ")
    return f"{-float(mean):+.2f} ± {std}"


def _flip_ci(ci: str) -> str:
    lo, hi = (float(x) for x in ci.strip("[]").split(", "))
    return f"[{-hi:+.2f}, {-lo:+.2f}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dense", "rigl", "set"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tiny", action="store_true", help="a seconds-long grid for tests")
    p.add_argument("--out", default="runs/wide-lm")
    p.add_argument("--report", metavar="JSONL", help="print the tables of a finished grid")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report, os.path.splitext(args.report)[0] + ".md"))
        return
    torch.set_num_threads(1)
    cfg = TINY if args.tiny else CONFIG
    data = {"train": read_corpus(TRAIN_FILES), "val": read_corpus(VAL_FILES),
            "test": read_corpus(TEST_FILES)}  # fmt: skip
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in data.values())).hexdigest()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r["config"] == asdict(cfg):
                    done.add((r["method"], r["sparsity"], r["seed"]))
    jobs = [
        {"method": m, "sparsity": 0.0 if m == "dense" else s, "seed": seed}
        for seed in args.seeds
        for m in args.methods
        for s in ([0.0] if m == "dense" else args.sparsities)
    ]
    jobs = [j for j in jobs if (j["method"], j["sparsity"], j["seed"]) not in done]
    print(f"{len(jobs)} cells to run ({len(done)} done), corpus sha256 {digest[:16]}", flush=True)
    start = time.perf_counter()
    for n, job in enumerate(jobs, 1):
        records = run_cell(cfg, job, data)
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps({**r, "corpus_sha256": digest}) + "\n")
        text = ", ".join(f"{r['arm']} {r['bpb']['val']:.4f}" for r in records)
        print(f"[{n}/{len(jobs)} {time.perf_counter() - start:.0f}s] {job['method']} "
              f"{job['sparsity']} seed {job['seed']}: val bpb {text}", flush=True)  # fmt: skip
    print(report(path, os.path.join(args.out, "results.md")))


if __name__ == "__main__":
    main()
