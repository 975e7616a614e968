"""One table over every public argument: ``(callable, arguments) -> exception type, message regex``.

The rule (``sparseopt/_validate.py``): a wrong type is a ``TypeError``; a value out of range or an
unknown name is a ``ValueError``; the message names the argument and the value ("Expected <name>
..., but got <value>"; objects such as tensors, modules and optimizers by their type). Numpy
scalars are numbers wherever Python numbers are, and ``bool`` never is one.

- ``ERRORS``: each row names a public callable (a key of ``TARGETS``), its arguments (the FIRST
  key is the argument the row is about; later keys set the context), the exception type and a
  message regex. Rows on the live optimizer also check that a rejected call changes nothing.
- ``VALID``: the negative control, the edges just inside every range and numpy scalars for every
  number or bool argument, which must be accepted (the table is not over-strict).
- ``test_every_public_argument_has_rows`` enumerates ``inspect.signature`` of every public
  callable (``PUBLIC``) and fails on an argument without rows; the exemptions, each with its
  reason, are in one place (``EXEMPT``, ``NO_TYPE_ROW``, ``NO_VALUE_ROW``, ``NO_NUMPY_ROW``).
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cases import first_difference, make_mlp
from torch import nn

import sparseopt
from sparseopt import (
    SparseOptimizer,
    SupTicketsScheduler,
    cyclic_lr,
    get_method,
    load_sparse,
    methods,
    register_method,
    save_sparse,
    sparse_kernels,
    to_sparse_inference,
    unregister_method,
)
from sparseopt import distributions as D
from sparseopt import export as X
from sparseopt import flops as F
from sparseopt import kernels as K
from sparseopt import masks as M
from sparseopt import metrics as MT
from sparseopt import settings as ST
from sparseopt import structure as S
from sparseopt import update_schedule as SC
from sparseopt.integrations import hf
from sparseopt.methods import GMP, SET, SNIP, GraNet, RigL, SparsityMethod, Static

pytestmark = pytest.mark.usefixtures("one_thread")


# --- what a row runs against ---------------------------------------------------------------------
class _Wide(nn.Module):
    """Same parameter count and order as ``make_mlp()``, but a different hidden width."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.net(x)


def _trained(net=None, method="set", sparsity=0.9, **kwargs):
    """A SparseOptimizer (SGD with momentum) on ``net`` after one step: masks applied, momentum
    buffers; ``kwargs`` go to SparseOptimizer (``model=`` among them)."""
    net = make_mlp() if net is None else net
    opt = SparseOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), method, sparsity, seed=0,
        **kwargs,
    )  # fmt: skip
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    return opt


class Env:
    """What a row's callable needs, built on first use, fresh for every row."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    @cached_property
    def model(self) -> nn.Module:
        return make_mlp()

    @cached_property
    def sgd(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    @cached_property
    def opt(self) -> SparseOptimizer:
        """``SparseOptimizer(sgd, "set", 0.9, model=model)`` after one step."""
        return _trained(self.model, model=self.model)

    @cached_property
    def sched(self) -> SupTicketsScheduler:
        return SupTicketsScheduler(self.opt, 100, 5)

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def saved(self) -> Path:
        """A file that ``save_sparse`` wrote from ``model`` and the optimizer's masks."""
        path = self.tmp / "model.sparse"
        save_sparse(self.model, path, self.opt.masks)
        return path


@dataclass(frozen=True)
class Lazy:
    """An argument built from the row's ``Env`` (a model, an optimizer, a state dict, a file)."""

    make: Callable[[Env], Any]
    label: str

    def __repr__(self) -> str:
        return self.label


def lazy(label: str) -> Callable[[Callable[[Env], Any]], Lazy]:
    return lambda make: Lazy(make, label)


def _resolve(value: Any, env: Env) -> Any:
    return value.make(env) if isinstance(value, Lazy) else value


# Lazy arguments used by several rows.
SGD = Lazy(lambda e: e.sgd, "sgd")
OPT = Lazy(lambda e: e.opt, "opt")
MODEL = Lazy(lambda e: e.model, "model")
NO_MODEL_OPT = Lazy(lambda e: _trained(), "opt without model=")
GMP_OPT = Lazy(
    lambda e: _trained(
        net := make_mlp(), "gmp", model=net, total_steps=100, update_every=5, prune_end=0.95
    ),
    "gmp pruning until step 95",
)  # fmt: skip  (its own model: one optimizer a weight)
BATCHES = Lazy(lambda e: [torch.randn(4, 8) for _ in range(2)], "[batches]")
ITERATOR = Lazy(lambda e: iter([torch.randn(4, 8)]), "iter([batch])")
MASK = Lazy(lambda e: S.random_structured((4, 8), "2:4", torch.Generator().manual_seed(0)), "2:4")
SCORES = Lazy(lambda e: torch.rand(4, 8, generator=torch.Generator().manual_seed(1)), "scores")
TRIL = torch.ones(4, 8, dtype=torch.bool).tril()  # rows hold 1 to 4 active: no constant fan-in


