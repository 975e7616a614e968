"""Every public name of the documented modules has a Google-style docstring with an example.

The API reference is generated from these docstrings (mkdocstrings), and the examples run as
doctests (``--doctest-modules`` over ``sparseopt/``). This test keeps both complete: a public
function or class without ``Examples:``, a documented parameter list without ``Args:``, or code
that raises without ``Raises:`` fails here, naming the object.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap

import pytest

MODULES = [
    "sparseopt",
    "sparseopt.methods",
    "sparseopt.distributions",
    "sparseopt.update_schedule",
    "sparseopt.settings",
    "sparseopt.masks",
    "sparseopt.structure",
    "sparseopt.metrics",
    "sparseopt.report",
    "sparseopt.flops",
    "sparseopt.export",
    "sparseopt.kernels",
    "sparseopt.integrations.hf",
]


def _public_objects():
    seen = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and id(obj) not in seen:
                seen.add(id(obj))
                yield pytest.param(obj, id=f"{module_name}.{name}")


def _named_parameters(fn) -> list[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in kinds]


def _own_source(obj) -> str:
    """The code of a function, or of the methods a class defines itself, without docstrings."""
    source = textwrap.dedent(inspect.getsource(obj))
    doc = inspect.getdoc(obj) or ""
    return source.replace(doc, "") if doc else source


@pytest.mark.parametrize("obj", list(_public_objects()))
def test_public_name_has_a_complete_docstring(obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{obj.__qualname__} has no docstring"
    assert "Examples:" in doc, f"{obj.__qualname__}: no Examples section"
    assert ">>> " in doc, f"{obj.__qualname__}: the Examples section has no doctest"
    params = _named_parameters(obj)
    if params:
        assert "Args:" in doc or "Attributes:" in doc, f"{obj.__qualname__}: no Args section"
        section = doc.split("Args:", 1)[-1] if "Args:" in doc else doc.split("Attributes:", 1)[-1]
        for name in params:
            assert f"{name} (" in section or f"{name}:" in section, (
                f"{obj.__qualname__}: parameter {name!r} is not documented"
            )
    if "raise " in _own_source(obj):
        assert "Raises:" in doc, f"{obj.__qualname__}: raises, but has no Raises section"


def _public_methods():
    for param in _public_objects():
        cls = param.values[0]
        if not inspect.isclass(cls):
            continue
        inherited = {name for base in cls.__mro__[1:] for name in vars(base)}
        for name, member in vars(cls).items():
            if name.startswith("_") or name in inherited:
                continue
            if inspect.isfunction(member) or isinstance(member, property):
                yield pytest.param(cls, name, id=f"{cls.__qualname__}.{name}")


@pytest.mark.parametrize(("cls", "name"), list(_public_methods()))
def test_public_method_has_a_docstring(cls, name):
    member = vars(cls)[name]
    doc = inspect.getdoc(member.fget if isinstance(member, property) else member)
    assert doc, f"{cls.__qualname__}.{name} has no docstring"
    if inspect.isfunction(member):
        params = _named_parameters(member)
        if params:
            assert "Args:" in doc, f"{cls.__qualname__}.{name}: no Args section"
