"""Tests for the model-level alignment suite (tl_latentspaces.alignment).

The suite's numbers are checked against the math primitives applied to the concatenated
activations, streaming is checked against one full batch in float64, planted structure (a layer
that *is* the embedding) is recovered, and the user's hooks are respected and left in place.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from conftest import GPT_LIKE, LLAMA_LIKE, TL_MAJOR, build_bridge, build_hooked
from tl_latentspaces import hook_counts
from tl_latentspaces.alignment import AlignmentAccumulator, alignment_from_cache, alignment_suite
from tl_latentspaces.stats import (
    binned_quantiles,
    haar_bases,
    integer_quantiles,
    linear_cka,
    orthonormal_basis,
    principal_angles,
    procrustes,
    random_subspace_angles,
    variance_fraction,
    variance_fraction_null,
)
from tl_latentspaces.runner import stream_residuals
from tl_latentspaces.lenses import embedding_lens
from tl_latentspaces.model import ModelAccess

F64 = torch.float64
FAST = dict(progress=False, n_null_samples=50)


def build(cfg: dict, dtype: torch.dtype = torch.float32):
    """A tiny model of the kind this TransformerLens line serves best (bridge on 4.x)."""
    model = build_bridge(cfg) if TL_MAJOR >= 4 else build_hooked(cfg)
    return model.to(dtype) if dtype != torch.float32 else model


def corpus(n_seq: int = 12, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def collect(model, ids: torch.Tensor) -> torch.Tensor:
    """The residual stack of ``ids`` in one forward pass: ``[entry, batch, seq, d]``."""
    names = dict(ModelAccess(model).stack_sites())
    return torch.cat([s for _, s in stream_residuals(model, ids, names, batch_size=len(ids), progress=False)], 1)


def tensors(obj, prefix=""):
    """Every tensor of a result, by dotted name."""
    out = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif hasattr(value, "__dataclass_fields__"):
            out.update(tensors(value, prefix + name + "."))
    return out


def assert_results_close(a, b, rtol=1e-10, atol=1e-10):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        x, y = ta[name], tb[name]
        if x.dtype in (torch.int64, torch.int32):
            assert torch.equal(x, y), name
            continue
        if name.startswith("procrustes."):
            # Streamed Procrustes errors are sqrt(|X|^2 + |Y|^2 - 2 tr S) / |Y|: the statistics agree
            # to rounding, but a near-perfect fit's square root turns 1e-16 into 1e-8. Compare squares.
            x, y = x.square(), y.square()
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True, msg=name)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: on a loaded machine a second OpenMP thread's spin-wait costs 1000x (16 ms vs 14 us
    per 16 x 64 matmul measured here), so these tests run single-threaded, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ streaming and consistency


@pytest.mark.parametrize("cfg", [LLAMA_LIKE, GPT_LIKE], ids=["llama", "gpt"])
@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
def test_streaming_equals_one_full_batch_in_float64(cfg, standardize):
    model = build(cfg, F64)
    ids = corpus()
    opts = dict(k=6, standardize=standardize, layer_cka_biased=True, cka_block_sequences=4, **FAST)
    full = alignment_suite(model, ids, batch_size=len(ids), **opts)
    # batch sizes that split blocks of 4 sequences across forward passes, and single sequences
    for batch_size in (1, 5):
        streamed = alignment_suite(model, ids, batch_size=batch_size, **opts)
        assert_results_close(streamed, full)
    assert full.n_tokens == 12 * 14 and full.cka.n_blocks == 3


@pytest.mark.parametrize("center", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
def test_suite_equals_primitives_on_the_concatenated_activations(tiny, center, standardize):
    ids = corpus(n_seq=6, seq_len=12, seed=1)
    stack = collect(tiny, ids)
    access = ModelAccess(tiny)
    E, d, k, skip = stack.shape[0], access.d_model, 5, 2
    X = stack[:, :, skip:].reshape(E, -1, d).to(F64)
    tok = ids[:, skip:].reshape(-1)
    Y = access.W_E.detach().to(F64)[tok]
    scale = None
    if standardize:
        scale = torch.cat([X, Y[None]]).std(1, unbiased=False)
    acc = AlignmentAccumulator(tiny, k=k, skip_positions=skip, center=center, standardize_scale=scale,
                               cka_block_sequences=6, layer_cka_biased=True)
    acc.update(ids, stack)
    r = acc.result(n_null_samples=20)

    B_E = orthonormal_basis(access.W_E.detach().to(F64).T, k)
    B_U = orthonormal_basis(access.W_U.detach().to(F64), k)
    Xs = X if scale is None else X / scale[:E, None]
    Ys = Y if scale is None else Y / scale[E]
    for e in range(E):
        m = X[e].mean(0)
        c = (X[e] - m).T @ (X[e] - m) / X.shape[1]
        second = c if center else c + torch.outer(m, m)
        q = torch.linalg.eigh(second).eigenvectors[:, -k:]
        torch.testing.assert_close(r.angles.embed[e], principal_angles(q, B_E), rtol=0, atol=1e-7)
        torch.testing.assert_close(r.angles.unembed[e], principal_angles(q, B_U), rtol=0, atol=1e-7)
        torch.testing.assert_close(r.variance.embed[e], variance_fraction(second, B_E), rtol=1e-10, atol=0)
        torch.testing.assert_close(r.variance.unembed[e], variance_fraction(second, B_U), rtol=1e-10, atol=0)
        torch.testing.assert_close(r.cka.embed[e], linear_cka(Xs[e], Ys), rtol=1e-10, atol=0)
        # one block holds every sequence, so the minibatch estimator is the plain debiased CKA
        torch.testing.assert_close(r.cka.embed_debiased[e], linear_cka(Xs[e], Ys, debiased=True), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r.cka.final[e], linear_cka(Xs[e], Xs[-1]), rtol=1e-10, atol=0)
        for target, err, scaled in (
            (Ys, r.procrustes.embed_error, r.procrustes.embed_scaled_error),
            (Xs[-1], r.procrustes.final_error, r.procrustes.final_scaled_error),
        ):
            if target is Xs[-1] and e == E - 1:
                assert float(err[e]) == 0.0 and float(scaled[e]) == 0.0
                continue
            # squares: the streamed error of a near-perfect fit is sqrt(rounding), see assert_results_close
            fit = procrustes(Xs[e], target, center=center)
            torch.testing.assert_close(err[e] ** 2, fit.error**2, rtol=1e-9, atol=1e-13)
            torch.testing.assert_close(scaled[e] ** 2, fit.scaled_error**2, rtol=1e-9, atol=1e-13)
        if e < E - 1:
            torch.testing.assert_close(r.cka.next[e], linear_cka(Xs[e], Xs[e + 1]), rtol=1e-10, atol=0)
            fit = procrustes(Xs[e], Xs[e + 1], center=center)
            torch.testing.assert_close(r.procrustes.next_error[e] ** 2, fit.error**2, rtol=1e-9, atol=1e-13)
        for f in range(E):
            torch.testing.assert_close(r.cka.layer_biased[e, f], linear_cka(Xs[e], Xs[f]), rtol=1e-10, atol=0)
            torch.testing.assert_close(
                r.cka.layer_debiased[e, f], linear_cka(Xs[e], Xs[f], debiased=True), rtol=1e-9, atol=1e-12
            )
    assert math.isnan(float(r.cka.next[-1])) and math.isnan(float(r.procrustes.next_error[-1]))
    cos = torch.nn.functional.cosine_similarity(X, Y[None], dim=-1)
    torch.testing.assert_close(r.drift.cos_mean, cos.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.drift.cos_std, cos.std(1, unbiased=False), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("tile_cols", [2048, 7], ids=["one-tile", "tiles-of-7"])
def test_drift_ranks_are_the_embedding_lens_own_ranks(tiny, tokens, tile_cols, monkeypatch):
    from tl_latentspaces import readout

    monkeypatch.setattr(readout, "TILE_COLS", tile_cols)
    lens = embedding_lens(tiny, tokens)
    skip, every = 1, 3
    for rank_every in (1, every):
        r = alignment_suite(tiny, tokens, k=4, skip_positions=skip, rank_every=rank_every, **FAST)
        own = lens.own_ranks[:, :, skip::rank_every].reshape(len(lens.labels), -1)
        expected = torch.stack([torch.bincount(o, minlength=100) for o in own])
        assert torch.equal(r.drift.rank_hist, expected)
        assert r.drift.n_rank == own.shape[1] and r.drift.n_cos == tokens.shape[0] * (tokens.shape[1] - skip)
    cos = lens.own_scores[:, :, skip:].reshape(len(lens.labels), -1).double()
    torch.testing.assert_close(r.drift.cos_mean, cos.mean(1), rtol=0, atol=1e-5)


def test_cache_path_equals_the_hook_path(tiny, tokens):
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
    from_cache = alignment_from_cache(tiny, cache, tokens, k=4, **FAST)
    from_hooks = alignment_suite(tiny, tokens, k=4, **FAST)
    assert_results_close(from_cache, from_hooks, rtol=1e-6, atol=1e-6)


def test_merge_and_state_dict_reproduce_the_single_stream():
    model = build(LLAMA_LIKE, F64)
    ids = corpus()
    stack = collect(model, ids)
    opts = dict(k=6, cka_block_sequences=4, layer_cka_biased=True)
    whole = AlignmentAccumulator(model, **opts)
    whole.update(ids, stack)
    first, second = AlignmentAccumulator(model, **opts), AlignmentAccumulator(model, **opts)
    first.update(ids[:8], stack[:, :8])  # ends on a block boundary
    second.update(ids[8:], stack[:, 8:])
    assert_results_close(first.merge(second).result(n_null_samples=20), whole.result(n_null_samples=20))

    partial = AlignmentAccumulator(model, **opts)
    partial.update(ids[:6], stack[:, :6])  # half a block pending
    buffer = io.BytesIO()
    torch.save(partial.state_dict(), buffer)
    buffer.seek(0)
    restored = AlignmentAccumulator(model, **opts)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for acc in (partial, restored):
        acc.update(ids[6:], stack[:, 6:])
    assert_results_close(restored.result(n_null_samples=20), whole.result(n_null_samples=20))
    assert_results_close(partial.result(n_null_samples=20), whole.result(n_null_samples=20))

    # empty(): the corpus runner's factory. Shares the weight subspaces and lens, starts from nothing,
    # and leaves the accumulator it came from untouched.
    fresh = partial.empty()
    assert fresh.basis_embed is partial.basis_embed and fresh.lens is partial.lens
    assert fresh.n_tokens == 0 and partial.n_tokens == whole.n_tokens and fresh.settings == whole.settings
    fresh.update(ids, stack)
    assert_results_close(fresh.result(n_null_samples=20), whole.result(n_null_samples=20))
    assert_results_close(partial.result(n_null_samples=20), whole.result(n_null_samples=20))


def test_result_leaves_the_accumulator_usable():
    model = build(LLAMA_LIKE, F64)
    ids = corpus()
    stack = collect(model, ids)
    acc = AlignmentAccumulator(model, k=6)
    acc.update(ids[:6], stack[:, :6])
    acc.result(n_null_samples=20)  # closes the pending half block on a copy only
    acc.update(ids[6:], stack[:, 6:])
    whole = AlignmentAccumulator(model, k=6)
    whole.update(ids, stack)
    assert_results_close(acc.result(n_null_samples=20), whole.result(n_null_samples=20))


# ------------------------------------------------------------------ planted structure


def test_planted_layer0_is_the_embedding():
    """A rotary model has no positional embedding: its ``0_pre`` is exactly ``W_E[token]``."""
    model = build(LLAMA_LIKE)
    ids = corpus(n_seq=16)
    for standardize in (False, True):
        r = alignment_suite(model, ids, k=6, standardize=standardize, **FAST)
        assert abs(float(r.cka.embed[0]) - 1) < 1e-10
        assert abs(float(r.cka.embed_debiased[0]) - 1) < 1e-10
        assert float(r.procrustes.embed_error[0]) < 1e-6 and float(r.procrustes.embed_scaled_error[0]) < 1e-6
        assert abs(float(r.drift.cos_mean[0]) - 1) < 1e-12 and float(r.drift.cos_std[0]) < 1e-6
        assert torch.all(r.drift.rank_quantiles[0] == 0) and float(r.drift.rank0_fraction[0]) == 1.0
        # deeper entries have moved away
        assert float(r.cka.embed[-1]) < 0.99 and float(r.drift.cos_mean[-1]) < 0.99


def test_gpt_like_layer0_is_embedding_plus_position():
    """Negative control: with a learned positional embedding ``0_pre`` is not ``W_E[token]``."""
    r = alignment_suite(build(GPT_LIKE), corpus(n_seq=16), k=6, **FAST)
    assert float(r.cka.embed[0]) < 0.99 and float(r.procrustes.embed_error[0]) > 0.01
    assert float(r.drift.cos_mean[0]) < 0.99


def test_planted_subspace_angles_and_variance():
    """Residuals confined to the top-k singular subspace of W_E: angles 0, variance fraction 1."""
    model = build(LLAMA_LIKE, F64)
    access = ModelAccess(model)
    k, E, d = 6, 4, 64
    basis = orthonormal_basis(access.W_E.detach().to(F64).T, k)
    g = torch.Generator().manual_seed(3)
    ids = corpus(n_seq=8)
    coords = torch.randn(E, 8, 16, k, generator=g, dtype=F64) * torch.linspace(3, 1, k, dtype=F64)
    stack = coords @ basis.T
    acc = AlignmentAccumulator(model, k=k)
    acc.update(ids, stack)
    r = acc.result(n_null_samples=50)
    assert float(r.angles.embed.max()) < 1e-6
    torch.testing.assert_close(r.angles.pk_embed, torch.ones(E, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(r.variance.embed, torch.ones(E, dtype=F64), rtol=0, atol=1e-10)
    assert abs(float(r.variance.null_mean) - k / d) < 1e-15
    # the random-subspace baseline is far from the planted alignment
    assert float(r.angles.null_mean[0]) > 0.5 and float(r.angles.null_pk_mean) < 0.3


# ------------------------------------------------------------------ null baselines


def test_null_baselines_equal_the_primitives():
    model = build(LLAMA_LIKE, F64)
    ids = corpus()
    stack = collect(model, ids)
    k, n_null, seed = 6, 64, 5
    acc = AlignmentAccumulator(model, k=k)
    acc.update(ids, stack)
    r = acc.result(n_null_samples=n_null, seed=seed)
    null = random_subspace_angles(64, k, k, n_samples=n_null, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(r.angles.null_mean, null.mean, rtol=0, atol=0)
    torch.testing.assert_close(r.angles.null_std, null.std, rtol=0, atol=0)
    pk = torch.cos(null.samples).square().sum(-1) / k
    torch.testing.assert_close(r.angles.null_pk_mean, pk.mean(), rtol=0, atol=0)
    X = stack[:, :, 2:].reshape(stack.shape[0], -1, 64).to(F64)
    for e in range(stack.shape[0]):
        c = torch.cov(X[e].T, correction=0)
        evals = torch.linalg.eigvalsh(c).clamp_min(0.0)
        ref = variance_fraction_null(torch.diag(evals), k, n_null, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(r.variance.null_std[e], ref.std, rtol=1e-8, atol=0)
    # Rotation invariance, which the spectrum shortcut relies on: the fraction of the full covariance
    # in Haar-random subspaces, computed directly, has the same law (checked statistically).
    c = torch.cov(X[2].T, correction=0)
    direct = torch.stack([variance_fraction(c, q) for q in haar_bases(2000, 64, k, torch.Generator().manual_seed(1))])
    shortcut = variance_fraction_null(c, k, 2000, torch.Generator().manual_seed(2))
    assert abs(float(direct.std()) / float(shortcut.std) - 1) < 0.1
    assert abs(float(direct.mean()) - k / 64) < 4 * float(direct.std()) / math.sqrt(2000)
    assert abs(float(shortcut.mean) - k / 64) < 4 * float(shortcut.std) / math.sqrt(2000)


@pytest.mark.skipif(TL_MAJOR < 4, reason="transformer_lens.tools.analysis exists from TransformerLens 4")
def test_projection_kernel_matches_transformer_lens():
    """Our projection kernel (mean squared cosine of the angles) equals TransformerLens 4's own."""
    from transformer_lens.tools.analysis.projection_kernel import orthonormal_subspace, projection_kernel

    model = build(LLAMA_LIKE, F64)
    ids = corpus()
    k, skip = 6, 2
    r = alignment_suite(model, ids, k=k, **FAST)
    access = ModelAccess(model)
    X = collect(model, ids)[:, :, skip:].reshape(len(r.labels), -1, access.d_model).to(F64)
    for basis, ours in ((orthonormal_basis(access.W_E.detach().to(F64).T, k), r.angles.pk_embed),
                        (orthonormal_basis(access.W_U.detach().to(F64), k), r.angles.pk_unembed)):
        for e in range(len(r.labels)):
            q = torch.linalg.eigh(torch.cov(X[e].T, correction=0)).eigenvectors[:, -k:]
            theirs = projection_kernel(orthonormal_subspace(q, rank=k), orthonormal_subspace(basis, rank=k))
            torch.testing.assert_close(ours[e], theirs.normalized.to(F64), rtol=0, atol=1e-9)


