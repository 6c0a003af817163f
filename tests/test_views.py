"""Views: the data each view receives, the offline HTML it makes, and the bundle it ships.

What the browser draws from that data is checked in ``test_browser.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import views

from conftest import FLAVOURS

REPO = Path(__file__).resolve().parent.parent
TARGETS = [5, 7]


# ---------------------------------------------------------------------- fixtures
def _model():
    """A tiny model of the first flavour this TransformerLens line has (views do not branch on it)."""
    return FLAVOURS[0][1]()


def _perturb(act, hook=None):
    return act + 3.0 * torch.sin(torch.arange(act.shape[-1], dtype=act.dtype))


@pytest.fixture(scope="module")
def runs():
    """Clean and patched readouts (logit + embedding lenses) of one input, with two targets."""
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(7))
    clean = tll.read_lenses(_model(), tokens, targets=TARGETS)
    patched_model = _model()
    patched_model.add_hook("blocks.1.hook_resid_post", _perturb)
    patched = tll.read_lenses(patched_model, tokens, targets=TARGETS)
    return clean, patched


def _sel(t: torch.Tensor, b: int, keep: list[int]) -> torch.Tensor:
    return t[:, b][:, keep]


def _close(actual, expected: torch.Tensor, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    a = torch.tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(a, expected.double(), rtol=rel, atol=abs_)


def _metric(lens: dict, key: str, view: int = 0) -> dict:
    (m,) = [m for m in lens["metrics"] if m["key"] == key and m["view"] == view]
    return m


def _without_ranges(lens: dict) -> dict:
    return {**lens, "metrics": [{k: v for k, v in m.items() if k not in ("min", "max")} for m in lens["metrics"]]}


def _embedded_props(src: str) -> dict:
    """The props JSON a rendered component passes to ``TLLatentSpaces.render``."""
    match = re.search(r'TLLatentSpaces\.render\(\s*"[^"]+",\s*TLLatentSpaces\.\w+,\s*(\{.*\})\s*\)\s*</script>', src, re.S)
    assert match, "no render call found"
    return json.loads(match.group(1))


# ---------------------------------------------------------------------- lens grid data
def test_grid_data_matches_the_readouts(runs):
    clean, _ = runs
    view = views.lens_grid(clean)
    props = view.props
    logit, emb = clean["logit"], clean["embedding"]
    E, B, P, K = logit.top_ids.shape
    assert view.component == "LensGrid"
    assert props["labels"] == logit.labels and props["labels"][0] == "0_pre" and props["labels"][-1] == "final_post"
    assert props["positions"] == list(range(P))
    assert props["tokens"] == logit.str_tokens[0]
    assert [lens["name"] for lens in props["lenses"]] == ["logit", "embedding"]
    assert [lens["scoreName"] for lens in props["lenses"]] == ["logit", "cosine"]
    assert "runs" not in props and props["initialView"] == 0 and props["initialMetric"] == "top1_prob"
    for lens, r in zip(props["lenses"], (logit, emb)):
        assert len(lens["topTokens"]) == 1
        top = lens["topTokens"][0]
        assert [len(top), len(top[0]), len(top[0][0])] == [E, P, K]
        assert top == [[[r.decode(int(i)) for i in cell] for cell in row] for row in r.top_ids[:, 0].tolist()]
        _close(lens["topProbs"][0], r.top_probs[:, 0])
        _close(lens["topScores"][0], r.top_scores[:, 0])
        _close(_metric(lens, "top1_prob")["values"], r.top_probs[:, 0, :, 0])
        _close(_metric(lens, "entropy")["values"], r.entropy[:, 0])
        _close(_metric(lens, "kl_to_final")["values"], r.kl_to_final[:, 0])
        for t in range(len(TARGETS)):
            _close(_metric(lens, f"target_probs:{t}")["values"], r.target_probs[:, 0, :, t])
            _close(_metric(lens, f"target_ranks:{t}")["values"], r.target_ranks[:, 0, :, t].double())
    # The top-1 token of every cell is what the result itself reports.
    assert [[cell[0] for cell in row] for row in props["lenses"][0]["topTokens"][0]] == [
        entry[0] for entry in logit.top_tokens()
    ]
    # Only the embedding lens has the own-token metrics.
    assert {m["key"] for m in props["lenses"][0]["metrics"]} == {
        "top1_prob", "entropy", "kl_to_final", "target_probs:0", "target_ranks:0", "target_probs:1", "target_ranks:1"}
    _close(_metric(props["lenses"][1], "own_scores")["values"], emb.own_scores[:, 0])
    _close(_metric(props["lenses"][1], "own_ranks")["values"], emb.own_ranks[:, 0].double())
    assert _metric(props["lenses"][0], "target_probs:0")["name"] == 'p("<5>")'


def test_grid_colour_ranges(runs):
    clean, _ = runs
    props = views.lens_grid(clean).props
    lenses = props["lenses"]
    for lens in lenses:
        for m in lens["metrics"]:
            vals = [v for row in m["values"] for v in row]
            assert all(v is not None for v in vals)
            assert m["min"] < m["max"]
            assert m["min"] <= min(vals) + 1e-9 and max(vals) <= m["max"] + 1e-9, m["key"]
    by_key = lambda key: [_metric(lens, key) for lens in lenses if any(m["key"] == key for m in lens["metrics"])]  # noqa: E731
    # Probabilities on a fixed [0, 1] scale; entropy and KL from 0 to the largest value of any lens,
    # shared so that switching lens keeps the colours comparable.
    for key in ("top1_prob", "target_probs:0"):
        assert all((m["min"], m["max"]) == (0.0, 1.0) for m in by_key(key))
    for key in ("entropy", "kl_to_final"):
        ms = by_key(key)
        top = max(v for m in ms for row in m["values"] for v in row)
        assert all(m["min"] == 0.0 and m["max"] == pytest.approx(top, rel=1e-4) for m in ms)
        assert all(m["reverse"] and m["scale"] == "sequential" for m in ms)
    ranks = by_key("target_ranks:0")
    assert all(m["log"] and m["reverse"] and m["format"] == "integer" for m in ranks)
    own = _metric(lenses[1], "own_scores")
    assert own["scale"] == "diverging" and own["min"] == -own["max"]


def test_grid_shows_one_batch_row_without_padding(runs):
    clean, _ = runs
    r = clean["logit"]
    mask = r.mask.clone()
    mask[1, 6:] = False  # pretend row 1 is right-padded after 6 tokens
    padded = dataclasses.replace(r, mask=mask)
    props = views.lens_grid(padded, batch=1).props
    keep = list(range(6))
    assert props["positions"] == keep
    assert props["tokens"] == r.str_tokens[1][:6]
    lens = props["lenses"][0]
    assert [len(row) for row in lens["topTokens"][0]] == [6] * len(r.labels)
    assert lens["topTokens"][0] == [[[r.decode(int(i)) for i in c] for c in row] for row in _sel(r.top_ids, 1, keep).tolist()]
    _close(_metric(lens, "kl_to_final")["values"], _sel(r.kl_to_final, 1, keep))
    # Row 0 is unpadded and still shows every position; negative batch indices count from the end.
    assert views.lens_grid(padded, batch=0).props["positions"] == list(range(9))
    assert views.lens_grid(padded, batch=-1).props == props


def test_grid_labels_and_dict_inputs(runs):
    clean, _ = runs
    props = views.lens_grid(clean["logit"], clean["embedding"], labels=["plain", "emb"]).props
    assert [lens["name"] for lens in props["lenses"]] == ["plain", "emb"]
    assert views.lens_grid(clean["embedding"]).props["lenses"][0]["name"] == "embedding"
    same = views.lens_grid(clean["logit"], clean["embedding"]).props
    from_dict = views.lens_grid(clean).props
    assert same["lenses"] == from_dict["lenses"]


def test_grid_initial_metric(runs):
    clean, _ = runs
    assert views.lens_grid(clean, metric="kl_to_final").props["initialMetric"] == "kl_to_final"
    assert views.lens_grid(clean, metric="KL to final").props["initialMetric"] == "kl_to_final"
    with pytest.raises(ValueError, match=r"unknown metric 'own_scores'.*'top1_prob'"):
        views.lens_grid(clean["logit"], metric="own_scores")


def test_grid_refuses_mismatched_inputs(runs):
    clean, _ = runs
    r = clean["logit"]
    other_tokens = dataclasses.replace(clean["embedding"], tokens=r.tokens.flip(1))
    with pytest.raises(ValueError, match="'embedding' differs from 'logit' in the input tokens.*read_lenses"):
        views.lens_grid(r, other_tokens)
    fewer = dataclasses.replace(clean["embedding"], positions=r.positions[:-1] + [0])
    with pytest.raises(ValueError, match="read positions"):
        views.lens_grid(r, fewer)
    relabelled = dataclasses.replace(clean["embedding"], labels=[f"x{i}" for i in range(len(r.labels))])
    with pytest.raises(ValueError, match="stack entries"):
        views.lens_grid(r, relabelled)
    with pytest.raises(ValueError, match="duplicate names.*labels="):
        views.lens_grid(r, r)
    with pytest.raises(ValueError, match="one string per result"):
        views.lens_grid(r, clean["embedding"], labels=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        views.lens_grid()
    with pytest.raises(ValueError, match="got list"):
        views.lens_grid([r])
    with pytest.raises(ValueError, match=r"batch must be an int in \[-2, 1\]"):
        views.lens_grid(r, batch=2)
    no_tokens = dataclasses.replace(r, mask=torch.zeros_like(r.mask))
    with pytest.raises(ValueError, match="no real"):
        views.lens_grid(no_tokens)


# ---------------------------------------------------------------------- difference mode
def test_difference_mode_data(runs):
    clean, patched = runs
    base, other = clean["logit"], patched["logit"]
    d = base.diff(other)
    props = views.lens_grid(base, other, diff=True).props
    assert props["runs"] == ["clean", "patched"]
    assert props["initialView"] == -1 and props["initialMetric"] == "target_prob_delta:0"
    (lens,) = props["lenses"]
    assert len(lens["topTokens"]) == 2
    assert lens["topTokens"][0] == [[[base.decode(int(i)) for i in c] for c in row] for row in base.top_ids[:, 0].tolist()]
    assert lens["topTokens"][1] == [[[other.decode(int(i)) for i in c] for c in row] for row in other.top_ids[:, 0].tolist()]
    _close(_metric(lens, "kl_delta", -1)["values"], d.kl_delta[:, 0])
    _close(_metric(lens, "entropy_delta", -1)["values"], d.entropy_delta[:, 0])
    _close(_metric(lens, "target_prob_delta:1", -1)["values"], d.target_prob_delta[:, 0, :, 1])
    _close(_metric(lens, "target_rank_delta:0", -1)["values"],
           (other.target_ranks - base.target_ranks)[:, 0, :, 0].double())
    changed = _metric(lens, "top1_changed", -1)
    _close(changed["values"], d.top1_changed[:, 0].double())
    assert (changed["min"], changed["max"]) == (0.0, 1.0)
    assert bool(d.top1_changed[:, 0].any()), "the perturbation should change some top-1 tokens"
    # Each run's own metrics are there too, on one shared scale.
    _close(_metric(lens, "kl_to_final", 0)["values"], base.kl_to_final[:, 0])
    _close(_metric(lens, "kl_to_final", 1)["values"], other.kl_to_final[:, 0])
    assert _metric(lens, "kl_to_final", 0)["max"] == _metric(lens, "kl_to_final", 1)["max"]
    for m in lens["metrics"]:
        if m["view"] == -1 and m["scale"] == "diverging":
            assert m["min"] == -m["max"] and m["max"] > 0


def test_difference_mode_inputs_agree(runs):
    clean, patched = runs
    two = views.lens_grid(clean["logit"], patched["logit"], diff=True).props
    given = views.lens_grid(clean["logit"].diff(patched["logit"])).props
    assert two == given
    both = views.lens_grid(clean, patched, diff=True, run_names=("before", "after")).props
    assert [lens["name"] for lens in both["lenses"]] == ["logit", "embedding"]
    assert both["runs"] == ["before", "after"]
    # The same data; only the colour ranges differ, shared with the embedding lens.
    assert _without_ranges(both["lenses"][0]) == _without_ranges(two["lenses"][0])
    diffs = views.lens_grid(clean["logit"].diff(patched["logit"]), clean["embedding"].diff(patched["embedding"])).props
    assert diffs["lenses"] == both["lenses"]
    # A run metric opens on the patched run's view.
    assert views.lens_grid(clean, patched, diff=True, metric="entropy").props["initialView"] == 1


def test_difference_mode_errors(runs):
    clean, patched = runs
    with pytest.raises(ValueError, match="exactly two"):
        views.lens_grid(clean["logit"], patched["logit"], clean["logit"], diff=True)
    with pytest.raises(ValueError, match="same lens"):
        views.lens_grid(clean["logit"], patched["embedding"], diff=True)
    with pytest.raises(ValueError, match="different lenses"):
        views.lens_grid(clean, {"logit": patched["logit"]}, diff=True)
    with pytest.raises(ValueError, match="cannot mix"):
        views.lens_grid(clean["logit"].diff(patched["logit"]), clean["embedding"])
    with pytest.raises(ValueError, match="run_names"):
        views.lens_grid(clean["logit"], patched["logit"], diff=True, run_names=("a",))
    flipped = dataclasses.replace(patched["logit"], tokens=patched["logit"].tokens.flip(1))
    with pytest.raises(ValueError, match="input tokens differ"):
        views.lens_grid(clean["logit"], flipped, diff=True)


# ---------------------------------------------------------------------- offline HTML
def test_grid_html_is_offline_and_carries_the_props(runs, monkeypatch):
    clean, _ = runs
    view = views.lens_grid(clean)

    # Displaying must not touch the network: any connection attempt fails the test.
    def no_network(*args, **kwargs):
        raise AssertionError("the view tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("circuitsvis.utils.render.internet_on", no_network)
    html = view._repr_html_()
    assert html == view.local_src == str(view) == view.__html__()
    assert views.bundle_source() in html
    assert "unpkg.com" not in html and "<script src" not in html and 'from "http' not in html
    assert _embedded_props(html) == json.loads(json.dumps(view.props))
    page = view.to_html()
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page and "default-src 'none'" in page
    # Each render gets its own element id, so several grids can share a notebook.
    ids = re.findall(r'<div id="(tl-latentspaces-[0-9a-f]+)"', html + views.lens_grid(clean).local_src)
    assert len(ids) == 2 and ids[0] != ids[1]


def test_ipython_displays_the_inlined_html(runs, monkeypatch):
    """What a notebook receives on display: our inlined fragment, with no internet probe."""
    formatters = pytest.importorskip("IPython.core.formatters")
    clean, _ = runs
    monkeypatch.setattr("circuitsvis.utils.render.internet_on", lambda: pytest.fail("probed the internet"))
    for view in (views.lens_grid(clean), views.drift_tokens(clean["embedding"]),
                 views.cka_matrix_view(torch.eye(2), ["a", "b"])):
        data, _ = formatters.format_display_data(view)
        assert data["text/html"] == view.local_src


def test_views_are_circuitsvis_rendered_html():
    from circuitsvis.utils.render import RenderedHTML

    assert issubclass(views.HTMLView, RenderedHTML)


def test_public_names():
    for name in ("lens_grid", "drift_tokens", "layer_predictions", "cka_matrix_view", "layer_curves_view", "HTMLView"):
        assert getattr(tll, name) is getattr(views, name), name
        assert name in tll.__all__, name


def test_tokens_cannot_break_out_of_the_script(runs):
    clean, _ = runs
    nasty = "</script><script>alert(1)</script><!--"
    r = dataclasses.replace(clean["logit"], decode=lambda i: nasty if int(i) % 2 else f"<{int(i)}>")
    view = views.lens_grid(r)
    src = view.local_src
    assert src.count("</script>") == 1 and "<!--" not in src
    props = _embedded_props(src)
    shown = props["tokens"] + [c for row in props["lenses"][0]["topTokens"][0] for cell in row for c in cell]
    assert nasty in shown


def test_bundle_ships_in_the_package():
    text = views.bundle_source()
    assert text.startswith("/* tl_latentspaces views bundle")
    assert "var TLLatentSpaces=" in text and "LensGrid" in text
    assert "</script" not in text.lower()
    assert text.isascii()


def test_save_is_atomic(runs, tmp_path, monkeypatch):
    clean, _ = runs
    view = views.lens_grid(clean)
    path = view.save(tmp_path / "grid.html")
    assert path == tmp_path / "grid.html"
    assert path.read_text(encoding="utf-8") == view.to_html()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.html"]
    assert (path.stat().st_mode & 0o777) == 0o644
    os.chmod(path, 0o640)
    views.lens_grid(clean["logit"]).save(str(path))  # a str works, and the mode is kept
    assert (path.stat().st_mode & 0o777) == 0o640
    before = path.read_text(encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        view.save(path)
    assert path.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.html"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        view.save(tmp_path / "missing" / "grid.html")


# ---------------------------------------------------------------------- CircuitsVis components
def test_drift_tokens_data(runs, monkeypatch):
    clean, _ = runs
    emb, logit = clean["embedding"], clean["logit"]
    monkeypatch.setattr("circuitsvis.utils.render.internet_on", lambda: pytest.fail("probed the internet"))
    view = views.drift_tokens(emb)
    assert view.component == "ColoredTokensMulti"
    p = view.props
    assert p["metric"] == "own_scores"
    assert p["tokens"] == emb.str_tokens[0]
    assert p["labels"] == emb.labels
    _close(p["values"], emb.own_scores[:, 0].T)
    assert "ColoredTokensMulti" in view._repr_html_() and "unpkg.com" not in view._repr_html_()
    assert "unpkg.com" in view.show_code()  # CircuitsVis's CDN version stays available on request
    # Other lenses default to KL to final; a subset of layers and another batch row.
    p2 = views.drift_tokens(logit, batch=1, layers=["0_pre", -1]).props
    assert p2["metric"] == "kl_to_final" and p2["labels"] == ["0_pre", "final_post"]
    _close(p2["values"], logit.kl_to_final[[0, -1], 1].T)
    p3 = views.drift_tokens(logit, "target_ranks:1").props
    _close(p3["values"], logit.target_ranks[:, 0, :, 1].T.double())
    with pytest.raises(ValueError, match=r"'own_scores' is not available for this logit lens.*'kl_to_final'"):
        views.drift_tokens(logit, "own_scores")
    with pytest.raises(ValueError, match="2 target"):
        views.drift_tokens(logit, "target_probs:2")
    with pytest.raises(ValueError, match="unknown stack label"):
        views.drift_tokens(logit, layers=["7_pre"])


def test_circuitsvis_html_is_repaired(runs):
    """CircuitsVis's fragments: a closed div (so views after it survive) and script-safe props."""
    clean, _ = runs
    nasty = "</script><!--"
    r = dataclasses.replace(clean["embedding"], decode=lambda i: nasty if int(i) % 2 else f"<{int(i)}>")
    assert any(nasty in t for t in r.str_tokens[0])
    for view in (views.drift_tokens(r), views.layer_predictions(dataclasses.replace(
            clean["logit"], decode=r.decode, top_ids=clean["logit"].tokens.roll(-1, 1).expand(
                len(clean["logit"].labels), -1, -1).unsqueeze(-1)), 0)):
        src = view.local_src
        assert re.match(r'<div id="circuits-vis-[^"]+" style="margin: 15px 0;"></div>', src)
        assert src.count("</script>") == 1 and "<!--" not in src
        match = re.search(r"CircuitsVis\.\w+,\s*(\{.*\})\s*\)\s*</script>", src, re.S)
        assert nasty in json.dumps(json.loads(match.group(1)), ensure_ascii=False).replace("\\/", "/")


