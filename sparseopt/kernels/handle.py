"""``sparse_kernels(model, opt)``: the layer swap, the handle that undoes it, and its report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import _dtensor, _premasked, _validate
from .._warnings import Once
from ..export._common import conv1x1_unsupported
from ..export.modules import semi_structured_unsupported
from ..optimizer import SparseOptimizer
from ._layer import LayerKernel
from ._structure import quiet_beta_warning

__all__ = ["LAYOUTS", "KernelReport", "SparseKernels", "sparse_kernels"]

LAYOUTS = ("auto", "csr", "condensed", "2:4")
"""``"auto"``: per layer, the layout its mask allows (2:4 semi-structured on CUDA for
``structure="2:4"``, condensed for ``structure="fan_in"``, else CSR), each only where the measured
rule says it is faster. The others force that layout on every layer that can take it."""

_ATTR = "_sparseopt_kernel"
_SWAPPED: dict[type[nn.Module], type[nn.Module]] = {}
_FLOATS = (torch.float32, torch.float64)


def _swapped_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose forward runs the module's kernel; one per class, cached.

    It keeps ``cls``'s name (``print(model)`` is unchanged), and copies and pickles as a plain
    ``cls`` without the kernel: a ``copy.deepcopy`` of a model under sparse kernels is a dense
    model, and the handle stays with the original.
    """
    sub = _SWAPPED.get(cls)
    if sub is not None:
        return sub

    def forward(self: nn.Module, input: Tensor) -> Tensor:
        kernel = self.__dict__.get(_ATTR)
        if kernel is None:
            return cls.forward(self, input)
        if torch.compiler.is_compiling():
            return kernel.forward_eager(self, input)
        return kernel.forward(self, input)

    def __reduce_ex__(self: nn.Module, protocol: Any) -> Any:
        _, _, state, *rest = object.__reduce_ex__(self, max(protocol, 2))
        if isinstance(state, dict) and _ATTR in state:
            state = {k: v for k, v in state.items() if k != _ATTR}
        return (_new_plain, (cls,), state, *rest)

    sub = type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            "__reduce_ex__": __reduce_ex__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    _SWAPPED[cls] = sub
    return sub


def _new_plain(cls: type[nn.Module]) -> nn.Module:
    """An uninitialized ``cls`` (what a copy or an unpickled swapped module is rebuilt as)."""
    return cls.__new__(cls)


class KernelReport(list):
    """What [`sparse_kernels`][sparseopt.kernels.sparse_kernels] runs sparse, what stays dense,
    and why.

    A ``list`` of dicts, one per ``nn.Linear``, ``nn.Conv2d`` and other module holding a sparse
    layer of the optimizer: ``name``, ``type``, ``shape``, ``sparsity`` (of the optimizer's mask
    now; ``None`` for a layer that is not sparse), ``layout`` (``"csr"``, ``"condensed"``,
    ``"2:4"``, or ``None``: dense), ``batch`` (the GEMM rows the rule saw at the first call),
    ``reason``, and the calls so far on each path (``sparse_calls``, ``dense_calls``). It prints
    as a table.

    Args:
        iterable (Iterable[dict]): the rows. Default: none.

    Examples:
        >>> report = KernelReport([{"name": "fc", "type": "Linear", "shape": (4, 8),
        ...                         "sparsity": 0.95, "layout": "csr", "batch": 64,
        ...                         "reason": "", "sparse_calls": 3, "dense_calls": 1}])
        >>> report.sparse
        ['fc']
    """

    def __init__(self, iterable: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(iterable)

    @property
    def sparse(self) -> list[str]:
        """Names of the layers running on the sparse kernels now.

        Returns:
            The names, in module order.

        Examples:
            >>> KernelReport([]).sparse
            []
        """
        return [r["name"] for r in self if r["layout"]]

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'type':<8} {'sparsity':>8}  {'as':<9} {'batch':>6}  reason"]
        for r in self:
            sp = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
            batch = "" if r["batch"] is None else str(r["batch"])
            lines.append(
                f"{r['name']:<32} {r['type']:<8} {sp:>8}  {r['layout'] or 'dense':<9} "
                f"{batch:>6}  {r['reason']}"
            )
        return "\n".join(lines)


