"""Deploy a sparse model: the compact file, an exact reload, and sparse inference at batch 1.

    python examples/deploy.py            # an MLP trained at 95% sparsity, then deployed
    python examples/deploy.py --quick    # fewer steps and timing calls: a few seconds

After training, three calls:

- ``save_sparse(model, path, masks=opt.masks)`` writes only the active weights and their
  positions (and everything that is not sparse as it is);
- ``load_sparse(model, path)`` loads them into a freshly built model, bit for bit, and returns
  the masks;
- ``to_sparse_inference(model, batch_size=1)`` returns a copy whose layers that are faster sparse
  at that batch size compute with sparse kernels; ``.sparse_inference_report`` says which and why.

The script prints the file size against ``torch.save`` and the median batch-1 latency of the dense
model and of its sparse copy, timed interleaved (numbers depend on the machine).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseopt import SparseOptimizer, load_sparse, save_sparse, to_sparse_inference


def build_model() -> nn.Module:
    """Wide linear layers: the regime where a sparse matrix-vector product beats a dense one."""
    return nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def train(steps: int, sparsity: float) -> tuple[nn.Module, SparseOptimizer]:
    """RigL on a synthetic 10-class problem: the weights only need to be a trained sparse model."""
    torch.manual_seed(0)
    model = build_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = SparseOptimizer(inner, "rigl", sparsity, total_steps=steps, update_every=10, seed=0,
                          model=model)  # fmt: skip
    centers = torch.randn(10, 512)
    for _ in range(steps):
        y = torch.randint(0, 10, (64,))
        loss = F.cross_entropy(model(centers[y] + torch.randn(64, 512)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def median_ms(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median time of each function in milliseconds, calls interleaved (and warmed up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(3):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=200, help="timed calls of each model")
    p.add_argument("--out", default=None, help="the compact file (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="10 steps, 20 timed calls")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 10, 20
    model, opt = train(args.steps, args.sparsity)
    path = args.out or os.path.join(tempfile.mkdtemp(), "model.sparse")

    # 1. the compact file, with the exact masks (an active weight may be exactly 0)
    info = save_sparse(model, path, masks=opt.masks)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    dense_bytes = buffer.getbuffer().nbytes

    # 2. later, anywhere: a freshly built model, loaded bit for bit
    deployed = build_model()
    masks = load_sparse(deployed, path)
    state = deployed.state_dict()
    exact = all(torch.equal(state[name], t) for name, t in model.state_dict().items())
    exact &= all(torch.equal(masks[layer.name], layer.mask) for layer in opt.layers)

    # 3. sparse kernels where they are faster at batch 1
    fast = to_sparse_inference(deployed.eval(), batch_size=1)
    x = torch.randn(1, 512)
    with torch.inference_mode():
        error = (fast(x) - deployed(x)).abs().max().item()
        ms = median_ms({"dense": lambda: deployed(x), "sparse": lambda: fast(x)}, args.repeats)

    converted = fast.sparse_inference_report.converted
    print(
        f"compact file {path} ({info['format']}): {info['file_bytes'] / 1e6:.3f} MB, "
        f"torch.save {dense_bytes / 1e6:.3f} MB ({info['file_bytes'] / dense_bytes:.3f}x); "
        f"reloaded bit for bit: {exact}; sparse copy's largest output difference {error:.1e}\n"
        f"batch-1 latency: dense {ms['dense']:.3f} ms, sparse {ms['sparse']:.3f} ms "
        f"({ms['dense'] / ms['sparse']:.2f}x); sparse layers: {converted}"
    )
    return {"file_bytes": info["file_bytes"], "dense_bytes": dense_bytes, "exact": exact,
            "error": error, "converted": converted, "masks": masks, "opt": opt, **ms}  # fmt: skip


if __name__ == "__main__":
    main()
