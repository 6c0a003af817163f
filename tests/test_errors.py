"""Bad input gets a clear error naming what was received and what is valid, before any forward pass."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import hook_counts


def test_empty_prompt(tiny):
    with pytest.raises(ValueError, match="empty"):
        tll.logit_lens(tiny, "")
    with pytest.raises(ValueError, match="empty"):
        tll.logit_lens(tiny, ["fine", "   "])
    with pytest.raises(ValueError, match="empty"):
        tll.logit_lens(tiny, torch.zeros(1, 0, dtype=torch.long))


def test_input_longer_than_context(tiny):
    n_ctx = tiny.cfg.n_ctx
    with pytest.raises(ValueError, match=f"{n_ctx + 1} tokens long.*n_ctx={n_ctx}"):
        tll.logit_lens(tiny, torch.zeros(1, n_ctx + 1, dtype=torch.long))


def test_token_ids_outside_vocabulary(tiny):
    with pytest.raises(ValueError, match=r"\[0, 100\).*100"):
        tll.logit_lens(tiny, torch.tensor([[1, 100]]))


def test_unknown_layer_or_site(tiny, tokens):
    with pytest.raises(ValueError, match="out of range.*0_pre"):
        tll.logit_lens(tiny, tokens, layers=[17])
    with pytest.raises(ValueError, match="unknown stack entry '9_mid'"):
        tll.logit_lens(tiny, tokens, layers=["9_mid"])
    with pytest.raises(ValueError, match="unknown residual site 'resid_middle'"):
        tll.ModelAccess(tiny).site_name(0, "resid_middle")


def test_model_access_of_reuses_a_view_and_refuses_other_objects(tiny):
    access = tll.ModelAccess.of(tiny)
    assert tll.ModelAccess.of(access) is access and access.model is tiny
    assert torch.equal(access.W_U, tll.ModelAccess(tiny).W_U)
    with pytest.raises(TypeError, match="expected a TransformerLens model.*got builtins.int"):
        tll.ModelAccess.of(3)


def test_position_out_of_range(tiny, tokens):
    with pytest.raises(ValueError, match="position 9 is out of range.*9 tokens"):
        tll.logit_lens(tiny, tokens, pos=[0, 9])


@pytest.mark.parametrize("k", [0, 101, -1, 2.5, True])
def test_top_k_out_of_range(tiny, tokens, k):
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 100\]"):
        tll.logit_lens(tiny, tokens, top_k=k)


def test_bad_targets(tiny, tokens):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tll.logit_lens(tiny, tokens, targets=[3, 1000])
    with pytest.raises(ValueError, match="target tensor must be"):
        tll.logit_lens(tiny, tokens, targets=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokenizer"):
        tll.logit_lens(tiny, tokens, targets=" Paris")  # tiny models have no tokenizer


def test_integer_scalars_of_any_kind_and_clear_errors_for_the_rest(tiny, tokens):
    """numpy and 0-d tensor integers select like ints; floats and non-sequences get a message, not a TypeError."""
    want = tll.logit_lens(tiny, tokens, targets=[5], pos=1, layers=[2])
    for i in (np.int64(1), torch.tensor(1)):
        got = tll.logit_lens(tiny, tokens, targets=[np.int64(5)], pos=i, layers=[np.int64(2)])
        assert torch.equal(got.target_ranks, want.target_ranks) and got.positions == want.positions == [1]
    assert torch.equal(tll.logit_lens(tiny, tokens, targets=np.int64(5)).target_ranks,
                       tll.logit_lens(tiny, tokens, targets=5).target_ranks)
    assert torch.equal(tll.logit_lens(tiny, tokens.to(torch.int8)).top_ids, tll.logit_lens(tiny, tokens).top_ids)
    with pytest.raises(ValueError, match=r"pos must be an int, a slice or a list of ints, got float \(1.0\)"):
        tll.logit_lens(tiny, tokens, pos=1.0)
    with pytest.raises(ValueError, match=r"targets must be a token string, a token id, .* got float \(3.5\)"):
        tll.logit_lens(tiny, tokens, targets=3.5)
    with pytest.raises(ValueError, match="the target tensor has no targets"):
        tll.logit_lens(tiny, tokens, targets=torch.zeros(*tokens.shape, 0, dtype=torch.long))
    r = tll.logit_lens(tiny, tokens, top_k=3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\] \(this readout kept the top 3\), got 3"):
        r.top_tokens(3)
    with pytest.raises(TypeError, match="between two LensResults, got int"):
        r.diff(5)


def test_a_cache_that_is_not_a_cache_or_of_another_model(tiny, tokens):
    for bad in (torch.zeros(3), [1, 2]):
        with pytest.raises(TypeError, match="cache must be an ActivationCache"):
            tll.logit_lens(tiny, tokens, cache=bad)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens)
    wide = {name: torch.cat([act, act], -1) if "resid" in name else act for name, act in cache.items()}
    with pytest.raises(ValueError, match=r"has 128 features, but this model's d_model is 64: the cache comes from "
                                         "another model"):
        tll.logit_lens(tiny, tokens, cache=wide)


def test_training_mode_is_refused(tiny, tokens):
    tiny.train()
    with pytest.raises(ValueError, match="training mode.*model.eval()"):
        tll.logit_lens(tiny, tokens)


def test_not_a_transformer_lens_model(tokens):
    with pytest.raises(TypeError, match="expected a TransformerLens model.*torch.nn.modules.linear.Linear"):
        tll.logit_lens(torch.nn.Linear(2, 2), tokens)


def test_nan_in_residual_names_the_layer(tiny, tokens):
    def poison(act, hook=None):
        act = act.clone()
        act[0, 3, 0] = float("nan")
        return act

    tiny.add_hook("blocks.1.hook_resid_post", poison)
    before = hook_counts(tiny)
    with pytest.raises(ValueError, match=r"NaN or inf at 2_pre \(blocks.2.hook_resid_pre\)"):
        tll.logit_lens(tiny, tokens)
    assert hook_counts(tiny) == before


def test_cache_without_residuals(tiny, tokens):
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    with pytest.raises(ValueError, match="cache has no activation 'blocks.2.hook_resid_post'"):
        tll.logit_lens(tiny, tokens, cache=cache)
    with pytest.raises(ValueError, match="input the cache was made from"):
        tll.logit_lens(tiny, tokens[:, :5], cache=cache, layers=[0])


def test_bad_lens_and_temperature(tiny, tokens):
    with pytest.raises(ValueError, match="unknown lens 'tuned'"):
        tll.read_lenses(tiny, tokens, lenses=("tuned",))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        tll.embedding_lens(tiny, tokens, temperature=0)


@pytest.mark.parametrize(
    "bad, hint",
    [
        ({"first": "some text"}, "mapping or a set has no fixed order"),
        ({"some text", "other text"}, "mapping or a set has no fixed order"),
        (42, "got int 42"),
        (3.5, "got float 3.5"),
    ],
)
def test_input_that_is_not_text_or_tokens(tiny, bad, hint):
    with pytest.raises(ValueError, match=f"input must be a string, a list or tuple of strings.*{hint}"):
        tll.logit_lens(tiny, bad)


def test_float_target_tensor_is_refused(tiny, tokens):
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        tll.logit_lens(tiny, tokens, targets=torch.full(tokens.shape, 3.7))
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.bool"):
        tll.logit_lens(tiny, tokens, targets=torch.ones(tokens.shape, dtype=torch.bool))


def test_empty_layers_and_lenses(tiny, tokens):
    with pytest.raises(ValueError, match="layers is empty"):
        tll.logit_lens(tiny, tokens, layers=[])
    with pytest.raises(ValueError, match="lenses is empty"):
        tll.read_lenses(tiny, tokens, lenses=())
    with pytest.raises(ValueError, match="lenses is empty"):
        tll.lens_session(tiny, tokens, lenses=[])
    # one lens given bare reads as that lens
    assert set(tll.read_lenses(tiny, tokens, lenses="embedding")) == {"embedding"}


def test_prepend_bos_with_a_token_tensor_warns(tiny, tokens):
    with pytest.warns(UserWarning, match="prepend_bos=True has no effect on a token tensor") as record:
        r = tll.logit_lens(tiny, tokens, prepend_bos=True)
    assert torch.equal(r.tokens, tokens)  # nothing was added
    # the warning points at the caller's line, not at the package's own frames
    assert [w.filename for w in record] == [__file__]
    with pytest.warns(UserWarning) as record:
        tll.read_lenses(tiny, tokens, lenses=("logit", "embedding"), prepend_bos=True)
    assert {w.filename for w in record} == {__file__}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tll.logit_lens(tiny, tokens)  # the default says nothing for tensors
        tll.logit_lens(tiny, tokens, prepend_bos=False)
    with pytest.raises(ValueError, match="prepend_bos must be True, False or None"):
        tll.logit_lens(tiny, tokens, prepend_bos="yes")


@pytest.mark.integration
def test_target_without_its_leading_space_warns(smol):
    with pytest.warns(UserWarning, match=r"'Paris'.*' Paris'") as record:
        r = tll.logit_lens(smol, "The Eiffel Tower is in the city of", targets="Paris", layers=[-1])
    assert len(record) == 1 and record[0].filename == __file__  # once per call, at the caller's line
    paris = smol.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert r.target_ids[0, 0, 0].item() == paris[0]  # still read as asked
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tll.logit_lens(smol, "The Eiffel Tower is in the city of", targets=" Paris", layers=[-1])
        tll.logit_lens(smol, "The Eiffel Tower is in the city of", targets=paris[0], layers=[-1])


@pytest.mark.integration
def test_a_position_counted_from_the_end_warns_where_it_is_padding(smol):
    prompts = ["The Eiffel Tower is in the city of", "Hi"]
    with pytest.warns(UserWarning, match=r"pos=-1 selects padding in batch rows \[1\]"):
        r = tll.logit_lens(smol, prompts, pos=-1)
    assert r.mask.tolist() == [[True], [False]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tll.logit_lens(smol, prompts, pos=0)  # every row's first token: no padding read
        tll.logit_lens(smol, prompts)  # all positions: padding is expected and masked
