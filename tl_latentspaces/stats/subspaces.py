"""Subspaces of the residual stream: principal angles, bases, variance fractions, random nulls.

Pure torch. Every function accepts float32 or float64 tensors, computes in float64 and returns
float64; bad input raises ``TypeError``/``ValueError`` naming what was received and the fix.
The Monte-Carlo nulls draw Haar-random subspaces (:func:`haar_bases`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_latentspaces.checks import as_float64, check_int, type_name

__all__ = [
    "haar_bases",
    "principal_angles",
    "orthonormal_basis",
    "principal_subspace",
    "variance_fraction",
    "NullAngles",
    "NullVarianceFraction",
    "random_subspace_angles",
    "random_subspace_variance_fraction",
    "variance_fraction_null",
    "CHUNK_ELEMENTS",
]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
#: Random bases drawn at once in the Monte-Carlo nulls: about 8 bytes * CHUNK_ELEMENTS a buffer.
CHUNK_ELEMENTS = 1 << 22


def _check_generator(generator: Any) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type_name(generator)}. "
            "Fix: pass torch.Generator().manual_seed(0)."
        )
    return generator


def _check_cov(cov: Any, name: str = "cov") -> Tensor:
    orig_dtype = cov.dtype if isinstance(cov, Tensor) else None
    cov = as_float64(cov, name, ndim=2, shape_hint="[d, d]")
    d0, d1 = cov.shape
    if d0 != d1 or d0 == 0:
        raise ValueError(f"{name} must be a non-empty square [d, d] covariance matrix, got shape {(d0, d1)}.")
    # Inputs computed in low precision are only symmetric to their own eps.
    tol = math.sqrt(torch.finfo(orig_dtype).eps) * float(cov.abs().max())
    asym = float((cov - cov.mT).abs().max())
    if asym > tol:
        raise ValueError(
            f"{name} must be symmetric, but max |{name} - {name}.T| = {asym:.3g} exceeds the "
            f"tolerance {tol:.3g}. Fix: pass a covariance matrix (e.g. from "
            "Moments.cov(i)) or symmetrise it with (c + c.T) / 2."
        )
    cov = 0.5 * (cov + cov.mT)
    diag = torch.diagonal(cov)
    if bool((diag < 0).any()):
        i = int(torch.argmin(diag))
        raise ValueError(
            f"{name} has a negative diagonal entry {float(diag[i]):.3g} at index {i}; a "
            "covariance matrix has non-negative variances. Fix: check how it was computed."
        )
    if float(diag.sum()) <= 0:
        raise ValueError(
            f"{name} has total variance (trace) {float(diag.sum())}; it must be > 0 to "
            "define a variance fraction. Fix: check the data are not constant."
        )
    return cov


def _numerical_rank(s: Tensor, shape: Tuple[int, ...]) -> Tuple[int, float]:
    # Same threshold as scipy.linalg.orth / numpy.linalg.matrix_rank.
    tol = float(s.max()) * max(shape) * _EPS if s.numel() else 0.0
    return int((s > tol).sum()), tol


def _orthonormalize(a: Tensor, name: str) -> Tensor:
    """Orthonormal basis of the column space of float64 ``a``; raises if rank-deficient."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    rank, tol = _numerical_rank(s, tuple(a.shape))
    k = a.shape[1]
    if rank < k:
        raise ValueError(
            f"{name} is rank-deficient: shape {tuple(a.shape)} but numerical rank {rank} "
            f"(singular values <= {tol:.3g} treated as zero), so its {k} columns do not span a "
            f"{k}-dimensional subspace. Fix: drop linearly dependent columns or pass "
            f"orthonormal_basis({name}, k={max(rank, 1)})."
        )
    return u[:, :k]


def _fix_signs(q: Tensor) -> Tensor:
    """Make each column's largest-magnitude entry positive (deterministic output)."""
    idx = q.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(q, -2, idx))
    signs[signs == 0] = 1.0
    return q * signs