def _masked(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    """``layer`` with its weights outside ``mask`` set to 0."""
    with torch.no_grad():
        layer.weight.mul_(mask.reshape(layer.weight.shape))
    return layer


# An nn.Linear(8, 4) and a 1x1 nn.Conv2d(8, 4) whose weights hold the 2:4 MASK (fan-in 4).
FAN_IN_LINEAR = Lazy(lambda e: _masked(nn.Linear(8, 4), MASK.make(e)), "Linear(2:4)")
FAN_IN_CONV = Lazy(lambda e: _masked(nn.Conv2d(8, 4, 1), MASK.make(e)), "Conv2d(2:4)")


def _use_structured_opt(e: Env) -> None:
    e.opt = _trained(e.model, sparsity=None, structure="2:4", model=e.model)


def _use_opt_without_model(e: Env) -> None:
    e.opt = _trained()


def _use_gmp_opt(e: Env) -> None:
    e.opt = _trained(e.model, "gmp", model=e.model, total_steps=100, update_every=5)


def _first_ticket(e: Env) -> None:
    e.opt.consolidate()


@dataclass(frozen=True)
class Target:
    """A public callable. ``fn`` is what ``inspect.signature`` reads; ``run(env, kwargs)`` calls it
    with valid values for every argument a row leaves out (``None``: every argument is exempt).
    ``rows_of`` names the target whose rows cover it (a method's options go through
    ``SparseOptimizer``); ``rename`` maps a signature name to the row key (a setter's ``value``).
    ``on_opt``: it acts on ``env.opt``, which a rejected call must leave untouched."""

    fn: Callable
    run: Callable[[Env, dict[str, Any]], Any] | None = None
    rows_of: str | None = None
    rename: Mapping[str, str] | None = None
    on_opt: bool = False


def _with(defaults: Callable[[Env], dict[str, Any]], fn: Callable) -> Callable:
    return lambda e, kw: fn(**{**defaults(e), **kw})


def _sparse_optimizer(e):
    return {"optimizer": e.sgd, "method": "set", "sparsity": 0.9, "model": e.model}


def _scheduler(e):
    return {"optimizer": e.opt, "total_steps": 100, "cycle_steps": 5}


def _score(model):
    return 0.5


def _setter(name: str) -> Callable:
    return lambda e, kw: setattr(e.opt, name, kw[name])


def _flops(e, kw):
    return F.TrainingFlops(kw.get("opt", e.opt), kw.get("model", e.model), torch.randn(2, 8))


TARGETS: dict[str, Target] = {
    # the optimizer
    "SparseOptimizer": Target(SparseOptimizer, _with(_sparse_optimizer, SparseOptimizer)),
    "SparseOptimizer.explore": Target(SparseOptimizer.explore,
                                      lambda e, kw: e.opt.explore(**kw), on_opt=True),
    "SparseOptimizer.total_steps": Target(SparseOptimizer.total_steps.fset, _setter("total_steps"),
                                          rename={"value": "total_steps"}, on_opt=True),
    "SparseOptimizer.periodic_updates": Target(
        SparseOptimizer.periodic_updates.fset, _setter("periodic_updates"),
        rename={"value": "periodic_updates"}, on_opt=True),
    "SparseOptimizer.consolidate": Target(SparseOptimizer.consolidate,
                                          lambda e, kw: e.opt.consolidate(**kw), on_opt=True),
    "SparseOptimizer.configure_superposition": Target(
        SparseOptimizer.configure_superposition,
        lambda e, kw: e.opt.configure_superposition(**kw), on_opt=True),
    "SparseOptimizer.load_state_dict": Target(SparseOptimizer.load_state_dict,
                                              lambda e, kw: e.opt.load_state_dict(**kw),
                                              on_opt=True),
    "SparseOptimizer.add_param_group": Target(SparseOptimizer.add_param_group,
                                              lambda e, kw: e.opt.add_param_group(**kw),
                                              on_opt=True),
    "SparseOptimizer.step": Target(SparseOptimizer.step),
    **{f"SparseOptimizer.{name}": Target(getattr(SparseOptimizer, name).fset,
                                         rename={"value": name})
       for name in ("param_groups", "state", "defaults")},
    "SparseOptimizer.zero_grad": Target(SparseOptimizer.zero_grad),
    "SparseOptimizer.check_consistency": Target(SparseOptimizer.check_consistency),
    # the methods: their options are SparseOptimizer's keyword arguments
    **{f"methods.{cls.__name__}": Target(cls, rows_of="SparseOptimizer")
       for cls in (SparsityMethod, Static, SET, RigL, GMP, GraNet, SNIP)},
    "register_method": Target(register_method, _with(lambda e: {"name": "my-method",
                                                                "factory": SET}, register_method)),
    "unregister_method": Target(unregister_method, lambda e, kw: unregister_method(**kw)),
    "get_method": Target(get_method, lambda e, kw: get_method(**kw)),
    "methods.MethodContext": Target(methods.MethodContext),
    "SparseSettings": Target(ST.SparseSettings, rows_of="SparseOptimizer"),  # built from its args
    "methods.SparseLayer": Target(methods.SparseLayer),
    "SparsityReport": Target(sparseopt.SparsityReport),
    # Sup-tickets
    "SupTicketsScheduler": Target(SupTicketsScheduler, _with(_scheduler, SupTicketsScheduler)),
    "SupTicketsScheduler.plan": Target(
        SupTicketsScheduler.plan,
        _with(lambda e: {"total_steps": 100, "cycle_steps": 5}, SupTicketsScheduler.plan)),
    "SupTicketsScheduler.official": Target(
        SupTicketsScheduler.official,
        _with(lambda e: {**_scheduler(e), "bn_update": None}, SupTicketsScheduler.official)),
    "SupTicketsScheduler.recommended": Target(
        SupTicketsScheduler.recommended,
        _with(lambda e: {**_scheduler(e), "select": _score, "bn_update": None},
              SupTicketsScheduler.recommended)),
    "SupTicketsScheduler.step": Target(SupTicketsScheduler.step,
                                       lambda e, kw: e.sched.step(**kw)),
    "SupTicketsScheduler.load_state_dict": Target(SupTicketsScheduler.load_state_dict,
                                                  lambda e, kw: e.sched.load_state_dict(**kw)),
    "cyclic_lr": Target(cyclic_lr, _with(lambda e: {"i": 1, "cycle_steps": 4, "lr_low": 0.001,
                                                    "lr_high": 0.005}, cyclic_lr)),
    # schedules and distributions
    "TopologySchedule": Target(SC.TopologySchedule, _with(
        lambda e: {"update_every": 10, "prune_rate": 0.3, "decay": "cosine", "end_step": 100},
        SC.TopologySchedule)),
    "cubic_density": Target(SC.cubic_density),
    **{name: Target(fn, _with(lambda e: {"shapes": [(16, 8), (4, 16)], "density": 0.5}, fn))
       for name, fn in (("uniform", D.uniform), ("erk", D.erk), ("er", D.er))},
    "from_mapping": Target(D.from_mapping, _with(lambda e: {
        "mapping": {"a": 0.5}, "names": ["a", "b"], "shapes": [(4, 4), (4, 4)], "density": 0.5},
        D.from_mapping)),
    "layer_densities": Target(D.layer_densities, _with(lambda e: {
        "distribution": "erk", "shapes": [(16, 8), (4, 16)], "density": 0.5, "names": ["a", "b"]},
        D.layer_densities)),
    "exact_counts": Target(D.exact_counts, _with(
        lambda e: {"densities": [0.5, 0.5], "numels": [4, 4], "density": 0.5}, D.exact_counts)),
    # structure kernels (a 2:4 mask of shape (4, 8): 16 active)
    "Structure": Target(S.Structure, _with(lambda e: {"kind": "nm", "n": 2, "m": 4}, S.Structure)),
    "NM": Target(S.NM, _with(lambda e: {"n": 2, "m": 4}, S.NM)),
    "parse_structure": Target(S.parse_structure, lambda e, kw: S.parse_structure(**kw)),
    "gemm_shape": Target(S.gemm_shape, lambda e, kw: S.gemm_shape(**kw)),
    "fits": Target(S.fits, _with(lambda e: {"shape": (4, 8), "structure": "2:4"}, S.fits)),
    "density": Target(S.density, lambda e, kw: S.density(**kw)),
    "row_count": Target(S.row_count, _with(lambda e: {"shape": (4, 8), "density": 0.5},
                                           S.row_count)),
    "select_structured": Target(S.select_structured, _with(
        lambda e: {"scores": torch.rand(4, 8), "structure": "2:4"}, S.select_structured)),
    "random_structured": Target(S.random_structured, _with(
        lambda e: {"shape": (4, 8), "structure": "2:4", "generator": torch.Generator()},
        S.random_structured)),
    "structured_drop_and_grow": Target(S.structured_drop_and_grow, _with(
        lambda e: {"mask": MASK.make(e), "drop_scores": SCORES.make(e),
                   "grow_scores": SCORES.make(e), "structure": "2:4", "k_drop": 2},
        S.structured_drop_and_grow)),
    "structure_violations": Target(S.structure_violations, _with(
        lambda e: {"mask": MASK.make(e), "structure": "2:4"}, S.structure_violations)),
    "check_structured": Target(S.check_structured, _with(
        lambda e: {"mask": MASK.make(e), "structure": "2:4"}, S.check_structured)),
    # mask kernels
    "select_smallest": Target(M.select_smallest, _with(lambda e: {"scores": torch.rand(5)},
                                                       M.select_smallest)),
    "select_largest": Target(M.select_largest, _with(lambda e: {"scores": torch.rand(5)},
                                                     M.select_largest)),
    "select_largest_across": Target(M.select_largest_across, _with(
        lambda e: {"scores": [torch.rand(5), torch.rand(2, 2)]}, M.select_largest_across)),
    "count_active": Target(M.count_active),
    "random_mask": Target(M.random_mask, _with(
        lambda e: {"shape": (2, 3), "count": 2, "generator": torch.Generator()}, M.random_mask)),
    "drop_and_grow": Target(M.drop_and_grow, _with(
        lambda e: {"mask": torch.tensor([True, True, False, False]), "drop_scores": torch.rand(4),
                   "grow_scores": torch.rand(4)}, M.drop_and_grow)),
    "group_by_device_and_dtype": Target(M.group_by_device_and_dtype),
    "apply_masks_": Target(M.apply_masks_, _with(
        lambda e: {"tensors": [torch.ones(3)], "masks": [torch.tensor([True, False, True])]},
        M.apply_masks_)),
    "select_largest_within": Target(M.select_largest_within, _with(
        lambda e: {"scores": torch.rand(4, 8), "count": 16, "structure": None},
        M.select_largest_within)),
    "exchange": Target(M.exchange, _with(
        lambda e: {"mask": MASK.make(e), "drop_scores": SCORES.make(e),
                   "grow_scores": SCORES.make(e), "k": 2, "structure": None}, M.exchange)),
    # export
    "save_sparse": Target(save_sparse, _with(
        lambda e: {"model": e.model, "path": e.tmp / "m.sparse", "masks": e.opt.masks},
        save_sparse)),
    "load_sparse": Target(load_sparse, _with(lambda e: {"model": e.model, "path": e.saved()},
                                             load_sparse)),
    "to_sparse_inference": Target(to_sparse_inference, _with(lambda e: {"model": e.model},
                                                             to_sparse_inference)),
    "min_sparsity_rule": Target(X.min_sparsity_rule, _with(
        lambda e: {"numel": 1 << 20, "batch_size": 1}, X.min_sparsity_rule)),
    "SparseLinear": Target(X.SparseLinear, _with(lambda e: {"linear": nn.Linear(8, 4)},
                                                 X.SparseLinear)),
    "SparseConv1x1": Target(X.SparseConv1x1, _with(lambda e: {"conv": nn.Conv2d(8, 4, 1)},
                                                   X.SparseConv1x1)),
    "CondensedLinear": Target(X.CondensedLinear, _with(lambda e: {"linear": nn.Linear(8, 4)},
                                                       X.CondensedLinear)),
    "CondensedConv1x1": Target(X.CondensedConv1x1, _with(lambda e: {"conv": nn.Conv2d(8, 4, 1)},
                                                         X.CondensedConv1x1)),
    "SemiStructuredLinear": Target(X.SemiStructuredLinear,
                                   lambda e, kw: X.SemiStructuredLinear(**kw)),
    "fan_in_min_sparsity_rule": Target(X.fan_in_min_sparsity_rule, _with(
        lambda e: {"numel": 1 << 20, "batch_size": 1}, X.fan_in_min_sparsity_rule)),
    "semi_structured_unsupported": Target(X.semi_structured_unsupported,
                                          lambda e, kw: X.semi_structured_unsupported(**kw)),
    "InferenceReport": Target(X.InferenceReport),
    # sparse kernels for training
    "sparse_kernels": Target(sparse_kernels, _with(lambda e: {"model": e.model, "opt": e.opt},
                                                   sparse_kernels)),
    "SparseKernels": Target(K.SparseKernels, rows_of="sparse_kernels"),
    "KernelReport": Target(K.KernelReport),
    "training_min_sparsity_rule": Target(K.training_min_sparsity_rule, _with(
        lambda e: {"numel": 1 << 20, "batch_size": 1}, K.training_min_sparsity_rule)),
    # Hugging Face
    "param_groups": Target(hf.param_groups, _with(lambda e: {"model": e.model}, hf.param_groups)),
    "SparseTrainerCallback": Target(hf.SparseTrainerCallback,
                                    lambda e, kw: hf.SparseTrainerCallback(**kw)),
    # measurements
    "layer_flops": Target(F.layer_flops,
                          lambda e, kw: F.layer_flops(kw.get("model", e.model), torch.randn(2, 8))),
    "sparse_forward_flops": Target(F.sparse_forward_flops),
    "TrainingFlops": Target(F.TrainingFlops, _flops),
    "InTimeOverParameterization": Target(MT.InTimeOverParameterization,
                                         lambda e, kw: MT.InTimeOverParameterization(**kw)),
    "mask_churn": Target(MT.mask_churn),
    "prediction_disagreement": Target(MT.prediction_disagreement),
    "prediction_kl": Target(MT.prediction_kl),
}  # fmt: skip


# --- the exemptions, each with its reason --------------------------------------------------------
_DATA = "data (tensors, shapes, sequences) that torch or arithmetic consume; not re-checked"
_TORCH = "as every torch.optim.Optimizer: forwarded unchecked, as torch's own optimizers do"
EXEMPT: dict[tuple[str, str], str] = {
    ("SparseOptimizer.step", "closure"): _TORCH,
    ("SparseOptimizer.zero_grad", "set_to_none"): _TORCH,
    **{(f"SparseOptimizer.{name}", name): "the inner optimizer's attribute, set as torch and "
       "its schedulers set it" for name in ("param_groups", "state", "defaults")},
    ("SparseOptimizer.check_consistency", "group"): "a ProcessGroup; without an initialized "
        "process group the call does nothing (tests/test_distributed.py runs it)",
    **{("methods.MethodContext", p): "built by the engine; a method reads it"
       for p in ("layers", "settings")},
    **{("methods.SparseLayer", p): "built by the engine; a method reads it"
       for p in ("param", "name", "index", "mask", "count", "target")},
    **{("SparsityReport", p): "built by SparseOptimizer.report(); users read it"
       for p in ("layers", "updates", "structure", "dense", "frozen")},
    **{("cubic_density", p): "a formula GMP evaluates on its own checked settings"
       for p in ("step", "start", "end", "initial_density", "final_density")},
    **{(name, "shapes"): _DATA for name in ("uniform", "erk", "er", "from_mapping",
                                            "layer_densities")},
    ("from_mapping", "names"): _DATA,
    ("layer_densities", "names"): _DATA + " (a mapping without names is refused: "
        "tests/test_distributions.py)",
    ("exact_counts", "densities"): _DATA,
    **{(name, "scores"): _DATA + " (the hot path of every topology update)"
       for name in ("select_smallest", "select_largest", "select_largest_across",
                    "select_largest_within")},
    **{(name, p): _DATA + " (the hot path of every topology update)"
       for name in ("drop_and_grow", "exchange")
       for p in ("mask", "drop_scores", "grow_scores")},
    ("count_active", "masks"): _DATA,
    ("group_by_device_and_dtype", "tensors"): _DATA,
    ("group_by_device_and_dtype", "masks"): _DATA,
    ("apply_masks_", "tensors"): _DATA + " (every step)",
    ("apply_masks_", "masks"): _DATA + " (every step)",
    ("InferenceReport", "iterable"): "a list's rows, built by to_sparse_inference",
    ("KernelReport", "iterable"): "a list's rows, built by SparseKernels.report()",
    ("layer_flops", "inputs"): "forwarded to the model's forward",
    ("layer_flops", "kwargs"): "forwarded to the model's forward",
    ("TrainingFlops", "inputs"): "forwarded to the model's forward",
    ("sparse_forward_flops", "per_layer"): _DATA,
    ("sparse_forward_flops", "total"): _DATA,
    ("sparse_forward_flops", "densities"): _DATA,
    ("mask_churn", "before"): _DATA,
    ("mask_churn", "after"): _DATA,
    **{(name, p): _DATA for name in ("prediction_disagreement", "prediction_kl")
       for p in ("logits_a", "logits_b")},
}  # fmt: skip

# Arguments without a TypeError row: every value of every type is a meaningful "wrong value".
NO_TYPE_ROW: dict[tuple[str, str], str] = {
    ("SupTicketsScheduler.step", "epoch"): "must be None: any other value is refused as a value",
    ("exact_counts", "numels"): _DATA,
}
# Arguments without a ValueError row: no range and no set of names, only a type.
_NO_RANGE = "an object of a type (any instance will do)"
_BOOL = "a bool: its type is its range"
NO_VALUE_ROW: dict[tuple[str, str], str] = {
    ("SparseOptimizer", "optimizer"): _NO_RANGE,
    ("SparseOptimizer", "model"): _NO_RANGE,
    ("SparseOptimizer.periodic_updates", "periodic_updates"): _BOOL,
    ("SparseOptimizer.configure_superposition", "keep_tickets"): _BOOL,
    ("register_method", "factory"): "any callable",
    ("register_method", "overwrite"): _BOOL,
    ("random_structured", "generator"): _NO_RANGE + " (a CPU generator)",
    ("random_mask", "generator"): _NO_RANGE + " (a CPU generator)",
    ("apply_masks_", "nan_safe"): _BOOL,
    ("save_sparse", "model"): _NO_RANGE,
    ("save_sparse", "path"): "any path (an unwritable one is the OS's error)",
    ("save_sparse", "zero_signs"): _BOOL,
    ("to_sparse_inference", "model"): _NO_RANGE,
    ("sparse_kernels", "opt"): _NO_RANGE + " (a SparseOptimizer)",
    ("SparseLinear", "linear"): _NO_RANGE + " (any nn.Linear converts)",
    ("CondensedLinear", "compile"): _BOOL,
    ("CondensedConv1x1", "compile"): _BOOL,
    ("semi_structured_unsupported", "weight"): "a question: every tensor gets an answer (why "
    '2:4 kernels cannot run it, or "")',
    ("param_groups", "model"): _NO_RANGE,
    ("layer_flops", "model"): _NO_RANGE,
    ("TrainingFlops", "model"): _NO_RANGE,
    ("InTimeOverParameterization", "opt"): _NO_RANGE,
}
# Number or bool arguments without a numpy-scalar row in VALID.
NO_NUMPY_ROW: dict[tuple[str, str], str] = {
    ("SupTicketsScheduler.step", "epoch"): "must be None",
}


# --- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``TARGETS[call]`` run with ``kwargs`` (the first key is the argument under test) must raise
    ``error`` whose message matches ``match`` and contains ``names`` (default: that argument);
    ``error=None``: it must run. ``setup(env)`` runs first (another optimizer, a first ticket)."""

    call: str
    id: str
    kwargs: dict[str, Any]
    error: type[Exception] | None = None
    match: str = ""
    names: str | None = None
    setup: Callable[[Env], None] | None = None

    @property
    def arg(self) -> str:
        return next(iter(self.kwargs))

    def __repr__(self) -> str:
        return f"{self.call}-{self.id}"


def E(call, id, kwargs, error, match, *, names=None, setup=None) -> Case:
    return Case(call, id, kwargs, error, match, names, setup)


def V(call, id, kwargs, *, setup=None) -> Case:
    return Case(call, id, kwargs, setup=setup)


T, Vx = TypeError, ValueError
SO, CONS, CONF, SCHED, OFF, REC = (
    "SparseOptimizer", "SparseOptimizer.consolidate", "SparseOptimizer.configure_superposition",
    "SupTicketsScheduler", "SupTicketsScheduler.official", "SupTicketsScheduler.recommended",
)  # fmt: skip
NAN = float("nan")

# The MLP's sparse weights: 0.weight (16x8), 2.weight (16x16), 4.weight (4x16); 448 in all.
ERRORS: list[Case] = [
    # --- SparseOptimizer(...) ----------------------------------------------------------------
    E(SO, "not-an-optimizer", {"optimizer": Lazy(lambda e: object(), "object()")}, T,
      r"optimizer.*torch\.optim\.Optimizer.*object"),
    E(SO, "already-wrapped",
      {"optimizer": Lazy(lambda e: SparseOptimizer(e.sgd, "set", 0.5, model=e.model), "wrapped")},
      T, r"optimizer is already a SparseOptimizer"),
    E(SO, "param-group-sparse-not-bool",
      {"optimizer": Lazy(lambda e: torch.optim.SGD([{"params": e.model.parameters(),
                                                      "sparse": "no"}], lr=0.1), "sgd")},
      T, r"param group \"sparse\" to be a bool.*'no'", names="sparse"),
    E(SO, "sparsity-1", {"sparsity": 1.0}, Vx, r"sparsity in \[0, 1\).*1\.0"),
    E(SO, "sparsity-negative", {"sparsity": -0.1}, Vx, r"sparsity.*-0\.1"),
    E(SO, "sparsity-nan", {"sparsity": NAN}, Vx, r"sparsity.*nan"),
    E(SO, "sparsity-str", {"sparsity": "0.9"}, T, r"sparsity.*'0\.9'"),
    E(SO, "sparsity-bool", {"sparsity": True}, T, r"sparsity.*True"),
    E(SO, "sparsity-tensor", {"sparsity": torch.tensor(0.9)}, T, r"sparsity"),
    E(SO, "sparsity-vs-structure", {"sparsity": 0.9, "structure": "2:4"}, Vx,
      r"sparsity to be left out or 0\.5 with structure='2:4'.*0\.9"),
    E(SO, "method-unknown", {"method": "lottery"}, Vx,
      r"method 'lottery'.*'rigl'.*'set'.*'static'.*register_method"),
    E(SO, "method-type", {"method": 3}, T, r"method.*3"),
    E(SO, "method-instance-with-options", {"method": RigL(), "growth": "random"}, T,
      r"method options \['growth'\].*instance"),
    E(SO, "method-breaks-structure", {"method": "gmp", "structure": "2:4", "sparsity": None,
                                      "total_steps": 100, "update_every": 5}, Vx,
      r"method that keeps structure='2:4'.*'gmp'"),
    E(SO, "method-option-unknown", {"flavour": 1, "method": "set"}, T,
      r"method 'set'.*unexpected keyword.*flavour"),
    E(SO, "structure-type", {"structure": 2.0}, T, r"structure to be None, 'fan_in' or.*float"),
    E(SO, "structure-unknown", {"structure": "3:2"}, Vx, r"structure.*0 < N < M.*'3:2'"),
    E(SO, "distribution-unknown", {"distribution": "gaussian"}, Vx,
      r"distribution.*'er'.*'erk'.*'uniform'.*'gaussian'"),
    E(SO, "distribution-type", {"distribution": 0.5}, T, r"distribution.*0\.5"),
    E(SO, "distribution-mapping-unknown-name", {"distribution": {"5.weight": 0.1}}, Vx,
      r"distribution mapping.*unknown.*'5\.weight'.*'0\.weight'"),
    E(SO, "distribution-mapping-density-above-1", {"distribution": {"0.weight": 1.5}}, Vx,
      r"distribution\['0\.weight'\].*density.*1\.5"),
    E(SO, "distribution-mapping-density-negative", {"distribution": {"0.weight": -0.5}}, Vx,
      r"distribution\['0\.weight'\].*-0\.5"),
    E(SO, "distribution-mapping-density-nan", {"distribution": {"0.weight": NAN}}, Vx,
      r"distribution\['0\.weight'\].*nan"),
    E(SO, "distribution-mapping-density-str", {"distribution": {"0.weight": "0.5"}}, T,
      r"distribution\['0\.weight'\].*'0\.5'"),
    E(SO, "distribution-mapping-impossible-budget",
      {"distribution": {"0.weight": 1.0, "2.weight": 1.0}}, Vx,
      r"distribution mapping is impossible"),
    E(SO, "distribution-mapping-contradicts-sparsity",
      {"distribution": {"0.weight": 0.5, "2.weight": 0.5, "4.weight": 0.5}}, Vx,
      r"distribution mapping.*density.*sparsity"),
    E(SO, "update_every-0", {"update_every": 0}, Vx, r"update_every.*0"),
    E(SO, "update_every-float", {"update_every": 2.5}, T, r"update_every.*2\.5"),
    E(SO, "update_every-bool", {"update_every": True}, T, r"update_every.*True"),
    E(SO, "prune_rate-1.5", {"prune_rate": 1.5}, Vx, r"prune_rate.*1\.5"),
    E(SO, "prune_rate-negative", {"prune_rate": -0.1}, Vx, r"prune_rate.*-0\.1"),
    E(SO, "prune_rate-bool", {"prune_rate": True}, T, r"prune_rate.*True"),
    E(SO, "prune_rate-str", {"prune_rate": "0.3"}, T, r"prune_rate.*'0\.3'"),
    E(SO, "prune_schedule-linear", {"prune_schedule": "linear"}, Vx,
      r"prune_schedule.*'constant'.*'cosine'.*'linear'"),
    E(SO, "prune_schedule-type", {"prune_schedule": 3}, T, r"prune_schedule.*3 \(int\)"),
    E(SO, "cosine-without-total_steps", {"prune_schedule": "cosine"}, Vx,
      r"prune_schedule='cosine'.*total_steps"),
    E(SO, "stop_fraction-0", {"stop_fraction": 0}, Vx, r"stop_fraction.*0"),
    E(SO, "stop_fraction-above-1", {"stop_fraction": 1.5}, Vx, r"stop_fraction.*1\.5"),
    E(SO, "stop_fraction-str", {"stop_fraction": "0.75"}, T, r"stop_fraction.*'0\.75'"),
    E(SO, "total_steps-0", {"total_steps": 0}, Vx, r"total_steps.*0"),
    E(SO, "total_steps-float", {"total_steps": 10.0}, T, r"total_steps.*10\.0"),
    E(SO, "remask-never", {"remask": "never"}, Vx, r"remask.*'auto'.*'always'.*never"),
    E(SO, "remask-type", {"remask": 3}, T, r"remask.*3 \(int\)"),
    E(SO, "seed-str", {"seed": "x"}, T, r"seed.*'x'"),
    E(SO, "seed-float", {"seed": 1.5}, T, r"seed.*1\.5"),
    E(SO, "seed-beyond-torch", {"seed": 2**64}, Vx, r"seed in \[-9223372036854775808, "
      r"18446744073709551615\], but got 18446744073709551616"),
    E(SO, "model-not-a-module", {"model": "mlp"}, T, r"model.*nn\.Module.*str"),
    E(SO, "model-state-dict", {"model": Lazy(lambda e: e.model.state_dict(), "state_dict")}, T,
      r"model.*nn\.Module.*but got OrderedDict \(a state dict\? pass the module itself\)$"),
    # method options: growth (every method), GMP/GraNet's window, SNIP's scope
    E(SO, "growth-type", {"growth": 3}, T, r"growth.*3 \(int\)"),
    E(SO, "growth-unknown", {"growth": "magic", "method": "rigl"}, Vx,
      r"growth in \('random', 'gradient'\).*'magic'"),
    E(SO, "initial_density-str", {"initial_density": "1", "method": "gmp"}, T,
      r"initial_density.*'1'"),
    E(SO, "initial_density-0", {"initial_density": 0, "method": "granet"}, Vx,
      r"initial_density in \(0, 1\].*0"),
    E(SO, "initial_density-below-target", {"initial_density": 0.05, "method": "gmp"}, Vx,
      r"initial_density=0\.05 is below the target density 0\.1"),
    E(SO, "prune_start-str", {"prune_start": "0", "method": "gmp"}, T, r"prune_start.*'0'"),
    E(SO, "prune_start-1", {"prune_start": 1.0, "method": "gmp"}, Vx,
      r"prune_start in \[0, 1\).*1\.0"),
    E(SO, "prune_end-bool", {"prune_end": True, "method": "granet"}, T, r"prune_end.*True"),
    E(SO, "prune_end-above-1", {"prune_end": 1.5, "method": "gmp"}, Vx, r"prune_end.*1\.5"),
    E(SO, "prune_end-before-start", {"prune_end": 0.2, "prune_start": 0.3, "method": "gmp"}, Vx,
      r"prune_end > prune_start.*prune_start=0\.3, prune_end=0\.2"),
    E(SO, "prune_end-window-holds-no-update", {"prune_end": 0.5, "method": "gmp",
                                               "total_steps": 100, "update_every": 100}, Vx,
      r"pruning window of 'gmp'.*holds no multiple of update_every=100.*prune_start/prune_end"),
    E(SO, "scope-type", {"scope": 3, "method": "snip"}, T, r"scope.*3 \(int\)"),
    E(SO, "scope-unknown", {"scope": "row", "method": "snip"}, Vx,
      r"scope in \('global', 'layer'\).*'row'"),
    # --- SparseOptimizer.explore, the setters, add_param_group ---------------------------------
    *[E("SparseOptimizer.explore", f"rate-{rate!r}", {"rate": rate}, error,
        r"rate.*" + re.escape(repr(rate)))
      for rate, error in ((-0.1, Vx), (1.5, Vx), (NAN, Vx), ("0.5", T), (True, T))],
    E("SparseOptimizer.total_steps", "negative", {"total_steps": -5}, Vx, r"total_steps.*-5"),
    E("SparseOptimizer.total_steps", "float", {"total_steps": 10.0}, T, r"total_steps.*10\.0"),
    E("SparseOptimizer.total_steps", "refused-by-the-method", {"total_steps": 4}, Vx,
      r"pruning window of 'gmp' \(steps 0 to 2 of total_steps=4\).*update_every=5",
      setup=_use_gmp_opt),
    E("SparseOptimizer.periodic_updates", "int", {"periodic_updates": 1}, T,
      r"periodic_updates to be a bool.*1 \(int\)"),
    E("SparseOptimizer.periodic_updates", "str", {"periodic_updates": "no"}, T,
      r"periodic_updates.*'no'"),
    E("SparseOptimizer.add_param_group", "not-a-dict", {"param_group": "x"}, T,
      r"param_group must be a dict"),
    E("SparseOptimizer.add_param_group", "parameter-twice",
      {"param_group": Lazy(lambda e: {"params": [e.model[0].weight]}, "{params: [0.weight]}")},
      Vx, r"appear in more than one parameter group", names="parameter group"),
    E("SparseOptimizer.add_param_group", "sparse-not-bool",
      {"param_group": Lazy(lambda e: {"params": [nn.Parameter(torch.ones(4, 4))], "sparse": 0},
                           "{sparse: 0}")},
      T, r"param group \"sparse\" to be a bool.*0 \(int\)", names="sparse"),
    # --- consolidate -------------------------------------------------------------------------
    E(CONS, "averaging-type", {"averaging": 3}, T, r"averaging.*3 \(int\)"),
    E(CONS, "averaging-unknown", {"averaging": "mean"}, Vx,
      r"averaging in \('cia', 'caa', 'cima'\).*'mean'"),
    E(CONS, "averaging-differs-from-first", {"averaging": "caa"}, Vx,
      r"consolidate\(averaging='caa'.*differs from the first ticket's", setup=_first_ticket),
    E(CONS, "beta-str", {"beta": "0.8"}, T, r"beta.*'0\.8'"),
    E(CONS, "beta-1", {"beta": 1.0}, Vx, r"beta in \[0, 1\).*1\.0"),
    E(CONS, "beta-nan", {"beta": NAN}, Vx, r"beta.*nan"),
    E(CONS, "reprune-type", {"reprune": None}, T, r"reprune.*None"),
    E(CONS, "reprune-unknown", {"reprune": "row"}, Vx, r"reprune in \('layer', 'global'\).*'row'"),
    E(CONS, "reprune-global-with-structure", {"reprune": "global"}, Vx,
      r"reprune='layer' with structure='2:4'.*'global'", setup=_use_structured_opt),
    E(CONS, "bn_update-type", {"bn_update": 5}, T, r"bn_update.*int"),
    E(CONS, "bn_update-iterator", {"bn_update": ITERATOR}, T, r"bn_update.*an iterator"),
    E(CONS, "bn_update-without-model", {"bn_update": BATCHES}, Vx,
      r"bn_update recomputes.*needs the model: pass model=", setup=_use_opt_without_model),
    # --- configure_superposition ---------------------------------------------------------------
    E(CONF, "averaging-type", {"averaging": 3}, T, r"averaging.*3 \(int\)"),
    E(CONF, "averaging-unknown", {"averaging": "mean"}, Vx,
      r"averaging in \('cia', 'caa', 'cima'\).*'mean'"),
    E(CONF, "averaging-differs-after-first-ticket", {"averaging": "caa"}, Vx,
      r"configure_superposition\(averaging='caa'.*differs from the superposition's settings.*"
      r"fixed at its first ticket", setup=_first_ticket),
    E(CONF, "beta-str", {"beta": "0.8"}, T, r"beta.*'0\.8'"),
    E(CONF, "beta-1", {"beta": 1.0}, Vx, r"beta in \[0, 1\).*1\.0"),
    E(CONF, "reprune-type", {"reprune": None}, T, r"reprune.*None"),
    E(CONF, "reprune-unknown", {"reprune": "row"}, Vx, r"reprune in \('layer', 'global'\).*'row'"),
    E(CONF, "bn_update-type", {"bn_update": 5}, T, r"bn_update.*int"),
    E(CONF, "bn_update-without-model", {"bn_update": BATCHES}, Vx,
      r"bn_update recomputes.*pass model= to SparseOptimizer", setup=_use_opt_without_model),
    E(CONF, "keep_tickets-int", {"keep_tickets": 1}, T, r"keep_tickets to be a bool.*1 \(int\)"),
    E(CONF, "select-not-callable", {"select": 0.9}, T,
      r"select to be a callable fn\(model\) -> float.*0\.9 \(float\)"),
    E(CONF, "select-without-model", {"select": _score}, Vx,
      r"select scores the candidates on the model.*pass model= to SparseOptimizer",
      setup=_use_opt_without_model),
    # --- load_state_dict: a rejected load leaves the optimizer untouched --------------------------
    E("SparseOptimizer.load_state_dict", "not-a-dict", {"state_dict": "sd"}, T,
      r"state_dict to be a dict.*str"),
    E("SparseOptimizer.load_state_dict", "plain-sgd",
      {"state_dict": Lazy(lambda e: _plain_sgd_state(), "plain SGD state")}, Vx,
      r"no 'sparseopt' entry.*opt\.optimizer\.load_state_dict", names="state dict"),
    E("SparseOptimizer.load_state_dict", "other-method",
      {"state_dict": Lazy(lambda e: _trained(method="rigl").state_dict(), "rigl")}, Vx,
      r"state dict does not fit.*method 'rigl'.*'set'", names="state dict"),
    E("SparseOptimizer.load_state_dict", "other-sparsity",
      {"state_dict": Lazy(lambda e: _trained(sparsity=0.8).state_dict(), "0.8")}, Vx,
      r"state dict does not fit.*sparsity 0\.8.*0\.9", names="state dict"),
    E("SparseOptimizer.load_state_dict", "other-shape",
      {"state_dict": Lazy(lambda e: _trained(_Wide()).state_dict(), "wide")}, Vx,
      r"state dict does not fit.*parameter 0 has shape \[12, 8\].*\[16, 8\]", names="state dict"),
    E("SparseOptimizer.load_state_dict", "other-param-count",
      {"state_dict": Lazy(lambda e: _trained(nn.Sequential(make_mlp(), nn.Linear(4, 4)))
                          .state_dict(), "8 params")}, Vx,
      r"state dict does not fit.*8 parameters.*6", names="state dict"),
    # --- SupTicketsScheduler(...) ------------------------------------------------------------
    E(SCHED, "optimizer-plain", {"optimizer": SGD}, T,
      r"optimizer to be a SparseOptimizer, but got SGD"),
    E(SCHED, "optimizer-prunes-into-phase-2", {"optimizer": GMP_OPT}, Vx,
      r"method 'gmp' prunes until step 95.*phase 2.*after step 90", names="gmp"),
    E(SCHED, "total_steps-str", {"total_steps": "100"}, T, r"total_steps.*'100'"),
    E(SCHED, "total_steps-0", {"total_steps": 0}, Vx, r"total_steps to be a positive int.*0"),
    E(SCHED, "total_steps-differs", {"total_steps": 100}, Vx,
      r"total_steps=100 differs from the optimizer's total_steps=50",
      setup=lambda e: setattr(e.opt, "total_steps", 50)),
    E(SCHED, "cycle_steps-float", {"cycle_steps": 2.5}, T, r"cycle_steps.*2\.5"),
    E(SCHED, "cycle_steps-0", {"cycle_steps": 0}, Vx, r"cycle_steps.*0"),
    E(SCHED, "cycle_steps-no-ticket", {"cycle_steps": 50}, Vx,
      r"cycle_steps=50 is longer than superpose_fraction \* total_steps = 10.*cycle_steps <= 10"),
    E(SCHED, "base-type", {"base": 3}, T, r"base to be an LRScheduler.*int"),
    E(SCHED, "base-unknown-name", {"base": "cosine"}, Vx,
      r"base to be an LRScheduler.*\('paper', 'shared', 'constant'\), but got 'cosine'"),
    E(SCHED, "base-shorter-than-phase-1",
      {"base": Lazy(lambda e: torch.optim.lr_scheduler.OneCycleLR(e.opt, 0.1, total_steps=50),
                    "OneCycleLR(total_steps=50)")}, Vx,
      r"base whose own schedule covers phase 1 \(90 steps\).*OneCycleLR ends after 50 "
      r"\(total_steps=50\)"),
    E(SCHED, "base-factory-shorter-than-phase-1",
      {"base": lambda opt, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n // 2)}, Vx,
      r"covers phase 1 \(90 steps\).*CosineAnnealingLR ends after 46 \(T_max=45\)"),
    E(SCHED, "select-not-callable", {"select": "accuracy"}, T,
      r"select to be a callable.*'accuracy' \(str\)"),
    E(SCHED, "select-without-model", {"select": _score, "optimizer": NO_MODEL_OPT}, Vx,
      r"select scores the candidates.*pass model= to SparseOptimizer"),
    E(SCHED, "lr_high-below-lr_low", {"lr_high": 0.002, "lr_low": 0.003}, Vx,
      r"Expected lr_high >= lr_low, but got lr_high=0\.002 < lr_low=0\.003"),
    E(SCHED, "lr_high-below-relative-lr_low", {"lr_high": 0.0005}, Vx,
      r"Expected lr_high >= lr_low, but got lr_high=0\.0005 < lr_low=0\.001"),
    E(SCHED, "base-plateau",
      {"base": Lazy(lambda e: torch.optim.lr_scheduler.ReduceLROnPlateau(e.opt), "plateau")}, T,
      r"base.*ReduceLROnPlateau"),
    E(SCHED, "base-other-optimizer",
      {"base": Lazy(lambda e: torch.optim.lr_scheduler.StepLR(
          torch.optim.SGD(make_mlp().parameters(), lr=0.1), 10), "StepLR(other)")}, Vx,
      r"base must be built on the same optimizer"),
    E(SCHED, "superpose_fraction-str", {"superpose_fraction": "0.1"}, T,
      r"superpose_fraction.*'0\.1'"),
    E(SCHED, "superpose_fraction-1", {"superpose_fraction": 1}, Vx,
      r"superpose_fraction in \(0, 1\).*1"),
    E(SCHED, "lr_low-str", {"lr_low": "0.001"}, T, r"lr_low to be a real number.*'0\.001'"),
    E(SCHED, "lr_low-0", {"lr_low": 0}, Vx, r"lr_low in \(0, inf\).*0"),
    E(SCHED, "lr_low-list-length", {"lr_low": [0.001, 0.002]}, Vx,
      r"lr_low must have the same length as optimizer\.param_groups.*2 values.*1"),
    E(SCHED, "lr_high-bool", {"lr_high": True}, T, r"lr_high.*True"),
    E(SCHED, "lr_high-nan", {"lr_high": [NAN]}, Vx, r"lr_high.*nan"),
    E(SCHED, "explore_rate-str", {"explore_rate": "0.5"}, T, r"explore_rate.*'0\.5'"),
    E(SCHED, "explore_rate-1.5", {"explore_rate": 1.5}, Vx, r"explore_rate in \[0, 1\].*1\.5"),
    E(SCHED, "averaging-type", {"averaging": 3}, T, r"averaging.*3 \(int\)"),
    E(SCHED, "averaging-unknown", {"averaging": "mean"}, Vx, r"averaging.*'mean'"),
    E(SCHED, "beta-str", {"beta": "x"}, T, r"beta.*'x'"),
    E(SCHED, "beta-negative", {"beta": -0.1}, Vx, r"beta in \[0, 1\).*-0\.1"),
    E(SCHED, "reprune-type", {"reprune": 1}, T, r"reprune.*1 \(int\)"),
    E(SCHED, "reprune-unknown", {"reprune": "row"}, Vx, r"reprune.*'row'"),
    E(SCHED, "reprune-global-with-structure", {"reprune": "global"}, Vx,
      r"reprune='layer' with structure='2:4'", setup=_use_structured_opt),
    E(SCHED, "include_phase1-int", {"include_phase1": 1}, T, r"include_phase1.*1 \(int\)"),
    E(SCHED, "include_phase1-after-phase-1", {"include_phase1": True, "last_epoch": 95}, Vx,
      r"include_phase1=True.*step 90.*last_epoch=95"),
    E(SCHED, "bn_update-type", {"bn_update": 3}, T, r"bn_update.*int"),
    E(SCHED, "bn_update-iterator", {"bn_update": ITERATOR}, T, r"bn_update.*an iterator"),
    E(SCHED, "bn_update-without-model", {"bn_update": BATCHES, "optimizer": NO_MODEL_OPT}, Vx,
      r"bn_update.*pass model= to SparseOptimizer"),
    E(SCHED, "last_epoch-float", {"last_epoch": 1.5}, T, r"last_epoch to be an int.*1\.5"),
    E(SCHED, "last_epoch-below-minus-1", {"last_epoch": -2}, Vx, r"last_epoch in \[-1, inf\).*-2"),
    E(SCHED, "base-factory-arity", {"base": lambda step: 0.1}, T,
      r"base to be an LRScheduler.*or a factory \(optimizer, phase1_steps\)"),
    E(SCHED, "base-factory-returns-float", {"base": lambda opt, n: 0.1}, T,
      r"base factory to return an LRScheduler.*float"),
    # --- SupTicketsScheduler.plan(...) ----------------------------------------------------------
    E("SupTicketsScheduler.plan", "total_steps-str", {"total_steps": "100"}, T,
      r"total_steps.*'100'"),
    E("SupTicketsScheduler.plan", "total_steps-0", {"total_steps": 0}, Vx,
      r"total_steps to be a positive int.*0"),
    E("SupTicketsScheduler.plan", "cycle_steps-float", {"cycle_steps": 2.5}, T,
      r"cycle_steps.*2\.5"),
    E("SupTicketsScheduler.plan", "cycle_steps-no-ticket", {"cycle_steps": 50}, Vx,
      r"cycle_steps=50 is longer than superpose_fraction \* total_steps = 10"),
    E("SupTicketsScheduler.plan", "superpose_fraction-0", {"superpose_fraction": 0}, Vx,
      r"superpose_fraction in \(0, 1\).*0"),
    E("SupTicketsScheduler.plan", "superpose_fraction-str", {"superpose_fraction": "0.1"}, T,
      r"superpose_fraction.*'0\.1'"),
    # --- SupTicketsScheduler.official(...): its own arguments and the options it overrides ------
    E(OFF, "optimizer-plain", {"optimizer": SGD}, T, r"optimizer to be a SparseOptimizer"),
    E(OFF, "optimizer-prunes-into-phase-2", {"optimizer": GMP_OPT}, Vx, r"'gmp' prunes until",
      names="gmp"),
    E(OFF, "total_steps-float", {"total_steps": 100.0}, T, r"total_steps.*100\.0"),
    E(OFF, "total_steps-negative", {"total_steps": -1}, Vx, r"total_steps.*-1"),
    E(OFF, "cycle_steps-str", {"cycle_steps": "5"}, T, r"cycle_steps.*'5'"),
    E(OFF, "cycle_steps-0", {"cycle_steps": 0}, Vx, r"cycle_steps.*0"),
    E(OFF, "bn_update-type", {"bn_update": 1.0}, T, r"bn_update.*float"),
    E(OFF, "bn_update-without-model", {"bn_update": BATCHES, "optimizer": NO_MODEL_OPT}, Vx,
      r"bn_update.*model="),
    E(OFF, "override-unknown", {"flavour": 1}, T, r"unexpected keyword argument 'flavour'"),
    E(OFF, "include_phase1-str", {"include_phase1": "yes"}, T, r"include_phase1.*'yes'"),
    E(OFF, "include_phase1-after-phase-1", {"include_phase1": True, "last_epoch": 99}, Vx,
      r"include_phase1=True.*last_epoch=99"),
    E(OFF, "reprune-type", {"reprune": 0}, T, r"reprune.*0 \(int\)"),
    E(OFF, "reprune-unknown", {"reprune": "all"}, Vx, r"reprune.*'all'"),
    E(OFF, "averaging-type", {"averaging": None}, T, r"averaging.*None"),
    E(OFF, "averaging-unknown", {"averaging": "CIA"}, Vx, r"averaging.*'CIA'"),
    E(OFF, "explore_rate-str", {"explore_rate": "0.5"}, T, r"explore_rate.*'0\.5'"),
    E(OFF, "explore_rate-2", {"explore_rate": 2}, Vx, r"explore_rate.*2"),
    E(OFF, "lr_low-str", {"lr_low": "x"}, T, r"lr_low.*'x'"),
    E(OFF, "lr_low-negative", {"lr_low": -0.001}, Vx, r"lr_low.*-0\.001"),
    E(OFF, "lr_high-str", {"lr_high": "0.005"}, T, r"lr_high.*'0\.005'"),
    E(OFF, "lr_high-0", {"lr_high": 0.0}, Vx, r"lr_high.*0\.0"),
    # --- SupTicketsScheduler.recommended(...) ---------------------------------------------------
    E(REC, "optimizer-plain", {"optimizer": SGD}, T, r"optimizer to be a SparseOptimizer"),
    E(REC, "optimizer-prunes-into-phase-2", {"optimizer": GMP_OPT}, Vx, r"'gmp' prunes until",
      names="gmp"),
    E(REC, "total_steps-float", {"total_steps": 100.0}, T, r"total_steps.*100\.0"),
    E(REC, "total_steps-0", {"total_steps": 0}, Vx, r"total_steps.*0"),
    E(REC, "cycle_steps-str", {"cycle_steps": "5"}, T, r"cycle_steps.*'5'"),
    E(REC, "cycle_steps-no-ticket", {"cycle_steps": 50}, Vx, r"cycle_steps=50 is longer"),
    E(REC, "select-none", {"select": None}, T, r"select to be a callable.*None"),
    E(REC, "select-without-model", {"select": _score, "optimizer": NO_MODEL_OPT}, Vx,
      r"select scores the candidates.*pass model="),
    E(REC, "bn_update-iterator", {"bn_update": ITERATOR}, T, r"bn_update.*an iterator"),
    E(REC, "bn_update-type", {"bn_update": 2.0}, T, r"bn_update.*float"),
    E(REC, "bn_update-without-model", {"bn_update": BATCHES, "optimizer": NO_MODEL_OPT}, Vx,
      r"bn_update recomputes.*pass model="),
    E(REC, "override-unknown", {"flavour": 1}, T, r"unexpected keyword argument 'flavour'"),
    # --- the scheduler's step and load_state_dict, cyclic_lr --------------------------------------
    E("SupTicketsScheduler.step", "epoch", {"epoch": 3}, Vx, r"step\(\) takes no epoch",
      names="epoch"),
    E("SupTicketsScheduler.load_state_dict", "not-a-dict", {"state_dict": ["x"]}, T,
      r"state_dict to be a dict.*list"),
    E("SupTicketsScheduler.load_state_dict", "other-schedule",
      {"state_dict": Lazy(lambda e: SupTicketsScheduler(_trained(), 200, 5).state_dict(), "200")},
      Vx, r"another schedule: total_steps=200 vs this scheduler's 100", names="state dict"),
    E("cyclic_lr", "i-0", {"i": 0}, Vx, r"i to be a positive int.*0"),
    E("cyclic_lr", "i-float", {"i": 1.0}, T, r"i to be an int.*1\.0"),
    E("cyclic_lr", "cycle_steps-0", {"cycle_steps": 0}, Vx, r"cycle_steps.*0"),
    E("cyclic_lr", "cycle_steps-str", {"cycle_steps": "4"}, T, r"cycle_steps.*'4'"),
    E("cyclic_lr", "lr_low-str", {"lr_low": "x"}, T, r"lr_low.*'x'"),
    E("cyclic_lr", "lr_low-nan", {"lr_low": NAN}, Vx, r"lr_low.*nan"),
    E("cyclic_lr", "lr_high-none", {"lr_high": None}, T, r"lr_high.*None"),
    E("cyclic_lr", "lr_high-nan", {"lr_high": NAN}, Vx, r"lr_high in \(-inf, inf\).*nan"),
    # --- the method registry -----------------------------------------------------------------
    E("register_method", "name-none", {"name": None}, T, r"name to be a non-empty str.*None"),
    E("register_method", "name-empty", {"name": ""}, Vx, r"name to be a non-empty str.*''"),
    E("register_method", "name-taken", {"name": "RigL"}, Vx,
      r"method 'rigl' is already registered.*overwrite=True", names="rigl"),
    E("register_method", "factory-not-callable", {"factory": "SET"}, T,
      r"factory to be callable.*'SET'"),
    E("register_method", "overwrite-str", {"overwrite": "yes"}, T,
      r"overwrite to be a bool.*'yes'"),
    E("unregister_method", "name-int", {"name": 3}, T, r"name to be a str.*3"),
    E("unregister_method", "name-unknown", {"name": "lottery"}, Vx,
      r"method 'lottery' is not registered.*\['gmp', .*'static'\]", names="lottery"),
    E("get_method", "method-type", {"method": 3.0}, T, r"method.*3\.0"),
    E("get_method", "method-unknown", {"method": "lottery"}, Vx,
      r"Unknown method 'lottery'.*available methods"),
    E("get_method", "options-unknown", {"flavour": 1, "method": "rigl"}, T,
      r"method 'rigl' got unexpected keyword arguments \['flavour'\]"),
    E("get_method", "options-with-an-instance", {"growth": "random", "method": SET()}, T,
      r"method options \['growth'\] were given with a method instance"),
    E("get_method", "options-out-of-range", {"prune_end": 2, "method": "granet"}, Vx,
      r"prune_end in \(0, 1\].*2"),
    # --- TopologySchedule --------------------------------------------------------------------
    E("TopologySchedule", "update_every-float", {"update_every": 10.0}, T, r"update_every.*10\.0"),
    E("TopologySchedule", "update_every-0", {"update_every": 0}, Vx, r"update_every.*0"),
    E("TopologySchedule", "prune_rate-str", {"prune_rate": "0.3"}, T, r"prune_rate.*'0\.3'"),
    E("TopologySchedule", "prune_rate-1.5", {"prune_rate": 1.5}, Vx, r"prune_rate.*1\.5"),
    E("TopologySchedule", "decay-type", {"decay": 0}, T, r"decay to be one of.*0 \(int\)"),
    E("TopologySchedule", "decay-unknown", {"decay": "linear"}, Vx,
      r"decay in \('constant', 'cosine'\).*'linear'"),
    E("TopologySchedule", "end_step-str", {"end_step": "100"}, T, r"end_step.*'100'"),
    E("TopologySchedule", "end_step-negative", {"end_step": -1}, Vx, r"end_step in \[0, inf\).*-1"),
    E("TopologySchedule", "end_step-none-with-cosine", {"end_step": None}, Vx,
      r"end_step with decay='cosine'.*needs total_steps.*None"),
    # --- distributions -----------------------------------------------------------------------
    *[E(name, "density-str", {"density": "0.5"}, T, r"density to be a real number.*'0\.5'")
      for name in ("uniform", "erk", "er", "from_mapping", "layer_densities")],
    *[E(name, f"density-{bad}", {"density": bad}, Vx, rf"density in \(0, 1\].*{bad}")
      for name in ("uniform", "erk", "er", "from_mapping", "layer_densities")
      for bad in (0, 1.5, NAN)],
    E("from_mapping", "mapping-type", {"mapping": "a"}, T, r"mapping to be a mapping.*'a'"),
    E("from_mapping", "mapping-unknown-name", {"mapping": {"c": 0.5}}, Vx,
      r"mapping names unknown sparse parameters \['c'\]", names="mapping"),
    E("from_mapping", "mapping-density-str", {"mapping": {"a": "0.5"}}, T,
      r"distribution\['a'\].*'0\.5'", names="'a'"),
    E("layer_densities", "distribution-type", {"distribution": 3}, T, r"distribution.*3"),
    E("layer_densities", "distribution-unknown", {"distribution": "gaussian"}, Vx,
      r"distribution.*'gaussian'"),
    E("exact_counts", "density-str", {"density": "x"}, T, r"density to be a real number.*'x'"),
    E("exact_counts", "density-above-1", {"density": 1.5}, Vx, r"density in \[0, 1\].*1\.5"),
    E("exact_counts", "numels-length", {"numels": [4, 4, 4]}, Vx,
      r"densities and numels of the same length.*2 densities and 3 numels"),
    # --- structure ---------------------------------------------------------------------------
    E("Structure", "kind-type", {"kind": 3}, T, r"kind.*3 \(int\)"),
    E("Structure", "kind-unknown", {"kind": "block"}, Vx, r"kind in \('nm', 'fan_in'\).*'block'"),
    E("Structure", "n-float", {"n": 2.0}, T, r"n to be an int.*2\.0"),
    E("Structure", "n-equals-m", {"n": 4}, Vx, r"0 < N < M.*'4:4'", names="4:4"),
    E("Structure", "n-with-fan_in", {"n": 2, "kind": "fan_in", "m": None}, Vx,
      r"n and m to be None for 'fan_in'.*n=2"),
    E("Structure", "m-str", {"m": "4"}, T, r"m to be an int.*'4'"),
    E("Structure", "m-0", {"m": 0}, Vx, r"0 < N < M.*'2:0'", names="2:0"),
    E("NM", "n-str", {"n": "2"}, T, r"n to be an int.*'2' \(str\)"),
    E("NM", "n-0", {"n": 0}, Vx, r"0 < N < M.*'0:4'", names="0:4"),
    E("NM", "m-float", {"m": 4.0}, T, r"m to be an int.*4\.0"),
    E("NM", "m-equals-n", {"m": 2}, Vx, r"0 < N < M.*'2:2'", names="2:2"),
    E("parse_structure", "value-type", {"value": (2, 4)}, T, r"structure to be None.*tuple",
      names="structure"),
    E("parse_structure", "value-unknown", {"value": "FAN_IN"}, Vx,
      r"structure to be None, 'fan_in' or 'N:M'.*'FAN_IN'", names="structure"),
    E("gemm_shape", "shape-str", {"shape": "64x32"}, T, r"shape to be a sequence of ints.*'64x32'"),
    E("gemm_shape", "shape-float-dim", {"shape": (8.0, 4)}, T, r"shape.*\(8\.0, 4\)"),
    E("gemm_shape", "shape-1d", {"shape": (5,)}, Vx, r"weight shape with ndim >= 2.*\(5,\)",
      names="shape"),
    E("gemm_shape", "shape-negative", {"shape": (-1, 4)}, Vx,
      r"shape to have no negative dimension.*\(-1, 4\)"),
    E("fits", "shape-int", {"shape": 8}, T, r"shape to be a sequence of ints.*8 \(int\)"),
    E("fits", "shape-negative", {"shape": [4, -8]}, Vx, r"shape.*negative.*\(4, -8\)"),
    E("fits", "structure-type", {"structure": 4}, T, r"structure to be None.*int"),
    E("fits", "structure-unknown", {"structure": "2:4:8"}, Vx, r"structure.*'2:4:8'"),
    E("density", "structure-type", {"structure": 0.5}, T, r"structure to be None.*float"),
    E("density", "structure-fan_in", {"structure": "fan_in"}, Vx,
      r"an 'N:M' structure, but got 'fan_in'"),
    E("density", "structure-none", {"structure": None}, Vx,
      r"a structure \('fan_in' or 'N:M'\), but got None"),
    E("row_count", "shape-str", {"shape": "4x8"}, T, r"shape.*'4x8'"),
    E("row_count", "shape-1d", {"shape": (4,)}, Vx, r"weight shape with ndim >= 2.*\(4,\)",
      names="shape"),
    E("row_count", "density-str", {"density": "0.5"}, T, r"density to be a real number.*'0\.5'"),
    E("row_count", "density-1.5", {"density": 1.5}, Vx, r"density in \[0, 1\].*1\.5"),
    E("row_count", "density-nan", {"density": NAN}, Vx, r"density.*nan"),
    E("select_structured", "scores-list", {"scores": [[1.0, 2.0, 3.0, 4.0]]}, T,
      r"scores to be a tensor.*list"),
    E("select_structured", "scores-shape", {"scores": torch.rand(3, 6)}, Vx,
      r"holds 2:4, but got \(3, 6\): input dimension 6 is not a multiple of 4", names="(3, 6)"),
    E("select_structured", "structure-type", {"structure": b"2:4"}, T, r"structure.*bytes"),
    E("select_structured", "structure-unknown", {"structure": "4:2"}, Vx, r"structure.*'4:2'"),
    E("select_structured", "k-float", {"k": 4.0, "structure": "fan_in"}, T,
      r"k to be an int.*4\.0"),
    E("select_structured", "k-above-fan-in", {"k": 9, "structure": "fan_in"}, Vx,
      r"0 <= k <= 8 \(the fan-in\).*k=9"),
    E("select_structured", "k-disagrees-with-nm", {"k": 3}, Vx, r"k to be None or 4.*3"),
    E("random_structured", "shape-str", {"shape": "4x8"}, T, r"shape.*'4x8'"),
    E("random_structured", "shape-not-fitting", {"shape": (4, 6)}, Vx,
      r"weight shape that holds 2:4, but got \(4, 6\)", names="shape"),
    E("random_structured", "structure-type", {"structure": ["2:4"]}, T, r"structure.*list"),
    E("random_structured", "structure-unknown", {"structure": "fan-in"}, Vx,
      r"structure.*'fan-in'"),
    E("random_structured", "generator-type", {"generator": 0}, T,
      r"generator to be a CPU torch\.Generator.*int"),
    E("random_structured", "k-str", {"k": "2", "structure": "fan_in"}, T, r"k to be an int.*'2'"),
    E("random_structured", "k-missing-for-fan_in", {"k": None, "structure": "fan_in"}, Vx,
      r"Expected k .*for 'fan_in', but got None"),
    E("structured_drop_and_grow", "mask-float", {"mask": torch.ones(4, 8)}, T,
      r"mask to be a bool tensor.*float32"),
    E("structured_drop_and_grow", "mask-shape",
      {"mask": torch.ones(4, 6, dtype=torch.bool), "drop_scores": torch.rand(4, 6),
       "grow_scores": torch.rand(4, 6)}, Vx, r"\(4, 6\): input dimension 6 is not a multiple of 4",
      names="(4, 6)"),
    E("structured_drop_and_grow", "drop_scores-list", {"drop_scores": [0.0] * 32}, T,
      r"drop_scores to be a tensor.*list"),
    E("structured_drop_and_grow", "drop_scores-shape", {"drop_scores": torch.rand(8, 4)}, Vx,
      r"drop_scores of the mask's shape \(4, 8\).*\(8, 4\)"),
    E("structured_drop_and_grow", "grow_scores-none", {"grow_scores": None}, T,
      r"grow_scores to be a tensor.*NoneType"),
    E("structured_drop_and_grow", "grow_scores-shape", {"grow_scores": torch.rand(32)}, Vx,
      r"grow_scores of the mask's shape.*\(32,\)"),
    E("structured_drop_and_grow", "structure-type", {"structure": 2}, T, r"structure.*int"),
    E("structured_drop_and_grow", "structure-unknown", {"structure": "1:3"}, Vx,
      r"holds 1:3, but got \(4, 8\): input dimension 8 is not a multiple of 3", names="1:3"),
    E("structured_drop_and_grow", "k_drop-float", {"k_drop": 1.0}, T, r"k_drop.*1\.0"),
    E("structured_drop_and_grow", "k_drop-above-active", {"k_drop": 17}, Vx,
      r"0 <= k_drop <= 16 \(active\), but got 17"),
    *[E(name, "mask-int", {"mask": torch.ones(4, 8, dtype=torch.int64)}, T,
        r"mask to be a bool tensor.*int64") for name in ("structure_violations",
                                                          "check_structured")],
    *[E(name, "mask-shape", {"mask": torch.ones(4, 6, dtype=torch.bool)}, Vx,
        r"\(4, 6\): input dimension 6 is not a multiple of 4", names="(4, 6)")
      for name in ("structure_violations",
                                                                  "check_structured")],
    *[E(name, "structure-type", {"structure": 24}, T, r"structure.*int")
      for name in ("structure_violations", "check_structured")],
    *[E(name, "structure-unknown", {"structure": "nm"}, Vx, r"structure.*'nm'")
      for name in ("structure_violations", "check_structured")],
    *[E(name, "k-float", {"k": 4.0, "structure": "fan_in"}, T, r"k to be an int.*4\.0")
      for name in ("structure_violations", "check_structured")],
    *[E(name, "k-negative", {"k": -1, "structure": "fan_in"}, Vx, r"0 <= k <= 8.*k=-1")
      for name in ("structure_violations", "check_structured")],
    E("check_structured", "mask-breaks-structure",
      {"mask": torch.ones(4, 8, dtype=torch.bool)}, Vx,
      r"every group to hold 2 active under 2:4, but row 0, columns 0\.\.3 holds 4", names="row 0"),
    # --- mask kernels ------------------------------------------------------------------------
    *[E(name, "k-float", {"k": 1.5}, T, r"k to be an int.*1\.5")
      for name in ("select_smallest", "select_largest", "select_largest_across",
                   "drop_and_grow", "exchange")],
    *[E(name, "k-str", {"k": "2"}, T, r"k to be an int.*'2'")
      for name in ("select_smallest", "select_largest", "select_largest_across")],
    *[E(name, "k-too-many", {"k": 10}, Vx, r"0 <= k <= \d+, but got k=10")
      for name in ("select_smallest", "select_largest", "select_largest_across")],
    *[E(name, "k-negative", {"k": -1}, Vx, r"k=-1")
      for name in ("select_smallest", "select_largest", "select_largest_across",
                   "drop_and_grow", "exchange")],
    E("random_mask", "shape-str", {"shape": "2x3"}, T, r"shape to be a sequence of ints.*'2x3'"),
    E("random_mask", "shape-negative", {"shape": (2, -3)}, Vx, r"shape.*negative.*\(2, -3\)"),
    E("random_mask", "count-float", {"count": 1.5}, T, r"count to be an int.*1\.5"),
    E("random_mask", "count-above-numel", {"count": 7}, Vx, r"0 <= count <= 6, but got count=7"),
    E("random_mask", "generator-none", {"generator": None}, T,
      r"generator to be a CPU torch\.Generator.*NoneType"),
    E("apply_masks_", "nan_safe-str", {"nan_safe": "yes"}, T, r"nan_safe to be a bool.*'yes'"),
    E("select_largest_within", "count-float", {"count": 8.0}, T, r"count to be an int.*8\.0"),
    E("select_largest_within", "count-above-numel", {"count": 33}, Vx, r"k=33", names="33"),
    E("select_largest_within", "structure-type", {"structure": 2}, T, r"structure.*int"),
    E("select_largest_within", "structure-unknown", {"structure": "2-4"}, Vx, r"structure.*'2-4'"),
    E("exchange", "structure-type", {"structure": (2, 4)}, T, r"structure.*tuple"),
    E("exchange", "structure-unknown", {"structure": "2:2"}, Vx, r"structure.*'2:2'"),
    # --- export ------------------------------------------------------------------------------
    E("save_sparse", "model-type", {"model": object()}, T, r"model to be an nn\.Module.*object"),
    E("save_sparse", "path-int", {"path": 3}, T, r"path to be a str or os\.PathLike.*3 \(int\)"),
    E("save_sparse", "masks-list", {"masks": [1]}, T, r"masks to be a mapping.*list"),
    E("save_sparse", "masks-key-int", {"masks": {0: torch.ones(16, 8, dtype=torch.bool)}}, T,
      r"keys of masks to be parameters or names.*int"),
    E("save_sparse", "masks-foreign-tensor",
      {"masks": {torch.zeros(2): torch.ones(2, dtype=torch.bool)}}, Vx,
      r"masks to hold tensors of the model.*shape \(2,\)"),
    E("save_sparse", "masks-unknown-name", {"masks": {"9.weight": torch.ones(2)}}, Vx,
      r"masks to hold tensors of the model.*9\.weight"),
    E("save_sparse", "masks-float-mask",
      {"masks": Lazy(lambda e: {"0.weight": e.opt.masks[e.model[0].weight].float()}, "float")},
      T, r"mask of '0\.weight' to be a bool tensor.*float32", names="mask"),
    E("save_sparse", "masks-shape",
      {"masks": {"0.weight": torch.ones(8, 16, dtype=torch.bool)}}, Vx,
      r"mask of '0\.weight' to be a bool tensor of shape \(16, 8\).*\(8, 16\)", names="mask"),
    E("save_sparse", "masks-nonzeros-outside",
      {"masks": Lazy(lambda e: {"0.weight": torch.zeros(16, 8, dtype=torch.bool)}, "zeros")},
      Vx, r"weights of '0\.weight' outside its mask to be 0", names="mask"),
    E("save_sparse", "zero_signs-int", {"zero_signs": 1}, T, r"zero_signs to be a bool.*1 \(int\)"),
    E("load_sparse", "model-str", {"model": "model"}, T, r"model to be an nn\.Module.*str"),
    E("load_sparse", "model-other-shape", {"model": Lazy(lambda e: _Wide(), "wide")}, Vx,
      r"does not fit the model", names="model"),
    E("load_sparse", "path-list", {"path": ["m.sparse"]}, T, r"path to be a str.*list"),
    E("load_sparse", "path-not-a-checkpoint",
      {"path": Lazy(lambda e: e.file("junk.sparse", b"not a checkpoint"), "junk")}, Vx,
      r"junk\.sparse is not a readable sparse checkpoint", names="junk.sparse"),
    E("to_sparse_inference", "model-none", {"model": None}, T, r"model to be an nn\.Module"),
    E("to_sparse_inference", "min_sparsity-2", {"min_sparsity": 2}, Vx,
      r"min_sparsity in \[0, 1\], but got 2"),
    E("to_sparse_inference", "min_sparsity-nan", {"min_sparsity": NAN}, Vx,
      r"min_sparsity.*nan"),
    E("to_sparse_inference", "min_sparsity-str", {"min_sparsity": "0.9"}, T,
      r"min_sparsity to be a real number.*'0\.9'"),
    E("to_sparse_inference", "layout-type", {"layout": 0}, T,
      r"layout to be one of \('csr', 'bsr'\).*0 \(int\)"),
    E("to_sparse_inference", "layout-unknown", {"layout": "coo"}, Vx,
      r"layout in \('csr', 'bsr'\).*'coo'"),
    E("to_sparse_inference", "batch_size-0", {"batch_size": 0}, Vx,
      r"batch_size to be a positive int, but got 0"),
    E("to_sparse_inference", "batch_size-float", {"batch_size": 1.0}, T,
      r"batch_size to be an int, but got 1\.0 \(float\)"),
    E("to_sparse_inference", "blocksize-bool", {"blocksize": True, "layout": "bsr"}, T,
      r"blocksize to be an int.*True"),
    E("to_sparse_inference", "blocksize-negative", {"blocksize": -4, "layout": "bsr"}, Vx,
      r"blocksize to be a positive int.*-4"),
    # sparse kernels
    E("sparse_kernels", "model-str", {"model": "mlp"}, T, r"model to be an nn\.Module.*str"),
    E("sparse_kernels", "model-not-in-opt", {"model": Lazy(lambda e: nn.Linear(4, 4),
                                                           "Linear(4, 4)")}, Vx,
      r"model to hold sparse layers of opt, but none of its parameters is one"),
    E("sparse_kernels", "model-twice", {"model": MODEL}, Vx,
      r"model without sparse kernels, but got '0' already running on them",
      setup=lambda e: sparse_kernels(e.model, e.opt)),
    E("sparse_kernels", "opt-inner", {"opt": SGD}, T, r"opt to be a SparseOptimizer.*SGD"),
    E("sparse_kernels", "layout-int", {"layout": 2}, T, r"layout to be one of .*2 \(int\)"),
    E("sparse_kernels", "layout-unknown", {"layout": "coo"}, Vx, r"layout in \('auto'.*'coo'"),
    E("training_min_sparsity_rule", "numel-float", {"numel": 65536.0}, T,
      r"numel to be an int.*65536\.0"),
    E("training_min_sparsity_rule", "numel-negative", {"numel": -1}, Vx,
      r"numel in \[0, inf\).*-1"),
    E("training_min_sparsity_rule", "batch_size-bool", {"batch_size": True}, T,
      r"batch_size to be an int.*True"),
    E("training_min_sparsity_rule", "batch_size-0", {"batch_size": 0}, Vx,
      r"batch_size to be a positive int.*0"),
    E("min_sparsity_rule", "numel-str", {"numel": "x"}, T, r"numel to be an int.*'x'"),
    E("min_sparsity_rule", "numel-negative", {"numel": -1}, Vx, r"numel in \[0, inf\).*-1"),
    E("min_sparsity_rule", "batch_size-float", {"batch_size": 8.0}, T, r"batch_size.*8\.0"),
    E("min_sparsity_rule", "batch_size-0", {"batch_size": 0}, Vx,
      r"batch_size to be a positive int.*0"),
    E("SparseLinear", "linear-conv", {"linear": nn.Conv2d(8, 4, 1)}, T,
      r"linear to be an nn\.Linear.*Conv2d"),
    *[E(name, "layout-type", {"layout": None}, T, r"layout to be one of.*None")
      for name in ("SparseLinear", "SparseConv1x1")],
    *[E(name, "layout-unknown", {"layout": "csc"}, Vx, r"layout in \('csr', 'bsr'\).*'csc'")
      for name in ("SparseLinear", "SparseConv1x1")],
    *[E(name, "blocksize-float", {"blocksize": 2.0}, T, r"blocksize to be an int.*2\.0")
      for name in ("SparseLinear", "SparseConv1x1")],
    *[E(name, "blocksize-0", {"blocksize": 0}, Vx, r"blocksize to be a positive int.*0")
      for name in ("SparseLinear", "SparseConv1x1")],
    *[E(name, "blocksize-not-dividing", {"blocksize": 3, "layout": "bsr"}, Vx,
        r"blocksize to divide the weight's shape \(4, 8\), but got 3")
      for name in ("SparseLinear", "SparseConv1x1")],
    E("SparseConv1x1", "conv-linear", {"conv": nn.Linear(8, 4)}, T,
      r"conv to be an nn\.Conv2d.*Linear"),
    E("SparseConv1x1", "conv-3x3", {"conv": nn.Conv2d(8, 4, 3)}, Vx,
      r"a 1x1, stride-1, unpadded, ungrouped conv, but got kernel \(3, 3\)", names="conv"),
    E("to_sparse_inference", "structure-type", {"structure": 4}, T,
      r"structure to be None, 'auto', 'fan_in' or an 'N:M' string, but got int"),
    E("to_sparse_inference", "structure-unknown", {"structure": "AUTO"}, Vx,
      r"structure to be None, 'auto', 'fan_in' or 'N:M'.*'AUTO'"),
    E("to_sparse_inference", "masks-list", {"masks": [1]}, T, r"masks to be a mapping.*list"),
    E("to_sparse_inference", "masks-unknown-name",
      {"masks": {"9.weight": torch.ones(2, dtype=torch.bool)}, "structure": "auto"}, Vx,
      r"masks to hold tensors of the model.*9\.weight"),
    E("to_sparse_inference", "masks-float-mask", {"masks": {"0.weight": torch.ones(16, 8)}}, T,
      r"mask of '0\.weight' to be a bool tensor.*float32", names="mask"),
    E("to_sparse_inference", "masks-nonzeros-outside",
      {"masks": {"0.weight": torch.zeros(16, 8, dtype=torch.bool)}, "structure": "fan_in"}, Vx,
      r"weights of '0\.weight' outside its mask to be 0", names="mask"),
    E("CondensedLinear", "linear-conv", {"linear": nn.Conv2d(8, 4, 1)}, T,
      r"linear to be an nn\.Linear, but got Conv2d"),
    E("CondensedLinear", "linear-not-constant-fan-in",
      {"linear": Lazy(lambda e: _masked(nn.Linear(8, 4), TRIL), "Linear(tril)")}, Vx,
      r"same number of active weights \(constant fan-in\), but rows hold 1 to 4 nonzeros",
      names="constant fan-in"),
    E("CondensedConv1x1", "conv-linear", {"conv": nn.Linear(8, 4)}, T,
      r"conv to be an nn\.Conv2d, but got Linear"),
    E("CondensedConv1x1", "conv-3x3", {"conv": nn.Conv2d(8, 4, 3)}, Vx,
      r"a 1x1, stride-1, unpadded, ungrouped conv, but got kernel \(3, 3\)", names="conv"),
    *[E(name, "mask-list", {"mask": [[True] * 8] * 4}, T,
        r"mask to be a bool tensor or None, but got list")
      for name in ("CondensedLinear", "CondensedConv1x1")],
    *[E(name, "mask-float", {"mask": torch.ones(4, 8, 1, 1)}, T,
        r"mask to be a bool tensor or None, but got torch\.float32 tensor")
      for name in ("CondensedLinear", "CondensedConv1x1")],
    E("CondensedLinear", "mask-shape", {"mask": torch.ones(8, 4, dtype=torch.bool)}, Vx,
      r"mask of the weight's shape \(4, 8\), but got \(8, 4\)"),
    E("CondensedConv1x1", "mask-shape", {"mask": torch.ones(4, 8, dtype=torch.bool)}, Vx,
      r"mask of the weight's shape \(4, 8, 1, 1\), but got \(4, 8\)"),
    *[E(name, "mask-nonzeros-outside", {"mask": torch.zeros(4, 8, 1, 1, dtype=torch.bool)
                                        .reshape(shape)}, Vx,
        r"weights outside the mask to be 0, but got 32 nonzeros")
      for name, shape in (("CondensedLinear", (4, 8)), ("CondensedConv1x1", (4, 8, 1, 1)))],
    E("CondensedLinear", "mask-not-constant-fan-in", {"mask": TRIL, "linear": Lazy(
        lambda e: _masked(nn.Linear(8, 4), TRIL), "Linear(tril)")}, Vx,
      r"constant fan-in\), but rows hold 1 to 4$", names="constant fan-in"),
    E("CondensedConv1x1", "mask-not-constant-fan-in", {"mask": TRIL.reshape(4, 8, 1, 1),
                                                       "conv": Lazy(lambda e: _masked(
        nn.Conv2d(8, 4, 1), TRIL), "Conv2d(tril)")}, Vx,
      r"constant fan-in\), but rows hold 1 to 4$", names="constant fan-in"),
    *[E(name, "compile-int", {"compile": 1}, T, r"compile to be a bool, but got 1 \(int\)")
      for name in ("CondensedLinear", "CondensedConv1x1")],
    E("CondensedLinear", "compile-str", {"compile": "yes"}, T, r"compile to be a bool.*'yes'"),
    E("SemiStructuredLinear", "linear-conv", {"linear": nn.Conv2d(64, 64, 1)}, T,
      r"linear to be an nn\.Linear, but got Conv2d"),
    E("SemiStructuredLinear", "linear-none", {"linear": None}, T,
      r"linear to be an nn\.Linear, but got NoneType"),
    E("SemiStructuredLinear", "linear-on-cpu", {"linear": nn.Linear(64, 64)}, Vx,
      r"linear to be convertible to 2:4, but .*CUDA devices.*this weight is on cpu"),
    E("fan_in_min_sparsity_rule", "numel-str", {"numel": "x"}, T, r"numel to be an int.*'x'"),
    E("fan_in_min_sparsity_rule", "numel-float", {"numel": 65536.0}, T,
      r"numel to be an int.*65536\.0"),
    E("fan_in_min_sparsity_rule", "numel-negative", {"numel": -1}, Vx,
      r"numel in \[0, inf\).*-1"),
    E("fan_in_min_sparsity_rule", "batch_size-bool", {"batch_size": True}, T,
      r"batch_size to be an int.*True"),
    E("fan_in_min_sparsity_rule", "batch_size-0", {"batch_size": 0}, Vx,
      r"batch_size to be a positive int.*0"),
    E("semi_structured_unsupported", "weight-list", {"weight": [[1.0] * 4] * 4}, T,
      r"weight to be a tensor.*\(list\)"),
    E("semi_structured_unsupported", "weight-module", {"weight": nn.Linear(4, 4)}, T,
      r"weight to be a tensor.*\(Linear\)"),
    # --- Hugging Face ------------------------------------------------------------------------
    E("param_groups", "model-list", {"model": [nn.Parameter(torch.ones(2, 2))]}, T,
      r"model to be an nn\.Module.*list"),
    E("param_groups", "weight_decay-str", {"weight_decay": "0.01"}, T,
      r"weight_decay to be a float.*'0\.01'"),
    E("param_groups", "weight_decay-negative", {"weight_decay": -1.0}, Vx,
      r"weight_decay to be >= 0, but got -1\.0"),
    E("param_groups", "weight_decay-nan", {"weight_decay": NAN}, Vx,
      r"weight_decay to be >= 0, but got nan"),
    E("param_groups", "sparse_embeddings-str", {"sparse_embeddings": "yes"}, T,
      r"sparse_embeddings to be a bool.*'yes'"),
    E("param_groups", "sparse_embeddings-sparse-gradient",
      {"sparse_embeddings": True,
       "model": nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True)})}, Vx,
      r"embeddings in the sparse group to have dense gradients.*emb.*sparse_embeddings=False"),
    E("SparseTrainerCallback", "check_every-float", {"check_every": 1.5}, T,
      r"check_every to be an int.*1\.5"),
    E("SparseTrainerCallback", "check_every-negative", {"check_every": -1}, Vx,
      r"check_every to be >= 0, but got -1"),
    # --- FLOPs and metrics -------------------------------------------------------------------
    E("layer_flops", "model-str", {"model": "mlp"}, T, r"model to be an nn\.Module.*str"),
    E("TrainingFlops", "opt-inner", {"opt": SGD}, T, r"opt to be a SparseOptimizer.*SGD"),
    E("TrainingFlops", "opt-without-model", {"opt": NO_MODEL_OPT}, Vx,
      r"no FLOPs were counted for sparse layers \['param0'.*pass model=", names="model="),
    E("TrainingFlops", "model-str", {"model": "mlp"}, T, r"model to be an nn\.Module.*str"),
    E("InTimeOverParameterization", "opt-str", {"opt": "opt"}, T,
      r"opt to be a SparseOptimizer.*str"),
]  # fmt: skip


def _plain_sgd_state():
    model = make_mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    sgd.step()
    return sgd.state_dict()


# The valid neighbours: the edges just inside every range, and numpy scalars for every number and
# bool argument. Each must construct or run without error.
np32, np64, i32, i64, nb = np.float32, np.float64, np.int32, np.int64, np.bool_
VALID: list[Case] = [
    # SparseOptimizer(...), the method options
    V(SO, "sparsity-0", {"sparsity": 0.0}),
    V(SO, "sparsity-int-0", {"sparsity": 0}),
    V(SO, "sparsity-0.999", {"sparsity": 0.999}),
    V(SO, "sparsity-numpy", {"sparsity": np32(0.9), "prune_rate": np64(0.5)}),
    V(SO, "sparsity-left-out-with-structure", {"sparsity": None, "structure": "2:4"}),
    V(SO, "sparsity-matching-structure", {"sparsity": np64(0.5), "structure": "2:4"}),
    V(SO, "structure-fan_in", {"structure": "fan_in"}),
    V(SO, "structure-instance",
      {"structure": Lazy(lambda e: S.Structure("nm", i64(1), i64(2)), "1:2"), "sparsity": None}),
    V(SO, "optimizer-param-groups-sparse-numpy-bool",
      {"optimizer": Lazy(lambda e: torch.optim.SGD([
          {"params": [e.model[0].weight], "sparse": nb(False)},
          {"params": [p for n, p in e.model.named_parameters() if n != "0.weight"]}], lr=0.1),
          "sgd")}),
    V(SO, "method-case-insensitive", {"method": "RigL"}),
    V(SO, "method-instance", {"method": SNIP(scope="layer")}),
    V(SO, "distribution-uniform", {"distribution": "uniform"}),
    V(SO, "distribution-ER", {"distribution": "ER"}),
    V(SO, "distribution-mapping", {"distribution": {"0.weight": 0.2}}),
    V(SO, "distribution-mapping-numpy", {"distribution": {"0.weight": np32(0.2),
                                                          "2.weight": np64(0.05)}}),
    V(SO, "update_every-numpy", {"update_every": i64(1)}),
    V(SO, "prune_rate-0", {"prune_rate": 0.0}),
    V(SO, "prune_rate-1", {"prune_rate": 1.0}),
    V(SO, "prune_rate-numpy", {"prune_rate": np.float16(0.5)}),
    V(SO, "prune_schedule-cosine", {"prune_schedule": "cosine", "total_steps": 10}),
    V(SO, "prune_schedule-constant", {"prune_schedule": "constant"}),
    V(SO, "stop_fraction-1", {"stop_fraction": 1.0, "total_steps": 1}),
    V(SO, "stop_fraction-numpy", {"stop_fraction": np32(0.5), "total_steps": 10}),
    V(SO, "stop_fraction-rounding-to-no-update", {"stop_fraction": 0.5, "total_steps": 1}),
    V(SO, "total_steps-numpy", {"total_steps": i32(10)}),
    V(SO, "model-none", {"model": None}),
    V(SO, "seed-numpy", {"seed": i64(3)}),
    V(SO, "seed-torch-range", {"seed": 2**64 - 1}),
    V(SO, "seed-negative", {"seed": -(2**63)}),
    V(SO, "remask-always", {"remask": "always", "seed": 3}),
    V(SO, "growth-gradient", {"growth": "gradient", "method": "set"}),
    V(SO, "growth-random", {"growth": "random", "method": "granet"}),
    V(SO, "initial_density-numpy", {"initial_density": np32(0.8), "method": "gmp"}),
    V(SO, "initial_density-1", {"initial_density": 1, "method": "granet"}),
    V(SO, "initial_density-at-target", {"initial_density": 0.1, "method": "gmp"}),
    V(SO, "prune_start-numpy", {"prune_start": np64(0.1), "method": "gmp", "total_steps": 100,
                                "update_every": 5}),
    V(SO, "prune_start-0", {"prune_start": 0, "method": "granet"}),
    V(SO, "prune_end-numpy", {"prune_end": np32(1.0), "method": "gmp", "total_steps": 100,
                              "update_every": 5}),
    V(SO, "scope-layer", {"scope": "layer", "method": "snip"}),
    V(SO, "scope-global", {"scope": "global", "method": "snip", "growth": "random"}),
    # explore, the setters, consolidate, load_state_dict, add_param_group
    V("SparseOptimizer.explore", "rate-0", {"rate": 0}),
    V("SparseOptimizer.explore", "rate-1", {"rate": 1.0}),
    V("SparseOptimizer.explore", "rate-numpy", {"rate": np32(0.5)}),
    V("SparseOptimizer.total_steps", "none", {"total_steps": None}),
    V("SparseOptimizer.total_steps", "numpy", {"total_steps": i64(100)}),
    V("SparseOptimizer.periodic_updates", "numpy", {"periodic_updates": nb(False)}),
    V("SparseOptimizer.periodic_updates", "true", {"periodic_updates": True}),
    V(CONS, "averaging-cima-beta-0", {"averaging": "cima", "beta": 0.0}),
    V(CONS, "beta-numpy", {"beta": np32(0.5), "averaging": "cima"}),
    V(CONS, "beta-just-below-1", {"beta": 0.999}),
    V(CONS, "reprune-global", {"reprune": "global", "averaging": "caa"}),
    V(CONS, "bn_update-batches", {"bn_update": BATCHES}),
    V(CONS, "bn_update-callable", {"bn_update": lambda model: model(torch.randn(2, 8))}),
    V(CONS, "same-knobs-as-the-first", {"averaging": "cia"}, setup=_first_ticket),
    V(CONF, "numpy", {"beta": np32(0.5), "averaging": "cima", "keep_tickets": nb(True)}),
    V(CONF, "beta-edges", {"beta": 0.0}),
    V(CONF, "equal-after-first-ticket", {"averaging": "cia"}, setup=_first_ticket),
    V(CONF, "bn_update-and-select", {"bn_update": BATCHES, "select": _score,
                                     "reprune": "global"}),
    V(CONF, "select-callable-object", {"select": Lazy(lambda e: nn.Identity(), "a module")}),
    V("SparseOptimizer.load_state_dict", "own", {"state_dict": Lazy(lambda e: e.opt.state_dict(),
                                                                    "own")}),
    V("SparseOptimizer.add_param_group", "numpy-bool",
      {"param_group": Lazy(lambda e: {"params": [nn.Parameter(torch.ones(4, 4))],
                                      "sparse": nb(True)}, "{sparse: np.True_}")}),
    # SupTicketsScheduler(...), official, step, load_state_dict, cyclic_lr
    V(SCHED, "numpy", {"total_steps": i64(100), "cycle_steps": i32(5),
                       "superpose_fraction": np32(0.1), "lr_low": np32(0.001),
                       "lr_high": [np64(0.005)], "explore_rate": np32(0.5), "beta": np32(0.5),
                       "include_phase1": nb(False), "last_epoch": i64(-1)}),
    V(SCHED, "cycle_steps-numpy", {"cycle_steps": i64(10)}),
    V("SupTicketsScheduler.plan", "numpy",
      {"total_steps": i64(100), "cycle_steps": i32(5), "superpose_fraction": np64(0.2)}),
    V(SCHED, "base-factory",
      {"base": lambda opt, n: torch.optim.lr_scheduler.MultiStepLR(opt, [n // 2], 0.1)}),
    V(SCHED, "superpose_fraction-numpy", {"superpose_fraction": np64(0.5)}),
    V(SCHED, "lr_low-numpy-list", {"lr_low": [np32(0.002)]}),
    V(SCHED, "lr_high-numpy", {"lr_high": np64(0.01)}),
    V(SCHED, "explore_rate-0", {"explore_rate": 0}),
    V(SCHED, "explore_rate-numpy", {"explore_rate": np64(1.0)}),
    V(SCHED, "beta-numpy", {"beta": np32(0.0), "averaging": "cima"}),
    V(SCHED, "include_phase1-numpy", {"include_phase1": nb(True)}),
    V(SCHED, "last_epoch-numpy", {"last_epoch": i64(-1)}),
    V(SCHED, "optimizer-with-total_steps", {"optimizer": Lazy(
        lambda e: _trained(total_steps=100), "opt(total_steps=100)")}),
    V(SCHED, "base", {"base": Lazy(lambda e: torch.optim.lr_scheduler.StepLR(e.opt, 10),
                                   "StepLR")}),
    V(SCHED, "base-on-the-inner", {"base": Lazy(
        lambda e: torch.optim.lr_scheduler.StepLR(e.opt.optimizer, 10), "StepLR(inner)")}),
    V(SCHED, "reprune-global", {"reprune": "global"}),
    V(SCHED, "bn_update", {"bn_update": BATCHES}),
    V(OFF, "numpy", {"total_steps": i64(100), "cycle_steps": i64(5)}),
    V(OFF, "bn_update", {"bn_update": BATCHES}),
    V(OFF, "overrides", {"include_phase1": nb(False), "explore_rate": np32(0.3),
                         "lr_low": np32(0.002), "lr_high": [np64(0.004)], "averaging": "caa",
                         "reprune": "layer", "superpose_fraction": np32(0.2)}),
    V(SCHED, "select", {"select": _score}),
    V(SCHED, "base-names", {"base": "shared"}),
    V(SCHED, "base-constant", {"base": "constant"}),
    V(SCHED, "lr_high-equal-to-lr_low", {"lr_high": np64(0.003), "lr_low": 0.003}),
    V(SCHED, "base-onecycle-covering-phase-1", {"base": Lazy(
        lambda e: torch.optim.lr_scheduler.OneCycleLR(e.opt, 0.1, total_steps=90),
        "OneCycleLR(total_steps=90)")}),
    V(OFF, "lr_high-none-is-relative", {"lr_high": None, "lr_low": None}),
    V(REC, "numpy", {"total_steps": i64(100), "cycle_steps": i32(5)}),
    V(REC, "bn_update", {"bn_update": BATCHES}),
    V(REC, "overrides", {"explore_rate": np32(0.1), "base": None, "lr_high": None}),
    V("SupTicketsScheduler.step", "none", {"epoch": None}),
    V("SupTicketsScheduler.load_state_dict", "own",
      {"state_dict": Lazy(lambda e: e.sched.state_dict(), "own")}),
    V("cyclic_lr", "numpy", {"i": i64(3), "cycle_steps": i32(4), "lr_low": np32(0.001),
                             "lr_high": np64(0.005)}),
    V("cyclic_lr", "lr-zero-and-negative", {"lr_low": 0.0, "lr_high": -1.0}),
    # the registry
    V("register_method", "overwrite-numpy", {"overwrite": nb(False)}),
    V("register_method", "overwrite-true", {"overwrite": True, "name": "rigl", "factory": RigL}),
    V("register_method", "name-case", {"name": "My-Method"}),
    V("unregister_method", "built-in", {"name": "STATIC"}),
    V("get_method", "name-and-options", {"method": "GraNet", "prune_end": np32(0.4)}),
    V("get_method", "instance", {"method": SET()}),
    # TopologySchedule
    V("TopologySchedule", "numpy", {"update_every": i64(10), "prune_rate": np32(0.3),
                                    "end_step": i64(100)}),
    V("TopologySchedule", "constant-without-end", {"decay": "constant", "end_step": None}),
    V("TopologySchedule", "end_step-0", {"end_step": 0}),
    V("TopologySchedule", "prune_rate-edges", {"prune_rate": 0, "update_every": 1}),
    # distributions
    *[V(name, "density-numpy", {"density": np32(0.25)})
      for name in ("uniform", "erk", "er", "from_mapping", "layer_densities", "exact_counts")],
    *[V(name, "density-1", {"density": 1}) for name in ("uniform", "erk", "er", "exact_counts")],
    V("exact_counts", "density-0", {"density": 0.0, "densities": [0.0, 0.0]}),
    V("exact_counts", "numels-numpy", {"numels": [i64(4), i32(4)]}),
    V("from_mapping", "mapping-numpy", {"mapping": {"a": np64(0.25)}}),
    V("layer_densities", "distribution-mapping", {"distribution": {"a": np32(0.5)}}),
    V("layer_densities", "distribution-case", {"distribution": "ERK"}),
    # structure
    V("Structure", "numpy", {"n": i64(2), "m": i32(4)}),
    V("Structure", "fan_in", {"kind": "fan_in", "n": None, "m": None}),
    V("NM", "numpy", {"n": i64(1), "m": i32(8)}),
    V("parse_structure", "none", {"value": None}),
    V("parse_structure", "instance", {"value": S.Structure("fan_in")}),
    V("gemm_shape", "numpy", {"shape": (i64(8), i32(3), 3, 3)}),
    V("gemm_shape", "size", {"shape": torch.Size([5, 7])}),
    V("fits", "numpy", {"shape": [i64(8), i64(16)]}),
    V("fits", "structure-none", {"structure": None, "shape": (5,)}),
    V("fits", "empty-dimension", {"shape": (0, 4)}),
    V("density", "nm", {"structure": "1:8"}),
    V("row_count", "numpy", {"shape": (i64(4), 8), "density": np32(0.5)}),
    V("row_count", "density-edges", {"density": 0}),
    V("select_structured", "k-numpy", {"k": i64(3), "structure": "fan_in"}),
    V("select_structured", "structure-instance", {"structure": S.Structure("nm", 2, 4)}),
    V("random_structured", "numpy", {"shape": (i64(4), i64(8)), "k": i32(2),
                                     "structure": "fan_in"}),
    V("structured_drop_and_grow", "k_drop-numpy", {"k_drop": i64(16)}),
    V("structured_drop_and_grow", "k_drop-0", {"k_drop": 0}),
    V("structure_violations", "k-numpy", {"k": i64(4), "structure": "fan_in"}),
    V("check_structured", "k-numpy", {"k": i32(4)}),
    # mask kernels
    *[V(name, "k-numpy", {"k": i64(2)}) for name in ("select_smallest", "select_largest",
                                                     "select_largest_across", "drop_and_grow",
                                                     "exchange")],
    *[V(name, "k-0", {"k": 0}) for name in ("select_smallest", "select_largest", "drop_and_grow",
                                            "exchange")],
    V("select_largest_across", "k-all", {"k": 9}),
    V("select_largest_across", "scores-empty", {"scores": [], "k": 0}),
    V("random_mask", "numpy", {"shape": (i64(2), i32(3)), "count": i64(6)}),
    V("random_mask", "count-0", {"count": 0}),
    V("apply_masks_", "nan_safe-numpy", {"nan_safe": nb(True)}),
    V("select_largest_within", "count-numpy", {"count": i64(16), "structure": "2:4"}),
    V("select_largest_within", "structure-instance", {"structure": S.Structure("fan_in"),
                                                      "count": 8}),
    V("exchange", "structure-name", {"structure": "2:4", "k": 2}),
    # export
    V("save_sparse", "zero_signs-numpy", {"zero_signs": nb(True)}),
    V("save_sparse", "path-str", {"path": Lazy(lambda e: str(e.tmp / "s.sparse"), "str")}),
    V("save_sparse", "masks-by-name", {"masks": Lazy(
        lambda e: {"0.weight": e.opt.masks[e.model[0].weight]}, "{name: mask}")}),
    V("load_sparse", "path-str", {"path": Lazy(lambda e: str(e.saved()), "str")}),
    V("to_sparse_inference", "numpy", {"min_sparsity": np32(0.5), "batch_size": i64(8),
                                       "layout": "bsr", "blocksize": i64(2)}),
    V("to_sparse_inference", "min_sparsity-edges", {"min_sparsity": 0, "layout": "csr"}),
    V("to_sparse_inference", "min_sparsity-1", {"min_sparsity": 1.0}),
    V("sparse_kernels", "layouts", {"layout": "csr"}),
    V("sparse_kernels", "layout-condensed-on-unstructured", {"layout": "condensed"}),
    V("sparse_kernels", "a-submodule", {"model": Lazy(lambda e: e.model[2], "model[2]")}),
    V("training_min_sparsity_rule", "numpy", {"numel": i64(1 << 17), "batch_size": i32(64)}),
    V("training_min_sparsity_rule", "edges", {"numel": 0, "batch_size": 1}),
    V("min_sparsity_rule", "numpy", {"numel": i64(1 << 17), "batch_size": i32(64)}),
    V("min_sparsity_rule", "numel-0", {"numel": 0}),
    *[V(name, "blocksize-numpy", {"blocksize": i64(2), "layout": "bsr"})
      for name in ("SparseLinear", "SparseConv1x1")],
    V("SparseLinear", "csr", {"layout": "csr", "blocksize": 1}),
    V("to_sparse_inference", "structure-auto-masks", {"structure": "auto", "masks": Lazy(
        lambda e: e.opt.masks, "opt.masks")}),
    V("to_sparse_inference", "structure-fan_in-masks-by-name", {
        "structure": "fan_in",
        "masks": Lazy(lambda e: {"0.weight": e.opt.masks[e.model[0].weight]}, "{name: mask}")}),
    V("to_sparse_inference", "structure-nm", {"structure": "2:4", "min_sparsity": 0.5}),
    V("to_sparse_inference", "structure-none-masks", {"structure": None, "masks": None}),
    V("CondensedLinear", "compile-numpy", {"compile": nb(True)}),
    V("CondensedLinear", "mask", {"mask": MASK, "linear": FAN_IN_LINEAR}),
    V("CondensedLinear", "mask-with-an-active-zero", {"mask": MASK, "linear": Lazy(
        lambda e: _masked(nn.Linear(8, 4), MASK.make(e) & (torch.arange(8) != 0)),
        "Linear(2:4, one active weight 0)")}),
    V("CondensedLinear", "all-zero", {"linear": Lazy(lambda e: _masked(
        nn.Linear(8, 4), torch.zeros(4, 8, dtype=torch.bool)), "Linear(0)")}),
    V("CondensedConv1x1", "compile-numpy", {"compile": nb(False), "conv": FAN_IN_CONV}),
    V("CondensedConv1x1", "mask", {"mask": Lazy(lambda e: MASK.make(e).reshape(4, 8, 1, 1),
                                                "2:4 (4, 8, 1, 1)"), "conv": FAN_IN_CONV}),
    V("fan_in_min_sparsity_rule", "numpy", {"numel": i64(1 << 17), "batch_size": i32(64)}),
    V("fan_in_min_sparsity_rule", "edges", {"numel": 0, "batch_size": 1}),
    V("semi_structured_unsupported", "weight-cpu", {"weight": torch.zeros(64, 64)}),
    V("semi_structured_unsupported", "weight-1d", {"weight": torch.zeros(64)}),
    # Hugging Face
    V("param_groups", "numpy", {"weight_decay": np32(0.01), "sparse_embeddings": nb(True)}),
    V("param_groups", "weight_decay-0", {"weight_decay": 0}),
    V("SparseTrainerCallback", "numpy", {"check_every": i64(2)}),
    V("SparseTrainerCallback", "check_every-0", {"check_every": 0}),
    # FLOPs and metrics
    V("layer_flops", "model", {"model": MODEL}),
    V("TrainingFlops", "opt", {"opt": OPT}),
    V("InTimeOverParameterization", "opt", {"opt": OPT}),
]  # fmt: skip


# --- running a row -------------------------------------------------------------------------------
def _snapshot(opt: SparseOptimizer) -> dict[str, Any]:
    """Everything a call on the optimizer could change: the state dict (inner state, param
    groups, masks, counters, generator, superposed copy), total_steps and the weights."""
    return {
        "state_dict": copy.deepcopy(opt.state_dict()),
        "total_steps": opt.total_steps,
        "weights": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
    }


def _prepare(case: Case, env: Env) -> dict[str, Any]:
    """Run the row's setup and build its arguments."""
    if case.setup is not None:
        case.setup(env)
    return {k: _resolve(v, env) for k, v in case.kwargs.items()}


def _ids(cases: list[Case]) -> list:
    return [pytest.param(c, id=repr(c)) for c in cases]


@pytest.mark.parametrize("case", _ids(ERRORS))
def test_error_table(case, tmp_path, method_registry):
    env = Env(tmp_path)
    target = TARGETS[case.call]
    kwargs = _prepare(case, env)
    before = _snapshot(env.opt) if target.on_opt else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(case.error, match=case.match) as info:
            target.run(env, kwargs)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    names = case.arg if case.names is None else case.names
    assert names in str(info.value), f"the message does not name {names!r}: {info.value}"
    if before is not None:  # a rejected call leaves the optimizer untouched
        diff = first_difference(before, _snapshot(env.opt), "optimizer")
        assert diff is None, diff


@pytest.mark.parametrize("case", _ids(VALID))
def test_valid_edges_and_numpy_scalars_are_accepted(case, tmp_path, method_registry):
    """The negative control: the table is not over-strict."""
    env = Env(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        TARGETS[case.call].run(env, _prepare(case, env))


def test_the_untouched_check_sees_a_change(tmp_path):
    """Negative control: an accepted call on the optimizer shows in the snapshot."""
    env = Env(tmp_path)
    for change in (
        lambda o: o.explore(0.5),
        lambda o: setattr(o, "total_steps", 10),
        lambda o: setattr(o, "periodic_updates", False),
        lambda o: o.consolidate(),
    ):
        before = _snapshot(env.opt)
        change(env.opt)
        assert first_difference(before, _snapshot(env.opt)) is not None


def test_rejected_setter_keeps_the_old_value():
    model = make_mlp()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ValueError, match=r"total_steps.*-5"):
        opt.total_steps = -5
    assert opt.total_steps is None
    opt.total_steps = 100
    assert opt.total_steps == 100
    with pytest.raises(TypeError, match="periodic_updates"):
        opt.periodic_updates = 0
    assert opt.periodic_updates is True


# --- the table covers every public argument -------------------------------------------------------
# Every public callable: the top-level API, the public modules' __all__, and the public methods
# and setters of SparseOptimizer and SupTicketsScheduler. A class stands for its constructor.
_MODULES = (sparseopt, S, M, D, SC, ST, X, K, hf, F, MT, methods)
_CLASSES = (SparseOptimizer, SupTicketsScheduler)


def _public_callables() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for module in _MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, Mapping):
                out[f"{module.__name__}.{name}"] = obj
    for cls in _CLASSES:
        for name, attr in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(attr, property):
                if attr.fset is not None:
                    out[f"{cls.__name__}.{name} ="] = attr.fset
            elif callable(attr) or isinstance(attr, classmethod):
                out[f"{cls.__name__}.{name}"] = getattr(cls, name)
    return out