def test_layer_predictions_match_circuitsvis_token_log_probs(runs):
    """Our props equal those circuitsvis.logits.token_log_probs computes from the full distribution."""
    import circuitsvis.logits

    clean, _ = runs
    model = _model()
    ids = clean["logit"].tokens
    r = tll.logit_lens(model, ids, top_k=10, targets=ids.roll(-1, dims=1))
    everything = tll.logit_lens(model, ids, targets=torch.arange(100).expand(*ids.shape, 100))
    for label in ("1_pre", "final_post"):
        e = r.index(label)
        view = views.layer_predictions(r, label, batch=1)
        assert view.component == "TokenLogProbs"
        log_probs = everything.target_probs[e, 1].double().log()
        theirs = circuitsvis.logits.token_log_probs(ids[1], log_probs, r.decode, top_k=10)
        match = re.search(r"TokenLogProbs,\s*(\{.*\})\s*\)\s*</script>", theirs.local_src, re.S)
        expected = json.loads(match.group(1))
        ours = view.props
        assert ours["prompt"] == expected["prompt"]
        assert ours["topKTokens"] == expected["topKTokens"]
        assert ours["correctTokenRank"] == expected["correctTokenRank"]
        _close(ours["topKLogProbs"], torch.tensor(expected["topKLogProbs"]), rel=1e-3, abs_=1e-3)
        _close(ours["correctTokenLogProb"], torch.tensor(expected["correctTokenLogProb"]), rel=1e-3, abs_=1e-3)


