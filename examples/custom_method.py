"""Writing your own method: RigL's gradient growth with a sensitivity drop criterion.

`docs/custom-methods.md` shows this file; `tests/test_docs_examples.py` runs it and checks that
the new criterion, not magnitude, chose the dropped connections.
"""

from __future__ import annotations

# --8<-- [start:method]
import torch

from sparseopt import SparseOptimizer, SparsityMethod, register_method


class SensitivityRigL(SparsityMethod):
    """Drop the active weights with the smallest |w * grad|, grow the largest |grad|."""

    name = "sensitivity-rigl"
    uses_gradient = True  # an update reads the dense gradient (FLOPs accounting)

    def drop_scores(self, layer):
        # Called after the inner step: layer.param.grad is the masked gradient, which is the
        # dense gradient of this batch at every active position (the only ones dropped).
        w, grad = layer.param.detach(), layer.param.grad
        return w.abs() if grad is None else (w * grad).abs()

    def grow_scores(self, layer, grad, generator):
        # Called inside step() before the gradient is masked: `grad` is dense.
        if grad is None:
            return torch.zeros_like(layer.param, dtype=torch.float32)
        return grad.detach().abs()


register_method(SensitivityRigL.name, SensitivityRigL)
# --8<-- [end:method]


# --8<-- [start:use]
def main(steps: int = 300) -> SparseOptimizer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    opt = SparseOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        method="sensitivity-rigl",  # the registered name
        sparsity=0.8,
        update_every=25,
        total_steps=steps,
        model=model,
    )
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(opt.report())
    return opt


# --8<-- [end:use]


if __name__ == "__main__":
    main()
