"""Warnings that point at the user's line, and warn once per owner and kind.

``warnings.warn(..., stacklevel=k)`` names the line ``k`` frames up, which is right only for one
call depth: the same check reached from ``opt.step()``, from ``scaler.step(opt)`` or from an
``LRScheduler`` wrapper lands in torch's or sparseopt's own files. :func:`warn` instead walks the
stack to the first frame outside sparseopt, torch and the training frameworks that call them
(Python 3.12's ``skip_file_prefixes``, for every supported Python), so the warning names the
user's line. :class:`Once` keeps one owner's warnings to one each, whatever their text (a message
that names a step number would otherwise repeat on every step).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["Once", "user_stacklevel", "warn"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_STDLIB_WRAPPERS = ("contextlib.py", "functools.py")
_FRAMEWORKS = ("accelerate", "lightning", "pytorch_lightning", "transformers")


def _internal(filename: str) -> bool:
    """Whether a frame of ``filename`` is sparseopt's, torch's, or a framework's loop."""
    path = os.path.abspath(filename)
    if path.startswith((_HERE + os.sep, _TORCH + os.sep)):
        return True
    if os.path.basename(path) in _STDLIB_WRAPPERS:
        return True
    parts = path.split(os.sep)
    return "site-packages" in parts and any(f in parts for f in _FRAMEWORKS)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller name the user's line.

    Counted from the function that calls ``user_stacklevel`` (level 1), up to the first frame
    outside sparseopt, torch, ``contextlib``/``functools`` and the training frameworks
    (Accelerate, Lightning, transformers). If every frame is internal (a test of the library
    itself, say), the outermost one.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename):
        if frame.f_back is None:
            break
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


class Once:
    """One warning per ``key`` for the object that holds it (an optimizer, a scheduler).

    Examples:
        >>> once = Once()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for step in range(3):
        ...         _ = once.warn("nonfinite", f"non-finite gradients at step {step}")
        >>> [str(w.message) for w in caught]
        ['non-finite gradients at step 0']
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def warn(self, key: str, message: str, category: type[Warning] = UserWarning) -> bool:
        """Warn with ``message`` unless ``key`` warned before; return whether it warned."""
        if key in self.seen:
            return False
        self.seen.add(key)
        warnings.warn(message, category, stacklevel=user_stacklevel())
        return True
