"""Subspace and representation-similarity maths for residual-stream analysis.

Pure torch, no model code. Every public function accepts float tensors
(float32 or float64), computes in float64 and returns float64 tensors (or
frozen dataclasses of them). Bad user input raises ``TypeError`` /
``ValueError`` with a message naming what was received, what is valid and how
to fix it.

Contents:

* Subspaces: :func:`principal_angles`, :func:`orthonormal_basis`,
  :func:`variance_fraction`.
* Null baselines for random subspaces: :func:`random_subspace_angles`,
  :func:`random_subspace_variance_fraction`, :func:`variance_fraction_null`.
* Linear CKA: :func:`linear_cka`, streaming :class:`CKAAccumulator` and the
  layer-by-layer :class:`CKAMatrixAccumulator`.
* Orthogonal Procrustes: :func:`procrustes`, streaming
  :class:`ProcrustesAccumulator`.
* Streaming covariance: :class:`CovarianceAccumulator`.

All accumulators keep float64 statistics whose size does not depend on the
number of rows seen, reject non-finite input, can be merged (``merge``) and
checkpointed (``state_dict`` / ``load_state_dict``, plain tensors and ints).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor

from tl_latentspaces.checks import check_int, type_name

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

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
# Samples of random bases generated at once in the Monte-Carlo nulls; bounds
# peak memory at roughly 8 bytes * _CHUNK_ELEMENTS per buffer.
_CHUNK_ELEMENTS = 1 << 22

Method = Literal["auto", "gram", "features"]


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_finite(x: Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        value = x[first].item()
        raise ValueError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or inf); the first is "
            f"{value} at index {first}. All entries must be finite. Fix: drop or mask "
            f"those rows (e.g. padding positions) before passing {name}."
        )


def _as_f64(x: Any, name: str, *, ndim: Optional[int] = None, shape_hint: str = "") -> Tensor:
    """Type/shape/finiteness-check a user tensor and return it as float64."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type_name(x)}. "
            f"Fix: wrap it, e.g. torch.as_tensor({name}, dtype=torch.float64)."
        )
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a real floating-point tensor (float32 or float64), got "
            f"dtype={x.dtype}. Fix: pass {name}.double()."
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {shape_hint}, got shape {tuple(x.shape)} ({x.ndim}-D)."
            + (
                f" Fix: flatten leading dimensions, e.g. {name}.reshape(-1, {name}.shape[-1])."
                if ndim == 2 and x.ndim > 2
                else ""
            )
        )
    x = x.to(_F64)
    _check_finite(x, name)
    return x


def _check_generator(generator: Any) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type_name(generator)}. "
            "Fix: pass torch.Generator().manual_seed(0)."
        )
    return generator


def _check_method(method: Any) -> str:
    if method not in ("auto", "gram", "features"):
        raise ValueError(f"method must be one of 'auto', 'gram', 'features', got {method!r}.")
    return method


def _check_cov(cov: Any, name: str = "cov") -> Tensor:
    orig_dtype = cov.dtype if isinstance(cov, Tensor) else None
    cov = _as_f64(cov, name, ndim=2, shape_hint="[d, d]")
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
            "CovarianceAccumulator.cov()) or symmetrise it with (c + c.T) / 2."
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


# --------------------------------------------------------------------------
# Subspaces
# --------------------------------------------------------------------------


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
    A = _as_f64(A, "A", ndim=2, shape_hint="[d, k1]")
    B = _as_f64(B, "B", ndim=2, shape_hint="[d, k2]")
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
    M = _as_f64(M, "M", ndim=2, shape_hint="[d, n]")
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
    basis = _as_f64(basis, "basis", ndim=2, shape_hint="[d, k]")
    if basis.shape[0] != cov.shape[0] or basis.shape[1] == 0:
        raise ValueError(
            f"basis must be [d, k] with d = {cov.shape[0]} (from cov) and k >= 1, got shape "
            f"{tuple(basis.shape)}. Fix: columns are basis vectors; transpose a [k, d] input."
        )
    q = _orthonormalize(basis, "basis")
    # tr(P C P) = tr(Q^T C Q) because Q^T Q = I.
    return torch.sum((cov @ q) * q) / torch.trace(cov)


