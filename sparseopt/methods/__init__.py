"""The registry of sparse-training methods, the base class, and the built-in methods.

Layers: ``sparseopt.context`` (what a method sees: ``SparseLayer``, ``MethodContext``, re-exported
here) < ``base`` (``SparsityMethod``) < the methods (``static``, ``set``, ``rigl``, ``gmp``,
``granet``, ``snip``) < this registry. No method imports the optimizer or the engine.

Examples:
    >>> from sparseopt.methods import available_methods
    >>> available_methods()
    ['gmp', 'granet', 'rigl', 'set', 'snip', 'static']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _validate
from .._warnings import warn
from ..context import MethodContext, SparseLayer
from .base import GROWTH, SparsityMethod
from .gmp import GMP
from .granet import GraNet
from .rigl import RigL
from .set import SET
from .snip import SNIP
from .static import Static

__all__ = [
    "GMP",
    "GROWTH",
    "SET",
    "SNIP",
    "GraNet",
    "MethodContext",
    "RigL",
    "SparseLayer",
    "SparsityMethod",
    "Static",
    "available_methods",
    "get_method",
    "register_method",
    "unregister_method",
]

_REGISTRY: dict[str, Callable[..., SparsityMethod]] = {}


def register_method(
    name: str, factory: Callable[..., SparsityMethod], *, overwrite: bool = False
) -> None:
    """Register a method under ``name`` (lower-cased) so that ``method=name`` finds it.

    Args:
        name (str): the registry name.
        factory (Callable): a ``SparsityMethod`` subclass, or any callable taking the method's
            keyword options and returning a ``SparsityMethod``.
        overwrite (bool): replace an existing entry (with a warning). Default: False.

    Raises:
        ValueError: if ``name`` is empty, or taken and ``overwrite`` is False.
        TypeError: if ``name`` is not a string, ``factory`` is not callable or ``overwrite`` is
            not a bool.

    Examples:
        Names are unique; a worked example that registers a new criterion is in the guide
        "Writing your own method" (``docs/custom-methods.md``):

        >>> from sparseopt.methods import RigL, register_method
        >>> register_method("RigL", RigL)
        Traceback (most recent call last):
        ...
        ValueError: method 'rigl' is already registered; pass overwrite=True to replace it
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected name to be a non-empty str, but got {name!r}")
    if not name:
        raise ValueError(f"Expected name to be a non-empty str, but got {name!r}")
    if not callable(factory):
        raise TypeError(f"Expected factory to be callable, but got {factory!r}")
    overwrite = _validate.boolean("overwrite", overwrite)
    key = name.lower()
    if key in _REGISTRY:
        if not overwrite:
            raise ValueError(
                f"method {key!r} is already registered; pass overwrite=True to replace it"
            )
        warn(f"replacing registered method {key!r}")
    _REGISTRY[key] = factory


def unregister_method(name: str) -> Callable[..., SparsityMethod]:
    """Remove ``name`` (lower-cased) from the registry and return its factory.

    Meant for tests and notebooks that register a method for a while: register it, use it, and
    unregister it (or put the returned factory back with ``register_method``). Optimizers already
    built with the method keep working; only new lookups by name fail.

    Args:
        name (str): a registered name, built-in ones included.

    Returns:
        Callable: the factory that was registered under ``name``.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the registered names.
        TypeError: if ``name`` is not a string.

    Examples:
        >>> from sparseopt.methods import RigL, available_methods, register_method
        >>> from sparseopt.methods import unregister_method
        >>> register_method("my-rigl", RigL)
        >>> unregister_method("My-RigL") is RigL
        True
        >>> "my-rigl" in available_methods()
        False
        >>> unregister_method("my-rigl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: method 'my-rigl' is not registered; registered methods are ['gmp', ...]
    """
    if not isinstance(name, str):
        raise TypeError(f"Expected name to be a str, but got {name!r}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"method {key!r} is not registered; registered methods are {available_methods()}"
        )
    return _REGISTRY.pop(key)


def available_methods() -> list[str]:
    """The registered method names, sorted.

    Examples:
        >>> "rigl" in available_methods()
        True
    """
    return sorted(_REGISTRY)


def get_method(method: str | SparsityMethod, **options: Any) -> SparsityMethod:
    """Resolve ``method`` (a registered name or an instance) to a ``SparsityMethod`` instance.

    ``SparseOptimizer`` calls it with its ``method`` argument and its unknown keyword arguments.

    Args:
        method (str | SparsityMethod): a registered name (case-insensitive) or an instance,
            which is returned as it is.
        **options: keyword arguments for the method's constructor (only with a name).

    Returns:
        The method instance.

    Raises:
        ValueError: for an unknown name; the message lists the registered ones.
        TypeError: for anything else, or options given together with an instance.

    Examples:
        >>> get_method("granet", prune_end=0.4)
        GraNet(initial_density=0.5, prune_start=0.0, prune_end=0.4)
    """
    if isinstance(method, SparsityMethod):
        if options:
            raise TypeError(
                f"method options {sorted(options)} were given with a method instance; "
                "configure the instance instead"
            )
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"Expected method to be a registered name or a SparsityMethod, but got {method!r}"
        )
    factory = _REGISTRY.get(method.lower())
    if factory is None:
        raise ValueError(
            f"Unknown method {method!r}; available methods are {available_methods()}. "
            "Register a new one with sparseopt.register_method(name, cls)."
        )
    return factory(**options)


for _cls in (Static, SET, RigL, GraNet, GMP, SNIP):
    register_method(_cls.name, _cls)
del _cls
