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
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import views
from tl_latentspaces.model import TokenDecoder

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
    assert props["tokenIds"] == logit.tokens[0].tolist()
    assert props["bos"] is False and props["hideBos"] is False  # the tiny model has no tokenizer
    for lens, r in zip(props["lenses"], (logit, emb)):
        assert len(lens["topTokens"]) == 1
        top = lens["topTokens"][0]
        assert [len(top), len(top[0]), len(top[0][0])] == [E, P, K]
        assert top == [[[r.decode(int(i)) for i in cell] for cell in row] for row in r.top_ids[:, 0].tolist()]
        assert lens["topIds"] == [r.top_ids[:, 0].tolist()]
        _close(lens["topProbs"][0], r.top_probs[:, 0])
        _close(lens["topScores"][0], r.top_scores[:, 0])
        _close(_metric(lens, "top1_prob")["values"], r.top_probs[:, 0, :, 0])
        _close(_metric(lens, "entropy")["values"], r.entropy[:, 0])
        _close(_metric(lens, "kl_to_final")["values"], r.kl_to_final[:, 0])
        for t in range(len(TARGETS)):
            _close(_metric(lens, f"target{t}_prob")["values"], r.target_probs[:, 0, :, t])
            _close(_metric(lens, f"target{t}_rank")["values"], r.target_ranks[:, 0, :, t].double())
    # The top-1 token of every cell is what the result itself reports.
    assert [[cell[0] for cell in row] for row in props["lenses"][0]["topTokens"][0]] == [
        entry[0] for entry in logit.top_tokens()
    ]
    # Only the embedding lens has the own-token metrics. Every key is a column of to_dataframe().
    keys = {m["key"] for m in props["lenses"][0]["metrics"]}
    assert keys == {"top1_prob", "entropy", "kl_to_final", "target0_prob", "target0_rank", "target1_prob", "target1_rank"}
    emb_keys = {m["key"] for m in props["lenses"][1]["metrics"]}
    assert emb_keys == keys | {"own_cosine", "own_rank"}
    assert emb_keys <= set(emb.to_dataframe().columns)
    _close(_metric(props["lenses"][1], "own_cosine")["values"], emb.own_scores[:, 0])
    _close(_metric(props["lenses"][1], "own_rank")["values"], emb.own_ranks[:, 0].double())
    assert _metric(props["lenses"][0], "target0_prob")["name"] == 'p("<5>")'


def _values(m: dict, skip: tuple = ()) -> list:
    """The values a metric's range is taken over (the entries and columns its legend leaves out, left out)."""
    rows = m["values"][1:] if "0_pre" in m.get("rangeNote", "") else m["values"]
    return [v for row in rows for p, v in enumerate(row) if p not in skip]


