"""Deprecated alias of :mod:`sparseopt.consistency` (fingerprints across ranks), for old imports.

Importing it warns with a ``DeprecationWarning``; import ``sparseopt.consistency`` instead.
"""

from __future__ import annotations

from ._warnings import warn
from .consistency import check_consistency, digests

__all__ = ["check_consistency", "digests"]

warn(
    "sparseopt.distributed is deprecated: import sparseopt.consistency instead (the same names)",
    DeprecationWarning,
)
