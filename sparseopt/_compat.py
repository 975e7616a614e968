"""The one place that touches private torch APIs, so a torch upgrade breaks in one file."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from packaging.version import Version

__all__ = [
    "TORCH_FLOOR",
    "check_torch_version",
    "drop_unpicklable",
    "hook_registry_names",
    "init_optimizer_hooks",
]

TORCH_FLOOR = "2.13"
"""The oldest torch the test matrix runs; ``pyproject.toml`` declares the same floor."""


def check_torch_version(version: str = torch.__version__) -> None:
    """Raise ``ImportError`` naming the needed torch if ``version`` is older than the floor.

    An older torch is untested and lacks APIs sparseopt uses (``fully_shard`` and ``FSDPModule``
    in ``torch.distributed.fsdp`` appeared in 2.6, for one); this turns an ``AttributeError`` deep
    inside a step into one clear message at import.

    Args:
        version (str): a torch version string. Default: the installed torch's.

    Raises:
        ImportError: if ``version`` is older than :data:`TORCH_FLOOR`.
    """
    if Version(Version(version).base_version) < Version(TORCH_FLOOR):
        raise ImportError(
            f"Expected torch >= {TORCH_FLOOR}, but got torch {version}: sparseopt is tested on "
            f"torch {TORCH_FLOOR} and newer (pip install 'torch>={TORCH_FLOOR}')"
        )


check_torch_version()

_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def init_optimizer_hooks(opt: torch.optim.Optimizer) -> None:
    """Give an ``Optimizer`` subclass that skips ``Optimizer.__init__`` working hooks.

    ``Optimizer.__init__`` creates six ``OrderedDict`` hook registries (a plain ``dict`` cannot be
    weak-referenced by ``RemovableHandle``) and patches the class's ``step`` once so that step
    pre/post hooks fire. Without the patch, hooks silently never fire.
    """
    for name in _HOOK_REGISTRIES:
        if name not in opt.__dict__:
            setattr(opt, name, OrderedDict())
    opt._patch_step_function()


def hook_registry_names() -> tuple[str, ...]:
    return _HOOK_REGISTRIES


def drop_unpicklable(state: dict[str, Any]) -> dict[str, Any]:
    """Remove hook registries and the instance ``step`` that ``LRScheduler`` installs."""
    state = dict(state)
    for name in _HOOK_REGISTRIES:
        state.pop(name, None)
    state.pop("step", None)
    return state
