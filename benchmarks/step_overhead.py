"""Steady-state overhead of ``SparseOptimizer.step()`` over the inner optimizer's step.

Table 1, per parameter set (a small CNN, ResNet-50, a 100M-parameter transformer-like stack) and
inner optimizer (SGD momentum foreach/fused, AdamW foreach/fused): the median time of the inner
optimizer's ``step()`` alone and of ``SparseOptimizer.step()`` wrapping a second instance of the
same optimizer over the SAME parameter tensors, on a step with no topology update (method
``"set"``, ``update_every=10**9``). The two are called alternately, one call each per round,
after warm-up. ``mask`` is the wrapper's masking kernel alone (``apply_masks_`` on the gradients),
``floor`` the memory-bandwidth floor of that masking work: 9 bytes per sparse weight (read the
float32 gradient and the uint8 mask, write the gradient) divided by the bandwidth of a large
``torch.add`` measured in the same run.

Table 2: a full training iteration (forward, backward, step) of the small CNN on a CIFAR-sized
batch, with the plain inner optimizer and with ``SparseOptimizer`` around it, on two copies of the
model, alternated.

    .venv/bin/python benchmarks/step_overhead.py --threads 1,2 --json runs/step_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt import SparseOptimizer
from sparseopt.masks import apply_masks_

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "sgd-foreach": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True
    ),
    "sgd-fused": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True
    ),
    "sgd-foreach-nowd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True),
}
DEFAULT_OPTIMIZERS = "sgd-foreach,sgd-foreach-nowd,sgd-fused,adamw-foreach,adamw-fused"
MASK_BYTES = 9  # per sparse weight: read grad (4) + read uint8 mask (1) + write grad (4)


def bench_step(
    set_name: str, optimizers: Sequence[str], repeats: int, warmup: int, bw: float
) -> list[dict[str, Any]]:
    shapes = C.param_set(set_name)
    params = C.make_params(shapes)
    n_total = sum(p.numel() for p in params)
    n_sparse = sum(p.numel() for p in params if p.ndim >= 2)
    rows = []
    for name in optimizers:
        inner = OPTIMIZERS[name](params)
        wrapped = SparseOptimizer(OPTIMIZERS[name](params), "set", 0.9, update_every=10**9, seed=0)
        grads = [p.grad for p in params if p.ndim >= 2]
        masks = list(wrapped.masks.values())
        times = C.time_interleaved(
            {
                "inner": inner.step,
                "wrapped": wrapped.step,
                "mask": lambda g=grads, m=masks: apply_masks_(g, m),
            },
            repeats,
            warmup,
        )
        assert wrapped.last_update_step is None, "a topology update ran: not steady state"
        t_in, t_wr, t_mask = (C.median(times[k]) for k in ("inner", "wrapped", "mask"))
        paired = C.median([w / i for w, i in zip(times["wrapped"], times["inner"], strict=True)])
        floor = MASK_BYTES * n_sparse / bw
        rows.append(
            {
                "params": set_name,
                "N (M)": n_total / 1e6,
                "sparse N (M)": n_sparse / 1e6,
                "optimizer": name,
                "inner ms": 1e3 * t_in,
                "wrapped ms": 1e3 * t_wr,
                "ratio": t_wr / t_in,
                "paired ratio": paired,
                "overhead ms": 1e3 * (t_wr - t_in),
                "mask ms": 1e3 * t_mask,
                "floor ms": 1e3 * floor,
                "mask/floor": t_mask / floor,
                "overhead/floor": (t_wr - t_in) / floor,
            }
        )
        del inner, wrapped, times
        gc.collect()
    del params
    gc.collect()
    return rows


def bench_iteration(
    batch: int, width: int, repeats: int, warmup: int, optimizer: str
) -> dict[str, Any]:
    torch.manual_seed(0)
    model_a = C.SmallCNN(width).to(C.DEVICE)
    model_b = copy.deepcopy(model_a)
    opt_a = OPTIMIZERS[optimizer](list(model_a.parameters()))
    opt_b = SparseOptimizer(
        OPTIMIZERS[optimizer](list(model_b.parameters())),
        "set",
        0.9,
        update_every=10**9,
        model=model_b,
        seed=0,
    )
    x = torch.randn(batch, 3, 32, 32).to(C.DEVICE)
    y = torch.randint(0, 10, (batch,)).to(C.DEVICE)

    def it(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run

    times = C.time_interleaved(
        {"unwrapped": it(model_a, opt_a), "wrapped": it(model_b, opt_b)}, repeats, warmup
    )
    t_a, t_b = C.median(times["unwrapped"]), C.median(times["wrapped"])
    ratios = [b / a for a, b in zip(times["unwrapped"], times["wrapped"], strict=True)]
    paired = C.median(ratios)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [paired] * 3
    n = sum(p.numel() for p in model_a.parameters())
    return {
        "model": f"SmallCNN(width={width}), {n / 1e6:.3f}M params",
        "batch": f"{batch}x3x32x32",
        "optimizer": optimizer,
        "unwrapped ms": 1e3 * t_a,
        "wrapped ms": 1e3 * t_b,
        "ratio": t_b / t_a,
        "paired ratio": paired,
        "paired IQR": f"[{q[0]:.3f}, {q[2]:.3f}]",
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="cnn,resnet50,transformer", help="parameter sets")
    ap.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help=",".join(OPTIMIZERS))
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds (step table)")
    ap.add_argument("--big-repeats", type=int, default=10, help="timed rounds above 50M params")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    ap.add_argument("--iter-repeats", type=int, default=40, help="timed rounds (iteration table)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--no-iteration", action="store_true", help="skip the training-iteration table")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    C.add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.big_repeats, args.warmup = "tiny", 3, 2, 1
        args.iter_repeats, args.batch, args.width, args.threads = 3, 4, 8, "1"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    C.use_device(args.device)
    cmd = "benchmarks/step_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    threads = [int(t) for t in args.threads.split(",")]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    before = torch.get_num_threads()
    out: dict[str, Any] = {"machine": C.machine_info(), "command": cmd, "step": [], "iteration": []}
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            bw = C.bandwidth(1 << 22 if args.quick else 1 << 25)
            for s in sizes:
                big = sum(math_prod(sh) for sh in C.param_set(s)) > 50e6
                rows = bench_step(
                    s, optimizers, args.big_repeats if big else args.repeats, args.warmup, bw
                )
                for r in rows:
                    r["threads"] = nt
                    r["GB/s"] = bw / 1e9
                out["step"] += rows
            if not args.no_iteration:
                row = bench_iteration(
                    args.batch, args.width, args.iter_repeats, args.warmup, "sgd-foreach"
                )
                row["threads"] = nt
                out["iteration"].append(row)
    finally:
        torch.set_num_threads(before)
    text = C.header("Steady-state step overhead", cmd.split(), args.threads)
    text += "\n" + C.markdown_table(
        out["step"],
        [
            "threads",
            "params",
            "N (M)",
            "optimizer",
            "inner ms",
            "wrapped ms",
            "ratio",
            "paired ratio",
            "overhead ms",
            "mask ms",
            "floor ms",
            "mask/floor",
            "overhead/floor",
        ],
    )
    if out["iteration"]:
        text += "\n\nFull training iteration (forward + backward + step):\n\n"
        text += C.markdown_table(
            out["iteration"],
            [
                "threads",
                "model",
                "batch",
                "optimizer",
                "unwrapped ms",
                "wrapped ms",
                "ratio",
                "paired ratio",
                "paired IQR",
            ],
        )
    print(text, flush=True)
    out["markdown"] = text
    C.write_json(args.json, out)
    return out


def math_prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
