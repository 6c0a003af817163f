"""Subspaces of the residual stream: principal angles, bases, variance fractions, Haar-random nulls.

Every function takes float32 or float64 tensors and computes and returns float64; bad input raises
``TypeError``/``ValueError`` naming what was received and the fix.
"""

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_latentspaces.checks import as_float64, check_int, type_name

__all__ = [
    "haar_bases", "principal_angles", "orthonormal_basis", "principal_subspace", "variance_fraction", "NullAngles",
    "NullVarianceFraction", "random_subspace_angles", "random_subspace_variance_fraction", "variance_fraction_null",
    "CHUNK_ELEMENTS",
]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
#: Random bases drawn at once in the Monte-Carlo nulls: about 8 bytes * CHUNK_ELEMENTS a buffer.
CHUNK_ELEMENTS = 1 << 22


def _check_null(n_samples: Any, generator: Any) -> Tuple[int, Optional[torch.Generator]]:
    n_samples = check_int(n_samples, "n_samples", minimum=2, why=" (a standard deviation needs 2 samples)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type_name(generator)}. "
            "Fix: pass torch.Generator().manual_seed(0)."
        )
    return n_samples, generator


def _check_cov(cov: Any, name: str = "cov") -> Tensor:
    orig_dtype = cov.dtype if isinstance(cov, Tensor) else None
    cov = as_float64(cov, name, ndim=2, shape_hint="[d, d]")
    d0, d1 = cov.shape
    if d0 != d1 or d0 == 0:
        raise ValueError(f"{name} must be a non-empty square [d, d] covariance matrix, got shape {(d0, d1)}.")
    # low-precision inputs are only symmetric to their own eps
    tol = math.sqrt(torch.finfo(orig_dtype).eps) * float(cov.abs().max())
    asym = float((cov - cov.mT).abs().max())
    if asym > tol:
        raise ValueError(
            f"{name} must be symmetric, but max |{name} - {name}.T| = {asym:.3g} exceeds the tolerance {tol:.3g}. Fix: "
            "pass a covariance matrix (e.g. from Moments.cov(i)) or symmetrise it with (c + c.T) / 2."
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


def _svd_rank(a: Tensor) -> Tuple[Tensor, int, float]:
    """Left singular vectors and numerical rank of ``a`` (the threshold of ``numpy.linalg.matrix_rank``)."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    tol = float(s.max()) * max(a.shape) * _EPS
    return u, int((s > tol).sum()), tol


def _orthonormalize(a: Tensor, name: str) -> Tensor:
    u, rank, tol = _svd_rank(a)
    k = a.shape[1]
    if rank < k:
        raise ValueError(
            f"{name} is rank-deficient: shape {tuple(a.shape)} but numerical rank {rank} (singular values <= {tol:.3g} "
            f"treated as zero), so its {k} columns do not span a {k}-dimensional subspace. Fix: drop linearly "
            f"dependent columns or pass orthonormal_basis({name}, k={max(rank, 1)})."
        )
    return u[:, :k]


def _haar_chunks(n: int, d: int, k: int, chunk: int, generator: Any) -> Iterator[Tensor]:
    """:func:`haar_bases` drawn ``chunk`` at a time, ``n`` in all, bounding the buffers."""
    for start in range(0, n, chunk):
        yield haar_bases(min(chunk, n - start), d, k, generator)


def haar_bases(n: int, d: int, k: int, generator: Optional[torch.Generator]) -> Tensor:
    """``n`` Haar-distributed orthonormal ``[d, k]`` bases, ``[n, d, k]``."""
    device = generator.device if generator is not None else torch.device("cpu")
    g = torch.randn(n, d, k, generator=generator, dtype=_F64, device=device)
    q, r = torch.linalg.qr(g)
    # QR alone is not Haar: forcing diag(R) > 0 makes Q exactly Haar (Mezzadri 2007).
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign[sign == 0] = 1.0
    return q * sign.unsqueeze(-2)


def _angles_from_orthonormal(qa: Tensor, qb: Tensor) -> Tensor:
    """Ascending principal angles between orthonormal bases ``[..., d, ka]``, ``[..., d, kb]``."""
    if qa.shape[-1] < qb.shape[-1]:  # the sine formula needs the residual of the thinner basis
        qa, qb = qb, qa
    m = qa.mT @ qb
    cos = torch.linalg.svdvals(m)  # descending -> angles ascending
    sin = torch.linalg.svdvals(qb - qa @ m).flip(-1)  # ascending: the part of span(qb) outside span(qa)
    # arccos loses small angles, arcsin those near pi/2: each where accurate (as scipy, mask in ascending order)
    small = cos.square() >= 0.5
    theta = torch.where(small, torch.arcsin(sin.clamp(-1.0, 1.0)), torch.arccos(cos.clamp(-1.0, 1.0)))
    return theta.sort(dim=-1).values


def principal_angles(A: Float[Tensor, "d k1"], B: Float[Tensor, "d k2"]) -> Float[Tensor, " k"]:
    """Principal angles between the column spaces of ``A`` ``[d, k1]`` and ``B`` ``[d, k2]``.

    Returns ``[min(k1, k2)]`` float64 radians in ``[0, pi/2]``, ascending; ``scipy.linalg.subspace_angles``
    (sorted descending) to ~1e-8, tiny angles included. Raises ``ValueError`` for empty, non-finite or
    rank-deficient input or different ``d``.

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
                f"{name} has shape {tuple(m.shape)}; it needs at least one row and one column to span a subspace."
            )
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"A and B must live in the same space (same number of rows d), got A with d={A.shape[0]} and B with "
            f"d={B.shape[0]}. Fix: columns are the spanning vectors; transpose an input given as [k, d]."
        )
    return _angles_from_orthonormal(_orthonormalize(A, "A"), _orthonormalize(B, "B"))


