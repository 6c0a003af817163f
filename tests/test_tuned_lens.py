"""The tuned lens: readout equalities, TransformerLens interop, save/load, the tuned-lens format,
and held-out evaluation checked against direct computation."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces.evaluation import evaluate_lenses
from tl_latentspaces.hooks import hook_counts
from tl_latentspaces.lenses import build_lenses
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.tuned_lens import PKG_CONFIG_FILE, PKG_PARAMS_FILE, TunedLens, tuned_lens

from conftest import GPT_LIKE, LLAMA_LIKE, TL_MAJOR, build_bridge, build_hooked

RESULT_FIELDS = ("top_ids", "top_probs", "top_scores", "entropy", "kl_to_final", "final_top1",
                 "target_probs", "target_ranks")
DATA = Path(__file__).parent / "data" / "tuned_lens_pkg"


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_lens(model, seed: int = 0, scale: float = 0.05) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    lens = TunedLens.for_model(model)
    L, d = lens.n_layers, lens.d_model
    with torch.no_grad():
        lens.weight.copy_(scale * torch.randn(L, d, d, generator=g))
        lens.bias.copy_(scale * torch.randn(L, d, generator=g))
    return lens


def _build(kind: str, cfg: dict, seed: int = 0):
    if kind == "hooked":
        return build_hooked(cfg, seed)
    return build_bridge(cfg, seed)


def _kind():
    return "hooked" if TL_MAJOR < 4 else "bridge"


def _stack(model, tokens):
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return logits, torch.stack([cache[n] for n in names])


# ---------------------------------------------------------------------- readout
def test_zero_initialised_lens_is_exactly_the_logit_lens(tiny, tokens):
    lens = TunedLens.for_model(tiny)
    logit = tll.logit_lens(tiny, tokens, top_k=7, targets=[3, 50])
    tuned = tuned_lens(tiny, tokens, lens, top_k=7, targets=[3, 50])
    assert tuned.lens == "tuned" and logit.lens == "logit"
    assert tuned.labels == logit.labels
    for field in RESULT_FIELDS:
        assert torch.equal(getattr(tuned, field), getattr(logit, field)), field


def test_tuned_lens_matches_direct_formula(tiny, tokens):
    lens = _random_lens(tiny)
    logits, stack = _stack(tiny, tokens)
    r = tuned_lens(tiny, tokens, lens, top_k=4, targets=[5])
    p_final = torch.softmax(logits.double(), -1)
    W_U, b_U = tiny.W_U.double(), tiny.b_U.double()
    L = tiny.cfg.n_layers
    for e in range(L + 1):
        h = stack[e].double()
        if e < L:  # translators in the tuned-lens package's residual form h + W h + b
            h = h + h @ lens.weight[e].double().T + lens.bias[e].double()
        with torch.no_grad():
            z = tiny.ln_final(h.float()).double() @ W_U + b_U
        logq = torch.log_softmax(z, -1)
        kl = (p_final * (p_final.log() - logq)).sum(-1)
        torch.testing.assert_close(r.kl_to_final[e].double(), kl.clamp_min(0), atol=5e-5, rtol=1e-4)
        assert torch.equal(r.top_ids[e], z.topk(4, -1).indices)
        torch.testing.assert_close(r.target_probs[e, ..., 0].double(), logq[..., 5].exp(), atol=1e-6, rtol=1e-4)
    # final_post has no translator: it reproduces the model's own prediction.
    assert r.kl_to_final[-1].abs().max() < 1e-5
    assert not torch.equal(r.top_probs[0], tll.logit_lens(tiny, tokens, top_k=4).top_probs[0])


def test_read_lenses_lens_session_and_user_hooks(tiny, tokens):
    lens = _random_lens(tiny, seed=1)
    both = tll.read_lenses(tiny, tokens, lenses=("logit", lens), top_k=3)
    alone = tuned_lens(tiny, tokens, lens, top_k=3)
    # Read beside the logit lens, the tuned lens's rows share its sweep of W_U: same tokens,
    # the same numbers to float32 rounding (the rows of a tile are summed in other groupings).
    for field in RESULT_FIELDS[:4]:
        if field == "top_ids":
            assert torch.equal(getattr(both["tuned"], field), getattr(alone, field)), field
        else:
            torch.testing.assert_close(getattr(both["tuned"], field), getattr(alone, field), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both["tuned"].kl_to_final, alone.kl_to_final, atol=1e-6, rtol=1e-5)
    # A user's ablation hook changes what the tuned lens reads downstream, and stays registered.
    ablate = lambda act, hook: act * 0.0  # noqa: E731
    hp = tiny.hook_dict["blocks.0.hook_attn_out"]
    hp.add_hook(ablate)
    try:
        before = hook_counts(tiny)
        with tll.lens_session(tiny, tokens, lenses=("logit", lens), top_k=3) as s:
            with torch.no_grad():
                tiny(s.tokens)
        assert hook_counts(tiny) == before
        patched = tuned_lens(tiny, tokens, lens, top_k=3)
    finally:
        hp.remove_hooks()
    assert torch.equal(s.results["tuned"].top_ids, patched.top_ids)
    assert torch.allclose(s.results["tuned"].kl_to_final, patched.kl_to_final)
    assert not torch.allclose(patched.kl_to_final[-1], alone.kl_to_final[-1]) or not torch.equal(
        patched.top_ids, alone.top_ids
    )


def test_callable_module_and_resid_mid_refused(tiny, tokens):
    import tl_latentspaces.tuned_lens as module

    lens = _random_lens(tiny)
    direct = tuned_lens(tiny, tokens, lens)
    via_module = module(tiny, tokens, lens)  # tl_latentspaces.tuned_lens(model, input, lens)
    assert torch.equal(direct.top_ids, via_module.top_ids)
    assert module.TunedLens is TunedLens and callable(module.default_tuned_lens)
    with pytest.raises(ValueError, match="no translator for stack entry '0_mid'"):
        tll.read_lenses(tiny, tokens, lenses=(lens,), incl_mid=True)
    with pytest.raises(ValueError, match="no translator for stack entry '0_mid'"):
        lens.translate(torch.zeros(0, tiny.cfg.d_model), "0_mid")


def test_lens_as_transformer_lens_callable(tiny, tokens):
    """``lens(entry, index)``: the translator TransformerLens's ``logit_lens(lens=...)`` applies."""
    lens = _random_lens(tiny, seed=2)
    _, stack = _stack(tiny, tokens)
    L = tiny.cfg.n_layers
    for index in range(L + 1):
        out = lens(stack[index], index)
        assert out.shape == stack[index].shape and out.dtype == stack[index].dtype
        if index == L:
            assert torch.equal(out, stack[index])
        else:
            ref = stack[index] + stack[index] @ lens.weight[index].T + lens.bias[index]
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        lens(stack[0], L + 1)


