"""Deprecated module: the subspace maths lives in :mod:`tl_latentspaces.stats`.

Every function and result type is re-exported from there unchanged. The four streaming
accumulators are thin deprecated classes over :class:`~tl_latentspaces.stats.Moments` that warn
with ``DeprecationWarning``; new code keeps one ``Moments`` store and calls the plain functions
(``Moments.cov``, ``principal_subspace``, ``linear_cka_from_moments``, ``procrustes_from_moments``,
``unbiased_hsic_matrix``).
"""

import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from tl_latentspaces.checks import as_float64, check_bool, check_int, type_name
from tl_latentspaces.stats import (
    Moments,
    NullAngles,
    NullVarianceFraction,
    ProcrustesResult,
    cka_from_hsic,
    haar_bases,
    linear_cka,
    orthonormal_basis,
    principal_angles,
    principal_subspace,
    procrustes,
    procrustes_from_moments,
    random_subspace_angles,
    random_subspace_variance_fraction,
    unbiased_hsic_matrix,
    variance_fraction,
    variance_fraction_null,
)

__all__ = [
    "haar_bases",
    "principal_angles",
    "orthonormal_basis",
    "variance_fraction",
    "NullAngles",
    "NullVarianceFraction",
    "random_subspace_angles",
    "random_subspace_variance_fraction",
    "variance_fraction_null",
    "linear_cka",
    "CKAAccumulator",
    "CKAMatrixAccumulator",
    "ProcrustesResult",
    "procrustes",
    "ProcrustesAccumulator",
    "CovarianceAccumulator",
]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"tl_latentspaces.alignment_math.{old} is deprecated; use {new} from tl_latentspaces.stats.",
        DeprecationWarning,
        stacklevel=3,
    )


