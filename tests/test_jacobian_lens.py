"""The Jacobian lens: the fit against brute-force Jacobians and TransformerLens 4.3's estimator, the
readout against TransformerLens's own, hooks, save/load and the TransformerLens artifact format."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces.evaluation import evaluate_lenses
from tl_latentspaces.hooks import HookSession, hook_counts
from tl_latentspaces.jacobian_lens import JacobianLens, fit_jacobian_lens
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.tuned_lens import ModelIdentity

from conftest import EIFFEL, GPT_LIKE, LLAMA_LIKE, TL_MAJOR, build_bridge, build_hooked

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = Path(__file__).parent / "data" / "tuned_lens_pkg" / "model"
needs_tl43 = pytest.mark.skipif(TL_MAJOR < 4, reason="TransformerLens's JacobianLens needs TransformerLens >= 4.3")


def _seqs(n: int = 2, length: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(seed))


def _brute_force(model, ids: torch.Tensor, layer: int, skip: int) -> torch.Tensor:
    """J for ``"{layer}_pre"`` by torch.autograd.functional.jacobian, one sequence at a time, averaged.

    The final residual is summed over valid target positions; by causality a target before the
    source contributes nothing, so this is the sum over ``t' >= t``.
    """
    access = ModelAccess(model)
    L = access.n_layers
    src, tgt = f"blocks.{layer}.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post"
    out = []
    for row in ids:
        seq = row[None]
        valid = torch.arange(skip, seq.shape[1] - 1)
        state: dict = {}
        # Capture the source once, then differentiate a forward pass that plants x there.
        with HookSession(access) as session:
            session.add(src, lambda act, hook=None: state.__setitem__("h0", act.detach().clone()))
            with torch.no_grad():
                model(seq)

        def f(x):
            with HookSession(access) as session:
                session.add(src, lambda act, hook=None: x)
                session.add(tgt, lambda act, hook=None: state.__setitem__("final", act))
                model(seq)
            return state["final"][0, valid].sum(0)

        jac = torch.autograd.functional.jacobian(f, state["h0"])  # [d, 1, S, d]
        out.append(jac[:, 0, valid, :].double().mean(1))
    return torch.stack(out).mean(0)


# ---------------------------------------------------------------------- the fit, every model class
def test_exact_fit_equals_brute_force_jacobians(tiny):
    ids = _seqs()
    before = hook_counts(tiny)
    lens = fit_jacobian_lens(tiny, ids, seq_len=12, skip_first_positions=3, dim_batch=24, max_tokens=None,
                             progress=False)
    assert hook_counts(tiny) == before
    L = tiny.cfg.n_layers
    assert lens.labels == [f"{layer}_pre" for layer in range(L)]
    for layer in range(L):
        ref = _brute_force(tiny, ids, layer, skip=3)
        torch.testing.assert_close(lens.matrices[f"{layer}_pre"].double(), ref, atol=2e-5, rtol=1e-4)
    # Not the identity: the test would not see a lens that ignores the model.
    assert float((lens.matrices["0_pre"] - torch.eye(tiny.cfg.d_model)).abs().max()) > 0.05
    access = ModelAccess(tiny)
    kind = "hooked" if access.kind == "hooked" else ("bridge-compat" if access.compatibility_mode else "bridge-raw")
    assert lens.info["model_kind"] == kind


def test_fit_composes_with_user_hooks_and_leaves_them(tiny):
    """An ablation the user registered upstream of the target changes the Jacobian exactly as the
    brute force with that hook sees it; the user's hook stays registered, ours are gone."""
    ids = _seqs(1)
    hp = tiny.hook_dict["blocks.1.hook_attn_out"]

    def halve(act, hook=None):
        return act * 0.5

    hp.add_hook(halve)
    user = hp.fwd_hooks[-1]
    try:
        before = hook_counts(tiny)
        lens = fit_jacobian_lens(tiny, ids, seq_len=12, skip_first_positions=3, dim_batch=64, max_tokens=None,
                                 progress=False, layers=["1_pre"])
        assert hook_counts(tiny) == before
        assert list(hp.fwd_hooks) == [user]
        with_hook = _brute_force(tiny, ids, 1, skip=3)
        torch.testing.assert_close(lens.matrices["1_pre"].double(), with_hook, atol=2e-5, rtol=1e-4)
    finally:
        user.hook.remove()
        if user in hp.fwd_hooks:
            hp.fwd_hooks.remove(user)
    without = _brute_force(tiny, ids, 1, skip=3)
    assert float((with_hook - without).abs().max()) > 1e-3  # the hook mattered