def test_grid_colour_ranges(runs):
    """Per lens and metric, the central 96% of the values (numpy's quantiles as the reference)."""
    np = pytest.importorskip("numpy")
    clean, _ = runs
    props = views.lens_grid(clean).props
    logit, emb = props["lenses"]
    for lens in (logit, emb):
        for m in lens["metrics"]:
            vals = np.array(_values(m))
            assert m["min"] < m["max"], m["key"]
            assert m["clipLow"] == bool((vals < m["min"]).any()) and m["clipHigh"] == bool((vals > m["max"]).any())
            assert "of this lens" in m["rangeNote"]
            if m["key"] in ("top1_prob", "target0_prob", "target1_prob"):
                assert m["min"] == 0.0 and m["max"] == pytest.approx(np.quantile(vals, 0.98), rel=1e-4)
                assert not m["log"] and m["scale"] == "sequential"
            elif m["key"] in ("entropy", "kl_to_final", "target0_rank", "own_rank"):
                assert (m["min"], m["max"]) == pytest.approx((np.quantile(vals, 0.02), np.quantile(vals, 0.98)), rel=1e-4)
                assert m["reverse"] and m["scale"] == "sequential"
                assert m["log"] == (m["key"] != "entropy")
            elif m["key"] == "own_cosine":
                assert m["scale"] == "diverging" and m["min"] == -m["max"]
                assert m["max"] == pytest.approx(np.quantile(np.abs(vals), 0.98), rel=1e-4)
                assert "centred on 0" in m["rangeNote"]
    # Each lens has its own range: the two lenses' probabilities differ by orders of magnitude.
    assert _metric(logit, "top1_prob")["max"] != _metric(emb, "top1_prob")["max"]
    # The range of a metric with a few huge values (KL at 0_pre) fits the rest, not the outliers.
    m = _metric(logit, "kl_to_final")
    kl = clean["logit"].kl_to_final.clone()
    kl[0, 0, 3] = 500.0  # one cell of an outlier
    spiked = dataclasses.replace(clean["logit"], kl_to_final=kl)
    m2 = _metric(views.lens_grid(spiked).props["lenses"][0], "kl_to_final")
    assert m2["max"] < 500.0 and m2["clipHigh"]
    assert m2["max"] == pytest.approx(np.quantile(_values(m2), 0.98), rel=1e-4)
    assert m["max"] < m2["max"]
    # 0_pre, far from every later entry (a cosine of 1 against ~0), is left out of the range.
    own = torch.randn(clean["embedding"].own_scores.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    own[0] = 1.0
    m3 = _metric(views.lens_grid(dataclasses.replace(clean["embedding"], own_scores=own)).props["lenses"][0],
                 "own_cosine")
    later = own[1:, 0].abs().double().numpy()
    assert m3["max"] == pytest.approx(np.quantile(later, 0.98), rel=1e-4) and m3["max"] < 0.2
    assert "0_pre left out" in m3["rangeNote"] and m3["clipHigh"]


def test_embedding_entry_is_apart():
    later = [[0.01 * e + 0.001 * k for k in range(5)] for e in range(1, 8)]  # medians 0.012 ... 0.072
    assert views.embedding_entry_is_apart([[1.0] * 5] + later)
    assert views.embedding_entry_is_apart([[-9.0] * 5] + later)
    assert not views.embedding_entry_is_apart([[0.05] * 5] + later)  # among the others
    assert not views.embedding_entry_is_apart([[1.0] * 5] + later[:2])  # too few entries to tell
    kl = [[15.0 + e + k for k in range(3)] for e in range(10)]  # medians 16 ... 25
    assert views.embedding_entry_is_apart([[231.0] * 3] + kl)
    assert views.embedding_entry_is_apart([[231.0] * 3] + kl, log=True)
    # 40 nats: apart on a linear scale, not on the log scale KL is drawn on.
    assert views.embedding_entry_is_apart([[40.0] * 3] + kl)
    assert not views.embedding_entry_is_apart([[40.0] * 3] + kl, log=True)


def test_colour_range_kinds():
    assert views.colour_range([0.0, 0.5, 2.0], "fixed") == (0.0, 1.0)
    values = [float(v) for v in range(101)]  # quantiles of 0..100 are the percentiles themselves
    assert views.colour_range(values, "quantile") == pytest.approx((2.0, 98.0))
    assert views.colour_range(values, "prob") == pytest.approx((0.0, 98.0))
    assert views.colour_range([-v for v in values], "centred") == pytest.approx((-98.0, 98.0))
    # A difference that is zero in most cells (a patch reaches few) is scaled to what changed.
    lo, hi = views.colour_range([0.0] * 99 + [0.5, -2.0], "centred")
    assert hi == pytest.approx(-lo) and 0.5 < hi <= 2.0
    assert views.colour_range([0.0] * 99 + [0.5, -2.0], "change") == (-2.0, 2.0)
    assert views.colour_range([0.0] * 5, "change") == (-1e-6, 1e-6)
    lo, hi = views.colour_range([3.0] * 5, "quantile")
    assert lo == 3.0 and hi > lo


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
    assert views.lens_grid(clean, metric="target1_rank").props["initialMetric"] == "target1_rank"
    with pytest.raises(ValueError, match=r"unknown metric 'own_cosine'.*'top1_prob'"):
        views.lens_grid(clean["logit"], metric="own_cosine")


@pytest.mark.parametrize("old, new", [("target_ranks:1", "target1_rank"), ("target_probs:0", "target0_prob"),
                                      ("own_scores", "own_cosine"), ("own_ranks", "own_rank")])
def test_old_metric_names_are_deprecated_aliases(runs, old, new):
    clean, patched = runs
    with pytest.warns(DeprecationWarning, match=f"'{re.escape(old)}' is deprecated.*use '{new}'") as record:
        props = views.lens_grid(clean["embedding"], metric=old).props
    assert props["initialMetric"] == new
    assert record[0].filename == __file__  # the warning points at the caller
    with pytest.warns(DeprecationWarning, match=f"use '{new}'"):
        assert views.drift_tokens(clean["embedding"], old).props["metric"]["key"] == new
    if old.startswith("target"):
        delta = old.replace("s:", "_delta:")
        with pytest.warns(DeprecationWarning, match=f"use '{new}_delta'"):
            props = views.lens_grid(clean["logit"], patched["logit"], diff=True, metric=delta).props
        assert props["initialMetric"] == f"{new}_delta"


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


# ---------------------------------------------------------------------- byte-level tokens
def byte_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) built in memory: every byte is a
    token, plus one merge (``é`` as one token), and a BOS token with id 0."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<bos>": 0}
    for ch in sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["Ã©"] = len(vocab)
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("Ã", "©")]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>")
    return tok, TokenDecoder(tok, lambda i: tok.decode([int(i)]))