class _Deprecated:
    """``n``, ``merge``, ``state_dict`` and ``load_state_dict`` of a wrapper around ``self.moments``."""

    moments: Moments

    @property
    def n(self) -> int:
        """Number of rows seen so far."""
        return self.moments.n

    def merge(self, other: Any) -> Any:
        """Fold in another accumulator of the same kind and settings; returns ``self``."""
        if type(other) is not type(self):
            raise TypeError(f"can only merge a {type(self).__name__}, got {type_name(other)}.")
        self.moments.merge(other.moments)
        self._merge_extra(other)
        return self

    def _merge_extra(self, other: Any) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors, ints and lists."""
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        if not isinstance(state, dict) or "moments" not in state:
            raise ValueError(f"{type(self).__name__}.load_state_dict expects the dict from its state_dict().")
        self.moments.load_state_dict(state["moments"])


class CovarianceAccumulator(_Deprecated):
    """Deprecated: ``Moments(1, [(0, 0)])``; ``cov()`` is ``Moments.cov(0)``."""

    def __init__(self, d: int, *, device: Optional[Any] = None):
        _deprecated("CovarianceAccumulator", "Moments(1, [(0, 0)])")
        self.d = check_int(d, "d", minimum=1)
        self.device = device
        self.moments = Moments(1, [(0, 0)])

    def update(self, X: Tensor) -> None:
        X = as_float64(X, "X", ndim=2, shape_hint=f"[n, d={self.d}]")
        if X.shape[1] != self.d:
            raise ValueError(f"X must have d={self.d} columns (set at construction), got shape {tuple(X.shape)}.")
        self.moments.update([X if self.device is None else X.to(self.device)])

    @property
    def mean(self) -> Tensor:
        if self.moments.n < 1:
            raise ValueError("the mean needs at least 1 row(s); saw n=0.")
        return self.moments.means[0].clone()

    def cov(self, ddof: int = 1) -> Tensor:
        return self.moments.cov(0, ddof=ddof)

    def top_principal_subspace(self, k: int) -> Tensor:
        return principal_subspace(self.cov(), k)

    def state_dict(self) -> Dict[str, Any]:
        return {"d": self.d, **super().state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if isinstance(state, dict) and state.get("d", self.d) != self.d:
            raise ValueError(f"CovarianceAccumulator.load_state_dict: state has d={state['d']}, this accumulator d={self.d}.")
        super().load_state_dict(state)


class ProcrustesAccumulator(_Deprecated):
    """Deprecated: ``Moments(2, [(0, 1)], variances=True)`` and ``procrustes_from_moments``."""

    def __init__(self, *, center: bool = False):
        _deprecated("ProcrustesAccumulator", "Moments(2, [(0, 1)], variances=True) and procrustes_from_moments")
        self.center = check_bool(bool(center), "center")
        self.moments = Moments(2, [(0, 1)], variances=True)

    def update(self, X: Tensor, Y: Tensor) -> None:
        X = as_float64(X, "X", ndim=2, shape_hint="[n, d]")
        Y = as_float64(Y, "Y", ndim=2, shape_hint="[n, d]")
        if X.shape != Y.shape:
            raise ValueError(f"X and Y must have the same shape [n, d], got {tuple(X.shape)} and {tuple(Y.shape)}.")
        self.moments.update([X, Y.to(X.device)])

    def result(self) -> ProcrustesResult:
        m, n = self.moments, self.moments.n
        if n < 1:
            raise ValueError(f"Procrustes needs at least 1 row; saw n={n}.")
        xty, sx, sy = m.blocks[(0, 1)], m.sq_sums[0].sum(), m.sq_sums[1].sum()
        if not self.center:
            xty = xty + n * torch.outer(m.means[0], m.means[1])
            sx, sy = sx + n * m.means[0].square().sum(), sy + n * m.means[1].square().sum()
        return procrustes_from_moments(xty, sx, sy, n=n)

    def _merge_extra(self, other: "ProcrustesAccumulator") -> None:
        if other.center != self.center:
            raise ValueError(f"cannot merge center={other.center} into center={self.center}.")


class CKAMatrixAccumulator(_Deprecated):
    """Deprecated: ``Moments`` with every pair (biased CKA) and summed ``unbiased_hsic_matrix`` (debiased)."""

    def __init__(self, n_layers: int, *, track_biased: bool = True, track_debiased: bool = True, method: str = "auto"):
        _deprecated(type(self).__name__, "Moments, linear_cka_from_moments and unbiased_hsic_matrix")
        self.n_layers = check_int(n_layers, "n_layers", minimum=1)
        self.track_biased, self.track_debiased, self.method = bool(track_biased), bool(track_debiased), method
        pairs = [(i, j) for i in range(n_layers) for j in range(i, n_layers)] if track_biased else []
        self.moments = Moments(n_layers, pairs)
        self.hsic_u_sum = torch.zeros(n_layers, n_layers, dtype=torch.float64)
        self.n_batches = 0

    def update(self, xs: Sequence[Tensor]) -> None:
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs must be a list/tuple of {self.n_layers} [n, d] tensors (one per layer), got {type_name(xs)}.")
        self.moments.update(xs)
        if self.track_debiased and xs[0].shape[0]:
            self.hsic_u_sum += unbiased_hsic_matrix(xs, method=self.method).cpu()
            self.n_batches += 1

    def result(self, *, debiased: bool = False) -> Tensor:
        names = [f"layer {i}" for i in range(self.n_layers)]
        if debiased:
            if self.n_batches < 1:
                raise ValueError(f"debiased CKA needs at least 1 minibatch of >= 4 rows; saw {self.n_batches} minibatches.")
            return cka_from_hsic(self.hsic_u_sum / self.n_batches, "the mean unbiased HSIC", names)
        if self.moments.n < 2:
            raise ValueError(f"biased CKA needs at least 2 rows; saw n={self.moments.n}.")
        h = torch.empty(self.n_layers, self.n_layers, dtype=torch.float64)
        for (i, j), block in self.moments.blocks.items():
            h[i, j] = h[j, i] = block.square().sum().cpu()
        return cka_from_hsic(h, "HSIC", names)

    def _merge_extra(self, other: "CKAMatrixAccumulator") -> None:
        self.hsic_u_sum += other.hsic_u_sum
        self.n_batches += other.n_batches

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "hsic_u_sum": self.hsic_u_sum.clone(), "n_batches": self.n_batches}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.hsic_u_sum, self.n_batches = state["hsic_u_sum"].to(torch.float64).clone(), int(state["n_batches"])


class CKAAccumulator(CKAMatrixAccumulator):
    """Deprecated: linear CKA of two representations; see :class:`CKAMatrixAccumulator`."""

    def __init__(self, *, track_biased: bool = True, track_debiased: bool = True, method: str = "auto"):
        super().__init__(2, track_biased=track_biased, track_debiased=track_debiased, method=method)

    def update(self, X: Tensor, Y: Tensor) -> None:  # type: ignore[override]
        super().update([X, Y])

    def result(self, *, debiased: bool = False) -> Tensor:
        return super().result(debiased=debiased)[0, 1]
