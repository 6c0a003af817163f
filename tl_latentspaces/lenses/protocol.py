"""The :class:`Lens` protocol, the logit lens, and :class:`TranslatedLens`, which reads any lens through the
model's own readout (final norm, ``W_U``, ``b_U``).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Float

from tl_latentspaces.model import ModelAccess
from tl_latentspaces.readout import tensor_key, vocab_major

__all__ = ["Lens", "LogitLens", "TranslatedLens", "cached_weight", "unembedding"]

_WEIGHTS: "weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple, Any]]]" = weakref.WeakKeyDictionary()


def cached_weight(access: ModelAccess, kind: str, source: torch.Tensor, build: Any) -> Any:
    """``build(source)``, kept per model (weakly) and rebuilt when ``source`` changes (by its ``tensor_key``)."""
    per_model = _WEIGHTS.setdefault(access.model, {})
    key = tensor_key(source)
    if kind not in per_model or per_model[kind][0] != key:
        per_model[kind] = (key, build(source.detach()))
    return per_model[kind][1]


def unembedding(access: ModelAccess) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``W_U`` (float32, vocabulary-major) and ``b_U`` (None when zero: a zero bias costs a pass per tile)."""
    weight = cached_weight(access, "W_U", access.W_U, lambda w: vocab_major(w.to(torch.float32)))
    bias = cached_weight(access, "b_U", access.b_U, lambda b: b.to(torch.float32) if bool(b.any()) else None)
    return weight, bias


class LogitLens:
    """``ln_final(x) @ W_U + b_U``: the model's own readout applied to any residual vector."""

    name = "logit"
    score_scale = 1.0

    def __init__(self, access: ModelAccess):
        self.access = access
        self.weight, self.bias = unembedding(access)

    def project(self, x: torch.Tensor, entry: int) -> torch.Tensor:
        return self.access.final_norm(x)


@runtime_checkable
class Lens(Protocol):
    """A map from one stack entry's residuals into the final residual basis: any object with a ``name`` and
    ``translate(x, label)``. The model's own readout turns the result into vocabulary scores.

    ``name`` is the lens's key in results; unique per call. ``translate`` gets ``x``, ``[n, d_model]`` float32
    residuals of the stack entry ``label`` (``"0_pre"`` ... ``"final_post"``, ``"{l}_mid"`` with ``incl_mid``)
    and returns ``[n, d_model]``. A lens with nothing for a label raises ``ValueError``: every label is tried on
    zero rows before the forward pass, so that error comes first.

    Example (a fixed random rotation of the residual basis):
        >>> class Rotation:
        ...     name = "rotation"
        ...     def __init__(self, d_model, seed=0):
        ...         g = torch.Generator().manual_seed(seed)
        ...         self.Q = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0]
        ...     def translate(self, x, label):
        ...         return x @ self.Q.to(x.device)
        >>> results = read_lenses(model, "The Eiffel Tower is in", lenses=("logit", Rotation(576)))  # doctest: +SKIP
    """

    name: str

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        ...


class TranslatedLens:
    """A :class:`Lens` read as ``ln_final(translate(x, label)) @ W_U + b_U``, sharing the logit lens's ``W_U``.

    ``labels`` are the stack labels by the readout's entry numbers; each is tried on zero rows now.
    """

    score_scale = 1.0

    def __init__(self, lens: Lens, access: ModelAccess, labels: Sequence[str]):
        self.lens, self.access, self.name = lens, access, lens.name
        self.labels = list(labels)
        self.weight, self.bias = unembedding(access)
        empty = torch.zeros(0, access.d_model, device=access.device)
        for label in self.labels:
            self.translate(empty, label)

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        x = x.to(torch.float32, copy=True)  # the lens's own copy: an in-place edit reaches no other lens
        with torch.no_grad():
            y = self.lens.translate(x, label)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape) or not y.is_floating_point():
            got = f"{list(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"lens {self.name!r}: translate(x, {label!r}) must return a real floating-point tensor of the "
                f"shape of x, {list(x.shape)}; it returned {got}."
            )
        if not torch.isfinite(y).all():
            raise ValueError(
                f"lens {self.name!r}: translate(x, {label!r}) returned {int((~torch.isfinite(y)).sum())} NaN or "
                "inf values for finite residuals. Fix the lens (a division by a zero norm, say)."
            )
        return y

    def project(self, x: Float[torch.Tensor, "n d_model"], entry: int) -> Float[torch.Tensor, "n d_model"]:
        return self.access.final_norm(self.translate(x, self.labels[entry]))
