"""Views: lens readouts and alignment results as CircuitsVis HTML, in a notebook or a saved page.

Every function here returns an :class:`HTMLView`, a subclass of CircuitsVis's ``RenderedHTML``:
a notebook displays it like any CircuitsVis component, and ``view.save("grid.html")`` writes one
self-contained page. Unlike CircuitsVis, nothing here ever touches the network: the JavaScript is
always inlined (CircuitsVis's ``_repr_html_`` probes the internet on every display and then
imports its script from a CDN; ours never does), and saved pages forbid fetching by their
Content-Security-Policy.

* :func:`lens_grid`: the layer x position grid of a lens's top-1 tokens (our own React component,
  shipped as ``tl_latentspaces/static/views.iife.js``, built from ``js/``), with a lens switch, a
  metric switch, top-k on hover and a difference mode for two runs.
* :func:`drift_tokens`: one per-token metric across layers (own-token cosine, KL to final, ...)
  with CircuitsVis's ``ColoredTokensMulti``.
* :func:`layer_predictions`: one layer's next-token predictions with CircuitsVis's
  ``TokenLogProbs``.
* :func:`cka_matrix_view`, :func:`layer_curves_view`: static SVG figures of alignment results.

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> results = tll.read_lenses(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
    >>> grid = tll.lens_grid(results)  # doctest: +SKIP
    >>> grid.save("eiffel.html")  # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import uuid
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from circuitsvis.utils.render import RenderedHTML, render

from tl_latentspaces.files import write_bytes_atomic
from tl_latentspaces.results import LensDiff, LensResult

__all__ = [
    "HTMLView",
    "lens_grid",
    "drift_tokens",
    "layer_predictions",
    "cka_matrix_view",
    "layer_curves_view",
]

BUNDLE = "views.iife.js"
"""The bundle's file name under ``tl_latentspaces/static/``."""
BUNDLE_GLOBAL = "TLLatentSpaces"
"""The global the bundle defines (CircuitsVis's is ``CircuitsVis``)."""

# Saved pages may run their inline scripts and styles and nothing else: no request of any kind
# leaves the page (a view that tried would fail its browser test with a CSP error).
COMPACT_FROM = 24
"""Grids of more positions than this open in compact mode (narrow columns)."""

PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; font-src data:"

Selector = Union[int, str]
ArrayLike = Any  # a torch.Tensor, numpy array or nested list of numbers


# ====================================================================== the view object
class HTMLView(RenderedHTML):
    """A CircuitsVis ``RenderedHTML`` that renders offline and never probes the network.

    Notebooks (Jupyter, VS Code, Colab) call ``_repr_html_`` and get the view with its script
    inlined, online or offline. ``str(view)`` is the same inlined HTML (CircuitsVis's ``str()``
    imports its script from a CDN instead); ``show_code()`` still gives CircuitsVis's CDN
    version for the views built on CircuitsVis's own components.

    Attributes:
        local_src: The HTML fragment with its JavaScript inlined.
        cdn_src: CircuitsVis's CDN fragment for CircuitsVis components; for our own components
            (no CDN hosts them) the same as ``local_src``.
        title: The saved page's title.
        component: The React component drawn (``"LensGrid"``, ``"ColoredTokensMulti"``,
            ``"TokenLogProbs"``), or None for a static SVG figure.
        props: The data the component (or figure) receives, as plain Python lists and numbers.
        svg: The SVG document of a static figure, else None.
    """

    def __init__(
        self,
        local_src: str,
        cdn_src: Optional[str] = None,
        *,
        title: str = "",
        component: Optional[str] = None,
        props: Optional[dict[str, Any]] = None,
        svg: Optional[str] = None,
    ):
        super().__init__(local_src, local_src if cdn_src is None else cdn_src)
        self.title = title
        self.component = component
        self.props = props
        self.svg = svg

    def _repr_html_(self) -> str:
        # The inlined source, always: CircuitsVis's version probes the internet first.
        return self.local_src

    def __html__(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def __repr__(self) -> str:
        kind = self.component or "svg figure"
        return f"<HTMLView {kind}{': ' + self.title if self.title else ''} ({len(self.local_src):,} chars)>"

    def to_html(self) -> str:
        """One complete, self-contained HTML page holding the view."""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(self.title or 'tl_latentspaces view')}</title>\n"
            "</head>\n<body style=\"background: white; margin: 8px;\">\n"
            f"{self.local_src}\n"
            "</body>\n</html>\n"
        )

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write :meth:`to_html` to ``path`` atomically; returns the path.

        The page is written to a temporary file in the same folder, then moved over ``path``,
        so a reader never sees half a page and an existing file survives a failed write.
        """
        return write_bytes_atomic(path, self.to_html().encode("utf-8"), make_parents=False)


def _wrap(
    rendered: RenderedHTML, kwargs: dict[str, Any], *, title: str, component: str, props: dict[str, Any]
) -> HTMLView:
    """A CircuitsVis ``RenderedHTML`` as an :class:`HTMLView` (keeps its CDN source for show_code).

    Two repairs to CircuitsVis's local HTML: its ``<div id=... />`` is not a closed element in
    HTML, so whatever follows on a page (another view) ends up inside the div and is wiped when
    React renders there; and its props are raw JSON in the script, so a token holding
    ``</script>`` would end the script. ``kwargs`` are the props exactly as passed to CircuitsVis,
    to find that JSON.
    """
    from circuitsvis.utils.convert_props import convert_props

    src = re.sub(r'<div id="(circuits-vis-[^"]+)"([^>]*?)\s*/>', r'<div id="\1"\2></div>', rendered.local_src, count=1)
    raw = convert_props(kwargs)
    if raw in src:
        try:
            src = src.replace(raw, _js_json(json.loads(raw)), 1)
        except ValueError:  # NaN or infinity in the props: CircuitsVis's own JSON stays
            pass
    return HTMLView(src, rendered.cdn_src, title=title, component=component, props=props)


# ====================================================================== our own components
def bundle_source() -> str:
    """The JavaScript bundle of our components, as shipped in the package."""
    ref = resources.files("tl_latentspaces").joinpath("static", BUNDLE)
    try:
        text = ref.read_text(encoding="utf-8")
    except FileNotFoundError as err:  # pragma: no cover - a broken install
        raise RuntimeError(
            f"tl_latentspaces/static/{BUNDLE} is missing from the installed package; reinstall "
            "tl_latentspaces, or in a checkout build it with `cd js && npm ci && npm run build`."
        ) from err
    if "</script" in text.lower():  # pragma: no cover - guarded by a test
        raise RuntimeError(f"{BUNDLE} contains '</script' and cannot be inlined in a page.")
    return text


def _js_json(value: Any) -> str:
    """JSON that is safe inside an inline ``<script>``: no ``</script>``, no ``<!--``."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _render_component(component: str, props: dict[str, Any], *, title: str) -> HTMLView:
    """Render one of our components the way CircuitsVis's ``render_local`` does, offline."""
    uid = "tl-latentspaces-" + uuid.uuid4().hex[:13]
    src = (
        f'<div id="{uid}" style="margin: 15px 0;"></div>\n'
        '<script crossorigin type="module">\n'
        f"{bundle_source()}\n"
        f'{BUNDLE_GLOBAL}.render(\n  "{uid}",\n  {BUNDLE_GLOBAL}.{component},\n  {_js_json(props)}\n)\n'
        "</script>"
    )
    return HTMLView(src, title=title, component=component, props=props)