# --------------------------------------------------------------------------
# Null baselines
# --------------------------------------------------------------------------


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
    chunk = max(1, _CHUNK_ELEMENTS // (d * max(k1, k2)))
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
    cov: Float[Tensor, "d d"],
    k: int,
    n_samples: int = 1000,
    generator: Optional[torch.Generator] = None,
) -> NullVarianceFraction:
    """Empirical distribution of the variance fraction of ``cov`` in random ``k``-dim subspaces.

    The mean converges to ``k / d`` (see :func:`random_subspace_variance_fraction`);
    the standard deviation is the useful part: it is small for isotropic ``cov``
    and large for a spiky spectrum.

    Args:
        cov: ``[d, d]`` symmetric covariance with positive trace.
        k: subspace dimension, ``1 <= k <= d``.
        n_samples: number of Haar-random subspaces, ``>= 2``.
        generator: optional ``torch.Generator``.

    Returns:
        :class:`NullVarianceFraction` (``mean``, ``std``, ``samples [n_samples]``).

    Raises:
        TypeError / ValueError: as for :func:`variance_fraction` and
            :func:`random_subspace_angles`.

    Example:
        >>> import torch
        >>> null = variance_fraction_null(torch.eye(10), 5, 100, torch.Generator().manual_seed(0))
        >>> round(float(null.mean), 6), round(float(null.std), 6)
        (0.5, 0.0)
    """
    cov = _check_cov(cov)
    d = cov.shape[0]
    k = check_int(k, "k", minimum=1, maximum=d, why=f" (cov is {d}x{d})")
    n_samples = check_int(n_samples, "n_samples", minimum=2, why=" (a standard deviation needs 2 samples)")
    generator = _check_generator(generator)
    if generator is not None:
        cov = cov.to(generator.device)
    total = torch.trace(cov)
    chunk = max(1, _CHUNK_ELEMENTS // (d * k))
    out = []
    for start in range(0, n_samples, chunk):
        b = min(chunk, n_samples - start)
        q = haar_bases(b, d, k, generator)
        out.append(torch.sum((cov @ q) * q, dim=(-2, -1)) / total)
    samples = torch.cat(out)
    return NullVarianceFraction(mean=samples.mean(), std=samples.std(), samples=samples)


# --------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _choose_method(method: str, n: int, dims: Sequence[int]) -> str:
    if method != "auto":
        return method
    n_layers = len(dims)
    gram = n * n * sum(dims) + n_layers * n_layers * n * n
    features = n * sum(dims[i] * dims[j] for i in range(n_layers) for j in range(i, n_layers))
    return "gram" if gram < features else "features"


def _pair_products(xs: Sequence[Tensor]) -> Dict[Tuple[int, int], Tensor]:
    return {(i, j): xs[i].mT @ xs[j] for i in range(len(xs)) for j in range(i, len(xs))}


def _sym_from_pairs(vals: Dict[Tuple[int, int], Tensor], n_layers: int, device: torch.device) -> Tensor:
    out = torch.empty(n_layers, n_layers, dtype=_F64, device=device)
    for (i, j), v in vals.items():
        out[i, j] = v
        out[j, i] = v
    return out


def _hsic_biased_matrix(
    xs: Sequence[Tensor], method: str, products: Optional[Dict[Tuple[int, int], Tensor]] = None
) -> Tensor:
    """``||Xc_i^T Xc_j||_F^2`` for all pairs of centred ``xs`` (= ``tr(K_i H K_j H)``)."""
    if method == "gram":
        grams = torch.stack([x @ x.mT for x in xs]).flatten(1)
        return grams @ grams.mT
    if products is None:
        products = _pair_products(xs)
    return _sym_from_pairs({p: m.square().sum() for p, m in products.items()}, len(xs), xs[0].device)


def _hsic_unbiased_matrix(
    xs: Sequence[Tensor], method: str, products: Optional[Dict[Tuple[int, int], Tensor]] = None
) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) with linear kernels, for all pairs of ``xs``.

    With ``K~ = X X^T`` with its diagonal zeroed:
    ``HSIC_u = [tr(K~ L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.

    The ``features`` path never forms ``n x n`` matrices:
    ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i |x_i|^2 |y_i|^2`` and
    ``K~ 1 = X (X^T 1) - (|x_i|^2)_i``.
    """
    n = xs[0].shape[0]
    if method == "gram":
        grams = []
        for x in xs:
            g = x @ x.mT
            g.diagonal().zero_()
            grams.append(g)
        stacked = torch.stack(grams)
        flat = stacked.flatten(1)
        trace = flat @ flat.mT
        row_sums = stacked.sum(-1)  # K~ 1, [L, n]
    else:
        if products is None:
            products = _pair_products(xs)
        sq_norms = torch.stack([x.square().sum(1) for x in xs])  # [L, n]
        trace = _sym_from_pairs({p: m.square().sum() for p, m in products.items()}, len(xs), xs[0].device)
        trace = trace - sq_norms @ sq_norms.mT
        row_sums = torch.stack([x @ x.sum(0) for x in xs]) - sq_norms
    totals = row_sums.sum(-1)
    hsic = trace + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * (row_sums @ row_sums.mT)
    return hsic / (n * (n - 3))


def _cka_from_hsic(h: Tensor, what: str, names: Sequence[str]) -> Tensor:
    diag = torch.diagonal(h)
    for i, v in enumerate(diag.tolist()):
        if not v > 0:
            raise ValueError(
                f"{what} of {names[i]} with itself is {v:.3g} (must be > 0), so CKA is undefined. "
                f"This means {names[i]} has (near-)zero variance across samples"
                + (
                    ", or the minibatches are too small for the unbiased estimator to be positive"
                    if "unbiased" in what
                    else ""
                )
                + ". Fix: check that the activations vary across rows (not padding/BOS only)"
                + (" or use larger minibatches." if "unbiased" in what else ".")
            )
    return h / torch.sqrt(torch.outer(diag, diag))


def _check_not_constant(xc: Tensor, x: Tensor, name: str) -> None:
    # Centring a constant column leaves O(eps * |mean|) rounding noise, not zero;
    # treat anything at that level as constant.
    if float(torch.linalg.norm(xc)) <= 1e3 * _EPS * float(torch.linalg.norm(x)):
        raise ValueError(
            f"{name} (shape {tuple(x.shape)}) is constant across its rows (zero variance after "
            "centring), so CKA is undefined. Fix: check that the activations vary across rows "
            "(e.g. not only padding or BOS positions)."
        )


def linear_cka(
    X: Float[Tensor, "n d1"],
    Y: Float[Tensor, "n d2"],
    *,
    debiased: bool = False,
    method: Method = "auto",
) -> Float[Tensor, ""]:
    """Linear centred kernel alignment between two representations of the same samples.

    Biased (Kornblith et al. 2019): with column-centred ``Xc``, ``Yc``,
    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.

    Debiased (Nguyen et al. 2021, using the unbiased HSIC estimator of Song et
    al. 2012): ``CKA_u = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L))`` with
    ``K = X X^T``, ``L = Y Y^T``; it is ~0 for independent representations even
    when ``d >> n``, where the biased CKA is strongly positive. Needs ``n >= 4``.
    The debiased value can be slightly negative.

    Both are invariant to orthogonal transforms, isotropic scaling and
    translation of either input, but not to general invertible linear maps.

    Args:
        X: ``[n, d1]`` activations, one row per sample.
        Y: ``[n, d2]`` activations of the same ``n`` samples (same row order).
        debiased: use the unbiased HSIC estimator.
        method: ``"gram"`` works with ``n x n`` Gram matrices, ``"features"`` with
            ``d x d`` cross products (never forming ``n x n``); ``"auto"`` picks the
            cheaper. Both give the same value up to rounding.

    Returns:
        0-d float64 tensor.

    Raises:
        TypeError: if an input is not a float tensor.
        ValueError: for non-2-D/non-finite inputs, different ``n``, too few rows
            (2 biased, 4 debiased), constant inputs, or an unknown ``method``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 8, generator=g, dtype=torch.float64)
        >>> Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
        >>> round(float(linear_cka(X, 3 * X @ Q + 1)), 10)
        1.0
    """
    X = _as_f64(X, "X", ndim=2, shape_hint="[n, d1]")
    Y = _as_f64(Y, "Y", ndim=2, shape_hint="[n, d2]")
    method = _check_method(method)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (samples), got X with n={X.shape[0]} and "
            f"Y with n={Y.shape[0]}. Fix: pass activations of the same tokens, one row each."
        )
    n = X.shape[0]
    minimum = 4 if debiased else 2
    if n < minimum:
        raise ValueError(
            f"{'debiased' if debiased else 'biased'} linear CKA needs at least {minimum} rows "
            f"(samples), got n={n}."
        )
    if X.shape[1] == 0 or Y.shape[1] == 0:
        raise ValueError(f"X and Y need at least one column, got shapes {tuple(X.shape)} and {tuple(Y.shape)}.")
    Xc, Yc = _centre(X), _centre(Y)
    _check_not_constant(Xc, X, "X")
    _check_not_constant(Yc, Y, "Y")
    chosen = _choose_method(method, n, [X.shape[1], Y.shape[1]])
    # HSIC_u is exactly translation invariant; centring first just avoids
    # cancellation when the activations have a large mean.
    if debiased:
        h = _hsic_unbiased_matrix([Xc, Yc], chosen)
        return _cka_from_hsic(h, "the unbiased HSIC", ["X", "Y"])[0, 1]
    h = _hsic_biased_matrix([Xc, Yc], chosen)
    return _cka_from_hsic(h, "HSIC", ["X", "Y"])[0, 1]


# --------------------------------------------------------------------------
# Streaming co-moments (Chan et al. parallel update)
# --------------------------------------------------------------------------


def _chan_merge(
    n_a: int,
    means_a: List[Tensor],
    blocks_a: Dict[Tuple[int, int], Tensor],
    n_b: int,
    means_b: List[Tensor],
    blocks_b: Dict[Tuple[int, int], Tensor],
) -> None:
    """In-place merge of centred co-moments ``sum (x_i - m_i)(x_j - m_j)^T`` of set b into a.

    Merging centred statistics (instead of raw sums of products) avoids the
    catastrophic cancellation of ``E[xx^T] - m m^T`` when means are large.
    """
    n = n_a + n_b
    deltas = [mb - ma for ma, mb in zip(means_a, means_b)]
    w = n_a * n_b / n
    for (i, j), blk in blocks_a.items():
        blk += blocks_b[(i, j)] + w * torch.outer(deltas[i], deltas[j])
    for ma, delta in zip(means_a, deltas):
        ma += delta * (n_b / n)


def _check_state_keys(state: Any, required: Sequence[str], owner: str) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"{owner}.load_state_dict expects a dict from state_dict(), got {type_name(state)}.")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"{owner}.load_state_dict: state is missing keys {missing} (got keys {sorted(state)}). "
            f"Fix: pass the dict returned by {owner}.state_dict()."
        )


def _state_tensor(state: Dict[str, Any], key: str, shape: Tuple[int, ...], owner: str) -> Tensor:
    value = state[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}.load_state_dict: state[{key!r}] must be a Tensor, got {type_name(value)}.")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{owner}.load_state_dict: state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}."
        )
    return value.detach().to(_F64).clone()


def _state_int(state: Dict[str, Any], key: str, owner: str, minimum: int = 0) -> int:
    value = state[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = int(value)
    return check_int(value, f"{owner} state[{key!r}]", minimum=minimum)


class _CoMoments:
    """Streaming means and centred co-moment blocks ``(i, j), i <= j`` for several inputs."""

    def __init__(self, n_inputs: int, pairs: Sequence[Tuple[int, int]]):
        self.n_inputs = n_inputs
        self.pairs = list(pairs)
        self.n = 0
        self.dims: Optional[List[int]] = None
        self.means: List[Tensor] = []
        self.blocks: Dict[Tuple[int, int], Tensor] = {}

    def init(self, dims: Sequence[int], device: torch.device) -> None:
        self.dims = list(dims)
        self.means = [torch.zeros(d, dtype=_F64, device=device) for d in dims]
        self.blocks = {(i, j): torch.zeros(dims[i], dims[j], dtype=_F64, device=device) for i, j in self.pairs}

    def update(self, xs: Sequence[Tensor], products: Dict[Tuple[int, int], Tensor], means: List[Tensor]) -> None:
        """``xs`` are batch-centred, ``products`` their pair products, ``means`` batch means."""
        n_b = xs[0].shape[0]
        if self.n == 0:
            self.means = [m.clone() for m in means]
            self.blocks = {p: products[p].clone() for p in self.pairs}
        else:
            _chan_merge(self.n, self.means, self.blocks, n_b, means, {p: products[p] for p in self.pairs})
        self.n += n_b

    def merge(self, other: "_CoMoments") -> None:
        if other.n == 0:
            return
        if self.n == 0:
            self.dims = list(other.dims)  # type: ignore[arg-type]
            self.means = [m.clone() for m in other.means]
            self.blocks = {p: b.clone() for p, b in other.blocks.items()}
        else:
            dev = self.means[0].device
            _chan_merge(
                self.n,
                self.means,
                self.blocks,
                other.n,
                [m.to(dev) for m in other.means],
                {p: b.to(dev) for p, b in other.blocks.items()},
            )
        self.n += other.n

    def state(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"n": self.n}
        if self.dims is not None:
            out.update({f"mean_{i}": m.clone() for i, m in enumerate(self.means)})
            out.update({f"comoment_{i}_{j}": b.clone() for (i, j), b in self.blocks.items()})
        return out

    def load(self, state: Dict[str, Any], owner: str, dims: Optional[Sequence[int]]) -> None:
        n = _state_int(state, "n", owner)
        if n == 0:
            self.n, self.dims, self.means, self.blocks = 0, None, [], {}
            return
        if dims is None:
            _check_state_keys(state, [f"mean_{i}" for i in range(self.n_inputs)], owner)
            dims = [int(state[f"mean_{i}"].shape[0]) for i in range(self.n_inputs)]
        keys = [f"mean_{i}" for i in range(self.n_inputs)] + [f"comoment_{i}_{j}" for i, j in self.pairs]
        _check_state_keys(state, keys, owner)
        means = [_state_tensor(state, f"mean_{i}", (dims[i],), owner) for i in range(self.n_inputs)]
        blocks = {(i, j): _state_tensor(state, f"comoment_{i}_{j}", (dims[i], dims[j]), owner) for i, j in self.pairs}
        self.dims, self.means, self.blocks, self.n = list(dims), means, blocks, n


class CKAMatrixAccumulator:
    """Streaming layer-by-layer linear CKA matrix (biased and minibatch-debiased).

    Feed minibatches of activations for all layers at once (same rows = same
    tokens for every layer); memory does not grow with the number of rows.

    * Biased CKA (exact over the whole stream): keeps each layer's mean and the
      centred cross-covariance blocks ``C_ij = sum (x_i - m_i)(x_j - m_j)^T`` for
      all ``i <= j``, merged with Chan et al.'s parallel formula; then
      ``CKA_ij = ||C_ij||_F^2 / (||C_ii||_F ||C_jj||_F)``. This equals
      :func:`linear_cka` on the concatenated stream. Memory:
      ``8 * sum_{i<=j} d_i d_j`` bytes, e.g. L=32 layers of d=1024 take ~4.3 GB,
      L=12 of d=768 ~0.46 GB; pass ``track_biased=False`` to skip it.
    * Debiased CKA ("minibatch CKA", Nguyen et al. 2021): the unbiased HSIC is
      computed within each minibatch (>= 4 rows) for every pair, and
      ``CKA_ij = mean_b HSIC_u(K_i, K_j) / sqrt(mean_b HSIC_u(K_i, K_i) mean_b
      HSIC_u(K_j, K_j))``. Memory ``O(L^2)``. Minibatches are weighted equally
      and the value depends on the minibatch size (pairs of rows in different
      minibatches never enter), so report the size and keep it fixed when
      comparing. Pass ``track_debiased=False`` to skip it (and allow batches of
      fewer than 4 rows).

    Args:
        n_layers: number of representations per update, ``>= 1``.
        track_biased: keep the statistics for ``result(debiased=False)``.
        track_debiased: keep the statistics for ``result(debiased=True)``.
        method: how per-minibatch HSIC terms are computed (see :func:`linear_cka`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> acc = CKAMatrixAccumulator(2)
        >>> for _ in range(3):
        ...     x = torch.randn(16, 4, generator=g)
        ...     acc.update([x, 2 * x])
        >>> acc.result().shape, round(float(acc.result()[0, 1]), 10), round(float(acc.result(debiased=True)[0, 1]), 10)
        (torch.Size([2, 2]), 1.0, 1.0)
    """

    def __init__(
        self,
        n_layers: int,
        *,
        track_biased: bool = True,
        track_debiased: bool = True,
        method: Method = "auto",
    ):
        self.n_layers = check_int(n_layers, "n_layers", minimum=1)
        if not (track_biased or track_debiased):
            raise ValueError("track_biased and track_debiased are both False; nothing would be accumulated.")
        self.track_biased = bool(track_biased)
        self.track_debiased = bool(track_debiased)
        self.method = _check_method(method)
        pairs = [(i, j) for i in range(n_layers) for j in range(i, n_layers)]
        self._moments = _CoMoments(n_layers, pairs)
        self._dims: Optional[List[int]] = None
        self._n_seen = 0
        self._hsic_u_sum: Optional[Tensor] = None
        self._n_batches = 0

    @property
    def n(self) -> int:
        """Number of rows seen so far."""
        return self._n_seen

    @property
    def n_batches(self) -> int:
        """Number of minibatches that entered the debiased estimate."""
        return self._n_batches

    def _names(self) -> List[str]:
        return [f"layer {i}" for i in range(self.n_layers)]

    def _validate(self, xs: Any, arg: str = "xs") -> List[Tensor]:
        if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(
                f"{arg} must be a list/tuple of {self.n_layers} [n, d] tensors (one per layer), got "
                f"{type_name(xs)}. Fix: pass list(acts) or [acts[l] for l in range(L)]."
            )
        if len(xs) != self.n_layers:
            raise ValueError(f"{arg} must hold {self.n_layers} tensors (n_layers), got {len(xs)}.")
        out = [
            _as_f64(x, f"{arg}[{i}]", ndim=2, shape_hint="[n, d]").detach() for i, x in enumerate(xs)
        ]
        rows = [x.shape[0] for x in out]
        if len(set(rows)) != 1:
            raise ValueError(
                f"all tensors in {arg} must have the same number of rows (the same tokens), got row counts {rows}."
            )
        dims = [x.shape[1] for x in out]
        if self._dims is not None and dims != self._dims:
            raise ValueError(f"{arg} has widths {dims}, but earlier updates had widths {self._dims}.")
        if any(d == 0 for d in dims):
            raise ValueError(f"every tensor in {arg} needs at least one column, got widths {dims}.")
        device = out[0].device
        return [x.to(device) for x in out]

    def update(self, xs: Sequence[Float[Tensor, "n d"]]) -> None:
        """Add a minibatch: ``xs[l]`` is the ``[n, d_l]`` activation of layer ``l`` for the same ``n`` rows.

        Raises:
            TypeError: if ``xs`` is not a sequence of float tensors.
            ValueError: wrong count, NaN/inf, mismatched rows or widths, or fewer
                than 4 rows while ``track_debiased`` is on.
        """
        xs = self._validate(xs)
        n_b = xs[0].shape[0]
        if n_b == 0:
            return
        if self.track_debiased and n_b < 4:
            raise ValueError(
                f"this minibatch has n={n_b} rows; the unbiased HSIC estimator for minibatch-debiased CKA "
                "needs at least 4 rows per minibatch. Fix: use larger minibatches, or construct with "
                "track_debiased=False if you only need the biased CKA."
            )
        dims = [x.shape[1] for x in xs]
        means = [x.mean(0) for x in xs]
        xc = [x - m for x, m in zip(xs, means)]
        # With the biased statistics on, the d x d products are computed anyway, so
        # the Gram-free unbiased path costs only O(n d) extra.
        chosen = "features" if (self.track_biased and self.method == "auto") else _choose_method(self.method, n_b, dims)
        # Both statistics need the centred cross products in the feature path; share them.
        products = _pair_products(xc) if (self.track_biased or chosen == "features") else None
        if self.track_debiased:
            h = _hsic_unbiased_matrix(xc, chosen, products)
            self._hsic_u_sum = h if self._hsic_u_sum is None else self._hsic_u_sum + h.to(self._hsic_u_sum.device)
            self._n_batches += 1
        if self.track_biased:
            if self._moments.dims is None:
                self._moments.init(dims, xs[0].device)
            self._moments.update(xc, products, means)  # type: ignore[arg-type]
        self._dims = dims
        self._n_seen += n_b

    def result(self, *, debiased: bool = False) -> Float[Tensor, "L L"]:
        """The ``[n_layers, n_layers]`` CKA matrix (symmetric, unit diagonal).

        Raises:
            ValueError: if the needed statistics were not tracked, too few rows
                (biased: 2) or minibatches (debiased: 1) were seen, or a layer
                has zero variance.
        """
        if debiased:
            if not self.track_debiased:
                raise ValueError(
                    "debiased=True needs track_debiased=True at construction; this accumulator did not track it."
                )
            if self._n_batches < 1 or self._hsic_u_sum is None:
                raise ValueError(
                    f"debiased CKA needs at least 1 minibatch of >= 4 rows; saw {self._n_batches} minibatches."
                )
            h = self._hsic_u_sum / self._n_batches
            return _cka_from_hsic(h, "the mean unbiased HSIC", self._names())
        if not self.track_biased:
            raise ValueError(
                "debiased=False needs track_biased=True at construction; this accumulator did not track it."
            )
        if self._moments.n < 2:
            raise ValueError(f"biased CKA needs at least 2 rows; saw n={self._moments.n}.")
        blocks = self._moments.blocks
        h = _sym_from_pairs({p: b.square().sum() for p, b in blocks.items()}, self.n_layers, blocks[(0, 0)].device)
        # Relative threshold: see _check_not_constant.
        for i in range(self.n_layers):
            scale = float(self._moments.means[i].square().sum()) * self._moments.n
            if float(torch.trace(blocks[(i, i)])) <= (1e3 * _EPS) ** 2 * scale:
                h[i, i] = 0.0
        return _cka_from_hsic(h, "HSIC", self._names())

    def merge(self, other: "CKAMatrixAccumulator") -> "CKAMatrixAccumulator":
        """Fold in another accumulator's statistics (e.g. from another process); returns ``self``."""
        if not isinstance(other, CKAMatrixAccumulator):
            raise TypeError(f"can only merge a {type(self).__name__}, got {type_name(other)}.")
        if (other.n_layers, other.track_biased, other.track_debiased) != (
            self.n_layers,
            self.track_biased,
            self.track_debiased,
        ):
            raise ValueError(
                "cannot merge accumulators with different settings: "
                f"(n_layers, track_biased, track_debiased) = "
                f"{(self.n_layers, self.track_biased, self.track_debiased)} vs "
                f"{(other.n_layers, other.track_biased, other.track_debiased)}."
            )
        if self._dims is not None and other._dims is not None and self._dims != other._dims:
            raise ValueError(f"cannot merge: layer widths {self._dims} vs {other._dims}.")
        if self.track_biased:
            self._moments.merge(other._moments)
        if self._dims is None:
            self._dims = None if other._dims is None else list(other._dims)
        if other._hsic_u_sum is not None:
            self._hsic_u_sum = (
                other._hsic_u_sum.clone()
                if self._hsic_u_sum is None
                else self._hsic_u_sum + other._hsic_u_sum.to(self._hsic_u_sum.device)
            )
        self._n_batches += other._n_batches
        self._n_seen += other._n_seen
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and ints; ``hsic_u_sum``/``n_batches`` are sums across processes."""
        out: Dict[str, Any] = {"n_layers": self.n_layers, "n_seen": self._n_seen, "n_batches": self._n_batches}
        if self._dims is not None:
            out.update({f"width_{i}": d for i, d in enumerate(self._dims)})
        if self.track_biased:
            out.update(self._moments.state())
        if self._hsic_u_sum is not None:
            out["hsic_u_sum"] = self._hsic_u_sum.clone()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (constructor settings must match)."""
        owner = type(self).__name__
        _check_state_keys(state, ["n_layers", "n_seen", "n_batches"], owner)
        n_layers = _state_int(state, "n_layers", owner)
        if n_layers != self.n_layers:
            raise ValueError(
                f"{owner}.load_state_dict: state has n_layers={n_layers}, this accumulator {self.n_layers}."
            )
        n_batches = _state_int(state, "n_batches", owner)
        hsic = None
        if n_batches > 0:
            _check_state_keys(state, ["hsic_u_sum"], owner)
            hsic = _state_tensor(state, "hsic_u_sum", (self.n_layers, self.n_layers), owner)
        if self.track_biased:
            _check_state_keys(state, ["n"], owner)
            self._moments.load(state, owner, None)
        dims = None
        if "width_0" in state:
            _check_state_keys(state, [f"width_{i}" for i in range(self.n_layers)], owner)
            dims = [_state_int(state, f"width_{i}", owner, minimum=1) for i in range(self.n_layers)]
        if self.track_biased and self._moments.dims is not None and self._moments.dims != dims:
            raise ValueError(
                f"{owner}.load_state_dict: state widths {dims} do not match its statistics {self._moments.dims}."
            )
        self._dims = dims
        self._n_seen = _state_int(state, "n_seen", owner)
        self._n_batches = n_batches
        self._hsic_u_sum = hsic


class CKAAccumulator:
    """Streaming linear CKA between two representations ``X`` and ``Y`` of the same rows.

    ``update(X, Y)`` with ``X [n, d1]`` and ``Y [n, d2]`` accumulates float64
    statistics; ``result(debiased=False)`` gives the biased CKA of the whole
    stream exactly (means and centred ``X^T X``, ``Y^T Y``, ``X^T Y`` merged with
    Chan et al.'s update; memory ``8 (d1^2 + d2^2 + d1 d2)`` bytes), and
    ``result(debiased=True)`` the minibatch-debiased CKA of Nguyen et al. 2021
    (mean over minibatches of the unbiased HSIC, each minibatch >= 4 rows; the
    value depends on the minibatch size). See :class:`CKAMatrixAccumulator`,
    which this wraps with two layers.

    Args:
        track_biased: keep statistics for the biased CKA.
        track_debiased: keep statistics for the debiased CKA (requires >= 4
            rows in every minibatch).
        method: how per-minibatch HSIC terms are computed (see :func:`linear_cka`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> acc = CKAAccumulator()
        >>> for _ in range(4):
        ...     x = torch.randn(32, 6, generator=g)
        ...     acc.update(x, -x + 5)
        >>> round(float(acc.result()), 10)
        1.0
    """

    def __init__(self, *, track_biased: bool = True, track_debiased: bool = True, method: Method = "auto"):
        self._inner = CKAMatrixAccumulator(
            2, track_biased=track_biased, track_debiased=track_debiased, method=method
        )

    @property
    def n(self) -> int:
        """Number of rows seen so far."""
        return self._inner.n

    @property
    def n_batches(self) -> int:
        """Number of minibatches that entered the debiased estimate."""
        return self._inner.n_batches

    def update(self, X: Float[Tensor, "n d1"], Y: Float[Tensor, "n d2"]) -> None:
        """Add a minibatch of paired rows.

        Raises:
            TypeError: non-tensor / non-float input.
            ValueError: non-2-D, NaN/inf, different row counts, widths that
                changed, or < 4 rows while ``track_debiased`` is on.
        """
        X = _as_f64(X, "X", ndim=2, shape_hint="[n, d1]")
        Y = _as_f64(Y, "Y", ndim=2, shape_hint="[n, d2]")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X and Y must have the same number of rows (samples), got X with n={X.shape[0]} and "
                f"Y with n={Y.shape[0]}."
            )
        self._inner.update([X, Y])

    def result(self, *, debiased: bool = False) -> Float[Tensor, ""]:
        """0-d CKA; raises ``ValueError`` if too little was seen or an input is constant."""
        return self._inner.result(debiased=debiased)[0, 1]

    def merge(self, other: "CKAAccumulator") -> "CKAAccumulator":
        """Fold in another accumulator's statistics; returns ``self``."""
        if not isinstance(other, CKAAccumulator):
            raise TypeError(f"can only merge a CKAAccumulator, got {type_name(other)}.")
        self._inner.merge(other._inner)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and ints (see :meth:`CKAMatrixAccumulator.state_dict`)."""
        return self._inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self._inner.load_state_dict(state)


# --------------------------------------------------------------------------
# Procrustes
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProcrustesResult:
    """Result of an orthogonal Procrustes fit ``X R ~ Y``.

    Attributes:
        rotation: ``[d, d]`` orthogonal ``R`` minimising ``||X R - Y||_F`` (may
            include a reflection, as in scipy).
        scale: 0-d optimal isotropic scale ``s`` for ``s X R ~ Y``:
            ``sum(singular values of X^T Y) / ||X||_F^2``.
        error: 0-d ``||X R - Y||_F / ||Y||_F`` (no scaling).
        scaled_error: 0-d ``||s X R - Y||_F / ||Y||_F``.
    """

    rotation: Tensor
    scale: Tensor
    error: Tensor
    scaled_error: Tensor


def _check_pair_same_width(X: Tensor, Y: Tensor) -> None:
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (paired samples), got X with n={X.shape[0]} "
            f"and Y with n={Y.shape[0]}."
        )
    if X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"orthogonal Procrustes needs X and Y of the same width d, got X with d={X.shape[1]} and "
            f"Y with d={Y.shape[1]}. Fix: project both onto a common k-dim space first, e.g. their "
            "top-k principal subspaces (CovarianceAccumulator.top_principal_subspace(k)), or use "
            "linear_cka, which allows different widths."
        )
    if X.shape[1] == 0:
        raise ValueError(f"X and Y need at least one column, got shapes {tuple(X.shape)} and {tuple(Y.shape)}.")


def _procrustes_core(xty: Tensor, sx2: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Rotation, optimal scale and ``tr(S)`` from ``X^T Y = U S V^T`` and ``||X||_F^2``."""
    # R = U V^T, as in scipy.linalg.orthogonal_procrustes.
    u, s, vh = torch.linalg.svd(xty)
    return u @ vh, s.sum() / sx2, s.sum()


