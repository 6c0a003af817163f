"""Tests for tl_latentspaces.stats (pure maths, float64, no models), and the deprecated alignment_math names."""

import doctest
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

import tl_latentspaces.alignment_math as am
import tl_latentspaces.stats as st
from tl_latentspaces.stats import (
    Moments,
    cka_from_hsic,
    linear_cka,
    linear_cka_from_moments,
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

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def haar(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def scipy_angles(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    return np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))


def test_docstring_examples_run():
    import importlib

    attempted = 0
    for name in ("", ".moments", ".subspaces", ".cka", ".rotations"):
        result = doctest.testmod(importlib.import_module("tl_latentspaces.stats" + name), optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, name
        attempted += result.attempted
    assert attempted > 10


def pairs(n_inputs: int):
    return [(i, j) for i in range(n_inputs) for j in range(i, n_inputs)]


def stream(moments: Moments, xs, sizes):
    """Feed the rows of ``xs`` (one [n, d] tensor per input) to ``moments`` in chunks of ``sizes``."""
    start = 0
    for s in sizes:
        moments.update([x[start : start + s] for x in xs])
        start += s
    return moments


def restored(moments: Moments) -> Moments:
    """A copy of ``moments`` through its state dict, as a checkpoint or another process would hand it over."""
    copy = Moments(moments.n_inputs, moments.pairs, variances=moments.variances)
    copy.load_state_dict(moments.state_dict())
    return copy


def fit_from(m: Moments, center: bool):
    """Procrustes of input 0 onto input 1 from a Moments(2, [(0, 1)], variances=True) store."""
    xty, sx, sy = m.comoment(0, 1), m.sq_sums[0].sum(), m.sq_sums[1].sum()
    if not center:  # the plain sums, from the centred ones and the means
        xty = xty + m.n * torch.outer(m.means[0], m.means[1])
        sx, sy = sx + m.n * m.means[0].square().sum(), sy + m.n * m.means[1].square().sum()
    return procrustes_from_moments(xty, sx, sy, n=m.n)


def streamed_debiased(xs, sizes) -> torch.Tensor:
    """Minibatch-debiased CKA matrix: the unbiased HSIC of each chunk, averaged, normalized."""
    h, start = 0, 0
    for s in sizes:
        h = h + unbiased_hsic_matrix([x[start : start + s] for x in xs])
        start += s
    return cka_from_hsic(h / len(sizes), "the mean unbiased HSIC", [f"x{i}" for i in range(len(xs))])


# ----------------------------------------------------------------- principal angles


@pytest.mark.parametrize("d,k1,k2", [(20, 5, 5), (30, 7, 3), (30, 3, 7), (8, 6, 5), (50, 1, 4)])
def test_principal_angles_match_scipy_random(d, k1, k2):
    A, B = randn(d, k1, seed=1), randn(d, k2, seed=2)
    ours = principal_angles(A, B)
    assert ours.dtype == F64 and ours.shape == (min(k1, k2),)
    assert torch.all(ours[1:] >= ours[:-1])
    np.testing.assert_allclose(ours.numpy(), scipy_angles(A, B), rtol=0, atol=1e-8)


@pytest.mark.parametrize("k1,k2", [(4, 4), (6, 3), (3, 6)])
def test_principal_angles_nearly_aligned(k1, k2):
    # Plant angles ~1e-9: b_i = cos(t_i) q_i + sin(t_i) w_i with q_i in span(A), w_i outside it.
    d, k = 40, min(k1, k2)
    basis = haar(d, seed=3)
    qa, w = basis[:, :k1], basis[:, k1 : k1 + k2]
    theta = torch.linspace(1e-9, 5e-9, k, dtype=F64)
    small = qa[:, :k] * torch.cos(theta) + w[:, :k] * torch.sin(theta)
    A = qa @ randn(k1, k1, seed=4)
    B = small if k2 <= k1 else torch.cat([small, w[:, k:k2]], 1)
    if k2 > k1:  # A is the thinner one: plant the tiny angles from B's side instead
        qb = basis[:, :k2]
        A = (qb[:, :k] * torch.cos(theta) + basis[:, k2 : k2 + k] * torch.sin(theta)) @ randn(k, k, seed=5)
        B = qb @ randn(k2, k2, seed=6)
    ours = principal_angles(A, B)
    np.testing.assert_allclose(ours.numpy(), scipy_angles(A, B), rtol=0, atol=1e-8)
    # The arccos formula would return 0 or ~2e-8 here; the sine formula keeps ~7 digits.
    np.testing.assert_allclose(ours.numpy(), theta.numpy(), rtol=1e-4)


def test_principal_angles_identical_and_orthogonal():
    A = randn(25, 4, seed=7)
    assert principal_angles(A, A).abs().max() < 1e-12
    assert principal_angles(A, A @ randn(4, 4, seed=8)).abs().max() < 1e-12
    basis = haar(25, seed=9)
    ortho = principal_angles(basis[:, :4], basis[:, 4:10])
    np.testing.assert_allclose(ortho.numpy(), np.full(4, math.pi / 2), rtol=0, atol=1e-12)


def test_principal_angles_invariant_to_change_of_basis():
    A, B = randn(30, 6, seed=10), randn(30, 4, seed=11)
    G = randn(6, 6, seed=12) + 3 * torch.eye(6, dtype=F64)
    torch.testing.assert_close(principal_angles(A @ G, B), principal_angles(A, B), rtol=0, atol=1e-10)


def test_principal_angles_float32_input_returns_float64():
    A, B = randn(10, 3, seed=13), randn(10, 2, seed=14)
    out = principal_angles(A.float(), B.float())
    assert out.dtype == F64
    np.testing.assert_allclose(out.numpy(), scipy_angles(A.float().double(), B.float().double()), atol=1e-8)


def test_orthonormal_basis_spans_top_singular_space():
    g = gen(15)
    U = haar(12, seed=16)[:, :5]
    M = U * torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0], dtype=F64) @ torch.randn(5, 40, generator=g, dtype=F64)
    Q = orthonormal_basis(M, k=5)
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    assert principal_angles(Q, U).max() < 1e-10
    assert orthonormal_basis(M).shape == (12, 5)  # default: numerical rank
    Q1 = orthonormal_basis(M, k=1)
    top = torch.linalg.svd(M)[0][:, :1]
    assert abs(float((Q1.T @ top).abs().squeeze()) - 1) < 1e-12