class SparseKernels:
    """The handle that [`sparse_kernels`][sparseopt.kernels.sparse_kernels] returns.

    While it is active, the model's converted layers compute on the sparse kernels. Use
    [`report`][] to see which, and [`remove`][] (or leave a ``with`` block) to restore the dense
    path. Build it with ``sparse_kernels(model, opt)``.

    Args:
        model (nn.Module): the model whose layers are swapped.
        opt (SparseOptimizer): the optimizer that holds their masks.
        layout (str): see [`sparse_kernels`][sparseopt.kernels.sparse_kernels]. Default: ``"auto"``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``opt`` not a ``SparseOptimizer`` or
            ``layout`` not a string.
        ValueError: for an unknown ``layout``, a model that holds none of ``opt``'s sparse
            layers, or a model already under sparse kernels.

    Examples:
        >>> import torch
        >>> from sparseopt import SparseOptimizer, sparse_kernels
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.9)
        >>> with sparse_kernels(model, opt, layout="csr") as handle:
        ...     for _ in range(2):
        ...         model(torch.randn(8, 64)).sum().backward(); opt.step(); opt.zero_grad()
        ...     print(handle.report())  # doctest: +NORMALIZE_WHITESPACE
        layer type sparsity as batch reason
        0 Linear 0.900 csr 8 layout='csr' forces it (no rule)
        >>> type(model[0]) is torch.nn.Linear  # removed on leaving the block
        True
    """

    def __init__(self, model: nn.Module, opt: SparseOptimizer, *, layout: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected model to be an nn.Module, but got {_validate.type_of(model)}"
            )
        if not isinstance(opt, SparseOptimizer):
            raise TypeError(
                f"Expected opt to be a SparseOptimizer, but got {_validate.type_of(opt)}"
            )
        self.layout = _validate.choice("layout", layout, LAYOUTS)
        busy = [name or "(the model)" for name, m in model.named_modules() if _ATTR in m.__dict__]
        if busy:
            raise ValueError(
                f"Expected model without sparse kernels, but got {busy[0]!r} already running on "
                "them: call remove() on the first handle (or leave its with block) before "
                "sparse_kernels(model, opt) again"
            )
        layers = opt.layers
        sparse = {id(layer.param) for layer in layers}
        if not any(id(p) in sparse for p in model.parameters()):
            raise ValueError(
                "Expected model to hold sparse layers of opt, but none of its parameters is one "
                f"(opt has {len(layers)} sparse layers): build the SparseOptimizer over this "
                "model's parameters"
            )
        self.model, self.optimizer = model, opt
        self._index = {id(layer.param): i for i, layer in enumerate(layers)}
        self._rows: list[tuple[str, nn.Module, LayerKernel | None, str]] = []
        self._by_param: dict[int, list[LayerKernel]] = {}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            is_sparse = isinstance(weight, Tensor) and id(weight) in sparse
            if not (is_sparse or isinstance(module, (nn.Linear, nn.Conv2d))):
                continue
            wanted, reason = self._eligible(module, is_sparse)
            if wanted is None:
                self._rows.append((name, module, None, reason))
                continue
            kernel = LayerKernel(
                self,
                name,
                type(module),
                conv=isinstance(module, nn.Conv2d),
                layout=wanted,
                forced=self.layout != "auto",
            )
            module.__dict__[_ATTR] = kernel
            module.__class__ = _swapped_class(type(module))
            self._rows.append((name, module, kernel, ""))
            self._by_param.setdefault(id(weight), []).append(kernel)
        quiet_beta_warning()
        self._inner = opt.optimizer
        _premasked.register(self._inner, self._premasked)
        self._hook = opt.register_step_pre_hook(self._before_step)
        self._once = Once()
        self.active = True

    # --- which layers ------------------------------------------------------------------------
    def _eligible(self, module: nn.Module, is_sparse: bool) -> tuple[str | None, str]:
        """``(layout, "")`` for a layer the kernels can run, else ``(None, reason)``."""
        kind = type(module).__name__
        conv = isinstance(module, nn.Conv2d)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return None, f"{kind}: only nn.Linear and 1x1 nn.Conv2d have sparse kernels"
        base = nn.Conv2d if conv else nn.Linear
        if type(module).forward is not base.forward:
            return None, f"{kind} overrides forward(): its computation is its own"
        weight = module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return None, "lazy module not initialized yet"
        if not is_sparse:
            return None, "not a sparse layer of the optimizer (dense group, frozen, or absent)"
        if _dtensor.is_dtensor(weight):
            return None, "DTensor (FSDP2) parameter: the sparse kernels do not run on shards"
        if conv:
            why = conv1x1_unsupported(module)
            if why:
                return None, f"not a 1x1, stride-1, unpadded, ungrouped conv: {why}"
        if not weight.is_contiguous():
            return None, "non-contiguous weight"
        structure = self.optimizer.structure
        two_four = structure is not None and str(structure) == "2:4"
        fan_in = structure is not None and str(structure) == "fan_in"
        if self.layout in ("auto", "2:4") and two_four and not conv:
            why = semi_structured_unsupported(weight.detach())
            if not why:
                return "2:4", ""
            if self.layout == "2:4":
                return None, why
        elif self.layout == "2:4":
            return None, f"layout='2:4' needs structure='2:4' on an nn.Linear, not {structure}"
        if self.layout == "condensed" and not fan_in:
            return None, f"layout='condensed' needs structure='fan_in', not {structure}"
        if weight.dtype not in _FLOATS:
            return None, f"dtype {weight.dtype}: the sparse kernels take float32 and float64"
        if weight.device.type != "cpu" and self.layout == "auto":
            return None, (
                f"on {weight.device}: the CSR kernels are measured on CPU only; layout='csr' "
                "runs them there (untested)"
            )
        return ("condensed" if fan_in and self.layout != "csr" else "csr"), ""

    # --- what the kernels ask ------------------------------------------------------------------
    def _mask_of(self, weight: Tensor) -> Tensor | None:
        """The optimizer's current mask of ``weight`` (``None`` if it is no sparse layer)."""
        layers = self.optimizer.layers
        i = self._index.get(id(weight))
        if i is None or i >= len(layers) or layers[i].param is not weight:
            self._index = {id(layer.param): j for j, layer in enumerate(layers)}
            i = self._index.get(id(weight))
            if i is None:
                return None
        return layers[i].mask

    def _masks_applied(self) -> bool:
        """Whether the weights are masked: after the first step (before it they are dense, and
        the first forward, backward and step run dense exactly as without the handle)."""
        return self.optimizer.step_count > 0

    def _reads_gradient(self) -> bool:
        """Whether the coming step reads the dense weight gradient."""
        return self.optimizer.next_step_reads_gradient()

    def _premasked(self, param: Tensor, mask: Tensor) -> bool:
        kernels = self._by_param.get(id(param))
        grad = param.grad
        return (
            bool(kernels) and grad is not None and any(k.grad_is_clean(grad, mask) for k in kernels)
        )

    def _before_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        pending = [k for _, _, k, _ in self._rows if k is not None and k.sparse_grad_pending]
        for k in pending:
            k.sparse_grad_pending = False
        if pending and self.optimizer.next_step_reads_gradient():
            self._once.warn(
                "sparse-gradient",
                "this step reads the dense gradient (a topology update that grows by gradient), "
                "but the backward pass computed it only at active positions: the update became "
                "due after backward, e.g. explore() was called between backward() and step(). "
                "Growth now sees zeros outside the mask; ask for explorations before the "
                "forward pass",
            )

    # --- the public API -------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the dense path: every swapped layer gets its class and forward back.

        The parameters were never replaced, so nothing else changes; the gradient buffers are
        released (a gradient the model holds stays valid). Calling it again does nothing.
        """
        if not self.active:
            return
        for _, module, kernel, _ in self._rows:
            if kernel is not None and module.__dict__.get(_ATTR) is kernel:
                del module.__dict__[_ATTR]
                module.__class__ = kernel.original
        _premasked.unregister(self._inner, self._premasked)
        self._hook.remove()
        self._by_param = {}
        self.active = False

    def report(self) -> KernelReport:
        """Which layers run sparse, which stay dense, and why.

        Returns:
            A [`KernelReport`][sparseopt.kernels.KernelReport], one row per ``nn.Linear``,
            ``nn.Conv2d`` and other module holding a sparse layer of the optimizer.
        """
        masks = {id(layer.param): layer for layer in self.optimizer.layers}
        rows = []
        for name, module, kernel, reason in self._rows:
            weight = getattr(module, "weight", None)
            layer = masks.get(id(weight))
            sparsity = None if layer is None else 1.0 - layer.count / max(layer.numel, 1)
            rows.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "shape": tuple(weight.shape) if isinstance(weight, Tensor) else (),
                    "sparsity": sparsity,
                    "layout": kernel.layout if kernel is not None and self.active else None,
                    "batch": None if kernel is None else kernel.batch,
                    "reason": reason if kernel is None else kernel.reason,
                    "sparse_calls": 0 if kernel is None else kernel.sparse_calls,
                    "dense_calls": 0 if kernel is None else kernel.dense_calls,
                }
            )
        return KernelReport(rows)

    def __enter__(self) -> SparseKernels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        report = self.report()
        state = "active" if self.active else "removed"
        return (
            f"SparseKernels({state}, layout={self.layout!r}, sparse={len(report.sparse)}/"
            f"{len(report)} layers)"
        )


def sparse_kernels(
    model: nn.Module, opt: SparseOptimizer, *, layout: str = "auto"
) -> SparseKernels:
    """Run the forward and backward of ``model``'s sparse layers on sparse kernels.

    Every ``nn.Linear`` (and 1x1 ``nn.Conv2d``) whose weight is a sparse layer of ``opt``
    computes ``W @ x`` from the active weights only (CSR, or the condensed ``(out, k)`` layout
    under ``structure="fan_in"``, or the 2:4 semi-structured kernels on CUDA), its input gradient
    on the transposed structure, and its weight gradient only at the active positions (SDDMM),
    with exact zeros elsewhere, unless the coming step reads the dense gradient (a RigL, GraNet
    or SNIP update, an exploration): then the dense weight gradient is computed, so growth sees
    what it sees without the kernels. The parameters stay the same ``Parameter`` objects, so the
    optimizer, ``state_dict()``, checkpoints, export and every method are unchanged; only the
    compute changes. Each layer runs sparse only where the measured rule
    ([`training_min_sparsity_rule`][sparseopt.kernels.training_min_sparsity_rule]) says it is
    faster, at the batch of its first call after the first step; ``report()`` says which and
    why. See ``docs/faster-training.md``.

    Args:
        model (nn.Module): the model (its parameters are the ones ``opt`` was built over).
        opt (SparseOptimizer): the optimizer holding the masks.
        layout (str): ``"auto"`` (the default), or ``"csr"``, ``"condensed"`` or ``"2:4"`` to
            force that layout on every layer that can take it, without the rule.

    Returns:
        A [`SparseKernels`][sparseopt.kernels.SparseKernels] handle: ``report()``, ``remove()``,
        and a context manager that removes itself on exit.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``opt`` not a ``SparseOptimizer``, or
            ``layout`` not a string.
        ValueError: for an unknown ``layout``, a model that holds none of ``opt``'s sparse
            layers, or one already under sparse kernels.

    Examples:
        >>> import torch
        >>> import sparseopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        ...                             torch.nn.Linear(1024, 10))
        >>> opt = sparseopt.SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                 "set", 0.95, distribution="uniform", seed=0)
        >>> handle = sparseopt.sparse_kernels(model, opt)
        >>> for _ in range(2):
        ...     loss = model(torch.randn(64, 1024)).square().mean()
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> handle.report().sparse
        ['0']
        >>> handle.remove()
    """
    return SparseKernels(model, opt, layout=layout)