def haar_bases(n: int, d: int, k: int, generator: Optional[torch.Generator]) -> Tensor:
    """``n`` Haar-distributed orthonormal ``[d, k]`` bases."""
    device = generator.device if generator is not None else torch.device("cpu")
    g = torch.randn(n, d, k, generator=generator, dtype=_F64, device=device)
    q, r = torch.linalg.qr(g)
    # QR alone is not Haar: the signs of diag(R) bias Q. Forcing diag(R) > 0
    # makes the factorisation unique and Q exactly Haar (Mezzadri 2007).
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    return q * sign.unsqueeze(-2)


def _angles_from_orthonormal(qa: Tensor, qb: Tensor) -> Tensor:
    """Ascending principal angles between orthonormal bases ``[..., d, ka]``, ``[..., d, kb]``."""
    if qa.shape[-1] < qb.shape[-1]:
        # Angles are symmetric; the sine formula needs the residual of the thinner basis.
        qa, qb = qb, qa
    m = qa.mT @ qb
    cos = torch.linalg.svdvals(m)  # descending -> angles ascending
    # Sines are the singular values of the part of span(qb) outside span(qa).
    resid = qb - qa @ m
    sin = torch.linalg.svdvals(resid).flip(-1)  # ascending
    # arccos is ill-conditioned near 0 (cos ~ 1 - t^2/2 loses t below ~1e-8), and
    # arcsin near pi/2, so use each where it is accurate (as scipy does). Unlike
    # scipy, the mask is aligned with the ascending order of both arrays.
    small = cos.square() >= 0.5
    theta = torch.where(small, torch.arcsin(sin.clamp(-1.0, 1.0)), torch.arccos(cos.clamp(-1.0, 1.0)))
    return theta.sort(dim=-1).values


def principal_angles(
    A: Float[Tensor, "d k1"], B: Float[Tensor, "d k2"]
) -> Float[Tensor, " k"]:
    """Principal angles between the column spaces of ``A`` and ``B``.

    Matches ``scipy.linalg.subspace_angles`` (which returns them in descending
    order) to ~1e-8 or better, including tiny angles: cosines come from the SVD
    of ``Qa^T Qb`` and angles below pi/4 from the sines, i.e. the SVD of
    ``Qb - Qa Qa^T Qb``.

    Args:
        A: ``[d, k1]`` matrix whose columns span the first subspace.
        B: ``[d, k2]`` matrix whose columns span the second subspace.

    Returns:
        ``[min(k1, k2)]`` float64 angles in radians, ascending, in ``[0, pi/2]``.

    Raises:
        TypeError: if an argument is not a floating-point tensor.
        ValueError: if an argument is not 2-D, has zero rows/columns,
            contains NaN/inf, is rank-deficient, or the two ``d`` differ.

    Example:
        >>> import torch
        >>> A = torch.eye(3, dtype=torch.float64)[:, :2]
        >>> B = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
        >>> [round(float(t), 6) for t in principal_angles(A, B)]
        [0.785398]
    """
    A = as_float64(A, "A", ndim=2, shape_hint="[d, k1]")
    B = as_float64(B, "B", ndim=2, shape_hint="[d, k2]")
    for name, m in (("A", A), ("B", B)):
        if m.shape[0] == 0 or m.shape[1] == 0:
            raise ValueError(
                f"{name} has shape {tuple(m.shape)}; it needs at least one row and one column "
                "to span a subspace."
            )
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"A and B must live in the same space (same number of rows d), got A with d={A.shape[0]} "
            f"and B with d={B.shape[0]}. Fix: columns are the spanning vectors; transpose an input "
            "given as [k, d]."
        )
    return _angles_from_orthonormal(_orthonormalize(A, "A"), _orthonormalize(B, "B"))