# ====================================================================== data helpers
def _num(x: float, digits: int = 5) -> Optional[float]:
    """A float rounded to ``digits`` significant digits; None for NaN and infinities."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _nums(t: torch.Tensor, digits: int = 5) -> Any:
    """A tensor as nested lists of rounded floats (None for non-finite values)."""
    flat = [_num(v, digits) for v in t.detach().double().reshape(-1).tolist()]
    if t.ndim == 0:
        return flat[0]
    return _unflatten(flat, list(t.shape))


def _unflatten(flat: list, shape: list[int]) -> list:
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_unflatten(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _batch_index(batch: Any, size: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or not -size <= batch < size:
        raise ValueError(f"batch must be an int in [-{size}, {size - 1}] (the input has {size} rows), got {batch!r}.")
    return batch % size


def _real_positions(result: LensResult, b: int) -> list[int]:
    """Indices into the read positions of batch row ``b`` that are real tokens (not padding)."""
    keep = [i for i, m in enumerate(result.mask[b].tolist()) if m]
    if not keep:
        raise ValueError(f"batch row {b} has no real (non-padding) token among the read positions.")
    return keep


def _entry_index(result: LensResult, label: Selector) -> int:
    if isinstance(label, str):
        return result.index(label)
    if isinstance(label, int) and not isinstance(label, bool):
        n = len(result.labels)
        if not -n <= label < n:
            raise ValueError(f"entry {label} is out of range for {n} entries; valid labels are {result.labels}.")
        return label % n
    raise ValueError(f"a stack entry is a label like '3_pre' or an int, got {label!r}.")


def _target_names(result: LensResult, b: int, keep: list[int]) -> list[str]:
    """A name per target column: the token when every shown position has the same target."""
    if result.target_ids is None:
        return []
    names = []
    for t in range(result.target_ids.shape[-1]):
        ids = set(result.target_ids[b, keep, t].tolist())
        names.append(json.dumps(result.decode(ids.pop()), ensure_ascii=False) if len(ids) == 1 else f"target {t}")
    return names


# ====================================================================== tokens as text
_ESCAPE = re.compile(r"[\udc80-\udcff]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """The printable alphabet byte-level BPE (GPT-2, Llama 3, SmolLM2) writes bytes in, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_ALPHABET = _byte_alphabet()