def test_sketch_with_full_probes_is_exact_and_converges(tiny):
    ids = _seqs(1)
    d = tiny.cfg.d_model
    kw = dict(seq_len=12, skip_first_positions=3, max_tokens=None, progress=False, layers=[0, 2], dim_batch=64)
    exact = fit_jacobian_lens(tiny, ids, **kw)
    full = fit_jacobian_lens(tiny, ids, mode="sketch", probes=d, **kw)
    for label in exact.labels:
        torch.testing.assert_close(full.matrices[label], exact.matrices[label], atol=2e-5, rtol=1e-4)
    # The same sequence many times: the sketch's error shrinks like 1/sqrt(n).
    errs = []
    for n in (4, 64):
        sk = fit_jacobian_lens(tiny, ids.expand(n, -1), mode="sketch", probes=8, **kw)
        errs.append(float((sk.matrices["0_pre"] - exact.matrices["0_pre"]).norm() / exact.matrices["0_pre"].norm()))
    assert errs[1] < 0.5 * errs[0], errs
    assert full.name == "jacobian_sketch" and full.info["fit"]["probes"] == d


def test_interrupted_fit_resumes_to_the_same_lens(tmp_path, monkeypatch):
    import tl_latentspaces.jacobian_lens as jl

    model = build_hooked(LLAMA_LIKE) if TL_MAJOR < 4 else build_bridge(LLAMA_LIKE)
    ids = _seqs(4)
    kw = dict(seq_len=12, skip_first_positions=3, max_tokens=None, progress=False, mode="sketch", probes=8,
              layers=[0, 2])
    whole = fit_jacobian_lens(model, ids, **kw)
    real, calls = jl._sequence_rows, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(jl, "_sequence_rows", flaky)
    before = hook_counts(model)
    with pytest.raises(KeyboardInterrupt):
        fit_jacobian_lens(model, ids, checkpoint_dir=tmp_path, **kw)
    assert hook_counts(model) == before
    monkeypatch.setattr(jl, "_sequence_rows", real)
    resumed = fit_jacobian_lens(model, ids, checkpoint_dir=tmp_path, **kw)
    assert resumed.info["n_prompts"] == 4
    for label in whole.labels:
        torch.testing.assert_close(resumed.matrices[label], whole.matrices[label], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="belongs to another corpus"):
        fit_jacobian_lens(model, ids, checkpoint_dir=tmp_path, **{**kw, "probes": 4})
    # a folder holding a checkpoint of the earlier safetensors format is refused, naming the file
    old_format = tmp_path / "old"
    old_format.mkdir()
    (old_format / "jacobian-lens-rank0.safetensors").write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"jacobian-lens-rank0\.safetensors.*another checkpoint_dir"):
        fit_jacobian_lens(model, ids, checkpoint_dir=old_format, **kw)


def test_fit_bad_input(tiny):
    ids = _seqs()
    with pytest.raises(ValueError, match="mode must be one of"):
        fit_jacobian_lens(tiny, ids, seq_len=12, mode="fast", progress=False)
    with pytest.raises(ValueError, match="leaves no valid position"):
        fit_jacobian_lens(tiny, ids, seq_len=12, skip_first_positions=11, progress=False)
    with pytest.raises(ValueError, match="layers must hold"):
        fit_jacobian_lens(tiny, ids, seq_len=12, layers=["3_mid"], skip_first_positions=2, progress=False)
    for seed, needle in ((1.7, "seed must be an int >= 0, got float"), (-1, "seed must be an int >= 0, got -1")):
        with pytest.raises(ValueError, match=needle):
            fit_jacobian_lens(tiny, ids, seq_len=12, skip_first_positions=2, seed=seed, progress=False)
    # probes belong to the sketch: an exact fit ignores them
    kw = dict(seq_len=12, skip_first_positions=3, max_tokens=None, progress=False, layers=[0], dim_batch=64)
    exact = fit_jacobian_lens(tiny, ids[:1], probes=1000, **kw)
    assert torch.equal(exact.matrices["0_pre"], fit_jacobian_lens(tiny, ids[:1], **kw).matrices["0_pre"])
    tiny.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            fit_jacobian_lens(tiny, ids, seq_len=12, progress=False)
    finally:
        tiny.eval()


