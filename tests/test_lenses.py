"""Logit and embedding lens readouts checked against the model's own outputs and direct formulas."""

from __future__ import annotations

import pytest
import torch

import tl_latentspaces as tll


def _reference_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """The model's own final norm module + unembedding, in float64 (independent of our norm)."""
    with torch.no_grad():
        normed = model.ln_final(resid)
        return (normed.double() @ model.W_U.double() + model.b_U.double())


def _residuals(model, tokens):
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return logits, torch.stack([cache[n] for n in names])


@pytest.fixture(params=[(2048, 16), (7, 16), (32, 4)], ids=["one-tile", "tiles-of-7", "tiles-of-32-grouped"])
def tile_cols(request, monkeypatch):
    """Vocabulary tiling: the default (a tiny vocabulary fits one plain tile); tiles of 7 columns,
    which split the 100-token vocabulary into 15 tiles with a partial last one (online softmax
    rescaling, cross-tile top-k merge); and tiles of 32 in groups of 4, so the grouped top-k
    candidate search runs on every tile."""
    from tl_latentspaces import readout

    monkeypatch.setattr(readout, "TILE_COLS", request.param[0])
    monkeypatch.setattr(readout, "GROUP_ROWS", request.param[1])
    return request.param


def test_final_entry_reproduces_model_log_probs(tiny, tokens, tile_cols):
    everything = torch.arange(100).expand(*tokens.shape, 100)
    r = tll.logit_lens(tiny, tokens, top_k=5, targets=everything)
    with torch.no_grad():
        log_probs = tiny(tokens).log_softmax(-1)
    assert r.labels[-1] == "final_post"
    torch.testing.assert_close(r.target_probs[-1].log(), log_probs, atol=1e-4, rtol=0)
    assert r.kl_to_final[-1].abs().max() < 1e-5
    top = log_probs.topk(5, dim=-1)
    assert torch.equal(r.top_ids[-1], top.indices)
    torch.testing.assert_close(r.top_probs[-1], top.values.exp(), atol=1e-5, rtol=0)
    assert torch.equal(r.final_top1, log_probs.argmax(-1))
    assert bool(r.agrees_with_final[-1].all())


