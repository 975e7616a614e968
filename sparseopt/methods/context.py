"""Deprecated alias: ``SparseLayer`` and ``MethodContext`` live in :mod:`sparseopt.context`.

Importing it warns with a ``DeprecationWarning``; import the names from ``sparseopt.methods`` (or
``sparseopt.context``) instead.
"""

from __future__ import annotations

from .._warnings import warn
from ..context import MethodContext, SparseLayer

__all__ = ["MethodContext", "SparseLayer"]

warn(
    "sparseopt.methods.context is deprecated: import SparseLayer and MethodContext from "
    "sparseopt.methods (or sparseopt.context)",
    DeprecationWarning,
)