def _params(fn: Callable) -> list[inspect.Parameter]:
    """The arguments a caller passes (``self`` and ``cls`` left out)."""
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls") and not isinstance(fn, type):
        params = params[1:]
    return params


def _identity(fn: Callable) -> Callable:
    """The function under its wrappers (a classmethod's, ``torch.no_grad``'s, and torch's step
    hook, which patches ``step`` when the first optimizer is built)."""
    return inspect.unwrap(getattr(fn, "__func__", fn))


def test_every_public_callable_has_a_target():
    """A new public function, class or method must join ``TARGETS`` (or it has no arguments)."""
    known = {_identity(t.fn) for t in TARGETS.values()}
    missing = [
        name for name, fn in _public_callables().items()
        if _identity(fn) not in known and _params(fn)
    ]  # fmt: skip
    assert not missing, f"public callables with arguments but no TARGETS entry: {missing}"


def _keys(call: str, cases: list[Case], *, error: type[Exception] | None = None) -> set[str]:
    return {c.arg for c in cases if c.call == call and (error is None or c.error is error)}


def _required(name: str, target: Target) -> list[tuple[str, inspect.Parameter]]:
    """``(row key, parameter)`` for every argument of the target that rows must cover.

    ``**kwargs`` is covered by a row whose argument is no named parameter (an unknown option),
    and, for ``official``, by rows for each option it overrides."""
    rename = target.rename or {}
    out = []
    for p in _params(target.fn):
        if p.kind is p.VAR_POSITIONAL or (name, rename.get(p.name, p.name)) in EXEMPT:
            continue
        if p.kind is p.VAR_KEYWORD:
            extra = sorted(SupTicketsScheduler.OFFICIAL) if name == OFF else []
            out += [(key, p) for key in extra]
            out.append(("**" + p.name, p))
            continue
        out.append((rename.get(p.name, p.name), p))
    return out


