"""Linear centred kernel alignment (CKA): one shot, from streamed moments, and minibatch-debiased.

Biased CKA (Kornblith et al. 2019) is a function of centred cross-moments
(:func:`linear_cka_from_moments`); the unbiased HSIC of Song et al. (2012) is not, so minibatch CKA
(Nguyen et al. 2021) averages :func:`unbiased_hsic_matrix` over blocks (:func:`cka_from_hsic`).
"""

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_latentspaces.checks import as_float64

__all__ = ["linear_cka", "linear_cka_from_moments", "unbiased_hsic_matrix", "cka_from_hsic"]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps

Method = Literal["auto", "gram", "features"]


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _choose_method(method: Any, n: int, dims: Sequence[int]) -> str:
    """``method`` checked, with ``"auto"`` resolved to the cheaper of the two paths."""
    if method not in ("auto", "gram", "features"):
        raise ValueError(f"method must be one of 'auto', 'gram', 'features', got {method!r}.")
    if method != "auto":
        return method
    n_layers = len(dims)
    gram = n * n * sum(dims) + n_layers * n_layers * n * n
    features = n * sum(dims[i] * dims[j] for i in range(n_layers) for j in range(i, n_layers))
    return "gram" if gram < features else "features"


def _hsic_biased_matrix(xs: Sequence[Tensor], method: str) -> Tensor:
    """``||Xc_i^T Xc_j||_F^2`` for all pairs of centred ``xs`` (= ``tr(K_i H K_j H)``)."""
    if method == "gram":
        grams = torch.stack([x @ x.mT for x in xs]).flatten(1)
        return grams @ grams.mT
    out = torch.empty(len(xs), len(xs), dtype=_F64, device=xs[0].device)
    for i in range(len(xs)):
        for j in range(i, len(xs)):
            out[i, j] = out[j, i] = (xs[i].mT @ xs[j]).square().sum()
    return out


def _hsic_unbiased_matrix(xs: Sequence[Tensor], method: str) -> Tensor:
    """Unbiased HSIC with linear kernels for all pairs of ``xs``; ``K~ = X X^T`` with its diagonal zeroed.

    ``HSIC_u = [tr(K~ L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``. The
    ``features`` path never forms ``n x n`` matrices: ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i |x_i|^2 |y_i|^2``.
    """
    n = xs[0].shape[0]
    if method == "gram":
        stacked = torch.stack([x @ x.mT for x in xs])
        stacked.diagonal(dim1=-2, dim2=-1).zero_()
        flat = stacked.flatten(1)
        trace = flat @ flat.mT
        row_sums = stacked.sum(-1)  # K~ 1, [L, n]
    else:
        sq_norms = torch.stack([x.square().sum(1) for x in xs])  # [L, n]
        trace = _hsic_biased_matrix(xs, "features") - sq_norms @ sq_norms.mT
        row_sums = torch.stack([x @ x.sum(0) for x in xs]) - sq_norms
    totals = row_sums.sum(-1)
    hsic = trace + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * (row_sums @ row_sums.mT)
    return hsic / (n * (n - 3))


def cka_from_hsic(h: Float[Tensor, "L L"], what: str, names: Sequence[str]) -> Float[Tensor, "L L"]:
    """CKA matrix ``h_ij / sqrt(h_ii h_jj)`` from (mean) HSIC; a diagonal <= 0 raises, naming ``what`` and the name."""
    diag = torch.diagonal(h)
    small, fix = "", "."
    if "unbiased" in what:
        small = ", or the minibatches are too small for the unbiased estimator to be positive"
        fix = " or use larger minibatches."
    for i, v in enumerate(diag.tolist()):
        if not v > 0:
            raise ValueError(
                f"{what} of {names[i]} with itself is {v:.3g} (must be > 0), so CKA is undefined. This means "
                f"{names[i]} has (near-)zero variance across samples{small}. Fix: check that the activations "
                f"vary across rows (not padding/BOS only){fix}"
            )
    return h / torch.sqrt(torch.outer(diag, diag))


def _check_not_constant(xc: Tensor, x: Tensor, name: str) -> None:
    # centring a constant column leaves O(eps * |mean|) rounding noise, not zero
    if float(torch.linalg.norm(xc)) <= 1e3 * _EPS * float(torch.linalg.norm(x)):
        raise ValueError(
            f"{name} (shape {tuple(x.shape)}) is constant across its rows (zero variance after centring), so CKA is "
            "undefined. Fix: check that the activations vary across rows (e.g. not only padding or BOS positions)."
        )