def orthonormal_basis(M: Float[Tensor, "d n"], k: Optional[int] = None) -> Float[Tensor, "d k"]:
    """Top-``k`` left singular vectors of ``M`` ``[d, n]``, by decreasing singular value: ``[d, k]`` float64.

    For an embedding ``W_E`` ``[vocab, d]`` pass ``W_E.T``. ``k`` defaults to the numerical rank;
    a ``k`` above it raises ``ValueError``. Each column's largest-magnitude entry is positive.

    Example:
        >>> import torch
        >>> M = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> orthonormal_basis(M, k=1).flatten().tolist()
        [1.0, 0.0, 0.0]
    """
    M = as_float64(M, "M", ndim=2, shape_hint="[d, n]")
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise ValueError(f"M has shape {tuple(M.shape)}; it needs at least one row and one column.")
    u, rank, tol = _svd_rank(M)
    bound = min(M.shape)
    if k is None:
        if rank == 0:
            raise ValueError("M is numerically zero (rank 0); it spans no subspace.")
        k = rank
    else:
        why = f" (a [d, n] = {tuple(M.shape)} matrix has rank <= {bound})"
        k = check_int(k, "k", minimum=1, maximum=bound, why=why)
        if k > rank:
            raise ValueError(
                f"k={k} exceeds the numerical rank {rank} of M (shape {tuple(M.shape)}; singular values "
                f"<= {tol:.3g} treated as zero): singular vectors beyond the rank are arbitrary and do "
                f"not lie in M's column space. Fix: use k <= {rank}."
            )
    q = u[:, :k]
    signs = torch.sign(torch.gather(q, -2, q.abs().argmax(dim=-2, keepdim=True)))
    signs[signs == 0] = 1.0
    return q * signs


def principal_subspace(cov: Float[Tensor, "d d"], k: int) -> Float[Tensor, "d k"]:
    """Orthonormal top-``k`` eigenvectors of a covariance (or second moment), by decreasing eigenvalue.

    Raises ``ValueError`` for a bad ``cov`` (as :func:`variance_fraction`) or a numerical rank
    (eigenvalues above ``lambda_max * d * eps``) below ``k``.

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
    """Fraction ``tr(P cov P) / tr(cov)`` of the variance of ``cov`` ``[d, d]`` in the span of ``basis`` ``[d, k]``.

    ``basis`` is orthonormalised first (any full-rank spanning set works). Raises ``ValueError`` for
    a non-square, asymmetric or non-finite ``cov``, zero trace, mismatched ``d`` or a rank-deficient basis.

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
    return torch.sum((cov @ q) * q) / torch.trace(cov)