def test_layer_predictions_needs_the_next_tokens(runs):
    clean, _ = runs
    r = tll.logit_lens(_model(), clean["logit"].tokens, top_k=1)
    with pytest.raises(ValueError, match=r"unknown at positions.*targets=ids.roll\(-1, dims=1\)"):
        views.layer_predictions(r, "1_pre")
    gappy = dataclasses.replace(clean["logit"], positions=[0, 2, 3, 4, 5, 6, 7, 8, 8])
    with pytest.raises(ValueError, match="consecutive"):
        views.layer_predictions(gappy, 0)
    with pytest.raises(ValueError, match="out of range"):
        views.layer_predictions(clean["logit"], 17)


# ---------------------------------------------------------------------- SVG figures
def _svg(view) -> ET.Element:
    root = ET.fromstring(view.svg)  # well-formed XML, or this raises
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


NS = "{http://www.w3.org/2000/svg}"


def test_cka_matrix_view():
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    m = torch.tensor([[1.0, 0.8, 0.5, float("nan")], [0.8, 1.0, 0.7, 0.4], [0.5, 0.7, 1.0, 0.6], [0.2, 0.4, 0.6, 1.0]])
    view = views.cka_matrix_view(m, labels)
    root = _svg(view)
    cells = [el for el in root.iter(f"{NS}rect") if el.get("class") == "cell"]
    assert len(cells) == 16
    by_ij = {(int(c.get("data-i")), int(c.get("data-j"))): c for c in cells}
    assert by_ij[(0, 1)].get("data-value") == "0.8" and by_ij[(3, 0)].get("data-value") == "0.2"
    assert by_ij[(0, 3)].get("fill") == "#dddddd" and by_ij[(0, 3)].find(f"{NS}title").text.endswith("n/a")
    assert by_ij[(0, 0)].get("fill") == "#fde725"  # 1.0 is the top of viridis
    assert by_ij[(0, 0)].find(f"{NS}title").text == "0_pre × 0_pre: 1"
    assert [t.text for t in root.iter(f"{NS}text") if t.get("class") == "row-label"] == labels
    assert view.props["vmin"] == 0.0 and view.props["vmax"] == 1.0
    assert view.props["matrix"][0][3] is None and view.props["labels"] == labels
    zero = views.cka_matrix_view(torch.zeros(2, 2), ["a", "b"], vmin=0, vmax=1)
    assert all(c.get("fill") == "#440154" for c in _svg(zero).iter(f"{NS}rect") if c.get("class") == "cell")
    wide = views.cka_matrix_view([[1.2, -0.1], [-0.1, 1.0]], ["a", "b"])
    assert (wide.props["vmin"], wide.props["vmax"]) == (-0.1, 1.2)
    with pytest.raises(ValueError, match="square"):
        views.cka_matrix_view(torch.zeros(2, 3), ["a", "b"])
    with pytest.raises(ValueError, match="3 layers but 2 labels"):
        views.cka_matrix_view(torch.zeros(3, 3), ["a", "b"])
    big = views.cka_matrix_view(torch.rand(31, 31), [f"{i}_pre" for i in range(30)] + ["final_post"])
    assert len([c for c in _svg(big).iter(f"{NS}rect") if c.get("class") == "cell"]) == 31 * 31


