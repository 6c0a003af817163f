"""Static figures of alignment results (SVG): a layer x layer matrix and per-layer curves."""

from __future__ import annotations

import html
import math
import uuid
from typing import Any, Mapping, Optional, Sequence

import torch

from tl_latentspaces.views.data import num, nums
from tl_latentspaces.views.render import HTMLView

__all__ = ["cka_matrix_view", "layer_curves_view"]

ArrayLike = Any  # a torch.Tensor, numpy array or nested list of numbers


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
    values = nums(m, 4)

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


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[float, float, list[float], int]:
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
        return [num(x)] * L
    t = _as_tensor(x, what)
    if t.ndim == 0:
        return [num(float(t))] * L
    if t.ndim != 1 or t.shape[0] != L:
        raise ValueError(f"{what} must be a float or a tensor of shape [{L}] (one per label), got {tuple(t.shape)}.")
    return nums(t)


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
    y0, y1, ticks, dec = nice_ticks(lo - (margin if ymin is None else 0.0), hi + (margin if ymax is None else 0.0))
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
