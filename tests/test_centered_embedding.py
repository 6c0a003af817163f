"""The centred embedding lens: its means, its cosines, its invariance to a shift of the stream."""

from __future__ import annotations

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces.hooks import hook_counts
from tl_latentspaces.model import ModelAccess, ModelIdentity


def _corpus(n_seq: int = 6, seq_len: int = 10) -> torch.Tensor:
    return torch.randint(0, 100, (n_seq, seq_len), generator=torch.Generator().manual_seed(11))


def _stack(model, tokens, incl_mid: bool = True):
    """Residual stack from the model's own cache, float64, with its labels."""
    sites = ModelAccess(model).stack_sites(incl_mid=incl_mid)
    names = [name for _, name in sites]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [label for label, _ in sites], torch.stack([cache[n].double() for n in names])


def _cosines(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x.unsqueeze(-2), W, dim=-1)


def test_means_and_cosines_match_a_float64_reference(tiny, tokens):
    corpus = _corpus()
    lens = tll.centered_embedding_lens(tiny, corpus, seq_len=10, batch_size=4, center_embedding=True)
    labels, stack = _stack(tiny, corpus)
    assert lens.labels == labels and lens.n_tokens == 6 * 9 and lens.center_embedding
    # mean over every position but the first of each sequence
    torch.testing.assert_close(lens.means, stack[:, :, 1:].mean(dim=(1, 2)), atol=1e-6, rtol=1e-6)
    skip2 = tll.centered_embedding_lens(tiny, corpus, seq_len=10, skip_positions=2)
    assert skip2.n_tokens == 6 * 8
    torch.testing.assert_close(skip2.means, stack[:, :, 2:].mean(dim=(1, 2)), atol=1e-6, rtol=1e-6)

    r = tll.read_lenses(tiny, tokens, lenses=("embedding", lens), incl_mid=True, top_k=3)
    assert set(r) == {"embedding", "embedding_centered"}
    labels, resid = _stack(tiny, tokens)
    W = tiny.W_E.detach().double()
    W = W - W.mean(0)
    c = r["embedding_centered"]
    assert c.labels == labels
    for e in range(len(labels)):
        cos = _cosines(resid[e] - lens.means[e], W)
        own = cos.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(c.own_scores[e].double(), own, atol=1e-5, rtol=0)
        assert torch.equal(c.own_ranks[e], (cos > own.unsqueeze(-1)).sum(-1))
        top = cos.topk(3, -1)
        assert torch.equal(c.top_ids[e], top.indices)
        torch.testing.assert_close(c.top_scores[e].double(), top.values, atol=1e-5, rtol=0)
    # the plain lens read beside it is unchanged
    plain = tll.embedding_lens(tiny, tokens, incl_mid=True, top_k=3)
    assert torch.equal(r["embedding"].top_ids, plain.top_ids)
    assert torch.equal(r["embedding"].own_ranks, plain.own_ranks)
    # by default only the stream is centred: the cosine is with the raw W_E rows
    default = tll.centered_embedding_lens(tiny, corpus, seq_len=10)
    assert not default.center_embedding
    d = tll.read_lenses(tiny, tokens, lenses=(default,), incl_mid=True)["embedding_centered"]
    W = tiny.W_E.detach().double()
    for e in range(len(labels)):
        cos = _cosines(resid[e] - default.means[e], W)
        own = cos.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(d.own_scores[e].double(), own, atol=1e-5, rtol=0)
        assert torch.equal(d.own_ranks[e], (cos > own.unsqueeze(-1)).sum(-1))