# ----------------------------------------------------------------- Procrustes


def test_procrustes_recovers_planted_rotation():
    X = randn(300, 16, seed=20)
    R = haar(16, seed=21)
    Y = X @ R + 1e-9 * randn(300, 16, seed=22)
    fit = procrustes(X, Y)
    assert torch.linalg.norm(fit.rotation - R) < 1e-6
    assert fit.error < 1e-6
    fit2 = procrustes(X, 2.5 * X @ R)
    assert abs(float(fit2.scale) - 2.5) < 1e-10
    assert fit2.scaled_error < 1e-10
    assert fit2.error > 0.5  # unscaled residual ||XR - 2.5XR|| / ||2.5XR|| = 0.6


def test_procrustes_matches_scipy():
    X, Y = randn(100, 8, seed=23), randn(100, 8, seed=24)
    fit = procrustes(X, Y)
    R_scipy, _ = scipy.linalg.orthogonal_procrustes(X.numpy(), Y.numpy())
    np.testing.assert_allclose(fit.rotation.numpy(), R_scipy, rtol=0, atol=1e-8)
    resid = np.linalg.norm(X.numpy() @ R_scipy - Y.numpy()) / np.linalg.norm(Y.numpy())
    assert abs(float(fit.error) - resid) < 1e-12