@pytest.mark.skipif(TL_MAJOR < 4, reason="transformer_lens.tools.analysis exists from TransformerLens 4")
def test_projection_kernel_null_matches_transformer_lens_moments():
    from transformer_lens.tools.analysis.projection_kernel import random_projection_kernel_moments

    model = build(LLAMA_LIKE, F64)
    k, d, n_null = 6, 64, 2000
    r = alignment_suite(model, corpus(), k=k, progress=False, n_null_samples=n_null)
    moments = random_projection_kernel_moments(d, k)
    mean, std = moments.mean / k, math.sqrt(moments.variance) / k  # normalized by sqrt(k * k)
    assert abs(float(r.angles.null_pk_mean) - mean) < 4 * std / math.sqrt(n_null)
    assert abs(float(r.angles.null_pk_std) / std - 1) < 0.1


# ------------------------------------------------------------------ quantiles


def test_histogram_quantiles_match_numpy():
    g = torch.Generator().manual_seed(0)
    levels = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    ranks = torch.randint(0, 50, (3, 257), generator=g) ** 2 // 40
    hist = torch.stack([torch.bincount(r, minlength=100) for r in ranks])
    ours = integer_quantiles(hist, levels)
    ref = np.stack([np.quantile(r.numpy(), levels, method="inverted_cdf") for r in ranks])
    np.testing.assert_array_equal(ours.numpy(), ref)

    values = torch.rand(2, 5000, generator=g, dtype=F64) ** 2 * 2 - 1
    bins = 2000
    idx = ((values + 1) * bins / 2).long().clamp(0, bins - 1)
    hist = torch.stack([torch.bincount(i, minlength=bins) for i in idx])
    ours = binned_quantiles(hist, levels[1:-1], -1.0, 2.0 / bins)
    ref = np.stack([np.quantile(v.numpy(), levels[1:-1]) for v in values])
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=2.0 / bins)