@dataclass(frozen=True, eq=False)
class NullAngles:
    """Principal angles between independent Haar-random subspaces: ``[n_samples, k]`` samples, ``[k]`` mean and std."""

    mean: Tensor
    std: Tensor
    samples: Tensor


@dataclass(frozen=True, eq=False)
class NullVarianceFraction:
    """Variance fraction held by Haar-random subspaces: samples, mean (expectation ``k / d``) and std (ddof=1)."""

    mean: Tensor
    std: Tensor
    samples: Tensor


def random_subspace_angles(
    d: int, k1: int, k2: int, *, n_samples: int = 1000, generator: Optional[torch.Generator] = None
) -> NullAngles:
    """Monte-Carlo null of the principal angles between Haar-random ``k1``- and ``k2``-dim subspaces of ``R^d``.

    The law is rotation invariant, so one subspace is held at the first ``k1`` axes and only the
    other is sampled. ``mean``/``std`` are ``[min(k1, k2)]``; the generator's device is used.

    Example:
        >>> import torch
        >>> null = random_subspace_angles(50, 2, 2, n_samples=200, generator=torch.Generator().manual_seed(0))
        >>> tuple(null.samples.shape), bool((null.mean > 1.0).all())
        ((200, 2), True)
    """
    d = check_int(d, "d", minimum=1)
    k1 = check_int(k1, "k1", minimum=1, maximum=d, why=f" (a subspace of R^{d})")
    k2 = check_int(k2, "k2", minimum=1, maximum=d, why=f" (a subspace of R^{d})")
    n_samples, generator = _check_null(n_samples, generator)
    fixed = torch.eye(d, k1, dtype=_F64, device=generator.device if generator is not None else "cpu")
    chunks = _haar_chunks(n_samples, d, k2, max(1, CHUNK_ELEMENTS // (d * max(k1, k2))), generator)
    samples = torch.cat([_angles_from_orthonormal(fixed.expand(len(qb), d, k1), qb) for qb in chunks])
    return NullAngles(mean=samples.mean(0), std=samples.std(0), samples=samples)


def random_subspace_variance_fraction(d: int, k: int) -> Float[Tensor, ""]:
    """Expected variance fraction of a Haar-random ``k``-dim subspace of ``R^d``: exactly ``k / d`` for any covariance.

    Example:
        >>> float(random_subspace_variance_fraction(768, 64))
        0.08333333333333333
    """
    d = check_int(d, "d", minimum=1)
    k = check_int(k, "k", minimum=0, maximum=d, why=f" (a subspace of R^{d})")
    return torch.tensor(k / d, dtype=_F64)


def variance_fraction_null(
    cov: Float[Tensor, "*b d d"], k: int, n_samples: int = 1000, generator: Optional[torch.Generator] = None
) -> NullVarianceFraction:
    """Distribution of the variance fraction of ``cov`` (``[d, d]`` or a batch ``[b, d, d]``) in Haar-random subspaces.

    The spread is the useful part: ~0 for an isotropic ``cov``, large for a spiky spectrum. A sample
    is ``w . lambda / sum(lambda)`` (``lambda`` the eigenvalues, ``w_i`` the squared norm of row ``i``
    of the random basis); one set of bases serves the whole batch. ``mean``/``std`` are ``[]``
    (``[b]``), ``samples`` ``[n_samples]`` (``[n_samples, b]``).

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
    n_samples, generator = _check_null(n_samples, generator)
    chunks = _haar_chunks(n_samples, d, k, max(1, CHUNK_ELEMENTS // (d * k)), generator)
    w = torch.cat([q.square().sum(-1) for q in chunks])  # [n_samples, d]
    spectra = torch.linalg.eigvalsh(torch.stack(covs)).to(w.device)  # [b, d]
    samples = (w @ spectra.mT) / spectra.sum(-1)  # [n_samples, b]
    if not batched:
        samples = samples[:, 0]
    return NullVarianceFraction(mean=samples.mean(0), std=samples.std(0), samples=samples)
