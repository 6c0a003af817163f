"""Orthogonal Procrustes: the rotation that best maps one representation onto another.

:func:`procrustes` fits rows; :func:`procrustes_from_moments` fits from ``X^T Y``, ``||X||_F^2`` and
``||Y||_F^2`` alone, which a :class:`~tl_latentspaces.stats.Moments` store keeps for a whole corpus.
"""

from dataclasses import dataclass
from typing import Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_latentspaces.checks import as_float64

__all__ = ["ProcrustesResult", "procrustes", "procrustes_from_moments"]


@dataclass(frozen=True, eq=False)
class ProcrustesResult:
    """Result of an orthogonal Procrustes fit ``X R ~ Y``.

    Attributes:
        rotation: ``[d, d]`` orthogonal ``R`` minimising ``||X R - Y||_F`` (may include a reflection, as in scipy).
        scale: 0-d optimal isotropic ``s`` for ``s X R ~ Y``: ``sum(singular values of X^T Y) / ||X||_F^2``.
        error: 0-d ``||X R - Y||_F / ||Y||_F``. scaled_error: 0-d ``||s X R - Y||_F / ||Y||_F``.
    """

    rotation: Tensor
    scale: Tensor
    error: Tensor
    scaled_error: Tensor


def _procrustes_core(xty: Tensor, sx2: Tensor, sy2: Tensor, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Rotation ``U V^T`` (as scipy), scale and ``tr(S)`` from ``X^T Y = U S V^T``; zero norms raise."""
    for name, sq in (("X", float(sx2)), ("Y", float(sy2))):
        if not sq > 0:
            raise ValueError(
                f"{name} is all zeros (||{name}||_F^2 = {sq} over n={n} rows; after centring if "
                f"center=True), so the Procrustes fit and its normalised error are undefined. Fix: check "
                f"{name} is not constant/empty."
            )
    u, s, vh = torch.linalg.svd(xty)
    return u @ vh, s.sum() / sx2, s.sum()


def procrustes(X: Float[Tensor, "n d"], Y: Float[Tensor, "n d"], *, center: bool = False) -> ProcrustesResult:
    """The orthogonal ``R`` minimising ``||X R - Y||_F`` for rows ``[n, d]`` (``scipy.linalg.orthogonal_procrustes``).

    ``center=True`` subtracts each input's column mean first. Raises ``ValueError`` for different
    ``n`` or ``d``, non-finite or all-zero input.

    Example:
        >>> import torch
        >>> X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        >>> fit = procrustes(X, 2 * X @ R)
        >>> bool(torch.allclose(fit.rotation, R)), round(float(fit.scale), 8), round(float(fit.scaled_error), 8)
        (True, 2.0, 0.0)
    """
    X = as_float64(X, "X", ndim=2, shape_hint="[n, d]")
    Y = as_float64(Y, "Y", ndim=2, shape_hint="[n, d]")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (paired samples), got X with n={X.shape[0]} "
            f"and Y with n={Y.shape[0]}."
        )
    if X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"orthogonal Procrustes needs X and Y of the same width d, got X with d={X.shape[1]} and Y "
            f"with d={Y.shape[1]}. Fix: project both onto a common k-dim space first, e.g. their top-k "
            "principal subspaces (stats.principal_subspace(cov, k)), or use linear_cka, which allows "
            "different widths."
        )
    if X.shape[1] == 0:
        raise ValueError(
            f"X and Y need at least one column, got shapes {tuple(X.shape)} and {tuple(Y.shape)}."
        )
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    sx2, sy2 = X.square().sum(), Y.square().sum()
    rotation, scale, _ = _procrustes_core(X.mT @ Y, sx2, sy2, X.shape[0])
    # Residuals computed directly (not via the expanded norm) stay accurate for near-perfect fits.
    xr = X @ rotation
    ny = torch.sqrt(sy2)
    error = torch.linalg.norm(xr - Y) / ny
    scaled_error = torch.linalg.norm(scale * xr - Y) / ny
    return ProcrustesResult(rotation=rotation, scale=scale, error=error, scaled_error=scaled_error)


def procrustes_from_moments(
    xty: Float[Tensor, "d d"], x_sq: Float[Tensor, ""], y_sq: Float[Tensor, ""], *, n: int
) -> ProcrustesResult:
    """The Procrustes fit of ``n`` rows from their ``X^T Y``, ``||X||_F^2`` and ``||Y||_F^2``: :func:`procrustes`'s.

    The errors come from ``||XR - Y||^2 = ||X||^2 + ||Y||^2 - 2 tr(S)``, so near-perfect fits are
    only accurate to ~1e-8 (absolute). Raises ``ValueError`` if ``X`` or ``Y`` is all zeros.

    Example:
        >>> import torch
        >>> x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> fit = procrustes_from_moments(x.T @ -x, x.square().sum(), x.square().sum(), n=20)
        >>> bool(torch.allclose(fit.rotation, -torch.eye(2, dtype=torch.float64))), round(float(fit.error), 6)
        (True, 0.0)
    """
    rotation, scale, tr_s = _procrustes_core(xty, x_sq, y_sq, n)
    err2 = (x_sq + y_sq - 2 * tr_s).clamp_min(0.0)
    scaled2 = (y_sq - tr_s.square() / x_sq).clamp_min(0.0)
    return ProcrustesResult(
        rotation=rotation, scale=scale, error=torch.sqrt(err2 / y_sq), scaled_error=torch.sqrt(scaled2 / y_sq)
    )
