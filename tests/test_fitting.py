"""Fitting a tuned lens: planted structure recovered, determinism, checkpoints, NaN handling,
bad input, and (integration) the default model's lens against the logit lens."""

from __future__ import annotations

import json
import time

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import fitting, translator_solvers
from tl_latentspaces.checkpoints import load_checkpoint
from tl_latentspaces.evaluation import evaluate_lenses
from tl_latentspaces.fitting import TunedLensFitError, fit_tuned_lens
from tl_latentspaces.hooks import hook_counts

from conftest import GPT_LIKE, LLAMA_LIKE, TL_MAJOR, build_bridge, build_hooked


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cfg=GPT_LIKE, seed=0):
    return build_hooked(cfg, seed) if TL_MAJOR < 4 else build_bridge(cfg, seed)


def _corpus(n=40, seq=32, seed=1):
    return torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- planted structure
def test_planted_affine_map_is_recovered(tiny):
    """Patch the model so that its final residual is exactly ``A h_1 + c`` (``h_1`` = layer 1's
    resid_pre): the fitted translator of layer 1 must be ``W = A - I``, ``b = c``."""
    d = tiny.cfg.d_model
    L = tiny.cfg.n_layers
    g = torch.Generator().manual_seed(11)
    A = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5
    c = 0.5 * torch.randn(d, generator=g)
    seen = {}

    def grab(act, hook):
        seen["h1"] = act.detach().clone()

    def plant(act, hook):
        return seen["h1"] @ A.T + c

    hp1, hpL = tiny.hook_dict["blocks.1.hook_resid_pre"], tiny.hook_dict[f"blocks.{L - 1}.hook_resid_post"]
    hp1.add_hook(grab)
    hpL.add_hook(plant)
    try:
        before = hook_counts(tiny)
        lens = fit_tuned_lens(tiny, _corpus(), ridge=(0.0, 0.1), progress=False)
        assert hook_counts(tiny) == before  # the fit removed exactly its own hooks
    finally:
        hp1.remove_hooks()
        hpL.remove_hooks()
    report = lens.info["fit"]
    assert report["ridge_chosen"][1] == 0.0
    # On residuals the fit never saw, the translator is the planted map.
    _, cache = tiny.run_with_cache(_corpus(4, seed=8), names_filter="blocks.1.hook_resid_pre")
    h1 = cache["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(lens(h1, 1), h1 @ A.T + c, atol=2e-4, rtol=1e-4)
    if not getattr(tiny, "compatibility_mode", False):
        torch.testing.assert_close(lens.weight[1], A - torch.eye(d), atol=2e-4, rtol=0)
        torch.testing.assert_close(lens.bias[1], c, atol=2e-4, rtol=0)
    # (In compatibility mode the residual is centred, so W's action on the all-ones direction
    # is not determined by the data; the ridge floor keeps it at the identity.)
    assert report["val_kl_refined"][1] < 1e-6
    # The other layers are not exact, but much better than the identity (the logit lens).
    assert report["val_kl_refined"][0] > 1e-3


def test_fit_beats_logit_lens_and_refinement_helps(tiny):
    lens = fit_tuned_lens(tiny, _corpus(60), progress=False)
    report = lens.info["fit"]
    assert all(r <= c for r, c in zip(report["val_kl_refined"], report["val_kl_closed_form"]))
    assert any(report["refined"])
    ev = evaluate_lenses(tiny, ("logit", lens), _corpus(8, seed=5), progress=False)
    assert (ev.kl_to_final[1, :-1] < ev.kl_to_final[0, :-1]).all(), ev.to_dataframe()
    # Sizes of the fit are reported: positions used, massive/BOS exclusions, phase timings.
    assert report["n_train_positions"] > 0 and report["n_validation_positions"] > 0
    assert set(report["phase_seconds"]) == {"collect", "closed_form", "refine"}


def test_streamed_normal_equations_match_full_batch():
    """Collection accumulates X^T X batch by batch in float64; one big batch gives the same."""
    model = _model()
    corpus = _corpus(24)
    one = fit_tuned_lens(model, corpus, batch_size=24, refine_steps=0, ridge=1e-3, progress=False)
    many = fit_tuned_lens(model, corpus, batch_size=3, refine_steps=0, ridge=1e-3, progress=False)
    torch.testing.assert_close(one.weight, many.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.bias, many.bias, atol=1e-6, rtol=1e-5)


def test_massive_positions_are_left_out():
    stack = torch.ones(3, 2, 6, 4)
    stack[1, 1, 3] *= 50  # one massive position at one entry
    keep = fitting._keep_mask(stack, 6.0)
    expected = torch.ones(2, 6, dtype=torch.bool)
    expected[:, 0] = False
    expected[1, 3] = False
    assert torch.equal(keep, expected)


# ---------------------------------------------------------------------- determinism, checkpoints
def test_fit_is_deterministic_for_a_seed():
    model = _model(LLAMA_LIKE)
    a = fit_tuned_lens(model, _corpus(), seed=3, progress=False)
    b = fit_tuned_lens(model, _corpus(), seed=3, progress=False)
    c = fit_tuned_lens(model, _corpus(), seed=4, progress=False)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [("collect", 1), ("closed_form", 1), ("refine", 2)])