def test_layer_curves_view():
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    curves = {"angle": torch.tensor([0.9, 0.5, float("nan"), 0.2]), "variance": [0.1, 0.2, 0.3, 0.4]}
    null = {"angle": (torch.tensor([0.3, 0.3, 0.3, 0.3]), 0.05), "variance": (0.25, torch.tensor([0.1, 0.1, 0.1, 0.1]))}
    view = views.layer_curves_view(labels, curves, null, ylabel="cosine", title="alignment")
    root = _svg(view)
    groups = [g for g in root.iter(f"{NS}g") if g.get("class") == "curve"]
    assert [g.get("data-name") for g in groups] == ["angle", "variance"]
    # The NaN splits the angle curve in two; points carry their values.
    assert len(groups[0].findall(f"{NS}polyline")) == 2 and len(groups[1].findall(f"{NS}polyline")) == 1
    assert [c.find(f"{NS}title").text for c in groups[0].findall(f"{NS}circle")] == [
        "angle at 0_pre: 0.9", "angle at 1_pre: 0.5", "angle at final_post: 0.2"]
    bands = [p for p in root.iter(f"{NS}polygon") if p.get("class") == "null-band"]
    assert [b.get("data-name") for b in bands] == ["angle", "variance"]
    assert len([p for p in root.iter(f"{NS}polyline") if p.get("class") == "null-mean"]) == 2
    p = view.props
    assert p["curves"]["angle"] == [0.9, 0.5, None, 0.2] and p["null"]["angle"]["std"] == [0.05] * 4
    assert p["null"]["variance"]["mean"] == [0.25] * 4
    # The y range holds the curves and the null bands (0.15 .. 0.35 for variance).
    assert p["ymin"] <= 0.1 and p["ymax"] >= 0.9
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "alignment" in texts and "cosine" in texts and "angle (null ± 1 sd)" in texts
    assert [t.text for t in root.iter(f"{NS}text") if t.get("class") == "x-tick"] == labels
    fixed = views.layer_curves_view(labels, {"a": [1, 2, 3, 4]}, ymin=0, ymax=10)
    assert (fixed.props["ymin"], fixed.props["ymax"]) == (0, 10) and fixed.props["null"] == {}
    with pytest.raises(ValueError, match="no curve of that name"):
        views.layer_curves_view(labels, curves, {"other": (0.1, 0.1)})
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        views.layer_curves_view(labels, {"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="mean, std"):
        views.layer_curves_view(labels, curves, {"angle": 0.3})
    with pytest.raises(ValueError, match="non-empty dict"):
        views.layer_curves_view(labels, {})


def test_nice_ticks():
    lo, hi, ticks, dec = views._nice_ticks(0.03, 0.97)
    assert (lo, hi) == (0.0, 1.0) and ticks[0] == 0.0 and ticks[-1] == pytest.approx(1.0) and dec == 1
    lo, hi, ticks, dec = views._nice_ticks(5, 5)
    assert lo < 5 < hi and len(ticks) >= 2


def test_figures_save_as_pages(tmp_path):
    view = views.cka_matrix_view(torch.eye(3), ["a", "b", "c"], title="<CKA & co>")
    page = view.save(tmp_path / "cka.html").read_text(encoding="utf-8")
    assert "<title>&lt;CKA &amp; co&gt;</title>" in page and view.svg in page
    assert "<script" not in page


# ---------------------------------------------------------------------- the bundle is reproducible
@pytest.mark.skipif(os.environ.get("TLL_CHECK_BUNDLE") != "1", reason="set TLL_CHECK_BUNDLE=1 to rebuild the JS bundle")
def test_bundle_is_reproducible():
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are needed to rebuild the bundle")
    proc = subprocess.run(["bash", str(REPO / "js" / "check_bundle.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bundle OK" in proc.stdout
