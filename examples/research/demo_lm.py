"""A character-level language model trained sparse, with and without Sup-tickets, on CPU.

A small GPT-style decoder (plain torch: token and position embeddings, pre-norm blocks of causal
self-attention and a 4x MLP, a final LayerNorm, an output layer tied to the token embedding)
learns to predict the next byte of Python source code: the standard library's own ``.py`` files,
read from ``sysconfig.get_paths()["stdlib"]`` of the running interpreter, so nothing is
downloaded. The grid trains dense, then RigL and SET at 80% and 90% sparsity with AdamW, each with
its base schedule alone (linear warm-up, cosine decay) and with the Sup-tickets booster
(``SupTicketsScheduler`` with that schedule as its phase-1 ``base``), over 3 seeds, and reports
the validation loss in bits per character (byte) as mean ± std and as the paired per-seed
difference Sup-tickets minus base.

    python examples/research/demo_lm.py                      # the default grid (make demo-lm)
    python examples/research/demo_lm.py --tiny --out runs/t  # a seconds-long smoke run (the test)
    python examples/research/demo_lm.py --methods rigl --sparsities 0.9 --seeds 0 1 2 3 4

Corpus (fixed, documented): ``TRAIN_FILES`` for training and ``VAL_FILES`` for validation, whole
files, so validation is code the model never saw. Characters are UTF-8 bytes (a vocabulary of
256). The files differ between Python versions: ``results.json`` records the version and a
SHA-256 of the corpus; the table in ``docs/reproducing.md`` is for Python 3.11.

Which weights are sparse: the attention projections (``qkv``, ``proj``) and the MLP weights
(``fc``, ``out``) of every block, through ``sparseopt.integrations.hf.param_groups``; the
embeddings (and so the tied output layer) and every LayerNorm and bias stay dense. Pass
``--sparse-embeddings`` to make the embeddings sparse too, or build your own param groups with
``"sparse": False`` on what should stay dense.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt import SparseOptimizer, SupTicketsScheduler
from sparseopt.integrations.hf import param_groups

# Whole standard-library files, present from Python 3.10 to 3.13. About 400 kB and 83 kB on 3.11.
TRAIN_FILES = (
    "argparse.py", "calendar.py", "dataclasses.py", "difflib.py", "fractions.py",
    "functools.py", "heapq.py", "shlex.py", "string.py", "textwrap.py",
)  # fmt: skip
VAL_FILES = ("configparser.py", "contextlib.py")
VOCAB = 256  # bytes


def read_corpus(files: tuple[str, ...], root: str | None = None) -> torch.Tensor:
    """The bytes of ``files`` (in this order, joined by a newline) as a uint8 tensor."""
    root = root or sysconfig.get_paths()["stdlib"]
    data = b"\n".join(Path(root, name).read_bytes() for name in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


@dataclass(frozen=True)
class Config:
    """Model and training settings of one grid (the defaults are ``make demo-lm``'s)."""

    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 64
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 15
    update_every: int = 25
    cycle_steps: int = 15
    superpose_fraction: float = 0.2
    lr_low: float = 3e-4
    lr_high: float = 1e-3
    explore_rate: float = 0.1
    val_windows: int = 256


TINY = Config(layers=1, width=32, heads=2, context=32, batch=8, steps=24, warmup=2,
              update_every=4, cycle_steps=4, superpose_fraction=0.34, val_windows=16)  # fmt: skip


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """A GPT-style decoder over bytes; the output layer is the token embedding (tied)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T


def base_lambda(total: int, warmup: int, floor: float) -> Any:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def val_batches(val: torch.Tensor, cfg: Config) -> torch.Tensor:
    """``val_windows`` fixed windows of ``context + 1`` bytes, evenly spaced over the split."""
    starts = torch.linspace(0, len(val) - cfg.context - 1, cfg.val_windows).long()
    return torch.stack([val[s : s + cfg.context + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy in nats over the windows."""
    model.eval()
    total = 0.0
    for chunk in windows.split(64):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()  # fmt: skip
    model.train()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def train_one(
    cfg: Config, method: str, sparsity: float, sup: bool, seed: int, train: torch.Tensor,
    windows: torch.Tensor, sparse_embeddings: bool = False, progress: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """One run; returns its validation loss (nats and bits per byte) and final density."""
    torch.manual_seed(seed)
    model = CharGPT(cfg)
    groups = param_groups(model, cfg.weight_decay, sparse_embeddings=sparse_embeddings)
    opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    sched: Any
    if method == "dense":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, base_lambda(cfg.steps, cfg.warmup, 0.0))
    else:
        opt = SparseOptimizer(opt, method, sparsity, update_every=cfg.update_every,
                              total_steps=cfg.steps, model=model, seed=seed)  # fmt: skip
        if sup:
            floor = cfg.lr_low / cfg.lr  # phase 1 ends where the cycles start

            def base(opt: Any, phase1: int) -> torch.optim.lr_scheduler.LambdaLR:
                return torch.optim.lr_scheduler.LambdaLR(
                    opt, base_lambda(phase1, cfg.warmup, floor)
                )

            sched = SupTicketsScheduler(
                opt, cfg.steps, cfg.cycle_steps, base=base,
                superpose_fraction=cfg.superpose_fraction, lr_low=cfg.lr_low,
                lr_high=cfg.lr_high, explore_rate=cfg.explore_rate,
            )  # fmt: skip
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, base_lambda(cfg.steps, cfg.warmup, 0.0))
    g = torch.Generator().manual_seed(10_000 + seed)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(train) - cfg.context - 1, (cfg.batch,), generator=g)
        chunk = torch.stack([train[i : i + cfg.context + 1] for i in idx.tolist()]).long()
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
    nats = evaluate(model, windows)
    density = opt.density if isinstance(opt, SparseOptimizer) else 1.0
    return {
        "method": method, "sparsity": sparsity if method != "dense" else 0.0, "sup": sup,
        "seed": seed, "val_loss": nats, "val_bpc": nats / math.log(2), "density": density,
        "train_loss_last": loss.item(), "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }  # fmt: skip


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table of validation bits per byte, and its rows."""
    rows, lines = (
        [],
        [
            "| method | sparsity | base bpc | Sup-tickets bpc | Sup − base (paired) | per seed |",
            "|---|---|---|---|---|---|",
        ],
    )
    dense = [r["val_bpc"] for r in runs if r["method"] == "dense"]
    if dense:
        m, s = mean_std(dense)
        lines.append(f"| dense | 0 | {m:.4f} ± {s:.4f} | – | – | – |")
        rows.append({"method": "dense", "sparsity": 0.0, "base_mean": m, "base_std": s})
    cells = sorted({(r["method"], r["sparsity"]) for r in runs if r["method"] != "dense"})
    for method, sparsity in cells:
        arm = {
            sup: {r["seed"]: r["val_bpc"] for r in runs
                  if (r["method"], r["sparsity"], r["sup"]) == (method, sparsity, sup)}
            for sup in (False, True)
        }  # fmt: skip
        row: dict[str, Any] = {"method": method, "sparsity": sparsity}
        text = []
        for sup, key in ((False, "base"), (True, "sup")):
            if arm[sup]:
                m, s = mean_std(list(arm[sup].values()))
                row[f"{key}_mean"], row[f"{key}_std"] = m, s
                text.append(f"{m:.4f} ± {s:.4f}")
            else:
                text.append("–")
        seeds = sorted(set(arm[False]) & set(arm[True]))
        diffs = [arm[True][s] - arm[False][s] for s in seeds]
        if diffs:
            m, s = mean_std(diffs)
            row.update(diff_mean=m, diff_std=s, diffs=diffs)
            text += [f"{m:+.4f} ± {s:.4f}", " ".join(f"{d:+.4f}" for d in diffs)]
        else:
            text += ["–", "–"]
        rows.append(row)
        lines.append(f"| {method} | {sparsity:g} | " + " | ".join(text) + " |")
    return "\n".join(lines), rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["dense", "rigl", "set"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--no-sup", action="store_true", help="only the base schedule")
    p.add_argument("--tiny", action="store_true", help="a seconds-long grid for tests")
    p.add_argument("--sparse-embeddings", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (1 thread each)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/lm")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TINY if args.tiny else Config()
    if args.steps is not None:
        cfg = Config(**{**asdict(cfg), "steps": args.steps})
    if args.tiny:
        args.seeds = args.seeds[:1] if argv is None or "--seeds" not in argv else args.seeds
    train, val = read_corpus(TRAIN_FILES), read_corpus(VAL_FILES)
    digest = hashlib.sha256(train.numpy().tobytes() + val.numpy().tobytes()).hexdigest()
    windows = val_batches(val, cfg)
    jobs = []
    for method in args.methods:
        if method == "dense":
            jobs += [("dense", 0.0, False, s) for s in args.seeds]
            continue
        for sparsity in args.sparsities:
            for sup in (False,) if args.no_sup else (False, True):
                jobs += [(method, sparsity, sup, s) for s in args.seeds]
    jobs.sort(key=lambda job: job[3])  # seed by seed: a partial grid still pairs its seeds
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs) * cfg.steps, unit="step", desc=f"{len(jobs)} runs")
    os.makedirs(args.out, exist_ok=True)
    runs: list[dict[str, Any]] = []
    start, cpu = time.perf_counter(), time.process_time()
    header = {
        "config": asdict(cfg), "python": platform.python_version(), "torch": torch.__version__,
        "corpus": {"train": TRAIN_FILES, "val": VAL_FILES, "train_bytes": len(train),
                   "val_bytes": len(val), "sha256": digest},
        "workers": args.workers,
    }  # fmt: skip

    def record(run: dict[str, Any]) -> None:  # the files are rewritten after every run
        runs.append(run)
        text, rows = table(runs)
        result.update(runs=runs, table=rows, seconds=time.perf_counter() - start)
        Path(args.out, "results.json").write_text(json.dumps(result, indent=1))
        Path(args.out, "table.md").write_text(text + "\n")
        if bar is not None:
            bar.update(cfg.steps if args.workers > 1 else 0)
            arm = "sup" if run["sup"] else "base"
            bar.set_postfix_str(f"{run['method']} {run['sparsity']:g} {arm} seed {run['seed']}")

    result: dict[str, Any] = dict(header)
    common = (train, windows, args.sparse_embeddings)
    if args.workers > 1:
        ctx = mp.get_context("fork")  # the workers inherit the corpus; one torch thread each
        with ctx.Pool(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending = [pool.apply_async(train_one, (cfg, *job, *common)) for job in jobs]
            for p in pending:
                record(p.get())
    else:
        for job in jobs:
            record(train_one(cfg, *job, *common, progress=bar))
    if bar is not None:
        bar.close()
    text, _ = table(runs)
    result["cpu_seconds_main"] = time.process_time() - cpu
    Path(args.out, "results.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"{len(runs)} runs in {result['seconds']:.0f} s; {args.out}/results.json")
    return result


if __name__ == "__main__":
    main()
