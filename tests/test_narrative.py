"""The report's story: each finding read off planted structure, and the report opening with it."""

from __future__ import annotations

import json

import pytest
import torch

from tl_latentspaces import ModelAccess
from tl_latentspaces.narrative import massive_positions, readable_from, similarity_blocks, tell_story, ties_embeddings


def test_readable_from_is_the_first_entry_that_stays_above():
    labels = ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    assert readable_from(labels, torch.tensor([0.1, 0.6, 0.3, 0.7, 1.0])) == 3  # 1_pre dips again after
    assert readable_from(labels, torch.tensor([0.9, 0.9, 0.9, 0.9, 1.0])) == 0
    assert readable_from(labels, torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2])) is None


def test_similarity_blocks_recovers_planted_blocks():
    n = 10
    m = torch.full((n, n), 0.2)
    for a, b in ((1, 4), (6, 8)):
        m[a : b + 1, a : b + 1] = 0.95
    m.fill_diagonal_(1.0)
    assert similarity_blocks(m) == [(1, 4), (6, 8)]
    m[2, 4] = m[4, 2] = 0.5  # entry 4 no longer like entry 2: the first block ends at 3
    assert similarity_blocks(m) == [(1, 3), (6, 8)]
    m[0, 0] = float("nan")
    assert similarity_blocks(m, min_size=4) == []


def test_massive_positions_finds_the_planted_one():
    norms = torch.full((5, 8), 50.0) + torch.rand(5, 8)
    assert massive_positions(norms) == []
    norms[3:, 0] = 4000.0
    assert massive_positions(norms) == [0]


def test_tied_embeddings_are_detected(tiny):
    access = ModelAccess(tiny)
    assert not ties_embeddings(access)  # the tiny models have separate random W_E and W_U
    W_E = access.W_E.detach()
    fake = type("Fake", (), {"W_E": W_E, "W_U": W_E.T.clone()})()
    assert ties_embeddings(fake)


def test_story_on_a_tiny_model_states_its_numbers(tiny):
    from tl_latentspaces import alignment_suite, evaluate_lenses

    texts = torch.randint(0, 100, (16, 16), generator=torch.Generator().manual_seed(0))
    ev = evaluate_lenses(tiny, ("logit",), texts, seq_len=16, batch_size=8, progress=False)
    al = alignment_suite(tiny, texts, seq_len=16, k=4, n_null_samples=8, progress=False)
    norms = torch.full((4, 9), 10.0)
    norms[:, 0] = 500.0
    story = tell_story(ModelAccess(tiny), ev, al, resid_norms=norms)
    at = readable_from(ev.labels, ev.top1_agreement[0])
    assert story.facts["readable_from"]["logit"] == (None if at is None else ev.labels[at])
    assert story.facts["massive_positions"] == [0]
    assert any("position 0 (BOS)" in c for c in story.caveats)
    assert story.facts["tied_embeddings"] is False and not any("tied" in c for c in story.caveats)
    assert json.loads(json.dumps(story.to_dict())) == story.to_dict()
    page = story.to_html()
    assert page.startswith('<section class="story">') and "Caveats" in page


@pytest.mark.integration
def test_report_opens_with_its_story(tmp_path, smol, monkeypatch):
    import tl_latentspaces as tll
    from tl_latentspaces import cli

    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: smol)
    out = tmp_path / "r"
    assert cli.main(["report", "--out", str(out), "--eval-tokens", "512", "--align-tokens", "512", "--quiet"]) == 0
    data = json.loads((out / "report.json").read_text())
    story = data["story"]
    assert story["facts"]["tied_embeddings"] is True  # SmolLM2 ties W_E and W_U
    assert any("tied" in c for c in story["caveats"])
    assert 0 in story["facts"]["massive_positions"]  # the BOS position's huge norm
    agreement = torch.tensor(data["evaluation"]["top1_agreement"])
    for i, name in enumerate(data["evaluation"]["lenses"]):
        at = readable_from(data["evaluation"]["labels"], agreement[i])
        assert story["facts"]["readable_from"][name] == (None if at is None else data["evaluation"]["labels"][at])
    page = (out / "report.html").read_text()
    assert page.index('<section class="story">') < page.index("lens on held-out text</h2>")
    assert page.count('class="guide"') >= 6
