"""Hook hygiene: the lens removes exactly the hooks it added, and composes with the user's own."""

from __future__ import annotations

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import hook_counts


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