def _check_nonzero_norm(sq: float, name: str, n: int) -> None:
    if not sq > 0:
        raise ValueError(
            f"{name} is all zeros (||{name}||_F^2 = {sq} over n={n} rows; after centring if "
            "center=True), so the Procrustes fit and its normalised error are undefined. "
            f"Fix: check {name} is not constant/empty."
        )


def procrustes(
    X: Float[Tensor, "n d"], Y: Float[Tensor, "n d"], *, center: bool = False
) -> ProcrustesResult:
    """Orthogonal Procrustes: the orthogonal ``R`` minimising ``||X R - Y||_F``.

    ``R = U V^T`` where ``U S V^T = X^T Y``; equals
    ``scipy.linalg.orthogonal_procrustes(X, Y)[0]``.

    Args:
        X: ``[n, d]`` source rows.
        Y: ``[n, d]`` target rows (same samples, same width).
        center: subtract each input's column mean first (fits ``Y - my ~ (X - mx) R``).

    Returns:
        :class:`ProcrustesResult` (``rotation``, ``scale``, ``error``, ``scaled_error``).

    Raises:
        TypeError: non-tensor / non-float input.
        ValueError: non-2-D, NaN/inf, different ``n`` or ``d``, or an all-zero input.

    Example:
        >>> import torch
        >>> X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        >>> fit = procrustes(X, 2 * X @ R)
        >>> bool(torch.allclose(fit.rotation, R)), round(float(fit.scale), 8), round(float(fit.scaled_error), 8)
        (True, 2.0, 0.0)
    """
    X = _as_f64(X, "X", ndim=2, shape_hint="[n, d]")
    Y = _as_f64(Y, "Y", ndim=2, shape_hint="[n, d]")
    _check_pair_same_width(X, Y)
    if center:
        X, Y = _centre(X), _centre(Y)
    sx2, sy2 = X.square().sum(), Y.square().sum()
    _check_nonzero_norm(float(sx2), "X", X.shape[0])
    _check_nonzero_norm(float(sy2), "Y", Y.shape[0])
    rotation, scale, _ = _procrustes_core(X.mT @ Y, sx2)
    # Residuals computed directly (not via the expanded norm) stay accurate for near-perfect fits.
    xr = X @ rotation
    ny = torch.sqrt(sy2)
    error = torch.linalg.norm(xr - Y) / ny
    scaled_error = torch.linalg.norm(scale * xr - Y) / ny
    return ProcrustesResult(rotation=rotation, scale=scale, error=error, scaled_error=scaled_error)