def _covered(key: str, keys: set[str]) -> bool:
    """``key`` has rows; ``**kwargs`` has a row whose argument is no parameter of any target."""
    if not key.startswith("**"):
        return key in keys
    named = {p.name for t in TARGETS.values() for p in _params(t.fn)}
    return bool(keys - named)


def test_every_public_argument_has_rows():
    """Each argument of each target: a row in ERRORS, a TypeError row and a ValueError row (but
    for the listed exemptions), and a numpy-scalar row in VALID for every number and bool."""
    problems = []
    for name, target in TARGETS.items():
        rows_of = target.rows_of or name
        any_keys = _keys(rows_of, ERRORS)
        type_keys = _keys(rows_of, ERRORS, error=TypeError)
        value_keys = _keys(rows_of, ERRORS, error=ValueError)
        for key, p in _required(name, target):
            where = f"{name}({key})"
            if not _covered(key, any_keys):
                problems.append(f"{where}: no row")
                continue
            if key.startswith("**"):
                continue
            exempt_key = (rows_of, key)
            if key not in type_keys and exempt_key not in NO_TYPE_ROW:
                problems.append(f"{where}: no TypeError row")
            if key not in value_keys and exempt_key not in NO_VALUE_ROW:
                problems.append(f"{where}: no ValueError row")
            numeric = re.search(r"\b(int|float|bool)\b", str(p.annotation))
            if numeric and exempt_key not in NO_NUMPY_ROW and not _has_numpy_row(rows_of, key):
                problems.append(f"{where}: no numpy-scalar row in VALID ({p.annotation})")
        if target.run is None and rows_of == name:
            unexempt = [k for k, _ in _required(name, target)]
            if unexempt:
                problems.append(f"{name}: no run() but arguments {unexempt} are not exempt")
    assert not problems, "\n".join(problems)