def _escape_bytes(raw: bytes) -> str:
    """Bytes as text: valid UTF-8 as characters, every other byte as a ``<0xE2>`` escape."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return _ESCAPE.sub(lambda m: f"<0x{ord(m.group()) - 0xDC00:02X}>", text)


class TokenText:
    """How views write tokens: text where a token is text, its bytes where it is not.

    A byte-level tokenizer can split one character over several tokens (an emoji into three),
    and each such token decodes to ``\ufffd`` alone. Here a token's bytes come from the
    tokenizer's own vocabulary (the byte-level alphabet, or ``<0xE2>`` byte-fallback pieces), a
    token that is not text on its own is written with ``<0xE2>``-style escapes, and a sequence
    of input tokens is decoded as one byte stream, so a split character is shown whole.

    Args:
        decode: The result's ``decode``; its ``tokenizer`` attribute (see
            :class:`tl_latentspaces.model.TokenDecoder`) is used when present.
    """

    def __init__(self, decode: Callable[[int], str]):
        self.decode = decode
        self.tokenizer = getattr(decode, "tokenizer", None)
        self._bytes: dict[int, Optional[bytes]] = {}
        self._text: dict[int, str] = {}

    @property
    def bos_id(self) -> Optional[int]:
        """The tokenizer's BOS id, or None."""
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

        The tokens' bytes are decoded as one stream, so a character split over several tokens
        is written whole in the token where it starts, and as ``…`` plus that character in a
        token that only continues it. ``notes`` gives such a token's bytes and the character
        it is part of, else is empty.
        """
        ids = [int(i) for i in ids]
        raws = [self.token_bytes(i) for i in ids]
        texts = [self.text(i) for i in ids]
        notes = [""] * len(ids)
        start = 0
        while start < len(ids):
            stop = start
            while stop < len(ids) and raws[stop] is not None:
                stop += 1
            if stop > start:
                self._decode_run(raws, start, stop, texts, notes)
            start = stop + 1
        return texts, notes

    def _decode_run(self, raws: list[Optional[bytes]], start: int, stop: int, texts: list[str],
                    notes: list[str]) -> None:
        """Decode tokens ``start:stop`` (all with known bytes) as one byte stream."""
        owner = [k for k in range(start, stop) for _ in raws[k] or b""]
        stream = b"".join(raws[k] or b"" for k in range(start, stop)).decode("utf-8", errors="surrogateescape")
        pieces: dict[int, list[str]] = {k: [] for k in range(start, stop)}
        split: dict[int, str] = {}  # token -> a character it shares with another token
        offset = 0
        for ch in stream:
            raw = ch.encode("utf-8", errors="surrogateescape")
            shown = _escape_bytes(raw)
            first = owner[offset]
            pieces[first].append(shown)
            for k in {owner[b] for b in range(offset, offset + len(raw))} - {first} if len(raw) > 1 else ():
                split.setdefault(k, shown)
                split.setdefault(first, shown)
            offset += len(raw)
        for k in range(start, stop):
            if k not in split:
                continue
            texts[k] = "".join(pieces[k]) or "\u2026" + split[k]
            hexes = " ".join(f"{b:02X}" for b in raws[k] or b"")
            notes[k] = f"bytes {hexes}, part of \u201c{split[k]}\u201d"


# ====================================================================== lens grid
# Colour ranges: the central 96% of a lens's values, so that a few extreme cells (the BOS
# position, 0_pre's KL of hundreds of nats, 0_pre's own-token cosine of 1) do not wash out the rest.
Q_LOW, Q_HIGH = 0.02, 0.98
_RANGES = {
    "fixed": "fixed range",
    "prob": "0 to the 98th percentile",
    "quantile": "2nd to 98th percentile",
    "log": "log scale, 2nd to 98th percentile",
    "centred": "centred on 0, ± the 98th percentile of |value|",
    "centred-log": "log scale, centred on 0, ± the 98th percentile of |value|",
}

# Old metric names, accepted for one release with a DeprecationWarning.
_RENAMED = {"own_scores": "own_cosine", "own_ranks": "own_rank"}
_RENAMED_TARGET = re.compile(r"target_(probs|ranks):(\d+)|target_(prob|rank)_delta:(\d+)")


def _metric_name(name: str, *, stacklevel: int = 3) -> str:
    """The current name of a metric given under an old name (with a DeprecationWarning)."""
    new = _RENAMED.get(name)
    match = _RENAMED_TARGET.fullmatch(name) if new is None else None
    if match and match.group(1):
        new = f"target{match.group(2)}_{match.group(1)[:-1]}"
    elif match:
        new = f"target{match.group(4)}_{match.group(3)}_delta"
    if new is None:
        return name
    warnings.warn(
        f"the metric name {name!r} is deprecated and will be removed in the next release; use {new!r} "
        "(the column name LensResult.to_dataframe() and summary() use).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return new


def _metric(key: str, name: str, view: int, values: torch.Tensor, *, scale: str = "sequential",
            reverse: bool = False, log: bool = False, fmt: str = "number", unit: str = "",
            description: str, ranging: str) -> dict[str, Any]:
    m: dict[str, Any] = {
        "key": key, "name": name, "view": view, "values": _nums(values), "scale": scale,
        "reverse": reverse, "log": log, "format": fmt, "description": description,
    }
    if unit:
        m["unit"] = unit
    m["_ranging"] = ranging
    return m


def _run_metrics(r: LensResult, view: int, b: int, keep: list[int], targets: list[str]) -> list[dict[str, Any]]:
    sel = lambda t: t[:, b][:, keep]  # noqa: E731  [entry, pos]
    out = [
        _metric("top1_prob", "top-1 probability", view, sel(r.top_probs[..., 0]), fmt="percent",
                description="probability of the cell's top-1 token under the lens", ranging="prob"),
        _metric("entropy", "entropy", view, sel(r.entropy), reverse=True, unit="nats",
                description="entropy of the lens's distribution (dark: confident)", ranging="quantile"),
        _metric("kl_to_final", "KL to final", view, sel(r.kl_to_final), reverse=True, log=True, unit="nats",
                description="KL(final ‖ lens) (dark: close to the model's output)", ranging="log"),
    ]
    if r.target_probs is not None and r.target_ranks is not None:
        for t, name in enumerate(targets):
            out.append(_metric(f"target{t}_prob", f"p({name})", view, sel(r.target_probs[..., t]), fmt="percent",
                               description=f"probability of the target {name}", ranging="prob"))
            out.append(_metric(f"target{t}_rank", f"rank({name})", view, sel(r.target_ranks[..., t].double()),
                               reverse=True, log=True, fmt="integer",
                               description=f"rank of the target {name} (0 = top; dark: near the top)",
                               ranging="log"))
    if r.own_scores is not None:
        out.append(_metric("own_cosine", "own-token cosine", view, sel(r.own_scores), scale="diverging",
                           description="cosine between the residual and its own input token's embedding "
                                       "(blue: positive, red: negative)", ranging="centred"))
    if r.own_ranks is not None:
        out.append(_metric("own_rank", "own-token rank", view, sel(r.own_ranks.double()), reverse=True, log=True,
                           fmt="integer", description="rank of the position's own token by cosine (0 = nearest)",
                           ranging="log"))
    return out


def _diff_metrics(d: LensDiff, b: int, keep: list[int], targets: list[str]) -> list[dict[str, Any]]:
    sel = lambda t: t[:, b][:, keep]  # noqa: E731
    base, other = d.base, d.other
    out = []
    divergence = getattr(d, "divergence", None)
    if divergence is not None:
        out.append(_metric("divergence", "divergence", -1, sel(divergence), log=True, unit="nats",
                           description="KL(base lens ‖ other lens) at each cell (dark: the runs' readouts differ)",
                           ranging="log"))
    out += [
        _metric("top1_changed", "top-1 changed", -1, sel(d.top1_changed.double()), fmt="bool",
                description="whether the lens's top-1 token differs between the runs", ranging="fixed"),
        _metric("kl_delta", "Δ KL to final", -1, sel(d.kl_delta), scale="diverging", unit="nats",
                description="change in KL to each run's own final distribution", ranging="centred"),
        _metric("entropy_delta", "Δ entropy", -1, sel(d.entropy_delta), scale="diverging", unit="nats",
                description="change in the lens's entropy", ranging="centred"),
    ]
    if d.target_prob_delta is not None and base.target_ranks is not None and other.target_ranks is not None:
        for t, name in enumerate(targets):
            out.append(_metric(f"target{t}_prob_delta", f"Δ p({name})", -1, sel(d.target_prob_delta[..., t]),
                               scale="diverging", fmt="percent",
                               description=f"change in the probability of {name} (percentage points)",
                               ranging="centred"))
            rank_delta = other.target_ranks[..., t].double() - base.target_ranks[..., t].double()
            out.append(_metric(f"target{t}_rank_delta", f"Δ rank({name})", -1, sel(rank_delta), scale="diverging",
                               log=True, fmt="integer", reverse=True,
                               description=f"change in the rank of {name} (blue: moved up)", ranging="centred-log"))
    return out


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values, q)) if values.numel() else 0.0


def colour_range(values: Sequence[float], ranging: str) -> tuple[float, float]:
    """The colour range ``(min, max)`` of a metric's values (see ``_RANGES`` for the kinds)."""
    v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
    if ranging == "fixed":
        return 0.0, 1.0
    if ranging in ("centred", "centred-log"):
        size = v.abs()
        bound = _quantile(size, Q_HIGH)
        if bound <= 0:  # mostly zeros (cells a patch cannot reach): scale to what did change
            bound = _quantile(size[size > 0], Q_HIGH) if bool((size > 0).any()) else 0.0
        bound = bound if bound > 0 else 1e-6
        return -bound, bound
    if ranging == "prob":
        lo, hi = 0.0, _quantile(v, Q_HIGH)
    else:
        lo, hi = _quantile(v, Q_LOW), _quantile(v, Q_HIGH)
    if hi <= lo:  # (nearly) constant: widen to the data, then keep the scale non-degenerate
        hi = max(hi, float(v.max())) if v.numel() else hi
        hi = hi if hi > lo else lo + 1e-6
    return lo, hi


def embedding_entry_is_apart(rows: Sequence[Sequence[float]], *, log: bool = False) -> bool:
    """Whether the first stack entry's values sit far from every later entry's.

    The first entry (``0_pre``) is the token embedding itself: its own-token cosine is 1 where
    every later entry is near 0, its KL to final hundreds of nats against tens. Left in, it
    sets the colour range and every other row is pale or saturated. It is apart when its median
    lies more than three interquartile ranges (of the later entries' medians) outside their
    quartiles. Later entries are never left out: the last ones, where the answer appears, are
    the signal.

    Args:
        rows: The values of each entry (``[entry][...]``).
        log: Compare ``log1p`` of the values (the metrics drawn on a log scale).
    """
    medians = []
    for row in rows:
        v = torch.tensor([x for x in row if x is not None], dtype=torch.float64)
        if log:
            v = v.sign() * v.abs().log1p()
        medians.append(float(v.median()) if v.numel() else float("nan"))
    later = torch.tensor(medians[1:], dtype=torch.float64)
    later = later[torch.isfinite(later)]
    if later.numel() < 3 or not math.isfinite(medians[0]):
        return False
    q1, q3 = _quantile(later, 0.25), _quantile(later, 0.75)
    fence = 3 * (q3 - q1)
    return medians[0] < q1 - fence or medians[0] > q3 + fence


