"""Token views: tokens written readably (:class:`TokenText`), one metric per token across layers
(:func:`drift_tokens`), one stack entry's next-token predictions (:func:`layer_predictions`)."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Callable, Optional, Sequence

import torch

from tl_latentspaces.results import LensResult
from tl_latentspaces.views.data import Selector, batch_index, entry_index, num, real_positions, target_names
from tl_latentspaces.views.render import HTMLView, render_component
from tl_latentspaces.views.scales import fill_ranges, metric_name, run_metrics

__all__ = ["TokenText", "drift_tokens", "layer_predictions"]


_ESCAPE = re.compile(r"[\udc80-\udcff]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """The printable alphabet byte-level BPE (GPT-2, Llama 3, SmolLM2) writes bytes in, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    others = [b for b in range(256) if b not in printable]
    chars = printable + list(range(256, 256 + len(others)))
    return {chr(c): b for b, c in zip(printable + others, chars)}


_BYTE_ALPHABET = _byte_alphabet()


def _escape_bytes(raw: bytes) -> str:
    """Bytes as text: valid UTF-8 as characters, every other byte as a ``<0xE2>`` escape."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return _ESCAPE.sub(lambda m: f"<0x{ord(m.group()) - 0xDC00:02X}>", text)


class TokenText:
    """How views write tokens: text where a token is text, ``<0xE2>``-style escapes of its bytes where it is not.

    A token's bytes come from the tokenizer's vocabulary (byte-level alphabet or ``<0xE2>`` pieces); input tokens
    are decoded as one byte stream, so a character split over several tokens is shown whole. ``decode`` is a
    result's ``decode``; its ``tokenizer`` attribute is used when present.
    """

    def __init__(self, decode: Callable[[int], str]):
        self.decode = decode
        self.tokenizer = getattr(decode, "tokenizer", None)
        self._bytes: dict[int, Optional[bytes]] = {}
        self._text: dict[int, str] = {}

    @property
    def bos_id(self) -> Optional[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if isinstance(bos, int) else None

    def token_bytes(self, token_id: int) -> Optional[bytes]:
        """The bytes a token stands for, or None when the tokenizer does not say."""
        i = int(token_id)
        if i not in self._bytes:
            self._bytes[i] = self._find_bytes(i)
        return self._bytes[i]

    def _find_bytes(self, i: int) -> Optional[bytes]:
        text = self.decode(i)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        if convert is None:
            return None
        try:
            piece = convert(i)
        except (IndexError, KeyError, TypeError, ValueError, OverflowError):
            return None
        if not isinstance(piece, str) or not piece:
            return None
        match = _BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if all(c in _BYTE_ALPHABET for c in piece):
            raw = bytes(_BYTE_ALPHABET[c] for c in piece)
            # Only a byte-level vocabulary decodes to what the tokenizer itself says.
            if raw.decode("utf-8", errors="replace").replace("\ufffd", "") == text.replace("\ufffd", ""):
                return raw
        return None

    def text(self, token_id: int) -> str:
        """One token on its own: its text, or escapes for bytes that are not text alone."""
        i = int(token_id)
        if i not in self._text:
            text = self.decode(i)
            if "\ufffd" in text:
                raw = self.token_bytes(i)
                text = text.replace("\ufffd", "<?>") if raw is None else _escape_bytes(raw)
            self._text[i] = text
        return self._text[i]

    def sequence(self, ids: Sequence[int]) -> tuple[list[str], list[str]]:
        """Input tokens read as one text: ``(texts, notes)``, one per token.

        A split character is written whole where it starts and as ``…`` plus the character in a token that only
        continues it; such a token's note gives its bytes and the character, other notes are empty.
        """
        ids = [int(i) for i in ids]
        raws = [self.token_bytes(i) for i in ids]
        texts = [self.text(i) for i in ids]
        notes = [""] * len(ids)
        for known, run in itertools.groupby(range(len(ids)), key=lambda k: raws[k] is not None):
            if known:
                run = list(run)
                self._decode_run(raws, run[0], run[-1] + 1, texts, notes)
        return texts, notes

    def _decode_run(self, raws: list[Optional[bytes]], start: int, stop: int, texts: list[str],
                    notes: list[str]) -> None:
        """Decode tokens ``start:stop`` (all with known bytes) as one byte stream."""
        owner = [k for k in range(start, stop) for _ in raws[k]]
        stream = b"".join(raws[start:stop]).decode("utf-8", errors="surrogateescape")
        pieces: dict[int, list[str]] = {k: [] for k in range(start, stop)}
        split: dict[int, str] = {}  # token -> a character it shares with another token
        offset = 0
        for ch in stream:
            raw = ch.encode("utf-8", errors="surrogateescape")
            shown = _escape_bytes(raw)
            first = owner[offset]
            pieces[first].append(shown)
            for k in {owner[b] for b in range(offset, offset + len(raw))} - {first}:
                split.setdefault(k, shown)
                split.setdefault(first, shown)
            offset += len(raw)
        for k, ch in split.items():
            texts[k] = "".join(pieces[k]) or "\u2026" + ch
            notes[k] = f"bytes {raws[k].hex(' ').upper()}, part of \u201c{ch}\u201d"


def input_tokens(result: LensResult, b: int, keep: list[int]) -> tuple[dict[str, Any], bool]:
    """The props naming the input tokens at the read positions ``keep`` of row ``b``; and whether they open with BOS."""
    positions = [result.positions[i] for i in keep]
    words = TokenText(result.decode)
    row = [int(i) for i in result.tokens[b].tolist()]
    texts, notes = words.sequence(row)
    bos = positions[0] == 0 and words.bos_id is not None and row[0] == words.bos_id
    props = {"tokens": [texts[p] for p in positions], "tokenIds": [row[p] for p in positions],
             "tokenNotes": [notes[p] for p in positions], "positions": positions}
    return props, bos


def _informative_entry(values: torch.Tensor, m: dict[str, Any], skip: Sequence[int]) -> int:
    """The entry (row of ``values``, ``[entry, pos]``) whose colour intensity varies most by position.

    The intensity is the components' (js/src/colors.ts ``intensity``).
    """
    cols = [p for p in range(values.shape[1]) if p not in skip] or list(range(values.shape[1]))
    squash = (lambda x: x.sign() * x.abs().log1p()) if m["log"] else (lambda x: x)  # noqa: E731
    x = squash(torch.nan_to_num(values[:, cols].double()))
    lo, hi = squash(torch.tensor(float(m["min"]))), squash(torch.tensor(float(m["max"])))
    if m["scale"] == "diverging":
        t = (x / max(abs(float(lo)), abs(float(hi)))).clamp(-1, 1)
    else:
        t = ((x - lo) / (hi - lo)).clamp(0, 1)
    spread = t.std(dim=1, correction=0) if t.shape[1] > 1 else t.abs()[:, 0]
    return int(spread.argmax())


def drift_tokens(result: LensResult, metric: Optional[str] = None, *, batch: int = 0,
                 layers: Optional[Sequence[Selector]] = None, title: Optional[str] = None) -> HTMLView:
    """The input's tokens coloured by one per-token metric, one stack entry at a time (``TokenDrift``).

    A slider picks the entry (of ``layers``, default all); colour ranges are those of :func:`lens_grid`. It opens
    on the entry whose colours vary most across the tokens. ``metric`` is named as in
    :meth:`LensResult.to_dataframe` (old names warn); default ``own_cosine`` for the embedding lens, else
    ``kl_to_final``. ``.props["values"]`` is ``[entry][pos]``.
    """
    if not isinstance(result, LensResult):
        raise ValueError(f"drift_tokens takes one LensResult, got {type(result).__name__}.")
    if metric is None:
        metric = "own_cosine" if result.own_scores is not None else "kl_to_final"
    elif isinstance(metric, str):
        metric = metric_name(metric)
    b = batch_index(batch, result.tokens.shape[0])
    keep = real_positions(result, b)
    offered = run_metrics(result, 0, b, keep, target_names(result, b, keep))
    chosen = [m for m in offered if metric in (m["key"], m["name"])]
    if not chosen:
        raise ValueError(
            f"metric {metric!r} is not available for this {result.lens} lens result; valid: "
            f"{[m['key'] for m in offered]}."
        )
    m = chosen[0]
    if isinstance(layers, (str, int)):
        layers = [layers]  # one entry
    entries = list(range(len(result.labels))) if layers is None else [entry_index(result, e) for e in layers]
    if not entries:
        raise ValueError("layers is empty; pass at least one stack entry, or None for all.")
    m["values"] = [m["values"][e] for e in entries]
    tokens, bos = input_tokens(result, b, keep)
    skip = (0,) if bos else ()
    fill_ranges([{"metrics": [m]}], skip=skip, labels=[result.labels[e] for e in entries])
    del m["view"]
    values = torch.tensor([[float("nan") if v is None else v for v in r] for r in m["values"]], dtype=torch.float64)
    if title is None:
        model = f" · {result.model_name}" if result.model_name else ""
        title = f"{m['name']} across layers · {result.lens} lens{model}"
    props = {
        "title": title, "lens": result.lens, **tokens, "labels": [result.labels[e] for e in entries],
        "values": m.pop("values"), "metric": m, "initialEntry": _informative_entry(values, m, skip),
        "bos": bos, "hideBos": bos and len(keep) > 1,
    }
    return render_component("TokenDrift", props, title=title)


def layer_predictions(result: LensResult, label: Selector, *, batch: int = 0) -> HTMLView:
    """One stack entry's next-token predictions, with CircuitsVis's ``TokenLogProbs`` component.

    The read positions must be consecutive. The next token's probability and rank come from the top-k, else
    from the targets; ValueError where neither has it. Read with the next tokens as targets::

        ids = model.to_tokens(text)
        result = tll.logit_lens(model, ids, targets=ids.roll(-1, dims=1))
    """
    if not isinstance(result, LensResult):
        hint = " Pick one lens's result, e.g. results['logit']." if isinstance(result, dict) else ""
        raise ValueError(f"layer_predictions takes one LensResult, got {type(result).__name__}.{hint}")
    e = entry_index(result, label)
    b = batch_index(batch, result.tokens.shape[0])
    keep = real_positions(result, b)
    pos = [result.positions[i] for i in keep]
    if len(pos) < 2:
        raise ValueError("layer_predictions needs at least two consecutive real positions.")
    if any(q - p != 1 for p, q in zip(pos, pos[1:])):
        raise ValueError(
            f"layer_predictions shows each position predicting the next, so the read positions must be "
            f"consecutive; these are {pos}. Read with pos=None or a slice."
        )
    ids = result.tokens[b]
    top_ids = result.top_ids[e, b].tolist()
    top_probs = result.top_probs[e, b].double()
    has_targets = result.target_probs is not None and result.target_ranks is not None
    ranks, log_probs, missing = [], [], []
    for i, p in zip(keep, pos[:-1]):
        nxt = int(ids[p + 1])
        tids = [] if result.target_ids is None else result.target_ids[b, i].tolist()
        if nxt in top_ids[i]:
            rank = top_ids[i].index(nxt)
            prob = float(top_probs[i, rank])
        elif has_targets and nxt in tids:
            t = tids.index(nxt)
            rank, prob = int(result.target_ranks[e, b, i, t]), float(result.target_probs[e, b, i, t])
        else:
            missing.append(p)
            continue
        ranks.append(rank)
        log_probs.append(math.log(max(prob, 1e-45)))
    if missing:
        raise ValueError(
            f"the next token's probability at {result.labels[e]} is unknown at positions {missing}: it is not "
            f"in the top-{result.top_ids.shape[-1]} and not a target. Read with the next tokens as targets: "
            "ids = model.to_tokens(text); tll.logit_lens(model, ids, targets=ids.roll(-1, dims=1))."
        )
    words = TokenText(result.decode)
    texts, _ = words.sequence(ids.tolist())
    props = {
        "prompt": [texts[p] for p in pos],
        "topKLogProbs": [[num(math.log(max(p, 1e-45))) for p in top_probs[i].tolist()] for i in keep[:-1]],
        "topKTokens": [[words.text(t) for t in top_ids[i]] for i in keep[:-1]],
        "correctTokenRank": ranks,
        "correctTokenLogProb": [num(lp) for lp in log_probs],
    }
    model = f" · {result.model_name}" if result.model_name else ""
    title = f"{result.labels[e]} predictions · {result.lens} lens{model}"
    return render_component("TokenLogProbs", props, title=title, circuitsvis=True)
