"""Deprecated alias of :mod:`sparseopt.update_schedule` (update timing), kept for old imports.

Importing it warns with a ``DeprecationWarning``; import ``sparseopt.update_schedule`` instead.
"""

from __future__ import annotations

from ._warnings import warn
from .update_schedule import PRUNE_SCHEDULES, TopologySchedule, cubic_density

__all__ = ["PRUNE_SCHEDULES", "TopologySchedule", "cubic_density"]

warn(
    "sparseopt.schedules is deprecated: import sparseopt.update_schedule instead (the same names)",
    DeprecationWarning,
)