def _fill_ranges(lenses: list[dict[str, Any]], skip: Sequence[int] = (), labels: Sequence[str] = ()) -> None:
    """Give each metric of each lens its colour range, shared by the runs of that lens.

    Ranges are per lens and per metric (the embedding lens's probabilities are a thousand times
    smaller than the logit lens's), robust to outliers, and leave out the columns in ``skip``
    (the BOS position, whose readouts are junk) and, for a run's own metrics, the stack entries
    ``0_pre`` when it is far from all others (:func:`embedding_entry_is_apart`); the legend says so.
    """
    for lens in lenses:
        groups: dict[str, list[dict[str, Any]]] = {}
        for m in lens["metrics"]:
            groups.setdefault(m["key"], []).append(m)
        for metrics in groups.values():
            ranging = metrics[0]["_ranging"]
            n_entries = len(metrics[0]["values"])
            rows = [[v for m in metrics for p, v in enumerate(m["values"][e]) if v is not None and p not in skip]
                    for e in range(n_entries)]
            left_out: list[int] = []
            if ranging in ("quantile", "log", "centred", "prob") and metrics[0].get("view", 0) >= 0:
                left_out = [0] if embedding_entry_is_apart(rows, log=ranging == "log") else []
            values = [v for e, row in enumerate(rows) if e not in left_out for v in row]
            lo, hi = colour_range(values, ranging)
            lo_r, hi_r = _num(lo), _num(hi)
            if lo_r is None or hi_r is None or not hi_r > lo_r:  # rounding merged them
                lo_r, hi_r = lo, hi if hi > lo else lo + 1e-6
            note = _RANGES[ranging] + (" of this lens" if ranging != "fixed" else "")
            excluded = (["BOS"] if skip and ranging != "fixed" else []) + [
                labels[e] if e < len(labels) else f"entry {e}" for e in left_out]
            if excluded:
                note += f", {' and '.join(excluded)} left out"
            for m in metrics:
                m["min"], m["max"] = lo_r, hi_r
                m["rangeNote"] = note
                m["clipLow"] = any(v is not None and v < lo_r for row in m["values"] for v in row)
                m["clipHigh"] = any(v is not None and v > hi_r for row in m["values"] for v in row)
                del m["_ranging"]


def _grid_runs(
    results: tuple[Any, ...], diff: bool, labels: Optional[Sequence[str]]
) -> tuple[list[str], list[list[LensResult]], list[Optional[LensDiff]]]:
    """Normalise lens_grid's arguments to (lens names, runs per lens, diff per lens)."""
    if not results:
        raise ValueError(
            "lens_grid needs at least one LensResult (or a read_lenses dict, or a LensDiff); got none."
        )
    named: list[tuple[str, Any]] = []
    if diff:
        if len(results) != 2:
            raise ValueError(
                f"lens_grid(..., diff=True) compares two runs: pass exactly two results, base first "
                f"(e.g. lens_grid(clean, patched, diff=True)); got {len(results)}."
            )
        base, other = results
        if isinstance(base, LensResult) and isinstance(other, LensResult):
            named.append((base.lens, LensDiff.between(base, other)))
        elif isinstance(base, Mapping) and isinstance(other, Mapping):
            if list(base) != list(other):
                raise ValueError(
                    f"the two runs hold different lenses: {list(base)} vs {list(other)}; read both with the same lenses."
                )
            for key in base:
                if not (isinstance(base[key], LensResult) and isinstance(other[key], LensResult)):
                    raise ValueError(f"diff=True needs LensResult values; {key!r} holds {type(base[key]).__name__}.")
                named.append((str(key), LensDiff.between(base[key], other[key])))
        else:
            raise ValueError(
                "lens_grid(base, other, diff=True) takes two LensResults or two read_lenses dicts; got "
                f"{type(base).__name__} and {type(other).__name__}."
            )
    else:
        for item in results:
            if isinstance(item, Mapping):
                named.extend((str(k), v) for k, v in item.items())
            else:
                named.append(("", item))
        for i, (name, item) in enumerate(named):
            if isinstance(item, LensResult):
                named[i] = (name or item.lens, item)
            elif isinstance(item, LensDiff):
                named[i] = (name or item.base.lens, item)
            else:
                raise ValueError(
                    f"lens_grid takes LensResults, LensDiffs or read_lenses dicts of them; got "
                    f"{type(item).__name__}. To compare two runs pass lens_grid(clean, patched, diff=True)."
                )
        if len({isinstance(item, LensDiff) for _, item in named}) > 1:
            raise ValueError(
                "lens_grid cannot mix LensResults and LensDiffs: show either readouts or differences."
            )
    names = [name for name, _ in named]
    if labels is not None:
        if isinstance(labels, str) or len(labels) != len(named) or not all(isinstance(s, str) for s in labels):
            raise ValueError(
                f"labels names the lens buttons: one string per result ({len(named)}: {names}), got {labels!r}."
            )
        names = list(labels)
    if len(set(names)) != len(names):
        raise ValueError(
            f"the lens buttons would have duplicate names {names}; pass labels=[...] with one distinct name per result."
        )
    runs = [[item.base, item.other] if isinstance(item, LensDiff) else [item] for _, item in named]
    diffs = [item if isinstance(item, LensDiff) else None for _, item in named]
    return names, runs, diffs


def _check_same_input(names: list[str], runs: list[list[LensResult]]) -> None:
    ref, ref_name = runs[0][0], names[0]
    for name, rs in zip(names, runs):
        for r in rs:
            problems = []
            if r.tokens.shape != ref.tokens.shape or not torch.equal(r.tokens, ref.tokens):
                problems.append("the input tokens")
            if r.positions != ref.positions:
                problems.append(f"the read positions ({r.positions} vs {ref.positions})")
            if r.labels != ref.labels:
                problems.append(f"the stack entries ({r.labels} vs {ref.labels})")
            if problems:
                raise ValueError(
                    f"lens_grid shows lenses read on one input; {name!r} differs from {ref_name!r} in "
                    f"{' and '.join(problems)}. Read them in one call, e.g. "
                    "tll.read_lenses(model, input, lenses=('logit', 'embedding', tuned)), with the same layers and pos."
                )


