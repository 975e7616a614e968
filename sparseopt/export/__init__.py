"""Deploying a trained sparse model: the compact checkpoint file (``compact``), the sparse
inference layers (``modules``), and the conversion of a whole model (``convert``).

- [`save_sparse`][sparseopt.export.save_sparse] / [`load_sparse`][sparseopt.export.load_sparse]:
  a checkpoint that holds only the active weights of the sparse tensors (their values, and their
  positions as a bitmask or as byte-sized gaps, whichever is smaller for that tensor) and the rest
  of the ``state_dict`` as it is; safetensors when installed, else ``torch.save`` read back with
  ``weights_only=True``; checked in full before the model changes.
- [`to_sparse_inference`][sparseopt.export.to_sparse_inference]: a copy of a model whose sparse
  enough ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers compute with ``torch.sparse`` (CSR or BSR),
  a condensed constant fan-in layer, or 2:4 semi-structured kernels on CUDA.
"""

from .compact import load_sparse, save_sparse
from .convert import (
    InferenceReport,
    fan_in_min_sparsity_rule,
    min_sparsity_rule,
    to_sparse_inference,
)
from .modules import (
    CondensedConv1x1,
    CondensedLinear,
    SemiStructuredLinear,
    SparseConv1x1,
    SparseLinear,
    semi_structured_unsupported,
)

__all__ = [
    "CondensedConv1x1",
    "CondensedLinear",
    "InferenceReport",
    "SemiStructuredLinear",
    "SparseConv1x1",
    "SparseLinear",
    "fan_in_min_sparsity_rule",
    "load_sparse",
    "min_sparsity_rule",
    "save_sparse",
    "semi_structured_unsupported",
    "to_sparse_inference",
]