@pytest.mark.skipif(TL_MAJOR < 4, reason="transformer_lens.tools.analysis.logit_lens is TransformerLens >= 4.3")
@pytest.mark.parametrize("cfg", [GPT_LIKE, LLAMA_LIKE], ids=["gpt", "llama"])
def test_plugs_into_transformer_lens_logit_lens(cfg, tokens):
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    model = build_bridge(cfg)
    lens = _random_lens(model, seed=3)
    theirs = tl_logit_lens(model, tokens, positions=None, lens=lens, top_k=5)
    ours = tuned_lens(model, tokens, lens, top_k=5)
    assert list(theirs.labels) == ours.labels
    assert torch.equal(theirs.readout.top_ids, ours.top_ids)
    torch.testing.assert_close(theirs.readout.values, ours.top_scores, atol=1e-4, rtol=1e-5)
    # A zero lens through their callable is their plain logit lens.
    plain = tl_logit_lens(model, tokens, positions=None, top_k=5)
    zero = tl_logit_lens(model, tokens, positions=None, lens=TunedLens.for_model(model), top_k=5)
    assert torch.equal(plain.readout.values, zero.readout.values)
    assert not torch.equal(plain.readout.top_ids, theirs.readout.top_ids)


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trips_bit_exactly(tmp_path, tiny):
    lens = _random_lens(tiny, seed=4)
    # The translators are the lens's only parameters: no model weight is part of it.
    L, d = tiny.cfg.n_layers, tiny.cfg.d_model
    assert {n: tuple(p.shape) for n, p in lens.named_parameters()} == {"weight": (L, d, d), "bias": (L, d)}
    lens.info["note"] = {"fitted_on": "tests", "kl": [1.5, 0.25]}
    out = lens.save(tmp_path / "lens")
    assert sorted(p.name for p in out.iterdir()) == ["tuned_lens.json", "tuned_lens.safetensors"]
    back = TunedLens.load(out, tiny)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.identity == lens.identity and back.info == lens.info
    config = json.loads((out / "tuned_lens.json").read_text())
    assert config["model"]["unembedding_fingerprint"] == ModelAccess(tiny).unembedding_fingerprint()
    # Saving again over a lens folder replaces its files atomically; no temporary file is left.
    lens2 = _random_lens(tiny, seed=5)
    lens2.save(out)
    assert torch.equal(TunedLens.load(out, tiny).weight, lens2.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


@pytest.mark.parametrize(
    "other, needle",
    [
        (dict(GPT_LIKE, n_layers=2), "n_layers: lens 3, model 2"),
        (dict(GPT_LIKE, d_vocab=120), "d_vocab: lens 100, model 120"),
        (GPT_LIKE, "unembedding fingerprint"),
    ],
    ids=["layers", "vocab", "weights"],
)
def test_load_refuses_another_model(tmp_path, other, needle):
    model = _build(_kind(), GPT_LIKE, seed=0)
    path = _random_lens(model).save(tmp_path / "lens")
    other_model = _build(_kind(), other, seed=1)
    with pytest.raises(ValueError, match=needle) as err:
        TunedLens.load(path, other_model)
    assert "fit_tuned_lens" in str(err.value)
    with pytest.raises(ValueError, match="does not fit model"):
        tll.read_lenses(other_model, torch.zeros(1, 3, dtype=torch.long), lenses=(_random_lens(model),))


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model = _build(_kind(), GPT_LIKE)
    old = _random_lens(model, seed=6)
    old.save(tmp_path / "lens")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        _random_lens(model, seed=7).save(tmp_path / "lens")
    with pytest.raises(OSError):
        _random_lens(model, seed=7).save(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]
    monkeypatch.undo()
    assert torch.equal(TunedLens.load(tmp_path / "lens", model).weight, old.weight)


def test_save_refuses_to_replace_other_files(tmp_path):
    model = _build(_kind(), GPT_LIKE)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a lens folder"):
        _random_lens(model).save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_load_refuses_missing_or_extra_layers(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _build(_kind(), GPT_LIKE)
    path = _random_lens(model).save(tmp_path / "lens")
    tensors = load_file(str(path / "tuned_lens.safetensors"))
    for bad in (tensors["weight"][:2], torch.cat([tensors["weight"], tensors["weight"][:1]])):
        save_file({"weight": bad.contiguous(), "bias": tensors["bias"]}, str(path / "tuned_lens.safetensors"))
        with pytest.raises(ValueError, match="layers are missing or extra"):
            TunedLens.load(path, model)
    save_file({**tensors, "extra": tensors["bias"].clone()}, str(path / "tuned_lens.safetensors"))
    with pytest.raises(ValueError, match=r"extra \['extra'\]"):
        TunedLens.load(path, model)
    with pytest.raises(FileNotFoundError, match="not a saved tuned lens"):
        TunedLens.load(tmp_path / "nowhere", model)


def _poisoned(model, layers=(1,), value=float("nan"), where="weight") -> TunedLens:
    lens = _random_lens(model)
    with torch.no_grad():
        for layer in layers:
            getattr(lens, where)[layer].view(-1)[5] = value
    return lens


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_lens_is_refused_at_read_time_naming_the_layers(tiny, tokens, value):
    lens = _poisoned(tiny, layers=(0, 2), value=value)
    needle = r"cannot read this tuned lens: the translator\(s\) of layer\(s\) \[0, 2\] hold NaN or inf"
    before = hook_counts(tiny)
    with pytest.raises(ValueError, match=needle):
        tll.read_lenses(tiny, tokens, lenses=("logit", lens))
    with pytest.raises(ValueError, match=needle):
        tuned_lens(tiny, tokens, lens)
    with pytest.raises(ValueError, match=needle):
        with tll.lens_session(tiny, tokens, lenses=(lens,)):
            pass
    with pytest.raises(ValueError, match=needle):
        evaluate_lenses(tiny, (lens,), torch.randint(0, 100, (2, 8)), progress=False)
    with pytest.raises(ValueError, match=needle):
        build_lenses(ModelAccess(tiny), [lens], 1.0)
    # TransformerLens's lens(entry, index) callable: a finite layer reads, a poisoned one is refused.
    _, stack = _stack(tiny, tokens)
    assert torch.isfinite(lens(stack[1], 1)).all()
    with pytest.raises(ValueError, match=needle):
        lens(stack[2], 2)
    assert hook_counts(tiny) == before  # nothing was left on the model
    bias_only = _poisoned(tiny, layers=(1,), value=value, where="bias")
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] .*\(bias of layer\(s\) \[1\]\)"):
        build_lenses(ModelAccess(tiny), [bias_only], 1.0)


def test_non_finite_lens_is_never_saved_nor_loaded(tmp_path):
    model = _build(_kind(), GPT_LIKE)
    lens = _poisoned(model, layers=(2,))
    saves = (lambda p: lens.save(p), lambda p: lens.save_tuned_lens_format(p, model),
             lambda p: lens.save_tuned_lens_format(p))
    for save in saves:
        with pytest.raises(ValueError, match=r"cannot save this tuned lens: the translator\(s\) of layer\(s\) \[2\]"):
            save(tmp_path / "lens")
        assert not (tmp_path / "lens").exists()
    # A file holding NaN (written by other code) is refused on load, naming the layer.
    from safetensors.torch import save as st_save

    good = _random_lens(model).save(tmp_path / "good")
    config = json.loads((good / "tuned_lens.json").read_text())
    data = st_save({"weight": lens.weight.detach().contiguous(), "bias": lens.bias.detach().contiguous()})
    (good / "tuned_lens.safetensors").write_bytes(data)
    config["params_sha256"] = hashlib.sha256(data).hexdigest()
    (good / "tuned_lens.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight holds NaN or inf values in the translator\(s\) of layer\(s\) \[2\]"):
        TunedLens.load(good, model)
    # a config whose info is not an object is damaged, and says which file
    other = _random_lens(model).save(tmp_path / "other")
    config = json.loads((other / "tuned_lens.json").read_text())
    (other / "tuned_lens.json").write_text(json.dumps({**config, "info": [1, 2]}))
    with pytest.raises(ValueError, match=r"tuned_lens.json: 'info' must be a JSON object, got list"):
        TunedLens.load(other, model)
    with pytest.raises(TypeError, match="info must be a dict of JSON-serialisable notes, got list"):
        TunedLens(lens.identity, info=[1, 2])


def test_save_over_a_lens_folder_keeps_other_files(tmp_path):
    model = _build(_kind(), GPT_LIKE)
    folder = _random_lens(model, seed=1).save(tmp_path / "lens")
    (folder / "README.md").write_text("how this lens was made")
    (folder / "runs").mkdir()
    (folder / "runs" / "notes.txt").write_text("mine")
    new = _random_lens(model, seed=2)
    new.save(folder)
    assert (folder / "README.md").read_text() == "how this lens was made"
    assert (folder / "runs" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "runs", "tuned_lens.json", "tuned_lens.safetensors"]
    assert torch.equal(TunedLens.load(folder, model).weight, new.weight)
    assert "previous" not in json.loads((folder / "tuned_lens.json").read_text())
    # The same for the tuned-lens package's format.
    pkg = new.save_tuned_lens_format(tmp_path / "pkg", model)
    (pkg / "README.md").write_text("package lens")
    _random_lens(model, seed=3).save_tuned_lens_format(pkg, model)
    assert (pkg / "README.md").read_text() == "package lens"
    assert torch.equal(TunedLens.load_tuned_lens_format(pkg, model).weight, _random_lens(model, seed=3).weight)


@pytest.mark.parametrize("crash_after", [0, 1, 2])
def test_interrupted_save_leaves_the_old_or_the_new_lens(tmp_path, monkeypatch, crash_after):
    """A save over a lens writes three files in turn; a crash after any of them leaves a readable lens."""
    import tl_latentspaces.files as files

    model = _build(_kind(), GPT_LIKE)
    old, new = _random_lens(model, seed=1), _random_lens(model, seed=2)
    folder = old.save(tmp_path / "lens")
    real, written = files.write_bytes_atomic, []

    def crashing(path, data, **kwargs):
        if len(written) == crash_after:
            raise KeyboardInterrupt
        written.append(Path(path).name)
        return real(path, data, **kwargs)

    monkeypatch.setattr(files, "write_bytes_atomic", crashing)
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    assert written == ["tuned_lens.json", "tuned_lens.safetensors"][:crash_after]
    assert sorted(p.name for p in folder.iterdir()) == ["tuned_lens.json", "tuned_lens.safetensors"]
    if crash_after == 1:  # the interim config, the old parameters: the old lens, with a warning
        with pytest.warns(UserWarning, match="a save that did not finish"):
            back = TunedLens.load(folder, model)
    else:
        back = TunedLens.load(folder, model)
    expected = new if crash_after == 2 else old
    assert torch.equal(back.weight, expected.weight) and torch.equal(back.bias, expected.bias)
    # A second save cut off at the same point leaves the lens the folder held, or the new one.
    written.clear()
    monkeypatch.setattr(files, "write_bytes_atomic", crashing)
    third = _random_lens(model, seed=3)
    with pytest.raises(KeyboardInterrupt):
        third.save(folder)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(TunedLens.load(folder, model).weight, (third if crash_after == 2 else old).weight)
    # A save that completes leaves a clean folder.
    last = _random_lens(model, seed=4)
    last.save(folder)
    assert "previous" not in json.loads((folder / "tuned_lens.json").read_text())
    assert torch.equal(TunedLens.load(folder, model).weight, last.weight)


def test_mismatched_lens_files_are_detected(tmp_path):
    model = _build(_kind(), GPT_LIKE)
    a = _random_lens(model, seed=1).save(tmp_path / "a")
    b = _random_lens(model, seed=2).save(tmp_path / "b")
    (a / "tuned_lens.safetensors").write_bytes((b / "tuned_lens.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not belong together") as err:
        TunedLens.load(a, model)
    assert "tuned_lens.json" in str(err.value) and "Save the lens again" in str(err.value)
    # A config written before the hash was recorded still loads.
    config = json.loads((b / "tuned_lens.json").read_text())
    del config["params_sha256"]
    (b / "tuned_lens.json").write_text(json.dumps(config))
    assert torch.equal(TunedLens.load(b, model).weight, _random_lens(model, seed=2).weight)


@pytest.mark.skipif(TL_MAJOR < 3, reason="compatibility mode is a TransformerBridge feature")
def test_lens_of_a_raw_model_names_the_mode_in_compatibility_mode(tmp_path):
    path = _random_lens(build_bridge(GPT_LIKE)).save(tmp_path / "lens")
    with pytest.raises(ValueError, match=r"mode: lens fitted on a TransformerBridge \(raw\), model is a "
                                         r"TransformerBridge \(compatibility mode\)"):
        TunedLens.load(path, build_bridge(GPT_LIKE, compat=True))


# ---------------------------------------------------------------------- tuned-lens package format
def test_tuned_lens_format_round_trips(tmp_path, tiny):
    lens = _random_lens(tiny, seed=8)
    out = lens.save_tuned_lens_format(tmp_path / "pkg", tiny)
    config = json.loads((out / PKG_CONFIG_FILE).read_text())
    # The fields of tuned_lens.nn.lenses.TunedLensConfig (tuned-lens 0.2.0).
    assert set(config) == {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias",
                           "base_model_revision", "unembed_hash", "lens_type"}
    assert config["lens_type"] == "linear_tuned_lens" and config["num_hidden_layers"] == tiny.cfg.n_layers
    state = torch.load(out / PKG_PARAMS_FILE, weights_only=True)
    L = tiny.cfg.n_layers
    assert set(state) == {f"{i}.{p}" for i in range(L) for p in ("weight", "bias")}
    assert torch.equal(state["1.weight"], lens.weight[1])
    back = TunedLens.load_tuned_lens_format(out, tiny)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    with pytest.raises(ValueError, match="tuned-lens package's format"):
        TunedLens.load(out, tiny)


def test_tuned_lens_format_missing_extra_and_mismatched(tmp_path):
    model = _build(_kind(), GPT_LIKE)
    out = _random_lens(model).save_tuned_lens_format(tmp_path / "pkg", model)
    state = torch.load(out / PKG_PARAMS_FILE, weights_only=True)
    missing = {k: v for k, v in state.items() if not k.startswith("2.")}
    torch.save(missing, out / PKG_PARAMS_FILE)
    with pytest.raises(ValueError, match=r"missing \['2.weight', '2.bias'\]|missing \['2.bias', '2.weight'\]"):
        TunedLens.load_tuned_lens_format(out, model)
    torch.save({**state, "3.weight": state["0.weight"], "3.bias": state["0.bias"]}, out / PKG_PARAMS_FILE)
    with pytest.raises(ValueError, match=r"extra \['3.bias', '3.weight'\]|extra \['3.weight', '3.bias'\]"):
        TunedLens.load_tuned_lens_format(out, model)
    torch.save(state, out / PKG_PARAMS_FILE)
    other = _build(_kind(), dict(GPT_LIKE, n_layers=2))
    with pytest.raises(ValueError, match="num_hidden_layers: lens 3, model 2"):
        TunedLens.load_tuned_lens_format(out, other)
    with pytest.raises(ValueError, match="unembed_hash"):
        TunedLens.load_tuned_lens_format(out, _build(_kind(), GPT_LIKE, seed=3))


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickled_code_in_params_is_refused_and_never_runs(tmp_path):
    model = _build(_kind(), GPT_LIKE)
    out = _random_lens(model).save_tuned_lens_format(tmp_path / "pkg", model)
    marker = tmp_path / "marker.txt"
    state = torch.load(out / PKG_PARAMS_FILE, weights_only=True)
    state["0.weight"] = _Payload(str(marker))
    torch.save(state, out / PKG_PARAMS_FILE)
    with pytest.raises(ValueError, match="refusing to load .*nothing in it was executed"):
        TunedLens.load_tuned_lens_format(out, model)
    assert not marker.exists()
    # A bare pickle (not a torch zip archive) is refused the same way.
    with open(out / PKG_PARAMS_FILE, "wb") as f:
        pickle.dump({"0.weight": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        TunedLens.load_tuned_lens_format(out, model)
    assert not marker.exists()
    # The payload does run under an unrestricted unpickler: the test would notice if it did.
    with open(out / PKG_PARAMS_FILE, "rb") as f:
        pickle.load(f)
    assert marker.read_text() == "pwned"


@pytest.mark.skipif(TL_MAJOR < 4 or not (DATA / "lens" / PKG_CONFIG_FILE).is_file(),
                    reason="the reference folder needs a TransformerBridge (TransformerLens >= 4)")
def test_folder_written_by_the_tuned_lens_package_gives_its_logits():
    """``tests/data/tuned_lens_pkg`` was written by tuned-lens 0.2.0 itself (see its README):
    a tiny Llama, a lens folder saved by ``tuned_lens.TunedLens.save`` and the logits the
    package computed with it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_transformers)

    folder = str(DATA / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer, device="cpu")
    model.eval()
    ref = load_file(str(DATA / "reference.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]), ref["model_logits"], atol=1e-5, rtol=0)
    # The package's unembed_hash in config.json is checked against this model's W_U.
    lens = TunedLens.load_tuned_lens_format(DATA / "lens", model)
    assert lens.info["package_config"]["unembed_hash"]
    ids = ref["input_ids"]
    everything = torch.arange(model.cfg.d_vocab).expand(*ids.shape, -1)
    r = tuned_lens(model, ids, lens, targets=everything, top_k=1)
    for layer in range(model.cfg.n_layers):
        expected = torch.log_softmax(ref[f"lens_logits.{layer}"].double(), -1)
        torch.testing.assert_close(r.target_probs[layer].double().log(), expected, atol=1e-5, rtol=0)
    # The same logits through the lens module as a TransformerLens-style callable.
    _, stack = _stack(model, ids)
    for layer in range(model.cfg.n_layers):
        with torch.no_grad():
            z = model.ln_final(lens(stack[layer], layer)) @ model.W_U + model.b_U
        torch.testing.assert_close(z, ref[f"lens_logits.{layer}"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- evaluation
def _direct_evaluation(model, lenses, seqs):
    """Every metric by brute force: full log-softmax, explicit loops."""
    logits, stack = _stack(model, seqs)
    L = model.cfg.n_layers
    lp_f = torch.log_softmax(logits.double(), -1)[:, 1:-1]
    nxt = seqs[:, 2:]
    top_f = lp_f.argmax(-1)
    out = {}
    for name, lens in lenses.items():
        kls, ces, agree = [], [], []
        for e in range(L + 1):
            h = stack[e].double()
            if lens is not None and e < L:
                h = h + h @ lens.weight[e].double().T + lens.bias[e].double()
            with torch.no_grad():
                lq = torch.log_softmax(model.ln_final(h.float()).double() @ model.W_U.double() + model.b_U.double(), -1)
            lq = lq[:, 1:-1]
            kls.append((lp_f.exp() * (lp_f - lq)).sum(-1).mean())
            ces.append(-lq.gather(-1, nxt[..., None]).mean())
            agree.append(lq.argmax(-1) == top_f)
        agree = torch.stack(agree)  # [E, B, P]
        depth = torch.full(agree.shape[1:], L, dtype=torch.float64)
        for e in range(L, -1, -1):
            if not agree[e:].all(0).any():
                break
            depth = torch.where(agree[e:].all(0), torch.tensor(float(e), dtype=torch.float64), depth)
        out[name] = (torch.stack(kls), torch.stack(ces), agree.double().mean((1, 2)), depth.mean())
    return out


def test_evaluation_matches_direct_computation(tiny):
    lens = _random_lens(tiny, seed=9, scale=0.1)
    seqs = torch.randint(0, 100, (5, 12), generator=torch.Generator().manual_seed(3))
    ev = evaluate_lenses(tiny, ("logit", lens), seqs, batch_size=2, chunk_rows=7, progress=False)
    ref = _direct_evaluation(tiny, {"logit": None, "tuned": lens}, seqs)
    assert ev.lenses == ["logit", "tuned"] and ev.labels[-1] == "final_post"
    assert ev.n_positions == 5 * 10
    for i, name in enumerate(ev.lenses):
        kl, ce, agree, depth = ref[name]
        torch.testing.assert_close(ev.kl_to_final[i].double(), kl, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ev.cross_entropy[i].double(), ce, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ev.top1_agreement[i].double(), agree, atol=1e-6, rtol=0)
        torch.testing.assert_close(ev.prediction_depth[i].double(), depth, atol=1e-5, rtol=0)
    assert abs(float(ev.depth_histogram.sum(1)[0]) - 1.0) < 1e-6
    frame = ev.to_dataframe()
    assert list(frame.index) == ev.labels and frame.index.name == "label"
    np.testing.assert_allclose(frame["kl_to_final_tuned"], ev.kl_to_final[ev.lenses.index("tuned")].numpy(), rtol=0)
    assert {"kl_to_final_logit", "kl_to_final_tuned", "cross_entropy_tuned", "top1_agreement_logit"} <= set(frame.columns)
    assert ev.summary().loc["tuned", "mean_kl_to_final"] == pytest.approx(ev.mean_kl("tuned"))
    with pytest.raises(ValueError, match="no lens 'embedding'"):
        ev.mean_kl("embedding")


def test_evaluation_accumulator_merges_and_round_trips(tiny):
    """Two halves merged (through the encoded state processes exchange) equal one pass over all."""
    from tl_latentspaces.runner import stream_residuals
    from tl_latentspaces.distributed import decode_state, encode_state
    from tl_latentspaces.evaluation import LensEvalAccumulator
    from tl_latentspaces.model import ModelAccess

    lens = _random_lens(tiny, seed=4, scale=0.1)
    seqs = torch.randint(0, 100, (6, 10), generator=torch.Generator().manual_seed(8))
    names = dict(ModelAccess(tiny).stack_sites())
    whole, first, second = (LensEvalAccumulator(tiny, ("logit", lens)) for _ in range(3))
    for i, (ids, stack) in enumerate(stream_residuals(tiny, seqs, names, batch_size=2, progress=False)):
        whole.update(ids, stack)
        (first if i % 2 == 0 else second).update(ids, stack)
    restored = LensEvalAccumulator(tiny, ("logit", lens))
    restored.load_state_dict(decode_state(encode_state(second.state_dict())))
    merged = first.merge(restored).result()
    ref = whole.result()
    assert merged.n_positions == ref.n_positions == 6 * 8 and merged.n_sequences == 6
    for name in ("kl_to_final", "cross_entropy", "top1_agreement", "depth_histogram", "kl_std"):
        torch.testing.assert_close(getattr(merged, name), getattr(ref, name), atol=1e-6, rtol=1e-6)
    fresh = whole.empty()  # the runner's factory: shares the built lenses, starts from zero
    assert all(a is b for a, b in zip(fresh.built, whole.built)) and fresh.reference is whole.reference
    assert fresh.n_positions == 0 and not fresh.kl_sum.any() and whole.n_positions == 6 * 8
    for ids, stack in stream_residuals(tiny, seqs, names, batch_size=3, progress=False):
        fresh.update(ids, stack)
    for name in ("kl_to_final", "cross_entropy", "top1_agreement", "depth_histogram"):
        torch.testing.assert_close(getattr(fresh.result(), name), getattr(ref, name), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot merge evaluations of lenses"):
        whole.merge(LensEvalAccumulator(tiny, ("logit",)))
    with pytest.raises(ValueError, match="no positions were evaluated"):
        LensEvalAccumulator(tiny, ("logit",)).result()


def test_evaluation_bad_input(tiny):
    with pytest.raises(ValueError, match="seq_len must be an int >= 3"):
        evaluate_lenses(tiny, ("logit",), torch.randint(0, 100, (3, 2)), progress=False)
    with pytest.raises(ValueError, match="lenses is empty"):
        evaluate_lenses(tiny, (), torch.randint(0, 100, (3, 8)), progress=False)
    with pytest.raises(ValueError, match="max_tokens must be an int"):
        evaluate_lenses(tiny, ("logit",), torch.randint(0, 100, (3, 8)), max_tokens=0, progress=False)
    with pytest.warns(UserWarning, match=r"max_tokens=5 is less than one sequence of seq_len=8; evaluating one whole"):
        ev = evaluate_lenses(tiny, ("logit",), torch.randint(0, 100, (3, 8)), max_tokens=5, progress=False)
    assert ev.n_sequences == 1


@pytest.mark.skipif(not hasattr(tll, "TunedLens"), reason="the tuned-lens exports are not in tl_latentspaces/__init__.py yet")
def test_public_names(tiny, tokens):
    from tl_latentspaces.fitting import fit_tuned_lens

    assert tll.TunedLens is TunedLens and tll.fit_tuned_lens is fit_tuned_lens
    assert tll.evaluate_lenses is evaluate_lenses
    lens = _random_lens(tiny)
    r = tll.tuned_lens(tiny, tokens, lens, top_k=3)  # the callable module
    assert isinstance(r, tll.LensResult) and r.lens == "tuned"
    assert r.labels == tll.logit_lens(tiny, tokens).labels
    assert callable(tll.tuned_lens.default_tuned_lens)


def test_resid_mid_entries_are_refused_through_read_lenses(tiny, tokens):
    lens = _random_lens(tiny)
    with pytest.raises(ValueError, match="no translator for stack entry '0_mid'"):
        tll.read_lenses(tiny, tokens, lenses=("logit", lens), incl_mid=True)
    # Without resid_mid entries the labels map straight to the translators.
    r = tll.read_lenses(tiny, tokens, lenses=(lens,), layers=["1_pre", "final_post"])["tuned"]
    full = tuned_lens(tiny, tokens, lens)
    assert torch.equal(r.top_ids[0], full.top_ids[1]) and torch.equal(r.top_ids[1], full.top_ids[-1])
