"""A lens of the user's own (``tll.Lens``: a name and ``translate(x, label)``) reads wherever a
built-in lens does, through the model's own readout."""

from __future__ import annotations

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces.hooks import hook_counts

FIELDS = ("top_ids", "top_probs", "top_scores", "entropy", "kl_to_final", "final_top1", "target_probs", "target_ranks")


class Rotation:
    """The README's example: a fixed random rotation of the residual basis (final_post unchanged)."""

    name = "rotation"

    def __init__(self, d_model: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.Q = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=torch.float64))[0].float()
        self.labels: list[str] = []

    def translate(self, x, label):
        self.labels.append(label)
        return x if label == "final_post" else x @ self.Q.to(x.device)


class Identity:
    name = "identity"

    def translate(self, x, label):
        return x


class PreOnly(Identity):
    name = "pre_only"

    def translate(self, x, label):
        if label.endswith("_mid"):
            raise ValueError(f"nothing for {label}")
        return x


def _direct(model, tokens, Q):
    """Every stack entry rotated by Q, then the model's own ln_final and unembedding, float64."""
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        out = []
        for e, name in enumerate(names):
            h = cache[name] if e == L else cache[name] @ Q
            out.append((model.ln_final(h).double() @ model.W_U.double() + model.b_U.double()))
    return logits.double(), out


def test_a_user_lens_is_a_lens(tiny):
    assert isinstance(Rotation(tiny.cfg.d_model), tll.Lens)
    assert not isinstance(object(), tll.Lens)


def test_identity_lens_equals_the_logit_lens_exactly(tiny, tokens):
    logit = tll.read_lenses(tiny, tokens, lenses=("logit",), targets=[3, 7])["logit"]
    alone = tll.read_lenses(tiny, tokens, lenses=(Identity(),), targets=[3, 7])["identity"]
    both = tll.read_lenses(tiny, tokens, lenses=("logit", Identity()), targets=[3, 7])
    for field in FIELDS:
        # Read in the same call, bit for bit.
        assert torch.equal(getattr(both["identity"], field), getattr(both["logit"], field)), field
        # Read alone, the final distribution comes from a row of its own; the KL's sums can
        # round in the last bit.
        if field == "kl_to_final":
            torch.testing.assert_close(alone.kl_to_final, logit.kl_to_final, atol=1e-7, rtol=0)
        else:
            assert torch.equal(getattr(alone, field), getattr(logit, field)), field


def test_rotation_lens_matches_the_direct_formula(tiny, tokens):
    lens = Rotation(tiny.cfg.d_model)
    r = tll.read_lenses(tiny, tokens, lenses=("logit", lens), top_k=4)["rotation"]
    logits, direct = _direct(tiny, tokens, lens.Q.double().float())
    p_final = torch.softmax(logits, -1)
    for e, z in enumerate(direct):
        logq = torch.log_softmax(z, -1)
        kl = (p_final * (p_final.log() - logq)).sum(-1).clamp_min(0)
        torch.testing.assert_close(r.kl_to_final[e].double(), kl, atol=5e-5, rtol=1e-4)
        assert torch.equal(r.top_ids[e], z.topk(4, -1).indices)
    assert float(r.kl_to_final[0].mean()) > 1e-2  # the rotation changes what the lens reads
    # Every label was tried before the read, then read: the stack labels, no entry numbers.
    assert set(lens.labels) == set(r.labels)


