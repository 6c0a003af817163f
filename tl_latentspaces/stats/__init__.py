"""Streaming statistics and the subspace maths of the alignment suite; pure torch, no model code.

One store, :class:`Moments`, and plain functions of what it holds: principal subspaces and angles,
variance fractions and their random-subspace nulls, linear CKA and orthogonal Procrustes.

Example:
    >>> import torch
    >>> from tl_latentspaces import stats
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    >>> m = stats.Moments(2, pairs=[(0, 0), (1, 1), (0, 1)])
    >>> for part in x.split(50):
    ...     m.update([part, 3 * part + 1])
    >>> round(float(stats.linear_cka_from_moments(m.comoment(0, 1), m.comoment(0, 0), m.comoment(1, 1))), 10)
    1.0
"""

from tl_latentspaces.stats.cka import cka_from_hsic, linear_cka, linear_cka_from_moments, unbiased_hsic_matrix
from tl_latentspaces.stats.histograms import binned_quantiles, integer_quantiles
from tl_latentspaces.stats.moments import Moments
from tl_latentspaces.stats.rotations import ProcrustesResult, procrustes, procrustes_from_moments
from tl_latentspaces.stats.subspaces import (
    CHUNK_ELEMENTS, NullAngles, NullVarianceFraction, haar_bases, orthonormal_basis, principal_angles,
    principal_subspace, random_subspace_angles, random_subspace_variance_fraction, variance_fraction,
    variance_fraction_null,
)

__all__ = [
    "Moments", "principal_angles", "orthonormal_basis", "principal_subspace", "variance_fraction", "haar_bases",
    "NullAngles", "NullVarianceFraction", "random_subspace_angles", "random_subspace_variance_fraction",
    "variance_fraction_null", "CHUNK_ELEMENTS", "linear_cka", "linear_cka_from_moments", "unbiased_hsic_matrix",
    "cka_from_hsic", "ProcrustesResult", "procrustes", "procrustes_from_moments", "binned_quantiles",
    "integer_quantiles",
]