def orthonormal_basis(M: Float[Tensor, "d n"], k: Optional[int] = None) -> Float[Tensor, "d k"]:
    """Top-``k`` left singular vectors of ``M``: an orthonormal basis of its main column space.

    For an embedding matrix ``W_E`` of shape ``[vocab, d]`` pass ``W_E.T`` so that
    the basis lives in the ``d``-dimensional residual space. Column signs are fixed
    (largest-magnitude entry positive) so the output is deterministic.

    Args:
        M: ``[d, n]`` matrix.
        k: number of basis vectors; defaults to the numerical rank of ``M``.

    Returns:
        ``[d, k]`` float64 matrix with orthonormal columns, ordered by decreasing
        singular value.

    Raises:
        TypeError: if ``M`` is not a float tensor or ``k`` is not an int.
        ValueError: if ``M`` is not 2-D / empty / non-finite, or ``k`` exceeds
            ``min(d, n)`` or the numerical rank of ``M``.

    Example:
        >>> import torch
        >>> M = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> orthonormal_basis(M, k=1).flatten().tolist()
        [1.0, 0.0, 0.0]
    """
    M = as_float64(M, "M", ndim=2, shape_hint="[d, n]")
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"M has shape {tuple(M.shape)}; it needs at least one row and one column.")
    u, s, _ = torch.linalg.svd(M, full_matrices=False)
    rank, tol = _numerical_rank(s, tuple(M.shape))
    bound = min(M.shape)
    if k is None:
        if rank == 0:
            raise ValueError("M is numerically zero (rank 0); it spans no subspace.")
        k = rank
    else:
        k = check_int(
            k, "k", minimum=1, maximum=bound, why=f" (a [d, n] = {tuple(M.shape)} matrix has rank <= {bound})"
        )
        if k > rank:
            raise ValueError(
                f"k={k} exceeds the numerical rank {rank} of M (shape {tuple(M.shape)}; singular values "
                f"<= {tol:.3g} treated as zero): singular vectors beyond the rank are arbitrary and do "
                f"not lie in M's column space. Fix: use k <= {rank}."
            )
    return _fix_signs(u[:, :k])


def principal_subspace(cov: Float[Tensor, "d d"], k: int) -> Float[Tensor, "d k"]:
    """Orthonormal top-``k`` eigenvectors of a covariance (or second moment), by decreasing eigenvalue.

    Raises:
        ValueError: for a bad ``cov`` (as :func:`variance_fraction`), or if its numerical rank
            (eigenvalues above ``lambda_max * d * eps``) is below ``k``.

    Example:
        >>> import torch
        >>> principal_subspace(torch.diag(torch.tensor([1.0, 3.0, 2.0])), 1).abs().flatten().tolist()
        [0.0, 1.0, 0.0]
    """
    cov = _check_cov(cov)
    d = cov.shape[0]
    k = check_int(k, "k", minimum=1, maximum=d, why=f" (cov is {d}x{d})")
    evals, evecs = torch.linalg.eigh(cov)
    rank = int((evals > float(evals[-1]) * d * _EPS).sum())
    if rank < k:
        raise ValueError(
            f"numerical rank {rank} < k={k}, so its top-{k} principal subspace is not defined. "
            f"Fix: pass k <= {max(rank, 1)} or more (varied) rows."
        )
    return evecs[:, -k:].flip(-1)


def variance_fraction(cov: Float[Tensor, "d d"], basis: Float[Tensor, "d k"]) -> Float[Tensor, ""]:
    """Fraction of the total variance of ``cov`` lying in the column span of ``basis``.

    Computes ``tr(P cov P) / tr(cov)`` with ``P = Q Q^T`` the orthogonal projector
    onto span(``basis``) (``basis`` is orthonormalised first, so any spanning set
    works).

    Args:
        cov: ``[d, d]`` symmetric covariance matrix with positive trace.
        basis: ``[d, k]`` full-column-rank matrix.

    Returns:
        0-d float64 tensor in ``[0, 1]`` (for a positive semi-definite ``cov``).

    Raises:
        TypeError: if an argument is not a float tensor.
        ValueError: for non-square/asymmetric/non-finite ``cov``, zero trace,
            mismatched ``d``, or rank-deficient ``basis``.

    Example:
        >>> import torch
        >>> cov = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> float(variance_fraction(cov, torch.tensor([[1.0], [0.0]])))
        0.75
    """
    cov = _check_cov(cov)
    basis = as_float64(basis, "basis", ndim=2, shape_hint="[d, k]")
    if basis.shape[0] != cov.shape[0] or basis.shape[1] == 0:
        raise ValueError(
            f"basis must be [d, k] with d = {cov.shape[0]} (from cov) and k >= 1, got shape "
            f"{tuple(basis.shape)}. Fix: columns are basis vectors; transpose a [k, d] input."
        )
    q = _orthonormalize(basis, "basis")
    # tr(P C P) = tr(Q^T C Q) because Q^T Q = I.
    return torch.sum((cov @ q) * q) / torch.trace(cov)