# ---------------------------------------------------------------------- readout
def test_transform_hidden_refuses_what_is_not_a_stack_label(tiny):
    lens = _random_jlens(tiny)
    h = torch.randn(3, tiny.cfg.d_model)
    torch.testing.assert_close(lens.transform_hidden(h, "1_pre"), h @ lens.matrices["1_pre"].T)
    assert torch.equal(lens.transform_hidden(h, "final_post"), h)
    for label in (1, "foo", f"{tiny.cfg.n_layers}_pre"):  # an int is TransformerLens's layer numbering
        with pytest.raises(ValueError, match=r"reads the stack labels '0_pre'\.\..* and 'final_post'; got"):
            lens.transform_hidden(h, label)
    with pytest.raises(ValueError, match="incl_mid=False"):
        lens.translate(h, "1_mid")


def _random_jlens(model, seed: int = 0, labels=None) -> JacobianLens:
    g = torch.Generator().manual_seed(seed)
    d, L = model.cfg.d_model, model.cfg.n_layers
    labels = labels or [f"{layer}_pre" for layer in range(L)]
    mats = {label: torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) for label in labels}
    return JacobianLens(ModelIdentity.of(model), mats, name="jl")


def test_readout_matches_direct_formula_and_evaluates(tiny, tokens):
    L = tiny.cfg.n_layers
    lens = _random_jlens(tiny, labels=[f"{layer}_pre" for layer in range(1, L)])  # 0_pre read unchanged
    r = tll.read_lenses(tiny, tokens, lenses=("logit", lens), top_k=3)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n in names)
        for e, label in enumerate(r["jl"].labels):
            h = cache[names[e]].float()
            if label in lens.matrices:
                h = h @ lens.matrices[label].T
            z = tiny.ln_final(h) @ tiny.W_U + tiny.b_U
            p = torch.softmax(z.double(), -1).topk(3)
            torch.testing.assert_close(r["jl"].top_probs[e].double(), p.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r["jl"].top_probs[0], r["logit"].top_probs[0])  # no matrix: the logit lens
    ev = evaluate_lenses(tiny, ("logit", lens), _seqs(3, 10), progress=False)
    torch.testing.assert_close(ev.kl_to_final[0, 0], ev.kl_to_final[1, 0])
    assert float((ev.kl_to_final[0, 1:-1] - ev.kl_to_final[1, 1:-1]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="no matrix for stack entry"):
        tll.read_lenses(tiny, tokens, lenses=(lens,), incl_mid=True)
    with tll.lens_session(tiny, tokens, lenses=(lens,), top_k=3) as s:
        tiny(s.tokens)
    torch.testing.assert_close(s.results["jl"].top_probs, r["jl"].top_probs)


def test_lens_refuses_another_model_and_another_basis(tiny, tokens):
    other = build_hooked(GPT_LIKE, seed=5) if TL_MAJOR < 4 else build_bridge(GPT_LIKE, seed=5)
    lens = _random_jlens(tiny)
    with pytest.raises(ValueError, match="does not fit model"):
        tll.read_lenses(other, tokens, lenses=(lens,))
    if TL_MAJOR >= 4:
        raw = build_bridge(LLAMA_LIKE)
        compat = build_bridge(LLAMA_LIKE, compat=True)
        with pytest.raises(ValueError, match="unembedding fingerprint"):
            tll.read_lenses(compat, tokens, lenses=(_random_jlens(raw),))


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_refusals(tmp_path, tiny):
    lens = _random_jlens(tiny, labels=["0_pre", "2_pre"])
    lens.info["note"] = "x"
    path = lens.save(tmp_path / "jl")
    back = JacobianLens.load(path, tiny)
    assert back.labels == lens.labels and back.name == "jl" and back.info == lens.info
    for label in lens.labels:
        assert torch.equal(back.matrices[label], lens.matrices[label])
    other = build_hooked(GPT_LIKE, seed=5) if TL_MAJOR < 4 else build_bridge(GPT_LIKE, seed=5)
    with pytest.raises(ValueError, match="does not fit model"):
        JacobianLens.load(path, other)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        lens.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="not a Jacobian lens folder"):
        JacobianLens.load(tmp_path / "mine", tiny)
    good = json.loads((path / "jacobian_lens.json").read_text())
    for damaged, match in (("[1, 2]", "holds a JSON list, not the object"), ("{", "not valid JSON"),
                           ('{"format": "other"}', "is not a"), (b"\xff\xfe", "not valid JSON .*utf-8"),
                           (json.dumps({**good, "info": [1]}), "'info' must be a JSON object, got list")):
        target = path / "jacobian_lens.json"
        target.write_bytes(damaged) if isinstance(damaged, bytes) else target.write_text(damaged)
        with pytest.raises(ValueError, match=match):
            JacobianLens.load(path, tiny)
    with pytest.raises(TypeError, match="info must be a dict of JSON-serialisable notes, got list"):
        JacobianLens(lens.identity, lens.matrices, info=[1])