# ------------------------------------------------------------------ hooks


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, act, hook=None):
        self.calls += 1


def test_user_hooks_change_downstream_numbers_and_stay_registered(tiny):
    ids = corpus(n_seq=8, seq_len=12)
    clean = alignment_suite(tiny, ids, k=4, batch_size=3, **FAST)

    def ablate(act, hook=None):
        return torch.zeros_like(act)

    counter = Counter()
    tiny.add_hook("blocks.1.hook_attn_out", ablate)
    tiny.add_hook("blocks.0.hook_resid_post", counter)
    before = hook_counts(tiny)
    patched = alignment_suite(tiny, ids, k=4, batch_size=3, **FAST)
    assert hook_counts(tiny) == before
    assert counter.calls == 3  # fired in each of the suite's forward passes
    with torch.no_grad():
        tiny(ids[:1])
    assert counter.calls == 4  # and still fires afterwards
    a, b = clean.to_dataframe(), patched.to_dataframe()
    per_entry = ["cos_mean", "rank_mean", "var_embed", "angle_embed_mean_deg", "cka_embed", "procrustes_embed"]
    upstream, downstream = ["0_pre", "1_pre"], [label for label in clean.labels if label not in ("0_pre", "1_pre")]
    assert np.array_equal(a.loc[upstream, per_entry].to_numpy(), b.loc[upstream, per_entry].to_numpy())
    moved = ["cos_mean", "var_embed", "cka_embed"]
    diff = (a.loc[downstream, moved] - b.loc[downstream, moved]).abs()
    assert (diff.to_numpy() > 1e-6).all()


