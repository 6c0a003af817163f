"""Hook hygiene: the lens removes exactly the hooks it added, and composes with the user's own."""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import hook_counts
from tl_latentspaces.hooks import readout_hook_names
from tl_latentspaces.model import ModelAccess


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, act, hook=None):
        self.calls += 1


def test_user_hooks_survive_and_keep_firing(tiny, tokens):
    plain, permanent = Counter(), Counter()
    tiny.add_hook("blocks.1.hook_resid_pre", plain)
    tiny.add_hook("blocks.0.hook_resid_post", permanent, is_permanent=True)
    before = hook_counts(tiny)
    tll.read_lenses(tiny, tokens)
    assert hook_counts(tiny) == before
    assert plain.calls == 1 and permanent.calls == 1  # they fired inside the lens's forward pass
    with torch.no_grad():
        tiny(tokens)
    assert plain.calls == 2 and permanent.calls == 2  # and still fire afterwards


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_hooks_removed_when_forward_raises(tiny, tokens, error):
    def explode(act, hook=None):
        raise error("boom")

    tiny.add_hook("blocks.1.hook_resid_mid", explode)
    before = hook_counts(tiny)
    with pytest.raises(error):
        tll.logit_lens(tiny, tokens)
    assert hook_counts(tiny) == before
    with pytest.raises(error):
        with tll.lens_session(tiny, tokens) as s:
            tiny(s.tokens)
    assert hook_counts(tiny) == before


def test_ablation_changes_downstream_entries_only(tiny, tokens):
    clean = tll.logit_lens(tiny, tokens)

    def ablate(act, hook=None):
        return torch.zeros_like(act)

    tiny.add_hook("blocks.1.hook_attn_out", ablate)
    before = hook_counts(tiny)
    patched = tll.logit_lens(tiny, tokens)
    assert hook_counts(tiny) == before
    with torch.no_grad():
        ablated_log_probs = tiny(tokens).log_softmax(-1)
    diff = clean.diff(patched)
    # The lens's own distribution (entropy, top-k) is unchanged upstream of the ablation; KL to
    # final changes everywhere because the final distribution itself changed.
    changed = diff.entropy_delta.abs().flatten(1).max(1).values
    assert changed[0] == 0 and changed[1] == 0  # 0_pre, 1_pre: upstream of the ablation
    assert (changed[2:] > 1e-4).all()  # 2_pre ... final_post: downstream
    assert torch.equal(clean.top_probs[:2], patched.top_probs[:2])
    assert diff.changed_entries() == [label for label in clean.labels[2:] if label in diff.changed_entries()]
    # the lens's final distribution is the ablated model's own
    assert torch.equal(patched.final_top1, ablated_log_probs.argmax(-1))
    top = ablated_log_probs.topk(5, -1)
    torch.testing.assert_close(patched.top_probs[-1], top.values.exp(), atol=1e-5, rtol=0)


def test_user_hook_on_the_same_point_is_seen(tiny, tokens):
    """A user's patch on a site the lens reads changes what the lens reads there."""
    clean = tll.embedding_lens(tiny, tokens, layers=["2_pre"])

    def scale(act, hook=None):
        return act * -1.0

    tiny.add_hook("blocks.2.hook_resid_pre", scale)
    patched = tll.embedding_lens(tiny, tokens, layers=["2_pre"])
    torch.testing.assert_close(patched.own_scores, -clean.own_scores, atol=1e-5, rtol=0)


def test_lens_session_inside_the_users_forward(tiny, tokens):
    def ablate(act, hook=None):
        return torch.zeros_like(act)

    keep = Counter()
    tiny.add_hook("blocks.0.hook_resid_pre", keep)
    before = hook_counts(tiny)
    with tll.lens_session(tiny, tokens, lenses=("logit", "embedding")) as s:
        with torch.no_grad():
            logits = tiny.run_with_hooks(s.tokens, fwd_hooks=[("blocks.0.hook_mlp_out", ablate)])
    assert hook_counts(tiny) == before
    assert keep.calls == 1
    assert set(s.results) == {"logit", "embedding"}
    assert torch.equal(s.results["logit"].final_top1, logits.argmax(-1))
    reference = tll.logit_lens(tiny, tokens)  # no ablation now
    assert not torch.allclose(reference.entropy[1], s.results["logit"].entropy[1])  # after layer 0's MLP
    torch.testing.assert_close(reference.entropy[:1], s.results["logit"].entropy[:1], atol=1e-6, rtol=0)


