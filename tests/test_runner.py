"""The corpus runner: interrupted and resumed runs equal uninterrupted ones; seeded order; bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import FLAVOURS, LLAMA_LIKE, TL_MAJOR, build_bridge, build_llama_like
from tl_latentspaces import hook_counts
from tl_latentspaces.model import ModelIdentity
from tl_latentspaces.alignment import AlignmentAccumulator
from tl_latentspaces.runner import CorpusRunner


@pytest.fixture
def model():
    return next(build for name, build in FLAVOURS if "llama" in name and "compat" not in name)()


@pytest.fixture
def corpus():
    return torch.randint(0, 100, (20, 16), generator=torch.Generator().manual_seed(5))


class Interrupt(Exception):
    pass


class Flaky(AlignmentAccumulator):
    """Raises after a number of updates, as a Ctrl-C in the middle of a run would."""

    calls = 0
    limit = 3

    def update(self, ids, stack):
        Flaky.calls += 1
        if Flaky.calls > Flaky.limit:
            raise Interrupt
        super().update(ids, stack)


def _factory(model, cls=AlignmentAccumulator):
    return lambda: cls(model, k=4, skip_positions=1, cka_block_sequences=2, rank_every=1)


def _numbers(acc):
    r = acc.result()
    return [r.cka.embed, r.cka.layer_debiased, r.variance.embed, r.angles.embed, r.drift.cos_mean, r.procrustes.embed_error]


def test_interrupted_run_resumes_to_the_same_result(model, corpus, tmp_path):
    whole = CorpusRunner(model, corpus, seq_len=16, batch_size=4, progress=False).run({"align": _factory(model)})
    before = hook_counts(model)
    Flaky.calls = 0
    runner = CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    with pytest.raises(Interrupt):
        runner.run({"align": _factory(model, Flaky)})
    assert hook_counts(model) == before  # the interrupted run left no hook behind
    resumed = runner.run({"align": _factory(model)})
    for a, b in zip(_numbers(whole["align"]), _numbers(resumed["align"])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, equal_nan=True)
    assert resumed["align"].n_sequences == 20


def test_checkpoint_of_another_corpus_is_refused(model, corpus, tmp_path):
    CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False).run(
        {"align": _factory(model)}
    )
    other = CorpusRunner(model, corpus[:12], seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="belongs to another corpus"):
        other.run({"align": _factory(model)})


def test_checkpoint_of_another_world_size_is_refused(model, corpus, tmp_path, monkeypatch):
    """Each rank's checkpoint counts its own share of the batches: 1 process's cannot resume 2."""
    from tl_latentspaces import runner as runner_module
    from tl_latentspaces.distributed import DistContext

    factory = {"align": lambda: AlignmentAccumulator(model)}
    CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False).run(factory)
    monkeypatch.setattr(runner_module, "current_context", lambda: DistContext(rank=0, world_size=2))
    again = CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="written by a run of 1 process.*this run has 2"):
        again.run(factory)


def _other_models(model):
    """Models a checkpoint of ``model`` must not be resumed with, and the difference each names."""
    out = [
        ("weights", lambda: build_llama_like(seed=1),
         r"weights fingerprint \(hash of every parameter\): checkpoint [0-9a-f]{16} .*this model [0-9a-f]{16}"),
        ("dtype", lambda: build_llama_like(seed=0).to(torch.float64),
         r"dtype: checkpoint torch.float32, this model torch.float64"),
    ]
    if TL_MAJOR >= 3:
        # Compatibility mode rewrites the weights: named as the mode, not as other weights.
        out.append(("mode", lambda: build_bridge(LLAMA_LIKE, compat=True),
                    r"mode: checkpoint TransformerBridge \(raw\), this model TransformerBridge \(compatibility mode\)"))
    return out


@pytest.mark.parametrize("which", ["weights", "dtype", "mode"])
def test_checkpoint_of_another_model_dtype_or_mode_is_refused(model, corpus, tmp_path, which):
    others = {name: (build, needle) for name, build, needle in _other_models(model)}
    if which not in others:
        pytest.skip("this TransformerLens line has no compatibility mode")
    build, needle = others[which]
    factory = {"align": _factory(model)}
    CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False).run(factory)
    other = build()
    runner = CorpusRunner(other, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=needle) as err:
        runner.run({"align": _factory(other)})
    message = str(err.value)
    assert "another checkpoint_dir" in message and "the model it was written with" in message
    if which == "mode":
        assert "weights fingerprint" not in message
        assert "boot the bridge again without enable_compatibility_mode()" in message
    if which == "dtype":
        assert "model.to(torch.float32)" in message
    # The same model (rebuilt, equal weights) resumes without complaint.
    again = CorpusRunner(build_llama_like(seed=0), corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path,
                         progress=False)
    assert again.run({"align": _factory(model)})["align"].n_sequences == 20


def test_checkpoint_without_a_model_identity_is_refused(model, corpus, tmp_path):
    runner = CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    runner.run({"align": _factory(model)})
    path = tmp_path / "runner-rank0.pt"
    payload = torch.load(path, weights_only=True)
    del payload["meta"]["model"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="does not record which model wrote it"):
        runner.run({"align": _factory(model)})


@pytest.mark.parametrize("junk", [b"", b"not a checkpoint at all", "foreign"])
def test_old_format_damaged_or_foreign_checkpoint_is_refused_by_name(model, corpus, tmp_path, junk):
    runner = CorpusRunner(model, corpus, seq_len=16, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    if junk == "foreign":
        torch.save({"weights": torch.zeros(2)}, tmp_path / "runner-rank0.pt")
    else:
        (tmp_path / "runner-rank0.pt").write_bytes(junk)
    with pytest.raises(ValueError, match="runner-rank0.pt") as err:
        runner.run({"align": _factory(model)})
    assert "another checkpoint_dir" in str(err.value)
    # a folder holding a checkpoint of the earlier safetensors format is refused, naming that file
    (tmp_path / "runner-rank0.pt").unlink()
    (tmp_path / "runner-rank0.safetensors").write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"runner-rank0\.safetensors.*earlier version") as err:
        runner.run({"align": _factory(model)})
    assert "another checkpoint_dir" in str(err.value)


def test_model_identity_tells_weights_dtype_and_mode_apart(model):
    a, b = ModelIdentity.of(model), ModelIdentity.of(build_llama_like(seed=0))
    assert a == b and len(a.weights_fingerprint) == 16
    assert a.mode == ("TransformerBridge (raw)" if TL_MAJOR >= 4 else "HookedTransformer")
    assert (a.n_layers, a.d_model, a.d_vocab, a.dtype) == (3, 64, 100, "torch.float32")
    # One weight anywhere changes the fingerprint (the whole model is hashed at this size).
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "mlp" in name).view(-1)[7] += 1e-3
    edited = ModelIdentity.of(model)
    assert edited.weights_fingerprint != a.weights_fingerprint
    assert edited.unembedding_fingerprint == a.unembedding_fingerprint
    assert a.differences(edited) == [
        f"weights fingerprint (hash of every parameter): checkpoint {a.weights_fingerprint} ({a.name!r}), "
        f"this model {edited.weights_fingerprint} ({edited.name!r})"
    ]
    # Without weights=True nothing is hashed but the unembedding; unknown fields are not compared.
    assert ModelIdentity.of(model, weights=False).weights_fingerprint == ""
    assert a.differences(ModelIdentity.of(model, weights=False)) == []


def test_seeded_order_is_deterministic(model, corpus):
    a = CorpusRunner(model, corpus, seq_len=16, shuffle=True, seed=3, progress=False).sequences
    b = CorpusRunner(model, corpus, seq_len=16, shuffle=True, seed=3, progress=False).sequences
    c = CorpusRunner(model, corpus, seq_len=16, shuffle=True, seed=4, progress=False).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort(0).values, corpus.sort(0).values)  # a permutation of the same sequences


def test_bad_input(model):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        CorpusRunner(model, torch.zeros(2, 16, dtype=torch.long), seq_len=16, batch_size=0)
    with pytest.raises(ValueError, match="at least one consumer"):
        CorpusRunner(model, torch.zeros(2, 16, dtype=torch.long), seq_len=16, progress=False).run({})