def _grid_props(
    results: tuple[Any, ...],
    *,
    labels: Optional[Sequence[str]],
    batch: int,
    diff: bool,
    metric: Optional[str],
    run_names: Sequence[str],
    title: Optional[str],
) -> dict[str, Any]:
    names, runs, diffs = _grid_runs(results, diff, labels)
    _check_same_input(names, runs)
    diff_mode = diffs[0] is not None
    if diff_mode and (isinstance(run_names, str) or len(run_names) != 2):
        raise ValueError(f"run_names names the two runs, base first, e.g. ('clean', 'patched'); got {run_names!r}.")
    ref = runs[0][0]
    b = _batch_index(batch, ref.tokens.shape[0])
    keep = _real_positions(ref, b)
    positions = [ref.positions[i] for i in keep]
    words = TokenText(ref.decode)
    row = [int(i) for i in ref.tokens[b].tolist()]
    texts, notes = words.sequence(row)
    tokens = [texts[p] for p in positions]
    bos = positions[0] == 0 and words.bos_id is not None and row[0] == words.bos_id

    lenses = []
    for name, rs, d in zip(names, runs, diffs):
        top_ids = [r.top_ids[:, b][:, keep].tolist() for r in rs]
        run_words = [TokenText(r.decode) for r in rs]
        decoded = [[[[w.text(i) for i in cell] for cell in row_] for row_ in ids] for w, ids in zip(run_words, top_ids)]
        targets = _target_names(rs[0], b, keep)
        metrics: list[dict[str, Any]] = []
        if d is not None:
            metrics += _diff_metrics(d, b, keep, targets)
        for view, r in enumerate(rs):
            metrics += _run_metrics(r, view, b, keep, targets)
        lenses.append({
            "name": name,
            "scoreName": "cosine" if rs[0].lens == "embedding" else "logit",
            "topTokens": decoded,
            "topIds": top_ids,
            "topProbs": [_nums(r.top_probs[:, b][:, keep]) for r in rs],
            "topScores": [_nums(r.top_scores[:, b][:, keep]) for r in rs],
            "metrics": metrics,
        })
    _fill_ranges(lenses, skip=(0,) if bos else (), labels=ref.labels)

    # The metric and view shown first.
    first = lenses[0]["metrics"]
    if metric is None:
        offered = {m["key"] for m in first}
        if diff_mode:
            metric = next(k for k in ("divergence", "target0_prob_delta", "kl_delta") if k in offered)
        else:
            metric = "top1_prob"
    else:
        metric = _metric_name(metric, stacklevel=4)
    matches = [m for m in first if metric in (m["key"], m["name"])]
    if not matches:
        valid = sorted({m["key"] for m in first}, key=[m["key"] for m in first].index)
        raise ValueError(f"unknown metric {metric!r}; this grid offers {valid}.")
    # In difference mode a run metric opens on the other (e.g. patched) run.
    view = -1 if any(m["view"] == -1 for m in matches) else max(m["view"] for m in matches)

    model = ref.model_name
    if title is None:
        title = f"Lens grid · {model}" if model else "Lens grid"
        if diff_mode:
            title += f" · {run_names[1]} vs {run_names[0]}"
    props: dict[str, Any] = {
        "labels": list(ref.labels),
        "tokens": tokens,
        "tokenIds": [row[p] for p in positions],
        "tokenNotes": [notes[p] for p in positions],
        "positions": positions,
        "bos": bos,
        "hideBos": bos and len(positions) > 1,
        "compact": len(positions) > COMPACT_FROM,
        "lenses": lenses,
        "title": title,
        "initialLens": 0,
        "initialMetric": matches[0]["key"],
        "initialView": view,
    }
    if diff_mode:
        props["runs"] = list(run_names)
    return props


def lens_grid(
    *results: Union[LensResult, LensDiff, Mapping[str, Any]],
    labels: Optional[Sequence[str]] = None,
    batch: int = 0,
    diff: bool = False,
    metric: Optional[str] = None,
    run_names: Sequence[str] = ("clean", "patched"),
    title: Optional[str] = None,
) -> HTMLView:
    """The lens grid: stack entries x positions, each cell the lens's top-1 token.

    Rows are the stack entries (``0_pre`` ... ``final_post``), columns the read positions of one
    batch row with their tokens as headers (padding dropped). Cells are coloured by a metric
    chosen with buttons, named as in :meth:`LensResult.to_dataframe`: ``top1_prob``,
    ``entropy``, ``kl_to_final``, and, where the results hold them, ``target{t}_prob``,
    ``target{t}_rank``, ``own_cosine`` and ``own_rank``. Hovering a cell shows its top-k tokens
    with their ids and probabilities; clicking keeps them. Several results make a lens switch:
    they must be readouts of the same input (same tokens, positions and stack entries), e.g.
    the dict :func:`~tl_latentspaces.read_lenses` returns.

    Colours: each lens and metric has its own range, robust to outliers and stated in the
    legend: probabilities from 0 to their 98th percentile; entropy from the 2nd to the 98th
    percentile; KL and ranks on a log scale over that range; cosines and differences on a scale
    centred on zero. Values beyond the range take its end colour (the legend marks ``≤``/``≥``).
    The BOS column (column 0 when it holds the tokenizer's BOS token) is left out of the ranges
    and hidden at first (a toggle shows it). Byte-level tokens that are part of one character
    are written as that character, or as ``<0xE2>``-style escapes; ids show on hover. Long
    prompts open in compact mode; a zoom control sizes the cells.

    Difference mode, for two runs of the same input (clean vs patched): pass
    ``lens_grid(clean, patched, diff=True)`` with two LensResults or two ``read_lenses`` dicts
    (paired by lens), or LensDiffs (``clean.diff(patched)``). A view switch then shows either run
    or their difference: the patched top-1 token, the clean one struck through below it where it
    changed, coloured by ``divergence`` (KL between the runs' lens distributions, where the
    LensDiff has it), a change (``kl_delta``, ``entropy_delta``, ``target{t}_prob_delta``,
    ``target{t}_rank_delta``) or ``top1_changed``.

    Args:
        *results: LensResults, LensDiffs, or dicts of them (``read_lenses`` output).
        labels: Names on the lens buttons, one per result (default: each result's ``lens``, or
            the dict keys).
        batch: Which batch row to show.
        diff: Compare two runs (see above).
        metric: Key (or button name) of the metric shown first, e.g. ``"kl_to_final"``,
            ``"target0_rank"``, ``"kl_delta"``. Default: ``top1_prob``; in difference mode
            ``divergence``, else ``target0_prob_delta``, else ``kl_delta``. The old names
            (``"target_ranks:0"``, ``"own_scores"``, ...) still work, with a DeprecationWarning.
        run_names: The two runs' names in difference mode, base first.
        title: Title over the grid.

    Returns:
        An :class:`HTMLView` of the ``LensGrid`` component (``.props`` holds its data).

    Example:
        >>> r = read_lenses(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
        >>> lens_grid(r, metric="target0_rank")  # doctest: +SKIP
        >>> lens_grid(clean["logit"], patched["logit"], diff=True).save("patch.html")  # doctest: +SKIP
    """
    props = _grid_props(results, labels=labels, batch=batch, diff=diff, metric=metric,
                        run_names=run_names, title=title)
    return _render_component("LensGrid", props, title=props["title"])


# ====================================================================== CircuitsVis components
def _intensity(values: torch.Tensor, m: dict[str, Any]) -> torch.Tensor:
    """The colour intensity the components draw (js/src/colors.ts ``intensity``), without sign."""
    squash = (lambda x: x.sign() * x.abs().log1p()) if m["log"] else (lambda x: x)  # noqa: E731
    lo, hi = squash(torch.tensor(float(m["min"]))), squash(torch.tensor(float(m["max"])))
    if m["scale"] == "diverging":
        return (squash(values) / max(abs(float(lo)), abs(float(hi)))).clamp(-1, 1)
    return ((squash(values) - lo) / (hi - lo)).clamp(0, 1)


def _informative_entry(values: torch.Tensor, m: dict[str, Any], skip: Sequence[int]) -> int:
    """The entry whose colours vary most across positions (``values`` is ``[entry, pos]``)."""
    cols = [p for p in range(values.shape[1]) if p not in skip] or list(range(values.shape[1]))
    t = _intensity(torch.nan_to_num(values[:, cols].double()), m)
    spread = t.std(dim=1, correction=0) if t.shape[1] > 1 else t.abs()[:, 0]
    return int(spread.argmax())