# ---------------------------------------------------------------------- TransformerLens 4.3
@pytest.fixture(scope="module")
def raw_bridge():
    """A tiny random Llama as a raw Hugging Face TransformerBridge with a word-level tokenizer."""
    if TL_MAJOR < 4:
        pytest.skip("needs TransformerLens >= 4.3")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.norm.weight.copy_(1 + 0.5 * torch.randn(32))
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    model = TransformerBridge.boot_transformers("tiny-llama-4", hf_model=hf, tokenizer=tok, device="cpu")
    return model.eval()


def _prompts(n: int = 3, words: int = 20, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (words,), generator=g)) for _ in range(n)]


@needs_tl43
def test_exact_fit_equals_transformer_lens_fit(raw_bridge):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    prompts = _prompts()
    tl = TLJacobianLens.fit(raw_bridge, prompts, corpus="test", max_seq_len=16, dim_batch=8,
                            skip_first_positions=4, show_progress=False)
    ids = torch.cat([raw_bridge.to_tokens(p)[:, :16] for p in prompts])
    ours = fit_jacobian_lens(raw_bridge, ids, seq_len=16, skip_first_positions=4, dim_batch=8, max_tokens=None,
                             progress=False)
    assert tl.source_layers == [0, 1, 2]
    for layer, J in tl.jacobians.items():
        torch.testing.assert_close(ours.matrices[f"{layer + 1}_pre"], J, atol=1e-5, rtol=1e-5)
    back = ours.to_transformer_lens()
    assert back.source_layers == tl.source_layers
    for layer in tl.source_layers:
        assert torch.equal(back.jacobians[layer], ours.matrices[f"{layer + 1}_pre"])


@needs_tl43
def test_transformer_lens_lens_reads_as_its_own_readout(raw_bridge):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    tl = TLJacobianLens.fit(raw_bridge, _prompts(2), corpus="test", max_seq_len=16, dim_batch=16,
                            skip_first_positions=4, show_progress=False)
    prompt = _prompts(1, words=9, seed=5)[0]
    ref = tl.readout(raw_bridge, prompt, top_k=5, return_full_logits=True)
    r = tll.read_lenses(raw_bridge, prompt, lenses=("logit", tl), top_k=5)
    for layer in tl.source_layers:
        e = r["jacobian"].labels.index(f"{layer + 1}_pre")
        assert torch.equal(r["jacobian"].top_ids[e, 0], ref.lens_topk_indices[layer])
        p = torch.softmax(ref.lens_logits[layer].double(), -1).topk(5).values
        torch.testing.assert_close(r["jacobian"].top_probs[e, 0].double(), p, atol=1e-6, rtol=1e-5)
    # The final entry is the model's own prediction in both.
    assert torch.equal(r["jacobian"].top_ids[-1, 0], ref.model_topk_indices)
    ev = evaluate_lenses(raw_bridge, ("logit", tl), torch.cat([raw_bridge.to_tokens(p)[:, :16] for p in _prompts(2)]),
                         progress=False)
    assert ev.lenses == ["logit", "jacobian"]