def test_resumed_fit_equals_uninterrupted(tmp_path, monkeypatch, stop_at):
    model = _model(LLAMA_LIKE)
    kwargs = dict(batch_size=4, checkpoint_every=2, progress=False)
    reference = fit_tuned_lens(model, _corpus(), **kwargs)
    seen = []

    def interrupt(phase, extra):
        seen.append(phase)
        if seen.count(stop_at[0]) == stop_at[1]:
            raise _Stop(phase)

    monkeypatch.setattr(fitting, "_checkpoint_saved", interrupt)
    with pytest.raises(_Stop):
        fit_tuned_lens(model, _corpus(), checkpoint_dir=tmp_path / "ckpt", **kwargs)
    monkeypatch.setattr(fitting, "_checkpoint_saved", lambda phase, extra: None)
    resumed = fit_tuned_lens(model, _corpus(), checkpoint_dir=tmp_path / "ckpt", **kwargs)
    assert torch.equal(resumed.weight, reference.weight) and torch.equal(resumed.bias, reference.bias)
    meta, _ = load_checkpoint(tmp_path / "ckpt", "tuned-lens-fit", 0)
    assert meta["done"] is True
    # One file for the collection, one for the lens (each replaced in place, nothing older left).
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["runner-rank0.pt", "tuned-lens-fit-rank0.pt"]