def test_hook_session_removes_only_its_own(tiny):
    access = tll.ModelAccess(tiny)
    user = Counter()
    tiny.add_hook("blocks.0.hook_resid_pre", user)
    before = hook_counts(tiny)
    with tll.HookSession(access) as session:
        session.add("blocks.0.hook_resid_pre", Counter())
        session.add("blocks.1.hook_resid_pre", Counter())
        assert sum(hook_counts(tiny).values()) == sum(before.values()) + 2
    assert hook_counts(tiny) == before
    hp = access.hook_point("blocks.0.hook_resid_pre")
    assert len(hp.fwd_hooks) == 1


def test_unknown_hook_name_suggests_close_matches(tiny):
    with pytest.raises(ValueError, match="hook_resid_pre"):
        tll.HookSession(tll.ModelAccess(tiny)).add("blocks.0.hook_resid_pr", Counter())


# ---------------------------------------------------------------------------------------------
# Composition by construction: a lens reads an entry after every hook on its point.
READ_POINT = "blocks.1.hook_resid_pre"


_DIRECTION = torch.randn(64, generator=torch.Generator().manual_seed(3))


def _patch(act, hook=None):
    # a fixed random direction: neither centring nor scaling (LayerNorm, cosine) undoes it
    return act + 2.0 * act.norm(dim=-1, keepdim=True) / 8.0 * _DIRECTION.to(act.dtype)


def _register_and_run(model, how, ids):
    """Run ``model`` on ``ids`` with ``_patch`` at READ_POINT, registered the way ``how`` says."""
    with torch.no_grad():
        if how == "run_with_hooks":
            model.run_with_hooks(ids, fwd_hooks=[(READ_POINT, _patch)])
        elif how == "hooks_context":
            with model.hooks(fwd_hooks=[(READ_POINT, _patch)]):
                model(ids)
        elif how in ("add_hook", "prepend", "permanent"):
            hp = model.hook_dict[READ_POINT]
            before = list(hp.fwd_hooks)
            hp.add_hook(_patch, dir="fwd", prepend=how == "prepend", is_permanent=how == "permanent")
            try:
                model(ids)
            finally:  # take the patch back off, exactly
                for h in [h for h in hp.fwd_hooks if h not in before]:
                    h.hook.remove()
                    hp.fwd_hooks.remove(h)
        else:  # pragma: no cover
            raise AssertionError(how)


@pytest.mark.parametrize("how", ["run_with_hooks", "hooks_context", "add_hook", "prepend", "permanent"])
def test_patch_registered_inside_the_session_shows_at_the_entry_it_patches(tiny, tokens, how):
    """The acceptance of composition: a patch at the very point a lens reads, registered inside
    the session in any way, changes that entry exactly as the same patch registered before."""
    clean = tll.read_lenses(tiny, tokens, lenses=("logit", "embedding"))
    tiny.add_hook(READ_POINT, _patch)
    reference = tll.read_lenses(tiny, tokens, lenses=("logit", "embedding"))
    tiny.reset_hooks()
    keep = Counter()
    tiny.add_hook("blocks.0.hook_resid_post", keep, is_permanent=True)  # the user's own, stays
    before = hook_counts(tiny)
    with tll.lens_session(tiny, tokens, lenses=("logit", "embedding")) as s:
        _register_and_run(tiny, how, s.tokens)
    assert hook_counts(tiny) == before and keep.calls == 1
    at = clean["logit"].index("1_pre")
    for name in ("logit", "embedding"):
        got, want = s.results[name], reference[name]
        # the patched entry differs from the clean run ...
        assert (got.entropy[at] - clean[name].entropy[at]).abs().max() > 1e-3
        # ... exactly as when the patch was registered before the session
        torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.top_probs, want.top_probs, atol=1e-5, rtol=0)
        assert torch.equal(got.top_ids[at], want.top_ids[at])
    torch.testing.assert_close(s.results["embedding"].own_scores, reference["embedding"].own_scores, atol=1e-5, rtol=0)