def drift_tokens(
    result: LensResult,
    metric: Optional[str] = None,
    *,
    batch: int = 0,
    layers: Optional[Sequence[Selector]] = None,
    title: Optional[str] = None,
) -> HTMLView:
    """The input's tokens coloured by one per-token metric, one stack entry at a time.

    A slider (and a button per entry) picks the stack entry; the tokens are coloured by the
    metric there, on a range that fits the data (the same robust, per-metric ranges as
    :func:`lens_grid`, stated in the legend). Hovering a token lists its value at every entry,
    with its id. It opens on the entry whose colours vary most across the tokens (not
    ``0_pre``, where the own-token cosine is 1 everywhere). The default metric is the embedding
    lens's ``own_cosine`` (how far each position's residual has drifted from its own token's
    input embedding), or ``kl_to_final`` for the other lenses.

    Args:
        result: A lens readout.
        metric: A metric named as in :meth:`LensResult.to_dataframe`: ``"own_cosine"``,
            ``"own_rank"`` (embedding lens), ``"kl_to_final"``, ``"entropy"``, ``"top1_prob"``,
            ``"target{t}_prob"`` or ``"target{t}_rank"``. The old names (``"own_scores"``,
            ``"target_ranks:0"``, ...) still work, with a DeprecationWarning.
        batch: Which batch row to show (padding dropped).
        layers: The stack entries to offer (labels or indices), default all.
        title: Title over the view (default: the metric, lens and model).

    Returns:
        An :class:`HTMLView` of the ``TokenDrift`` component; ``.props`` holds ``tokens``,
        ``labels``, ``values`` (``[entry][pos]``), ``metric`` (its key, name, range) and
        ``initialEntry``.
    """
    if not isinstance(result, LensResult):
        raise ValueError(f"drift_tokens takes one LensResult, got {type(result).__name__}.")
    if metric is None:
        metric = "own_cosine" if result.own_scores is not None else "kl_to_final"
    elif isinstance(metric, str):
        metric = _metric_name(metric)
    b = _batch_index(batch, result.tokens.shape[0])
    keep = _real_positions(result, b)
    offered = _run_metrics(result, 0, b, keep, _target_names(result, b, keep))
    chosen = [m for m in offered if metric in (m["key"], m["name"])]
    if not chosen:
        raise ValueError(
            f"metric {metric!r} is not available for this {result.lens} lens result; valid: "
            f"{[m['key'] for m in offered]}."
        )
    m = chosen[0]
    entries = list(range(len(result.labels))) if layers is None else [_entry_index(result, e) for e in layers]
    if not entries:
        raise ValueError("layers is empty; pass at least one stack entry, or None for all.")
    m["values"] = [m["values"][e] for e in entries]
    positions = [result.positions[i] for i in keep]
    words = TokenText(result.decode)
    row = [int(i) for i in result.tokens[b].tolist()]
    texts, notes = words.sequence(row)
    bos = positions[0] == 0 and words.bos_id is not None and row[0] == words.bos_id
    skip = (0,) if bos else ()
    lens = {"metrics": [m]}
    _fill_ranges([lens], skip=skip, labels=[result.labels[e] for e in entries])
    del m["view"]
    values = torch.tensor([[float("nan") if v is None else v for v in r] for r in m["values"]], dtype=torch.float64)
    if title is None:
        title = f"{m['name']} across layers · {result.lens} lens" + (
            f" · {result.model_name}" if result.model_name else "")
    props = {
        "title": title,
        "lens": result.lens,
        "tokens": [texts[p] for p in positions],
        "tokenIds": [row[p] for p in positions],
        "tokenNotes": [notes[p] for p in positions],
        "positions": positions,
        "labels": [result.labels[e] for e in entries],
        "values": m.pop("values"),
        "metric": m,
        "initialEntry": _informative_entry(values, m, skip),
        "bos": bos,
        "hideBos": bos and len(positions) > 1,
    }
    return _render_component("TokenDrift", props, title=title)


def layer_predictions(result: LensResult, label: Selector, *, batch: int = 0) -> HTMLView:
    """One stack entry's next-token predictions, with CircuitsVis's ``TokenLogProbs`` component.

    Each token after the first is coloured by the log-probability the lens at ``label`` gave it
    from the previous position; hovering shows that position's top-k tokens and the true next
    token's rank. It draws the component ``circuitsvis.logits.token_log_probs`` draws, with the
    same props, built from the readout (the readout keeps the top-k, not the full distribution
    ``token_log_probs`` takes).

    The true next token's probability and rank come from the top-k when it is there, else from
    the result's targets: read with the next tokens as targets to have them everywhere::

        ids = model.to_tokens(text)
        result = tll.logit_lens(model, ids, targets=ids.roll(-1, dims=1))

    Args:
        result: A lens readout whose read positions are consecutive.
        label: The stack entry (``"12_pre"``, ``"final_post"`` or an index).
        batch: Which batch row to show (padding dropped).

    Returns:
        An :class:`HTMLView` of ``TokenLogProbs``; ``.props`` holds its props.
    """
    e = _entry_index(result, label)
    b = _batch_index(batch, result.tokens.shape[0])
    keep = _real_positions(result, b)
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
    ranks, log_probs, missing = [], [], []
    for i in range(len(keep) - 1):
        nxt = int(ids[pos[i + 1]])
        row = top_ids[keep[i]]
        if nxt in row:
            k = row.index(nxt)
            ranks.append(k)
            log_probs.append(math.log(max(float(top_probs[keep[i], k]), 1e-45)))
            continue
        tids = None if result.target_ids is None else result.target_ids[b, keep[i]].tolist()
        if tids is not None and nxt in tids and result.target_probs is not None and result.target_ranks is not None:
            t = tids.index(nxt)
            ranks.append(int(result.target_ranks[e, b, keep[i], t]))
            log_probs.append(math.log(max(float(result.target_probs[e, b, keep[i], t]), 1e-45)))
            continue
        missing.append(pos[i])
    if missing:
        raise ValueError(
            f"the next token's probability at {result.labels[e]} is unknown at positions {missing}: it is not "
            f"in the top-{result.top_ids.shape[-1]} and not a target. Read with the next tokens as targets: "
            "ids = model.to_tokens(text); tll.logit_lens(model, ids, targets=ids.roll(-1, dims=1))."
        )
    words = TokenText(result.decode)
    texts, _ = words.sequence([int(i) for i in ids.tolist()])
    prompt = [texts[p] for p in pos]
    props = {
        "prompt": prompt,
        "topKLogProbs": [[_num(math.log(max(p, 1e-45))) for p in top_probs[i].tolist()] for i in keep[:-1]],
        "topKTokens": [[words.text(t) for t in top_ids[i]] for i in keep[:-1]],
        "correctTokenRank": ranks,
        "correctTokenLogProb": [_num(lp) for lp in log_probs],
    }
    rendered = render("TokenLogProbs", **props)
    title = f"{result.labels[e]} predictions · {result.lens} lens" + (
        f" · {result.model_name}" if result.model_name else "")
    return _wrap(rendered, props, title=title, component="TokenLogProbs", props=props)