def test_checkpoint_of_another_fit_is_refused(tmp_path):
    model = _model()
    fit_tuned_lens(model, _corpus(), refine_steps=0, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds the checkpoint of another fit .same model, other corpus"):
        fit_tuned_lens(model, _corpus(seed=9), refine_steps=0, checkpoint_dir=tmp_path, progress=False)


def test_checkpoint_of_an_earlier_version_is_refused(tmp_path):
    """A folder of the earlier format (state.json and the fit's own collection files) is refused, naming the fix."""
    state = {"format": "tl_latentspaces.tuned_lens_fit", "version": 2, "key": "0" * 24, "files": {}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"checkpoint of an earlier version \(state.json\).*"
                                         r"Delete the folder to start over, or pass another checkpoint_dir"):
        fit_tuned_lens(_model(), _corpus(), refine_steps=0, checkpoint_dir=tmp_path, progress=False)


def _other_models():
    out = [("weights", lambda: _model(seed=1), r"weights fingerprint \(hash of every parameter\): checkpoint"),
           ("dtype", lambda: _model().to(torch.float64), r"dtype: checkpoint torch.float32, this model torch.float64")]
    if TL_MAJOR >= 3:
        out.append(("mode", lambda: build_bridge(GPT_LIKE, compat=True),
                    r"mode: checkpoint TransformerBridge \(raw\), this model TransformerBridge \(compatibility mode\)"))
    return {name: (build, needle) for name, build, needle in out}


@pytest.mark.parametrize("which", ["weights", "dtype", "mode"])
def test_checkpoint_of_another_model_dtype_or_mode_is_refused(tmp_path, monkeypatch, which):
    if which not in _other_models():
        pytest.skip("this TransformerLens line has no compatibility mode")
    build, needle = _other_models()[which]
    model = _model()
    if which == "mode":
        model = build_bridge(GPT_LIKE)  # the raw twin of the compatibility-mode model
    kwargs = dict(refine_steps=0, batch_size=4, checkpoint_every=1, progress=False)

    def interrupt(phase, extra):
        raise _Stop(phase)

    monkeypatch.setattr(fitting, "_checkpoint_saved", interrupt)
    with pytest.raises(_Stop):
        fit_tuned_lens(model, _corpus(), checkpoint_dir=tmp_path, **kwargs)
    monkeypatch.setattr(fitting, "_checkpoint_saved", lambda phase, extra: None)
    with pytest.raises(ValueError, match=needle) as err:
        fit_tuned_lens(build(), _corpus(), checkpoint_dir=tmp_path, **kwargs)
    assert "another checkpoint_dir" in str(err.value) and "the model it was written with" in str(err.value)
    assert load_checkpoint(tmp_path, "tuned-lens-fit", 0)[0]["model"]["mode"] in (
        "HookedTransformer", "TransformerBridge (raw)")
    # The model the checkpoint was written with resumes it.
    assert torch.equal(fit_tuned_lens(model, _corpus(), checkpoint_dir=tmp_path, **kwargs).weight,
                       fit_tuned_lens(model, _corpus(), **kwargs).weight)


def test_nan_loss_stops_names_layer_and_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    model = _model()
    real = translator_solvers.gauss_newton_stats
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, G, F = real(*args, **kwargs)
        return (float("nan"), G, F) if len(calls) == 2 else (loss, G, F)

    monkeypatch.setattr(translator_solvers, "gauss_newton_stats", poisoned)
    with pytest.raises(TunedLensFitError, match=r"layer 1, refinement step 0") as err:
        # refine_steps=1: one Gauss-Newton call per layer, so the second call is layer 1.
        fit_tuned_lens(model, _corpus(), refine_steps=1, checkpoint_dir=tmp_path, progress=False)
    assert "last good checkpoint" in str(err.value) and "refine_steps=0" in str(err.value)
    meta, _ = load_checkpoint(tmp_path, "tuned-lens-fit", 0)
    assert meta["phase"] == "refine" and meta["layers_done"] == 1
    monkeypatch.setattr(translator_solvers, "gauss_newton_stats", real)
    resumed = fit_tuned_lens(model, _corpus(), refine_steps=1, checkpoint_dir=tmp_path, progress=False)
    clean = fit_tuned_lens(model, _corpus(), refine_steps=1, progress=False)
    assert torch.equal(resumed.weight, clean.weight)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "corpus, kwargs, needle",
    [
        ([], {}, "the corpus is empty"),
        (torch.randint(0, 100, (2, 32)), {}, r"needs at least 130 \(2 x \(d_model \+ 1\)\)"),
        (torch.randint(0, 100, (1, 32)), {}, "least 2"),
        (torch.randint(0, 100, (3, 2)), {}, "seq_len must be an int >= 3"),
        (torch.randint(0, 100, (40, 32)), {"max_tokens": 0}, "max_tokens must be an int >= 2"),
        (torch.randint(0, 100, (40, 32)), {"ridge": ()}, "ridge is empty"),
        (torch.randint(0, 100, (40, 32)), {"ridge": (-1.0,)}, "ridge strength must be a finite number >= 0"),
        (torch.randint(0, 100, (40, 32)), {"validation_fraction": 0.9}, "validation_fraction must be"),
        (torch.randint(0, 100, (40, 32)), {"damping": float("nan")}, "damping must be"),
        (torch.randint(0, 100, (40, 32)), {"massive_factor": 1.0}, "massive_factor must be"),
        (torch.randint(0, 100, (40, 32)), {"seq_len": 16}, "seq_len=16"),
        (torch.randint(0, 100, (40, 32)), {"ridge": "0.1"}, r"ridge strength must be a finite number >= 0.0, got str \('0.1'\)"),
        (torch.randint(0, 100, (40, 32)), {"device": "banana"}, "unknown device 'banana'; use 'cpu', 'cuda'"),
    ],
    ids=["empty", "too-few-positions", "one-sequence", "seq-too-short", "max-tokens", "no-ridge", "neg-ridge",
         "val-fraction", "damping", "massive", "width-mismatch", "str-ridge", "bad-device"],
)
def test_bad_input_is_a_clear_error(corpus, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        fit_tuned_lens(_model(), corpus, progress=False, **kwargs)


def test_training_mode_is_refused():
    model = _model().train()
    with pytest.raises(ValueError, match="model.eval()"):
        fit_tuned_lens(model, _corpus(), progress=False)


# ---------------------------------------------------------------------- the default model
@pytest.mark.integration
def test_text_corpus_errors_on_the_default_model(smol):
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=128"):
        fit_tuned_lens(smol, ["A short text.", "Another one."], progress=False)
    with pytest.raises(ValueError, match=r"needs at least 1154 \(2 x \(d_model \+ 1\)\)"):
        fit_tuned_lens(smol, ["word " * 600], progress=False)
    with pytest.raises(ValueError, match="the corpus is empty"):
        fit_tuned_lens(smol, ["", "   "], progress=False)


@pytest.mark.integration
def test_default_tuned_lens_is_fitted_once_then_loaded(smol, tmp_path, monkeypatch):
    from tl_latentspaces import cached_lenses as module

    # A small fit keeps the test short; the cache logic is what is under test.
    monkeypatch.setattr(module, "DEFAULT_FIT", dict(max_tokens=1536, seq_len=64, seed=0, refine_steps=0, ridge=1e-2))
    first = module.default_tuned_lens(smol, cache_dir=tmp_path, progress=False)
    assert (tmp_path / "SmolLM2-135M-Instruct-tuned-lens" / "tuned_lens.json").is_file()
    t = time.perf_counter()
    second = module.default_tuned_lens(smol, cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - t < 10
    assert torch.equal(first.weight, second.weight)
    # Other fit settings (a new version's defaults) invalidate the cache.
    monkeypatch.setattr(module, "DEFAULT_FIT", dict(max_tokens=1536, seq_len=64, seed=1, refine_steps=0, ridge=1e-2))
    third = module.default_tuned_lens(smol, cache_dir=tmp_path, progress=False)
    assert not torch.equal(third.weight, first.weight)


@pytest.mark.integration
@pytest.mark.slow
def test_default_model_lens_beats_logit_lens_at_every_layer(smol):
    """A reduced-budget version of benchmarks/tuned_lens_fit.py: 4096 refinement tokens, 1024 held-out."""
    t = time.perf_counter()
    lens = fit_tuned_lens(smol, max_tokens=16384, refine_tokens=4096, progress=False)
    fit_seconds = time.perf_counter() - t
    ev = evaluate_lenses(smol, ("logit", lens), max_tokens=1024, progress=False)
    logit, tuned = ev.kl_to_final[0, :-1], ev.kl_to_final[1, :-1]
    assert (tuned < logit).all(), ev.to_dataframe()
    assert ev.mean_kl("tuned") <= 2.2, ev.to_dataframe()
    assert ev.mean_kl("logit") > 10
    assert ev.prediction_depth[1] < ev.prediction_depth[0]
    assert fit_seconds < 600
    r = tll.read_lenses(smol, "The Eiffel Tower is in the city of", lenses=("logit", lens), targets=" Paris")
    paris_rank = r["tuned"].target_ranks[-2, 0, -1, 0]
    assert paris_rank < r["logit"].target_ranks[-2, 0, -1, 0]


# ---------------------------------------------------------------------- pieces the fit reads the model through
def test_final_norm_scale_and_gain_rebuild_the_models_own_norm(tiny):
    """``final_norm(h) = gain * centred(h) / scale(h) + final_norm(0)``, row by row, for every flavour."""
    access = tll.ModelAccess(tiny)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, access.d_model, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0, 100.0])[:, None]
    norm_type = str(getattr(access.cfg, "normalization_type", None))
    centred = h - h.mean(-1, keepdim=True) if norm_type.startswith("LN") else h
    scale, gain = access.final_norm_scale(h), access.final_norm_gain()
    assert scale.shape == (6, 1) and gain.shape == (access.d_model,)
    offset = access.final_norm(torch.zeros(1, access.d_model))
    torch.testing.assert_close(gain * centred / scale + offset, access.final_norm(h), atol=2e-5, rtol=2e-5)


