"""The one place that bridges versions: private torch APIs (so a torch upgrade breaks in one
file) and the ``override`` decorator of Python 3.12 with its backport."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from packaging.version import Version

try:  # Python 3.12+
    from typing import override
except ImportError:  # 3.10, 3.11: typing_extensions comes with torch
    from typing_extensions import override

__all__ = [
    "BATCHNORM_TYPES",
    "NORM_WITH_RUNNING_STATS",
    "TORCH_FLOOR",
    "amp_unscale_",
    "any_written",
    "check_torch_version",
    "disable_dynamo",
    "drop_unpicklable",
    "foreach_mul_",
    "hooks",
    "init_optimizer_hooks",
    "override",
    "semi_structured_tile",
    "storage_use_count",
    "tensor_version",
    "versions",
]

TORCH_FLOOR = "2.6"
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


def drop_unpicklable(state: dict[str, Any]) -> dict[str, Any]:
    """Remove hook registries and the instance ``step`` that ``LRScheduler`` installs."""
    state = dict(state)
    for name in _HOOK_REGISTRIES:
        state.pop(name, None)
    state.pop("step", None)
    return state


def hooks(opt: torch.optim.Optimizer, kind: str) -> list[Any]:
    """The hooks registered on ``opt`` for ``kind`` (``"state_dict_pre"``, ...), in registration
    order: the values of ``Optimizer._optimizer_<kind>_hooks``."""
    return list(getattr(opt, f"_optimizer_{kind}_hooks").values())


#: ``Optimizer.state_dict`` and ``load_state_dict`` carry this decorator in torch, so that dynamo
#: never traces them; a subclass that overrides them needs it too.
disable_dynamo = torch._disable_dynamo

#: Norm layers with running statistics (BatchNorm, InstanceNorm with ``track_running_stats``).
NORM_WITH_RUNNING_STATS: tuple[type, ...] = (torch.nn.modules.batchnorm._NormBase,)

#: Every BatchNorm flavour (1d/2d/3d, lazy, SyncBatchNorm): what ``swa_utils.update_bn`` resets.
BATCHNORM_TYPES: tuple[type, ...] = (torch.nn.modules.batchnorm._BatchNorm,)


def foreach_mul_(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """``torch._foreach_mul_``: one fused kernel for ``t *= o`` over a list of one device/dtype."""
    torch._foreach_mul_(tensors, others)


def tensor_version(t: torch.Tensor) -> int:
    """The version counter of ``t`` (``t._version``): it moves on every in-place write."""
    return t._version


def semi_structured_tile(dtype: torch.dtype) -> tuple[int, int]:
    """The minimum sparse tile ``(rows, cols)`` of the backend that
    ``torch.sparse.to_sparse_semi_structured`` will use for ``dtype``: cuSPARSELt when available
    and not overridden by ``SparseSemiStructuredTensor._FORCE_CUTLASS``, else CUTLASS; read from
    the class's ``_DTYPE_SHAPE_CONSTRAINTS``. A torch that moved those private names gets the
    strictest tile known, ``(32, 64)``."""
    from torch.sparse import semi_structured as ss

    cusparselt = getattr(torch.backends, "cusparselt", None)
    use_cutlass = getattr(ss.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True) or not (
        cusparselt is not None and cusparselt.is_available()
    )
    name = (
        "SparseSemiStructuredTensorCUTLASS"
        if use_cutlass
        else "SparseSemiStructuredTensorCUSPARSELT"
    )
    try:
        c = getattr(ss, name)._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(c.sparse_min_rows), int(c.sparse_min_cols)
    except (AttributeError, KeyError):
        return 32, 64


def amp_unscale_(
    grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> None:
    """``torch._amp_foreach_non_finite_check_and_unscale_``: GradScaler's own unscale kernel (one
    device and dtype per call): ``g *= inv_scale`` and ``found_inf = 1`` on an inf or NaN."""
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


def any_written(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether any of ``tensors`` has a nonzero version counter (was written in place)."""
    return any(t._version for t in tensors)


def versions(tensors: list[torch.Tensor]) -> list[int]:
    """The version counters of ``tensors``, in one pass."""
    return [t._version for t in tensors]


def storage_use_count(t: torch.Tensor) -> int:
    """How many tensors (and storage objects) share ``t``'s storage, ``t`` included.

    ``torch._C._storage_Use_Count``; it counts one more for the temporary storage object it reads.
    """
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
