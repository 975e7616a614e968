"""Latency of ``sparseopt.to_sparse_inference`` against the dense model, on CPU.

Table 1 (the rule): one ``nn.Linear`` of several shapes, dense ``F.linear`` against the CSR layer
(``SparseLinear``) at several sparsities and batch sizes, 1 and 2 threads. It is the measurement
behind ``sparseopt.export.min_sparsity_rule``.

Table 2 (general convolutions): a 3x3 ``nn.Conv2d`` against ``F.unfold`` (im2col) followed by a
CSR GEMM, the only way to run it sparse with torch's kernels. ``to_sparse_inference`` leaves such
convolutions dense; this table is why.

Table 3 (models): an MLP (784 -> 2048 -> 2048 -> 10), a GPT-like stack (4 pre-norm transformer
blocks of ``nn.Linear``, width 512, one token per sequence: the rows of every GEMM are the batch)
and the digits CNN of ``examples/research/models.py``, each with random unstructured masks at the
given sparsity in every ``Linear``/``Conv2d`` weight. Three variants of the same weights run
interleaved: ``dense``, ``all`` (every convertible layer as CSR, ``min_sparsity=0``) and ``rule``
(``to_sparse_inference``'s default rule for that batch size), under ``torch.inference_mode()``.
Ratios are dense time / variant time: above 1 the sparse copy is faster.

    .venv/bin/python benchmarks/inference.py --json runs/inference.json
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "research"
    ),
)
import _common as C
from models import DigitsCNN

from sparseopt.export import SparseLinear, min_sparsity_rule, to_sparse_inference


class Block(nn.Module):
    """A pre-norm transformer block: fused QKV, causal attention, output projection, 4x MLP."""

    def __init__(self, d: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def gpt_like(width: int = 512, blocks: int = 4) -> nn.Module:
    """``blocks`` transformer blocks of width ``width`` and a final LayerNorm (12.6M at 512x4)."""
    return nn.Sequential(*[Block(width) for _ in range(blocks)], nn.LayerNorm(width))


def mlp(width: int = 2048) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


MODELS = {
    "mlp": (mlp, lambda b: torch.randn(b, 784)),
    "gpt-like": (gpt_like, lambda b: torch.randn(b, 1, 512)),
    "digits-cnn": (DigitsCNN, lambda b: torch.randn(b, 1, 8, 8)),
}


def random_masks_(model: nn.Module, sparsity: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)


def _ratios(times: dict[str, list[float]], base: str = "dense") -> dict[str, float]:
    out = {f"{base} ms": 1e3 * C.median(times[base])}
    for k, ts in times.items():
        if k != base:
            out[f"{k} ms"] = 1e3 * C.median(ts)
            out[f"{base}/{k}"] = C.median(times[base]) / C.median(ts)
    return out


def bench_grid(
    shapes: Sequence[tuple[int, int]],
    sparsities: Sequence[float],
    batches: Sequence[int],
    repeats: int,
) -> list[dict[str, Any]]:
    rows = []
    for out_f, in_f in shapes:
        for s in sparsities:
            layer = nn.Linear(in_f, out_f)
            random_masks_(layer, s)
            sparse = SparseLinear(layer)
            for b in batches:
                x = torch.randn(b, in_f)
                with torch.inference_mode():
                    times = C.time_interleaved(
                        {
                            "dense": lambda m=layer, x=x: m(x),
                            "csr": lambda m=sparse, x=x: m(x),
                        },
                        repeats,
                    )
                rule = min_sparsity_rule(out_f * in_f, b)
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "sparsity": s,
                        "batch": b,
                        **_ratios(times),
                        "rule converts": "yes" if s >= rule else "no",
                    }
                )
    return rows


def im2col_csr_conv(conv: nn.Conv2d) -> Any:
    """A kxk convolution as unfold (im2col) + a CSR GEMM: what a sparse general conv would be."""
    w = conv.weight.detach()
    csr = w.reshape(w.shape[0], -1).to_sparse_csr()

    def run(x: Tensor) -> Tensor:
        n, _, h, wd = x.shape
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        out = torch.sparse.mm(csr, cols.transpose(0, 1).reshape(cols.shape[1], -1))
        ho = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        wo = (wd + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        return out.reshape(w.shape[0], n, ho, wo).transpose(0, 1)

    return run


def bench_conv(
    shapes: Sequence[tuple[int, int, int]],
    sparsities: Sequence[float],
    batches: Sequence[int],
    repeats: int,
) -> list[dict[str, Any]]:
    """3x3 convolutions (c_in, c_out, map size): oneDNN's dense conv vs im2col + CSR."""
    rows = []
    for c_in, c_out, size in shapes:
        for s in sparsities:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            random_masks_(conv, s)
            sparse = im2col_csr_conv(conv)
            for b in batches:
                x = torch.randn(b, c_in, size, size)
                with torch.inference_mode():
                    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-4)
                    times = C.time_interleaved(
                        {
                            "dense": lambda m=conv, x=x: m(x),
                            "im2col+csr": lambda m=sparse, x=x: m(x),
                        },
                        repeats,
                    )
                rows.append(
                    {
                        "conv 3x3": f"{c_in}->{c_out} on {size}x{size}",
                        "sparsity": s,
                        "batch": b,
                        **_ratios(times),
                    }
                )
    return rows