def test_tuned_lens_for_fits_once_per_model_and_settings(tiny, tmp_path, monkeypatch):
    from tl_latentspaces import cached_lenses

    access = tll.ModelAccess(tiny)
    corpus = torch.randint(0, access.d_vocab, (24, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(cached_lenses, "default_corpus", lambda split: corpus)
    monkeypatch.setattr(cached_lenses, "DEFAULT_FIT", dict(max_tokens=384, seq_len=16, seed=0, refine_steps=0, ridge=1e-2))
    fits = []
    real_fit = cached_lenses.fit_tuned_lens
    monkeypatch.setattr(cached_lenses, "fit_tuned_lens", lambda *a, **k: fits.append(k) or real_fit(*a, **k))

    first = tll.tuned_lens_for(tiny, cache_dir=tmp_path, progress=False)
    folders = list((tmp_path / "tuned-lenses").iterdir())
    assert len(folders) == 1 and folders[0].name.endswith(access.unembedding_fingerprint())
    second = tll.tuned_lens_for(tiny, cache_dir=tmp_path, progress=False)
    assert len(fits) == 1 and torch.equal(first.weight, second.weight)  # loaded, not refitted
    # other settings invalidate the cached lens
    monkeypatch.setattr(cached_lenses, "DEFAULT_FIT", dict(max_tokens=384, seq_len=16, seed=1, refine_steps=0, ridge=1e-2))
    third = tll.tuned_lens_for(tiny, cache_dir=tmp_path, progress=False)
    assert len(fits) == 2 and not torch.equal(third.weight, first.weight)
    # a damaged cached lens is refitted with a warning naming the folder
    (folders[0] / "tuned_lens.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="refitting the tuned lens in .*tuned-lenses"):
        fourth = tll.tuned_lens_for(tiny, cache_dir=tmp_path, progress=False)
    assert len(fits) == 3 and torch.equal(fourth.weight, third.weight)
