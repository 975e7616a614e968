"""Sparse kernels for training: the forward and backward of a model's sparse layers computed from
their active weights only, with the same masks and results as masked-dense training.

[`sparse_kernels`][sparseopt.kernels.sparse_kernels] swaps the compute of every ``nn.Linear``
(and 1x1 ``nn.Conv2d``) whose weight is a sparse layer of a ``SparseOptimizer``; the returned
[`SparseKernels`][sparseopt.kernels.SparseKernels] handle reports what runs sparse and restores
the dense path. [`training_min_sparsity_rule`][sparseopt.kernels.training_min_sparsity_rule] is
the measured rule that decides, per layer, whether sparse pays. See ``docs/faster-training.md``.
"""

from .handle import LAYOUTS, KernelReport, SparseKernels, sparse_kernels
from .rule import training_min_sparsity_rule

__all__ = [
    "LAYOUTS",
    "KernelReport",
    "SparseKernels",
    "sparse_kernels",
    "training_min_sparsity_rule",
]