@needs_tl43
def test_transformer_lens_model_check_is_kept(raw_bridge, tokens):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    tl = TLJacobianLens.fit(raw_bridge, _prompts(1), corpus="test", max_seq_len=16, dim_batch=32,
                            skip_first_positions=4, show_progress=False)
    compat = build_bridge(LLAMA_LIKE, compat=True)
    with pytest.raises(ValueError, match="compatibility mode"):
        tll.read_lenses(compat, tokens, lenses=(tl,))
    # Another raw bridge of the same sizes but another name: refused by TransformerLens's check.
    tl.metadata["model_name"] = "another-model"
    with pytest.raises(ValueError, match="another-model"):
        tll.read_lenses(raw_bridge, _prompts(1)[0], lenses=(tl,))


@needs_tl43
def test_transformer_lens_artifact_round_trip_and_safe_loading(tmp_path, raw_bridge):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    ids = torch.cat([raw_bridge.to_tokens(p)[:, :16] for p in _prompts(2)])
    ours = fit_jacobian_lens(raw_bridge, ids, seq_len=16, skip_first_positions=4, max_tokens=None, progress=False)
    path = ours.save_transformer_lens_format(tmp_path / "lens.pt", dtype=torch.float32)
    theirs = TLJacobianLens.load(str(path))
    theirs.validate_model(raw_bridge)
    for layer in theirs.source_layers:
        assert torch.equal(theirs.jacobians[layer], ours.matrices[f"{layer + 1}_pre"])
    back = JacobianLens.load_transformer_lens_format(path, raw_bridge)
    assert back.labels == ["1_pre", "2_pre", "3_pre"]  # 0_pre has no TransformerLens layer
    # TransformerLens's own save (float16 by default) loads too.
    theirs.save(str(tmp_path / "tl.pt"))
    again = JacobianLens.load_transformer_lens_format(tmp_path / "tl.pt", raw_bridge)
    torch.testing.assert_close(again.matrices["2_pre"], ours.matrices["2_pre"], atol=2e-3, rtol=1e-3)

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"J": Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        JacobianLens.load_transformer_lens_format(tmp_path / "evil.pt", raw_bridge)
    assert not marker.exists()


@needs_tl43
def test_export_refuses_a_lens_of_another_basis():
    compat = build_bridge(LLAMA_LIKE, compat=True)
    lens = fit_jacobian_lens(compat, _seqs(1), seq_len=12, skip_first_positions=3, max_tokens=None, progress=False,
                             layers=[1])
    with pytest.raises(ValueError, match="raw TransformerBridge"):
        lens.to_transformer_lens()


# ---------------------------------------------------------------------- the default model
@pytest.mark.integration
@needs_tl43
def test_default_model_fit_and_readout_equal_transformer_lens(smol):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    prompt = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    ids = smol.to_tokens(prompt)[:, :12]
    tl = TLJacobianLens.fit(smol, [prompt], corpus="test", max_seq_len=12, dim_batch=96, skip_first_positions=6,
                            show_progress=False)
    ours = fit_jacobian_lens(smol, ids, seq_len=12, skip_first_positions=6, dim_batch=96, max_tokens=None,
                             progress=False, layers=range(1, 30))
    worst = max(float((ours.matrices[f"{layer + 1}_pre"] - J).abs().max()) for layer, J in tl.jacobians.items())
    assert worst < 1e-3, worst
    ref = tl.readout(smol, EIFFEL, top_k=5)
    r = tll.read_lenses(smol, EIFFEL, lenses=(tl,), top_k=5)["jacobian"]
    for layer in tl.source_layers:
        assert torch.equal(r.top_ids[r.labels.index(f"{layer + 1}_pre"), 0], ref.lens_topk_indices[layer])