def test_nan_in_the_stream_is_an_error_and_hooks_are_removed(tiny):
    def poison(act, hook=None):
        out = act.clone()
        out[0, 3, 5] = float("nan")
        return out

    tiny.add_hook("blocks.1.hook_resid_mid", poison)
    before = hook_counts(tiny)
    with pytest.raises(ValueError, match="NaN or inf at 2_pre"):
        alignment_suite(tiny, corpus(n_seq=4, seq_len=8), k=4, **FAST)
    assert hook_counts(tiny) == before


# ------------------------------------------------------------------ bad input


@pytest.fixture
def no_forward(tiny):
    """The tiny model with a counter that must stay at 0: errors come before any forward pass."""
    counter = Counter()
    tiny.add_hook("blocks.0.hook_resid_pre", counter)
    yield tiny
    assert counter.calls == 0


BAD_SUITE_CALLS = [
    ("k-above-d_model", dict(k=65), ValueError, r"k must be an int in \[1, 64\].*d_model=64"),
    ("k-zero", dict(k=0), ValueError, "got 0"),
    ("k-float", dict(k=4.0), TypeError, r"got float \(4.0\)"),
    ("k-bool", dict(k=True), TypeError, "got bool"),
    ("k-above-tokens", dict(k=30), ValueError, r"k=30 exceeds the n - 1 = 23.*24 token"),
    ("k-above-tokens-uncentred", dict(k=30, center=False), ValueError, r"k=30 exceeds the n = 24"),
    ("too-short-for-debiased", dict(skip_positions=5), ValueError, r"keep 3 position.*at least 4 tokens per block"),
    ("skip-negative", dict(skip_positions=-1), ValueError, "skip_positions must be an int >= 0, got -1"),
    ("block-zero", dict(cka_block_sequences=0), ValueError, "cka_block_sequences"),
    ("rank-every", dict(rank_every=0), ValueError, "rank_every"),
    ("nulls", dict(n_null_samples=1), ValueError, "n_null_samples.*2 samples"),
    ("center-str", dict(center="yes"), TypeError, "center must be True or False"),
    ("seq-len-mismatch", dict(seq_len=6), ValueError, r"seq_len=6"),
    ("max-tokens", dict(max_tokens=0), ValueError, "max_tokens"),
]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in BAD_SUITE_CALLS], ids=[c[0] for c in BAD_SUITE_CALLS])
def test_bad_suite_arguments_fail_before_any_forward_pass(no_forward, kwargs, exc, match):
    ids = corpus(n_seq=4, seq_len=8)  # 4 x 6 = 24 tokens after the 2 skipped positions
    with pytest.raises(exc, match=match):
        alignment_suite(no_forward, ids, progress=False, **kwargs)