@pytest.mark.parametrize("center", [False, True])
def test_procrustes_streaming_equals_full_batch(center):
    X = randn(400, 10, seed=25) + 30.0
    Y = (X - 30.0) @ haar(10, seed=26) * 1.7 + 0.3 * randn(400, 10, seed=27) - 12.0
    full = procrustes(X, Y, center=center)
    acc, other = Moments(2, [(0, 1)], variances=True), Moments(2, [(0, 1)], variances=True)
    stream(acc, [X[:61], Y[:61]], [1, 7, 50, 3])
    stream(other, [X[61:], Y[61:]], [139, 200])
    res = fit_from(acc.merge(restored(other)), center)
    assert acc.n == 400
    for name in ("rotation", "scale", "error", "scaled_error"):
        torch.testing.assert_close(getattr(res, name), getattr(full, name), rtol=0, atol=1e-10, msg=name)


# ----------------------------------------------------------------- CKA


def np_cka_biased(X: torch.Tensor, Y: torch.Tensor) -> float:
    x, y = X.numpy(), Y.numpy()
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_hsic_u(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The n x n formula of Song et al. 2012, written independently with numpy."""
    x, y = X.numpy(), Y.numpy()
    n = x.shape[0]
    K, L = x @ x.T, y @ y.T
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    return (
        np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ K @ L @ one
    ) / (n * (n - 3))


def np_cka_u(X: torch.Tensor, Y: torch.Tensor) -> float:
    return np_hsic_u(X, Y) / math.sqrt(np_hsic_u(X, X) * np_hsic_u(Y, Y))


def related(seed: int, n: int = 120, d1: int = 12, d2: int = 9):
    X = randn(n, d1, seed=seed)
    Y = X @ randn(d1, d2, seed=seed + 1) + 2.0 * randn(n, d2, seed=seed + 2)
    return X, Y


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_self_is_one_and_matches_reference(debiased):
    X, Y = related(30)
    assert abs(float(linear_cka(X, X, debiased=debiased)) - 1) < 1e-12
    ref = np_cka_u(X, Y) if debiased else np_cka_biased(X, Y)
    for method in ("auto", "gram", "features"):
        assert abs(float(linear_cka(X, Y, debiased=debiased, method=method)) - ref) < 1e-10


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances(debiased):
    X, Y = related(31)
    base = linear_cka(X, Y, debiased=debiased)
    Q = haar(X.shape[1], seed=32)
    for Xt in (X @ Q, 3.7 * X, X + 100.0 * randn(1, X.shape[1], seed=33)):
        assert abs(float(linear_cka(Xt, Y, debiased=debiased) - base)) < 1e-10
    assert abs(float(linear_cka(X, Y, debiased=debiased) - linear_cka(Y, X, debiased=debiased))) < 1e-12


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_not_invariant_to_general_linear_map(debiased):
    # Y is two of X's ten isotropic directions; stretching those two by 100 makes X look like Y.
    X = randn(500, 10, seed=34)
    Y = X[:, :2]
    A = torch.diag(torch.tensor([100.0, 100.0] + [1.0] * 8, dtype=F64))
    before, after = linear_cka(X, Y, debiased=debiased), linear_cka(X @ A, Y, debiased=debiased)
    assert after - before > 0.05
    assert abs(float(before) - 2 / math.sqrt(20)) < 0.1 and float(after) > 0.99


def test_cka_gram_free_path_equals_gram_path():
    X, Y = randn(50, 7, seed=35) + 5.0, randn(50, 4, seed=36)
    Y = Y + X[:, :4]
    hg = unbiased_hsic_matrix([X, Y], method="gram")
    hf = unbiased_hsic_matrix([X, Y], method="features")
    torch.testing.assert_close(hf, hg, rtol=1e-10, atol=0)
    assert abs(float(hf[0, 1]) - np_hsic_u(X, Y)) < 1e-10 * abs(np_hsic_u(X, Y))
    for debiased in (False, True):
        a = linear_cka(X, Y, debiased=debiased, method="gram")
        b = linear_cka(X, Y, debiased=debiased, method="features")
        assert abs(float(a - b)) < 1e-10


def test_debiased_cka_of_independent_gaussians_is_near_zero():
    biased, unbiased = [], []
    for seed in range(10):
        X, Y = randn(256, 768, seed=100 + seed), randn(256, 768, seed=200 + seed)
        biased.append(float(linear_cka(X, Y)))
        unbiased.append(float(linear_cka(X, Y, debiased=True)))
    assert abs(np.mean(unbiased)) < 0.01
    assert min(biased) > 0.3


def test_cka_streaming_biased_equals_full_batch():
    X, Y = related(40, n=600)
    X = X + 50.0
    sizes = [1, 2, 3, 97, 5, 250, 11, 231]
    acc = stream(Moments(2, pairs(2)), [X, Y], sizes)
    assert acc.n == 600
    cka = linear_cka_from_moments(acc.comoment(0, 1), acc.comoment(0, 0), acc.comoment(1, 1))
    assert abs(float(cka - linear_cka(X, Y))) < 1e-10
    assert abs(float(cka) - np_cka_biased(X, Y)) < 1e-10


def test_cka_streaming_minibatch_debiased_and_merge():
    X, Y = related(41, n=300)
    sizes = [4, 60, 36, 100, 100]
    hxy, hxx, hyy = [], [], []
    start = 0
    for s in sizes:
        x, y = X[start : start + s], Y[start : start + s]
        hxy.append(np_hsic_u(x, y))
        hxx.append(np_hsic_u(x, x))
        hyy.append(np_hsic_u(y, y))
        start += s
    expected = np.mean(hxy) / math.sqrt(np.mean(hxx) * np.mean(hyy))
    assert abs(float(streamed_debiased([X, Y], sizes)[0, 1]) - expected) < 1e-10
    # Two shares (as two processes would hold them): HSIC sums add, moments merge.
    part_a = stream(Moments(2, pairs(2)), [X[:64], Y[:64]], [4, 60])
    part_b = stream(Moments(2, pairs(2)), [X[64:], Y[64:]], [36, 100, 100])
    h_a = unbiased_hsic_matrix([X[:4], Y[:4]]) + unbiased_hsic_matrix([X[4:64], Y[4:64]], method="gram")
    h_b = sum(unbiased_hsic_matrix([X[a:b], Y[a:b]], method="gram") for a, b in [(64, 100), (100, 200), (200, 300)])
    merged_h = cka_from_hsic((h_a + h_b) / 5, "the mean unbiased HSIC", ["X", "Y"])
    assert abs(float(merged_h[0, 1]) - expected) < 1e-10
    merged = part_a.merge(restored(part_b))
    cka = linear_cka_from_moments(merged.comoment(0, 1), merged.comoment(0, 0), merged.comoment(1, 1))
    assert abs(float(cka) - float(linear_cka(X, Y))) < 1e-10
    # A single minibatch reproduces the one-shot debiased CKA.
    assert abs(float(streamed_debiased([X, Y], [300])[0, 1] - linear_cka(X, Y, debiased=True))) < 1e-10


def test_cka_matrix_accumulator_equals_pairwise_calls():
    n, widths = 240, [8, 12, 8, 5]
    base = randn(n, 6, seed=50)
    layers = [
        base @ randn(6, d, seed=51 + i) + 0.5 * i * randn(n, d, seed=60 + i) + 10 * i for i, d in enumerate(widths)
    ]
    sizes = [40, 13, 67, 120]
    acc = stream(Moments(len(widths), pairs(len(widths))), layers, sizes)
    debiased = streamed_debiased(layers, sizes)

    def biased_matrix(m: Moments) -> torch.Tensor:
        return torch.stack([torch.stack([linear_cka_from_moments(m.comoment(i, j), m.comoment(i, i), m.comoment(j, j))
                                         for j in range(4)]) for i in range(4)])

    biased = biased_matrix(acc)
    assert biased.shape == (4, 4) and biased.dtype == F64
    for i in range(4):
        for j in range(4):
            assert abs(float(biased[i, j] - linear_cka(layers[i], layers[j]))) < 1e-10
            single = streamed_debiased([layers[i], layers[j]], sizes)
            assert abs(float(debiased[i, j] - single[0, 1])) < 1e-10
    torch.testing.assert_close(torch.diagonal(debiased), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    one_shot = cka_from_hsic(unbiased_hsic_matrix(layers, method="gram"), "HSIC_u", list("abcd"))
    for i, j in [(0, 1), (1, 3), (2, 3)]:
        expected = linear_cka(layers[i], layers[j], debiased=True)
        assert abs(float(one_shot[i, j] - expected)) < 1e-10
    torch.testing.assert_close(biased_matrix(restored(acc)), biased, rtol=0, atol=1e-14)


# ----------------------------------------------------------------- covariance


def test_covariance_streaming_matches_numpy_with_large_mean():
    g = gen(70)
    mix = torch.randn(6, 6, generator=g, dtype=F64)
    X = 1e4 + 1e-2 * torch.randn(1000, 6, generator=g, dtype=F64) @ mix
    expected = np.cov(X.numpy(), rowvar=False)
    acc = stream(Moments(1, [(0, 0)], variances=True), [X], [1, 2, 300, 17, 480, 200])
    scale = np.abs(expected).max()
    assert acc.n == 1000
    np.testing.assert_allclose(acc.cov(0).numpy(), expected, rtol=0, atol=1e-10 * scale)
    expected0 = np.cov(X.numpy(), rowvar=False, ddof=0)
    np.testing.assert_allclose(acc.cov(0, ddof=0).numpy(), expected0, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(acc.means[0].numpy(), X.numpy().mean(0), rtol=1e-14)
    # the per-dimension spreads are the covariance's diagonal, through the same merge
    np.testing.assert_allclose((acc.sq_sums[0] / 999).numpy(), np.diag(expected), rtol=0, atol=1e-10 * scale)
    # The naive sum-of-products formula loses ~4 digits here; make sure the test would see that.
    naive = (X.T @ X - 1000 * torch.outer(X.mean(0), X.mean(0))) / 999
    assert np.abs(naive.numpy() - expected).max() > 1e-10 * scale


def test_covariance_merge_and_state_dict():
    X = randn(500, 5, seed=71) * 3 + 7
    single = stream(Moments(1, [(0, 0)]), [X], [500])
    a = stream(Moments(1, [(0, 0)]), [X], [123])
    b = stream(Moments(1, [(0, 0)]), [X[123:]], [277, 100])
    a.merge(restored(b))
    assert a.n == 500
    torch.testing.assert_close(a.cov(0), single.cov(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.means[0], single.means[0], rtol=0, atol=1e-12)
    empty = Moments(1, [(0, 0)])
    empty.merge(a)
    torch.testing.assert_close(empty.cov(0), single.cov(0), rtol=0, atol=1e-12)
    # merging an empty store changes nothing, and an empty state round-trips
    before = a.cov(0)
    torch.testing.assert_close(a.merge(Moments(1, [(0, 0)])).cov(0), before, rtol=0, atol=0)
    assert restored(Moments(1, [(0, 0)])).n == 0


def test_principal_subspace_recovers_planted_directions():
    Q = haar(10, seed=72)
    scales = torch.tensor([10.0, 7.0, 5.0] + [0.1] * 7, dtype=F64)
    X = randn(2000, 10, seed=73) * scales @ Q.T
    acc = Moments(1, [(0, 0)])
    acc.update([X])
    top = principal_subspace(acc.cov(0), 3)
    assert top.shape == (10, 3)
    assert principal_angles(top, Q[:, :3]).max() < 0.05
    assert principal_angles(top[:, :1], Q[:, :1]).max() < 0.05


# ----------------------------------------------------------------- null baselines


@pytest.mark.parametrize("d,k1,k2", [(12, 3, 2), (6, 4, 3)])
def test_random_subspace_angles_match_independent_monte_carlo(d, k1, k2):
    null = random_subspace_angles(d, k1, k2, n_samples=4000, generator=gen(80))
    m = min(k1, k2)
    assert null.samples.shape == (4000, m) and null.mean.shape == (m,) and null.std.shape == (m,)
    rng = np.random.default_rng(81)
    ref = []
    for _ in range(2000):
        a = scipy.stats.ortho_group.rvs(d, random_state=rng)[:, :k1]
        b = scipy.stats.ortho_group.rvs(d, random_state=rng)[:, :k2]
        ref.append(np.sort(scipy.linalg.subspace_angles(a, b)))
    ref = np.array(ref)
    se = np.sqrt(null.std.numpy() ** 2 / 4000 + ref.std(0) ** 2 / 2000)
    assert np.all(np.abs(null.mean.numpy() - ref.mean(0)) < 5 * se + 1e-3)
    np.testing.assert_allclose(null.std.numpy(), ref.std(0), rtol=0.15, atol=2e-3)
    if k1 + k2 > d:  # forced intersection: k1 + k2 - d angles are exactly zero
        assert null.samples[:, : k1 + k2 - d].abs().max() < 1e-7


def test_random_variance_fraction_null():
    d, k = 20, 5
    assert float(random_subspace_variance_fraction(d, k)) == k / d
    iso = variance_fraction_null(torch.eye(d, dtype=F64), k, n_samples=50, generator=gen(82))
    assert abs(float(iso.mean) - k / d) < 1e-12 and float(iso.std) < 1e-12
    assert abs(float(variance_fraction(torch.eye(d, dtype=F64), randn(d, k, seed=83))) - k / d) < 1e-12
    spectrum = torch.tensor([50.0, 20.0, 5.0] + [1.0] * (d - 3), dtype=F64)
    Q = haar(d, seed=84)
    cov = Q @ torch.diag(spectrum) @ Q.T
    null = variance_fraction_null(cov, k, n_samples=3000, generator=gen(85))
    assert null.samples.shape == (3000,)
    assert abs(float(null.mean) - k / d) < 5 * float(null.std) / math.sqrt(3000)
    assert float(null.std) > 0.02  # a spiky spectrum spreads the fraction


def test_variance_fraction_of_planted_subspace_is_exact():
    d = 16
    spectrum = torch.linspace(10.0, 1.0, d, dtype=F64)
    Q = haar(d, seed=86)
    cov = Q @ torch.diag(spectrum) @ Q.T
    basis = Q[:, :4] @ randn(4, 4, seed=87)  # any spanning set, not orthonormal
    expected = float(spectrum[:4].sum() / spectrum.sum())
    out = variance_fraction(cov, basis)
    assert out.dtype == F64 and out.ndim == 0
    assert abs(float(out) - expected) < 1e-12
    assert abs(float(variance_fraction(cov.float(), basis)) - expected) < 1e-5


# ----------------------------------------------------------------- bad input


def _small_cov_acc(n: int) -> Moments:
    acc = Moments(1, [(0, 0)])
    acc.update([randn(n, 3, seed=90)])
    return acc


def _widths_changed():
    acc = Moments(1, [(0, 0)])
    acc.update([randn(4, 2)])
    acc.update([randn(4, 3)])


def _load_other_blocks():
    other = Moments(2, [(0, 0)])
    other.update([randn(5, 2), randn(5, 2)])
    Moments(2, [(0, 1)]).load_state_dict(other.state_dict())


def _nan(shape):
    x = randn(*shape, seed=91)
    x[1, 0] = float("nan")
    return x


BAD_INPUTS = [
    ("pa-1d", lambda: principal_angles(randn(5, seed=1), randn(5, 2, seed=2)), ValueError, "(5,)"),
    ("pa-d-mismatch", lambda: principal_angles(randn(5, 2, seed=1), randn(6, 2, seed=2)), ValueError, "d=6"),
    ("pa-zero-cols", lambda: principal_angles(randn(5, 0, seed=1), randn(5, 2, seed=2)), ValueError, "(5, 0)"),
    ("pa-nan", lambda: principal_angles(_nan((5, 2)), randn(5, 2, seed=2)), ValueError, "nan"),
    ("pa-inf", lambda: principal_angles(randn(5, 2, seed=2), _nan((5, 2)) * 0 + float("inf")), ValueError, "inf"),
    (
        "pa-rank",
        lambda: principal_angles(randn(6, 1, seed=1).repeat(1, 3), randn(6, 2, seed=2)),
        ValueError,
        "numerical rank 1",
    ),
    ("pa-numpy", lambda: principal_angles(np.ones((3, 2)), randn(3, 1, seed=2)), TypeError, "numpy.ndarray"),
    ("pa-int", lambda: principal_angles(torch.ones(3, 2, dtype=torch.long), randn(3, 1)), TypeError, "torch.int64"),
    ("ob-k-big", lambda: orthonormal_basis(randn(4, 9, seed=1), k=5), ValueError, "got 5"),
    ("ob-k-rank", lambda: orthonormal_basis(randn(6, 1, seed=1).repeat(1, 3), k=2), ValueError, "k=2"),
    ("ob-k-float", lambda: orthonormal_basis(randn(4, 9, seed=1), k=2.0), TypeError, "2.0"),
    ("cka-n", lambda: linear_cka(randn(3, 2), randn(3, 2), debiased=True), ValueError, "n=3"),
    ("cka-rows", lambda: linear_cka(randn(10, 2), randn(11, 2)), ValueError, "n=11"),
    ("cka-const", lambda: linear_cka(torch.ones(10, 2, dtype=F64) * 5, randn(10, 2)), ValueError, "(10, 2)"),
    ("cka-method", lambda: linear_cka(randn(10, 2), randn(10, 2), method="fast"), ValueError, "'fast'"),
    ("cka-3d", lambda: linear_cka(randn(2, 5, 3), randn(10, 2)), ValueError, "(2, 5, 3)"),
    ("pro-d", lambda: procrustes(randn(10, 3), randn(10, 4)), ValueError, "d=4"),
    ("pro-zero", lambda: procrustes(torch.zeros(10, 3, dtype=F64), randn(10, 3)), ValueError, "all zeros"),
    ("rsa-k", lambda: random_subspace_angles(5, 6, 2), ValueError, "got 6"),
    ("rsa-gen", lambda: random_subspace_angles(5, 2, 2, generator=0), TypeError, "int"),
    ("rsvf-k", lambda: random_subspace_variance_fraction(5, 7), ValueError, "got 7"),
    ("vf-asym", lambda: variance_fraction(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), randn(2, 1)), ValueError, "2"),
    ("vf-d", lambda: variance_fraction(torch.eye(3), randn(4, 1)), ValueError, "(4, 1)"),
    ("vf-trace", lambda: variance_fraction(torch.zeros(3, 3), randn(3, 1)), ValueError, "0.0"),
    ("vfn-k", lambda: variance_fraction_null(torch.eye(3), 4), ValueError, "got 4"),
    ("cov-nan", lambda: Moments(1, [(0, 0)]).update([_nan((4, 2))]), ValueError, "nan"),
    ("cov-width", _widths_changed, ValueError, "widths [3]"),
    ("cov-few", lambda: _small_cov_acc(1).cov(0), ValueError, "n=1"),
    ("cov-empty", lambda: Moments(1, [(0, 0)]).comoment(0, 0), ValueError, "n=0"),
    ("cov-unkept", lambda: _small_cov_acc(4).comoment(0, 1), ValueError, "is not kept"),
    ("ps-k-d", lambda: principal_subspace(_small_cov_acc(10).cov(0), 4), ValueError, "got 4"),
    ("ps-k-rank", lambda: principal_subspace(_small_cov_acc(2).cov(0), 2), ValueError, "numerical rank 1"),
    ("hsic-small", lambda: unbiased_hsic_matrix([randn(3, 2), randn(3, 2)]), ValueError, "n=3"),
    ("hsic-rows", lambda: unbiased_hsic_matrix([randn(5, 2), randn(6, 2)]), ValueError, "[5, 6]"),
    ("hsic-nan", lambda: unbiased_hsic_matrix([_nan((5, 2)), randn(5, 2)]), ValueError, "nan"),
    ("cka-hsic-zero", lambda: cka_from_hsic(torch.zeros(2, 2, dtype=F64), "HSIC", ["X", "Y"]), ValueError, "X"),
    ("mom-nan", lambda: Moments(2, [(0, 1)]).update([_nan((5, 2)), randn(5, 2)]), ValueError, "nan"),
    ("mom-count", lambda: Moments(3).update([randn(5, 2)] * 2), ValueError, "got 2"),
    ("mom-type", lambda: Moments(2).update("xs"), TypeError, "str"),
    ("mom-rows", lambda: Moments(2).update([randn(5, 2), randn(6, 2)]), ValueError, "[5, 6]"),
    ("mom-pair", lambda: Moments(2, [(0, 2)]), ValueError, "(0, 2)"),
    ("mom-merge", lambda: Moments(2, [(0, 1)]).merge(Moments(2, [(0, 0)])), ValueError, "(0, 0)"),
    ("pro-mom-zero", lambda: procrustes_from_moments(torch.zeros(2, 2), torch.tensor(0.0), torch.tensor(1.0), n=0),
     ValueError, "all zeros"),
    ("mom-load", _load_other_blocks, ValueError, "0_1"),
]


@pytest.mark.parametrize("call,exc,needle", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_with_received_value(call, exc, needle):
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value)


def test_accumulator_errors_name_the_minimum():
    with pytest.raises(ValueError, match="at least 4 rows"):
        unbiased_hsic_matrix([randn(3, 2), randn(3, 2)])
    acc = Moments(2, [(0, 1)])
    acc.update([randn(1, 2), randn(1, 2)])
    with pytest.raises(ValueError, match=r"at least 2 row\(s\); saw n=1"):
        acc.cov(0, 1)
    with pytest.raises(ValueError, match=r"block \(0, 0\) is not kept"):
        acc.comoment(0, 0)
    with pytest.raises(ValueError, match=r"d=4.*project"):
        procrustes(randn(10, 3), randn(10, 4))


# ----------------------------------------------------------------- deprecated names


def test_alignment_math_names_still_import_and_warn():
    """The old module re-exports every function; its accumulators warn and equal the new store."""
    for name in am.__all__:
        assert hasattr(am, name), name
    assert am.linear_cka is linear_cka and am.procrustes is procrustes and am.haar_bases is st.haar_bases
    X = randn(120, 5, seed=95) + 3.0
    Y = X @ haar(5, seed=96) + 0.1 * randn(120, 5, seed=97)
    with pytest.warns(DeprecationWarning, match="CovarianceAccumulator"):
        cov = am.CovarianceAccumulator(5)
    cov.update(X[:50])
    cov.update(X[50:])
    torch.testing.assert_close(cov.cov(), torch.cov(X.T), rtol=0, atol=1e-12)
    with pytest.warns(DeprecationWarning, match="ProcrustesAccumulator"):
        fits = [am.ProcrustesAccumulator(center=c) for c in (False, True)]
    for center, fit in zip((False, True), fits):
        fit.update(X[:70], Y[:70])
        fit.update(X[70:], Y[70:])
        full = procrustes(X, Y, center=center)
        torch.testing.assert_close(fit.result().rotation, full.rotation, rtol=0, atol=1e-10)
        assert abs(float(fit.result().error**2 - full.error**2)) < 1e-12
    with pytest.warns(DeprecationWarning, match="CKAAccumulator"):
        cka = am.CKAAccumulator()
    cka.update(X[:60], Y[:60])
    cka.update(X[60:], Y[60:])
    assert abs(float(cka.result() - linear_cka(X, Y))) < 1e-12
    assert abs(float(cka.result(debiased=True) - streamed_debiased([X, Y], [60, 60])[0, 1])) < 1e-12
    with pytest.warns(DeprecationWarning, match="CKAMatrixAccumulator"):
        matrix = am.CKAMatrixAccumulator(2)
    matrix.load_state_dict(cka.state_dict())
    torch.testing.assert_close(matrix.result(debiased=True)[0, 1], cka.result(debiased=True), rtol=0, atol=0)