def test_centred_cosine_is_invariant_to_a_constant_shift_of_the_stream(tiny, tokens):
    corpus = _corpus()
    before = tll.centered_embedding_lens(tiny, corpus, seq_len=10)
    clean = tll.read_lenses(tiny, tokens, lenses=("embedding", before), layers=["1_pre"])
    shift = 3.0 * torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(5))

    def add_shift(act, hook=None):
        return act + shift.to(act.dtype)

    tiny.add_hook("blocks.1.hook_resid_pre", add_shift)
    hooks = hook_counts(tiny)
    after = tll.centered_embedding_lens(tiny, corpus, seq_len=10)
    assert hook_counts(tiny) == hooks  # the fit removed exactly what it added; the shift stays
    idx = after.labels.index("1_pre")
    torch.testing.assert_close(after.means[idx] - before.means[idx], shift.double(), atol=1e-4, rtol=0)
    shifted = tll.read_lenses(tiny, tokens, lenses=("embedding", after), layers=["1_pre"])
    # the plain lens sees the shift; the centred one, with the matching mean, does not
    assert (shifted["embedding"].own_scores - clean["embedding"].own_scores).abs().max() > 1e-2
    torch.testing.assert_close(
        shifted["embedding_centered"].own_scores, clean["embedding_centered"].own_scores, atol=1e-4, rtol=0
    )
    assert torch.equal(shifted["embedding_centered"].top_ids, clean["embedding_centered"].top_ids)


def test_zero_center_and_raw_embedding_is_the_plain_lens(tiny, tokens):
    access = ModelAccess(tiny)
    labels = [label for label, _ in access.stack_sites()]
    zero = tll.CenteredEmbeddingLens(
        labels, torch.zeros(len(labels), tiny.cfg.d_model), n_tokens=1,
        identity=ModelIdentity.of(access, weights=False), center_embedding=False,
    )
    r = tll.read_lenses(tiny, tokens, lenses=("embedding", zero), top_k=4, temperature=0.5)
    a, b = r["embedding"], r["embedding_centered"]
    assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.own_ranks, b.own_ranks)
    for field in ("top_scores", "top_probs", "own_scores", "entropy", "kl_to_final"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_with_the_fix(tiny, tokens):
    from conftest import build_llama_like

    access = ModelAccess(tiny)
    d = tiny.cfg.d_model
    with pytest.raises(ValueError, match=r"d_model=64.*shape \(3, 5\)"):
        tll.EmbeddingLens(access, center=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="got list.*centered_embedding_lens"):
        tll.EmbeddingLens(access, center=[[0.0] * d])
    with pytest.raises(ValueError, match="NaN or inf"):
        tll.EmbeddingLens(access, center=torch.full((4, d), float("nan")))
    with pytest.raises(ValueError, match="max_tokens"):
        tll.centered_embedding_lens(tiny, _corpus(), seq_len=10, max_tokens=0)
    with pytest.raises(ValueError, match=r"skip_positions must be an int in \[0, 9\]"):
        tll.centered_embedding_lens(tiny, _corpus(), seq_len=10, skip_positions=10)
    lens = tll.centered_embedding_lens(tiny, _corpus(), seq_len=10)
    # a lens estimated without the mid entries cannot read them
    keep = [i for i, label in enumerate(lens.labels) if not label.endswith("_mid")]
    pre_only = tll.CenteredEmbeddingLens(
        [lens.labels[i] for i in keep], lens.means[keep], n_tokens=lens.n_tokens, identity=lens.identity
    )
    with pytest.raises(ValueError, match=r"no mean for stack entries \['0_mid'"):
        tll.read_lenses(tiny, tokens, lenses=(pre_only,), incl_mid=True)
    # the means of one model do not read another (here: same sizes, another unembedding)
    with pytest.raises(ValueError, match="does not fit.*unembedding"):
        tll.read_lenses(build_llama_like(seed=3), tokens, lenses=(lens,))


def test_public_names():
    from tl_latentspaces import lenses

    for name in ("centered_embedding_lens", "CenteredEmbeddingLens", "EmbeddingLens"):
        assert getattr(tll, name) is getattr(lenses, name), name
        assert name in tll.__all__ and name in lenses.__all__, name
