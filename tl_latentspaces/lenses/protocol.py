"""What a lens is: the :class:`Lens` protocol, the logit lens, and the adapter that reads any lens.

A lens maps a stack entry's residual rows into the final residual basis (``translate``); the
model's own readout (final norm, ``W_U``, ``b_U``) does the rest. :class:`LogitLens` is that
readout itself (the identity lens); :class:`TranslatedLens` reads any :class:`Lens` through it,
sharing the logit lens's ``W_U`` tensor so that every translated lens shares its vocabulary sweep.
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
    """``build(source)``, computed once per model and weight: rebuilt when ``source`` changes.

    The readout matrices (a float32, vocabulary-major ``W_U``; the row-normalized ``W_E``) cost a
    49K x d_model copy to build, more than a short prompt's whole readout. They are kept per model
    (weakly: they go with it), keyed by :func:`~tl_latentspaces.readout.tensor_key` of the weight
    they come from, so a weight replaced or changed in place is noticed.
    """
    per_model = _WEIGHTS.setdefault(access.model, {})
    key = tensor_key(source)
    hit = per_model.get(kind)
    if hit is None or hit[0] != key:
        hit = (key, build(source.detach()))
        per_model[kind] = hit
    return hit[1]


def unembedding(access: ModelAccess) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``W_U`` (float32, vocabulary-major) and ``b_U`` (None when zero: a zero bias costs a pass per tile)."""
    weight = cached_weight(access, "W_U", access.W_U, lambda w: vocab_major(w.to(torch.float32)))
    b = access.b_U
    bias = cached_weight(access, "b_U", b, lambda t: None if not bool(t.any()) else t.to(torch.float32))
    return weight, bias



class LogitLens:
    """``ln_final(x) @ W_U + b_U``: the model's own readout applied to any residual vector.

    Args:
        access: The model.
    """

    name = "logit"
    score_scale = 1.0

    def __init__(self, access: ModelAccess):
        self.access = access
        # One row per token (no copy for the bridge, whose W_U is a transposed view), built once
        # per model and weight: see vocab_major and _cached.
        self.weight, self.bias = unembedding(access)

    def project(self, x: torch.Tensor, entry: int) -> torch.Tensor:
        return self.access.final_norm(x)


@runtime_checkable
class Lens(Protocol):
    """What a lens is: a map from one stack entry's residuals into the final residual basis.

    Any object with a ``name`` and a ``translate`` method is a lens; the model's own readout
    (final norm, ``W_U``, ``b_U``) turns what it returns into vocabulary scores. It reads
    wherever a built-in lens does: :func:`read_lenses`, :func:`lens_session`,
    :func:`~tl_latentspaces.evaluate_lenses`, :func:`~tl_latentspaces.lens_grid` and the report.
    :class:`~tl_latentspaces.TunedLens` and :class:`~tl_latentspaces.JacobianLens` are lenses of
    this kind; ``"logit"`` is the identity one.

    Attributes:
        name: The lens's name in results (``results[name]``) and tables; unique per call.

    ``translate(x, label)`` gets ``x``, a ``[n, d_model]`` float32 tensor of residuals of the
    stack entry ``label`` (``"0_pre"`` ... ``"{n_layers-1}_pre"``, ``"{l}_mid"`` with
    ``incl_mid=True``, ``"final_post"``) and returns ``[n, d_model]``. A lens with nothing for a
    label raises ``ValueError``: every label is tried (on zero rows) before the forward pass, so
    that error comes first.

    Example (a fixed random rotation of the residual basis):
        >>> class Rotation:
        ...     name = "rotation"
        ...     def __init__(self, d_model, seed=0):
        ...         g = torch.Generator().manual_seed(seed)
        ...         self.Q = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0]
        ...     def translate(self, x, label):
        ...         return x @ self.Q.to(x.device)
        >>> results = read_lenses(model, "The Eiffel Tower is in", lenses=("logit", Rotation(576)))  # doctest: +SKIP
        >>> results["rotation"].top_tokens()  # doctest: +SKIP
    """

    name: str

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        ...


class TranslatedLens:
    """A :class:`Lens` read through the model's own readout: ``ln_final(translate(x, label)) @ W_U + b_U``.

    The readout weights are the logit lens's own (the same tensor), so every translated lens and
    the logit lens share one sweep of ``W_U``, and the identity lens reads exactly as ``"logit"``.

    Args:
        lens: The lens.
        access: The model.
        labels: The stack labels, indexed by the readout's entry numbers; each is tried on zero
            rows now, so a label the lens refuses fails before any forward pass.
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
        x = x.to(torch.float32)  # the protocol's promise, whatever the model's dtype
        with torch.no_grad():
            y = self.lens.translate(x, label)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"lens {self.name!r}: translate(x, {label!r}) must return a tensor of the shape of x, "
                f"{list(x.shape)}; it returned {got}."
            )
        return y

    def project(self, x: Float[torch.Tensor, "n d_model"], entry: int) -> Float[torch.Tensor, "n d_model"]:
        return self.access.final_norm(self.translate(x, self.labels[entry]))