def test_every_entry_matches_direct_formulas(tiny, tokens, tile_cols):
    logits, stack = _residuals(tiny, tokens)
    r = tll.logit_lens(tiny, tokens, top_k=4, targets=[3, 17])
    p_final = torch.softmax(logits.double(), -1)
    for e in range(stack.shape[0]):
        z = _reference_logits(tiny, stack[e])
        logp = torch.log_softmax(z, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        kl = (p_final * (torch.log(p_final) - logp)).sum(-1)
        torch.testing.assert_close(r.entropy[e].double(), entropy, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.kl_to_final[e].double(), kl.clamp_min(0), atol=2e-5, rtol=1e-5)
        top = z.topk(4, -1)
        assert torch.equal(r.top_ids[e], top.indices)
        torch.testing.assert_close(r.top_scores[e].double(), top.values, atol=1e-4, rtol=1e-5)
        for t, tid in enumerate([3, 17]):
            torch.testing.assert_close(r.target_probs[e, ..., t].double(), logp[..., tid].exp(), atol=1e-6, rtol=1e-4)
            rank = (z > z[..., tid : tid + 1]).sum(-1)
            assert torch.equal(r.target_ranks[e, ..., t], rank)


def test_embedding_lens_matches_cosine_reference(tiny, tokens, tile_cols):
    _, stack = _residuals(tiny, tokens)
    r = tll.embedding_lens(tiny, tokens, top_k=3)
    W_E = tiny.W_E.detach().double()
    for e in range(stack.shape[0]):
        cos = torch.nn.functional.cosine_similarity(stack[e].double().unsqueeze(-2), W_E, dim=-1)
        top = cos.topk(3, -1)
        assert torch.equal(r.top_ids[e], top.indices)
        torch.testing.assert_close(r.top_scores[e].double(), top.values, atol=1e-5, rtol=0)
        own = cos.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(r.own_scores[e].double(), own, atol=1e-5, rtol=0)
        assert torch.equal(r.own_ranks[e], (cos > own.unsqueeze(-1)).sum(-1))
        # probabilities are softmax(cos * sqrt(d_model)) at temperature 1
        logp = torch.log_softmax(cos * tiny.cfg.d_model**0.5, -1)
        torch.testing.assert_close(r.entropy[e].double(), -(logp.exp() * logp).sum(-1), atol=2e-5, rtol=1e-5)


def test_embedding_lens_own_token_at_layer_0_without_positional_embedding():
    """On a rotary model resid_pre of layer 0 *is* the token embedding: cosine 1, rank 0."""
    from conftest import FLAVOURS

    name, build = next((n, b) for n, b in FLAVOURS if "llama" in n and "compat" not in n)
    model = build()
    toks = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    r = tll.embedding_lens(model, toks, layers=["0_pre"])
    torch.testing.assert_close(r.own_scores[0], torch.ones(1, 12), atol=1e-5, rtol=0)
    # rank 0 up to exact duplicates of the embedding, which random init does not produce
    assert int(r.own_ranks.max()) == 0


def test_cache_path_equals_hook_path(tiny, tokens):
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
    a = tll.read_lenses(tiny, tokens, cache=cache, targets=[5])
    b = tll.read_lenses(tiny, tokens, targets=[5])
    for name in ("logit", "embedding"):
        torch.testing.assert_close(a[name].kl_to_final, b[name].kl_to_final, atol=1e-6, rtol=0)
        assert torch.equal(a[name].top_ids, b[name].top_ids)


def test_layer_and_position_selection(tiny, tokens):
    full = tll.logit_lens(tiny, tokens)
    part = tll.logit_lens(tiny, tokens, layers=[1, "final_post"], pos=[0, -1])
    assert part.labels == ["1_pre", "final_post"]
    assert part.positions == [0, tokens.shape[1] - 1]
    torch.testing.assert_close(part.kl_to_final, full.kl_to_final[[1, -1]][:, :, [0, -1]], atol=1e-6, rtol=0)
    mid = tll.logit_lens(tiny, tokens, incl_mid=True)
    assert mid.labels[:3] == ["0_pre", "0_mid", "1_pre"]


def test_chunking_does_not_change_results(tiny, tokens):
    a = tll.read_lenses(tiny, tokens, chunk_rows=1, targets=[1, 2])
    b = tll.read_lenses(tiny, tokens, chunk_rows=1000, targets=[1, 2])
    for name in a:
        # float32 matmuls blocked differently round differently; KL is a difference of O(1) terms
        torch.testing.assert_close(a[name].entropy, b[name].entropy, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a[name].kl_to_final, b[name].kl_to_final, atol=1e-5, rtol=1e-5)
        assert torch.equal(a[name].target_ranks, b[name].target_ranks)


def test_results_dataframes_and_summary(tiny, tokens):
    r = tll.logit_lens(tiny, tokens, targets=[4])
    df = r.to_dataframe()
    E, B, P = r.entropy.shape
    assert len(df) == E * B * P
    assert set(["label", "pos", "token", "top1", "kl_to_final", "target0_prob"]) <= set(df.columns)
    row = df[(df.label == "1_pre") & (df.batch == 1) & (df.pos == 3)].iloc[0]
    assert row.kl_to_final == pytest.approx(float(r.kl_to_final[1, 1, 3]))
    summary = r.summary()
    assert list(summary.index) == r.labels
    assert summary.loc["final_post", "top1_agreement"] == 1.0
    assert summary.loc["1_pre", "kl_to_final"] == pytest.approx(float(r.kl_to_final[1].mean()), rel=1e-5)


def test_half_precision_is_read_in_float32(tokens):
    from conftest import FLAVOURS

    _, build = FLAVOURS[0]
    model = build().to(torch.bfloat16)
    r = tll.logit_lens(model, tokens)
    assert r.top_probs.dtype == torch.float32 and r.entropy.dtype == torch.float32
    with torch.no_grad():
        lp = model(tokens).float().log_softmax(-1)
    torch.testing.assert_close(r.top_probs[-1, ..., 0], lp.max(-1).values.exp(), atol=2e-2, rtol=0)


def test_tile_candidates_hold_the_top_k():
    """Planted: the whole top-5 in one column group, ties, and the plain fallbacks."""
    from tl_latentspaces.readout import _tile_candidates

    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 2048, generator=g)
    C = 2048 // 16
    z[0, [3, 3 + C, 3 + 2 * C, 3 + 5 * C, 3 + 15 * C]] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])  # one group
    z[1, :] = 0.5
    z[1, [10, 700]] = 2.0  # a tie for first
    z[2, -1] = 50.0  # the last column
    for k, width in ((5, 2048), (1, 2048), (200, 2048), (5, 2040), (5, 3)):
        tile = z[:, :width].contiguous()
        v, i, m = _tile_candidates(tile, k)
        assert torch.equal(torch.gather(tile, 1, i), v)
        want = tile.topk(min(k, width), -1).values
        torch.testing.assert_close(v.topk(min(k, width), -1).values, want, rtol=0, atol=0)
        torch.testing.assert_close(m.squeeze(1), tile.amax(-1), rtol=0, atol=0)


def test_tiled_softmax_statistics_match_float64():
    """Entropy and log-normalizer over a 49K vocabulary, walked in tiles, against float64."""
    from tl_latentspaces.readout import TILE_COLS, _fold, _SoftmaxStats

    g = torch.Generator().manual_seed(0)
    z = 8 * torch.randn(4, 49152, generator=g)
    z[0, 40000] = 60.0  # the maximum in a late tile forces rescaling of every earlier sum
    z[1] = z[1] / 100  # nearly uniform: entropy close to log(V)
    stats = _SoftmaxStats(4, z)
    for a in range(0, z.shape[1], TILE_COLS):
        tile = z[:, a : a + TILE_COLS]
        m = stats.advance(tile.max(-1, keepdim=True).values)
        s, t, _ = _fold(tile, m, torch.ones(4, tile.shape[1]), 1)
        stats.absorb(s, t)
    logp = torch.log_softmax(z.double(), -1)
    exact_h = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(stats.entropy().squeeze(1).double(), exact_h, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(stats.logsumexp().squeeze(1).double(), torch.logsumexp(z.double(), -1), atol=1e-5, rtol=0)
