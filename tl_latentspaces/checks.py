"""Argument checks shared by every public entry point: one wording for one kind of mistake.

A wrong type raises :class:`ArgumentTypeError` (a ``TypeError`` and a ``ValueError``); a value out of
range raises ``ValueError``. Every message names the argument, what is valid and what was received.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings
from typing import Any, Optional

import torch

__all__ = ["ArgumentTypeError", "type_name", "check_int", "check_bool", "check_float", "check_finite", "as_float64",
           "check_cache", "check_device", "warn_user"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (both a ``TypeError`` and a ``ValueError``)."""


def warn_user(message: str, category: type = UserWarning) -> None:
    """Warn, pointing at the caller's own line: the first frame outside this package, however deep the call."""
    frame, level = sys._getframe(1), 2  # level 1 is this function
    while frame is not None and frame.f_globals.get("__name__", "").startswith("tl_latentspaces."):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def type_name(x: Any) -> str:
    """``int``, ``float``, ``numpy.ndarray``...: the type of ``x`` as a reader would name it."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_int(value: Any, name: str, *, minimum: int, maximum: Optional[int] = None, why: str = "") -> int:
    """``value`` as an int if it is an integer in ``[minimum, maximum]`` (numpy integers count; bools do
    not); ``why`` explains the bound in the error message."""
    valid = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    wrong = ArgumentTypeError(f"{name} must be an int {valid}{why}, got {type_name(value)} ({value!r:.80}). "
                              f"Fix: pass int({name}).")
    if isinstance(value, bool):
        raise wrong
    try:
        value = operator.index(value)
    except TypeError:
        raise wrong from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {valid}{why}, got {value}.")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {type_name(value)} ({value!r:.80}).")
    return value


def check_float(value: Any, name: str, *, minimum: float, maximum: float = math.inf, open_minimum: bool = False,
                why: str = "") -> float:
    """``value`` as a float if it is a finite real number within the bounds (``> minimum`` when open)."""
    parts = ([f"{'>' if open_minimum else '>='} {minimum}"] if minimum != -math.inf else []) + (
        [f"<= {maximum}"] if maximum != math.inf else [])
    bound = " " + " and ".join(parts) if parts else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a finite number{bound}{why}, got {type_name(value)} ({value!r:.80}).")
    value = float(value)
    ok = math.isfinite(value) and (value > minimum if open_minimum else value >= minimum) and value <= maximum
    if not ok:
        raise ValueError(f"{name} must be a finite number{bound}{why}, got {value!r}.")
    return value


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the count and the first index of NaN/inf entries of ``x``."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); the first is "
                         f"{x[first].item()} at index {first}. All entries must be finite. Fix: drop or mask "
                         f"those rows (e.g. padding positions) before passing {name}.")


def as_float64(x: Any, name: str, *, ndim: Optional[int] = None, shape_hint: str = "") -> torch.Tensor:
    """A user's real floating-point tensor as float64, after type, rank and finiteness checks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(x)}. "
                        f"Fix: wrap it, e.g. torch.as_tensor({name}, dtype=torch.float64).")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor (float32 or float64), got "
                        f"dtype={x.dtype}. Fix: pass {name}.double().")
    if ndim is not None and x.ndim != ndim:
        fix = f" Fix: flatten leading dimensions, e.g. {name}.reshape(-1, {name}.shape[-1])."
        raise ValueError(f"{name} must be {ndim}-D {shape_hint}, got shape {tuple(x.shape)} ({x.ndim}-D)."
                         + (fix if ndim == 2 and x.ndim > 2 else ""))
    x = x.to(torch.float64)
    check_finite(x, name)
    return x


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` if it names a CPU, or a CUDA or MPS device that is available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here; use --device cpu.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for, but MPS is not available here; use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return dev


def check_cache(cache: Any) -> None:
    """Raise ``TypeError`` unless ``cache`` looks up activations by hook name (an ``ActivationCache``, a dict)."""
    if isinstance(cache, (torch.Tensor, str, bytes, list, tuple)) or not hasattr(cache, "__getitem__"):
        raise TypeError(f"cache must be an ActivationCache (or a dict of hook name -> activation), got "
                        f"{type_name(cache)}. Make one with _, cache = model.run_with_cache(tokens).")