def bench_models(
    models: Sequence[str], sparsities: Sequence[float], batches: Sequence[int], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        build, make_input = MODELS[name]
        for s in sparsities:
            torch.manual_seed(0)
            dense = build().eval()
            random_masks_(dense, s)
            everything = to_sparse_inference(dense, min_sparsity=0.0)
            n_layers = len(everything.sparse_inference_report)
            for b in batches:
                ruled = to_sparse_inference(dense, batch_size=b)
                x = make_input(b)
                with torch.inference_mode():
                    ref = dense(x)
                    for m in (everything, ruled):
                        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
                    times = C.time_interleaved(
                        {
                            "dense": lambda m=dense, x=x: m(x),
                            "all": lambda m=everything, x=x: m(x),
                            "rule": lambda m=ruled, x=x: m(x),
                        },
                        repeats,
                    )
                rows.append(
                    {
                        "model": name,
                        "sparsity": s,
                        "batch": b,
                        **_ratios(times),
                        "sparse layers all": (
                            f"{len(everything.sparse_inference_report.converted)}/{n_layers}"
                        ),
                        "sparse layers rule": (
                            f"{len(ruled.sparse_inference_report.converted)}/{n_layers}"
                        ),
                    }
                )
    return rows


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=",".join(MODELS))
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per model row")
    ap.add_argument("--grid-repeats", type=int, default=15, help="timed rounds per grid row")
    ap.add_argument(
        "--grid-shapes", default="256x256,512x512,2048x512,512x2048", help="out x in, or 'none'"
    )
    ap.add_argument(
        "--conv-shapes", default="16->32@8,64->64@16,256->256@8", help="c_in->c_out@size, or 'none'"
    )
    ap.add_argument("--smoke", "--quick", action="store_true", help="tiny sizes: seconds")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.sparsities, args.batches, args.threads = "digits-cnn", "0.95", "1", "1"
        args.repeats, args.grid_repeats, args.grid_shapes = 2, 2, "64x64"
        args.conv_shapes = "8->8@4"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cmd = "benchmarks/inference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    shapes = (
        []
        if args.grid_shapes == "none"
        else [tuple(int(v) for v in s.split("x")) for s in args.grid_shapes.split(",")]
    )
    before = torch.get_num_threads()
    convs = (
        []
        if args.conv_shapes == "none"
        else [
            (int(a), int(b.split("@")[0]), int(b.split("@")[1]))
            for a, b in (c.split("->") for c in args.conv_shapes.split(","))
        ]
    )
    out: dict[str, Any] = {"grid": [], "conv": [], "rows": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for nt in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(nt)
                for row in bench_grid(shapes, sparsities, batches, args.grid_repeats):
                    out["grid"].append({"threads": nt, **row})
                for row in bench_conv(convs, sparsities, batches, args.grid_repeats):
                    out["conv"].append({"threads": nt, **row})
                models = [m for m in args.models.split(",") if m not in ("", "none")]
                for row in bench_models(models, sparsities, batches, args.repeats):
                    out["rows"].append({"threads": nt, **row})
    finally:
        torch.set_num_threads(before)
    text = C.header("Sparse inference latency", cmd.split(), args.threads)
    text += "\nOne Linear layer, dense vs CSR (the rule's measurement):\n\n"
    text += C.markdown_table(out["grid"])
    text += "\n\n3x3 convolution, dense (oneDNN) vs im2col + CSR (not in the library):\n\n"
    text += C.markdown_table(out["conv"])
    text += "\n\nModels, dense vs every layer CSR (`all`) vs the default rule (`rule`):\n\n"
    text += C.markdown_table(out["rows"])
    return C.publish(text, cmd, args.json, **out)


if __name__ == "__main__":
    main()
