"""Deprecated module: the subspace maths lives in :mod:`tl_latentspaces.stats`, re-exported here unchanged.

The four old accumulators warn with ``DeprecationWarning`` and wrap a :class:`~tl_latentspaces.stats.Moments`.
"""

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from tl_latentspaces.checks import type_name, warn_user
from tl_latentspaces.stats import (
    Moments, NullAngles, NullVarianceFraction, ProcrustesResult, cka_from_hsic, haar_bases, linear_cka,
    orthonormal_basis, principal_angles, principal_subspace, procrustes, procrustes_from_moments,
    random_subspace_angles, random_subspace_variance_fraction, unbiased_hsic_matrix, variance_fraction,
    variance_fraction_null,
)

__all__ = [
    "haar_bases", "principal_angles", "orthonormal_basis", "variance_fraction", "NullAngles", "NullVarianceFraction",
    "random_subspace_angles", "random_subspace_variance_fraction", "variance_fraction_null", "linear_cka",
    "CKAAccumulator", "CKAMatrixAccumulator", "ProcrustesResult", "procrustes", "ProcrustesAccumulator",
    "CovarianceAccumulator",
]


class _Deprecated:
    """Warns on construction; ``n``, ``merge`` and checkpoints of ``self.moments`` plus the ``_extra`` attributes."""

    _extra: Sequence[str] = ()

    def __init__(self, moments: Moments, new: str):
        warn_user(
            f"tl_latentspaces.alignment_math.{type(self).__name__} is deprecated; use {new} "
            "from tl_latentspaces.stats.",
            DeprecationWarning)
        self.moments = moments

    @property
    def n(self) -> int:
        return self.moments.n

    def merge(self, other: Any) -> Any:
        if type(other) is not type(self):
            raise TypeError(f"can only merge a {type(self).__name__}, got {type_name(other)}.")
        self.moments.merge(other.moments)
        for name in self._extra:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {"moments": self.moments.state_dict(), **{name: getattr(self, name) for name in self._extra}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "moments" not in state:
            raise ValueError(f"{type(self).__name__}.load_state_dict expects the dict from its state_dict().")
        self.moments.load_state_dict(state["moments"])
        for name in self._extra:
            setattr(self, name, state[name])


class CovarianceAccumulator(_Deprecated):
    """Deprecated: ``Moments(1, [(0, 0)])``; ``cov()`` is ``Moments.cov(0)``."""

    def __init__(self, d: int, *, device: Optional[Any] = None):
        super().__init__(Moments(1, [(0, 0)]), "Moments(1, [(0, 0)])")
        self.d, self.device = d, device

    def update(self, X: Tensor) -> None:
        self.moments.update([X if self.device is None else X.to(self.device)])

    @property
    def mean(self) -> Tensor:
        return self.moments.means[0].clone()

    def cov(self, ddof: int = 1) -> Tensor:
        return self.moments.cov(0, ddof=ddof)

    def top_principal_subspace(self, k: int) -> Tensor:
        return principal_subspace(self.cov(), k)


class ProcrustesAccumulator(_Deprecated):
    """Deprecated: ``Moments(2, [(0, 1)], variances=True)`` and ``procrustes_from_moments``."""

    def __init__(self, *, center: bool = False):
        new = "Moments(2, [(0, 1)], variances=True) and procrustes_from_moments"
        super().__init__(Moments(2, [(0, 1)], variances=True), new)
        self.center = bool(center)

    def update(self, X: Tensor, Y: Tensor) -> None:
        self.moments.update([X, Y.to(X.device)])

    def result(self) -> ProcrustesResult:
        m, n = self.moments, self.moments.n
        xty, sx, sy = m.blocks[(0, 1)], m.sq_sums[0].sum(), m.sq_sums[1].sum()
        if not self.center:
            xty = xty + n * torch.outer(m.means[0], m.means[1])
            sx, sy = sx + n * m.means[0].square().sum(), sy + n * m.means[1].square().sum()
        return procrustes_from_moments(xty, sx, sy, n=n)


class CKAMatrixAccumulator(_Deprecated):
    """Deprecated: ``Moments`` with every pair (biased CKA) and summed ``unbiased_hsic_matrix`` (debiased)."""

    _extra = ("hsic_u_sum", "n_batches")

    def __init__(self, n_layers: int, *, track_biased: bool = True, track_debiased: bool = True, method: str = "auto"):
        pairs = [(i, j) for i in range(n_layers) for j in range(i, n_layers)] if track_biased else []
        super().__init__(Moments(n_layers, pairs), "Moments, linear_cka_from_moments and unbiased_hsic_matrix")
        self.n_layers, self.track_debiased, self.method = n_layers, bool(track_debiased), method
        self.hsic_u_sum = torch.zeros(n_layers, n_layers, dtype=torch.float64)
        self.n_batches = 0

    def update(self, xs: Sequence[Tensor]) -> None:
        self.moments.update(xs)
        if self.track_debiased and xs[0].shape[0]:
            self.hsic_u_sum = self.hsic_u_sum + unbiased_hsic_matrix(xs, method=self.method).cpu()
            self.n_batches += 1

    def result(self, *, debiased: bool = False) -> Tensor:
        names = [f"layer {i}" for i in range(self.n_layers)]
        if debiased:
            return cka_from_hsic(self.hsic_u_sum / self.n_batches, "the mean unbiased HSIC", names)
        h = torch.empty(self.n_layers, self.n_layers, dtype=torch.float64)
        for (i, j), block in self.moments.blocks.items():
            h[i, j] = h[j, i] = block.square().sum().cpu()
        return cka_from_hsic(h, "HSIC", names)


class CKAAccumulator(CKAMatrixAccumulator):
    """Deprecated: linear CKA of two representations; see :class:`CKAMatrixAccumulator`."""

    def __init__(self, *, track_biased: bool = True, track_debiased: bool = True, method: str = "auto"):
        super().__init__(2, track_biased=track_biased, track_debiased=track_debiased, method=method)

    def update(self, X: Tensor, Y: Tensor) -> None:  # type: ignore[override]
        super().update([X, Y])

    def result(self, *, debiased: bool = False) -> Tensor:
        return super().result(debiased=debiased)[0, 1]
