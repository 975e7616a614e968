"""The fused path: ``torch.compile(opt.step)`` of ``SparseOptimizer`` against the inner step.

Eager, the wrapper's steady-state step is the inner step plus one foreach pass over the gradients
(read grad and mask, write grad). ``torch.compile(opt.step)`` traces only the inner step; the
mask pass stays eager (``SparseOptimizer`` runs it in a ``torch.compiler.disable``d helper),
because torch's ``Optimizer.step`` breaks the graph before the update, so the mask cannot fuse
into it, and inductor's CPU code for the mask multiply is slower than the eager kernel. The
``hand-fused`` row shows what a true fusion of mask and update gives. This times, on one
parameter set, interleaved after warm-up, each on its own copy of the parameters:

- ``inner``: ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4, foreach=True).step()``, eager.
- ``wrapped``: ``SparseOptimizer`` around the same SGD, eager (the default path).
- ``compiled inner``: ``torch.compile(inner.step)``.
- ``compiled wrapped``: ``torch.compile(opt.step)`` of the ``SparseOptimizer``: the compiled
  inner step plus the eager mask pass (steady state: no topology update runs).
- ``hand-fused``: one ``torch.compile``-d function doing, per sparse tensor,
  ``d = grad * mask + wd * p; buf = momentum * buf + d; p -= lr * buf`` (and the same without the
  mask for dense tensors): the masked SGD step in one pass, 21 bytes per weight, for reference.

The learning rate is a tensor, as the PyTorch recipe for compiled optimizers advises, so that an
LR scheduler causes no recompilation.

    .venv/bin/python benchmarks/compiled_step.py --sizes resnet50 --json runs/compiled.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt import SparseOptimizer

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


def _masked_sgd(params, grads, bufs, masks) -> None:  # type: ignore[no-untyped-def]
    for p, g, b, m in zip(params, grads, bufs, masks, strict=True):
        d = g * m + WD * p
        b.mul_(MOMENTUM).add_(d)
        p.sub_(LR * b)


def _plain_sgd(params, grads, bufs) -> None:  # type: ignore[no-untyped-def]
    for p, g, b in zip(params, grads, bufs, strict=True):
        d = g + WD * p
        b.mul_(MOMENTUM).add_(d)
        p.sub_(LR * b)


def _sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=torch.tensor(LR), momentum=MOMENTUM, weight_decay=WD, foreach=True
    )


def _copy(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def bench(size: str, repeats: int, warmup: int) -> list[dict[str, Any]]:
    base = C.make_params(C.param_set(size))
    inner = _sgd(_copy(base))
    wrapped = SparseOptimizer(_sgd(_copy(base)), "set", 0.9, update_every=10**9, seed=0)
    c_inner = _sgd(_copy(base))
    c_wrapped = SparseOptimizer(_sgd(_copy(base)), "set", 0.9, update_every=10**9, seed=0)
    compiled_inner = torch.compile(c_inner.step)
    compiled_wrapped = torch.compile(c_wrapped.step)

    params = _copy(base)
    sparse = [i for i, p in enumerate(base) if p.ndim >= 2]
    dense = [i for i, p in enumerate(base) if p.ndim < 2]
    masks = [m.view(torch.uint8) for m in wrapped.masks.values()]
    assert len(masks) == len(sparse)
    ps = [p.detach() for p in params]
    gs = [p.grad for p in params]
    bs = [torch.zeros_like(p) for p in ps]
    masked_fn = torch.compile(_masked_sgd, fullgraph=True)
    plain_fn = torch.compile(_plain_sgd, fullgraph=True)

    def hand_fused() -> None:
        masked_fn([ps[i] for i in sparse], [gs[i] for i in sparse], [bs[i] for i in sparse], masks)
        plain_fn([ps[i] for i in dense], [gs[i] for i in dense], [bs[i] for i in dense])

    compile_s = {}
    for name, fn in (
        ("compiled inner", compiled_inner),
        ("compiled wrapped", compiled_wrapped),
        ("hand-fused", hand_fused),
    ):
        t0 = C.clock()
        for _ in range(3):  # the first steps create the momentum buffers: two graphs
            fn()
        compile_s[name] = C.clock() - t0
    times = C.time_interleaved(
        {
            "inner": inner.step,
            "wrapped": wrapped.step,
            "compiled inner": compiled_inner,
            "compiled wrapped": compiled_wrapped,
            "hand-fused": hand_fused,
        },
        repeats,
        warmup,
    )
    assert wrapped.last_update_step is None, "a topology update ran: not steady state"
    assert c_wrapped.last_update_step is None, "a topology update ran: not steady state"
    for opt in (wrapped, c_wrapped):  # the compiled path keeps the invariants
        for layer in opt.layers:
            assert not layer.param[~layer.mask].any(), "an inactive weight is nonzero"
    t_in = C.median(times["inner"])
    t_cin = C.median(times["compiled inner"])
    return [
        {
            "params": size,
            "variant": k,
            "ms": 1e3 * C.median(v),
            "vs eager inner": C.median(v) / t_in,
            "vs compiled inner": C.median(v) / t_cin,
            "compile s": compile_s.get(k, float("nan")),
        }
        for k, v in times.items()
    ]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="resnet50")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny set (smoke test)")
    ap.add_argument("--json", default=None)
    C.add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.threads = "tiny", 2, 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    C.use_device(args.device)
    cmd = "benchmarks/compiled_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        raise SystemExit("torch.compile on CPU needs a C++ compiler (g++/gcc) on PATH")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows = []
    try:
        for size in args.sizes.split(","):
            rows += bench(size.strip(), args.repeats, args.warmup)
    finally:
        torch.set_num_threads(before)
    text = C.header("The fused path: torch.compile(opt.step)", cmd.split(), args.threads)
    text += "\n" + C.markdown_table(rows)
    return C.publish(text, cmd, args.json, rows=rows)


if __name__ == "__main__":
    main()