def test_training_mode_is_refused(no_forward):
    no_forward.train()
    with pytest.raises(ValueError, match="eval mode"):
        alignment_suite(no_forward, corpus(), progress=False)


def test_bad_cache_and_tokens(tiny, tokens):
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
    with pytest.raises(ValueError, match=r"tokens \(2, 8\) need"):
        alignment_from_cache(tiny, cache, tokens[:, :8], k=4)
    with pytest.raises(TypeError, match="integer tensor"):
        alignment_from_cache(tiny, cache, tokens.float(), k=4)

    class Missing(dict):
        pass

    with pytest.raises(ValueError, match="the cache has no activation 'blocks.0.hook_resid_pre'"):
        alignment_from_cache(tiny, Missing(), tokens, k=4)
    with pytest.raises(TypeError, match="cache must be an ActivationCache .* got NoneType"):
        alignment_from_cache(tiny, None, tokens, k=4)
    with pytest.raises(ValueError, match="Fix: cache a longer or larger batch or k <= "):
        alignment_from_cache(tiny, cache, tokens, k=60)


def test_bad_accumulator_input(tiny, tokens):
    acc = AlignmentAccumulator(tiny, k=4)
    stack = collect(tiny, tokens)
    with pytest.raises(ValueError, match="no tokens were seen"):
        acc.result()
    with pytest.raises(ValueError, match=r"stack has shape \(3, 2, 9, 64\), expected \(4, 2, 9, 64\)"):
        acc.update(tokens, stack[:3])
    with pytest.raises(TypeError, match=r"ids must be an integer tensor"):
        acc.update(tokens.float(), stack)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\)"):
        acc.update(tokens + 100, stack)
    poisoned = stack.clone()
    poisoned[2, 1, 4, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf at 2_pre \\(sequence 1, position 4\\)"):
        acc.update(tokens, poisoned)
    assert acc.n_tokens == 0  # nothing was half-added
    with pytest.raises(ValueError, match=r"standardize_scale must have shape \(5, 64\)"):
        AlignmentAccumulator(tiny, k=4, standardize_scale=torch.ones(4, 64))
    with pytest.raises(ValueError, match="finite and positive"):
        AlignmentAccumulator(tiny, k=4, standardize_scale=torch.zeros(5, 64))
    with pytest.raises(ValueError, match="different settings"):
        acc.merge(AlignmentAccumulator(tiny, k=5))
    with pytest.raises(TypeError, match="AlignmentAccumulator"):
        acc.merge(object())


def test_constant_representation_is_a_clear_error(tiny):
    ids = corpus(n_seq=4, seq_len=8)
    stack = collect(tiny, ids)
    stack[1] = 1.0  # entry 1_pre constant across tokens
    acc = AlignmentAccumulator(tiny, k=4, center=False)
    acc.update(ids, stack)
    with pytest.raises(ValueError, match="1_pre"):
        acc.result(n_null_samples=10)


# ------------------------------------------------------------------ result objects


def test_dataframes_and_layer_matrix(tiny, tokens):
    r = alignment_suite(tiny, tokens, k=4, **FAST)
    frame = r.to_dataframe()
    assert list(frame.index) == r.labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    for column in ("angle_embed_mean_deg", "pk_null_mean", "var_embed", "var_null_mean", "var_null_std",
                   "cka_embed", "cka_embed_debiased", "cka_next", "cka_final", "procrustes_embed_scaled",
                   "cos_mean", "cos_q50", "rank_q90", "rank0_frac"):
        assert column in frame.columns, column
    assert frame.index.name == "label"
    np.testing.assert_allclose(frame["angle_embed_min_deg"], np.degrees(r.angles.embed[:, 0].numpy()), rtol=1e-12)
    np.testing.assert_allclose(frame["pk_null_mean"], float(r.angles.null_pk_mean), rtol=0)
    np.testing.assert_allclose(frame["var_unembed"], r.variance.unembed.numpy(), rtol=0)
    np.testing.assert_allclose(frame["cka_final_debiased"], r.cka.final_debiased.numpy(), rtol=0)
    np.testing.assert_allclose(frame["procrustes_embed"], r.procrustes.embed_error.numpy(), rtol=0)
    np.testing.assert_allclose(frame["rank0_frac"], r.drift.rank0_fraction.numpy(), rtol=0)
    np.testing.assert_allclose(frame["cos_q50"], r.drift.cos_quantiles[:, r.drift.quantile_levels.index(0.5)].numpy())
    assert np.isfinite(frame.drop(columns=["cka_next", "cka_next_debiased", "procrustes_next",
                                           "procrustes_next_scaled"]).to_numpy()).all()
    # z-scores against the null: defined where random subspaces differ, NaN at k = d_model where none does
    np.testing.assert_allclose(frame["var_embed_z"], ((r.variance.embed - r.variance.null_mean) / r.variance.null_std)
                               .numpy(), rtol=1e-12)
    flat = dataclasses.replace(r.variance, null_std=torch.full_like(r.variance.null_std, 7e-17)).to_dataframe()
    assert flat["var_embed_z"].isna().all() and flat["var_unembed_z"].isna().all()  # rounding over rounding
    matrix = r.cka.layer_dataframe()
    assert matrix.shape == (4, 4) and list(matrix.columns) == r.labels
    np.testing.assert_allclose(np.diag(matrix.to_numpy()), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="layer_cka_biased=True"):
        r.cka.layer_dataframe(debiased=False)
    assert r.angles.n_null_samples == r.variance.n_null_samples == 50 and r.drift.rank_every == 4
    assert r.index("2_pre") == 2
    with pytest.raises(ValueError, match="unknown stack label"):
        r.index("7_pre")


def test_full_biased_matrix_agrees_with_the_pairs():
    model = build(GPT_LIKE, F64)
    for standardize in (False, True):
        r = alignment_suite(model, corpus(), k=6, layer_cka_biased=True, standardize=standardize, **FAST)
        m = r.cka.layer_biased
        torch.testing.assert_close(torch.diagonal(m), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.diagonal(m, 1), r.cka.next[:-1], rtol=1e-10, atol=0)
        torch.testing.assert_close(m[:, -1], r.cka.final, rtol=1e-10, atol=0)
        torch.testing.assert_close(m, m.T, rtol=0, atol=0)


def test_standardization_removes_a_rogue_dimension():
    """A huge-variance coordinate dominates raw CKA; z-scoring restores the planted similarity."""
    model = build(LLAMA_LIKE, F64)
    g = torch.Generator().manual_seed(4)
    ids = corpus(n_seq=16)
    shared = torch.randn(16, 16, 64, generator=g, dtype=F64)
    stack = torch.stack([shared + 0.1 * torch.randn(16, 16, 64, generator=g, dtype=F64) for _ in range(4)])
    stack[1, ..., 0] = 1e4 * torch.randn(16, 16, generator=g, dtype=F64)  # rogue dimension in 1_pre only
    raw = AlignmentAccumulator(model, k=6)
    raw.update(ids, stack)
    rows = stack[:, :, 2:].reshape(4, -1, 64)
    emb = ModelAccess(model).W_E.detach().to(F64)[ids[:, 2:].reshape(-1)]
    scale = torch.cat([rows, emb[None]]).std(1, unbiased=False)
    std = AlignmentAccumulator(model, k=6, standardize_scale=scale)
    std.update(ids, stack)
    assert float(raw.result(n_null_samples=10).cka.next[0]) < 0.1
    assert float(std.result(n_null_samples=10).cka.next[0]) > 0.9


def test_skipped_positions_keep_massive_activations_out():
    """A BOS-like position with a huge norm dominates the raw statistics unless it is skipped."""
    model = build(LLAMA_LIKE, F64)
    g = torch.Generator().manual_seed(5)
    ids = corpus(n_seq=16)
    shared = torch.randn(16, 16, 64, generator=g, dtype=F64)
    stack = torch.stack([shared + 0.1 * torch.randn(16, 16, 64, generator=g, dtype=F64) for _ in range(4)])
    stack[1, :, 0] = 1e4 * torch.randn(16, 64, generator=g, dtype=F64)  # massive activation at position 0
    results = {}
    for skip in (0, 1):
        acc = AlignmentAccumulator(model, k=6, skip_positions=skip)
        acc.update(ids, stack)
        results[skip] = acc.result(n_null_samples=10)
    assert float(results[0].cka.next[0]) < 0.5 and float(results[1].cka.next[0]) > 0.9
    assert results[1].n_tokens == 16 * 15


def test_update_and_result_restore_the_callers_thread_setting():
    model = build(LLAMA_LIKE, F64)
    ids = corpus(n_seq=4)
    acc = AlignmentAccumulator(model, k=4)
    stack = collect(model, ids)
    torch.set_num_threads(2)
    try:
        acc.update(ids, stack)
        assert torch.get_num_threads() == 2
        acc.result(n_null_samples=10)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


# ------------------------------------------------------------------ the real model


@pytest.mark.integration
def test_default_model_layer0_is_its_embedding(smol):
    r = alignment_suite(smol, max_tokens=512, k=32, progress=False, n_null_samples=50)
    assert r.n_tokens == 4 * 126 and r.labels[0] == "0_pre" and r.labels[-1] == "final_post"
    assert abs(float(r.cka.embed[0]) - 1) < 1e-9 and float(r.procrustes.embed_error[0]) < 1e-5
    assert abs(float(r.drift.cos_mean[0]) - 1) < 1e-6 and float(r.drift.rank0_fraction[0]) == 1.0
    # tied embeddings: the W_E and W_U analyses coincide
    torch.testing.assert_close(r.angles.embed, r.angles.unembed)
    # the stream drifts away from the embedding space with depth
    assert float(r.drift.cos_mean[15]) < 0.5 and float(r.cka.embed[-1]) < float(r.cka.embed[1])


def test_numpy_integer_options_are_taken_as_ints(tiny, tokens):
    """numpy integers pass the checks and are stored as plain ints: the same settings, the same numbers."""
    plain = alignment_suite(tiny, tokens, k=4, skip_positions=1, rank_every=2, **FAST)
    numpy = alignment_suite(tiny, tokens, k=np.int64(4), skip_positions=np.int32(1), rank_every=np.int64(2),
                            progress=False, n_null_samples=np.int64(50))
    acc = AlignmentAccumulator(tiny, k=np.int64(4), rank_every=np.int64(2))
    assert type(acc.settings.k) is int and type(acc.settings.rank_every) is int
    torch.testing.assert_close(numpy.cka.embed, plain.cka.embed, rtol=0, atol=0)
    assert torch.equal(numpy.drift.rank_hist, plain.drift.rank_hist)
    assert numpy.angles.n_null_samples == 50 and type(numpy.angles.n_null_samples) is int