def test_user_lens_in_a_session_an_evaluation_and_a_grid(tiny, tokens):
    lens = Rotation(tiny.cfg.d_model, seed=3)
    direct = tll.read_lenses(tiny, tokens, lenses=("logit", lens), top_k=3)
    before = hook_counts(tiny)
    with tll.lens_session(tiny, tokens, lenses=("logit", lens), top_k=3) as s:
        with torch.no_grad():
            tiny(s.tokens)
    assert hook_counts(tiny) == before
    for field in FIELDS[:5]:
        torch.testing.assert_close(getattr(s.results["rotation"], field), getattr(direct["rotation"], field))
    # The evaluation's per-entry KL is the readout's, averaged over the positions it scores
    # (neither the first nor the last of a sequence).
    ev = tll.evaluate_lenses(tiny, ("logit", lens), tokens, progress=False)
    assert ev.lenses == ["logit", "rotation"]
    want = direct["rotation"].kl_to_final[:, :, 1:-1].double().mean((1, 2))
    torch.testing.assert_close(torch.as_tensor(ev.kl_to_final[1]).double(), want, atol=1e-5, rtol=1e-5)
    view = tll.lens_grid(direct)
    assert [lens_props["name"] for lens_props in view.props["lenses"]] == ["logit", "rotation"]


def test_a_label_the_lens_refuses_fails_before_the_forward_pass(tiny, tokens):
    seen = []
    hp = tiny.hook_dict["blocks.0.hook_resid_pre"]
    hp.add_hook(lambda act, hook: seen.append(1))
    try:
        with pytest.raises(ValueError, match="nothing for 0_mid"):
            tll.read_lenses(tiny, tokens, lenses=("logit", PreOnly()), incl_mid=True)
        assert seen == []  # refused before the model ran
        r = tll.read_lenses(tiny, tokens, lenses=(PreOnly(),))["pre_only"]
        assert r.labels[-1] == "final_post"
    finally:
        hp.remove_hooks()


def test_bad_user_lenses_get_clear_errors(tiny, tokens):
    class Wrong(Identity):
        name = "wrong"

        def translate(self, x, label):
            return x[:, :-1]

    with pytest.raises(ValueError, match=r"lens 'wrong': translate\(x, '0_pre'\) must return a real floating-point tensor"):
        tll.read_lenses(tiny, tokens, lenses=(Wrong(),))

    class NotFinite(Identity):
        name = "not_finite"

        def translate(self, x, label):
            return x / x.norm(dim=-1, keepdim=True) * 0.0 / 0.0 if x.shape[0] else x  # NaN on real rows only

    with pytest.raises(ValueError, match=r"lens 'not_finite': translate\(x, '0_pre'\) returned \d+ NaN or inf"):
        tll.read_lenses(tiny, tokens, lenses=(NotFinite(),))

    class Complex(Identity):
        name = "complex"

        def translate(self, x, label):
            return x.to(torch.complex64)

    with pytest.raises(ValueError, match=r"real floating-point tensor .* torch.complex64"):
        tll.read_lenses(tiny, tokens, lenses=(Complex(),))

    class Nameless:
        name = ""

        def translate(self, x, label):
            return x

    with pytest.raises(ValueError, match="translate\\(x, label\\)"):
        tll.read_lenses(tiny, tokens, lenses=(Nameless(),))
    with pytest.raises(ValueError, match="once per call"):
        tll.read_lenses(tiny, tokens, lenses=(Identity(), Identity()))


def test_a_lens_that_edits_its_input_in_place_changes_no_other_lens(tiny, tokens):
    class Zeroing(Identity):
        name = "zeroing"

        def translate(self, x, label):
            return x.mul_(0.5)

    alone = tll.read_lenses(tiny, tokens, lenses=("logit", "embedding"))
    mixed = tll.read_lenses(tiny, tokens, lenses=(Zeroing(), "logit", "embedding"))
    for name in ("logit", "embedding"):
        torch.testing.assert_close(mixed[name].entropy, alone[name].entropy, atol=0, rtol=0)
        torch.testing.assert_close(mixed[name].top_ids, alone[name].top_ids, atol=0, rtol=0)


def test_stack_labels_map_to_layers():
    from tl_latentspaces.model import pre_layer

    assert [pre_layer(f"{i}_pre", 4) for i in range(4)] == [0, 1, 2, 3]
    for label in ("4_pre", "3_mid", "final_post", "x_pre", "_pre", 3, None):
        assert pre_layer(label, 4) is None, label
