"""sparseopt: sparse training as a two-line change to any PyTorch training script.

``SparseOptimizer`` wraps any ``torch.optim.Optimizer`` and keeps the sparse weights at exact
per-layer counts; ``SupTicketsScheduler`` adds the Sup-tickets booster (Yin et al., UAI 2022) as
an ``LRScheduler``.

Examples:
    >>> import sparseopt
    >>> sorted(sparseopt.available_methods())
    ['gmp', 'granet', 'rigl', 'set', 'snip', 'static']
"""

from . import _compat  # noqa: F401  (first: a too-old torch fails here with a clear message)
from .export import load_sparse, save_sparse, to_sparse_inference
from .kernels import sparse_kernels
from .methods import (
    SparsityMethod,
    available_methods,
    get_method,
    register_method,
    unregister_method,
)
from .optimizer import SparseOptimizer
from .report import SparsityReport
from .scheduler import SupTicketsScheduler, cyclic_lr

__version__ = "0.1.0"
"""The version of this sparseopt release."""

__all__ = [
    "SparseOptimizer",
    "SparsityMethod",
    "SparsityReport",
    "SupTicketsScheduler",
    "__version__",
    "available_methods",
    "cyclic_lr",
    "get_method",
    "load_sparse",
    "register_method",
    "save_sparse",
    "sparse_kernels",
    "to_sparse_inference",
    "unregister_method",
]