def test_a_hook_on_the_read_point_added_after_the_capture_still_runs_first(tiny, tokens):
    """Low level: HookSession.capture sees the output of hooks registered after it."""
    access = tll.ModelAccess(tiny)
    seen = []
    with tll.HookSession(access) as session:
        session.capture(READ_POINT, lambda act: seen.append(act.clone()))
        tiny.hook_dict[READ_POINT].add_hook(lambda act, hook=None: torch.zeros_like(act), dir="fwd", prepend=True)
        with torch.no_grad():
            tiny(tokens)
        tiny.reset_hooks()
    assert len(seen) == 1 and torch.count_nonzero(seen[0]) == 0


def test_the_last_pass_in_a_session_is_read_whole(tiny, tokens):
    """After a pass through the user's run_with_hooks, a second pass is read whole, not half stale."""
    def ablate(act, hook=None):
        return torch.zeros_like(act)

    with tll.lens_session(tiny, tokens, lenses=("logit",)) as s:
        with torch.no_grad():
            tiny.run_with_hooks(s.tokens, fwd_hooks=[(READ_POINT, Counter()), ("blocks.0.hook_attn_out", ablate)])
            tiny(s.tokens)  # a clean second pass: the last one, so the one read
    clean = tll.logit_lens(tiny, tokens)
    torch.testing.assert_close(s.results["logit"].entropy, clean.entropy, atol=1e-6, rtol=0)


def test_divergence_is_zero_upstream_and_the_models_own_kl_at_the_end(tiny, tokens):
    clean = tll.read_lenses(tiny, tokens, lenses=("logit", "embedding"))
    with tll.lens_session(tiny, tokens, lenses=("logit", "embedding")) as s:
        with torch.no_grad():
            patched_logits = tiny.run_with_hooks(s.tokens, fwd_hooks=[(READ_POINT, _patch)])
    with torch.no_grad():
        clean_logits = tiny(tokens)
    for name in ("logit", "embedding"):
        diff = clean[name].diff(s.results[name])
        div = diff.divergence
        assert div is not None and div.shape == diff.entropy_delta.shape
        assert torch.count_nonzero(div[0]) == 0  # 0_pre: the patch cannot reach it
        assert (div[1:].flatten(1).max(1).values > 1e-4).all()  # 1_pre on: it does
        assert (div >= 0).all()
    # At final_post the logit lens is the model's own readout: the divergence is the KL between
    # the clean and the patched model's next-token distributions.
    lp, lq = clean_logits.double().log_softmax(-1), patched_logits.double().log_softmax(-1)
    want = (lp.exp() * (lp - lq)).sum(-1)
    got = clean["logit"].diff(s.results["logit"]).divergence[-1]
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert "divergence" in clean["logit"].diff(s.results["logit"]).to_dataframe()


# ---------------------------------------------------------------------------------------------
# Every result describes the input it says it does.
def test_cache_of_another_input_is_refused(tiny, tokens):
    other = (tokens + 1) % 100
    with torch.no_grad():
        _, cache = tiny.run_with_cache(other)
        _, resid_only = tiny.run_with_cache(other, names_filter=lambda n: "resid" in n)
        _, own = tiny.run_with_cache(tokens)
    for c in (cache, resid_only):
        with pytest.raises(ValueError, match="does not belong to this input"):
            tll.logit_lens(tiny, tokens, cache=c)
    direct = tll.logit_lens(tiny, tokens)
    from_cache = tll.logit_lens(tiny, tokens, cache=own)
    torch.testing.assert_close(from_cache.entropy, direct.entropy, atol=1e-5, rtol=0)
    # unchecked on request: then the labels are the caller's responsibility
    tll.logit_lens(tiny, tokens, cache=cache, verify_cache=False)