def test_byte_tokens_are_characters_or_escapes():
    tok, decode = byte_tokenizer()
    text = "Café 🙂 naïve — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert sum("\ufffd" in decode(i) for i in ids) >= 8  # what the tokenizer itself shows
    words = views.TokenText(decode)
    texts, notes = words.sequence(ids)
    assert not any("\ufffd" in t for t in texts)
    # The tokens where a character starts spell the text; the others continue a character.
    assert "".join(t for t in texts if not t.startswith("\u2026")) == text
    shown = dict(zip(texts, notes))
    emoji = [k for k, i in enumerate(ids) if decode(i) == "\ufffd" and texts[k].endswith("🙂")]
    assert [texts[k] for k in emoji] == ["🙂", "\u2026🙂", "\u2026🙂", "\u2026🙂"]
    assert [notes[k] for k in emoji] == [f"bytes {b:02X}, part of \u201c🙂\u201d" for b in "🙂".encode()]
    assert shown["é"] == "" and "\u2026ï" in shown  # é is one token; ï two
    assert shown["\u2026—"].startswith("bytes ")
    # One token alone: its text, or escapes for the bytes that are not text alone.
    assert [words.text(i) for i in ids[4:9]] == [" ", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert words.text(ids[0]) == "C" and words.bos_id == 0
    # A tokenizer with byte-fallback pieces (SentencePiece style) and one that says nothing.

    class Pieces:
        bos_token_id = None

        def convert_ids_to_tokens(self, i):
            return ["<0xE2>", "<0x80>", "<0x94>", "\u2581x"][i]

    fallback = TokenDecoder(Pieces(), lambda i: "\ufffd" if i < 3 else " x")
    assert views.TokenText(fallback).sequence([3, 0, 1, 2, 3])[0] == [" x", "—", "\u2026—", "\u2026—", " x"]
    assert views.TokenText(lambda i: "a\ufffd").text(5) == "a<?>"


def test_grid_shows_byte_tokens_ids_and_bos(runs):
    np = pytest.importorskip("numpy")
    clean, _ = runs
    tok, decode = byte_tokenizer()
    ids = [0] + tok("é🙂aï", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9
    r = clean["logit"]
    kl = r.kl_to_final.clone()
    kl[:, 0, 0] = 1000.0  # the BOS column's junk
    r = dataclasses.replace(r, tokens=torch.tensor([ids, ids]), decode=decode, kl_to_final=kl)
    props = views.lens_grid(r).props
    assert props["tokens"] == ["<bos>", "é", "🙂", "\u2026🙂", "\u2026🙂", "\u2026🙂", "a", "ï", "\u2026ï"]
    assert props["tokenIds"] == ids
    assert props["tokenNotes"][3] == "bytes 9F, part of \u201c🙂\u201d" and props["tokenNotes"][1] == ""
    assert props["bos"] is True and props["hideBos"] is True
    top = props["lenses"][0]["topTokens"][0]
    assert top == [[[views.TokenText(decode).text(i) for i in c] for c in row] for row in r.top_ids[:, 0].tolist()]
    m = _metric(props["lenses"][0], "kl_to_final")
    rest = [v for row in m["values"] for v in row[1:]]
    assert (m["min"], m["max"]) == pytest.approx((np.quantile(rest, 0.02), np.quantile(rest, 0.98)), rel=1e-4)
    assert m["max"] < 1000.0 and "BOS left out" in m["rangeNote"]
    # Not at position 0, or not the BOS id: no BOS column.
    assert views.lens_grid(dataclasses.replace(r, tokens=torch.tensor([ids[1:] + [1]] * 2))).props["bos"] is False


# ---------------------------------------------------------------------- difference mode
def test_difference_mode_data(runs):
    clean, patched = runs
    base, other = clean["logit"], patched["logit"]
    d = base.diff(other)
    props = views.lens_grid(base, other, diff=True).props
    assert props["runs"] == ["clean", "patched"]
    divergence = getattr(d, "divergence", None)
    assert props["initialView"] == -1
    assert props["initialMetric"] == ("target0_prob_delta" if divergence is None else "divergence")
    (lens,) = props["lenses"]
    assert len(lens["topTokens"]) == 2
    assert lens["topTokens"][0] == [[[base.decode(int(i)) for i in c] for c in row] for row in base.top_ids[:, 0].tolist()]
    assert lens["topTokens"][1] == [[[other.decode(int(i)) for i in c] for c in row] for row in other.top_ids[:, 0].tolist()]
    _close(_metric(lens, "kl_delta", -1)["values"], d.kl_delta[:, 0])
    _close(_metric(lens, "entropy_delta", -1)["values"], d.entropy_delta[:, 0])
    _close(_metric(lens, "target1_prob_delta", -1)["values"], d.target_prob_delta[:, 0, :, 1])
    if divergence is not None:
        _close(_metric(lens, "divergence", -1)["values"], divergence[:, 0])
    _close(_metric(lens, "target0_rank_delta", -1)["values"],
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
            # A change's range is ± its largest size: the cells a patch reaches are the signal.
            assert m["min"] == -m["max"] and m["max"] == pytest.approx(max(abs(v) for v in _values(m)), rel=1e-4)
            assert "largest |change|" in m["rangeNote"]


def _with_divergence(d, divergence):
    """``d`` with a ``divergence`` field: LensDiff's own once it has one, else a subclass's."""
    if "divergence" in {f.name for f in dataclasses.fields(tll.LensDiff)}:
        return dataclasses.replace(d, divergence=divergence)

    @dataclasses.dataclass(frozen=True)
    class WithDivergence(tll.LensDiff):
        divergence: object = None

    return WithDivergence(**{f.name: getattr(d, f.name) for f in dataclasses.fields(tll.LensDiff)},
                          divergence=divergence)


def test_difference_mode_divergence(runs):
    clean, patched = runs
    d = clean["logit"].diff(patched["logit"])
    planted = torch.zeros_like(d.kl_delta)
    planted[2:, :, 4:] = torch.linspace(0.1, 6.0, planted[2:, :, 4:].numel()).reshape(planted[2:, :, 4:].shape)
    props = views.lens_grid(_with_divergence(d, planted)).props
    assert props["initialView"] == -1 and props["initialMetric"] == "divergence"
    m = _metric(props["lenses"][0], "divergence", -1)
    _close(m["values"], planted[:, 0])
    assert m["scale"] == "sequential" and m["log"] and not m["reverse"] and m["unit"] == "nats"
    assert (m["min"], m["max"]) == (0.0, pytest.approx(float(planted[:, 0].max()), rel=1e-4))
    assert views.lens_grid(_with_divergence(d, planted), metric="kl_delta").props["initialMetric"] == "kl_delta"
    # Without the field (or with None) the grid offers what it did before.
    assert "divergence" not in {m["key"] for m in views.lens_grid(_with_divergence(d, None)).props["lenses"][0]["metrics"]}


def test_difference_mode_inputs_agree(runs):
    clean, patched = runs
    two = views.lens_grid(clean["logit"], patched["logit"], diff=True).props
    given = views.lens_grid(clean["logit"].diff(patched["logit"])).props
    assert two == given
    both = views.lens_grid(clean, patched, diff=True, run_names=("before", "after")).props
    assert [lens["name"] for lens in both["lenses"]] == ["logit", "embedding"]
    assert both["runs"] == ["before", "after"]
    # Colour ranges are per lens: the logit lens's are the same with or without the embedding lens.
    assert both["lenses"][0] == two["lenses"][0]
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
    # runs read with other targets: a target metric of one would be labelled with the other's token
    swapped = dataclasses.replace(patched["logit"], target_ids=patched["logit"].target_ids.flip(-1))
    for grid in (lambda: views.lens_grid(clean["logit"], swapped, diff=True),
                 lambda: views.lens_grid(clean["logit"].diff(swapped))):
        with pytest.raises(ValueError, match=r"differs from 'logit' in the targets \('logit''s two runs\)"):
            grid()


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
    assert src.count("</script>") == 2 and "<!--" not in src  # the bundle's script and the render call's, nothing more
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
    np = pytest.importorskip("numpy")
    clean, _ = runs
    emb, logit = clean["embedding"], clean["logit"]
    monkeypatch.setattr("circuitsvis.utils.render.internet_on", lambda: pytest.fail("probed the internet"))
    view = views.drift_tokens(emb)
    assert view.component == "TokenDrift"
    p = view.props
    m = p["metric"]
    assert m["key"] == "own_cosine" and m["name"] == "own-token cosine" and m["description"]
    assert p["tokens"] == emb.str_tokens[0] and p["tokenIds"] == emb.tokens[0].tolist()
    assert p["labels"] == emb.labels
    _close(p["values"], emb.own_scores[:, 0])
    # Bounds fit the data (centred on 0 for a cosine), and the legend says how they were chosen.
    vals = emb.own_scores[:, 0].double().numpy()
    ranged = vals[1:] if "0_pre left out" in m["rangeNote"] else vals
    assert m["scale"] == "diverging" and m["max"] == -m["min"] == pytest.approx(np.quantile(np.abs(ranged), 0.98), rel=1e-4)
    assert "centred on 0" in m["rangeNote"]
    assert "own-token cosine" in p["title"] and "embedding lens" in p["title"]
    # It opens on the entry whose colours vary most across the tokens.
    bound = m["max"]
    spread = [float(np.std(np.clip(row / bound, -1, 1))) for row in vals]
    assert p["initialEntry"] == int(np.argmax(spread))
    # Planted: 0_pre's cosine is 1 everywhere (as on a model without position embeddings), one
    # entry varies a lot across tokens, the others a little: that entry is shown first.
    own = torch.full_like(emb.own_scores, 0.05)
    own[0] = 1.0
    own[:, 0] += torch.linspace(-0.01, 0.01, own.shape[-1])
    own[3, 0] = torch.linspace(-0.5, 0.5, own.shape[-1])
    planted = views.drift_tokens(dataclasses.replace(emb, own_scores=own)).props
    assert planted["initialEntry"] == 3
    assert "ColoredTokensMulti" not in view._repr_html_() and "unpkg.com" not in view._repr_html_()
    assert _embedded_props(view.local_src) == json.loads(json.dumps(p))
    # Other lenses default to KL to final; a subset of layers and another batch row.
    p2 = views.drift_tokens(logit, batch=1, layers=["0_pre", -1]).props
    assert p2["metric"]["key"] == "kl_to_final" and p2["labels"] == ["0_pre", "final_post"]
    assert p2["metric"]["log"] and p2["metric"]["unit"] == "nats"
    _close(p2["values"], logit.kl_to_final[[0, -1], 1])
    p3 = views.drift_tokens(logit, "target1_rank").props
    _close(p3["values"], logit.target_ranks[:, 0, :, 1].double())
    assert views.drift_tokens(emb, "own_rank", title="drift").props["title"] == "drift"
    with pytest.raises(ValueError, match=r"'own_cosine' is not available for this logit lens.*'kl_to_final'"):
        views.drift_tokens(logit, "own_cosine")
    with pytest.raises(ValueError, match=r"'target2_prob' is not available.*'target1_prob'"):
        views.drift_tokens(logit, "target2_prob")
    with pytest.raises(ValueError, match="unknown stack label"):
        views.drift_tokens(logit, layers=["7_pre"])
    with pytest.raises(ValueError, match="one LensResult, got dict"):
        views.drift_tokens(clean)


def test_circuitsvis_components_render_through_our_renderer(runs):
    """CircuitsVis's component in our fragment: a closed div (so views after it survive), script-safe props."""
    clean, _ = runs
    nasty = "</script><!--"
    r = dataclasses.replace(clean["embedding"], decode=lambda i: nasty if int(i) % 2 else f"<{int(i)}>")
    assert any(nasty in t for t in r.str_tokens[0])
    view = views.layer_predictions(dataclasses.replace(
        clean["logit"], decode=r.decode, top_ids=clean["logit"].tokens.roll(-1, 1).expand(
            len(clean["logit"].labels), -1, -1).unsqueeze(-1)), 0)
    src = view.local_src
    assert re.match(r'<div id="circuits-vis-[^"]+" style="margin: 15px 0;"></div>', src)
    assert src.count("</script>") == 2 and "<!--" not in src  # the bundle's script and the render call's, nothing more
    assert view.component == "TokenLogProbs" and "unpkg.com" not in view._repr_html_()
    assert "unpkg.com" in view.show_code()  # CircuitsVis's CDN version stays available on request
    match = re.search(r"CircuitsVis\.\w+,\s*(\{.*\})\s*\)\s*</script>", src, re.S)
    assert nasty in json.dumps(json.loads(match.group(1)), ensure_ascii=False).replace("\\/", "/")
    drift = views.drift_tokens(r).local_src
    assert drift.count("</script>") == 2 and "<!--" not in drift
    assert nasty in _embedded_props(drift)["tokens"]


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
    with pytest.raises(ValueError, match=r"takes one LensResult, got dict\. Pick one lens's result"):
        views.layer_predictions(clean, 0)
    with pytest.raises(ValueError, match="takes one LensResult, got LensDiff"):
        views.layer_predictions(clean["logit"].diff(clean["logit"]), 0)


def test_one_entry_and_empty_inputs_of_the_token_views(runs):
    clean, _ = runs
    one = views.drift_tokens(clean["logit"], layers="final_post").props
    assert one == views.drift_tokens(clean["logit"], layers=-1).props == views.drift_tokens(
        clean["logit"], layers=["final_post"]).props
    with pytest.raises(ValueError, match="the read_lenses dict given is empty"):
        views.lens_grid({})


# ---------------------------------------------------------------------- figures
def test_cka_matrix_view():
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    m = torch.tensor([[1.0, 0.8, 0.5, float("nan")], [0.8, 1.0, 0.7, 0.4], [0.5, 0.7, 1.0, 0.6], [0.2, 0.4, 0.6, 1.0]])
    view = views.cka_matrix_view(m, labels)
    assert view.component == "MatrixHeatmap" and view.title == "CKA between layers"
    p = view.props
    assert _embedded_props(view.local_src) == p  # the page draws exactly the props
    assert "TLLatentSpaces.MatrixHeatmap" in view.local_src
    assert p["matrix"][0][1] == 0.8 and p["matrix"][3][0] == 0.2 and p["matrix"][0][0] == 1.0
    assert p["matrix"][0][3] is None and p["labels"] == labels
    assert p["vmin"] == 0.0 and p["vmax"] == 1.0
    zero = views.cka_matrix_view(torch.zeros(2, 2), ["a", "b"], vmin=0, vmax=1)
    assert zero.props["matrix"] == [[0.0, 0.0], [0.0, 0.0]] and (zero.props["vmin"], zero.props["vmax"]) == (0.0, 1.0)
    wide = views.cka_matrix_view([[1.2, -0.1], [-0.1, 1.0]], ["a", "b"])
    assert (wide.props["vmin"], wide.props["vmax"]) == (-0.1, 1.2)
    assert views.cka_matrix_view([[0.5]], ["a"], vmin=0.2, vmax=0.4).props["matrix"] == [[0.5]]  # drawn clipped
    with pytest.raises(ValueError, match="square"):
        views.cka_matrix_view(torch.zeros(2, 3), ["a", "b"])
    with pytest.raises(ValueError, match="3 layers but 2 labels"):
        views.cka_matrix_view(torch.zeros(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="vmax must be greater than vmin"):
        views.cka_matrix_view(torch.eye(2), ["a", "b"], vmin=1, vmax=1)
    with pytest.raises(TypeError, match=r"vmin must be a finite number, got str \('0'\)"):
        views.cka_matrix_view(torch.eye(2), ["a", "b"], vmin="0")
    with pytest.raises(ValueError, match="finite"):
        views.cka_matrix_view(torch.eye(2), ["a", "b"], vmax=float("inf"))
    big = views.cka_matrix_view(torch.rand(31, 31), [f"{i}_pre" for i in range(30)] + ["final_post"])
    assert len(big.props["matrix"]) == 31 and all(len(row) == 31 for row in big.props["matrix"])


def test_layer_curves_view():
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    curves = {"angle": torch.tensor([0.9, 0.5, float("nan"), 0.2]), "variance": [0.1, 0.2, 0.3, 0.4]}
    null = {"angle": (torch.tensor([0.3, 0.3, 0.3, 0.3]), 0.05), "variance": (0.25, torch.tensor([0.1, 0.1, 0.1, 0.1]))}
    view = views.layer_curves_view(labels, curves, null, ylabel="cosine", title="alignment")
    assert view.component == "LayerCurves" and view.title == "alignment"
    p = view.props
    assert _embedded_props(view.local_src) == p
    assert [s["name"] for s in p["series"]] == ["angle", "variance"]  # in the order given
    angle, variance = p["series"]
    # The NaN is a gap (None); the baselines are spread to one value per label.
    assert angle["values"] == [0.9, 0.5, None, 0.2] and variance["values"] == [0.1, 0.2, 0.3, 0.4]
    assert angle["baseline"] == {"mean": [0.3] * 4, "std": [0.05] * 4}
    assert variance["baseline"] == {"mean": [0.25] * 4, "std": [0.1] * 4}
    # The y range holds the curves and the null bands (0.15 .. 0.35 for variance).
    assert p["ymin"] <= 0.1 and p["ymax"] >= 0.9
    assert p["labels"] == labels and p["ylabel"] == "cosine" and p["title"] == "alignment"
    assert len(p["yTicks"]) >= 3 and p["ymin"] <= p["yTicks"][0] < p["yTicks"][-1] <= p["ymax"]
    assert views.layer_curves_view(labels, {"a": [1, 2, 3, 4]}, ylabel="nats").title == "nats"
    fixed = views.layer_curves_view(labels, {"a": [1, 2, 3, 4]}, ymin=0, ymax=10)
    assert (fixed.props["ymin"], fixed.props["ymax"]) == (0, 10) and "baseline" not in fixed.props["series"][0]
    assert fixed.props["yTicks"] == [0, 2, 4, 6, 8, 10] and fixed.props["yDecimals"] == 0
    with pytest.raises(ValueError, match="no curve of that name"):
        views.layer_curves_view(labels, curves, {"other": (0.1, 0.1)})
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        views.layer_curves_view(labels, {"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="mean, std"):
        views.layer_curves_view(labels, curves, {"angle": 0.3})
    with pytest.raises(ValueError, match="non-empty dict"):
        views.layer_curves_view(labels, {})
    with pytest.raises(ValueError, match="ymax must be greater than ymin"):
        views.layer_curves_view(labels, {"a": [1, 2, 3, 4]}, ymin=5, ymax=5)
    # one bound beyond every value: the range starts (or ends) there and reaches past it
    above = views.layer_curves_view(labels, {"a": [0, 1, 2, 0]}, ymin=5).props
    below = views.layer_curves_view(labels, {"a": [0, 1, 2, 0]}, ymax=-5).props
    assert above["ymin"] == 5 < above["ymax"] and below["ymin"] < below["ymax"] == -5
    for bad, needle in ((dict(ymin=float("nan")), "ymin must be a finite number, got nan"),
                        (dict(ymin="0"), r"ymin must be a finite number, got str \('0'\)"),
                        (dict(title=5), "a view's title must be a string, got int")):
        with pytest.raises(ValueError if "nan" in needle else TypeError, match=needle):
            views.layer_curves_view(labels, {"a": [1, 2, 3, 4]}, **bad)
    # a curve's key as an int names its null baseline the same way; a pandas column is a curve
    keyed = views.layer_curves_view(labels, {1: [1, 2, 3, 4]}, {1: (0.0, 1.0)}).props["series"][0]
    assert keyed["name"] == "1" and keyed["baseline"]["mean"] == [0.0] * 4
    column = pd.Series([1.0, 2.0, 3.0, 4.0], index=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable NumPy array" warning from torch
        assert views.layer_curves_view(labels, {"a": column}).props["series"][0]["values"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="curve 'a' must be a tensor, array or list of numbers, got Series"):
        views.layer_curves_view(labels, {"a": pd.Series(list("abcd"))})


def test_nice_ticks():
    lo, hi, ticks, dec = views.nice_ticks(0.03, 0.97)
    assert (lo, hi) == (0.0, 1.0) and ticks[0] == 0.0 and ticks[-1] == pytest.approx(1.0) and dec == 1
    lo, hi, ticks, dec = views.nice_ticks(5, 5)
    assert lo < 5 < hi and len(ticks) >= 2


def test_figures_save_as_pages(tmp_path):
    view = views.cka_matrix_view(torch.eye(3), ["a", "b", "c"], title="<CKA & co>")
    page = view.save(tmp_path / "cka.html").read_text(encoding="utf-8")
    assert "<title>&lt;CKA &amp; co&gt;</title>" in page and view.local_src in page
    assert "<CKA" not in page  # escaped in <title>, written \u003c in the script
    assert _embedded_props(page)["title"] == "<CKA & co>"  # the same string to JavaScript
    with pytest.raises(AttributeError, match=r"view\.props"):
        view.svg  # the SVG string went with the Python drawing code


# ---------------------------------------------------------------------- the bundle is reproducible
@pytest.mark.skipif(os.environ.get("TLL_CHECK_BUNDLE") != "1", reason="set TLL_CHECK_BUNDLE=1 to rebuild the JS bundle")
def test_bundle_is_reproducible():
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are needed to rebuild the bundle")
    proc = subprocess.run(["bash", str(REPO / "js" / "check_bundle.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bundle OK" in proc.stdout