class ProcrustesAccumulator:
    """Streaming orthogonal Procrustes over paired minibatches.

    Accumulates ``X^T Y``, ``||X||_F^2`` and ``||Y||_F^2`` in float64 (with
    ``center=True``: means and centred statistics, merged with Chan et al.'s
    update so large means do not cancel). ``result()`` equals
    :func:`procrustes` on the concatenated stream (same ``center``). The errors
    are computed from the accumulated norms,
    ``||XR - Y||^2 = ||X||^2 + ||Y||^2 - 2 tr(S)``, so for near-perfect fits
    they are only accurate to ~1e-8 (absolute), unlike the full-batch path.
    Memory: ``8 d^2`` bytes.

    Args:
        center: fit centred data (see :func:`procrustes`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> acc = ProcrustesAccumulator()
        >>> for _ in range(3):
        ...     x = torch.randn(20, 2, generator=g, dtype=torch.float64)
        ...     acc.update(x, -x)
        >>> acc.result().rotation.round(decimals=8).tolist()
        [[-1.0, 0.0], [0.0, -1.0]]
    """

    def __init__(self, *, center: bool = False):
        self.center = bool(center)
        self._n = 0
        self._d: Optional[int] = None
        self._mean_x: Optional[Tensor] = None
        self._mean_y: Optional[Tensor] = None
        self._xty: Optional[Tensor] = None
        self._ss: Optional[Tensor] = None  # [2]: sum of squared (centred) norms of X and Y

    @property
    def n(self) -> int:
        """Number of rows seen so far."""
        return self._n

    def update(self, X: Float[Tensor, "n d"], Y: Float[Tensor, "n d"]) -> None:
        """Add paired rows ``X [n, d]``, ``Y [n, d]``.

        Raises:
            TypeError / ValueError: as :func:`procrustes`, or if ``d`` changed.
        """
        X = _as_f64(X, "X", ndim=2, shape_hint="[n, d]").detach()
        Y = _as_f64(Y, "Y", ndim=2, shape_hint="[n, d]").detach().to(X.device)
        _check_pair_same_width(X, Y)
        if self._d is not None and X.shape[1] != self._d:
            raise ValueError(f"X and Y have width d={X.shape[1]}, but earlier updates had d={self._d}.")
        n_b = X.shape[0]
        if n_b == 0:
            return
        if self.center:
            mx, my = X.mean(0), Y.mean(0)
            X, Y = X - mx, Y - my
        else:
            # Uncentred statistics are plain sums: keep the means at zero so the
            # Chan merge below reduces to addition.
            mx = torch.zeros(X.shape[1], dtype=_F64, device=X.device)
            my = torch.zeros_like(mx)
        xty = X.mT @ Y
        ss = torch.stack([X.square().sum(), Y.square().sum()])
        self._absorb(n_b, mx, my, xty, ss)

    def _absorb(self, n_b: int, mx: Tensor, my: Tensor, xty: Tensor, ss: Tensor) -> None:
        if self._n == 0:
            self._d = xty.shape[0]
            self._mean_x, self._mean_y = mx.clone(), my.clone()
            self._xty, self._ss = xty.clone(), ss.clone()
            self._n = n_b
            return
        dev = self._xty.device  # type: ignore[union-attr]
        mx, my, xty, ss = mx.to(dev), my.to(dev), xty.to(dev), ss.to(dev)
        n = self._n + n_b
        w = self._n * n_b / n
        dx, dy = mx - self._mean_x, my - self._mean_y
        self._xty += xty + w * torch.outer(dx, dy)  # type: ignore[operator]
        self._ss += ss + w * torch.stack([dx.square().sum(), dy.square().sum()])  # type: ignore[operator]
        self._mean_x += dx * (n_b / n)  # type: ignore[operator]
        self._mean_y += dy * (n_b / n)  # type: ignore[operator]
        self._n = n

    def result(self) -> ProcrustesResult:
        """The fit over everything seen; raises ``ValueError`` if no rows or all-zero data were seen."""
        if self._n < 1 or self._xty is None or self._ss is None:
            raise ValueError(f"Procrustes needs at least 1 row; saw n={self._n}.")
        sx2, sy2 = self._ss[0], self._ss[1]
        _check_nonzero_norm(float(sx2), "X", self._n)
        _check_nonzero_norm(float(sy2), "Y", self._n)
        rotation, scale, tr_s = _procrustes_core(self._xty, sx2)
        err2 = (sx2 + sy2 - 2 * tr_s).clamp_min(0.0)
        scaled2 = (sy2 - tr_s.square() / sx2).clamp_min(0.0)
        return ProcrustesResult(
            rotation=rotation,
            scale=scale,
            error=torch.sqrt(err2 / sy2),
            scaled_error=torch.sqrt(scaled2 / sy2),
        )

    def merge(self, other: "ProcrustesAccumulator") -> "ProcrustesAccumulator":
        """Fold in another accumulator (same ``center``); returns ``self``."""
        if not isinstance(other, ProcrustesAccumulator):
            raise TypeError(f"can only merge a ProcrustesAccumulator, got {type_name(other)}.")
        if other.center != self.center:
            raise ValueError(f"cannot merge center={other.center} into center={self.center}.")
        if other._n == 0:
            return self
        if self._d is not None and other._d != self._d:
            raise ValueError(f"cannot merge: widths d={self._d} vs d={other._d}.")
        self._absorb(other._n, other._mean_x, other._mean_y, other._xty, other._ss)  # type: ignore[arg-type]
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors and ints. With ``center=False`` the tensors are sums (summable across processes)."""
        out: Dict[str, Any] = {"n": self._n, "center": int(self.center)}
        if self._n > 0:
            out.update(
                mean_x=self._mean_x.clone(),  # type: ignore[union-attr]
                mean_y=self._mean_y.clone(),  # type: ignore[union-attr]
                xty=self._xty.clone(),  # type: ignore[union-attr]
                sq_norms=self._ss.clone(),  # type: ignore[union-attr]
            )
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (``center`` must match)."""
        owner = type(self).__name__
        _check_state_keys(state, ["n", "center"], owner)
        if bool(_state_int(state, "center", owner)) != self.center:
            raise ValueError(
                f"{owner}.load_state_dict: state has center={bool(state['center'])}, this accumulator {self.center}."
            )
        n = _state_int(state, "n", owner)
        if n == 0:
            self._n, self._d = 0, None
            self._mean_x = self._mean_y = self._xty = self._ss = None
            return
        _check_state_keys(state, ["mean_x", "mean_y", "xty", "sq_norms"], owner)
        xty = state["xty"]
        d = int(xty.shape[0]) if isinstance(xty, Tensor) and xty.ndim == 2 else -1
        self._xty = _state_tensor(state, "xty", (d, d), owner)
        self._mean_x = _state_tensor(state, "mean_x", (d,), owner)
        self._mean_y = _state_tensor(state, "mean_y", (d,), owner)
        self._ss = _state_tensor(state, "sq_norms", (2,), owner)
        self._d, self._n = d, n