def _contains_numpy(value: Any) -> bool:
    if isinstance(value, np.generic):
        return True
    if isinstance(value, Mapping):
        return any(_contains_numpy(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_numpy(v) for v in value)
    return False


def _has_numpy_row(call: str, key: str) -> bool:
    return any(c.call == call and _contains_numpy(c.kwargs.get(key)) for c in VALID)


def test_the_coverage_check_has_teeth():
    """Negative control: a callable with an argument that no row covers is reported."""

    def made_up(rate: float, flavour: str = "x") -> None: ...

    TARGETS["made_up"] = Target(made_up, lambda e, kw: made_up(**kw))
    ERRORS.append(E("made_up", "rate", {"rate": "x"}, T, "rate"))
    try:
        with pytest.raises(AssertionError) as info:
            test_every_public_argument_has_rows()
    finally:
        del TARGETS["made_up"]
        ERRORS.pop()
    report = str(info.value)
    assert "made_up(flavour): no row" in report
    assert "made_up(rate): no ValueError row" in report
    assert "made_up(rate): no numpy-scalar row" in report


def test_rows_are_unique_and_exemptions_are_live():
    ids = [repr(c) for c in ERRORS + VALID]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert all(c.call in TARGETS for c in ERRORS + VALID)
    for table in (EXEMPT, NO_TYPE_ROW, NO_VALUE_ROW, NO_NUMPY_ROW):
        for call, param in table:
            assert call in TARGETS, call
            target = TARGETS[call]
            names = {(target.rename or {}).get(p.name, p.name) for p in _params(target.fn)}
            if call == "SparseOptimizer":
                names |= {p.name for cls in (GMP, SNIP) for p in _params(cls)}
            assert param in names, f"{call}: exemption for a missing argument {param!r}"


def test_the_kept_cases_of_the_former_table_are_rows():
    """Every case the former per-constructor table checked is still a row."""
    ids = {c.id for c in ERRORS if c.call == SO}
    for required in (
        "not-an-optimizer", "already-wrapped", "sparsity-1", "sparsity-negative", "sparsity-nan",
        "sparsity-str", "sparsity-bool", "sparsity-tensor", "method-unknown", "method-type",
        "method-option-unknown", "distribution-unknown", "distribution-type",
        "distribution-mapping-unknown-name", "distribution-mapping-density-above-1",
        "distribution-mapping-density-negative", "distribution-mapping-impossible-budget",
        "distribution-mapping-contradicts-sparsity", "update_every-0", "update_every-float",
        "update_every-bool", "prune_rate-1.5", "prune_rate-negative", "prune_rate-bool",
        "prune_rate-str", "prune_schedule-linear", "stop_fraction-0", "stop_fraction-above-1",
        "cosine-without-total_steps", "total_steps-0", "total_steps-float", "remask-never",
        "seed-str", "seed-float", "model-not-a-module",
    ):  # fmt: skip
        assert required in ids
    loads = {c.id for c in ERRORS if c.call == "SparseOptimizer.load_state_dict"}
    assert {"plain-sgd", "other-method", "other-sparsity", "other-shape",
            "other-param-count"} <= loads  # fmt: skip
    explores = {c.id for c in ERRORS if c.call == "SparseOptimizer.explore"}
    assert {"rate--0.1", "rate-1.5", "rate-'0.5'", "rate-True"} <= explores


def test_table_size():
    """The table's size, for the record (and a floor, so that rows are not lost silently)."""
    calls = {c.call for c in ERRORS}
    args = {(TARGETS[c.call].rows_of or c.call, c.arg) for c in ERRORS}
    assert len(ERRORS) >= 300
    assert len(VALID) >= 120
    assert len(calls) >= 50
    assert len(args) >= 120