# ====================================================================== static SVG figures
# Viridis at 11 evenly spaced stops: perceptually uniform and readable in grey.
_VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c",
            "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725"]
# Okabe-Ito: distinguishable with every common colour-vision deficiency.
_CURVE_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
_FONT = "-apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif"


def _viridis(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a = [int(_VIRIDIS[i][k:k + 2], 16) for k in (1, 3, 5)]
    c = [int(_VIRIDIS[i + 1][k:k + 2], 16) for k in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, c))


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x if not isinstance(x, torch.Tensor) else x.detach().cpu(), dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} must be a tensor, array or list of numbers, got {type(x).__name__}.") from err
    return t


def _check_labels(labels: Any, n: int, what: str) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not all(isinstance(s, str) for s in labels):
        raise ValueError(f"labels must be a list of strings, got {labels!r}.")
    if len(labels) != n:
        raise ValueError(f"{what} has {n} layers but {len(labels)} labels were given.")
    return list(labels)


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _svg_view(svg: str, *, title: str, props: dict[str, Any]) -> HTMLView:
    src = f'<div class="tl-latentspaces-figure" style="margin: 15px 0;">{svg}</div>'
    return HTMLView(src, title=title, props=props, svg=svg)


def _label_step(n: int, size: float, font: float = 10.0) -> int:
    """Show every k-th label so that labels ``size`` px apart do not overlap."""
    return max(1, math.ceil((font + 2) / max(size, 1e-9))) if n else 1