def test_nested_sessions_each_read_their_own_input(tiny, tokens):
    other = (tokens * 7 + 3) % 100
    want_outer, want_inner = tll.logit_lens(tiny, tokens), tll.logit_lens(tiny, other)
    before = hook_counts(tiny)
    with tll.lens_session(tiny, tokens, lenses=("logit",)) as outer:
        with torch.no_grad():
            tiny(outer.tokens)
        with tll.lens_session(tiny, other, lenses=("logit",)) as inner:
            with torch.no_grad():
                tiny(inner.tokens)  # the outer session sees this pass and ignores it
    assert hook_counts(tiny) == before
    torch.testing.assert_close(outer.results["logit"].entropy, want_outer.entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(inner.results["logit"].entropy, want_inner.entropy, atol=1e-6, rtol=0)
    # a session whose only pass ran on other tokens says so
    with pytest.raises(RuntimeError, match="no forward pass ran on the session's tokens"):
        with tll.lens_session(tiny, tokens, lenses=("logit",)):
            with torch.no_grad():
                tiny(other)
    assert hook_counts(tiny) == before


def test_one_session_entered_twice_is_refused_and_leaks_nothing(tiny, tokens):
    before = hook_counts(tiny)
    s = tll.lens_session(tiny, tokens, lenses=("logit",))
    with pytest.raises(RuntimeError, match="already open"):
        with s:
            with s:
                pass
    assert hook_counts(tiny) == before
    with s:  # once closed it can be used again
        with torch.no_grad():
            tiny(s.tokens)
    assert hook_counts(tiny) == before and "logit" in s.results


def test_a_pass_that_stops_early_is_not_read_as_complete(tiny, tokens):
    with pytest.raises(RuntimeError, match="in the last forward pass"):
        with tll.lens_session(tiny, tokens, lenses=("logit",)) as s:
            with torch.no_grad():
                tiny(s.tokens)

                def stop(act, hook=None):
                    raise KeyError("stop")  # the user's early exit, caught below

                tiny.add_hook("blocks.1.hook_resid_pre", stop)
                try:
                    tiny(s.tokens)
                except KeyError:
                    pass
                tiny.reset_hooks()


def test_a_pass_run_inside_a_users_hook_keeps_apart_from_the_outer_pass(tiny, tokens):
    """A clean pass fetched from inside a hook of a patched pass is its own pass: the read is the outer one."""
    inner = []

    def fetch_clean(act, hook=None):
        if not inner:
            inner.append(True)
            tiny(tokens)

    last_pre = f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_pre"
    with torch.no_grad():
        with tll.lens_session(tiny, tokens, lenses=("logit",)) as patched:
            tiny.run_with_hooks(patched.tokens, fwd_hooks=[(READ_POINT, lambda a, hook=None: None if inner else _patch(a)),
                                                           (last_pre, fetch_clean)])
        with tll.lens_session(tiny, tokens, lenses=("logit",)) as want:
            tiny.run_with_hooks(want.tokens, fwd_hooks=[(READ_POINT, _patch)])
    assert inner  # the inner pass ran
    got = patched.results["logit"]
    torch.testing.assert_close(got.entropy, want.results["logit"].entropy, atol=1e-6, rtol=0)
    assert not torch.allclose(got.entropy[1:], tll.logit_lens(tiny, tokens).entropy[1:], atol=1e-3)


def test_a_pass_that_skips_the_embedding_is_not_read_as_the_sessions(tiny, tokens):
    """start_at_layer on another input's residual, after a complete pass, changes nothing in the read."""
    other = (tokens * 7 + 3) % 100
    with torch.no_grad():
        _, cache = tiny.run_with_cache(other, names_filter="blocks.1.hook_resid_pre")
        with tll.lens_session(tiny, tokens, lenses=("logit",)) as s:
            tiny(s.tokens)
            tiny(cache["blocks.1.hook_resid_pre"], start_at_layer=1)
    torch.testing.assert_close(s.results["logit"].entropy, tll.logit_lens(tiny, tokens).entropy, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="no forward pass ran on the session's tokens"):
        with torch.no_grad(), tll.lens_session(tiny, tokens, lenses=("logit",)):
            tiny(cache["blocks.1.hook_resid_pre"], start_at_layer=1)


def test_a_hook_that_changes_the_final_norm_is_named_in_a_warning(tiny, tokens):
    """Lenses apply the model's own final norm and W_U: a change made after the last residual is not in them,
    and the read says so, while a hook there that only looks changes nothing and warns of nothing."""
    names = readout_hook_names(ModelAccess.of(tiny))
    assert "ln_final.hook_normalized" in names
    clean = tll.logit_lens(tiny, tokens)
    looked = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hook that only looks: no warning
        with torch.no_grad(), tll.lens_session(tiny, tokens, lenses=("logit",)) as s:
            tiny.run_with_hooks(s.tokens, fwd_hooks=[("ln_final.hook_normalized", lambda a, hook=None: looked.append(1))])
    assert looked and torch.equal(s.results["logit"].entropy, clean.entropy)
    with pytest.warns(UserWarning, match=r"a hook changed \['ln_final.hook_normalized'\] in this pass"):
        with torch.no_grad(), tll.lens_session(tiny, tokens, lenses=("logit",)) as s:
            logits = tiny.run_with_hooks(s.tokens, fwd_hooks=[("ln_final.hook_normalized", lambda a, hook=None: -a)])
    assert not torch.equal(logits.argmax(-1), s.results["logit"].final_top1)  # the model's logits did change
    torch.testing.assert_close(s.results["logit"].entropy, clean.entropy, atol=1e-6, rtol=0)


def test_alignment_from_a_cache_of_other_tokens_is_refused(tiny):
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, other = tiny.run_with_cache((ids + 5) % 100)
        _, own = tiny.run_with_cache(ids)
    with pytest.raises(ValueError, match="does not belong to this input"):
        tll.alignment_from_cache(tiny, other, ids, k=4, n_null_samples=2)
    tll.alignment_from_cache(tiny, own, ids, k=4, n_null_samples=2)


def test_corpus_streaming_reads_after_every_hook_on_the_point(tiny):
    """The corpus runner, the fit and the alignment suite collect through the same captures."""
    from tl_latentspaces.runner import stream_residuals

    seqs = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    tiny.hook_dict[READ_POINT].add_hook(_patch, dir="fwd", prepend=True)
    try:
        with torch.no_grad():
            _, cache = tiny.run_with_cache(seqs, names_filter=lambda n: n == READ_POINT)
        before = hook_counts(tiny)
        (_, stack), = list(stream_residuals(tiny, seqs, {"1_pre": READ_POINT}, batch_size=3, progress=False))
        assert hook_counts(tiny) == before
    finally:
        tiny.reset_hooks()
    torch.testing.assert_close(stack[0], cache[READ_POINT], atol=1e-6, rtol=0)


def test_corpus_streaming_ends_each_pass_after_the_final_residual(tiny):
    """With final_post among the sites the pass stops there: the same stack as a full pass (a
    user's patch included), no logits computed, nothing left on the model, and the next full
    forward pass unchanged."""
    from tl_latentspaces.model import ModelAccess
    from tl_latentspaces.runner import stream_residuals

    seqs = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(4))
    sites = dict(ModelAccess(tiny).stack_sites())
    unembed_calls = []
    handle = tiny.unembed.register_forward_hook(lambda *a: unembed_calls.append(1))
    tiny.hook_dict[READ_POINT].add_hook(_patch, dir="fwd")
    try:
        with torch.no_grad():
            logits, cache = tiny.run_with_cache(seqs, names_filter=lambda n: n in sites.values())
        unembed_calls.clear()
        before = hook_counts(tiny)
        (_, stack), = list(stream_residuals(tiny, seqs, sites, batch_size=3, progress=False))
        assert unembed_calls == []  # the logits were never computed
        assert hook_counts(tiny) == before
        with torch.no_grad():
            again = tiny(seqs)
        assert unembed_calls == [1]
        assert torch.equal(again, logits)
    finally:
        handle.remove()
        tiny.reset_hooks()
    for i, name in enumerate(sites.values()):
        assert torch.equal(stack[i], cache[name]), name