# --------------------------------------------------------------------------
# Covariance
# --------------------------------------------------------------------------


class CovarianceAccumulator:
    """Streaming mean and covariance of ``d``-dimensional rows, in float64.

    Each minibatch is centred on its own mean and merged with Chan et al.'s
    parallel update, so data with a large mean and small spread (e.g. mean 1e4,
    std 1e-2) keep full precision, unlike ``E[xx^T] - m m^T``. Memory ``8 d^2``
    bytes.

    Args:
        d: row width, ``>= 1``.
        device: where the statistics live; default: CPU until the first
            update, then the device of that update's input.

    Example:
        >>> import torch
        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
        >>> acc.update(torch.tensor([[4.0, -2.0]]))
        >>> acc.n, acc.mean.round(decimals=10).tolist(), acc.cov().round(decimals=10).tolist()
        (3, [2.0, 0.0], [[4.0, -2.0], [-2.0, 4.0]])
    """

    def __init__(self, d: int, *, device: Optional[Union[str, torch.device]] = None):
        self.d = check_int(d, "d", minimum=1)
        self._device_fixed = device is not None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._moments = _CoMoments(1, [(0, 0)])
        self._moments.init([self.d], dev)

    @property
    def n(self) -> int:
        """Number of rows seen so far."""
        return self._moments.n

    def update(self, X: Float[Tensor, "n d"]) -> None:
        """Add rows ``X [n, d]``.

        Raises:
            TypeError: non-tensor / non-float input.
            ValueError: not 2-D, wrong width, or NaN/inf.
        """
        X = _as_f64(X, "X", ndim=2, shape_hint=f"[n, d={self.d}]").detach()
        if X.shape[1] != self.d:
            raise ValueError(
                f"X must have d={self.d} columns (set at construction), got shape {tuple(X.shape)}."
            )
        if X.shape[0] == 0:
            return
        if self._moments.n == 0 and not self._device_fixed:
            self._moments.init([self.d], X.device)
        X = X.to(self._moments.means[0].device)
        m = X.mean(0)
        xc = X - m
        self._moments.update([xc], {(0, 0): xc.mT @ xc}, [m])

    def _need(self, minimum: int, what: str) -> None:
        if self._moments.n < minimum:
            raise ValueError(f"{what} needs at least {minimum} row(s); saw n={self._moments.n}.")

    @property
    def mean(self) -> Float[Tensor, " d"]:
        """``[d]`` mean of all rows seen (raises ``ValueError`` before any)."""
        self._need(1, "the mean")
        return self._moments.means[0].clone()

    def cov(self, ddof: int = 1) -> Float[Tensor, "d d"]:
        """``[d, d]`` covariance ``sum (x - m)(x - m)^T / (n - ddof)`` (``numpy.cov`` convention).

        Raises:
            ValueError: if ``n <= ddof``.
        """
        ddof = check_int(ddof, "ddof", minimum=0)
        self._need(ddof + 1, f"cov(ddof={ddof})")
        c = self._moments.blocks[(0, 0)]
        # Chan updates keep the block symmetric only up to rounding; return an exactly symmetric matrix.
        return 0.5 * (c + c.mT) / (self._moments.n - ddof)

    def top_principal_subspace(self, k: int) -> Float[Tensor, "d k"]:
        """``[d, k]`` orthonormal top-``k`` eigenvectors of the covariance, by decreasing eigenvalue.

        Column signs are fixed (largest-magnitude entry positive).

        Raises:
            ValueError: if ``k > d`` or ``k > n - 1`` (a covariance of ``n`` rows
                has rank at most ``n - 1``).
        """
        k = check_int(k, "k", minimum=1, maximum=self.d, why=f" (d={self.d})")
        if k > self._moments.n - 1:
            raise ValueError(
                f"k={k} exceeds n - 1 = {self._moments.n - 1}: a covariance of n={self._moments.n} rows has "
                f"rank at most n - 1, so at most that many principal directions are defined. Fix: use "
                f"k <= {max(self._moments.n - 1, 0)} or feed more rows."
            )
        _, vecs = torch.linalg.eigh(self.cov())
        return _fix_signs(vecs[:, -k:].flip(-1))

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Fold in another accumulator's rows (e.g. from another process); returns ``self``."""
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"can only merge a CovarianceAccumulator, got {type_name(other)}.")
        if other.d != self.d:
            raise ValueError(f"cannot merge: this accumulator has d={self.d}, the other d={other.d}.")
        self._moments.merge(other._moments)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """``{"d", "n", "mean", "comoment"}``; merge states with :meth:`merge`, not by summing."""
        return {
            "d": self.d,
            "n": self._moments.n,
            "mean": self._moments.means[0].clone(),
            "comoment": self._moments.blocks[(0, 0)].clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (``d`` must match)."""
        owner = type(self).__name__
        _check_state_keys(state, ["d", "n", "mean", "comoment"], owner)
        d = _state_int(state, "d", owner, minimum=1)
        if d != self.d:
            raise ValueError(f"{owner}.load_state_dict: state has d={d}, this accumulator d={self.d}.")
        n = _state_int(state, "n", owner)
        mean = _state_tensor(state, "mean", (d,), owner)
        comoment = _state_tensor(state, "comoment", (d, d), owner)
        self._moments.means, self._moments.blocks, self._moments.n = [mean], {(0, 0): comoment}, n