@dataclass(frozen=True, eq=False)
class NullAngles:
    """Principal angles between independent uniformly random subspaces.

    Attributes:
        mean: ``[min(k1, k2)]`` mean of each (ascending) angle, radians.
        std: ``[min(k1, k2)]`` sample standard deviation (ddof=1) of each angle.
        samples: ``[n_samples, min(k1, k2)]`` per-sample ascending angles.
    """

    mean: Tensor
    std: Tensor
    samples: Tensor


@dataclass(frozen=True, eq=False)
class NullVarianceFraction:
    """Variance fraction held by uniformly random subspaces.

    Attributes:
        mean: 0-d mean fraction (its expectation is exactly ``k / d``).
        std: 0-d sample standard deviation (ddof=1) of the fraction.
        samples: ``[n_samples]`` per-sample fractions.
    """

    mean: Tensor
    std: Tensor
    samples: Tensor


def random_subspace_angles(
    d: int,
    k1: int,
    k2: int,
    *,
    n_samples: int = 1000,
    generator: Optional[torch.Generator] = None,
) -> NullAngles:
    """Monte-Carlo null distribution of principal angles between random subspaces.

    Subspaces are Haar-distributed (QR of a Gaussian matrix with the sign of
    ``diag(R)`` fixed). Because the joint law of the angles is invariant under a
    common rotation, one subspace is held at the first ``k1`` coordinate axes and
    only the other is sampled; this has the same distribution as sampling both
    and halves the cost.

    Args:
        d: ambient dimension.
        k1: dimension of the first subspace, ``1 <= k1 <= d``.
        k2: dimension of the second subspace, ``1 <= k2 <= d``.
        n_samples: number of Monte-Carlo samples, ``>= 2``.
        generator: optional ``torch.Generator`` for reproducibility (its device
            is used for sampling).

    Returns:
        :class:`NullAngles` with ``mean``/``std`` of shape ``[min(k1, k2)]`` and
        ``samples`` of shape ``[n_samples, min(k1, k2)]``.

    Raises:
        TypeError: for non-int sizes or a non-Generator ``generator``.
        ValueError: for sizes outside the ranges above.

    Example:
        >>> import torch
        >>> null = random_subspace_angles(50, 2, 2, n_samples=200, generator=torch.Generator().manual_seed(0))
        >>> tuple(null.samples.shape), bool((null.mean > 1.0).all())
        ((200, 2), True)
    """
    d = check_int(d, "d", minimum=1)
    k1 = check_int(k1, "k1", minimum=1, maximum=d, why=f" (a subspace of R^{d})")
    k2 = check_int(k2, "k2", minimum=1, maximum=d, why=f" (a subspace of R^{d})")
    n_samples = check_int(n_samples, "n_samples", minimum=2, why=" (a standard deviation needs 2 samples)")
    generator = _check_generator(generator)
    device = generator.device if generator is not None else torch.device("cpu")
    fixed = torch.eye(d, k1, dtype=_F64, device=device)
    chunk = max(1, CHUNK_ELEMENTS // (d * max(k1, k2)))
    out = []
    for start in range(0, n_samples, chunk):
        b = min(chunk, n_samples - start)
        qb = haar_bases(b, d, k2, generator)
        out.append(_angles_from_orthonormal(fixed.expand(b, d, k1), qb))
    samples = torch.cat(out)
    return NullAngles(mean=samples.mean(0), std=samples.std(0), samples=samples)


def random_subspace_variance_fraction(d: int, k: int) -> Float[Tensor, ""]:
    """Expected variance fraction of a uniformly random ``k``-dim subspace: exactly ``k / d``.

    Why exact for *any* covariance ``C``: the projector ``P`` onto a Haar-random
    subspace has ``E[P] = U E[P] U^T`` for every orthogonal ``U``, so ``E[P]`` is a
    multiple of the identity, and ``tr E[P] = k`` fixes it to ``(k/d) I``. Hence
    ``E[tr(P C P)] = E[tr(P C)] = tr(E[P] C) = (k/d) tr(C)``; ``tr(C)`` is not
    random, so the expected fraction is ``k/d``. (Its spread does depend on ``C``;
    see :func:`variance_fraction_null`.)

    Args:
        d: ambient dimension, ``>= 1``.
        k: subspace dimension, ``0 <= k <= d``.

    Returns:
        0-d float64 tensor ``k / d``.

    Example:
        >>> float(random_subspace_variance_fraction(768, 64))
        0.08333333333333333
    """
    d = check_int(d, "d", minimum=1)
    k = check_int(k, "k", minimum=0, maximum=d, why=f" (a subspace of R^{d})")
    return torch.tensor(k / d, dtype=_F64)


def variance_fraction_null(
    cov: Float[Tensor, "*b d d"],
    k: int,
    n_samples: int = 1000,
    generator: Optional[torch.Generator] = None,
) -> NullVarianceFraction:
    """Distribution of the variance fraction of ``cov`` held by Haar-random ``k``-dim subspaces.

    The mean converges to ``k / d`` (see :func:`random_subspace_variance_fraction`); the spread is
    the useful part: ~0 for an isotropic ``cov``, large for a spiky spectrum. The Haar law is
    rotation invariant, so ``tr(Q^T C Q) / tr(C)`` has the law of ``w . lambda / sum(lambda)``,
    with ``lambda`` the eigenvalues of ``C`` and ``w_i`` the squared norm of row ``i`` of ``Q``:
    ``O(d k)`` a sample instead of ``O(d^2 k)``, and one set of random bases serves a whole batch
    of covariances (common random numbers).

    Args:
        cov: ``[d, d]`` symmetric covariance with positive trace, or a batch ``[b, d, d]``.
        k: subspace dimension, ``1 <= k <= d``.
        n_samples: number of Haar-random subspaces, ``>= 2``.
        generator: optional ``torch.Generator`` (its device is used for sampling).

    Returns:
        :class:`NullVarianceFraction`: ``mean``/``std`` of shape ``[]`` (``[b]`` for a batch),
        ``samples`` ``[n_samples]`` (``[n_samples, b]``).

    Raises:
        TypeError / ValueError: as for :func:`variance_fraction` and :func:`random_subspace_angles`.

    Example:
        >>> import torch
        >>> null = variance_fraction_null(torch.eye(10), 5, 100, torch.Generator().manual_seed(0))
        >>> round(float(null.mean), 6), round(float(null.std), 6)
        (0.5, 0.0)
    """
    batched = isinstance(cov, Tensor) and cov.ndim == 3
    covs = [_check_cov(c, f"cov[{i}]") for i, c in enumerate(cov)] if batched else [_check_cov(cov)]
    d = covs[0].shape[0]
    k = check_int(k, "k", minimum=1, maximum=d, why=f" (cov is {d}x{d})")
    n_samples = check_int(n_samples, "n_samples", minimum=2, why=" (a standard deviation needs 2 samples)")
    generator = _check_generator(generator)
    chunk = max(1, CHUNK_ELEMENTS // (d * k))
    w = torch.cat([
        haar_bases(min(chunk, n_samples - start), d, k, generator).square().sum(-1)
        for start in range(0, n_samples, chunk)
    ])  # [n_samples, d]
    spectra = torch.linalg.eigvalsh(torch.stack(covs)).to(w.device)  # [b, d]
    samples = (w @ spectra.mT) / spectra.sum(-1)  # [n_samples, b]
    if not batched:
        samples = samples[:, 0]
    return NullVarianceFraction(mean=samples.mean(0), std=samples.std(0), samples=samples)