def cka_matrix_view(
    matrix: ArrayLike,
    labels: Sequence[str],
    title: str = "CKA between layers",
    *,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> HTMLView:
    """A layer x layer similarity matrix (e.g. linear CKA) as a heat map (static SVG).

    Args:
        matrix: ``[L, L]`` values; row ``i``, column ``j`` is drawn at row ``i`` from the top.
        labels: The ``L`` layer labels (e.g. ``"0_pre"`` ... ``"final_post"``).
        title: The figure's title.
        vmin, vmax: Colour range; default ``[0, 1]``, widened to the data if it leaves that.

    Returns:
        An :class:`HTMLView`; ``.svg`` is the SVG document, ``.props`` the data drawn. Hover a
        cell for its value.
    """
    m = _as_tensor(matrix, "matrix")
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square [L, L] tensor, got shape {tuple(m.shape)}.")
    L = m.shape[0]
    names = _check_labels(labels, L, "matrix")
    finite = m[torch.isfinite(m)]
    lo = float(min(0.0, finite.min().item())) if vmin is None and finite.numel() else (0.0 if vmin is None else vmin)
    hi = float(max(1.0, finite.max().item())) if vmax is None and finite.numel() else (1.0 if vmax is None else vmax)
    if not hi > lo:
        raise ValueError(f"vmax must be greater than vmin, got vmin={lo}, vmax={hi}.")
    values = _nums(m, 4)

    cell = min(28.0, max(6.0, 520.0 / L))
    longest = max(len(s) for s in names)
    left = 14 + 6.2 * longest
    top = 36.0
    size = cell * L
    bottom = 10 + 6.2 * longest * 0.75 + 6
    bar_x = left + size + 18
    width = bar_x + 16 + 48
    height = top + size + bottom
    step = _label_step(L, cell)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{_FONT}" font-size="10" '
        f'role="img" aria-label="{html.escape(title)}" data-kind="cka-matrix">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left:.1f}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i in range(L):
        for j in range(L):
            v = values[i][j]
            fill = "#dddddd" if v is None else _viridis((v - lo) / (hi - lo))
            parts.append(
                f'<rect class="cell" data-i="{i}" data-j="{j}" data-value="{"" if v is None else v}" '
                f'x="{left + j * cell:.2f}" y="{top + i * cell:.2f}" width="{cell:.2f}" height="{cell:.2f}" '
                f'fill="{fill}"><title>{html.escape(names[i])} × {html.escape(names[j])}: {_fmt(v, 4)}</title></rect>'
            )
    for i in range(0, L, step):
        y = top + (i + 0.5) * cell
        parts.append(f'<text class="row-label" x="{left - 4:.1f}" y="{y:.1f}" text-anchor="end" '
                     f'dominant-baseline="middle">{html.escape(names[i])}</text>')
        x = left + (i + 0.5) * cell
        parts.append(f'<text class="col-label" x="{x:.1f}" y="{top + size + 6:.1f}" text-anchor="end" '
                     f'dominant-baseline="middle" transform="rotate(-50 {x:.1f} {top + size + 6:.1f})">'
                     f'{html.escape(names[i])}</text>')
    # Colour bar.
    stops = "".join(f'<stop offset="{k / 10:.1f}" stop-color="{_VIRIDIS[10 - k]}"/>' for k in range(11))
    gid = "viridis-" + uuid.uuid4().hex[:8]
    parts.append(f'<defs><linearGradient id="{gid}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>')
    parts.append(f'<rect x="{bar_x:.1f}" y="{top:.1f}" width="12" height="{size:.1f}" fill="url(#{gid})" stroke="#999"/>')
    for frac, v in ((0.0, hi), (0.5, (lo + hi) / 2), (1.0, lo)):
        parts.append(f'<text class="bar-label" x="{bar_x + 16:.1f}" y="{top + frac * size:.1f}" '
                     f'dominant-baseline="middle">{_fmt(v)}</text>')
    parts.append("</svg>")
    props = {"matrix": values, "labels": names, "vmin": lo, "vmax": hi, "title": title}
    return _svg_view("".join(parts), title=title, props=props)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[float, float, list[float], int]:
    """Round axis limits and ticks covering [lo, hi]; also the decimals to print them with."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    a, z = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [a + k * step for k in range(int(round((z - a) / step)) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / mag, 6) == 2.5 else 0))
    return a, z, ticks, decimals


def _curve_values(x: Any, L: int, what: str) -> list[Optional[float]]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return [_num(x)] * L
    t = _as_tensor(x, what)
    if t.ndim == 0:
        return [_num(float(t))] * L
    if t.ndim != 1 or t.shape[0] != L:
        raise ValueError(f"{what} must be a float or a tensor of shape [{L}] (one per label), got {tuple(t.shape)}.")
    return _nums(t)


def layer_curves_view(
    labels: Sequence[str],
    curves: Mapping[str, ArrayLike],
    null: Optional[Mapping[str, tuple[Any, Any]]] = None,
    *,
    ylabel: str = "",
    title: str = "",
    ymin: Optional[float] = None,
    ymax: Optional[float] = None,
) -> HTMLView:
    """Per-layer curves (principal angles, variance in the embedding subspace, ...) as static SVG.

    Args:
        labels: The ``L`` layer labels along the x axis.
        curves: ``{name: [L] values}``; NaN leaves a gap.
        null: ``{name: (mean, std)}`` the null baseline of a curve (same name), each a float or
            ``[L]`` values: drawn as a dashed line at the mean in the curve's colour with a band of
            one standard deviation around it.
        ylabel: The y axis's label.
        title: The figure's title.
        ymin, ymax: The y range (default: the data's, baselines included, rounded out).

    Returns:
        An :class:`HTMLView`; ``.svg`` is the SVG document, ``.props`` the data drawn. Hover a
        point for its value.
    """
    L = len(labels) if isinstance(labels, Sequence) and not isinstance(labels, str) else -1
    names = _check_labels(labels, L, "the x axis")
    if L == 0:
        raise ValueError("labels is empty: a curve needs at least one layer.")
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {name: [L] values}.")
    data = {str(k): _curve_values(v, L, f"curve {k!r}") for k, v in curves.items()}
    nulls: dict[str, dict[str, list[Optional[float]]]] = {}
    for k, pair in (null or {}).items():
        if k not in data:
            raise ValueError(f"null baseline {k!r} has no curve of that name; curves are {list(data)}.")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"null[{k!r}] must be a (mean, std) pair, got {type(pair).__name__}.")
        nulls[k] = {"mean": _curve_values(pair[0], L, f"null[{k!r}] mean"),
                    "std": _curve_values(pair[1], L, f"null[{k!r}] std")}
    seen = [v for vs in data.values() for v in vs if v is not None]
    for nb in nulls.values():
        for mu, sd in zip(nb["mean"], nb["std"]):
            if mu is not None:
                seen += [mu - (sd or 0.0), mu + (sd or 0.0)]
    lo = min(seen) if ymin is None and seen else (0.0 if ymin is None else ymin)
    hi = max(seen) if ymax is None and seen else (1.0 if ymax is None else ymax)
    margin = 0.04 * (hi - lo)  # keeps points off the frame
    y0, y1, ticks, dec = _nice_ticks(lo - (margin if ymin is None else 0.0), hi + (margin if ymax is None else 0.0))
    if ymin is not None:
        y0 = ymin
    if ymax is not None:
        y1 = ymax
    ticks = [t for t in ticks if y0 - 1e-12 <= t <= y1 + 1e-12]

    plot_w = max(360.0, min(720.0, 22.0 * L))
    plot_h = 260.0
    left, top = 64.0, 36.0
    longest = max(len(s) for s in names)
    bottom = 14 + 6.2 * longest * 0.75 + 8
    legend_w = 24 + 6.5 * max(len(k) + (15 if k in nulls else 0) for k in data)
    width = left + plot_w + 16 + legend_w
    height = top + plot_h + bottom + (16 if ylabel else 0)

    pad = 10.0  # keeps the end points inside the frame

    def X(i: float) -> float:
        return left + pad + ((plot_w - 2 * pad) * (i / (L - 1)) if L > 1 else (plot_w - 2 * pad) / 2)

    def Y(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{_FONT}" font-size="10" '
        f'role="img" aria-label="{html.escape(title or ylabel or "layer curves")}" data-kind="layer-curves">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    if title:
        parts.append(f'<text x="{left:.1f}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    clip = "plot-" + uuid.uuid4().hex[:8]
    parts.append(f'<defs><clipPath id="{clip}"><rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>'
                 "</clipPath></defs>")
    for t in ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{Y(t):.2f}" y2="{Y(t):.2f}" stroke="#e6e6e6"/>')
        parts.append(f'<text class="y-tick" x="{left - 6}" y="{Y(t):.2f}" text-anchor="end" '
                     f'dominant-baseline="middle">{t:.{dec}f}</text>')
    step = _label_step(L, (plot_w - 2 * pad) / max(L - 1, 1))
    for i in range(0, L, step):
        x = X(i)
        parts.append(f'<line x1="{x:.2f}" x2="{x:.2f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#666"/>')
        parts.append(f'<text class="x-tick" x="{x:.2f}" y="{top + plot_h + 8:.1f}" text-anchor="end" '
                     f'dominant-baseline="middle" transform="rotate(-50 {x:.2f} {top + plot_h + 8:.1f})">'
                     f'{html.escape(names[i])}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#666"/>')
    if ylabel:
        cy = top + plot_h / 2
        parts.append(f'<text x="16" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 16 {cy:.1f})" '
                     f'font-size="11">{html.escape(ylabel)}</text>')

    def segments(vals: list[Optional[float]]) -> list[list[tuple[int, float]]]:
        out: list[list[tuple[int, float]]] = [[]]
        for i, v in enumerate(vals):
            if v is None:
                out.append([])
            else:
                out[-1].append((i, v))
        return [s for s in out if s]

    parts.append(f'<g clip-path="url(#{clip})">')
    for n, (name, vals) in enumerate(data.items()):
        colour = _CURVE_COLOURS[n % len(_CURVE_COLOURS)]
        if name in nulls:
            nb = nulls[name]
            pts = [(i, mu, sd or 0.0) for i, (mu, sd) in enumerate(zip(nb["mean"], nb["std"])) if mu is not None]
            if pts:
                upper = " ".join(f"{X(i):.2f},{Y(mu + sd):.2f}" for i, mu, sd in pts)
                lower = " ".join(f"{X(i):.2f},{Y(mu - sd):.2f}" for i, mu, sd in reversed(pts))
                parts.append(f'<polygon class="null-band" data-name="{html.escape(name)}" points="{upper} {lower}" '
                             f'fill="{colour}" fill-opacity="0.15" stroke="none"/>')
                for seg in segments(nb["mean"]):
                    d = " ".join(f"{X(i):.2f},{Y(v):.2f}" for i, v in seg)
                    parts.append(f'<polyline class="null-mean" data-name="{html.escape(name)}" points="{d}" '
                                 f'fill="none" stroke="{colour}" stroke-width="1.2" stroke-dasharray="5 3"/>')
        parts.append(f'<g class="curve" data-name="{html.escape(name)}">')
        for seg in segments(vals):
            d = " ".join(f"{X(i):.2f},{Y(v):.2f}" for i, v in seg)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for i, v in enumerate(vals):
            if v is not None:
                parts.append(f'<circle cx="{X(i):.2f}" cy="{Y(v):.2f}" r="2.5" fill="{colour}">'
                             f'<title>{html.escape(name)} at {html.escape(names[i])}: {_fmt(v, 4)}</title></circle>')
        parts.append("</g>")
    parts.append("</g>")
    # Legend.
    lx = left + plot_w + 16
    ly = top + 6
    for n, name in enumerate(data):
        colour = _CURVE_COLOURS[n % len(_CURVE_COLOURS)]
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text class="legend" x="{lx + 22}" y="{ly}" dominant-baseline="middle">{html.escape(name)}</text>')
        ly += 16
        if name in nulls:
            parts.append(f'<rect x="{lx}" y="{ly - 5}" width="18" height="10" fill="{colour}" fill-opacity="0.15"/>')
            parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="1.2" '
                         'stroke-dasharray="5 3"/>')
            parts.append(f'<text class="legend" x="{lx + 22}" y="{ly}" dominant-baseline="middle">'
                         f'{html.escape(name)} (null ± 1 sd)</text>')
            ly += 16
    parts.append("</svg>")
    props = {"labels": names, "curves": data, "null": nulls, "ylabel": ylabel, "title": title,
             "ymin": y0, "ymax": y1}
    return _svg_view("".join(parts), title=title or ylabel or "layer curves", props=props)