def linear_cka(
    X: Float[Tensor, "n d1"], Y: Float[Tensor, "n d2"], *, debiased: bool = False, method: Method = "auto"
) -> Float[Tensor, ""]:
    """Linear CKA between two representations ``[n, d1]`` and ``[n, d2]`` of the same samples (0-d float64).

    Biased: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` of the column-centred inputs.
    ``debiased=True`` uses the unbiased HSIC (needs ``n >= 4``; ~0 for independent representations
    even when ``d >> n``, and can be slightly negative). ``method``: ``"gram"`` (``n x n``),
    ``"features"`` (``d x d``) or ``"auto"`` (the cheaper); equal up to rounding. Raises
    ``ValueError`` for different ``n``, too few rows, constant inputs or an unknown ``method``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(100, 8, generator=g, dtype=torch.float64)
        >>> Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
        >>> round(float(linear_cka(X, 3 * X @ Q + 1)), 10)
        1.0
    """
    X = as_float64(X, "X", ndim=2, shape_hint="[n, d1]")
    Y = as_float64(Y, "Y", ndim=2, shape_hint="[n, d2]")
    chosen = _choose_method(method, X.shape[0], [X.shape[1], Y.shape[1]])
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (samples), got X with n={X.shape[0]} and "
            f"Y with n={Y.shape[0]}. Fix: pass activations of the same tokens, one row each."
        )
    n, minimum = X.shape[0], 4 if debiased else 2
    if n < minimum:
        kind = "debiased" if debiased else "biased"
        raise ValueError(f"{kind} linear CKA needs at least {minimum} rows (samples), got n={n}.")
    if X.shape[1] == 0 or Y.shape[1] == 0:
        raise ValueError(f"X and Y need at least one column, got shapes {tuple(X.shape)} and {tuple(Y.shape)}.")
    Xc, Yc = _centre(X), _centre(Y)
    _check_not_constant(Xc, X, "X")
    _check_not_constant(Yc, Y, "Y")
    # HSIC_u is translation invariant; centring first avoids cancellation under a large mean
    h = (_hsic_unbiased_matrix if debiased else _hsic_biased_matrix)([Xc, Yc], chosen)
    return cka_from_hsic(h, "the unbiased HSIC" if debiased else "HSIC", ["X", "Y"])[0, 1]


def linear_cka_from_moments(
    cross: Float[Tensor, "dx dy"], auto_x: Float[Tensor, "dx dx"], auto_y: Float[Tensor, "dy dy"]
) -> Float[Tensor, ""]:
    """Biased linear CKA ``||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F)`` from centred co-moments (sums or averages).

    Exactly :func:`linear_cka` of the rows the moments came from; the caller checks neither is constant.

    Example:
        >>> import torch
        >>> x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> c = (x - x.mean(0)).T @ (x - x.mean(0))
        >>> round(float(linear_cka_from_moments(-2 * c, c, 4 * c)), 10)
        1.0
    """
    return cross.square().sum() / (auto_x.square().sum().sqrt() * auto_y.square().sum().sqrt())


def unbiased_hsic_matrix(xs: Sequence[Float[Tensor, "n d"]], *, method: Method = "auto") -> Float[Tensor, "L L"]:
    """Unbiased HSIC with linear kernels of every pair of ``xs`` (``[n, d_l]`` each, the same ``n >= 4`` rows).

    Averaged over minibatches and passed to :func:`cka_from_hsic`, it gives minibatch-debiased CKA.
    """
    xs = [as_float64(x, f"xs[{i}]", ndim=2, shape_hint="[n, d]") for i, x in enumerate(xs)]
    rows = [x.shape[0] for x in xs]
    if not xs or len(set(rows)) != 1:
        raise ValueError(f"xs must be [n, d] tensors of the same rows (the same tokens), got row counts {rows}.")
    if rows[0] < 4:
        raise ValueError(
            f"this minibatch has n={rows[0]} rows; the unbiased HSIC estimator for minibatch-debiased CKA "
            "needs at least 4 rows per minibatch. Fix: use larger minibatches."
        )
    return _hsic_unbiased_matrix([_centre(x) for x in xs], _choose_method(method, rows[0], [x.shape[1] for x in xs]))
