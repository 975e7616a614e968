"""Latency of the structured inference layers of ``sparseopt.export`` against dense and CSR.

Table 1 (CPU, constant fan-in): one ``nn.Linear`` whose rows each hold ``k = round((1 - s) *
in_features)`` active weights at random positions (``sparseopt.structure.random_structured``),
run four ways on the same weights, interleaved: ``dense`` (``F.linear``), ``csr``
(``SparseLinear``, what unstructured export gives), ``condensed`` (``CondensedLinear``, eager:
``torch.mv`` on a CSR view for one row, ``F.embedding_bag`` for more) and ``compiled``
(``CondensedLinear(compile=True)``: the fused gather-multiply-sum through ``torch.compile``, the
SRigL formulation). Ratios are ``dense / variant`` (above 1: faster than dense) and
``csr / condensed``. The ``rule`` column is what ``fan_in_min_sparsity_rule`` decides for that
layer and batch. It is the measurement behind that rule and behind ``compile=False``.

Table 2 (CUDA only, 2:4): ``nn.Linear`` in float16 against ``SemiStructuredLinear``
(``torch.sparse.to_sparse_semi_structured``) on the same 2:4 weights, batch 1 and 256. It is
skipped, with a line saying so, without a CUDA device of compute capability >= 8.0.

    .venv/bin/python benchmarks/structured_inference.py --json runs/structured_inference.json
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

from sparseopt.export import (
    CondensedLinear,
    SemiStructuredLinear,
    SparseLinear,
    fan_in_min_sparsity_rule,
    semi_structured_unsupported,
)
from sparseopt.structure import random_structured, row_count, select_structured


def fan_in_layer(out_f: int, in_f: int, sparsity: float, seed: int = 0) -> tuple[nn.Linear, Any]:
    """A Linear with a random constant fan-in mask of ``round((1 - sparsity) * in_f)`` per row."""
    g = torch.Generator().manual_seed(seed)
    k = row_count((out_f, in_f), 1 - sparsity)
    mask = random_structured((out_f, in_f), "fan_in", g, k)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g).mul_(in_f**-0.5) * mask)
    return layer, mask


def bench_fan_in(
    shapes: Sequence[tuple[int, int]],
    sparsities: Sequence[float],
    batches: Sequence[int],
    repeats: int,
    compiled: bool,
) -> list[dict[str, Any]]:
    rows = []
    for out_f, in_f in shapes:
        for s in sparsities:
            layer, mask = fan_in_layer(out_f, in_f, s)
            variants = {
                "dense": layer,
                "csr": SparseLinear(layer),
                "condensed": CondensedLinear(layer, mask),
            }
            if compiled:
                variants["compiled"] = CondensedLinear(layer, mask, compile=True)
            for b in batches:
                x = torch.randn(b, in_f)
                with torch.inference_mode():
                    ref = layer(x)
                    for name, m in variants.items():
                        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4, msg=name)
                    times = C.time_interleaved(
                        {n: (lambda m=m, x=x: m(x)) for n, m in variants.items()}, repeats
                    )
                med = {n: C.median(t) for n, t in times.items()}
                row: dict[str, Any] = {
                    "shape": f"{out_f}x{in_f}",
                    "sparsity": s,
                    "k": int(mask[0].sum()),
                    "batch": b,
                }
                row.update({f"{n} ms": 1e3 * t for n, t in med.items()})
                row["dense/csr"] = med["dense"] / med["csr"]
                row["dense/condensed"] = med["dense"] / med["condensed"]
                row["csr/condensed"] = med["csr"] / med["condensed"]
                if compiled:
                    row["dense/compiled"] = med["dense"] / med["compiled"]
                rule = fan_in_min_sparsity_rule(out_f * in_f, b)
                row["rule"] = "condensed" if s >= rule - 0.005 else "dense"
                rows.append(row)
    return rows


def gpu_capable() -> str:
    """Why the 2:4 GPU table cannot run here, or ``""``."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return semi_structured_unsupported(torch.zeros(64, 64, dtype=torch.float16, device="cuda"))


def bench_two_four(
    shapes: Sequence[tuple[int, int]], batches: Sequence[int], repeats: int
) -> list[dict[str, Any]]:
    """2:4 (``SemiStructuredLinear``) against dense ``nn.Linear``, float16, on CUDA."""
    device = C.use_device("cuda")
    rows = []
    try:
        for out_f, in_f in shapes:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
            mask = select_structured(w.abs(), "2:4")
            layer = nn.Linear(in_f, out_f).half().to(device)
            with torch.no_grad():
                layer.weight.copy_((w * mask).half())
            sparse = SemiStructuredLinear(layer)
            for b in batches:
                x = torch.randn(b, in_f, generator=g).half().to(device)
                with torch.inference_mode():
                    torch.testing.assert_close(sparse(x), layer(x), rtol=1e-2, atol=1e-2)
                    times = C.time_interleaved(
                        {
                            "dense": lambda m=layer, x=x: m(x),
                            "2:4": lambda m=sparse, x=x: m(x),
                        },
                        repeats,
                    )
                dense_t, sparse_t = C.median(times["dense"]), C.median(times["2:4"])
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "batch": b,
                        "dense ms": 1e3 * dense_t,
                        "2:4 ms": 1e3 * sparse_t,
                        "dense/2:4": dense_t / sparse_t,
                    }
                )
    finally:
        C.use_device("cpu")
    return rows


def _shapes(text: str) -> list[tuple[int, int]]:
    if text == "none":
        return []
    return [(int(a), int(b)) for a, b in (s.split("x") for s in text.split(","))]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,1024x1024,512x512,256x256", help="out x in, CPU")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per row")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    ap.add_argument("--gpu-shapes", default="4096x4096,8192x8192,16384x4096", help="or 'none'")
    ap.add_argument("--gpu-batches", default="1,256")
    ap.add_argument("--quick", "--smoke", action="store_true", help="tiny sizes: seconds")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.sparsities, args.batches, args.threads = "64x64", "0.9", "1,4", "1"
        args.repeats, args.no_compile, args.gpu_shapes, args.gpu_batches = 2, True, "128x128", "8"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cmd = "benchmarks/structured_inference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    shapes = _shapes(args.shapes)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    before = torch.get_num_threads()
    out: dict[str, Any] = {"rows": [], "gpu": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for nt in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(nt)
                for row in bench_fan_in(
                    shapes, sparsities, batches, args.repeats, not args.no_compile
                ):
                    out["rows"].append({"threads": nt, **row})
            torch.set_num_threads(before)
            gpu_skip = gpu_capable()
            gpu_shapes = _shapes(args.gpu_shapes)
            if not gpu_skip and gpu_shapes:
                gpu_batches = [int(b) for b in args.gpu_batches.split(",")]
                out["gpu"] = bench_two_four(gpu_shapes, gpu_batches, args.repeats)
    finally:
        torch.set_num_threads(before)
    text = C.header("Structured inference latency", cmd.split(), args.threads)
    text += (
        "\nOne Linear with constant fan-in, dense vs CSR vs condensed (eager and compiled), "
        "CPU:\n\n"
    )
    text += C.markdown_table(out["rows"])
    text += "\n\n2:4 semi-structured vs dense, float16, CUDA:\n\n"
    if out["gpu"]:
        text += C.markdown_table(out["gpu"])
    else:
        text += f"(skipped: {gpu_skip or 'no GPU shapes'})"
    return C.publish(text, cmd, args.json, **out)


if __name__ == "__main__":
    main()
